#!/usr/bin/env bash
# The README's Fashion-MNIST-LT study (SimCLR vs SDCLR x 3 class permutations) at paper-like
# length on one CUDA GPU, in one call: the same command as on the CPU, with EPOCHS (default 200)
# epochs per cell, batch 512 at the paper's lr 0.5, bf16. The study is resumable, so a call cut
# by its time limit (LIMIT seconds, default 450) continues where it stopped when run again.
# Fashion-MNIST must be on the machine: SDCLR_FAST_FMNIST_DIR=<folder of the four IDX .gz files>
# (Debian's dataset-fashion-mnist puts them in /usr/share/datasets/fashion-mnist).
#
#   bench/run_gpu_study.sh [OUTDIR]   env: PYTHON=python3 EPOCHS=200 LIMIT=450 SPLITS="0 1 2"
#   bench/run_gpu_study.sh --dry-run  the same grid at 1 epoch on the CPU (checks the command)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
device=cuda epochs=${EPOCHS:-200} batch=512 lr=0.5 extra=()
if [ "${1:-}" = --dry-run ]; then
  shift; device=cpu epochs=1 batch=128 lr=0.125 extra=(--probe-epochs 1 --probe-per-class 20)
fi
OUT=${1:-bench/results/gpu-study}
mkdir -p "$OUT"
if [ "$device" = cuda ]; then
  # the extension for this GPU only, as bench/run_gpu.sh builds it
  arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || exit 1
  TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc) \
    $PY -m pip install --no-build-isolation --no-deps --no-index -e . >"$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; exit 1; }
fi
start=$(date +%s)
timeout "${LIMIT:-450}" $PY -m sdclr_fast study --run-dir "$OUT/study" --device $device \
  --dataset fashion-mnist-lt --image-size 16 --width 16 --batch-size $batch --lr $lr --warmup-epochs 10 \
  --epochs "$epochs" --methods simclr sdclr --splits ${SPLITS:-0 1 2} --no-progress --no-tensorboard \
  --title "SimCLR vs SDCLR on Fashion-MNIST-LT, $epochs epochs ($device)" "${extra[@]}" 2>&1 | tee "$OUT/study.log"
status=${PIPESTATUS[0]}
echo "study: $(( $(date +%s) - start )) s, exit status $status (124: time limit, run again to continue)" \
  | tee -a "$OUT/study.log"
exit "$status"
