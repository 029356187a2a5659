#!/usr/bin/env bash
# The Fashion-MNIST-LT study of docs/study.md (SimCLR vs SDCLR x 3 class permutations) at paper-like
# length on one CUDA GPU, in one call: the same command as on the CPU, with EPOCHS (default 200)
# epochs per cell, batch 512 at the paper's lr 0.5, bf16 autocast, and beside it an fp32 control
# (--no-amp --no-channels-last) of the same grid on FP32_SPLITS: bf16 is a deliberate difference
# from the official fp32 code, and the control shows whether it treats the 90 %-sparse branch like
# the dense one (compare SDCLR's minor group and std between OUTDIR/study and OUTDIR/study-fp32).
# Both studies are resumable, so a call cut by its time limits (LIMIT seconds for bf16, default
# 300; LIMIT_FP32 for the control, default 150) continues where it stopped when run again.
# Fashion-MNIST must be on the machine: SDCLR_FAST_FMNIST_DIR=<folder of the four IDX .gz files>
# (Debian's dataset-fashion-mnist puts them in /usr/share/datasets/fashion-mnist).
#
#   bench/run_gpu_study.sh [OUTDIR]   env: PYTHON=python3 EPOCHS=200 LIMIT=300 SPLITS="0 1 2"
#                                          LIMIT_FP32=150 FP32_SPLITS="0"
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
run_study() {  # run_study NAME LIMIT SPLITS [flags...]
  local name=$1 limit=$2 splits=$3; shift 3
  local start; start=$(date +%s)
  timeout "$limit" $PY -m sdclr_fast study --run-dir "$OUT/$name" --device $device \
    --dataset fashion-mnist-lt --image-size 16 --width 16 --batch-size $batch --lr $lr --warmup-epochs 10 \
    --epochs "$epochs" --methods simclr sdclr --splits $splits --no-progress --no-tensorboard \
    --title "SimCLR vs SDCLR on Fashion-MNIST-LT, $epochs epochs ($device, $name)" "${extra[@]}" "$@" 2>&1 \
    | tee "$OUT/$name.log"
  local status=${PIPESTATUS[0]}
  echo "$name: $(( $(date +%s) - start )) s, exit status $status (124: time limit, run again to continue)" \
    | tee -a "$OUT/$name.log"
  return "$status"
}
run_study study "${LIMIT:-300}" "${SPLITS:-0 1 2}"
status=$?
fp32=(--no-amp --no-channels-last)
[ "$device" = cpu ] && fp32=(--no-amp)  # the dry run: fp32 already; checks the flags
run_study study-fp32 "${LIMIT_FP32:-150}" "${FP32_SPLITS:-0}" "${fp32[@]}"
status_fp32=$?
echo "reports: $OUT/study/report.md (bf16) and $OUT/study-fp32/report.md (fp32 control)"
[ "$status" -ne 0 ] && exit "$status"
exit "$status_fp32"
