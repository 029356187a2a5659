#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one call that fits a 15-minute device lease (budget
# TOTAL_S, default 450 s, shared by the steps; each step gets what is left): build the
# extension for this GPU only, run the tests marked cuda (compiled Triton kernels,
# TRITON_INTERPRET=0; the CUDA no-sync tests, the pruning ops' CUDA error path), then every
# benchmark: bench_nt_xent (eager + CUDA-graph replay), bench_info_nce, bench_step (official /
# SimCLR / SDCLR, eager / compiled / compiled + CUDA graphs), bench_masked_conv,
# bench_masked_linear (ViT-S/B projections, 32x32-block and unstructured masks), bench_prune.
# Logs, each bench's JSON and one summary (summary.json + summary.md) go to OUTDIR.
#
#   bench/run_gpu.sh [--dry-run] [OUTDIR]     OUTDIR default: $OUT if set, else bench/results/gpu
#   env: PYTHON=python3 TESTS=1 TUNE=1 KTIME=1 BENCH=1 TOTAL_S=450
#        BENCHES="nt_xent info_nce step masked_conv masked_linear prune"
#   TUNE=1 (default): the masked-conv tuning sweep (TUNE_BUDGET s, default 90) and its rows
#   KTIME=1 (default): bench/kernel_report.py's workloads as timed rows (kernel_workloads_timed.md:
#   measured ms and TFLOP/s beside the static report's modelled figures; KTIME_ONLY picks them)
#
# --dry-run: the same steps on this machine's CPU with tiny sizes (no build, no nvidia-smi; the
# cuda-marked tests report as skipped), so that the script is known to run before a GPU call.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = --dry-run ]; then DRY=1; shift; fi
if [ -z "${PYTHON:-}" ] && [ $DRY = 1 ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
PY=${PYTHON:-python3}
OUTDIR=${1:-${OUT:-bench/results/gpu}}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(nproc)}
if [ $DRY = 1 ]; then export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""; else export TRITON_INTERPRET=0; fi
START=$(date +%s)
TOTAL=${TOTAL_S:-450}
STEPS="$OUTDIR/steps.tsv"
: >"$STEPS"
status=0

left() { echo $(( TOTAL - ($(date +%s) - START) )); }
# run NAME TIMEOUT_CAP CMD...: the command under min(cap, time left), logged to NAME.log, its
# exit status and wall time recorded for the summary
run() {
  local name=$1 cap=$2; shift 2
  local t=$(left); [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 10 ]; then
    printf '%s\tskipped (time budget)\t0\n' "$name" >>"$STEPS"; echo "== $name: skipped, budget spent"
    status=1; return
  fi
  echo "== $name (limit ${t}s, $(date +%T))"
  local t0=$(date +%s)
  timeout "$t" "$@" >"$OUTDIR/$name.log" 2>&1
  local rc=$?
  tail -25 "$OUTDIR/$name.log"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >>"$STEPS"
  [ $rc = 0 ] || status=1
}

if [ $DRY = 0 ]; then
  { nvidia-smi -L; $PY -c "import torch, triton; print('torch', torch.__version__, 'triton',
triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"; } \
    2>&1 | tee "$OUTDIR/device.log" || exit 1
  # Build for this GPU's architecture only: a fraction of the compile time of a fat binary.
  arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc) run build 240 \
    $PY -m pip install --no-build-isolation --no-deps --no-index -e .
  $PY -c "import torch, sdclr_fast.ops.prune; assert torch.ops.sdclr_fast.kth_abs_value.default.has_kernel_for_dispatch_key('CUDA'), 'no CUDA kernel'" \
    || { echo "the extension has no CUDA kernels"; exit 1; }
  DEV=cuda
else
  DEV=cpu
fi

if [ "${TESTS:-1}" = 1 ]; then
  # every test marked cuda (tests/test_prune.py's CUDA error path, the compiled kernels, the
  # no-sync tests of tests/test_compile_ops.py); in a dry run they report as skipped
  run tests 120 $PY -m pytest -q -p no:cacheprovider -rfEs -m cuda tests \
    $([ $DRY = 1 ] && echo "-n 0" || echo "-n 8")
fi

# ---- TUNE=1: the masked-conv tuning sweep, then its benchmark rows (block-sparse SDCLR).
# Alone in one call: TUNE_BUDGET=200 TESTS=0 KTIME=0 BENCH=0 bench/run_gpu.sh OUTDIR (about 7
# minutes). The sweep updates kernels/masked_conv_tuned.json (copied to OUTDIR: commit it) and
# starts no new shape after TUNE_BUDGET seconds (default 90 in the full run); untuned shapes
# stay on cuDNN.
if [ "${TUNE:-1}" = 1 ]; then
  if [ $DRY = 1 ]; then
    run tune_masked_conv 300 $PY bench/tune_masked_conv.py --dry-run --layers layer2.0.conv1 \
      --out "$OUTDIR/masked_conv_tuned.json"
    extra="--batch 2 --quick --layers layer2.0.conv1 --threads 2"
  else
    tb=${TUNE_BUDGET:-90}
    run tune_masked_conv $(( tb + 40 )) $PY bench/tune_masked_conv.py --budget-s "$tb"
    cp kernels/masked_conv_tuned.json "$OUTDIR/masked_conv_tuned.json"
    extra=
  fi
  run bench_masked_conv_block 150 $PY bench/bench_masked_conv.py --device $DEV --no-memory $extra \
    --out "$OUTDIR/masked_conv_block.json"
  extra=; [ $DRY = 1 ] && extra="--batch 2 --width 8 --reps 2 --threads 2"
  run bench_step_block 100 $PY bench/bench_step.py --device $DEV --quick $extra --out "$OUTDIR/step_block.json"
