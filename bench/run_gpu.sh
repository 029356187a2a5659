#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one go, for a machine whose Python already holds CUDA
# torch and triton (the Makefile's .venv is the CPU build): build the extension against that
# torch for this GPU only, run the tests with compiled Triton kernels (TRITON_INTERPRET=0),
# then every benchmark on the GPU. Logs and JSON go to OUTDIR (default bench/results/gpu).
#
#   bench/run_gpu.sh [OUTDIR]   env: PYTHON=python3 TESTS=1 BENCH=1 QUICK=0 BENCHES="nt_xent ..."
# The data and DnC tests also need kornia in that Python.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-bench/results/gpu}
mkdir -p "$OUT"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
status=0

{ nvidia-smi -L; $PY -c "import torch, triton; print('torch', torch.__version__, 'triton',
triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"; } \
  2>&1 | tee "$OUT/build.log" || exit 1

# Build for this GPU's architecture only: a fraction of the compile time of a fat binary.
arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
echo "== build (sm ${arch})"
TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc) \
  $PY -m pip install --no-build-isolation --no-deps --no-index -e . >>"$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
$PY -c "import torch, sdclr_fast.ops.prune; assert torch.ops.sdclr_fast.kth_abs_value.default.has_kernel_for_dispatch_key('CUDA'), 'no CUDA kernel'" \
  || exit 1

if [ "${TESTS:-1}" = 1 ]; then
  echo "== tests on the GPU ($(date +%T))"
  # The masked-conv and module tests run whole on the GPU; elsewhere the tests marked cuda.
  timeout 240 $PY -m pytest -q -n 6 -p no:cacheprovider -rfEs \
      tests/test_masked_conv.py tests/test_nn.py 2>&1 | tee "$OUT/tests.log" || status=1
  timeout 150 $PY -m pytest -q -n 4 -p no:cacheprovider -rfEs -m cuda tests \
      --ignore tests/test_masked_conv.py --ignore tests/test_nn.py 2>&1 \
      | tee -a "$OUT/tests.log" || status=1
fi

if [ "${BENCH:-1}" = 1 ]; then
  q=; [ "${QUICK:-0}" = 1 ] && q=--quick
  for b in ${BENCHES:-nt_xent step masked_conv prune}; do
    echo "== bench_$b ($(date +%T))" | tee -a "$OUT/bench.log"
    extra=; [ "$b" = step ] && extra=--compile
    timeout ${BENCH_TIMEOUT:-300} $PY bench/bench_$b.py --device cuda $q $extra --out "$OUT/$b.json" 2>&1 \
      | tee -a "$OUT/bench.log" || status=1
  done
fi
exit $status
