"""The commands the README and docs show, run here the way a reader would type them: `helm
install` rendered and linted with the same flags, `kubectl apply -f` files parsed, `embedtune`
commands run."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml

from embedtune.operator.cli import main
from support.chart import CHART, ROOT, render_chart, values_from_set

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shell_commands() -> list[tuple[str, list[str]]]:
    """(file, words) of every command in the documents' ```bash blocks, continuations joined."""
    commands = []
    for document in DOCUMENTS:
        for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", document.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #", 1)[0].strip()
                if line and not line.startswith("#"):
                    commands.append((document.name, shlex.split(line)))
    return commands


COMMANDS = shell_commands()
HELM_INSTALLS = [words for _, words in COMMANDS if words[:2] in (["helm", "install"], ["helm", "upgrade"])]
APPLIED_FILES = sorted(
    {
        words[words.index(flag) + 1]
        for _, words in COMMANDS
        if words[0] == "kubectl"
        for flag in ("-f", "--patch-file")
        if flag in words
    }
)
EMBEDTUNE = [
    words[1:] for _, words in COMMANDS if words[0] == "embedtune" and words[1] in ("validate", "render", "check-data")
]


def test_the_documents_show_the_commands_checked_here():
    assert HELM_INSTALLS and APPLIED_FILES and EMBEDTUNE


@pytest.mark.parametrize("words", HELM_INSTALLS, ids=" ".join)
def test_documented_helm_install_renders_and_lints(words):
    import helm_python

    assert (ROOT / words[3]).resolve() == CHART
    values = values_from_set([words[index + 1] for index, word in enumerate(words) if word == "--set"])
    assert render_chart(values)
    report = helm_python.lint(CHART, values, strict=True)
    assert not report["errors"] and all(message["severity"] < 2 for message in report["messages"]), report


@pytest.mark.parametrize("path", APPLIED_FILES)
def test_documented_kubectl_files_exist_and_parse(path):
    files = sorted((ROOT / path).glob("*.yaml")) if (ROOT / path).is_dir() else [ROOT / path]
    documents = [doc for file in files for doc in yaml.safe_load_all(file.read_text()) if doc]
    assert documents and all({"apiVersion", "kind", "metadata"} <= doc.keys() for doc in documents)


@pytest.mark.parametrize("arguments", EMBEDTUNE, ids=" ".join)
def test_documented_embedtune_commands_succeed(arguments, capsys):
    assert main(arguments) == 0, capsys.readouterr().err
