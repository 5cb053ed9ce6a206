"""The `embedtune` commands that run in the trainer image: check-data, train, evaluate, mine.

Each command's parser sits next to the function it calls. Heavy modules (torch, faiss,
sentence-transformers) are imported when a command runs, so the operator image, which has
none of them, still builds the whole `embedtune` parser.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Any, get_args

from pydantic import ValidationError

from .config import DEFAULT_STORAGE_RETRY_SECONDS, StorageAccess, TrainingField, problems_from_validation_error
from .contract import EncodingSettings, EvaluationConfig, RunIdentity, TerminationMessage, load_config
from .errors import (
    EXIT_INPUT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_STORAGE_UNAVAILABLE,
    InputError,
    StorageUnavailable,
)
from .storage import quiet_transport_loggers

TRAINING_FIELDS = get_args(TrainingField)


def register(commands: argparse._SubParsersAction) -> None:
    for add_command in (_add_check_data, _add_train, _add_evaluate, _add_mine):
        add_command(commands)


def run_command(command, args: argparse.Namespace) -> int:
    """Run a command; the user's input errors become exit 2 with every problem listed, on
    stderr and, inside a pod, in the termination message the operator reads."""
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    quiet_transport_loggers()
    # faiss logs each CPU build it tries, failures included (as ModuleNotFoundError), at INFO
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        return command(args)
    except InputError as exc:
        print(exc.report(), file=sys.stderr)
        TerminationMessage.of_input_error(exc).write()
        return EXIT_INPUT_ERROR
    except StorageUnavailable as exc:  # retrying later can help: the operator does, and so can the user
        print(f"storage unavailable: {exc}", file=sys.stderr)
        TerminationMessage.of_storage_unavailable(exc).write()
        return EXIT_STORAGE_UNAVAILABLE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return int(text)


# --- check-data ---------------------------------------------------------------------------


def _add_check_data(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "check-data",
        help="validate training data; one line per problem, exit 2 if any",
        description="Validate FlagEmbedding JSONL files/directories or Hugging Face datasets, and a candidate "
        "pool. Prints FILE:LINE: field: reason for every problem and exits 2 if there is any; valid records that "
        "teach nothing (duplicates, a query equal to its positive ...) are counted as warnings.",
    )
    parser.add_argument("paths", nargs="*", metavar="PATH", help="JSONL file, directory, or save_to_disk dataset")
    parser.add_argument(
        "--candidates",
        type=Path,
        default=None,
        metavar="FILE",
        help='also check a hard-negative candidate pool: JSONL of {"text": ...} passages',
    )
    parser.add_argument(
        "--column",
        action="append",
        default=[],
        metavar="FIELD=COLUMN",
        help="Hugging Face column mapping, e.g. --column query=question --column pos=context",
    )
    parser.add_argument("--split", default="train", help="Hugging Face split (default: train)")
    parser.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="also check there are enough distinct passages to fill groupSize-1 negatives",
    )
    parser.add_argument(
        "--distillation",
        action="store_true",
        help="check the data for training.distillation: every record carries pos_scores/neg_scores "
        "(and, with --group-size, enough scored negatives)",
    )
    parser.set_defaults(func=_check_data)


def _check_data(args: argparse.Namespace) -> int:
    from .config import HuggingFaceSource
    from .data import (
        LoadResult,
        check_distillable,
        data_warnings,
        fill_negatives,
        ignored_scores_warning,
        load_hugging_face,
        load_jsonl,
    )
    from .mining import load_candidates

    columns = {}
    for item in args.column:
        field, _, column = item.partition("=")
        if field not in TRAINING_FIELDS or not column:
            raise InputError(f"--column {item}: expected FIELD=COLUMN with FIELD one of {', '.join(TRAINING_FIELDS)}")
        columns[field] = column
    if not args.paths and not args.candidates:
        raise InputError("check-data: give training data (PATH ...), a candidate pool (--candidates FILE), or both")
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
    if not total.problems and args.distillation:
        try:
            check_distillable(total, args.group_size or 1)
        except InputError as exc:
            total.problems += exc.problems
    if not total.problems and args.group_size:
        fill_negatives(total.records, args.group_size, seed=0)
    for problem in total.problems:
        print(problem)
    warnings = data_warnings(total)
    if not args.distillation and (ignored := ignored_scores_warning(total)):
        warnings.append(f"{ignored} (check-data --distillation checks them)")
    for warning in warnings:
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


# --- train --------------------------------------------------------------------------------


def _add_train(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train",
        help="run the trainer on this machine under torchrun",
        description="Run the trainer on this machine (all local GPUs, or one CPU process) with a trainer config.",
    )
    parser.add_argument("config", type=Path, help="trainer config (YAML or JSON)")
    parser.add_argument("--nproc-per-node", type=int, default=None, help="processes (default: one per GPU, or 1)")
    parser.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from .launch import local_processes, local_trainer_command, run_child

    return run_child(local_trainer_command(args.config, args.nproc_per_node or local_processes())).exit_code


# --- evaluate -----------------------------------------------------------------------------


def _add_evaluate(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "evaluate",
        help="retrieval metrics of a model (and its baseline) on an evaluation set",
        description=EVALUATE_DESCRIPTION,
    )
    add_evaluation_arguments(parser)
    parser.set_defaults(func=_evaluate)


EVALUATE_DESCRIPTION = (
    "Encode an evaluation set (queries.jsonl, corpus.jsonl, qrels.jsonl) with each model, retrieve with faiss and "
    "print nDCG, Recall, MRR, MAP and P at every k, averaged over all queries. Settings come from --config (an "
    "EvaluationConfig, as the evaluation pod gets it) or from the flags. Exits 2 when the evaluation set or a model "
    "is unusable."
)


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="an EvaluationConfig file (YAML or JSON)")
    parser.add_argument("--model", default=None, help="fine-tuned model: path, s3:// URI or model id")
    parser.add_argument("--baseline", default=None, help="model to compare with (e.g. the base model)")
    parser.add_argument("--eval-set", default=None, help="directory or s3:// prefix of the evaluation set")
    parser.add_argument("--k", default=None, help="cutoffs, comma-separated (default: 1,10,100)")
    parser.add_argument("--output", default=None, help="write metrics.json here (path or s3:// URI)")
    parser.add_argument(
        "--patch-status",
        type=_namespaced_name,
        default=None,
        metavar="NAMESPACE/NAME",
        help="patch the metrics into this EmbeddingFinetune's status.metrics",
    )
    parser.add_argument(
        "--index",
        choices=["exact", "ivf", "hnsw"],
        default=None,
        help="faiss search: exact (default) or approximate for large corpora",
    )
    parser.add_argument(
        "--modes",
        default=None,
        help="bge-m3 scoring modes besides dense, comma-separated: sparse,colbert,hybrid "
        "(a model without the sparse and ColBERT heads is scored dense only)",
    )
    parser.add_argument(
        "--dimensions",
        default=None,
        help="also score the dense vector cut to these leading dimensions (Matryoshka), comma-separated",
    )
    _add_encoding_arguments(parser)
    _add_storage_arguments(parser)


def evaluation_config(args: argparse.Namespace) -> EvaluationConfig:
    """The EvaluationConfig of the command line: from --config, or from the flags."""
    encoding = _encoding_settings(args)
    flags = {
        "model": args.model,
        "baseline": args.baseline,
        "eval_set": args.eval_set,
        "k_values": _cutoffs(args.k) if args.k is not None else None,
        "modes": args.modes.split(",") if args.modes else None,
        "dimensions": _cutoffs(args.dimensions, "--dimensions", "256,64") if args.dimensions else None,
        "encoding": encoding if encoding.model_dump(exclude_none=True) else None,
        "index": args.index,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "output": args.output,
        "storage": _storage_access(args),
        "run": RunIdentity(namespace=args.patch_status[0], name=args.patch_status[1], report_status=True)
        if args.patch_status
        else None,
    }
    given = {name: value for name, value in flags.items() if value is not None}
    if args.config is not None:
        if given:
            raise InputError(f"--config {args.config}: put every setting in the file (also given: {_flags(given)})")
        return load_config(args.config, EvaluationConfig)
    missing = [flag for flag, name in (("--model", "model"), ("--eval-set", "eval_set")) if name not in given]
    if missing:
        raise InputError(f"evaluate: {' and '.join(missing)} (or --config) required")
    try:
        return EvaluationConfig(**given)
    except ValidationError as exc:
        raise InputError("invalid evaluate flags", problems_from_validation_error(exc, "evaluate")) from exc


def _flags(settings: dict[str, Any]) -> str:
    return ", ".join("--" + name.replace("_", "-") for name in settings)


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate

    evaluate(evaluation_config(args))
    return EXIT_OK


def evaluate_main(argv: list[str] | None = None) -> int:
    """`python -m embedtune.trainer.evaluate`: the evaluation pod's program."""
    parser = argparse.ArgumentParser(prog="python -m embedtune.trainer.evaluate", description=EVALUATE_DESCRIPTION)
    add_evaluation_arguments(parser)
    return run_command(_evaluate, parser.parse_args(argv))


