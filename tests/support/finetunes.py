"""EmbeddingFinetune manifests for the operator tests: the shipped example, and small ones."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# Manifests for `embedtune run` on one machine (local paths, no storage), which a cluster
# rejects; tests/examples checks them.
LOCAL_EXAMPLES = ("quickstart.yaml",)


def example_manifests() -> list[dict[str, Any]]:
    """The examples meant for a cluster."""
    return [
        doc
        for path in sorted(EXAMPLES.glob("*.yaml"))
        if path.name not in LOCAL_EXAMPLES
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def minimal_manifest(name: str = "tiny", namespace: str = "default", **spec_overrides: Any) -> dict[str, Any]:
    """The smallest valid resource; `spec_overrides` replace whole sections."""
    spec = {
        "model": {"base": "BAAI/bge-small-en-v1.5"},
        "data": {"train": ["s3://data/train.jsonl"], "heldOutFraction": 0.1},
        "storage": {"uri": "s3://models/embedtune", "credentialsSecret": "s3-creds"},
        "resources": {"nodes": 2, "gpusPerNode": 4},
    }
    spec.update(copy.deepcopy(spec_overrides))
    return {
        "apiVersion": "embedtune.io/v1alpha1",
        "kind": "EmbeddingFinetune",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
