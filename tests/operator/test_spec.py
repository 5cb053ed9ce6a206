import pytest

from embedtune.operator.spec import parse_finetune
from embedtune.trainer.errors import InputError
from support.finetunes import example_manifests, minimal_manifest


def problems_of(manifest) -> list[str]:
    with pytest.raises(InputError) as caught:
        parse_finetune(manifest)
    return caught.value.problems


@pytest.mark.parametrize("manifest", example_manifests(), ids=lambda m: m["metadata"]["name"])
def test_examples_are_valid(manifest):
    parse_finetune(manifest)


@pytest.mark.parametrize(
    ("section", "value", "problem"),
    [
        ("resources", {"gpusPerNode": -1}, "spec.resources.gpusPerNode: Input should be greater than or equal to 0"),
        ("resources", {"nodes": 0}, "spec.resources.nodes: Input should be greater than or equal to 1"),
        ("resources", {"memory": "lots"}, "spec.resources.memory: String should match pattern"),
        ("resources", {"gpus": 8}, "spec.resources.gpus: unknown field"),
        ("runPolicy", {"maxRestarts": -1}, "spec.runPolicy.maxRestarts: Input should be greater than or equal to 0"),
        ("evaluation", {"kValues": [10, 0]}, "spec.evaluation.kValues.1: Input should be greater than or equal to 1"),
        (
            "evaluation",
            {"gate": {"metric": "ndcg@5"}},
            "spec.evaluation.gate.metric: k=5 must be one of evaluation.kValues",
        ),
        ("evaluation", {"gate": {"metric": "bleu@10"}}, "spec.evaluation.gate.metric: String should match pattern"),
        ("storage", {"uri": "/tmp/models"}, "spec.storage.uri: must be an s3:// URI"),
        ("data", {"train": "s3://d/t.jsonl"}, "spec.data: set exactly one of `heldOutFraction` or `eval`"),
        (
            "data",
            {"train": "s3://d/t.jsonl", "heldOutFraction": 0.1, "eval": "s3://d/eval"},
            "spec.data: set exactly one of `heldOutFraction` or `eval`",
        ),
        (
            "data",
            {"train": "train.jsonl", "eval": "s3://d/eval"},
            "spec.data.train.0: must be an s3:// URI on a cluster",
        ),
        ("data", {"heldOutFraction": 0.1}, "spec.data: set exactly one of `train` or `huggingFace`"),
        ("training", {"weightDecay": float("inf")}, "spec.training.weightDecay: Input should be a finite number"),
    ],
)
def test_each_problem_names_its_field(section, value, problem):
    problems = problems_of(minimal_manifest(**{section: value}))
    assert any(line.startswith(problem) for line in problems), problems


UNIFIED = {"base": "BAAI/bge-m3", "outputs": ["dense", "sparse", "colbert"]}


@pytest.mark.parametrize(
    ("sections", "problem"),
    [
        ({"evaluation": {"gate": {"mode": "hybrid"}}}, "spec.evaluation.gate.mode: 'hybrid' is not evaluated"),
        ({"training": {"unified": {"selfDistill": False}}}, "spec.training.unified: needs model.outputs"),
        ({"model": UNIFIED, "training": {"matryoshkaDims": [64]}}, "spec.training.matryoshkaDims: FlagEmbedding's"),
        ({"model": UNIFIED | {"outputs": ["dense", "sparse"]}}, "spec.model.outputs: must be [dense] or"),
        (
            {"training": {"matryoshkaDims": [64]}, "evaluation": {"gate": {"mode": "dense-32"}}},
            "spec.evaluation.gate.mode: 'dense-32' is not evaluated for this model; one of dense, dense-64",
        ),
    ],
)
def test_outputs_modes_and_the_gate_agree(sections, problem):
    problems = problems_of(minimal_manifest(**sections))
    assert any(line.startswith(problem) for line in problems), problems


def test_a_gate_may_read_each_evaluated_mode():
    parse_finetune(minimal_manifest(model=UNIFIED, evaluation={"gate": {"mode": "hybrid"}}))
    parse_finetune(minimal_manifest(training={"matryoshkaDims": [64]}, evaluation={"gate": {"mode": "dense-64"}}))


def test_every_problem_is_listed_at_once():
    manifest = minimal_manifest(
        name="Not_A_DNS_Name",
        resources={"nodes": 0, "gpusPerNode": -1},
        training={"learningRate": 0},
        runPolicy={"maxRestarts": -1},
    )
    manifest["apiVersion"] = "embedtune.io/v1"
    problems = problems_of(manifest)
    assert [line.split(":")[0] for line in problems] == [
        "apiVersion",
        "metadata.name",
        "spec.training.learningRate",
        "spec.resources.nodes",
        "spec.resources.gpusPerNode",
        "spec.runPolicy.maxRestarts",
    ]


def test_long_names_are_refused_because_pod_hostnames_derive_from_them():
    problems = problems_of(minimal_manifest(name="a" * 41))
    assert problems[0].startswith("metadata.name: must be a DNS label of at most 40 characters")


def test_run_fingerprint_ignores_run_policy_only():
    spec = parse_finetune(minimal_manifest())
    suspended = parse_finetune(minimal_manifest(runPolicy={"suspend": True, "maxRestarts": 9}))
    retuned = parse_finetune(minimal_manifest(training={"learningRate": 1e-4}))
    assert spec.run_fingerprint() == suspended.run_fingerprint()
    assert spec.run_fingerprint() != retuned.run_fingerprint()
