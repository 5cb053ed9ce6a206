"""The kind end-to-end suite needs Docker, kind, kubectl and helm; without them its cluster
tests are skipped, with the missing tools named, so the default `pytest` run (and CI) never
depends on them. The suite's static checks run everywhere."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

E2E = Path(__file__).resolve().parent
TOOLS = ("docker", "kind", "kubectl", "helm")


def missing_tools() -> list[str]:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if "docker" not in missing and subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        missing.append("a running Docker engine")
    return missing


def pytest_collection_modifyitems(config, items):
    # the tests that need a cluster: those using the kind cluster's kubeconfig
    ours = [item for item in items if E2E in item.path.parents and "kubeconfig" in item.fixturenames]
    if not ours:
        return
    missing = missing_tools()
    if missing:
        skip = pytest.mark.skip(
            reason=f"kind e2e suite: {', '.join(missing)} not found; run tests/e2e/run.sh where Docker and kind exist"
        )
        for item in ours:
            item.add_marker(skip)
