#!/usr/bin/env bash
# The GPU side of kvx, for a session that has a GPU. Steps:
#   tests    the Triton kernel tests and the ragged end-to-end test, compiled for the GPU;
#   kernels  `kvx bench kernels` on the GPU (bf16), 4K-64K keys;
#   e2e      `kvx bench e2e` on Llama-3-8B's shape with 4 layers, 32K-128K tokens, every policy (quantized
#            storage and its compositions too) vs dense;
#   all      the three in order (may pass one device call's 10 minutes: run the steps one per call).
# Needs torch, triton and transformers on the machine; kvx runs from this tree, no install.
#
# Usage: KVX_COMMIT=<commit> bash scripts/gpu_session.sh OUT_DIR [STEP] [LENGTHS]
#   KVX_COMMIT names the commit where the tree is a copy without .git (the rows are stamped with it).
# Then copy OUT_DIR/{kernels,e2e}-* into docs/benchmarks/ and commit them.
set -uo pipefail
out=${1:?usage: gpu_session.sh OUT_DIR [tests|kernels|e2e|all] [LENGTHS]}
step=${2:-all}
lengths=${3:-32k,64k,128k}
case "$step" in tests|kernels|e2e|all) ;; *) echo "unknown step '$step'; choose tests, kernels, e2e or all" >&2; exit 2;; esac
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
kvx() { python3 -m kvx.cli "$@"; }
policies="dense,snapkv:budget=2048,streaming_llm:sink=4,window=2044,h2o:budget=2048,tova:budget=2048"
policies+=",keyformer:budget=2048,knorm:budget=2048,pyramidkv:budget=2048,head_budget:budget=2048"
policies+=",int8,kivi:bits=4,kivi:bits=2,snapkv:budget=2048+kivi:bits=4,mikv:budget=2048"  # quantized (fused decode)

python3 - <<'PY' | tee "$out/versions.txt"
import torch, triton, transformers
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__,
      "| transformers", transformers.__version__)
PY
if [[ $step == tests || $step == all ]]; then
  python3 -m pytest -q -p no:cacheprovider tests/kernels tests/policies/test_head_budget.py 2>&1 | tee "$out/gpu-tests.log"
fi
if [[ $step == kernels || $step == all ]]; then
  kvx bench kernels --device cuda --lengths 4k,16k,64k --head-dims 64,128 --gqa 1,4,8 --repeats 10 --out "$out" --quiet
fi
if [[ $step == e2e || $step == all ]]; then
  kvx bench e2e --model llama3-8b --layers 4 --device cuda --lengths "$lengths" --new-tokens 64 --repeats 3 \
    --warmup 1 --chunk-size 8192 --out "$out" --quiet --policies "$policies"
fi
