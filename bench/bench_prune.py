"""magnitude_masks vs the usual ways of computing SDCLR's pruning masks.

For the conv weights of ResNet-18 (CIFAR stem, 11.2M weights) and ResNet-50 (CIFAR stem,
23.5M), at 90% sparsity, global (one pooled threshold, as SDCLR) and layer-wise:

  sdclr_fast        radix select in C++/CUDA + one fused mask pass (this package)
  numpy sort        the official SDCLR code: |w| to NumPy on the CPU, np.sort, |w| >= t
  torch.kthvalue    torch.cat(|w|).kthvalue, |w| >= t
  torch.topk        torch.cat(|w|).topk(n - k) for the threshold, |w| >= t
  prune.L1          torch.nn.utils.prune.global_unstructured / l1_unstructured (L1Unstructured)
  floor             one fused pass |w| >= t with the threshold given (no selection at all)
  floor (torch)     the same pass in plain PyTorch, tensor by tensor

Time (median) and peak memory of each; ratio = method time / sdclr_fast time (above 1: ours is
faster); the floor's ratio is sdclr_fast / floor (how close to a single pass we are). Writes
JSON to bench/results/prune_<device>.json.

    .venv/bin/python bench/bench_prune.py            # both models
    .venv/bin/python bench/bench_prune.py --quick    # ResNet-18 only, fewer repetitions
    .venv/bin/python bench/bench_prune.py --device cuda
"""
import functools
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))  # the repo root, for a source checkout
sys.path.insert(0, _HERE)

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils import prune as torch_prune  # noqa: E402

from _common import (bench_parser, cpu_peak_bytes, cuda_peak_bytes, fmt_bytes, machine_info,  # noqa: E402
                     parse_bench_args, print_table, time_ms, write_json)
from sdclr_fast.ops import reference as R  # noqa: E402
from sdclr_fast.ops.prune import magnitude_masks, magnitude_threshold  # noqa: E402

SPARSITY = 0.9


# ---------------------------------------------------------------- conv weight shapes
def resnet18_cifar_shapes():
    shapes = [(64, 3, 3, 3)]
    cin = 64
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for b in range(2):
            shapes += [(width, cin, 3, 3), (width, width, 3, 3)]
            if b == 0 and (stride != 1 or cin != width):
                shapes.append((width, cin, 1, 1))
            cin = width
    return shapes


def resnet50_cifar_shapes():
    shapes = [(64, 3, 3, 3)]
    cin = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(width, cin, 1, 1), (width, width, 3, 3), (4 * width, width, 1, 1)]
            if b == 0:
                shapes.append((4 * width, cin, 1, 1))
            cin = 4 * width
    return shapes


MODELS = {"resnet18": resnet18_cifar_shapes, "resnet50": resnet50_cifar_shapes}


def make_weights(model, device, seed=0):
    """Kaiming-like random weights of the model's conv layers, generated in place (no
    temporaries, so that the peak-memory baseline is just the weights)."""
    g = torch.Generator().manual_seed(seed)
    ws = []
    for s in MODELS[model]():
        fan_in = s[1] * s[2] * s[3]
        w = torch.empty(s).normal_(generator=g).mul_((2.0 / fan_in) ** 0.5)
        ws.append(w.to(device))
    return ws


# ---------------------------------------------------------------- the methods
def ours(ws, scope):
    return magnitude_masks(ws, SPARSITY, scope=scope)


def numpy_sort(ws, scope):
    return R.magnitude_masks_reference(ws, SPARSITY, scope=scope)


def _kthvalue_threshold(ws):
    flat = torch.cat([w.detach().abs().reshape(-1) for w in ws])
    return flat.kthvalue(R.kth_index(SPARSITY, flat.numel()) + 1).values


def _topk_threshold(ws):
    flat = torch.cat([w.detach().abs().reshape(-1) for w in ws])
    keep = flat.numel() - R.kth_index(SPARSITY, flat.numel())
    return flat.topk(keep, largest=True, sorted=False).values.min()


def _by_threshold(ws, scope, threshold_fn):
    if scope == "global":
        t = threshold_fn(ws)
        return [w.detach().abs() >= t for w in ws]
    return [w.detach().abs() >= threshold_fn([w]) for w in ws]


def kthvalue(ws, scope):
    return _by_threshold(ws, scope, _kthvalue_threshold)


def topk(ws, scope):
    return _by_threshold(ws, scope, _topk_threshold)


def _holders(ws):
    """Fresh modules that share the weights (no copy), so every repetition starts unpruned."""
    mods = []
    for w in ws:
        m = nn.Module()
        m.weight = nn.Parameter(w, requires_grad=False)
        mods.append(m)
    return mods


def torch_prune_l1(ws, scope):
    mods = _holders(ws)
    if scope == "global":
        torch_prune.global_unstructured([(m, "weight") for m in mods],
                                        pruning_method=torch_prune.L1Unstructured, amount=SPARSITY)
    else:
        for m in mods:
            torch_prune.l1_unstructured(m, "weight", amount=SPARSITY)
    return [m.weight_mask for m in mods]


