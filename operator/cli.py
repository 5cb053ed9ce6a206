"""The `embedtune` command.

Each subcommand imports what it needs when it runs, so the operator image (no torch) and
the trainer image (no kopf) can both carry this one entry point.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from embedtune.trainer.errors import EXIT_INPUT_ERROR, EXIT_INTERRUPTED, EXIT_OK, InputError, write_termination_message


def _check_data(args: argparse.Namespace) -> int:
    from embedtune.trainer.config import HuggingFaceSource
    from embedtune.trainer.data import LoadResult, data_warnings, fill_negatives, load_hugging_face, load_jsonl
    from embedtune.trainer.mining import load_candidates

    columns = {}
    for item in args.column:
        field, _, column = item.partition("=")
        if field not in ("query", "pos", "neg", "prompt") or not column:
            print(f"--column {item}: expected FIELD=COLUMN with FIELD one of query, pos, neg, prompt", file=sys.stderr)
            return EXIT_INPUT_ERROR
        columns[field] = column
    if not args.paths and not args.candidates:
        print(
            "check-data: give training data (PATH ...), a candidate pool (--candidates FILE), or both", file=sys.stderr
        )
        return EXIT_INPUT_ERROR
    total = LoadResult([], [])
    for path in args.paths:
        if _is_hf_dataset(Path(path)) or columns:
            found = load_hugging_face(HuggingFaceSource(path=path, split=args.split, columns=columns))
        else:
            found = load_jsonl([Path(path)])
        total.extend(found)
    candidates = []
    if args.candidates:
        try:
            candidates = load_candidates(args.candidates)
        except InputError as exc:
            total.problems += exc.problems
    if not total.problems and args.group_size:
        fill_negatives(total.records, args.group_size, seed=0)
    for problem in total.problems:
        print(problem)
    for warning in data_warnings(total):
        print(f"warning: {warning}", file=sys.stderr)
    inputs = len(args.paths) + bool(args.candidates)
    if total.problems:
        print(f"{len(total.problems)} problems in {inputs} input(s); fix them before training", file=sys.stderr)
        return EXIT_INPUT_ERROR
    print(
        f"ok: {len(total.records)} records" + (f", {len(candidates)} candidates" if candidates else ""), file=sys.stderr
    )
    return EXIT_OK


def _is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / marker).exists() for marker in ("dataset_dict.json", "state.json"))


def _train(args: argparse.Namespace) -> int:
    from embedtune.trainer.launch import local_processes, local_trainer_command, run_child

    return run_child(local_trainer_command(args.config, args.nproc_per_node or local_processes()))


def _evaluate(args: argparse.Namespace) -> int:
    from embedtune.trainer.evaluate import (
        EvaluationOptions,
        format_table,
        patch_status_metrics,
        run_evaluation,
        write_report,
    )

    options = EvaluationOptions(
        ks=_cutoffs(args.k),
        index=args.index,
        batch_size=args.batch_size,
        precision=args.precision,
        overrides=_model_overrides(args),
    )
    report = run_evaluation(
        args.model,
        args.eval_set,
        options,
        baseline=args.baseline,
        endpoint=args.storage_endpoint,
        region=args.storage_region,
    )
    print(format_table(report, options.ks))
    if args.output:
        write_report(report, args.output, endpoint=args.storage_endpoint, region=args.storage_region)
    if args.patch_status:
        patch_status_metrics(*args.patch_status, report)
    return EXIT_OK


def _mine(args: argparse.Namespace) -> int:
    import tempfile

    from pydantic import ValidationError

    from embedtune.trainer.config import HardNegativesSpec
    from embedtune.trainer.data import load_jsonl, write_jsonl
    from embedtune.trainer.encoding import load_encoder
    from embedtune.trainer.mining import load_candidates, mine_hard_negatives
    from embedtune.trainer.storage import fetch_to_local

    storage = {"endpoint": args.storage_endpoint, "region": args.storage_region}
    try:
        spec = HardNegativesSpec(mine=True, range=args.range, count=args.count, max_score_ratio=args.max_score_ratio)
    except ValidationError as exc:
        for item in exc.errors():
            flag = re.sub(r"(?<!^)(?=[A-Z])", "-", str(item["loc"][0])).lower()
            print(f"--{flag}: {item['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    with tempfile.TemporaryDirectory(prefix="embedtune-mine-") as work:
        loaded = load_jsonl([fetch_to_local(uri, Path(work) / "data", **storage) for uri in args.inputs])
        if loaded.problems:
            raise InputError(
                f"training data has {len(loaded.problems)} problems; fix them and start again", loaded.problems
            )
        candidates = (
            load_candidates(fetch_to_local(args.candidates, Path(work) / "pool", **storage))
            if args.candidates
            else None
        )
        model = load_encoder(
            fetch_to_local(args.model, Path(work) / "model", **storage),
            _model_overrides(args),
            precision=args.precision,
        )
        summary = mine_hard_negatives(
            loaded.records, model, spec, seed=args.seed, candidates=candidates, batch_size=args.batch_size
        )
    write_jsonl(args.output, (record.to_json() for record in loaded.records))
    print(
        f"mined {summary.mined} negatives for {summary.records} records ({summary.short} got fewer than "
        f"{args.count}; the guard skipped {summary.guarded} candidates) -> {args.output}",
        file=sys.stderr,
    )
    return EXIT_OK


def _cutoffs(text: str) -> tuple[int, ...]:

    try:
        ks = tuple(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        ks = ()
    if not ks or ks[0] < 1:
        raise InputError(f"--k {text}: expected positive integers separated by commas, e.g. 1,10,100")
    return ks


def _namespaced_name(text: str) -> tuple[str, str]:
    namespace, _, name = text.partition("/")
    if not namespace or not name or "/" in name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAMESPACE/NAME")
    return namespace, name


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return int(text)


def _model_overrides(args: argparse.Namespace) -> dict:
    """The ModelSpec fields given on the command line (the rest stay the model's own)."""
    given = {
        "pooling": args.pooling,
        "normalize": args.normalize,
        "query_instruction": args.query_instruction,
        "passage_instruction": args.passage_instruction,
        "query_max_length": args.query_max_length,
        "passage_max_length": args.passage_max_length,
    }
    return {name: value for name, value in given.items() if value is not None}


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "encoding",
        "How to encode: needed for a plain Hugging Face checkpoint; for a sentence-transformers "
        "model, each flag given replaces the model's own setting",
    )
    group.add_argument("--pooling", choices=["cls", "mean", "lastToken"], default=None)
    group.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="L2-normalize embeddings (default for a plain checkpoint: on)",
    )
    group.add_argument("--query-instruction", default=None, help="prefix prepended to every query")
    group.add_argument("--passage-instruction", default=None, help="prefix prepended to every passage")
    group.add_argument("--query-max-length", type=_positive_int, default=None, help="query length limit in tokens")
    group.add_argument("--passage-max-length", type=_positive_int, default=None, help="passage length limit in tokens")
    group.add_argument("--batch-size", type=_positive_int, default=64, help="texts per forward pass (default: 64)")
    group.add_argument(
        "--precision",
        choices=["auto", "fp32", "fp16", "bf16"],
        default="auto",
        help="auto: bf16 (or fp16) on a GPU, fp32 on CPU",
    )


