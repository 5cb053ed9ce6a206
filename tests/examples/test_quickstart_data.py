"""The quickstart's shipped WordNet dataset: valid for the project's own loaders, no held-out
query or positive trained on, and exactly what its build script makes from WordNet."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from embedtune.operator.cli import main as cli
from embedtune.trainer.evalset import load_eval_set

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart"
DATA_NOUN = Path("/usr/share/wordnet/data.noun")
SHIPPED = ("train.jsonl", "eval/queries.jsonl", "eval/corpus.jsonl", "eval/qrels.jsonl")
needs_wordnet = pytest.mark.skipif(not DATA_NOUN.exists(), reason="WordNet 3.0 (Debian wordnet-base) not installed")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def load_builder():
    spec = importlib.util.spec_from_file_location("quickstart_build_dataset", QUICKSTART / "build_dataset.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory):
    return load_eval_set(str(QUICKSTART / "eval"), tmp_path_factory.mktemp("eval"))


def test_training_data_passes_check_data_without_a_warning(capsys):
    assert cli(["check-data", str(QUICKSTART / "train.jsonl"), "--group-size", "8"]) == 0
    assert capsys.readouterr().err.splitlines() == [f"ok: {len(read_jsonl(QUICKSTART / 'train.jsonl'))} records"]


def test_eval_set_loads_and_is_sized_for_a_stable_metric(eval_set):
    assert len(eval_set.queries) >= 1000
    assert len(eval_set.corpus) >= 20000
    assert len({passage["text"] for passage in eval_set.corpus}) == len(eval_set.corpus)  # deduplicated


def test_no_held_out_query_or_positive_is_trained_on(eval_set):
    train = read_jsonl(QUICKSTART / "train.jsonl")
    held_out_queries = {query["text"] for query in eval_set.queries}
    text_of = {passage["id"]: passage["text"] for passage in eval_set.corpus}
    held_out_positives = {text_of[row["docid"]] for row in eval_set.qrels if row["relevance"] > 0}
    assert not held_out_queries & {record["query"] for record in train}
    assert not held_out_positives & {text for record in train for text in record["pos"]}


@needs_wordnet
def test_training_and_held_out_synsets_are_disjoint(eval_set):
    synsets_of: dict[str, set[str]] = {}
    for synset in load_builder().parse_data_noun(DATA_NOUN):
        synsets_of.setdefault(synset.definition, set()).add(synset.offset)
    trained = set().union(*(synsets_of[record["query"]] for record in read_jsonl(QUICKSTART / "train.jsonl")))
    held_out = set().union(*(synsets_of[query["text"]] for query in eval_set.queries))
    assert trained and held_out and not trained & held_out


@needs_wordnet
def test_each_query_judges_the_lemma_lists_of_all_its_synsets_relevant(eval_set):
    by_definition: dict[str, set[str]] = {}
    for synset in load_builder().parse_data_noun(DATA_NOUN):
        by_definition.setdefault(synset.definition, set()).add(synset.lemmas)
    doc_of = {passage["text"]: passage["id"] for passage in eval_set.corpus}
    judged = {(row["qid"], row["docid"]) for row in eval_set.qrels if row["relevance"] > 0}
    expected = {(query["id"], doc_of[text]) for query in eval_set.queries for text in by_definition[query["text"]]}
    assert judged == expected
    assert len(judged) > len(eval_set.queries)  # synsets sharing a definition: one query, several passages


@needs_wordnet
def test_build_script_reproduces_the_shipped_files(tmp_path):
    load_builder().main(["--out", str(tmp_path)])
    for name in SHIPPED:
        assert (tmp_path / name).read_bytes() == (QUICKSTART / name).read_bytes(), name
