"""info_nce vs the materialised PyTorch InfoNCE (forward + backward), MoCo-style bank and CLIP.

Cases (D = 128, tau = 0.2):
* moco: M queries against their keys and a bank of Q = 65,536 negatives,
  in_batch_negatives=False (MoCo, lightly's memory-bank NTXentLoss); key and bank detached,
  so the backward produces dL/dquery only.
* moco+batch: the same bank plus the in-batch keys as negatives (MoCLR with a queue).
* clip: symmetric, no bank (CLIP's two cross-entropies); gradients for both sides.

The reference (`info_nce_reference`) builds the (M, M + Q) logits as the libraries do. Time
is the median of forward + backward; peak memory is what one forward + backward adds (CUDA:
max_memory_allocated; CPU: the peak RSS of a fresh process). On a CPU the two implementations
are timed in interleaved rounds, so that other load on a shared machine hits them alike.
ratio = reference / op (above 1: the op is faster / leaner). CUDA OOM is reported as "OOM".
Writes JSON to bench/results/info_nce_<device>_<dtype>.json.

    .venv/bin/python bench/bench_info_nce.py                    # M = 4096, Q = 65,536
    .venv/bin/python bench/bench_info_nce.py --quick            # M = 1024, Q = 16,384
    .venv/bin/python bench/bench_info_nce.py --device cuda --dtype bfloat16
"""
import functools
import os
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))  # the repo root, for a source checkout
sys.path.insert(0, _HERE)

import torch  # noqa: E402

from _common import (bench_parser, cpu_peak_bytes, cuda_peak_bytes, fmt_bytes, fmt_ms, fmt_ratio,  # noqa: E402
                     machine_info, parse_bench_args, print_table, time_ms, write_json)
from sdclr_fast.ops.info_nce import info_nce  # noqa: E402
from sdclr_fast.ops.reference import info_nce_reference  # noqa: E402

TEMPERATURE = 0.2
# name: (keyword arguments, uses the bank, key requires grad)
CASES = {
    "moco": (dict(in_batch_negatives=False), True, False),
    "moco+batch": (dict(), True, False),
    "clip": (dict(symmetric=True), False, True),
}
IMPLS = {"op": info_nce, "ref": info_nce_reference}


def make_inputs(case, m, q, dim, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    _, bank, key_grad = CASES[case]
    query = torch.randn(m, dim, generator=g).to(device, dtype).requires_grad_()
    key = torch.randn(m, dim, generator=g).to(device, dtype).requires_grad_(key_grad)
    neg = torch.nn.functional.normalize(torch.randn(q, dim, generator=g), dim=1).to(
        device, dtype) if bank else None
    return query, key, neg


def step(impl, case, query, key, neg):
    loss = IMPLS[impl](query, key, TEMPERATURE, negatives=neg, **CASES[case][0])
    return torch.autograd.grad(loss, [t for t in (query, key) if t.requires_grad])


def _mem_setup(impl, case, m, q, dim, dtype):
    return impl, case, make_inputs(case, m, q, dim, dtype, "cpu")


def _mem_run(state):
    impl, case, tensors = state
    step(impl, case, *tensors)


def cpu_times(case, m, q, dim, dtype, rounds):
    """Median wall time (ms) of each implementation from interleaved rounds after one
    warm-up step each."""
    tensors = make_inputs(case, m, q, dim, dtype, "cpu")
    for impl in IMPLS:
        step(impl, case, *tensors)
    times = {i: [] for i in IMPLS}
    order = list(IMPLS)
    for r in range(rounds):
        for impl in order[r % 2:] + order[:r % 2]:
            t0 = time.perf_counter()
            step(impl, case, *tensors)
            times[impl].append((time.perf_counter() - t0) * 1e3)
    return {i: statistics.median(v) for i, v in times.items()}


def cuda_case(impl, case, m, q, dim, dtype, device, memory):
    tensors = make_inputs(case, m, q, dim, dtype, device)
    try:
        ms = time_ms(lambda: step(impl, case, *tensors), device)
        peak = cuda_peak_bytes(lambda: step(impl, case, *tensors), device) if memory else None
        return ms, peak
    except torch.OutOfMemoryError:
        return "OOM", None
    finally:
        del tensors
        torch.cuda.empty_cache()


def main():
    ap = bench_parser(__doc__, "M = 1024, Q = 16,384, three rounds",
                      "bench/results/info_nce_<device>_<dtype>.json")
    ap.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                    help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--m", type=int, default=None, help="rows M (default 4096; 1024 with --quick)")
    ap.add_argument("--bank", type=int, default=None,
                    help="negatives Q (default 65536; 16384 with --quick)")
    ap.add_argument("--cases", nargs="*", choices=list(CASES), default=list(CASES))
    ap.add_argument("--rounds", type=int, default=None, help="CPU timing rounds (default 5; 3 quick)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory columns")
    args = parse_bench_args(ap)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    m = args.m or (1024 if args.quick else 4096)
    q = args.bank if args.bank is not None else (16384 if args.quick else 65536)
    rounds = args.rounds or (3 if args.quick else 5)
    memory = not args.no_memory

    records, rows_out = [], []
    for case in args.cases:
        qc = q if CASES[case][1] else 0
        rec = {"case": case, "m": m, "bank": qc, "dim": args.dim}
        times = {} if cuda else cpu_times(case, m, qc, args.dim, dtype, rounds)
        for impl in IMPLS:
            if cuda:
                ms, peak = cuda_case(impl, case, m, qc, args.dim, dtype, device, memory)
            else:
                ms = times[impl]
                peak = cpu_peak_bytes(functools.partial(_mem_setup, impl, case, m, qc, args.dim,
                                                        dtype), _mem_run) if memory else None
            rec[f"{impl}_ms"], rec[f"{impl}_peak_bytes"] = ms, peak
        records.append(rec)
        row = {"case": case, "m": f"{m:,}", "bank": f"{qc:,}", "op_ms": fmt_ms(rec["op_ms"]),
               "ref_ms": fmt_ms(rec["ref_ms"]), "speed": fmt_ratio(rec["ref_ms"], rec["op_ms"])}
        if memory:
            row.update(op_mem=fmt_bytes(rec["op_peak_bytes"]),
                       ref_mem=fmt_bytes(rec["ref_peak_bytes"]),
                       mem_ratio=fmt_ratio(rec["ref_peak_bytes"], rec["op_peak_bytes"]))
        rows_out.append(row)
        print(f"{case} done", flush=True)

    columns = [("case", "case"), ("m", "M"), ("bank", "Q"), ("op_ms", "op ms"),
               ("ref_ms", "reference ms"), ("speed", "speed-up")]
    if memory:
        columns += [("op_mem", "op peak"), ("ref_mem", "reference peak"),
                    ("mem_ratio", "memory ratio")]
    print(f"\ninfo_nce forward + backward, D={args.dim}, {dtype}, tau={TEMPERATURE}, "
          f"device={device}")
    print_table(rows_out, columns)
    name = f"info_nce_{device.type}_{str(dtype).replace('torch.', '')}"
    write_json(name, {"bench": "info_nce", "machine": machine_info(device), "dtype": str(dtype),
                      "dim": args.dim, "temperature": TEMPERATURE, "results": records}, args.out)


if __name__ == "__main__":
    main()
