"""`embedtune operator`: kopf's runtime with our handlers, a liveness endpoint and metrics."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .defaults import add_default_arguments

    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        metavar="NAMESPACE",
        help="serve only this namespace (repeatable; globs such as 'ml-*' allowed)",
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="serve every namespace (the default)")
    add_default_arguments(parser)
    parser.add_argument(
        "--liveness-port",
        type=int,
        default=8080,
        help="serve http://0.0.0.0:PORT/healthz for the liveness probe (default: 8080; 0 disables)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=9090,
        help="serve Prometheus metrics on this port (default: 9090; 0 disables)",
    )
    parser.add_argument(
        "--peering",
        metavar="NAME",
        default=None,
        help="join kopf peering through this (Cluster)KopfPeering object: an operator of higher "
        "priority pauses this one (default: standalone)",
    )


def run_operator(args: argparse.Namespace) -> int:
    import kopf
    import prometheus_client

    from . import handlers  # noqa: F401  (registers the handlers with kopf)
    from .defaults import ClusterDefaults

    if args.metrics_port:
        prometheus_client.start_http_server(args.metrics_port)
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=args.peering is None,
        peering_name=args.peering,
        liveness_endpoint=f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None,
        memo=kopf.Memo(defaults=ClusterDefaults.from_args(args)),
    )
    return 0
