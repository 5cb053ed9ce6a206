"""Build the quickstart dataset, a WordNet 3.0 reverse dictionary, from Debian's `wordnet-base`.

A query is a noun synset's definition ("a member of the genus Canis ... that has been
domesticated by man since prehistoric times"), its relevant passage the synset's lemma list
("dog, domestic dog, Canis familiaris"). The output is deterministic: the same data.noun
gives byte-identical files.

    python examples/quickstart/build_dataset.py [--wordnet /usr/share/wordnet] [--out examples/quickstart]

writes:
    train.jsonl             FlagEmbedding training pairs {query, pos: [lemma list]}
    eval/queries.jsonl      held-out definitions {id, text}
    eval/corpus.jsonl       lemma lists {id, text}: every held-out positive plus seeded distractors
    eval/qrels.jsonl        {qid, docid, relevance: 1}

Choices (README.md says them for users):
- The definition stops where WordNet's quoted usage examples begin (`; "..."` or `: "..."`):
  an example nearly always contains the lemma itself ("the dog barked all night"), which would
  turn a reverse dictionary into string matching.
- Synsets with the same definition are one query; synsets with the same lemma list are one
  passage (corpus texts are unique), relevant to every query whose synset has that list.
- Held-out queries are drawn first (seeded); a training pair is dropped when its definition or
  its lemma list belongs to a held-out query, so neither a held-out query nor a held-out
  positive is ever trained on.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

SEED = 20061  # WordNet 3.0 was released in December 2006
EVAL_QUERIES = 1000
CORPUS_SIZE = 30000
TRAIN_PAIRS = 12000
# Where a gloss's quoted usage examples begin: `; "` or `: "` (WordNet's own convention).
EXAMPLES_START = re.compile(r'[;:]\s*"')


@dataclass(frozen=True)
class Synset:
    offset: str
    lemmas: str  # "dog, domestic dog, Canis familiaris"
    definition: str


def parse_data_noun(path: Path) -> list[Synset]:
    """Every noun synset with a non-empty definition, in file order.

    A data line is `offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] p_cnt
    [pointers ...] | gloss`, w_cnt in hexadecimal; the license header lines start with two
    spaces."""
    synsets = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            word_count = int(fields[3], 16)
            words = fields[4 : 4 + 2 * word_count : 2]
            definition = EXAMPLES_START.split(gloss, maxsplit=1)[0].strip().rstrip(";:").strip()
            if definition:
                synsets.append(Synset(fields[0], ", ".join(w.replace("_", " ") for w in words), definition))
    return synsets


@dataclass(frozen=True)
class Dataset:
    train: list[dict]
    queries: list[dict]
    corpus: list[dict]
    qrels: list[dict]


@dataclass(frozen=True)
class Split:
    relevant: dict[str, list[str]]  # definition -> the lemma lists of its synsets
    held_out: list[str]  # held-out definitions, in evaluation order
    training_side: list[str]  # seeded order; none shares a definition or a lemma list with a held-out one
    texts: list[str]  # every distinct lemma list, sorted


def split(synsets: list[Synset], *, eval_queries: int = EVAL_QUERIES, seed: int = SEED) -> Split:
    # one query per distinct definition, its relevant passages the lemma lists of its synsets
    relevant: dict[str, list[str]] = {}
    for synset in synsets:
        texts = relevant.setdefault(synset.definition, [])
        if synset.lemmas not in texts:
            texts.append(synset.lemmas)
    definitions = list(relevant)
    random.Random(seed).shuffle(definitions)
    held_out = definitions[:eval_queries]
    held_out_texts = {text for definition in held_out for text in relevant[definition]}
    training_side = [
        definition for definition in definitions[eval_queries:] if not set(relevant[definition]) & held_out_texts
    ]
    return Split(relevant, held_out, training_side, sorted({synset.lemmas for synset in synsets}))


def retrieval_set(
    queries: list[str], relevant: dict[str, list[str]], distractors: list[str], corpus_size: int, rng: random.Random
) -> tuple[list[dict], list[dict], list[dict]]:
    """(queries, corpus, qrels): every positive of `queries`, filled up to `corpus_size` with a
    seeded sample of the other `distractors`, in seeded order."""
    positives = {text for query in queries for text in relevant[query]}
    others = [text for text in distractors if text not in positives]
    rng.shuffle(others)
    corpus_texts = sorted(positives) + others[: max(0, corpus_size - len(positives))]
    rng.shuffle(corpus_texts)
    doc_ids = {text: f"d{i}" for i, text in enumerate(corpus_texts)}
    query_rows = [{"id": f"q{i}", "text": query} for i, query in enumerate(queries)]
    qrels = [
        {"qid": row["id"], "docid": doc_ids[text], "relevance": 1}
        for row in query_rows
        for text in relevant[row["text"]]
    ]
    return query_rows, [{"id": doc_ids[text], "text": text} for text in corpus_texts], qrels


def build(
    synsets: list[Synset],
    *,
    eval_queries: int = EVAL_QUERIES,
    corpus_size: int = CORPUS_SIZE,
    train_pairs: int = TRAIN_PAIRS,
    seed: int = SEED,
) -> Dataset:
    parts = split(synsets, eval_queries=eval_queries, seed=seed)
    train = [
        {"query": definition, "pos": parts.relevant[definition]} for definition in parts.training_side[:train_pairs]
    ]
    # the distractors may be training positives: retrieval must still rank the right one first
    queries, corpus, qrels = retrieval_set(
        parts.held_out, parts.relevant, parts.texts, corpus_size, random.Random(seed)
    )
    return Dataset(train, queries, corpus, qrels)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write(dataset: Dataset, out: Path) -> None:
    write_jsonl(out / "train.jsonl", dataset.train)
    write_jsonl(out / "eval" / "queries.jsonl", dataset.queries)
    write_jsonl(out / "eval" / "corpus.jsonl", dataset.corpus)
    write_jsonl(out / "eval" / "qrels.jsonl", dataset.qrels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--wordnet",
        type=Path,
        default=Path("/usr/share/wordnet"),
        help="WordNet 3.0 dict directory holding data.noun (default: /usr/share/wordnet)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="output directory (default: this script's directory)",
    )
    args = parser.parse_args(argv)
    synsets = parse_data_noun(args.wordnet / "data.noun")
    dataset = build(synsets)
    write(dataset, args.out)
    print(
        f"{len(synsets)} noun synsets -> {len(dataset.train)} training pairs, {len(dataset.queries)} held-out "
        f"queries, {len(dataset.corpus)} corpus passages, {len(dataset.qrels)} judgments in {args.out}"
    )


if __name__ == "__main__":
    main()
