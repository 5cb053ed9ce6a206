"""examples/quickstart.yaml: a valid EmbeddingFinetune for `embedtune run` on one machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from embedtune.operator.local import localize
from embedtune.operator.spec import parse_finetune
from embedtune.trainer.errors import InputError
from embedtune.trainer.storage import fetch_to_local

MANIFEST = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"


def local_manifest() -> dict:
    return localize(yaml.safe_load(MANIFEST.read_text()), MANIFEST.parent, "/tmp/unused")


def test_quickstart_manifest_is_valid_on_one_machine_and_not_on_a_cluster():
    spec = parse_finetune(local_manifest(), on_cluster=False)
    assert spec.training.precision == "fp32"  # anything else is overridden on a CPU, with a warning
    assert spec.evaluation.gate is not None  # CI runs the quickstart: no gain, no pass
    with pytest.raises(InputError, match="s3://"):
        parse_finetune(local_manifest())


def test_quickstart_manifest_points_at_files_that_exist():
    spec = parse_finetune(local_manifest(), on_cluster=False)
    for path in [*spec.data.train, spec.data.eval]:
        assert Path(path).exists(), path
    assert (fetch_to_local(spec.model.base, Path("unused")) / "modules.json").is_file()
