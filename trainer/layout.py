"""Where a run's artifacts live in storage. Pure path arithmetic, no I/O, no heavy imports:
the operator imports it to put URIs into status.

    <storage>/<namespace>/<name>/run-<runId>/run.json      (the spec the run trains)
    <storage>/<namespace>/<name>/run-<runId>/checkpoints/checkpoint-<step>/...
    <storage>/<namespace>/<name>/run-<runId>/checkpoints/checkpoint-<step>/_COMPLETE.json
    <storage>/<namespace>/<name>/run-<runId>/model/            (sentence-transformers layout)
    <storage>/<namespace>/<name>/run-<runId>/eval/             (queries, corpus, qrels)
    <storage>/<namespace>/<name>/teacher-scores/<fingerprint>/ (training data scored by data.teacher,
                                                                shared by the runs of the same data and teacher)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Written last: a checkpoint or model without it is an interrupted upload and never used.
COMPLETE_MARKER = "_COMPLETE.json"
# Written when a run first trains: the spec fingerprint its storage belongs to.
RUN_RECORD = "run.json"
# Per-node manifests of a checkpoint; rank 0 merges them into the marker.
PARTS_DIR = "_parts"

_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


def join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


@dataclass(frozen=True)
class RunLayout:
    namespace: str
    name: str
    run_id: str

    @property
    def run_prefix(self) -> str:
        return join(self.namespace, self.name, f"run-{self.run_id}")

    @property
    def checkpoints_prefix(self) -> str:
        return join(self.run_prefix, "checkpoints")

    def checkpoint_prefix(self, step: int) -> str:
        return join(self.checkpoints_prefix, checkpoint_dir_name(step))

    @property
    def model_prefix(self) -> str:
        return join(self.run_prefix, "model")

    @property
    def merged_model_prefix(self) -> str:
        """The fine-tuned model merged with others (spec.merge), beside the fine-tuned one."""
        return join(self.run_prefix, "merged-model")

    @property
    def eval_prefix(self) -> str:
        return join(self.run_prefix, "eval")

    def teacher_scores_prefix(self, fingerprint: str) -> str:
        return join(self.namespace, self.name, "teacher-scores", fingerprint)

    @property
    def tensorboard_prefix(self) -> str:
        return join(self.run_prefix, "tensorboard")


def checkpoint_dir_name(step: int) -> str:
    # The same name HF's Trainer gives its checkpoint folders.
    return f"checkpoint-{step}"


def step_of_checkpoint_dir(name: str) -> int | None:
    match = _CHECKPOINT_DIR.match(name)
    return int(match.group(1)) if match else None
