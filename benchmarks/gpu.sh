#!/usr/bin/env bash
# The GPU checks, in one command, for the next time a GPU machine is lent (CI has none):
#   bash benchmarks/gpu.sh [PYTHON]
# PYTHON: a Python whose environment has saelab (pip install -e .), a CUDA build of torch,
# eai-sparsify (with triton) and sae-lens. Runs the tests marked gpu, the quickstart on the GPU
# (timed), and the training benchmark side by side on the GPU; results go to docs/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no GPU visible to torch"; print(torch.cuda.get_device_name(0))'
"$PY" -m pytest -m gpu -rs -q
OUT="${SAELAB_GPU_RUNS:-/tmp/saelab-gpu}"
rm -rf "$OUT" && mkdir -p "$OUT"
( cd "$OUT" && /usr/bin/time -v "$PY" -m saelab.cli quickstart --device cuda ) 2>&1 | tee docs/bench-quickstart-gpu-$(date +%F).log
STORE=$(ls -d "$OUT"/runs/stores/*/ | head -1)
"$PY" benchmarks/train.py --device cuda --data real --store "$STORE" --steps 60 --repeats 5 \
  --out docs/bench-train-gpu-$(date +%F).json
