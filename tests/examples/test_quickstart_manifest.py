"""examples/quickstart.yaml: a valid EmbeddingFinetune for `embedtune run` on one machine."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

from embedtune.operator.spec import EmbeddingFinetuneSpec

MANIFEST = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"


def test_quickstart_manifest_is_valid_apart_from_the_storage_it_leaves_to_the_local_default():
    manifest = yaml.safe_load(MANIFEST.read_text())
    assert (manifest["apiVersion"], manifest["kind"], manifest["metadata"]["name"]) == (
        "embedtune.io/v1alpha1", "EmbeddingFinetune", "quickstart")
    assert "storage" not in manifest["spec"] and "resources" not in manifest["spec"]
    spec = EmbeddingFinetuneSpec.model_validate(manifest["spec"] | {"storage": {"uri": "/tmp/unused"}})
    assert spec.training.precision == "fp32"  # anything else is overridden on a CPU, with a warning


def test_quickstart_manifest_points_at_files_that_exist():
    spec = yaml.safe_load(MANIFEST.read_text())["spec"]
    for path in [*spec["data"]["train"], spec["data"]["eval"]]:
        assert (MANIFEST.parent / path).exists(), path
    package, _, inside = spec["model"]["base"].removeprefix("package://").partition("/")
    assert (Path(importlib.util.find_spec(package).origin).parent / inside / "modules.json").is_file()
