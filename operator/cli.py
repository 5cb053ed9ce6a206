"""The `embedtune` command.

Each subcommand imports what it needs when it runs, so the operator image (no torch) and
the trainer image (no kopf) can both carry this one entry point.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

EXIT_OK = 0
EXIT_INPUT_ERROR = 2


def _check_data(args: argparse.Namespace) -> int:
    from embedtune.trainer.config import HuggingFaceSource
    from embedtune.trainer.data import LoadResult, fill_negatives, load_hugging_face, load_jsonl
    from embedtune.trainer.errors import InputError

    columns = {}
    for item in args.column:
        field, _, column = item.partition("=")
        if field not in ("query", "pos", "neg", "prompt") or not column:
            print(f"--column {item}: expected FIELD=COLUMN with FIELD one of query, pos, neg, prompt", file=sys.stderr)
            return EXIT_INPUT_ERROR
        columns[field] = column
    total = LoadResult([], [])
    try:
        for path in args.paths:
            if _is_hf_dataset(Path(path)) or columns:
                found = load_hugging_face(HuggingFaceSource(path=path, split=args.split, columns=columns))
            else:
                found = load_jsonl([Path(path)])
            total.records.extend(found.records)
            total.problems.extend(found.problems)
        if not total.problems and args.group_size:
            fill_negatives(total.records, args.group_size, seed=0)
    except InputError as exc:
        print(exc.report(), file=sys.stderr)
        return EXIT_INPUT_ERROR
    for problem in total.problems:
        print(problem)
    if total.problems:
        print(f"{len(total.problems)} problems in {len(args.paths)} input(s); fix them before training",
              file=sys.stderr)
        return EXIT_INPUT_ERROR
    print(f"ok: {len(total.records)} records", file=sys.stderr)
    return EXIT_OK


def _is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / marker).exists() for marker in ("dataset_dict.json", "state.json"))


def _train(args: argparse.Namespace) -> int:
    from embedtune.trainer import launch

    nproc = args.nproc_per_node or _local_processes()
    return launch.main(["--standalone", f"--nproc-per-node={nproc}", "-m", "embedtune.trainer",
                        "--config", str(args.config)])


def _local_processes() -> int:
    import torch

    return max(1, torch.cuda.device_count())


def _read_manifests(path: Path) -> list:
    import yaml

    from embedtune.trainer.errors import InputError

    try:
        return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML: {exc}") from exc


def _validate(args: argparse.Namespace) -> int:
    from embedtune.operator.spec import parse_finetune
    from embedtune.trainer.errors import InputError

    failed = False
    try:
        manifests = _read_manifests(args.file)
        if not manifests:
            raise InputError(f"{args.file}: no manifest in the file")
    except InputError as exc:
        print(exc.report(), file=sys.stderr)
        return EXIT_INPUT_ERROR
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

    from embedtune.operator.render import Run, build_evaluation_job, build_run_objects
    from embedtune.operator.spec import parse_finetune
    from embedtune.trainer.errors import InputError

    objects = []
    dumper = _block_strings()
    try:
        for manifest in _read_manifests(args.file):
            spec = parse_finetune(manifest)
            metadata = manifest["metadata"]
            run = Run(metadata.get("namespace") or args.namespace, metadata["name"],
                      str(metadata.get("generation", 1)))
            image = spec.resources.image or args.trainer_image
            objects += build_run_objects(spec, run, image, deadline_seconds=spec.run_policy.active_deadline_seconds)
            if spec.evaluation.enabled:
                objects.append(build_evaluation_job(spec, run, image))
    except InputError as exc:
        print(exc.report(), file=sys.stderr)
        return EXIT_INPUT_ERROR
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


def _operator(args: argparse.Namespace) -> int:
    from embedtune.operator.main import run_operator

    return run_operator(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedtune", description="Fine-tune text-embedding models for retrieval.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser(
        "check-data", help="validate training data; one line per problem, exit 2 if any",
        description="Validate FlagEmbedding JSONL files/directories or Hugging Face datasets. "
        "Prints FILE:LINE: field: reason for every problem and exits 2 if there is any.")
    check.add_argument("paths", nargs="+", metavar="PATH", help="JSONL file, directory, or save_to_disk dataset")
    check.add_argument("--column", action="append", default=[], metavar="FIELD=COLUMN",
                       help="Hugging Face column mapping, e.g. --column query=question --column pos=context")
    check.add_argument("--split", default="train", help="Hugging Face split (default: train)")
    check.add_argument("--group-size", type=int, default=None,
                       help="also check there are enough distinct passages to fill groupSize-1 negatives")
    check.set_defaults(func=_check_data)

    train = commands.add_parser(
        "train", help="run the trainer on this machine under torchrun",
        description="Run the trainer on this machine (all local GPUs, or one CPU process) with a trainer config.")
    train.add_argument("config", type=Path, help="trainer config (YAML or JSON)")
    train.add_argument("--nproc-per-node", type=int, default=None, help="processes (default: one per GPU, or 1)")
    train.set_defaults(func=_train)

    from embedtune.operator.constants import DEFAULT_TRAINER_IMAGE

    validate = commands.add_parser(
        "validate", help="check EmbeddingFinetune manifests; every problem listed, exit 2 if any",
        description="Check every EmbeddingFinetune in FILE as the operator would, including the rules "
        "the CRD schema cannot express. Prints `field.path: reason` per problem and exits 2 if any.")
    validate.add_argument("file", type=Path, help="YAML file with one or more manifests")
    validate.set_defaults(func=_validate)

    render = commands.add_parser(
        "render", help="print, as YAML, every object the operator would create",
        description="Print the ServiceAccount, Role, RoleBinding, headless Service, trainer ConfigMap, "
        "training Job and evaluation Job of each EmbeddingFinetune in FILE (first run, first attempt).")
    render.add_argument("file", type=Path, help="YAML file with one or more manifests")
    render.add_argument("--namespace", default="default", help="for manifests without one (default: default)")
    render.add_argument("--trainer-image", default=DEFAULT_TRAINER_IMAGE,
                        help=f"image when spec.resources.image is unset (default: {DEFAULT_TRAINER_IMAGE})")
    render.set_defaults(func=_render)

    from embedtune.operator.main import add_arguments

    operator = commands.add_parser(
        "operator", help="run the Kubernetes operator",
        description="Reconcile EmbeddingFinetune resources into training and evaluation Jobs (kopf).")
    add_arguments(operator)
    operator.set_defaults(func=_operator)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