def _add_storage_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-endpoint", default=None, help="S3 endpoint URL (MinIO, Ceph ...)")
    parser.add_argument("--storage-region", default=None, help="S3 region")


def _read_manifests(path: Path) -> list:
    import yaml

    try:
        return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML: {exc}") from exc


def _validate(args: argparse.Namespace) -> int:
    from embedtune.operator.spec import parse_finetune

    failed = False
    manifests = _read_manifests(args.file)
    if not manifests:
        raise InputError(f"{args.file}: no manifest in the file")
    for manifest in manifests:
        try:
            parse_finetune(manifest)
        except InputError as exc:
            failed = True
            print(exc.report(), file=sys.stderr)
    if failed:
        return EXIT_INPUT_ERROR
    print(f"ok: {len(manifests)} valid manifest(s)", file=sys.stderr)
    return EXIT_OK


def _render(args: argparse.Namespace) -> int:
    import yaml

    from embedtune.operator.defaults import ClusterDefaults
    from embedtune.operator.render import Run, build_evaluation_job, build_run_objects
    from embedtune.operator.spec import parse_finetune

    objects = []
    dumper = _block_strings()
    defaults = ClusterDefaults.from_args(args)
    for manifest in _read_manifests(args.file):
        spec = defaults.apply(parse_finetune(manifest))
        metadata = manifest["metadata"]
        run = Run(metadata.get("namespace") or args.namespace, metadata["name"], str(metadata.get("generation", 1)))
        objects += build_run_objects(
            spec, run, spec.resources.image, deadline_seconds=spec.run_policy.active_deadline_seconds
        )
        if spec.evaluation.enabled:
            objects.append(build_evaluation_job(spec, run, spec.resources.image))
    print(yaml.dump_all(objects, Dumper=dumper, sort_keys=False), end="")
    return EXIT_OK


