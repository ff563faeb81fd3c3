#!/usr/bin/env bash
# The GPU measurement of bench/README.md ("Targets on a GPU") in one call: fp16, full-size SDXL, 1024²,
# batch 1 (unet and extension paths: the ratios and PAG's host-side overhead) and batch 4 (unet path).
#   bash bench/gpu.sh             # on a machine with CUDA (PYTHON=... to pick the interpreter)
#   bash bench/gpu.sh --dry-run   # anywhere: tiny widths, one step each, on the CPU without CUDA
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
COMMON=(--device cuda --fp16 --full-sdxl --models sdxl --layers mid,up mid)
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
echo "== batch 1: unet and extension paths"
"$PY" bench/step_ratio.py "${COMMON[@]}" --path unet,extension --batch 1 "$@"
echo "== batch 4: unet path"
"$PY" bench/step_ratio.py "${COMMON[@]}" --path unet --batch 4 "$@"
