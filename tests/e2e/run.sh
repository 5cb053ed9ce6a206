#!/usr/bin/env bash
# The kind end-to-end suite: needs docker (running), kind, kubectl and helm on PATH, and the
# project installed (`pip install -e ".[all]"`). Creates and deletes its own kind cluster.
# Keep the cluster for debugging with E2E_KEEP_CLUSTER=1.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python -m pytest tests/e2e -v -p no:cacheprovider --timeout 3600 "$@"
