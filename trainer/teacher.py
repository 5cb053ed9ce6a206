"""Teacher scoring: a cross-encoder reranker or an embedding model scores every positive and
negative of the prepared training data (after mining and filling), for distillation.

Scoring runs once: rank 0 scores and publishes the scored file to storage under a fingerprint
of the data and the teacher, every rank (of every node) downloads it, and a resumed run or a
rerun of the same data and teacher finds it there and scores nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .checkpoints import is_published, publish_dir
from .config import StorageAccess, TeacherSpec
from .data import iter_jsonl, write_jsonl
from .errors import InputError
from .layout import RunLayout
from .model_loading import check_tokenizer, loading_model
from .storage import Storage, fetch_to_local

logger = logging.getLogger(__name__)

SCORED_FILE = "train.jsonl"
FIELD = "data.teacher.model"


def teacher_fingerprint(train_file: Path, teacher: TeacherSpec) -> str:
    """Changes exactly when the scores could: other data, or another teacher or setting."""
    digest = hashlib.sha256(json.dumps(teacher.to_dict(), sort_keys=True).encode())
    with open(train_file, "rb") as f:
        digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:16]


def teacher_scored_data(
    train_file: Path,
    teacher: TeacherSpec,
    storage: Storage,
    layout: RunLayout,
    work_dir: Path,
    access: StorageAccess | None = None,
    *,
    rank: int = 0,
    local_rank: int = 0,
) -> Path:
    """The training file with every record's `pos_scores`/`neg_scores` from the teacher; every
    rank must call it together. Rank 0 scores and publishes unless storage has the scores."""
    fingerprint = teacher_fingerprint(train_file, teacher)
    prefix = layout.teacher_scores_prefix(fingerprint)
    local = work_dir / fingerprint  # a work dir kept from a run of other data never answers for this one
    if rank == 0 and not is_published(storage, prefix):
        records = list(iter_jsonl(train_file))
        model_path = fetch_to_local(teacher.model, work_dir / "model", access)
        score_records(records, teacher, model_path)
        write_jsonl(local / SCORED_FILE, records)
        publish_dir(storage, local, prefix, desc="upload teacher scores")
        logger.info("teacher scores of %d records stored in %s", len(records), storage.uri_for(prefix))
    _barrier()
    if local_rank == 0 and not (local / SCORED_FILE).exists():
        storage.download_dir(prefix, local, desc="download teacher scores")
        logger.info("teacher scores reused from %s", storage.uri_for(prefix))
    _barrier()
    return local / SCORED_FILE


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def score_records(records: list[dict], teacher: TeacherSpec, model_path: Path | str) -> None:
    """Set every record's `pos_scores` and `neg_scores` to the teacher's scores, in place."""
    pairs = [(r["query"], passage) for r in records for passage in (*r["pos"], *r.get("neg", []))]
    score = _cross_encoder_scores if teacher.kind == "crossEncoder" else _embedder_scores
    scores = iter(score(pairs, teacher, model_path).tolist())
    for record in records:
        record["pos_scores"] = [next(scores) for _ in record["pos"]]
        record["neg_scores"] = [next(scores) for _ in record.get("neg", [])]


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.inference_mode()
def _cross_encoder_scores(pairs: list[tuple[str, str]], teacher: TeacherSpec, model_path) -> np.ndarray:
    """The reranker's logit for each (query, passage) pair; pairs go through in length order, so
    each batch is evenly padded."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with loading_model(model_path, FIELD):
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=teacher.trust_remote_code)
        check_tokenizer(tokenizer)
        model, loading = AutoModelForSequenceClassification.from_pretrained(
            model_path, trust_remote_code=teacher.trust_remote_code, output_loading_info=True
        )
    if loading["missing_keys"]:  # transformers would score with a randomly initialized head
        raise InputError(
            f"{FIELD}: {str(model_path)!r} is no cross-encoder: it lacks the weights "
            f"{', '.join(sorted(loading['missing_keys'])[:4])} of a scoring head (an embedding model? then set "
            "data.teacher.kind: embedder)"
        )
    if model.config.num_labels != 1:
        raise InputError(
            f"{FIELD}: {str(model_path)!r} has {model.config.num_labels} output labels; a cross-encoder teacher "
            "gives one relevance logit per pair (or set data.teacher.kind: embedder)"
        )
    device = _device()
    model.to(device).eval()
    if device.type == "cuda":
        model.half()
    order = np.argsort([len(q) + len(p) for q, p in pairs], kind="stable")
    scores = np.empty(len(pairs), dtype=np.float64)
    with tqdm(total=len(pairs), desc="teacher scores", unit="pair", mininterval=2.0) as progress:
        for start in range(0, len(pairs), teacher.batch_size):
            batch = order[start : start + teacher.batch_size]
            inputs = tokenizer(
                [pairs[i][0] for i in batch],
                [pairs[i][1] for i in batch],
                truncation=True,
                max_length=teacher.max_length,
                padding=True,
                return_tensors="pt",
            ).to(device)
            scores[batch] = model(**inputs).logits[:, 0].float().cpu().numpy()
            progress.update(len(batch))
    return scores


def _embedder_scores(pairs: list[tuple[str, str]], teacher: TeacherSpec, model_path) -> np.ndarray:
    """The similarity of each query's and passage's vectors, as the embedding model computes it."""
    from .encoding import encode_passages, encode_queries, load_encoder

    model = load_encoder(model_path, field=FIELD)
    model.max_seq_length = teacher.max_length
    queries = list(dict.fromkeys(q for q, _ in pairs))
    passages = list(dict.fromkeys(p for _, p in pairs))
    query_vectors = encode_queries(model, queries, batch_size=teacher.batch_size)
    passage_vectors = np.empty((len(passages), query_vectors.shape[1]), dtype=np.float32)
    for positions, vectors in encode_passages(model, passages, batch_size=teacher.batch_size):
        passage_vectors[positions] = vectors
    query_row = {q: i for i, q in enumerate(queries)}
    passage_row = {p: i for i, p in enumerate(passages)}
    rows = np.array([query_row[q] for q, _ in pairs])
    columns = np.array([passage_row[p] for _, p in pairs])
    return np.einsum("ij,ij->i", query_vectors[rows], passage_vectors[columns]).astype(np.float64)
