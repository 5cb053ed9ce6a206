"""The Helm chart rendered as `helm template` would, through Helm's Go SDK (PyPI
helm-python-sdk; no helm binary)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "embedtune"
RELEASE = "embedtune"
RELEASE_NAMESPACE = "embedtune-system"


def values_from_set(expressions: list[str]) -> dict[str, Any]:
    """The values helm makes of `--set` expressions, parsed by Helm's own parser."""
    import helm_python

    return helm_python.parse_set_string(",".join(expressions)) if expressions else {}


def render_chart(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every object of the chart's templates (not its crds/), as `helm install` would create them."""
    import helm_python

    chart = helm_python.Chart.load(CHART)
    rendered = chart.render(values or {}, name=RELEASE, namespace=RELEASE_NAMESPACE, is_install=True)
    return [
        obj
        for template, text in rendered.items()
        if not template.endswith("NOTES.txt")
        for obj in yaml.safe_load_all(text)
        if obj
    ]


def objects_of(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]
