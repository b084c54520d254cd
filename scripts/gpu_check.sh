#!/usr/bin/env bash
# The checks a session lent a CUDA GPU runs, in one go: `pytest -m gpu`, then scripts/bench_sample.py
# (images per second at SD-1.4 size, batch 1 and 8) and scripts/bench_apply.py (1000 artists erased,
# 734 preserved, the published run's size) on the GPU. Every log goes to OUTDIR.
# Usage, with uce's dependencies importable: bash scripts/gpu_check.sh OUTDIR
set -uo pipefail
out=${1:?usage: bash scripts/gpu_check.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, diffusers, transformers, accelerate; print('torch', torch.__version__, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__)" | tee -a "$out/gpu.txt"
# LPIPS/FID need torchvision's AlexNet and Inception weights, downloaded at first use: deselected
# where the machine cannot download them.
timeout 240 python3 -m pytest -q -m gpu -k "not lpips" -p no:cacheprovider 2>&1 | tee "$out/pytest_gpu.log"
timeout 300 python3 scripts/bench_sample.py --device cuda --images 16 --steps 25 --processes 1 \
  --work "$work" 2>&1 | tee "$out/bench_sample.log"
timeout 200 python3 scripts/bench_sample.py --device cuda --images 32 --steps 25 --processes 1 \
  --batch-size 8 --model "$work/sd14-random-v1" --work "$work/b8" 2>&1 | tee -a "$out/bench_sample.log"
timeout 400 python3 scripts/bench_apply.py --erase 1000 --preserve 734 --naive-layers 0 \
  --formats delta --device cuda --work "$work" 2>&1 | tee "$out/bench_apply.log"
