"""Loading and validating an evaluation set: `queries.jsonl` ({id, text}), `corpus.jsonl`
({id, text, optional title}) and `qrels.jsonl` ({qid, docid, relevance}), the layout the
held-out split writes.

Every problem is reported as `FILE:LINE: field: reason`; an evaluation over a set with a
problem would score something other than what the user asked for, so none is skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import StorageAccess
from .data import EvalSet
from .errors import InputError
from .jsonl import describe, read_json_lines, text_problem
from .storage import fetch_to_local

FILES = ("queries.jsonl", "corpus.jsonl", "qrels.jsonl")


def _rows(path: Path, problems: list[str]) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        problems.append(f"{path}: missing (an evaluation set holds {', '.join(FILES)})")
        return []
    problems_before = len(problems)
    rows = list(read_json_lines(path, problems))
    if not rows and len(problems) == problems_before:
        problems.append(f"{path}: no records")
    return rows


def _texts(path: Path, rows, optional: tuple[str, ...], problems: list[str]) -> dict[str, tuple[int, dict]]:
    """id -> (line, record) for queries or passages; ids must be non-empty and unique."""
    by_id: dict[str, tuple[int, dict]] = {}
    for line_no, obj in rows:
        where = f"{path}:{line_no}"
        found = [
            f"{where}: {name}: {problem}"
            for name in ("id", "text", *optional)
            if (problem := _field_problem(obj, name, optional=name in optional))
        ]
        if found:
            problems += found
            continue
        if obj["id"] in by_id:
            problems.append(f"{where}: id: duplicate {describe(obj['id'])} (first on line {by_id[obj['id']][0]})")
            continue
        by_id[obj["id"]] = (line_no, obj)
    return by_id


def _field_problem(obj: dict[str, Any], name: str, *, optional: bool) -> str | None:
    if name not in obj:
        return None if optional else "missing"
    return text_problem(obj[name], allow_empty=optional)


def load_eval_set(uri: str, download_dir: Path, access: StorageAccess | None = None) -> EvalSet:
    """Read and validate an evaluation set from a directory or storage prefix; InputError
    lists every problem."""
    directory = fetch_to_local(uri, download_dir, access)
    problems: list[str] = []
    queries_file, corpus_file, qrels_file = (directory / name for name in FILES)
    queries = _texts(queries_file, _rows(queries_file, problems), (), problems)
    corpus = _texts(corpus_file, _rows(corpus_file, problems), ("title",), problems)

    qrels: list[dict[str, Any]] = []
    judged_lines: dict[tuple[str, str], int] = {}
    relevant_queries: set[str] = set()
    for line_no, obj in _rows(qrels_file, problems):
        where = f"{qrels_file}:{line_no}"
        qid, docid, relevance = obj.get("qid"), obj.get("docid"), obj.get("relevance")
        found = []
        if not isinstance(qid, str) or qid not in queries:
            found.append(f"{where}: qid: {describe(qid)} is not an id in {queries_file.name}")
        if not isinstance(docid, str) or docid not in corpus:
            found.append(f"{where}: docid: {describe(docid)} is not an id in {corpus_file.name}")
        if isinstance(relevance, bool) or not isinstance(relevance, int) or relevance < 0:
            found.append(
                f"{where}: relevance: expected an integer >= 0 (0 = judged not relevant), got {describe(relevance)}"
            )
        if not found and (qid, docid) in judged_lines:
            found.append(
                f"{where}: docid: {describe(docid)} judged twice for query {describe(qid)} "
                f"(first on line {judged_lines[qid, docid]})"
            )
        if found:
            problems += found
            continue
        judged_lines[qid, docid] = line_no
        if relevance > 0:
            relevant_queries.add(qid)
        qrels.append({"qid": qid, "docid": docid, "relevance": relevance})
    # A broken qrels line would also make its query look unjudged: report the cause only.
    if not any(p.startswith(str(qrels_file)) for p in problems):
        problems += [
            f"{queries_file}:{line_no}: id: query {describe(qid)} has no relevant passage in {qrels_file.name} "
            f"(add a qrels line with relevance > 0, or remove the query)"
            for qid, (line_no, _) in queries.items()
            if qid not in relevant_queries
        ]
    if problems:
        raise InputError(f"evaluation set {uri} has {len(problems)} problems; fix them and start again", problems)
    return EvalSet(
        queries=[{"id": qid, "text": obj["text"]} for qid, (_, obj) in queries.items()],
        corpus=[obj for _, obj in corpus.values()],
        qrels=qrels,
    )


def passage_text(passage: dict[str, str]) -> str:
    """The text a passage is encoded from: its title, when it has one, then its text."""
    title = passage.get("title", "").strip()
    return f"{title} {passage['text']}" if title else passage["text"]


def judgments(eval_set: EvalSet) -> dict[str, dict[str, int]]:
    """qid -> {docid: relevance}, every query of the set included."""
    by_query: dict[str, dict[str, int]] = {query["id"]: {} for query in eval_set.queries}
    for row in eval_set.qrels:
        by_query[row["qid"]][row["docid"]] = row["relevance"]
    return by_query
