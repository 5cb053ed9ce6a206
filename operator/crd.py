"""The CustomResourceDefinition, generated from the spec and status models so the API cannot
disagree with the operator and the pods.

    python -m embedtune.operator.crd > crds/embeddingfinetunes.embedtune.io.yaml

pydantic's JSON schema becomes a Kubernetes structural schema (references inlined, optional
fields without null, OpenAPI v3.0 exclusive bounds). The rules between fields become CEL
validations; they mirror `spec.cross_field_problems`, which stays the operator's own check.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from pydantic import BaseModel

from embedtune.trainer.contract import GROUP, PLURAL, VERSION

from .constants import KIND, SHORT_NAME
from .spec import EmbeddingFinetuneSpec
from .status import FinetuneStatus

# JSON-schema keywords a structural schema does not take, or that say nothing to a user.
_DROPPED = {"title", "additionalProperties", "propertyNames", "$defs"}

# (path of the object within spec, rule, message)
_CEL_RULES: list[tuple[tuple[str, ...], str, str]] = [
    (
        (),
        "(has(self.evaluation) && has(self.evaluation.enabled) && !self.evaluation.enabled) "
        "|| (has(self.data.heldOutFraction) != has(self.data.eval))",
        "data: set exactly one of `heldOutFraction` or `eval` when evaluation is enabled",
    ),
    (
        ("data",),
        "(has(self.train) && size(self.train) > 0) != has(self.huggingFace)",
        "set exactly one of `train` or `huggingFace`",
    ),
    (
        (),
        "!has(self.data.teacher) || (has(self.training) && has(self.training.distillation) && "
        "(!has(self.training.distillation.enabled) || self.training.distillation.enabled))",
        "data.teacher: its scores train only with training.distillation on",
    ),
    (("storage",), "self.uri.startsWith('s3://')", "uri: must be an s3:// URI; pods share nothing else"),
    (
        ("data",),
        "!has(self.train) || self.train.all(uri, uri.startsWith('s3://'))",
        "train: every entry must be an s3:// URI on a cluster",
    ),
    (("data",), "!has(self.eval) || self.eval.startsWith('s3://')", "eval: must be an s3:// URI on a cluster"),
    (
        ("evaluation",),
        "!has(self.gate) || !has(self.gate.metric) || "
        "int(self.gate.metric.split('@')[1]) in (has(self.kValues) ? self.kValues : [1, 10, 100])",
        "gate.metric: k must be one of kValues",
    ),
    (
        (),
        "!has(self.training) || !has(self.training.matryoshkaDims) || size(self.training.matryoshkaDims) == 0 "
        "|| !has(self.model.outputs) || !('colbert' in self.model.outputs)",
        "training.matryoshkaDims: FlagEmbedding's bge-m3 runner does not train Matryoshka dimensions",
    ),
    (
        (),
        "!has(self.training) || !has(self.training.unified) "
        "|| (has(self.model.outputs) && 'colbert' in self.model.outputs)",
        "training.unified: needs model.outputs [dense, sparse, colbert]",
    ),
]

_PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.training.step"},
    # `@` starts a filter in JSONPath; escaped, it is part of the key (checked with kubectl).
    {"name": "nDCG@10", "type": "number", "jsonPath": ".status.metrics.finetuned.ndcg\\@10"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def structural_schema(node: Any, definitions: dict[str, Any]) -> Any:
    """pydantic's JSON schema node as a Kubernetes structural schema node."""
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        resolved = definitions[node["$ref"].rsplit("/", 1)[-1]]
        return structural_schema({**resolved, **{k: v for k, v in node.items() if k != "$ref"}}, definitions)
    if "anyOf" in node:
        options = [option for option in node["anyOf"] if option.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"a structural schema cannot express anyOf {node['anyOf']}")
        merged = {**{k: v for k, v in node.items() if k != "anyOf"}, **options[0]}
        if merged.get("default", ...) is None:
            del merged["default"]
        return structural_schema(merged, definitions)
    result: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED:
            continue
        if key in ("exclusiveMinimum", "exclusiveMaximum"):
            # JSON Schema 2020-12 numbers -> OpenAPI v3.0 bound plus flag.
            result["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            result[key] = True
        elif key == "properties":
            result[key] = {name: structural_schema(prop, definitions) for name, prop in value.items()}
        elif key == "items":
            result[key] = structural_schema(value, definitions)
        elif key == "default" and isinstance(value, (dict, list)) and value:
            continue  # whole-section defaults are the model's; storing them would freeze today's values
        else:
            result[key] = value
    if result.get("type") == "object" and "properties" not in result:
        if isinstance(node.get("additionalProperties"), dict):
            result["additionalProperties"] = structural_schema(node["additionalProperties"], definitions)
        else:
            result["x-kubernetes-preserve-unknown-fields"] = True
    return result


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True)
    # a JSON round trip unshares what references shared, so the YAML needs no anchors
    return json.loads(json.dumps(structural_schema(raw, raw.get("$defs", {}))))


def spec_schema() -> dict[str, Any]:
    schema = model_schema(EmbeddingFinetuneSpec)
    for path, rule, message in _CEL_RULES:
        target = schema
        for part in path:
            target = target["properties"][part]
        target.setdefault("x-kubernetes-validations", []).append({"rule": rule, "message": message})
    return schema


def build_crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": [SHORT_NAME],
                "listKind": f"{KIND}List",
                "categories": ["ml"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": _PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "Fine-tunes a text-embedding model for retrieval, evaluates it, "
                            "and reports progress and metrics in its status.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": model_schema(FinetuneStatus),
                            },
                        }
                    },
                }
            ],
        },
    }


def crd_yaml() -> str:
    import yaml

    header = "# Generated from embedtune.operator.spec by `python -m embedtune.operator.crd`; do not edit.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=110)


if __name__ == "__main__":
    sys.stdout.write(crd_yaml())
