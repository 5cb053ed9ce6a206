"""The `embedtune` command: the operator's commands (validate, render, run, operator) and the
trainer image's (check-data, train, evaluate, mine: trainer/commands.py), under one name.

Each command imports what it needs when it runs, so the operator image (no torch) and the
trainer image (no kopf) can both carry this one entry point.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

from embedtune.trainer import commands as trainer_commands
from embedtune.trainer.contract import DNS_LABEL, DNS_LABEL_MAX_LENGTH
from embedtune.trainer.errors import EXIT_INPUT_ERROR, EXIT_OK, InputError

from .manifests import read_manifests


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedtune", description="Fine-tune text-embedding models for retrieval.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    trainer_commands.register(commands)
    for add_command in (_add_validate, _add_render, _add_run, _add_operator):
        add_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return trainer_commands.run_command(args.func, args)


# --- validate -----------------------------------------------------------------------------


def _add_validate(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "validate",
        help="check EmbeddingFinetune manifests and estimate their memory per GPU; exit 2 on any problem",
        description="Check every EmbeddingFinetune in FILE as the operator would, including the rules "
        "the CRD schema cannot express, and print each one's estimated memory per GPU by part. Prints "
        "`field.path: reason` per problem (a spec that cannot fit its GPUs is one) and exits 2 if any.",
    )
    parser.add_argument("file", type=Path, help="YAML file with one or more manifests")
    parser.set_defaults(func=_validate)


def _validate(args: argparse.Namespace) -> int:
    from .memory import plan_memory
    from .spec import parse_finetune

    failed = False
    manifests = read_manifests(args.file)
    if not manifests:
        raise InputError(f"{args.file}: no manifest in the file")
    for manifest in manifests:
        try:
            spec = parse_finetune(manifest)
        except InputError as exc:
            failed = True
            print(exc.report(), file=sys.stderr)
            continue
        memory = plan_memory(spec)
        print(f"{manifest['metadata']['name']}: {memory.describe(spec.model.base)}")
        if (problem := memory.problem()) is not None:
            failed = True
            print(f"invalid EmbeddingFinetune {manifest['metadata']['name']}\n{problem}", file=sys.stderr)
    if failed:
        return EXIT_INPUT_ERROR
    print(f"ok: {len(manifests)} valid manifest(s)", file=sys.stderr)
    return EXIT_OK


# --- render -------------------------------------------------------------------------------


def _add_render(commands: argparse._SubParsersAction) -> None:
    from .defaults import add_default_arguments

    parser = commands.add_parser(
        "render",
        help="print, as YAML, every object the operator would create",
        description="Print the ServiceAccount, Role, RoleBinding, headless Service, ConfigMap (the pods' configs), "
        "training Job and evaluation Job of each EmbeddingFinetune in FILE (first run, first attempt).",
    )
    parser.add_argument("file", type=Path, help="YAML file with one or more manifests")
    parser.add_argument(
        "--namespace", type=_dns_label, default="default", help="for manifests without one (default: default)"
    )
    add_default_arguments(parser)
    parser.set_defaults(func=_render)


def _render(args: argparse.Namespace) -> int:
    from .defaults import ClusterDefaults
    from .render import Run, build_evaluation_job, build_run_objects, plan_evaluation, plan_training, run_id_of
    from .spec import parse_finetune

    objects = []
    defaults = ClusterDefaults.from_args(args)
    for manifest in read_manifests(args.file):
        spec = parse_finetune(manifest)
        metadata = manifest["metadata"]
        fingerprint = spec.run_fingerprint()
        run_id = run_id_of(metadata.get("generation", 1), metadata.get("uid", ""), fingerprint)
        run = Run(metadata.get("namespace") or args.namespace, metadata["name"], run_id, fingerprint)
        spec = defaults.apply(spec)
        objects += build_run_objects(spec, plan_training(spec, run, 1, spec.run_policy.active_deadline_seconds))
        if spec.evaluation.enabled:
            objects.append(build_evaluation_job(spec, plan_evaluation(spec, run, 1)))
    print(yaml.dump_all(objects, Dumper=_BlockStringDumper, sort_keys=False), end="")
    return EXIT_OK


class _BlockStringDumper(yaml.SafeDumper):
    """Multi-line strings (the pods' configs in their ConfigMap) as readable `|` blocks."""


def _represent_str(dumper, value: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_BlockStringDumper.add_representer(str, _represent_str)


def _dns_label(text: str) -> str:
    if not re.fullmatch(DNS_LABEL, text) or len(text) > DNS_LABEL_MAX_LENGTH:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a DNS label (lowercase letters, digits, '-')")
    return text


# --- run ----------------------------------------------------------------------------------


def _add_run(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "run",
        help="run an EmbeddingFinetune on this machine: data, training, evaluation",
        description="Validate the manifest and its data, train (all local GPUs, or CPU), evaluate base vs "
        "fine-tuned and print the metrics and the final status, with the operator's own planner. Relative "
        "paths in the manifest are relative to its folder. Ctrl-C (or SIGTERM) stores a checkpoint; the same "
        "command resumes. Exit codes: 0 succeeded; 2 invalid manifest, data, model, bucket or credentials, or "
        "training diverged; 130/143 stopped (Ctrl-C/SIGTERM); 75 storage unreachable for "
        "spec.storage.retrySeconds (the same command continues); 3 another run of the resource is in progress; "
        "1 failed.",
    )
    parser.add_argument("file", type=Path, help="YAML file with one EmbeddingFinetune manifest")
    parser.add_argument(
        "--storage",
        default="embedtune-runs",
        help="storage when the manifest names none: a folder or s3:// URI (default: ./embedtune-runs)",
    )
    parser.add_argument(
        "--nproc-per-node",
        type=trainer_commands.positive_int,
        default=None,
        help="trainer processes (default: one per GPU, or 1 on CPU)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="scratch folder for data and checkpoints before upload (default: a temporary one)",
    )
    parser.add_argument(
        "--new-run",
        action="store_true",
        help="start a new run even if this spec has run before (e.g. after changing the data files)",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from .local import LocalOptions, run_finetune

    manifests = read_manifests(args.file)
    if len(manifests) != 1:
        raise InputError(f"{args.file}: expected one EmbeddingFinetune manifest, found {len(manifests)}")
    options = LocalOptions(
        default_storage=str(Path(args.storage).resolve()) if "://" not in args.storage else args.storage,
        nproc_per_node=args.nproc_per_node,
        work_dir=args.work_dir,
        new_run=args.new_run,
    )
    return run_finetune(manifests[0], args.file.resolve().parent, options)


# --- operator -----------------------------------------------------------------------------


def _add_operator(commands: argparse._SubParsersAction) -> None:
    from .main import add_arguments, run_operator

    parser = commands.add_parser(
        "operator",
        help="run the Kubernetes operator",
        description="Reconcile EmbeddingFinetune resources into training and evaluation Jobs (kopf).",
    )
    add_arguments(parser)
    parser.set_defaults(func=run_operator)


if __name__ == "__main__":
    sys.exit(main())
