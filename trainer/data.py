"""Training data: load, validate every record before training, fill missing negatives,
split off a held-out evaluation set.

Input is FlagEmbedding's JSONL (`query`, `pos` [list], `neg` [list], optional
`pos_scores`/`neg_scores`/`prompt`) or a Hugging Face dataset with a column mapping.
Problems are reported one per line as `FILE:LINE: field: reason`; nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from .config import DataSpec, HuggingFaceSource, ModelSpec, StorageAccess, TrainingField
from .errors import InputError
from .jsonl import describe, read_json_lines, text_problem, type_name
from .storage import fetch_to_local

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json")
PASSAGE_LISTS = ("pos", "neg")
SCORE_LISTS = {"pos_scores": "pos", "neg_scores": "neg"}


@dataclass
class Record:
    query: str
    pos: list[str]
    neg: list[str] = field(default_factory=list)
    prompt: str | None = None
    # a teacher's score of each passage, as distillation trains towards them
    pos_scores: list[float] | None = None
    neg_scores: list[float] | None = None

    @property
    def scored(self) -> bool:
        return self.pos_scores is not None and (self.neg_scores is not None or not self.neg)

    @property
    def has_scores(self) -> bool:
        return self.pos_scores is not None or self.neg_scores is not None

    def drop_scores(self) -> None:
        self.pos_scores = self.neg_scores = None

    source: str = field(default="", compare=False)  # the file it was read from

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"query": self.query, "pos": self.pos, "neg": self.neg}
        if self.prompt is not None:
            out["prompt"] = self.prompt
        if self.scored:  # FlagEmbedding reads both lists of every record, or none
            out["pos_scores"], out["neg_scores"] = self.pos_scores, self.neg_scores or []
        return out


@dataclass
class LoadResult:
    records: list[Record]
    problems: list[str]
    locations: list[str] = field(default_factory=list)  # FILE:LINE of each record

    def extend(self, other: LoadResult) -> None:
        self.records += other.records
        self.problems += other.problems
        self.locations += other.locations


# --- validation --------------------------------------------------------------------------


def record_problems(obj: dict[str, Any]) -> list[str]:
    """Every problem of one record as `field: reason`; empty when the record is valid."""
    problems = []
    if "query" not in obj:
        problems.append("query: missing")
    elif problem := text_problem(obj["query"]):
        problems.append(f"query: {problem}")
    for name in PASSAGE_LISTS:
        if name not in obj:
            if name == "pos":
                problems.append("pos: missing (need at least one positive passage)")
            continue
        value = obj[name]
        if not isinstance(value, list):
            problems.append(f"{name}: expected a list of strings, got {type_name(value)}")
            continue
        if name == "pos" and not value:
            problems.append("pos: empty list (need at least one positive passage)")
        problems += [f"{name}[{i}]: {problem}" for i, item in enumerate(value) if (problem := text_problem(item))]
    for scores, passages in SCORE_LISTS.items():
        if scores not in obj:
            continue
        value = obj[scores]
        if not isinstance(value, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            problems.append(f"{scores}: expected a list of numbers")
        elif isinstance(obj.get(passages), list) and len(value) != len(obj[passages]):
            problems.append(f"{scores}: {len(value)} scores for {len(obj[passages])} {passages} passages")
        else:
            problems += [
                f"{scores}[{i}]: expected a finite number, got {describe(v)}"
                for i, v in enumerate(value)
                if not _finite(v)
            ]
    if obj.get("prompt") is not None and (problem := text_problem(obj["prompt"], allow_empty=True)):
        problems.append(f"prompt: {problem}")
    if not problems:
        problems += _contradictions(obj)
    return problems


def _finite(number: int | float) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an integer too large for a float
        return False


def _contradictions(obj: dict[str, Any]) -> list[str]:
    """A negative that is also a positive of the record: training would pull the query towards
    the passage and push it away at once. (Surrounding spaces do not make another passage.)"""
    positive_index = {}
    for i, passage in enumerate(obj["pos"]):
        positive_index.setdefault(passage.strip(), i)
    return [
        f"neg[{i}]: same text as pos[{positive_index[passage.strip()]}] (a passage cannot be both a positive "
        "and a negative of the query)"
        for i, passage in enumerate(obj.get("neg", []))
        if passage.strip() in positive_index
    ]


def _add_record(result: LoadResult, obj: dict[str, Any], where: str) -> None:
    """The record at `where` into `result`: as a Record when valid, else as its problems."""
    if found := record_problems(obj):
        result.problems += [f"{where}: {problem}" for problem in found]
        return
    result.records.append(
        Record(
            query=obj["query"],
            pos=list(obj["pos"]),
            neg=list(obj.get("neg") or []),
            prompt=obj.get("prompt"),
            pos_scores=_floats(obj.get("pos_scores")),
            neg_scores=_floats(obj.get("neg_scores")),
            source=where.rpartition(":")[0],
        )
    )
    result.locations.append(where)


def _floats(numbers: list[int | float] | None) -> list[float] | None:
    return None if numbers is None else [float(n) for n in numbers]


# --- teacher scores ----------------------------------------------------------------------

DISTILLATION_SETTING = "training.distillation"


def unscored_records(loaded: LoadResult) -> list[str]:
    """`FILE:LINE: ...` for every record that lacks the teacher scores distillation trains on."""
    problems = []
    for record, where in zip(loaded.records, loaded.locations):
        missing = [scores for scores, passages in SCORE_LISTS.items() if _needs(record, scores, passages)]
        if missing:
            problems.append(
                f"{where}: {' and '.join(missing)}: missing ({DISTILLATION_SETTING} is on: every record needs a "
                "teacher score for each of its passages, or set data.teacher to score them)"
            )
    return problems


def _needs(record: Record, scores: str, passages: str) -> bool:
    return getattr(record, scores) is None and (passages == "pos" or bool(record.neg))


def check_distillable(loaded: LoadResult, group_size: int) -> None:
    """Raise an InputError naming every record distillation cannot train on as it is: one
    without scores, or one short of negatives (negatives filled at random have no score)."""
    if problems := unscored_records(loaded):
        raise InputError(f"{DISTILLATION_SETTING}: {len(problems)} records have no teacher scores", problems)
    need = group_size - 1
    short = [
        f"{where}: neg: {len(record.neg)} scored negatives, training.groupSize {group_size} needs {need}"
        for record, where in zip(loaded.records, loaded.locations)
        if len(record.neg) < need
    ]
    if short:
        raise InputError(
            f"{DISTILLATION_SETTING}: {len(short)} records have too few negatives, and negatives filled at random "
            "have no teacher scores; add scored negatives, lower training.groupSize, or set data.teacher to score them",
            short,
        )


IGNORED_SCORES = f"they are ignored unless {DISTILLATION_SETTING} is on"
REPLACED_SCORES = "data.teacher's scores replace them"


def ignored_scores_warning(loaded: LoadResult, fate: str = IGNORED_SCORES) -> str | None:
    """A warning when records carry teacher scores that training will not use."""
    scored = [where for record, where in zip(loaded.records, loaded.locations) if record.has_scores]
    if not scored:
        return None
    shown = ", ".join(scored[:WARNING_EXAMPLES]) + (", ..." if len(scored) > WARNING_EXAMPLES else "")
    return (
        f"{len(scored)} {'record carries' if len(scored) == 1 else 'records carry'} pos_scores/neg_scores "
        f"({shown}); {fate}"
    )


# Valid records that teach nothing, or teach it twice: reported, counted by kind, never refused.
DUPLICATE_RECORD = "repeating an earlier record (the same query, pos, neg and prompt)"
QUERY_IS_POSITIVE = "whose query is also one of its positives (an identical pair teaches nothing)"
QUERY_IS_NEGATIVE = "whose query is also one of its negatives"
REPEATED_PASSAGE = "with the same passage twice in pos or in neg"
NEGATIVE_IS_ANOTHER_POSITIVE = (
    "with a negative that another record of the same query has as a positive (trained both ways)"
)
WARNING_EXAMPLES = 3


def data_warnings(loaded: LoadResult) -> list[str]:
    """One line per kind of useless record found in `loaded`: how many, and where the first few
    are. Texts are compared without surrounding spaces, as the tokenizer reads them."""
    found: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}

    def note(kind: str, where: str) -> None:
        found[kind] += 1
        if len(examples.setdefault(kind, [])) < WARNING_EXAMPLES:
            examples[kind].append(where)

    first_seen: dict[tuple, str] = {}
    positives_of_query: dict[str, set[str]] = {}
    for record, where in zip(loaded.records, loaded.locations):
        key = (record.query, tuple(record.pos), tuple(record.neg), record.prompt)
        if key in first_seen:
            note(DUPLICATE_RECORD, f"{where} (as {first_seen[key]})")
        first_seen.setdefault(key, where)
        query, pos, neg = record.query.strip(), {p.strip() for p in record.pos}, {n.strip() for n in record.neg}
        if query in pos:
            note(QUERY_IS_POSITIVE, where)
        if query in neg:
            note(QUERY_IS_NEGATIVE, where)
        if len(pos) < len(record.pos) or len(neg) < len(record.neg):
            note(REPEATED_PASSAGE, where)
        positives_of_query.setdefault(query, set()).update(pos)
    for record, where in zip(loaded.records, loaded.locations):
        # a record's own positives are never among its negatives (an error), so this is another record's
        if any(n.strip() in positives_of_query[record.query.strip()] for n in record.neg):
            note(NEGATIVE_IS_ANOTHER_POSITIVE, where)
    return [
        f"{count} {'record' if count == 1 else 'records'} {kind}: "
        f"{', '.join(examples[kind])}{', ...' if count > WARNING_EXAMPLES else ''}"
        for kind, count in found.items()
    ]


# --- loading -----------------------------------------------------------------------------


def jsonl_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in JSONL_SUFFIXES)
    return [path]


def load_jsonl(paths: Iterable[Path]) -> LoadResult:
    result = LoadResult([], [])
    problems = result.problems
    for path in paths:
        if not path.exists():
            problems.append(f"{path}: no such file or directory")
            continue
        files = jsonl_files(path)
        if not files:
            problems.append(f"{path}: no .jsonl or .json files in this directory")
        for file in files:
            problems_before, count = len(problems), 0
            for line_no, obj in read_json_lines(file, problems):
                count += 1
                _add_record(result, obj, f"{file}:{line_no}")
            if count == 0 and len(problems) == problems_before:
                problems.append(f"{file}: no records")
    return result


def load_hugging_face(source: HuggingFaceSource) -> LoadResult:
    import datasets

    local = Path(source.path)
    where = f"{source.path}[{source.split}]"
    try:
        if local.is_dir() and any((local / marker).exists() for marker in ("dataset_dict.json", "state.json")):
            dataset = datasets.load_from_disk(str(local))
        else:
            dataset = datasets.load_dataset(source.path, split=source.split)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as exc:
        raise InputError(f"data.huggingFace.path: cannot load dataset {source.path!r}: {exc}") from exc
    if isinstance(dataset, datasets.DatasetDict):
        if source.split not in dataset:
            raise InputError(f"data.huggingFace.split: {source.split!r} not in dataset (has: {', '.join(dataset)})")
        dataset = dataset[source.split]
    mapping = {name: source.columns.get(name, name) for name in get_args(TrainingField)}
    missing = [
        f"data.huggingFace.columns.{target}: column {column!r} not in dataset (has: {', '.join(dataset.column_names)})"
        for target, column in mapping.items()
        if column not in dataset.column_names and (target in ("query", "pos") or target in source.columns)
    ]
    if missing:
        raise InputError(f"{where}: column mapping does not fit the dataset", missing)
    columns = {target: column for target, column in mapping.items() if column in dataset.column_names}
    result = LoadResult([], [])
    for row_no, row in enumerate(dataset, start=1):
        obj = {target: row[column] for target, column in columns.items()}
        for name in PASSAGE_LISTS:
            if isinstance(obj.get(name), str):
                obj[name] = [obj[name]]
        _add_record(result, obj, f"{where}:{row_no}")
    if not len(dataset):
        result.problems.append(f"{where}: no records")
    return result


def load_training_data(spec: DataSpec, download_dir: Path, access: StorageAccess | None = None) -> LoadResult:
    if spec.hugging_face is not None:
        return load_hugging_face(spec.hugging_face)
    return load_jsonl(fetch_to_local(uri, download_dir, access) for uri in spec.train)


# --- preparation -------------------------------------------------------------------------


def fill_negatives(records: list[Record], group_size: int, seed: int) -> int:
    """Give every record at least `group_size - 1` negatives, drawing seeded random
    passages of other records; never one of the record's own positives, never a duplicate.
    Returns how many negatives were added."""
    need = group_size - 1
    if need <= 0 or all(len(r.neg) >= need for r in records):
        return 0
    pool = list(dict.fromkeys(p for r in records for p in (*r.pos, *r.neg)))
    rng = random.Random(seed)
    added = 0
    for record in records:
        missing = need - len(record.neg)
        if missing <= 0:
            continue
        taken = set(record.pos) | set(record.neg)
        if len(pool) - len(taken) < missing:  # every passage of the record is in the pool
            raise InputError(
                f"training.groupSize: {group_size} needs {need} negatives per query, but the data has only "
                f"{len(pool)} distinct passages; lower groupSize or add negatives"
            )
        fresh: list[str] = []
        while len(fresh) < missing:
            candidate = pool[rng.randrange(len(pool))]
            if candidate not in taken:
                taken.add(candidate)
                fresh.append(candidate)
        record.neg = record.neg + fresh
        added += missing
    return added


@dataclass
class EvalSet:
    queries: list[dict[str, str]]
    corpus: list[dict[str, str]]
    qrels: list[dict[str, Any]]

    def write(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        write_jsonl(directory / "queries.jsonl", self.queries)
        write_jsonl(directory / "corpus.jsonl", self.corpus)
        write_jsonl(directory / "qrels.jsonl", self.qrels)


def split_held_out(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], EvalSet]:
    """Hold out a seeded `fraction` of the distinct queries. Records sharing a query text
    go to the same side, so no held-out query is ever trained on. The corpus is every
    positive of the whole dataset, deduplicated, so retrieval has real distractors."""
    queries = list(dict.fromkeys(r.query.strip() for r in records))
    if len(queries) < 2:
        raise InputError("data.heldOutFraction: need at least 2 distinct queries to hold some out")
    rng = random.Random(seed)
    shuffled = queries[:]
    rng.shuffle(shuffled)
    count = min(max(1, round(fraction * len(queries))), len(queries) - 1)
    held = set(shuffled[:count])

    doc_ids: dict[str, str] = {}
    for record in records:
        for passage in record.pos:
            doc_ids.setdefault(passage, f"d{len(doc_ids)}")
    query_ids: dict[str, str] = {}
    relevant: dict[str, set[str]] = {}
    for record in records:
        text = record.query.strip()
        if text in held:
            qid = query_ids.setdefault(text, f"q{len(query_ids)}")
            relevant.setdefault(qid, set()).update(doc_ids[p] for p in record.pos)
    eval_set = EvalSet(
        queries=[{"id": qid, "text": text} for text, qid in query_ids.items()],
        corpus=[{"id": did, "text": text} for text, did in doc_ids.items()],
        qrels=[
            {"qid": qid, "docid": did, "relevance": 1}
            for qid in query_ids.values()
            for did in sorted(relevant[qid], key=lambda d: int(d[1:]))
        ],
    )
    train = [r for r in records if r.query.strip() not in held]
    return train, eval_set


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def write_training_data(records: list[Record], out_dir: Path, *, by_source: bool) -> Path:
    """train.jsonl, or `by_source` a folder train/ with one file per source file, in the order
    the sources were given (FlagEmbedding batches each file of a folder on its own)."""
    if not by_source:
        write_jsonl(out_dir / "train.jsonl", (r.to_json() for r in records))
        return out_dir / "train.jsonl"
    folder = out_dir / "train"
    if folder.exists():
        shutil.rmtree(folder)
    sources = list(dict.fromkeys(r.source for r in records))
    for index, source in enumerate(sources):
        write_jsonl(folder / f"{index:05d}.jsonl", (r.to_json() for r in records if r.source == source))
    return folder


@dataclass
class PreparedData:
    train_file: Path  # with data.sameDatasetWithinBatch: a folder of one file per training file
    eval_dir: Path | None
    train_records: int
    eval_queries: int
    negatives_added: int


def prepare_training_data(
    spec: DataSpec,
    group_size: int,
    seed: int,
    out_dir: Path,
    access: StorageAccess | None = None,
    *,
    model: ModelSpec | None = None,
    model_path: str | Path | None = None,
    reuse: bool = False,
    distillation: bool = False,
) -> PreparedData:
    """Validate, split, mine hard negatives (with the base model `model` at `model_path`,
    when `spec.hardNegatives.mine`) and fill; write `train.jsonl` (and `eval/`) under out_dir.
    With `distillation`, every record must carry teacher scores for all the passages it trains
    on, unless `spec.teacher` scores them later (teacher.py); scores in the data that training
    does not use are dropped (with a warning).

    Deterministic for the same inputs. With `reuse`, a preparation that another process on
    this machine just made from the same inputs is taken as it is (the data is read and mined
    once per machine, not once per GPU)."""
    mining = spec.hard_negatives is not None and spec.hard_negatives.mine
    if spec.teacher is not None and not distillation:
        raise InputError(f"data.teacher: its scores train only with {DISTILLATION_SETTING} on")
    if distillation and mining and spec.teacher is None:
        raise InputError(
            f"data.hardNegatives.mine: mined negatives have no teacher scores, which {DISTILLATION_SETTING} "
            "needs; set data.teacher to score them, or turn one of the two off"
        )
    if mining and (model is None or model_path is None):
        raise ValueError("hard-negative mining needs the base model: pass model and model_path")
    inputs = [spec.to_dict(), group_size, seed, distillation] + ([model.to_dict()] if mining else [])
    fingerprint = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()
    summary_file = out_dir / "prepared.json"
    if reuse and summary_file.exists():
        summary = json.loads(summary_file.read_text())
        if summary.get("fingerprint") == fingerprint:
            return PreparedData(
                out_dir / ("train" if spec.same_dataset_within_batch else "train.jsonl"),
                out_dir / "eval" if summary["evalQueries"] else None,
                summary["trainRecords"],
                summary["evalQueries"],
                summary["negativesAdded"],
            )

    loaded = load_training_data(spec, out_dir / "download", access)
    if loaded.problems:
        raise InputError(
            f"training data has {len(loaded.problems)} problems; fix them and start again", loaded.problems
        )
    if not loaded.records:
        raise InputError("training data: no records")
    for warning in data_warnings(loaded):
        logger.warning("training data: %s", warning)
    if distillation and spec.teacher is None:
        check_distillable(loaded, group_size)
    elif warning := ignored_scores_warning(loaded, IGNORED_SCORES if spec.teacher is None else REPLACED_SCORES):
        logger.warning("training data: %s", warning)
        for record in loaded.records:
            record.drop_scores()
    records, eval_set = loaded.records, None
    if spec.held_out_fraction:
        records, eval_set = split_held_out(records, spec.held_out_fraction, seed)
        eval_set.write(out_dir / "eval")
    if mining:  # after the split: held-out queries are never mined for
        from .mining import mine_for_training

        mine_for_training(records, spec.hard_negatives, model, model_path, seed, out_dir / "download", access)
    added = fill_negatives(records, group_size, seed)
    train_path = write_training_data(records, out_dir, by_source=spec.same_dataset_within_batch)
    prepared = PreparedData(
        train_path,
        out_dir / "eval" if eval_set else None,
        len(records),
        len(eval_set.queries) if eval_set else 0,
        added,
    )
    summary_file.write_text(
        json.dumps(
            {
                "fingerprint": fingerprint,
                "trainRecords": prepared.train_records,
                "evalQueries": prepared.eval_queries,
                "negativesAdded": added,
            }
        )
    )
    logger.info(
        "training data: %d records (%d random negatives added), %d held-out queries",
        prepared.train_records,
        added,
        prepared.eval_queries,
    )
    return prepared
