"""nt_xent vs the materialised PyTorch NT-Xent, forward + backward, for 2N = 512 .. 65,536.

Two references, measured in the same run: SDCLR's own formulation (`nt_xent_reference`: full
2N x 2N matrix, masked log-sum-exp) and the cross-entropy formulation most libraries use
(`nt_xent_cross_entropy_reference`). Time is the median of forward + backward (dz1, dz2); peak
memory is what one forward + backward adds (CUDA: max_memory_allocated; CPU: the peak RSS of a
fresh process). On a CPU the implementations are timed in interleaved rounds, so that other
load on a shared machine hits them alike. ratio = reference / op (above 1: the op is faster / leaner). A reference that
would not fit (CPU: estimated above --max-ref-gib) is skipped, and its memory is extrapolated
from the largest measured size as M^2 (marked "~"); CUDA OOM is reported as "OOM".
On CUDA each implementation is also timed as a CUDA-graph replay of the same forward +
backward ("graph ms": the kernels' time without the host). Writes JSON to
bench/results/nt_xent_<device>_<dtype>.json.

    .venv/bin/python bench/bench_nt_xent.py                          # CPU: 2N = 512 .. 32768
    .venv/bin/python bench/bench_nt_xent.py --quick                  # 2N = 512 .. 4096
    .venv/bin/python bench/bench_nt_xent.py --threads 1              # steadier on a busy CPU
    .venv/bin/python bench/bench_nt_xent.py --device cuda --dtype bfloat16
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
from sdclr_fast.ops.nt_xent import nt_xent  # noqa: E402
from sdclr_fast.ops.reference import (nt_xent_cross_entropy_reference,  # noqa: E402
                                      nt_xent_reference)

IMPLS = {
    "op": lambda z1, z2, t: nt_xent(z1, z2, t),
    "sdclr_ref": lambda z1, z2, t: nt_xent_reference(z1, z2, t),
    "ce_ref": lambda z1, z2, t: nt_xent_cross_entropy_reference(z1, z2, t),
}
TEMPERATURE = 0.2


def make_inputs(rows, dim, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = rows // 2
    z1 = torch.randn(n, dim, generator=g).to(device, dtype).requires_grad_()
    z2 = torch.randn(n, dim, generator=g).to(device, dtype).requires_grad_()
    return z1, z2


def step(impl, z1, z2):
    loss = IMPLS[impl](z1, z2, TEMPERATURE)
    return torch.autograd.grad(loss, (z1, z2))


def _mem_setup(impl, rows, dim, dtype):
    return impl, make_inputs(rows, dim, dtype, "cpu")


def _mem_run(state):
    impl, (z1, z2) = state
    step(impl, z1, z2)


def ref_bytes_estimate(rows, dtype):
    """Peak of the materialised references: about eight live (2N, 2N) buffers (scores, masked
    scores, softmax, gradients, the dense index-backward); 2N = 2048 fp32 measures 132 MiB."""
    return 8 * rows * rows * torch.tensor([], dtype=dtype).element_size()


def cuda_case(impl, rows, dim, dtype, device, memory):
    """do_bench time and max_memory_allocated of one implementation ("OOM" if it does not
    fit)."""
    z1, z2 = make_inputs(rows, dim, dtype, device)
    try:
        ms = time_ms(lambda: step(impl, z1, z2), device)
        peak = cuda_peak_bytes(lambda: step(impl, z1, z2), device) if memory else None
        return ms, peak
    except torch.OutOfMemoryError:
        return "OOM", None
    finally:
        del z1, z2
        torch.cuda.empty_cache()


def cuda_graph_ms(impl, rows, dim, dtype, device):
    """Forward + backward captured once in a CUDA graph and timed by replay: the kernels' time
    without the host ("OOM" if it does not fit, "n/a" if the capture fails)."""
    z1, z2 = make_inputs(rows, dim, dtype, device)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (kernel compilation, cached constants)
            for _ in range(3):
                step(impl, z1, z2)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(impl, z1, z2)
        return time_ms(graph.replay, device)
    except torch.OutOfMemoryError:
        return "OOM"
    except RuntimeError as e:  # a capture error: report it, keep the other rows
        print(f"CUDA-graph capture of {impl} at 2N={rows} failed: {str(e).splitlines()[0]}")
        return "n/a"
    finally:
        del z1, z2
        torch.cuda.empty_cache()


def cpu_times(impls, rows, dim, dtype, quick, time_cap_s):
    """Median wall time per implementation from interleaved rounds (each round runs every
    implementation once, in rotating order), so that load from other processes on a shared
    CPU hits all of them alike. The first round is the warm-up; an implementation slower than
    time_cap_s there is timed by that one step only."""
    z1, z2 = make_inputs(rows, dim, dtype, "cpu")
    first = {}
    for impl in impls:
        t0 = time.perf_counter()
        step(impl, z1, z2)
        first[impl] = time.perf_counter() - t0
    active = [i for i in impls if first[i] <= time_cap_s]
    rounds = 3 if quick else max(3, min(10, int(60 / max(sum(first[i] for i in active), 1e-3))))
    times = {i: [] for i in impls}
    for r in range(rounds if active else 0):
        for k in range(len(active)):
            impl = active[(r + k) % len(active)]
            t0 = time.perf_counter()
            step(impl, z1, z2)
            times[impl].append((time.perf_counter() - t0) * 1e3)
    return {i: statistics.median(times[i]) if times[i] else first[i] * 1e3 for i in impls}


def main():
    ap = bench_parser(__doc__, "2N <= 4096, few repetitions", "bench/results/nt_xent_<device>_<dtype>.json")
    ap.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                    help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--rows", type=int, nargs="*", help="2N values (default 512 .. 65536)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory columns")
    ap.add_argument("--max-ref-gib", type=float, default=9.0,
                    help="CPU: skip a reference whose estimated peak exceeds this")
    ap.add_argument("--time-cap-s", type=float, default=60.0,
                    help="CPU: stop timing an implementation after one step slower than this")
    args = parse_bench_args(ap)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    if args.rows:
        sizes = args.rows
    elif args.quick:
        sizes = [512, 1024, 2048, 4096]
    else:
        sizes = [512, 1024, 2048, 4096, 8192, 16384, 32768] + ([65536] if cuda else [])
    memory = not args.no_memory

    rows_out, records = [], []
    slow = set()
    last_ref_peak = {}
    for rows in sizes:
        rec = {"rows": rows, "dim": args.dim}
        run = [i for i in IMPLS if i == "op" or cuda or (
            i not in slow and ref_bytes_estimate(rows, dtype) <= args.max_ref_gib * 2 ** 30)]
        times = {} if cuda else cpu_times(run, rows, args.dim, dtype, args.quick, args.time_cap_s)
        for impl in IMPLS:
            ms = peak = None
            est = False
            if impl not in run:
                ms = "skipped"
                if impl in last_ref_peak and memory:
                    r0, p0 = last_ref_peak[impl]
                    peak, est = p0 * (rows / r0) ** 2, True
            elif cuda:
                ms, peak = cuda_case(impl, rows, args.dim, dtype, device, memory)
            else:
                ms = times[impl]
                if ms > args.time_cap_s * 1e3:
                    slow.add(impl)
                if memory:
                    peak = cpu_peak_bytes(
                        functools.partial(_mem_setup, impl, rows, args.dim, dtype), _mem_run)
            if impl != "op" and isinstance(peak, (int, float)) and not est:
                last_ref_peak[impl] = (rows, peak)
            rec[f"{impl}_ms"] = ms
            if cuda:  # the same step replayed as a CUDA graph (kernel time without the host)
                rec[f"{impl}_graph_ms"] = cuda_graph_ms(impl, rows, args.dim, dtype, device)
            rec[f"{impl}_peak_bytes"] = peak
            rec[f"{impl}_peak_estimated"] = est
        records.append(rec)
        row = {"rows": rows, "op_ms": fmt_ms(rec["op_ms"])}
        for ref in ("sdclr_ref", "ce_ref"):
            row[f"{ref}_ms"] = fmt_ms(rec[f"{ref}_ms"])
            row[f"{ref}_speed"] = fmt_ratio(rec[f"{ref}_ms"], rec["op_ms"])
        if cuda:
            row["op_graph_ms"] = fmt_ms(rec["op_graph_ms"])
            for ref in ("sdclr_ref", "ce_ref"):
                row[f"{ref}_graph_ms"] = fmt_ms(rec[f"{ref}_graph_ms"])
                row[f"{ref}_graph_speed"] = fmt_ratio(rec[f"{ref}_graph_ms"], rec["op_graph_ms"])
        if memory:
            row["op_mem"] = fmt_bytes(rec["op_peak_bytes"])
            for ref in ("sdclr_ref", "ce_ref"):
                p = rec[f"{ref}_peak_bytes"]
                mark = "~" if rec[f"{ref}_peak_estimated"] else ""
                row[f"{ref}_mem"] = mark + fmt_bytes(p) if p is not None else "-"
                row[f"{ref}_mem_ratio"] = mark + fmt_ratio(p, rec["op_peak_bytes"])
        rows_out.append(row)
        print(f"2N={rows} done", flush=True)

    columns = [("rows", "2N"), ("op_ms", "op ms"), ("sdclr_ref_ms", "sdclr-ref ms"),
               ("sdclr_ref_speed", "speedup"), ("ce_ref_ms", "ce-ref ms"),
               ("ce_ref_speed", "speedup")]
    if cuda:
        columns += [("op_graph_ms", "op graph ms"), ("sdclr_ref_graph_ms", "sdclr-ref graph ms"),
                    ("sdclr_ref_graph_speed", "speedup"), ("ce_ref_graph_ms", "ce-ref graph ms"),
                    ("ce_ref_graph_speed", "speedup")]
    if memory:
        columns += [("op_mem", "op peak"), ("sdclr_ref_mem", "sdclr-ref peak"),
                    ("sdclr_ref_mem_ratio", "mem ratio"), ("ce_ref_mem", "ce-ref peak"),
                    ("ce_ref_mem_ratio", "mem ratio")]
    print(f"\nnt_xent forward + backward, D={args.dim}, {dtype}, tau={TEMPERATURE}, "
          f"device={device}")
    print_table(rows_out, columns)
    if not cuda:
        print("CUDA-graph replay rows (kernel time without the host) need CUDA: not measured here")
    name = f"nt_xent_{device.type}_{str(dtype).replace('torch.', '')}"
    write_json(name, {"bench": "nt_xent", "machine": machine_info(device), "dtype": str(dtype),
                      "dim": args.dim, "temperature": TEMPERATURE, "results": records},
               args.out)


if __name__ == "__main__":
    main()