fi

# ---- KTIME=1: the static kernel report's workloads (bench/kernel_report.py), timed: anchors,
# nt_xent, info_nce, masked conv at 32x32 and coarser blocks (tuned configs where the sweep
# wrote them); no new workload after KTIME_BUDGET seconds (default 70)
if [ "${KTIME:-1}" = 1 ]; then
  if [ $DRY = 1 ]; then
    run kernel_workloads 200 $PY bench/kernel_report.py --time --device cpu --small \
      --only "${KTIME_ONLY:-anchor.*pointers|nt_xent.*4096.*bf16}" --out "$OUTDIR"
  else
    kb=${KTIME_BUDGET:-70}
    run kernel_workloads $(( kb + 40 )) $PY bench/kernel_report.py --time --device cuda --budget-s "$kb" \
      --only "${KTIME_ONLY:-anchor|nt_xent.*bf16|info_nce|masked_conv.*(layer2|layer3).conv}" --out "$OUTDIR"
  fi
fi

if [ "${BENCH:-1}" = 1 ]; then
  for b in ${BENCHES:-nt_xent info_nce step masked_conv masked_linear prune}; do
    args="--device $DEV --quick --out $OUTDIR/$b.json"
    # caps (s) sized for an H100/H200: step compiles five steps with Inductor (~30 s each)
    case $b in
      nt_xent) cap=50; [ $DRY = 1 ] && args="$args --rows 256 --no-memory --threads 2" ;;
      info_nce) cap=50; [ $DRY = 1 ] && args="$args --m 64 --bank 256 --no-memory --threads 2" ;;
      step) cap=200; args="$args --compile"
            [ $DRY = 1 ] && args="$args --batch 2 --width 8 --reps 2 --threads 2" ;;
      masked_conv) cap=50; [ $DRY = 1 ] && args="$args --batch 2 --no-memory --layers layer2.0.conv1 --threads 2" ;;
      # the speed goals' shapes (256 x 197 rows) and masks, and the ViT-S SDCLR step
      masked_linear) cap=120; args="$args --images 256 --layers vit_b.fc1 vit_b.fc2 vit_s.qkv vit_s.fc1 \
                       --cases unstructured0 unstructured0.9 block0.5 block0.9 --step"
            [ $DRY = 1 ] && args="$args --images 1 --layers vit_s.proj --cases block0.9 --threads 2" ;;
      prune) cap=40; [ $DRY = 1 ] && args="$args --no-memory --models resnet18 --threads 2" ;;
      *) cap=100 ;;
    esac
    [ $DRY = 1 ] && cap=$(( cap * ${DRY_CAP_SCALE:-4} ))  # a CPU compiles and runs slower
    run "bench_$b" $cap $PY bench/bench_$b.py $args
  done
fi

# one summary of what ran: each step's status and wall time, each bench's JSON
$PY - "$OUTDIR" "$DRY" "$START" <<'EOF'
import glob, json, os, sys, time
out, dry, start = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
steps = []
for line in open(os.path.join(out, "steps.tsv")):
    name, rc, wall = line.rstrip("\n").split("\t")
    steps.append({"step": name, "status": "ok" if rc == "0" else ("timeout" if rc in ("124", "137") else rc),
                  "wall_s": int(wall)})
benches = {}
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    if os.path.basename(path) != "summary.json":
        with open(path) as f:
            benches[os.path.basename(path)[:-5]] = json.load(f)
summary = {"dry_run": dry, "total_s": int(time.time()) - start, "steps": steps, "benches": benches}
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
md = [f"# run_gpu.sh summary{' (dry run on CPU)' if dry else ''}", "",
      f"total {summary['total_s']} s", "", "| step | status | wall s |", "| --- | --- | --- |"]
md += [f"| {s['step']} | {s['status']} | {s['wall_s']} |" for s in steps]
for name in benches:
    log = os.path.join(out, f"{name if name.startswith('bench_') else 'bench_' + name}.log")
    if os.path.exists(log):  # the bench's printed table, as it printed it
        table = [l for l in open(log).read().splitlines() if "|" in l or l.startswith(("nt_xent", "SDCLR", "batch", "CUDA"))]
        md += ["", f"## {name}", "", "```", *table, "```"]
timed = os.path.join(out, "kernel_workloads_timed.md")
if os.path.exists(timed):  # the kernel report's workloads, measured
    md += ["", "## kernel report workloads (measured)", "", open(timed).read()]
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("\n".join(md) + "\n")
print(f"wrote {out}/summary.json and {out}/summary.md")
EOF
exit $status
