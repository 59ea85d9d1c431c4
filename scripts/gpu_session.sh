#!/usr/bin/env bash
# The GPU side of kvx in one command, for a session that has a GPU:
#   1. the Triton kernel tests and the ragged end-to-end test, compiled for the GPU (no interpreter);
#   2. `kvx bench kernels` on the GPU (bf16);
#   3. `kvx bench e2e` on Llama-3-8B's shape with 4 layers, 32K-128K tokens, every policy vs dense.
# Needs torch, triton and transformers on the machine (kvx itself runs from this tree, no install).
#
# Usage: KVX_COMMIT=<commit> bash scripts/gpu_session.sh OUT_DIR [LENGTHS]   (KVX_COMMIT where the tree has no .git)
# then copy OUT_DIR/{kernels,e2e}-* into docs/benchmarks/ and commit them with the logs' summary.
set -uo pipefail
out=${1:?usage: gpu_session.sh OUT_DIR [LENGTHS]}
lengths=${2:-32k,64k,128k}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
kvx() { python3 -m kvx.cli "$@"; }

python3 - <<'PY' | tee "$out/versions.txt"
import torch, triton, transformers
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__,
      "| transformers", transformers.__version__)
PY
python3 -m pytest -q -p no:cacheprovider tests/kernels tests/policies/test_head_budget.py 2>&1 | tee "$out/gpu-tests.log"
kvx bench kernels --device cuda --lengths 4k,16k,64k --head-dims 64,128 --gqa 1,4,8 --repeats 10 \
  --out "$out" --quiet 2>&1 | tail -n 5
kvx bench e2e --model llama3-8b --layers 4 --device cuda --lengths "$lengths" --new-tokens 64 --repeats 3 \
  --warmup 1 --chunk-size 8192 --out "$out" --quiet \
  --policies "dense,snapkv:budget=2048,streaming_llm:sink=4;window=2044,h2o:budget=2048,tova:budget=2048,keyformer:budget=2048,knorm:budget=2048,pyramidkv:budget=2048,head_budget:budget=2048" \
  2>&1 | tail -n 5