def _block_strings():
    import yaml

    class BlockStringDumper(yaml.SafeDumper):
        """Multi-line strings (the trainer config in its ConfigMap) as readable `|` blocks."""

    def represent_str(dumper, value):
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    BlockStringDumper.add_representer(str, represent_str)
    return BlockStringDumper


def _run(args: argparse.Namespace) -> int:
    from embedtune.operator.local import LocalOptions, run_finetune

    manifests = _read_manifests(args.file)
    if len(manifests) != 1:
        raise InputError(f"{args.file}: expected one EmbeddingFinetune manifest, found {len(manifests)}")
    options = LocalOptions(
        default_storage=str(Path(args.storage).resolve()) if "://" not in args.storage else args.storage,
        nproc_per_node=args.nproc_per_node,
        work_dir=args.work_dir,
        new_run=args.new_run,
    )
    return run_finetune(manifests[0], args.file.resolve().parent, options)


def _operator(args: argparse.Namespace) -> int:
    from embedtune.operator.main import run_operator

    return run_operator(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedtune", description="Fine-tune text-embedding models for retrieval.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser(
        "check-data",
        help="validate training data; one line per problem, exit 2 if any",
        description="Validate FlagEmbedding JSONL files/directories or Hugging Face datasets, and a candidate "
        "pool. Prints FILE:LINE: field: reason for every problem and exits 2 if there is any; valid records that "
        "teach nothing (duplicates, a query equal to its positive ...) are counted as warnings.",
    )
    check.add_argument("paths", nargs="*", metavar="PATH", help="JSONL file, directory, or save_to_disk dataset")
    check.add_argument(
        "--candidates",
        type=Path,
        default=None,
        metavar="FILE",
        help='also check a hard-negative candidate pool: JSONL of {"text": ...} passages',
    )
    check.add_argument(
        "--column",
        action="append",
        default=[],
        metavar="FIELD=COLUMN",
        help="Hugging Face column mapping, e.g. --column query=question --column pos=context",
    )
    check.add_argument("--split", default="train", help="Hugging Face split (default: train)")
    check.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="also check there are enough distinct passages to fill groupSize-1 negatives",
    )
    check.set_defaults(func=_check_data)

    train = commands.add_parser(
        "train",
        help="run the trainer on this machine under torchrun",
        description="Run the trainer on this machine (all local GPUs, or one CPU process) with a trainer config.",
    )
    train.add_argument("config", type=Path, help="trainer config (YAML or JSON)")
    train.add_argument("--nproc-per-node", type=int, default=None, help="processes (default: one per GPU, or 1)")
    train.set_defaults(func=_train)

    evaluate = commands.add_parser(
        "evaluate",
        help="retrieval metrics of a model (and its baseline) on an evaluation set",
        description="Encode an evaluation set (queries.jsonl, corpus.jsonl, qrels.jsonl) with each model, "
        "retrieve with faiss and print nDCG, Recall, MRR, MAP and P at every k, averaged over all queries. "
        "Exits 2 when the evaluation set or a model is unusable.",
    )
    evaluate.add_argument("--model", required=True, help="fine-tuned model: path, s3:// URI or model id")
    evaluate.add_argument("--baseline", default=None, help="model to compare with (e.g. the base model)")
    evaluate.add_argument("--eval-set", required=True, help="directory or s3:// prefix of the evaluation set")
    evaluate.add_argument("--k", default="1,10,100", help="cutoffs, comma-separated (default: 1,10,100)")
    evaluate.add_argument("--output", default=None, help="write metrics.json here (path or s3:// URI)")
    evaluate.add_argument(
        "--patch-status",
        type=_namespaced_name,
        default=None,
        metavar="NAMESPACE/NAME",
        help="patch the metrics into this EmbeddingFinetune's status.metrics",
    )
    evaluate.add_argument(
        "--index",
        choices=["exact", "ivf", "hnsw"],
        default="exact",
        help="faiss search: exact (default) or approximate for large corpora",
    )
    _add_model_flags(evaluate)
    _add_storage_flags(evaluate)
    evaluate.set_defaults(func=_evaluate)

    mine = commands.add_parser(
        "mine",
        help="add hard negatives to training data, retrieved with a model",
        description="For every record, retrieve passages with the model (faiss, exact) and add COUNT negatives "
        "sampled (seeded) from the ranks FIRST+1..LAST, never a positive of the query, the query itself or a "
        "negative it already has. Writes FlagEmbedding JSONL; exits 2 on invalid input.",
    )
    mine.add_argument("inputs", nargs="+", metavar="INPUT", help="FlagEmbedding JSONL file/directory (or s3:// URI)")
    mine.add_argument("--model", required=True, help="model: path, s3:// URI or model id")
    mine.add_argument("--output", required=True, type=Path, help="JSONL file to write")
    mine.add_argument("--range", default="10-100", help="FIRST-LAST ranks to sample from (default: 10-100)")
    mine.add_argument("--count", type=int, default=7, help="negatives to add per record (default: 7)")
    mine.add_argument(
        "--max-score-ratio",
        type=float,
        default=None,
        help="false-negative guard: skip candidates scoring above this fraction of the positive's",
    )
    mine.add_argument(
        "--candidates",
        default=None,
        help='JSONL of {"text": ...} passages to mine from (default: every passage of the inputs)',
    )
    mine.add_argument("--seed", type=int, default=42)
    _add_model_flags(mine)
    _add_storage_flags(mine)
    mine.set_defaults(func=_mine)

    from embedtune.operator.defaults import add_default_arguments

    validate = commands.add_parser(
        "validate",
        help="check EmbeddingFinetune manifests; every problem listed, exit 2 if any",
        description="Check every EmbeddingFinetune in FILE as the operator would, including the rules "
        "the CRD schema cannot express. Prints `field.path: reason` per problem and exits 2 if any.",
    )
    validate.add_argument("file", type=Path, help="YAML file with one or more manifests")
    validate.set_defaults(func=_validate)

    render = commands.add_parser(
        "render",
        help="print, as YAML, every object the operator would create",
        description="Print the ServiceAccount, Role, RoleBinding, headless Service, trainer ConfigMap, "
        "training Job and evaluation Job of each EmbeddingFinetune in FILE (first run, first attempt).",
    )
    render.add_argument("file", type=Path, help="YAML file with one or more manifests")
    render.add_argument("--namespace", default="default", help="for manifests without one (default: default)")
    add_default_arguments(render)
    render.set_defaults(func=_render)

    run = commands.add_parser(
        "run",
        help="run an EmbeddingFinetune on this machine: data, training, evaluation",
        description="Validate the manifest and its data, train (all local GPUs, or CPU), evaluate base vs "
        "fine-tuned and print the metrics and the final status, with the operator's own planner. Relative "
        "paths in the manifest are relative to its folder. Ctrl-C stores a checkpoint; the same command "
        "resumes. Exit codes: 0 succeeded, 2 invalid manifest or data, 130 interrupted, 1 failed.",
    )
    run.add_argument("file", type=Path, help="YAML file with one EmbeddingFinetune manifest")
    run.add_argument(
        "--storage",
        default="embedtune-runs",
        help="storage when the manifest names none: a folder or s3:// URI (default: ./embedtune-runs)",
    )
    run.add_argument(
        "--nproc-per-node",
        type=_positive_int,
        default=None,
        help="trainer processes (default: one per GPU, or 1 on CPU)",
    )
    run.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="scratch folder for data and checkpoints before upload (default: a temporary one)",
    )
    run.add_argument(
        "--new-run",
        action="store_true",
        help="start a new run even if this spec has run before (e.g. after changing the data files)",
    )
    run.set_defaults(func=_run)

    from embedtune.operator.main import add_arguments

    operator = commands.add_parser(
        "operator",
        help="run the Kubernetes operator",
        description="Reconcile EmbeddingFinetune resources into training and evaluation Jobs (kopf).",
    )
    add_arguments(operator)
    operator.set_defaults(func=_operator)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except InputError as exc:  # every command: the user's input is wrong, each problem listed
        print(exc.report(), file=sys.stderr)
        # in a Job's pod, the operator reads why from the termination message
        write_termination_message(json.dumps({"reason": "InputError", "message": exc.report(limit=20)}))
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
