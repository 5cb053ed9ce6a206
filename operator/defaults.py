"""What the operator fills in where a resource leaves it unset: the cluster's defaults.

A cluster's admin sets them once (the Helm chart's values), so manifests stay portable:
the trainer image, the S3 endpoint and the credentials Secret. `embedtune render` takes
the same flags, so it shows what the operator would create.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from .constants import DEFAULT_TRAINER_IMAGE
from .spec import EmbeddingFinetuneSpec


@dataclass(frozen=True)
class ClusterDefaults:
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    storage_endpoint: str | None = None
    storage_credentials_secret: str | None = None

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
        return cls(args.trainer_image, args.storage_endpoint, args.storage_credentials_secret)


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
