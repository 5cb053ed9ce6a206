"""What the operator fills in where a resource leaves it unset, and what it allows: the
cluster's defaults and policy.

A cluster's admin sets them once (the Helm chart's values), so manifests stay portable:
the trainer image, the S3 endpoint and the credentials Secret. Whoever may create an
EmbeddingFinetune chooses the image its pods run, the Secret they read and their priority;
the policy limits those to what the admin lists (docs/cluster.md). `embedtune render` takes
the same flags, so it shows what the operator would create.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from .constants import DEFAULT_TRAINER_IMAGE
from .spec import EmbeddingFinetuneSpec


@dataclass(frozen=True)
class ClusterPolicy:
    """What a resource may ask for; an empty list allows anything."""

    allowed_image_prefixes: tuple[str, ...] = ()
    allowed_credentials_secrets: tuple[str, ...] = ()
    allowed_priority_classes: tuple[str, ...] = ()

    def problems(self, spec: EmbeddingFinetuneSpec) -> list[str]:
        """`spec.path: reason` for every setting the policy refuses (after the defaults apply)."""
        problems = []
        image = spec.resources.image
        if self.allowed_image_prefixes and not any(image.startswith(p) for p in self.allowed_image_prefixes):
            problems.append(
                _refused("spec.resources.image", image, "images starting with", self.allowed_image_prefixes)
            )
        secret = spec.storage.credentials_secret
        if self.allowed_credentials_secrets and secret is not None and secret not in self.allowed_credentials_secrets:
            problems.append(
                _refused("spec.storage.credentialsSecret", secret, "the Secrets", self.allowed_credentials_secrets)
            )
        priority = spec.resources.priority_class_name
        if self.allowed_priority_classes and priority is not None and priority not in self.allowed_priority_classes:
            problems.append(
                _refused("spec.resources.priorityClassName", priority, "the classes", self.allowed_priority_classes)
            )
        return problems


def _refused(path: str, value: str, what: str, allowed: tuple[str, ...]) -> str:
    return (
        f"{path}: {value!r} is not allowed on this cluster; it allows {what} {', '.join(allowed)} "
        "(the operator's policy, set by the cluster's admin)"
    )


@dataclass(frozen=True)
class ClusterDefaults:
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    storage_endpoint: str | None = None
    storage_credentials_secret: str | None = None
    policy: ClusterPolicy = field(default_factory=ClusterPolicy)

    def apply(self, spec: EmbeddingFinetuneSpec) -> EmbeddingFinetuneSpec:
        """The spec with every unset defaulted field filled in; what the resource sets wins."""
        storage = spec.storage.model_copy(
            update={
                "endpoint": spec.storage.endpoint or self.storage_endpoint,
                "credentials_secret": spec.storage.credentials_secret or self.storage_credentials_secret,
            }
        )
        resources = spec.resources.model_copy(update={"image": spec.resources.image or self.trainer_image})
        return spec.model_copy(update={"storage": storage, "resources": resources})

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ClusterDefaults:
        policy = ClusterPolicy(
            tuple(args.allowed_image_prefix), tuple(args.allowed_credentials_secret), tuple(args.allowed_priority_class)
        )
        return cls(args.trainer_image, args.storage_endpoint, args.storage_credentials_secret, policy)


def add_default_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trainer-image",
        default=DEFAULT_TRAINER_IMAGE,
        help=f"image of the jobs when spec.resources.image is unset (default: {DEFAULT_TRAINER_IMAGE})",
    )
    parser.add_argument(
        "--storage-endpoint",
        default=None,
        metavar="URL",
        help="S3 endpoint when spec.storage.endpoint is unset (default: AWS)",
    )
    parser.add_argument(
        "--storage-credentials-secret",
        default=None,
        metavar="SECRET",
        help="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY when "
        "spec.storage.credentialsSecret is unset (default: none, the pods' service account)",
    )
    policy = parser.add_argument_group(
        "policy", "What a resource may ask for (repeatable flags; none given: anything): a refused run fails"
    )
    policy.add_argument("--allowed-image-prefix", action="append", default=[], metavar="PREFIX")
    policy.add_argument("--allowed-credentials-secret", action="append", default=[], metavar="SECRET")
    policy.add_argument("--allowed-priority-class", action="append", default=[], metavar="CLASS")
