#!/usr/bin/env bash
# The GPU checks, in one run of about 10 minutes on one H200 (1500 steps); each prints its ratios last.
#   bash benchmarks/gpu.sh 2>&1 | tee gpu.log        (files go to $OUT, else benchmarks/out)
# 1. quality at a size nearer the paper's (issue 9): 12 layers, width 768, sequence 512, bfloat16,
#    compiled (regional gates); full, full model at 75% of the steps, RaPTr 6-8-10-12; one seed,
#    the three runs side by side on the one GPU (their wall times are shared, their losses are not);
#    the corpus is the installed transformers package's sources (~50 MB; the standard library's
#    4 MB would be seen many times over);
# 2. speed.py compiled (regional gates), bfloat16, alone on the GPU: overhead, k/ideal, RaPTr/full,
#    and the width case (f = 0.5, 0.75 against the ideal line, f = 1 overhead, freezing cost);
# 3. profile_step.py: torch.profiler summary of one all-on and one half-on compiled step (top kernels,
#    host time between them), regional then cond gates;
#    (benchmarks/instructions.py, the instruction counts, is CPU-only: valgrind runs no CUDA, so not here);
# 4. width-wise RaPTr at width 768 (issue 14): WidthRaPTr and RaPTr x width against full-short, one
#    seed, the same settings as 1 (GPU_WIDTH_QUALITY=0 skips it).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DEST="${OUT:-benchmarks/out}"
mkdir -p "$DEST"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
status=0
run() { echo; echo "\$ $*"; timeout "$LIMIT" "$@" || { echo "exit $? (limit ${LIMIT} s)"; status=1; }; }
CORPUS="$(python -c 'import os, transformers; print(os.path.dirname(transformers.__file__))')"
LIMIT=330 run python benchmarks/quality.py --device cuda --dtype bfloat16 --compile --verbose \
    --corpus "$CORPUS" --width 768 --seq 512 --batch 32 --steps "${GPU_QUALITY_STEPS:-1500}" \
    --methods full,full-short,raptr --lr 1e-3 --jobs 3 --threads 4 --eval-every 250 --eval-batches 10 \
    --results "$DEST/quality_gpu.jsonl"
cp benchmarks/out/quality_A.md "$DEST/quality_gpu.md" 2>/dev/null
cp benchmarks/out/quality_A.png "$DEST/quality_gpu.png" 2>/dev/null
LIMIT=240 run python benchmarks/speed.py --device cuda --dtype bfloat16 --modes compiled \
    --width 1024 --batch 32 --seq 512 --steps 4 --rounds 8 --schedule-steps 40
for mode in regional cond; do
  LIMIT=120 run python benchmarks/profile_step.py --device cuda --dtype bfloat16 --width 1024 --batch 32 --seq 512 \
      --compile-mode "$mode"
done
if [ "${GPU_WIDTH_QUALITY:-1}" != 0 ]; then
  LIMIT=330 run python benchmarks/quality.py --device cuda --dtype bfloat16 --compile --verbose \
      --corpus "$CORPUS" --width 768 --seq 512 --batch 32 --steps "${GPU_QUALITY_STEPS:-1500}" \
      --methods width,depth-width --lr 1e-3 --jobs 2 --threads 4 --eval-every 250 --eval-batches 10 \
      --results "$DEST/quality_gpu.jsonl"
  cp benchmarks/out/quality_A.md "$DEST/quality_gpu_width.md" 2>/dev/null
fi
exit $status
