"""Shared timing, memory and reporting helpers for the scripts in bench/.

Every script measures the op and its plain-PyTorch reference in the same run and reports the
ratio reference / op (above 1 means the op is faster or leaner).
"""
import argparse
import gc
import json
import multiprocessing as mp
import os
import statistics
import time

import torch


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def set_threads(n):
    """Use n torch CPU threads here and in the fresh processes of cpu_peak_bytes (they read
    OMP_NUM_THREADS when torch starts)."""
    if n:
        torch.set_num_threads(n)
        os.environ["OMP_NUM_THREADS"] = str(n)


def bench_parser(doc, quick_help, out_default):
    """The arguments every bench script takes (`sdclr-fast bench` passes --quick and --device to
    each): --device, --quick, --threads, --out. Add the script's own arguments to the returned
    parser and read it with parse_bench_args()."""
    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu or cuda (default cuda when available)")
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default torch's; 1 measures steadier on a shared machine)")
    ap.add_argument("--out", default=None, help=f"JSON path (default {out_default})")
    return ap


def parse_bench_args(ap, argv=None):
    """Parse, then apply --threads (before anything is timed)."""
    args = ap.parse_args(argv)
    set_threads(args.threads)
    return args


def time_ms(fn, device="cpu", warmup=2, reps=10):
    """Median wall time of fn() in milliseconds; triton.testing.do_bench on CUDA."""
    if torch.device(device).type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cuda_peak_bytes(fn, device):
    """Peak memory allocated while fn() runs, above what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _status_bytes(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _child(queue, setup, run):
    try:
        state = setup()
        gc.collect()
        # Reset the peak-RSS mark so that temporaries of setup() cannot hide what run() adds
        # (ru_maxrss could not even be reset, and a spawned child inherits the parent's).
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_bytes("VmRSS")
        run(state)
        queue.put(("ok", _status_bytes("VmHWM") - before))
    except Exception as exc:  # report, don't hang the parent
        queue.put(("error", repr(exc)))


def cpu_peak_bytes(setup, run):
    """Peak resident memory that run(setup()) adds, measured in a fresh process so that earlier
    cases cannot hide it. `setup` and `run` must be picklable (module-level functions or
    functools.partial of them)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, setup, run))
    proc.start()
    while True:  # a child that dies without reporting must not hang the bench
        try:
            status, value = queue.get(timeout=1.0)
            break
        except Exception:
            if not proc.is_alive():
                status, value = "error", f"child exited with code {proc.exitcode}"
                break
    proc.join()
    if status != "ok":
        raise RuntimeError(f"memory measurement failed: {value}")
    return value


def fmt_ms(v):
    """A time in ms to two decimals, or the status a case ended with ("OOM", None -> "-")."""
    return f"{v:.2f}" if isinstance(v, float) else (v or "-")


def fmt_ratio(ref, op):
    """ref / op as "1.23x" (above 1: the op is faster or leaner); "-" where either is missing."""
    if isinstance(ref, (int, float)) and isinstance(op, (int, float)) and op > 0:
        return f"{ref / op:.2f}x"
    return "-"


def fmt_bytes(n):
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def print_table(rows, columns):
    """rows: list of dicts; columns: list of (key, header)."""
    cells = [[str(r.get(k, "")) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h)
              for i, (_, h) in enumerate(columns)]
    line = " | ".join(h.ljust(w) for (_, h), w in zip(columns, widths))
    print(line)
    print("-+-".join("-" * w for w in widths))
    for c in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(c, widths)))


def machine_info(device):
    info = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads()}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu_count"] = os.cpu_count()
    return info


def write_json(name, payload, out=None):
    path = out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")
    return path
