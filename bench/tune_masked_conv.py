"""Tuning sweep of the masked-conv Triton kernels: writes kernels/masked_conv_tuned.json.

For every distinct conv of a CIFAR ResNet-18 at batch 256 (bf16, channels-last) and 32x32
block masks at 90 / 75 / 50 % sparsity: times each candidate weight tile and, per kernel
(forward, grad_input, grad_weight + its split count), each candidate BLOCK_M / num_warps /
num_stages; then times forward + both backward of the op with the winners and of
F.conv2d(x, w * mask) on cuDNN, both as CUDA-graph replays (kernel time, no host time), and
stores both times. masked_conv2d runs Triton only where its time is the smaller one.
Entries of other GPUs and shapes in the file are kept. A time budget stops the sweep early
(what is done is written; untuned shapes stay on cuDNN).

    python bench/tune_masked_conv.py                   # on a GPU: about 5 minutes
    python bench/tune_masked_conv.py --dry-run         # CPU: interpreter, tiny shapes, /tmp output
"""
import sys

if "--dry-run" in sys.argv:  # before Triton is imported
    import os

    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.insert(0, _HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_masked_conv import RESNET18_CIFAR, make_mask  # noqa: E402
from sdclr_fast.ops import _masked_conv_tuned as tuned  # noqa: E402
from sdclr_fast.ops import masked_conv as mc  # noqa: E402

SPARSITIES = (0.9, 0.75, 0.5)
TILES = ((32, 32), (64, 32))  # (block_o, block_c): forward BLOCK_N x BLOCK_K


def timer(device, reps):
    """ms per call of fn (median of reps), after a warm-up call; CUDA events on a GPU."""
    def run(fn):
        fn()
        if device.type != "cuda":
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(ts)
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        return statistics.median(ts)
    return run


def graph_ms(fn, device, reps):
    """Kernel time of fn: a CUDA-graph replay on a GPU (eager timing where capture fails, and on
    the CPU)."""
    t = timer(device, reps)
    if device.type != "cuda":
        return t(fn)
    fn()  # compile / autotune outside the capture
    torch.cuda.synchronize()
    try:
        g = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            fn()  # warm the side stream
            torch.cuda.synchronize()
            with torch.cuda.graph(g, stream=stream):
                fn()
        return t(g.replay)
    except RuntimeError as exc:
        print(f"  (graph capture failed, eager time: {exc})", flush=True)
        return t(fn)


def fwd_bwd(s, impl):
    def run():
        if impl == "ref":
            y = F.conv2d(s["x"], s["w"] * s["mask"], None, s["stride"], s["pad"])
        else:
            y = mc.masked_conv2d(s["x"], s["w"], s["mask"], None, s["stride"], s["pad"],
                                 _backend="triton")
        return torch.autograd.grad(y, (s["x"], s["w"]), s["gy"])
    return run


def tune_case(s, tile, device, reps, candidates, wgt_candidates):
    """Best config per kernel for one weight tile: (entry without times, per-kernel ms)."""
    k = mc._kernels()
    geom = ((s["stride"],) * 2, (s["pad"],) * 2, (1, 1), 1)
    tiles = mc.prepare_mask(s["mask"], 1, tile)
    x, gy = s["x"].detach(), s["gy"]
    packed = k.pack(s["w"].detach(), tiles, x.dtype)
    y = torch.empty_like(gy)
    gx = torch.empty_like(x)
    t = timer(device, reps)
    best = {}
    trials = {
        "fwd": (candidates, lambda c: k.forward(x, packed, None, y, tiles, geom, c)),
        "bgi": (candidates, lambda c: k.backward_input(gy, packed, gx, tiles, geom, c)),
        "bgw": (wgt_candidates, lambda c: k.backward_weight(x, gy, tiles.mask, tiles, geom,
                                                            x.dtype, cfg=c)),
    }
    for name, (cands, launch) in trials.items():
        res = []
        for c in cands:
            try:
                res.append((t(lambda c=c: launch(c)), c))
            except Exception as exc:  # e.g. out of shared memory for this config
                print(f"  {name} {c}: {type(exc).__name__}", flush=True)
        ms, c = min(res, key=lambda r: r[0])
        best[name] = (ms, dict(c))
    if tiles.wgt_tiles.shape[0]:  # split count of the winning grad_weight config
        base = best["bgw"][1]
        res = [(t(lambda n=n: k.backward_weight(x, gy, tiles.mask, tiles, geom, x.dtype,
                                                 cfg=dict(base, splits=n))), n)
               for n in (1, 2, 4, 8, 16)]
        ms, n = min(res)
        best["bgw"] = (ms, dict(base, splits=n))
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU check of the whole sweep: interpreter, tiny shapes, one config")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--budget-s", type=float, default=330,
                    help="stop starting new cases after this many seconds (default 330)")
    ap.add_argument("--out", default=None,
                    help="table to update (default kernels/masked_conv_tuned.json; /tmp with --dry-run)")
    ap.add_argument("--layers", nargs="*", help="only these layer names")
    args = ap.parse_args()
    t_start = time.perf_counter()

    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    dtype = getattr(torch, args.dtype)
    batch = 2 if dry else args.batch
    reps = 2 if dry else 10
    specs = [sp for sp in RESNET18_CIFAR if not args.layers or sp[0] in args.layers]
    if dry:  # three layer kinds at a fraction of the channels and 4x4 pixels
        specs = [(n, max(3, c // 8) if c == 3 else c // 2, o // 2, kk, st, p, 4)
                 for n, c, o, kk, st, p, _ in specs[:3]]
    candidates = mc._kernels().CANDIDATES[:1] if dry else mc._kernels().CANDIDATES
    wgt_candidates = mc._kernels().WGT_CANDIDATES[:1] if dry else mc._kernels().WGT_CANDIDATES
    gpu = "cpu-dry-run" if dry else torch.cuda.get_device_name()
    out = args.out or ("/tmp/masked_conv_tuned_dry_run.json" if dry else tuned.default_path())
    table = {"format": tuned.FORMAT, "entries": {}}
    if os.path.exists(out):
        with open(out) as f:
            table = json.load(f)

    done = 0
    for spec in specs:
        name, cin, cout, kk, stride, pad, hw = spec
        for sparsity in SPARSITIES:
            if time.perf_counter() - t_start > args.budget_s:
                print(f"budget of {args.budget_s:.0f} s spent: stopping before {name} "
                      f"{sparsity:.0%}", flush=True)
                break
            g = torch.Generator().manual_seed(0)
            fmt = torch.channels_last
            x = torch.randn(batch, cin, hw, hw, generator=g).to(device, dtype, memory_format=fmt)
            w = (torch.randn(cout, cin, kk, kk, generator=g) / (cin * kk * kk) ** 0.5).to(
                device, dtype, memory_format=fmt)
            mask = make_mask(w, "block", sparsity)
            oh = (hw + 2 * pad - kk) // stride + 1
            gy = torch.randn(batch, cout, oh, oh, generator=g).to(device, dtype, memory_format=fmt)
            s = dict(x=x.requires_grad_(), w=w.requires_grad_(), mask=mask, gy=gy, stride=stride,
                     pad=pad)
            density = mc.prepare_mask(mask).tile_density
            bkt = tuned.bucket(density)
            if bkt is None:
                print(f"{name:18s} {sparsity:4.0%} tiles {density:.2f}: too dense to skip, cuDNN",
                      flush=True)
                continue
            key = tuned.shape_key(gpu, dtype, x.shape, w.shape, (stride,) * 2, (pad,) * 2, (1, 1),
                                  1, bkt)
            cudnn_ms = graph_ms(fwd_bwd(s, "ref"), device, reps)
            best_entry = None
            for tile in TILES:
                if tile != (32, 32) and cout < 2 * tile[0]:
                    continue  # a tile wider than the layer's out-channels only adds padding
                kb = tune_case(s, tile, device, reps, candidates, wgt_candidates)
                entry = dict(batch=batch, tile=list(tile), fwd=kb["fwd"][1], bgi=kb["bgi"][1],
                             bgw=kb["bgw"][1], tile_density=round(density, 4),
                             kernel_ms={n: round(v[0], 4) for n, v in kb.items()})
                # the op with these configs, forward + both backward, as a graph replay
                orig = tuned.lookup
                tuned.lookup = lambda *a, _e=entry, **kw: _e
                try:
                    entry["triton_ms"] = graph_ms(fwd_bwd(s, "op"), device, reps)
                finally:
                    tuned.lookup = orig
                if best_entry is None or entry["triton_ms"] < best_entry["triton_ms"]:
                    best_entry = entry
            best_entry["cudnn_ms"] = cudnn_ms
            table["entries"][key] = best_entry
            done += 1
            print(f"{name:18s} {sparsity:4.0%} tiles {density:.2f} [{bkt}]: triton "
                  f"{best_entry['triton_ms']:.3f} ms (tile {best_entry['tile']}) vs cuDNN "
                  f"{cudnn_ms:.3f} ms -> x{cudnn_ms / best_entry['triton_ms']:.2f} "
                  f"({time.perf_counter() - t_start:.0f} s)", flush=True)
        else:
            continue
        break
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    os.replace(tmp, out)
    print(f"wrote {done} entries to {out} in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
