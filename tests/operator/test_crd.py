import copy
import typing
from pathlib import Path

import celpy
import jsonschema
import pytest
import yaml
from celpy import celtypes

from embedtune.operator.crd import build_crd, crd_yaml
from embedtune.operator.reference import reference_markdown
from embedtune.operator.spec import EmbeddingFinetuneSpec, parse_finetune
from embedtune.trainer.errors import InputError
from support.finetunes import example_manifests, minimal_manifest

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "embeddingfinetunes.embedtune.io.yaml"


def crd_schema():
    crd = yaml.safe_load(CRD_PATH.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def schema_errors(manifest) -> list[str]:
    # OpenAPI v3.0 bounds (boolean exclusiveMinimum) are draft 4's.
    validator = jsonschema.Draft4Validator(crd_schema())
    return [f"{'.'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(manifest)]


def test_crd_file_is_generated_from_the_models():
    assert CRD_PATH.read_text() == crd_yaml(), "regenerate: python -m embedtune.operator.crd > " + str(CRD_PATH)


def test_reference_doc_is_generated_from_the_crd():
    reference = CRD_PATH.parents[1] / "docs" / "reference.md"
    assert reference.read_text() == reference_markdown(), (
        f"regenerate: python -m embedtune.operator.reference > {reference}"
    )


def test_reference_lists_every_spec_field_with_its_description():
    text = reference_markdown()
    spec = crd_schema()["properties"]["spec"]
    for section, schema in spec["properties"].items():
        for name, field in schema.get("properties", {}).items():
            row = next(line for line in text.splitlines() if line.startswith(f"| `spec.{section}.{name}` |"))
            assert field.get("description", "(undocumented)") in row.replace("\\|", "|"), row


def test_schema_and_model_have_the_same_fields():
    def fields(model) -> set[str]:
        return {info.alias for info in model.model_fields.values()}

    spec = crd_schema()["properties"]["spec"]
    assert set(spec["properties"]) == fields(EmbeddingFinetuneSpec)
    for info in EmbeddingFinetuneSpec.model_fields.values():
        # an optional section (merge) is its model or None
        section = next(a for a in typing.get_args(info.annotation) or [info.annotation] if a is not type(None))
        assert set(spec["properties"][info.alias]["properties"]) == fields(section), info.alias


def test_required_fields_enums_and_ranges_come_from_the_model():
    spec = crd_schema()["properties"]["spec"]
    assert set(spec["required"]) == {"model", "data", "storage"}
    resources = spec["properties"]["resources"]["properties"]
    assert resources["gpusPerNode"] == {**resources["gpusPerNode"], "minimum": 0, "maximum": 64, "type": "integer"}
    assert spec["properties"]["model"]["properties"]["pooling"]["enum"] == ["cls", "mean", "lastToken"]
    held_out = spec["properties"]["data"]["properties"]["heldOutFraction"]
    assert (held_out["minimum"], held_out["exclusiveMinimum"], held_out["maximum"], held_out["exclusiveMaximum"]) == (
        0,
        True,
        1,
        True,
    )
    assert spec["properties"]["runPolicy"]["properties"]["maxRestarts"]["default"] == 3


def test_status_subresource_short_name_and_printer_columns():
    version = build_crd()["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert build_crd()["spec"]["names"]["shortNames"] == ["eft"]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Phase", "Step", "nDCG@10", "Age"]


def test_cross_field_rules_are_cel_validations():
    spec = crd_schema()["properties"]["spec"]
    assert spec["x-kubernetes-validations"][0]["rule"].endswith(
        "(has(self.data.heldOutFraction) != has(self.data.eval))"
    )
    assert {rule["message"] for rule in spec["properties"]["storage"]["x-kubernetes-validations"]} == {
        "uri: must be an s3:// URI; pods share nothing else"
    }


def test_schema_is_structural():
    """No anyOf/oneOf/$ref/null types: the API server rejects non-structural schemas."""
    text = CRD_PATH.read_text()
    for word in ("anyOf", "oneOf", "$ref", "type: 'null'", "type: null", "additionalProperties: false"):
        assert word not in text


@pytest.mark.parametrize("manifest", [*example_manifests(), minimal_manifest()], ids=lambda m: m["metadata"]["name"])
def test_examples_validate_against_the_crd_schema(manifest):
    assert schema_errors(manifest) == []


def broken(path: str, value):
    manifest = minimal_manifest()
    target = manifest
    *parents, last = path.split(".")
    for part in parents:
        target = target.setdefault(part, {})
    target[last] = value
    return manifest


@pytest.mark.parametrize(
    ("manifest", "where"),
    [
        (broken("spec.resources.gpusPerNode", -1), "spec.resources.gpusPerNode"),
        (broken("spec.resources.nodes", "two"), "spec.resources.nodes"),
        (broken("spec.model.pooling", "max"), "spec.model.pooling"),
        (broken("spec.data.heldOutFraction", 1.0), "spec.data.heldOutFraction"),
        (broken("spec.training.learningRate", 0), "spec.training.learningRate"),
        (broken("spec.training.deepspeed", {"zeroStage": 4}), "spec.training.deepspeed.zeroStage"),
        (broken("spec.runPolicy.maxRestarts", -1), "spec.runPolicy.maxRestarts"),
        (broken("spec.evaluation.kValues", []), "spec.evaluation.kValues"),
        (broken("spec.resources.memory", "a lot"), "spec.resources.memory"),
        (broken("spec.resources.tolerations", [{"effect": "Sometimes"}]), "spec.resources.tolerations.0.effect"),
        ({k: v for k, v in minimal_manifest().items() if k != "spec"}, ""),
        (broken("spec.storage", {"endpoint": "http://minio"}), "spec.storage"),
    ],
)
def test_broken_manifests_fail_the_schema(manifest, where):
    errors = schema_errors(manifest)
    assert any(error.startswith(f"{where}:") for error in errors), errors


def failed_cel_rules(manifest) -> list[str]:
    """The messages of the CRD's CEL rules that `manifest` breaks, evaluated as the API server
    does: each rule on its object when that object is present (k8s' `split` added)."""

    def split(text, separator):
        return celtypes.ListType([celtypes.StringType(part) for part in str(text).split(str(separator))])

    environment = celpy.Environment()
    failed = []

    def walk(schema, value):
        if not isinstance(value, dict):
            return
        for rule in schema.get("x-kubernetes-validations", []):
            program = environment.program(environment.compile(rule["rule"]), functions={"split": split})
            result = program.evaluate({"self": celpy.json_to_cel(value)})
            if not (isinstance(result, celtypes.BoolType) and bool(result)):
                failed.append(rule["message"])
        for name, child in schema.get("properties", {}).items():
            walk(child, value.get(name))

    walk(crd_schema()["properties"]["spec"], manifest["spec"])
    return failed


@pytest.mark.parametrize("manifest", [*example_manifests(), minimal_manifest()], ids=lambda m: m["metadata"]["name"])
def test_examples_pass_the_cel_rules(manifest):
    assert failed_cel_rules(manifest) == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {
                "model": {"base": "BAAI/bge-m3", "outputs": ["dense", "sparse", "colbert"]},
                "training": {"matryoshkaDims": [256]},
            },
            "training.matryoshkaDims: FlagEmbedding's bge-m3 runner does not train Matryoshka dimensions",
        ),
        (
            {"training": {"unified": {"selfDistill": True}}},
            "training.unified: needs model.outputs [dense, sparse, colbert]",
        ),
        ({"storage": {"uri": "/tmp/models"}}, "uri: must be an s3:// URI; pods share nothing else"),
        (
            {"data": {"train": ["s3://d/t.jsonl"]}},
            "data: set exactly one of `heldOutFraction` or `eval` when evaluation is enabled",
        ),
        (
            {"data": {"train": ["s3://d/t.jsonl"], "heldOutFraction": 0.1, "eval": "s3://d/e"}},
            "data: set exactly one of `heldOutFraction` or `eval` when evaluation is enabled",
        ),
        ({"data": {"heldOutFraction": 0.1}}, "set exactly one of `train` or `huggingFace`"),
        (
            {"data": {"train": ["local.jsonl"], "heldOutFraction": 0.1}},
            "train: every entry must be an s3:// URI on a cluster",
        ),
        ({"data": {"train": ["s3://d/t.jsonl"], "eval": "file:///e"}}, "eval: must be an s3:// URI on a cluster"),
        ({"evaluation": {"gate": {"metric": "ndcg@5"}}}, "gate.metric: k must be one of kValues"),
        ({"evaluation": {"kValues": [5], "gate": {"metric": "recall@10"}}}, "gate.metric: k must be one of kValues"),
        (
            {"data": {"train": ["s3://d/t.jsonl"], "heldOutFraction": 0.1, "teacher": {"model": "s3://m/r"}}},
            "data.teacher: its scores train only with training.distillation on",
        ),
        (
            {
                "data": {"train": ["s3://d/t.jsonl"], "heldOutFraction": 0.1, "teacher": {"model": "s3://m/r"}},
                "training": {"distillation": {"enabled": False}},
            },
            "data.teacher: its scores train only with training.distillation on",
        ),
    ],
)
def test_cel_rules_refuse_what_the_operator_refuses(overrides, message):
    manifest = minimal_manifest(**copy.deepcopy(overrides))
    assert failed_cel_rules(manifest) == [message]
    with pytest.raises(InputError):
        parse_finetune(manifest)


def test_cel_rules_allow_no_eval_set_when_evaluation_is_off():
    manifest = minimal_manifest(data={"train": ["s3://d/t.jsonl"]}, evaluation={"enabled": False})
    assert failed_cel_rules(manifest) == []
