#!/usr/bin/env bash
# The GPU checks, in one run of under 8 minutes on one CUDA GPU; each prints its ratios last.
#   bash benchmarks/gpu.sh 2>&1 | tee gpu.log
# 1. speed.py compiled (regional gates), bfloat16, at a size that keeps the GPU busy;
# 2. a Hugging Face Llama, transformed through torch.export and compiled;
# 3. the quality benchmark's quick mode on the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
status=0
run() { echo; echo "\$ $*"; timeout "$LIMIT" "$@" || { echo "exit $? (limit ${LIMIT} s)"; status=1; }; }
LIMIT=240 run python benchmarks/speed.py --device cuda --dtype bfloat16 --modes compiled \
    --width 1024 --batch 32 --seq 512 --steps 10 --rounds 3 --schedule-steps 40
LIMIT=150 run python benchmarks/llama_speed.py --device cuda --dtype bfloat16 \
    --layers 16 --hidden 2048 --seq 1024 --batch 8 --steps 10 --rounds 3
LIMIT=90 run python benchmarks/quality.py --quick --device cuda --dtype bfloat16
exit $status
