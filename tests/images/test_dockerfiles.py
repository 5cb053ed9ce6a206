"""What can be checked of the two images without a Docker engine: pinned bases, the installed
extras and their versions, the entry points, a non-root user."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from embedtune.operator.render import Run, build_evaluation_job, build_training_job, plan_evaluation, plan_training
from embedtune.operator.spec import parse_finetune
from support.chart import ROOT, objects_of, render_chart
from support.finetunes import minimal_manifest

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DOCKERFILES = {"operator": ROOT / "operator" / "Dockerfile", "trainer": ROOT / "trainer" / "Dockerfile"}
PINNED_BASE = re.compile(r"^(?P<name>[\w./-]+):(?P<version>\d+\.\d+\.\d+)[\w.-]*@sha256:[0-9a-f]{64}$")


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def arguments(dockerfile: Path, instruction: str) -> list[str]:
    return [args for name, args in instructions(dockerfile) if name == instruction]


def build_args(dockerfile: Path) -> dict[str, str]:
    return dict(arg.split("=", 1) for arg in arguments(dockerfile, "ARG") if "=" in arg)


def pip_installs(dockerfile: Path) -> list[str]:
    """The requirements of every `pip install`, build arguments substituted."""
    requirements = []
    for run in arguments(dockerfile, "RUN"):
        for arg_name, value in build_args(dockerfile).items():
            run = run.replace("${" + arg_name + "}", value)
        for command in run.split("&&"):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"]:
                requirements += [word for word in words[2:] if not word.startswith("-")]
            else:
                assert "pip" not in words, f"{dockerfile}: pip other than `pip install ...` at a command's start"
    return requirements


def extra(name: str) -> list[Requirement]:
    return [Requirement(text) for text in PYPROJECT["project"]["optional-dependencies"][name]]


@pytest.mark.parametrize("image", DOCKERFILES)
def test_base_image_is_pinned_by_version_and_digest(image):
    bases = arguments(DOCKERFILES[image], "FROM")
    assert bases
    for base in bases:
        match = PINNED_BASE.match(base.split()[0])
        assert match, f"{image}: base image {base!r} needs a full version tag and a digest"
        if match["name"] == "python":
            assert match["version"] in SpecifierSet(PYPROJECT["project"]["requires-python"])


@pytest.mark.parametrize("image", DOCKERFILES)
def test_image_installs_only_its_own_extra_of_this_package(image):
    assert pip_installs(DOCKERFILES[image])[-1] == f".[{image}]"
    copied = [shlex.split(args)[0] for args in arguments(DOCKERFILES[image], "COPY")]
    assert all((ROOT / source).exists() for source in copied), copied


def test_operator_extra_has_no_torch_and_trainer_extra_no_kopf():
    assert "torch" not in {requirement.name for requirement in extra("operator")}
    assert "kopf" not in {requirement.name for requirement in extra("trainer")}


def import_names(distributions: set[str]) -> set[str]:
    """The top-level modules of these installed distributions."""
    from importlib.metadata import packages_distributions

    canonical = {name.lower().replace("_", "-") for name in distributions}
    return {
        module
        for module, owners in packages_distributions().items()
        if any(owner.lower().replace("_", "-") in canonical for owner in owners)
    }


# What each image runs: the operator process; the job pods' torchrun launcher, trainer and
# `embedtune evaluate` (through the CLI).
IMAGE_MODULES = {
    "operator": ["embedtune.operator.main", "embedtune.operator.handlers", "embedtune.operator.cli"],
    "trainer": [
        "embedtune.trainer.launch",
        "embedtune.trainer.train",
        "embedtune.trainer.evaluate",
        "embedtune.operator.cli",
    ],
}


@pytest.mark.parametrize("image", IMAGE_MODULES)
def test_image_modules_import_without_the_other_images_packages(image):
    import subprocess
    import sys

    other = "trainer" if image == "operator" else "operator"
    own = {requirement.name for requirement in extra(image)} | {
        Requirement(text).name for text in PYPROJECT["project"]["dependencies"]
    }
    absent = sorted(import_names({requirement.name for requirement in extra(other)} - own))
    assert absent, f"no package of [{other}] is installed here to leave out"
    program = "; ".join(
        [
            "import importlib, sys",
            *(f"sys.modules[{module!r}] = None" for module in absent),  # `import x` now fails
            *(f"importlib.import_module({module!r})" for module in IMAGE_MODULES[image]),
        ]
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"[{image}] needs one of {absent}:\n{result.stderr[-2000:]}"


def test_trainer_torch_is_the_pin_of_ci_and_satisfies_pyproject():
    (torch_pin,) = [Requirement(req) for req in pip_installs(DOCKERFILES["trainer"]) if req.startswith("torch")]
    ci_pin = re.search(r"torch==([\w.+]+)", (ROOT / ".ci" / "run").read_text())[1]
    assert str(torch_pin.specifier) == f"=={ci_pin}"
    (declared,) = [requirement for requirement in extra("trainer") if requirement.name == "torch"]
    assert declared.specifier.contains(ci_pin)
    # every other package the image installs besides the extra is pinned exactly
    for requirement in pip_installs(DOCKERFILES["trainer"])[:-1]:
        assert str(Requirement(requirement).specifier).startswith("=="), requirement


@pytest.mark.parametrize("image", DOCKERFILES)
def test_entrypoint_is_a_console_script_of_the_package(image):
    (entrypoint,) = arguments(DOCKERFILES[image], "ENTRYPOINT")
    command = json.loads(entrypoint)  # the exec form: a JSON list
    assert command[0] in PYPROJECT["project"]["scripts"]


def test_the_modules_the_jobs_run_exist_in_the_trainer_package():
    spec, run = parse_finetune(minimal_manifest()), Run("ml", "tiny", "1")
    commands = [
        build_training_job(spec, plan_training(spec, run, 1))["spec"]["template"]["spec"]["containers"][0]["command"],
        build_evaluation_job(spec, plan_evaluation(spec, run, 1))["spec"]["template"]["spec"]["containers"][0][
            "command"
        ],
    ]
    modules = [command[index + 1] for command in commands for index, word in enumerate(command) if word == "-m"]
    assert modules
    for module in modules:
        path = ROOT / module.removeprefix("embedtune.").replace(".", "/")
        assert path.with_suffix(".py").exists() or (path / "__main__.py").exists(), module
    scripts = [command[0] for command in commands if command[0] != "python"]
    assert all(script in PYPROJECT["project"]["scripts"] for script in scripts)


@pytest.mark.parametrize("image", DOCKERFILES)
def test_image_runs_as_the_non_root_uid_the_pods_ask_for(image):
    user = arguments(DOCKERFILES[image], "USER")[-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric uid, so Kubernetes can verify runAsNonRoot"
    if image == "trainer":
        spec = parse_finetune(minimal_manifest())
        job = build_training_job(spec, plan_training(spec, Run("ml", "tiny", "1"), 1))
        pod_security = job["spec"]["template"]["spec"]["securityContext"]
    else:
        pod_security = objects_of(render_chart(), "Deployment")[0]["spec"]["template"]["spec"]["securityContext"]
    assert pod_security["runAsUser"] == int(uid) and pod_security["runAsNonRoot"]