def _cutoffs(text: str, flag: str = "--k", example: str = "1,10,100") -> list[int]:
    try:
        ks = sorted({int(part) for part in text.split(",")})
    except ValueError:
        ks = []
    if not ks or ks[0] < 1:
        raise InputError(f"{flag} {text}: expected positive integers separated by commas, e.g. {example}")
    return ks


def _namespaced_name(text: str) -> tuple[str, str]:
    namespace, _, name = text.partition("/")
    if not namespace or not name or "/" in name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAMESPACE/NAME")
    return namespace, name


# --- mine ---------------------------------------------------------------------------------


def _add_mine(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "mine",
        help="add hard negatives to training data, retrieved with a model",
        description="For every record, retrieve passages with the model (faiss, exact) and add COUNT negatives "
        "sampled (seeded) from the ranks FIRST+1..LAST, never a positive of the query, the query itself or a "
        "negative it already has. Writes FlagEmbedding JSONL; exits 2 on invalid input.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="FlagEmbedding JSONL file/directory (or s3:// URI)")
    parser.add_argument("--model", required=True, help="model: path, s3:// URI or model id")
    parser.add_argument("--output", required=True, type=Path, help="JSONL file to write")
    parser.add_argument("--range", default="10-100", help="FIRST-LAST ranks to sample from (default: 10-100)")
    parser.add_argument("--count", type=int, default=7, help="negatives to add per record (default: 7)")
    parser.add_argument(
        "--max-score-ratio",
        type=float,
        default=None,
        help="false-negative guard: skip candidates scoring above this fraction of the positive's",
    )
    parser.add_argument(
        "--candidates",
        default=None,
        help='JSONL of {"text": ...} passages to mine from (default: every passage of the inputs)',
    )
    parser.add_argument("--seed", type=int, default=42)
    _add_encoding_arguments(parser)
    _add_storage_arguments(parser)
    parser.set_defaults(func=_mine)


def _mine(args: argparse.Namespace) -> int:
    import tempfile

    from .config import HardNegativesSpec
    from .data import load_jsonl, write_jsonl
    from .encoding import load_encoder
    from .mining import load_candidates, mine_hard_negatives
    from .storage import fetch_to_local

    access = _storage_access(args) or StorageAccess()
    try:
        spec = HardNegativesSpec(mine=True, range=args.range, count=args.count, max_score_ratio=args.max_score_ratio)
    except ValidationError as exc:
        raise InputError(
            "invalid mining flags",
            [
                f"--{re.sub(r'(?<!^)(?=[A-Z])', '-', str(item['loc'][0])).lower()}: "
                f"{item['msg'].removeprefix('Value error, ')}"
                for item in exc.errors()
            ],
        ) from exc
    with tempfile.TemporaryDirectory(prefix="embedtune-mine-") as work:
        loaded = load_jsonl([fetch_to_local(uri, Path(work) / "data", access) for uri in args.inputs])
        if loaded.problems:
            raise InputError(
                f"training data has {len(loaded.problems)} problems; fix them and start again", loaded.problems
            )
        candidates = (
            load_candidates(fetch_to_local(args.candidates, Path(work) / "pool", access)) if args.candidates else None
        )
        model = load_encoder(
            fetch_to_local(args.model, Path(work) / "model", access),
            _encoding_settings(args).model_dump(exclude_none=True),
            precision=args.precision or "auto",
        )
        summary = mine_hard_negatives(
            loaded.records, model, spec, seed=args.seed, candidates=candidates, batch_size=args.batch_size or 64
        )
    write_jsonl(args.output, (record.to_json() for record in loaded.records))
    print(
        f"mined {summary.mined} negatives for {summary.records} records ({summary.short} got fewer than "
        f"{args.count}; the guard skipped {summary.guarded} candidates) -> {args.output}",
        file=sys.stderr,
    )
    return EXIT_OK


# --- flags shared by evaluate and mine ----------------------------------------------------


def _add_encoding_arguments(parser: argparse.ArgumentParser) -> None:
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
    group.add_argument("--query-max-length", type=positive_int, default=None, help="query length limit in tokens")
    group.add_argument("--passage-max-length", type=positive_int, default=None, help="passage length limit in tokens")
    group.add_argument("--batch-size", type=positive_int, default=None, help="texts per forward pass (default: 64)")
    group.add_argument(
        "--precision",
        choices=["auto", "fp32", "fp16", "bf16"],
        default=None,
        help="auto (default): bf16 (or fp16) on a GPU, fp32 on CPU",
    )


def _encoding_settings(args: argparse.Namespace) -> EncodingSettings:
    """The encoding flags given on the command line (the rest stay the model's own)."""
    return EncodingSettings(
        pooling=args.pooling,
        normalize=args.normalize,
        query_instruction=args.query_instruction,
        passage_instruction=args.passage_instruction,
        query_max_length=args.query_max_length,
        passage_max_length=args.passage_max_length,
    )


def _add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-endpoint", default=None, help="S3 endpoint URL (MinIO, Ceph ...)")
    parser.add_argument("--storage-region", default=None, help="S3 region")
    parser.add_argument(
        "--storage-retry-seconds",
        type=int,
        default=None,
        help=f"how long to retry while S3 is unreachable, then exit 75 (default: {DEFAULT_STORAGE_RETRY_SECONDS})",
    )


def _storage_access(args: argparse.Namespace) -> StorageAccess | None:
    """The storage flags given, or None when none is (the defaults then apply)."""
    given = {
        "endpoint": args.storage_endpoint,
        "region": args.storage_region,
        "retry_seconds": args.storage_retry_seconds,
    }
    given = {name: value for name, value in given.items() if value is not None}
    try:
        return StorageAccess(**given) if given else None
    except ValidationError as exc:
        raise InputError("invalid storage flags", problems_from_validation_error(exc, "storage")) from exc