def _thresholds(ws, scope):
    """The thresholds the floors compare against (equal to the sort rule's: checked in main)."""
    if scope == "global":
        return magnitude_threshold(ws, SPARSITY).reshape(1)
    return torch.stack([magnitude_threshold([w], SPARSITY) for w in ws])


def floor(ws, scope, thr):
    return torch.ops.sdclr_fast.abs_ge_masks(ws, thr)


def floor_torch(ws, scope, thr):
    if thr.numel() == 1:
        return [w.abs() >= thr for w in ws]
    return [w.abs() >= t for w, t in zip(ws, thr)]


METHODS = [("sdclr_fast", ours), ("numpy sort (official)", numpy_sort), ("torch.kthvalue", kthvalue),
           ("torch.topk", topk), ("prune.L1Unstructured", torch_prune_l1)]
FLOORS = [("floor: fused |w|>=t", floor), ("floor: torch |w|>=t", floor_torch)]


# ---------------------------------------------------------------- peak memory (fresh process)
def _mem_setup(model, device, scope, with_thr):
    ws = make_weights(model, device)
    return ws, scope, _thresholds(ws, scope) if with_thr else None


def _mem_run(fn, state):
    ws, scope, thr = state
    fn(ws, scope) if thr is None else fn(ws, scope, thr)


def peak_bytes(fn, model, device, scope, ws, thr, with_memory):
    if not with_memory:
        return None
    if torch.device(device).type == "cuda":
        return cuda_peak_bytes(lambda: fn(ws, scope) if thr is None else fn(ws, scope, thr), device)
    return cpu_peak_bytes(functools.partial(_mem_setup, model, device, scope, thr is not None),
                          functools.partial(_mem_run, fn))


def timed(fn, device, reps):
    """Median time; slow methods (seconds per call) get fewer repetitions, at least 3."""
    first = time_ms(fn, device, warmup=1, reps=1)
    if torch.device(device).type != "cuda" and first > 500:
        reps = max(3, min(reps, int(3000 / first)))
    return time_ms(fn, device, warmup=0, reps=reps)


def main():
    ap = bench_parser(__doc__, "ResNet-18 only, fewer repetitions", "bench/results/prune_<device>.json")
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    args = parse_bench_args(ap)
    device = args.device
    models = args.models or (["resnet18"] if args.quick else ["resnet18", "resnet50"])
    reps = 5 if args.quick else 15
    with_memory = not args.no_memory

    rows = []
    for model in models:
        ws = make_weights(model, device)
        n = sum(w.numel() for w in ws)
        for scope in ("global", "layer"):
            # every method must agree with the official rule (L1Unstructured prunes exactly
            # round(p*n) entries, so it differs on ties; checked by count only)
            expected = numpy_sort(ws, scope)
            for name, fn in METHODS[:4]:
                got = fn(ws, scope)
                assert all(torch.equal(g.cpu(), e) for g, e in zip(got, expected)), name
            base = None
            for name, fn in METHODS:
                if name == "prune.L1Unstructured" and args.quick and model != "resnet18":
                    continue
                t = timed(lambda: fn(ws, scope), device, reps)
                mem = peak_bytes(fn, model, device, scope, ws, None, with_memory)
                base = t if base is None else base
                rows.append(dict(model=model, n=n, scope=scope, method=name, ms=t, peak=mem,
                                 ratio=t / base))
            thr = _thresholds(ws, scope)
            ref_thr = ([R.magnitude_threshold_reference(ws, SPARSITY)] if scope == "global" else
                       [R.magnitude_threshold_reference([w], SPARSITY) for w in ws])
            assert torch.equal(thr.cpu(), torch.stack(ref_thr).reshape(-1))
            for name, fn in FLOORS:
                t = timed(lambda: fn(ws, scope, thr), device, reps)
                mem = peak_bytes(fn, model, device, scope, ws, thr, with_memory)
                rows.append(dict(model=model, n=n, scope=scope, method=name, ms=t, peak=mem,
                                 ratio=base / t))
            print(f"{model} {scope}: done", flush=True)

    table = [dict(r, ms=f"{r['ms']:.2f}", peak=fmt_bytes(r["peak"]), ratio=f"{r['ratio']:.2f}x",
                  n=f"{r['n'] / 1e6:.1f}M") for r in rows]
    print()
    print(f"sparsity {SPARSITY}; ratio = method / sdclr_fast (floors: sdclr_fast / floor)")
    print_table(table, [("model", "model"), ("n", "weights"), ("scope", "scope"),
                        ("method", "method"), ("ms", "time ms"), ("ratio", "ratio"),
                        ("peak", "peak mem")])
    info = machine_info(device)
    if hasattr(os, "getloadavg"):  # the CPU numbers are only as good as the machine is quiet
        info["load_average_at_end"] = os.getloadavg()
        print(f"load average at the end: {info['load_average_at_end']}")
    write_json(f"prune_{torch.device(device).type}",
               dict(machine=info, sparsity=SPARSITY, rows=rows), args.out)


if __name__ == "__main__":
    main()
