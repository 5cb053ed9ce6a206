#!/usr/bin/env bash
# The GPU throughput benchmark in one call on a GPU machine that has python3 with torch,
# transformers, sentence-transformers and tokenizers, but no package index:
#
#   bash benchmarks/gpu_throughput.sh prepare   # here: wheels of what that machine lacks -> benchmarks/wheels/
#   bash benchmarks/gpu_throughput.sh run       # there (carry benchmarks/wheels): installs them aside, runs
#                                               # benchmarks/gpu_throughput.py --size base, JSON to $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=benchmarks/wheels
# the trainer's imports that a CUDA image with PyTorch and Hugging Face's libraries lacks (cp312, x86-64)
# wheels built for one Python (pydantic_core, multiprocess) are fetched for the machine's 3.12
BINARY=(pydantic_core==2.50.5 multiprocess==0.70.19)
PURE=(FlagEmbedding==1.4.2 datasets==5.2.0 dill==0.4.1 pydantic==2.14.4
      annotated-types==0.8.0 typing-inspection==0.4.5 boto3==1.44.18 botocore==1.44.18 s3transfer==0.19.3
      jmespath==1.1.0)

case "${1:-run}" in
prepare)
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d "$WHEELS" "${BINARY[@]}"
  python3 -m pip wheel -q --no-deps -w "$WHEELS" "${PURE[@]}" .
  du -sh "$WHEELS"
  ;;
run)
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --target "$site" "$WHEELS"/*.whl
  export PYTHONPATH="$site" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  out="${OUT:-benchmarks/results}"
  timeout 500 python3 benchmarks/gpu_throughput.py --size base --out "$out" 2>&1 | tee "$out/gpu_throughput.log"
  ;;
*)
  echo "usage: $0 prepare|run" >&2
  exit 2
  ;;
esac
