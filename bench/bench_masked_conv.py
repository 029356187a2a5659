"""masked_conv2d vs F.conv2d(x, weight * mask) on every distinct conv of a CIFAR ResNet-18.

Forward + backward (grad_x and grad_weight) time and peak memory for unstructured masks at 90%
and 32x32 block masks at 90 / 75 / 50 % sparsity, op next to the reference (cuDNN / oneDNN)
measured in the same run; ratio = ref / op (above 1: the op is faster / leaner). On CUDA each
is timed eagerly and as a CUDA-graph replay (kernel time without host time), and "tile eff" =
(ref graph time x tile density) / op graph time: the op's throughput per computed weight tile
relative to cuDNN's per dense tile. Writes JSON to bench/results/masked_conv_<device>.json.

    .venv/bin/python bench/bench_masked_conv.py                 # batch 256 (CUDA), 32 (CPU)
    .venv/bin/python bench/bench_masked_conv.py --quick         # a short run
    .venv/bin/python bench/bench_masked_conv.py --device cuda --dtype bfloat16
"""
import functools
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))  # the repo root, for a source checkout
sys.path.insert(0, _HERE)

import torch  # noqa: E402

from _common import (bench_parser, cpu_peak_bytes, cuda_peak_bytes, fmt_bytes, machine_info,  # noqa: E402
                     parse_bench_args, print_table, time_ms, write_json)
from sdclr_fast.ops.masked_conv import masked_conv2d, prepare_mask  # noqa: E402
from sdclr_fast.ops.reference import masked_conv2d_reference  # noqa: E402

# (name, C_in, C_out, kernel, stride, padding, input H=W) of ResNet-18 with the CIFAR stem
# (3x3 conv1, stride 1, no max-pool); every distinct shape once.
RESNET18_CIFAR = [
    ("conv1", 3, 64, 3, 1, 1, 32),
    ("layer1.conv", 64, 64, 3, 1, 1, 32),
    ("layer2.0.conv1", 64, 128, 3, 2, 1, 32),
    ("layer2.0.shortcut", 64, 128, 1, 2, 0, 32),
    ("layer2.conv", 128, 128, 3, 1, 1, 16),
    ("layer3.0.conv1", 128, 256, 3, 2, 1, 16),
    ("layer3.0.shortcut", 128, 256, 1, 2, 0, 16),
    ("layer3.conv", 256, 256, 3, 1, 1, 8),
    ("layer4.0.conv1", 256, 512, 3, 2, 1, 8),
    ("layer4.0.shortcut", 256, 512, 1, 2, 0, 8),
    ("layer4.conv", 512, 512, 3, 1, 1, 4),
]
SPARSITY = 0.9
BLOCK = (32, 32)  # the kernels' default weight tile for >= 32 channels
CASES = (("unstructured", 0.9), ("block", 0.9), ("block", 0.75), ("block", 0.5))


def make_mask(weight, kind, sparsity=SPARSITY):
    """Magnitude mask of one layer: unstructured, or whole BLOCK x all-taps blocks."""
    block = BLOCK if kind == "block" else None
    try:
        from sdclr_fast.ops.prune import magnitude_masks

        # clip_block: a layer narrower than a block in both channels is one block (tiny test shapes)
        return magnitude_masks([weight], sparsity, scope="layer", block=block,
                               clip_block=True)[0].to(weight.device)
    except (ImportError, RuntimeError, AttributeError):  # pruning extension not built here
        pass
    if block is None:
        score = weight.abs().float()
    else:  # mean |w| per block, expanded back
        o, i = weight.shape[:2]
        bo, bi = block
        pad = torch.nn.functional.pad(weight.abs().float().sum((2, 3)),
                                      (0, -i % bi, 0, -o % bo))
        blocks = pad.reshape(pad.shape[0] // bo, bo, pad.shape[1] // bi, bi).mean((1, 3))
        score = blocks.repeat_interleave(bo, 0)[:o].repeat_interleave(bi, 1)[:, :i]
        score = score[:, :, None, None].expand_as(weight)
    threshold = score.flatten().kthvalue(min(int(sparsity * score.numel()) + 1, score.numel())).values
    return (score >= threshold).contiguous()


def setup_case(spec, kind, batch, dtype, device, channels_last, seed=0, sparsity=SPARSITY):
    _, cin, cout, k, stride, pad, hw = spec
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, cin, hw, hw, generator=g).to(device, dtype, memory_format=fmt)
    x.requires_grad_()
    w = (torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5).to(
        device, dtype, memory_format=fmt)
    w.requires_grad_()
    mask = make_mask(w.detach(), kind, sparsity)
    y_shape = torch.nn.functional.conv2d(x.detach()[:1], w.detach(), None, stride, pad).shape
    gy = torch.randn((batch, *y_shape[1:]), generator=g).to(device, dtype, memory_format=fmt)
    return dict(x=x, w=w, mask=mask, gy=gy, stride=stride, pad=pad)


def step(impl, s):
    """Forward + backward (grad_x, grad_w). impl: "ref", "op" (auto dispatch) or "triton"."""
    if impl == "ref":
        y = masked_conv2d_reference(s["x"], s["w"], s["mask"], None, s["stride"], s["pad"])
    else:
        y = masked_conv2d(s["x"], s["w"], s["mask"], None, s["stride"], s["pad"],
                          _backend="triton" if impl == "triton" else "auto")
    return torch.autograd.grad(y, (s["x"], s["w"]), s["gy"])


def _mem_setup(spec, kind, batch, dtype, channels_last, impl, sparsity=SPARSITY):
    return impl, setup_case(spec, kind, batch, dtype, "cpu", channels_last, sparsity=sparsity)


def graph_time_ms(fn, device, reps):
    """Time of fn replayed as a CUDA graph (kernel time, no host time); None where capture
    fails or off CUDA."""
    if device.type != "cuda":
        return None
    fn()
    torch.cuda.synchronize()
    try:
        g = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            fn()
            torch.cuda.synchronize()
            with torch.cuda.graph(g, stream=stream):
                fn()
    except RuntimeError as exc:
        print(f"  graph capture failed: {exc}", flush=True)
        return None
    return time_ms(g.replay, device, reps=reps)


def _mem_run(state):
    impl, s = state
    step(impl, s)


def main():
    ap = bench_parser(__doc__, "small batch, few repetitions", "bench/results/masked_conv_<device>.json")
    ap.add_argument("--batch", type=int, default=None, help="default 256 on CUDA, 32 on CPU")
    ap.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                    help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory columns")
    ap.add_argument("--memory-format", choices=["channels_last", "contiguous"], default=None,
                    help="activations and weights; default channels_last on CUDA, contiguous on CPU")
    ap.add_argument("--layers", nargs="*", help="only these layer names")
    ap.add_argument("--cases", nargs="*", help="only these masks, e.g. unstructured0.9 block0.75 "
                    "(default: unstructured0.9 block0.9 block0.75 block0.5)")
    args = parse_bench_args(ap)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    batch = args.batch or ((32 if cuda else 4) if args.quick else (256 if cuda else 32))
    channels_last = (args.memory_format or ("channels_last" if cuda else "contiguous")) == "channels_last"
    reps = 3 if args.quick else 10
    specs = [s for s in RESNET18_CIFAR if not args.layers or s[0] in args.layers]
    # on CUDA also the Triton kernels forced, whatever the dispatch picks
    impls = ("ref", "op", "triton") if cuda else ("ref", "op")

    rows = []
    cases = [c for c in CASES if not args.cases or f"{c[0]}{c[1]:g}" in args.cases]
    for spec in specs:
        for kind, sparsity in cases:
            s = setup_case(spec, kind, batch, dtype, device, channels_last, sparsity=sparsity)
            density = prepare_mask(s["mask"]).tile_density
            # two interleaved rounds, best median of each: fairer under a varying machine load
            t = {impl: float("inf") for impl in impls}
            for _ in range(2):
                for impl in impls:
                    t[impl] = min(t[impl], time_ms(functools.partial(step, impl, s), device,
                                                   reps=reps))
            tg = {impl: graph_time_ms(functools.partial(step, impl, s), device, reps)
                  for impl in impls} if cuda else {}
            mem = {"ref": None, "op": None}
            if not args.no_memory:
                for impl in ("ref", "op"):
                    if cuda:
                        mem[impl] = cuda_peak_bytes(functools.partial(step, impl, s), device)
                    else:
                        mem[impl] = cpu_peak_bytes(functools.partial(
                            _mem_setup, spec, kind, batch, dtype, channels_last, impl, sparsity),
                            _mem_run)
            name, cin, cout, k, stride, pad, hw = spec
            row = dict(
                layer=name, shape=f"{cin}->{cout} k{k} s{stride} {hw}x{hw}",
                mask=f"{kind} {sparsity:.0%}",
                kept=f"{s['mask'].float().mean().item():.2f}", tiles=f"{density:.2f}",
                ref_ms=f"{t['ref']:.3f}", op_ms=f"{t['op']:.3f}", speedup=f"{t['ref'] / t['op']:.2f}x",
                ref_peak=fmt_bytes(mem["ref"]), op_peak=fmt_bytes(mem["op"]),
                mem_ratio="-" if not mem["op"] or mem["ref"] is None
                else f"{mem['ref'] / mem['op']:.2f}x",
                raw=dict(ref_ms=t["ref"], op_ms=t["op"], triton_ms=t.get("triton"),
                         ref_graph_ms=tg.get("ref"), op_graph_ms=tg.get("op"),
                         triton_graph_ms=tg.get("triton"), kind=kind, sparsity=sparsity,
                         ref_peak_bytes=mem["ref"], op_peak_bytes=mem["op"],
                         tile_density=density, spec=list(spec)),
            )
            if cuda:
                row.update(triton_ms=f"{t['triton']:.3f}",
                           triton_speedup=f"{t['ref'] / t['triton']:.2f}x")
            rows.append(row)
            print(f"{name:18s} {kind:12s} {sparsity:4.0%} "
                  + "  ".join(f"{i} {t[i]:9.3f} ms" for i in impls)
                  + "".join(f"  {i} graph {tg[i]:8.3f} ms" for i in impls if tg.get(i)), flush=True)

    print(f"\nmasked_conv2d fwd+bwd, batch {batch}, {dtype}, "
          f"{'channels-last' if channels_last else 'NCHW'}, {device}; speedup = ref / op "
          f"(op = auto dispatch{', triton = Triton kernels forced' if cuda else ''}); "
          f"tiles = fraction of 32x32 weight tiles computed")
    cols = [("layer", "layer"), ("shape", "shape"), ("mask", "mask"), ("kept", "kept"),
            ("tiles", "tiles"), ("ref_ms", "ref ms"), ("op_ms", "op ms"), ("speedup", "speedup")]
    if cuda:
        cols += [("triton_ms", "triton ms"), ("triton_speedup", "triton speedup")]
    cols += [("ref_peak", "ref peak"), ("op_peak", "op peak"), ("mem_ratio", "mem ratio")]
    print_table(rows, cols)
    totals = []
    for kind, sparsity in cases:
        sel = [r["raw"] for r in rows if r["raw"]["kind"] == kind and r["raw"]["sparsity"] == sparsity]
        if not sel:
            continue
        tot = {k: sum(r[k] for r in sel) if all(r[k] is not None for r in sel) else None
               for k in ("ref_ms", "op_ms", "triton_ms", "ref_graph_ms", "op_graph_ms",
                         "triton_graph_ms")}
        line = (f"total {kind} {sparsity:.0%}: eager ref {tot['ref_ms']:.2f} ms, op "
                f"{tot['op_ms']:.2f} ms, x{tot['ref_ms'] / tot['op_ms']:.2f}")
        if tot["op_graph_ms"]:
            # per computed tile: the op's graph time against cuDNN's scaled to the same tiles
            eff = sum(r["ref_graph_ms"] * r["tile_density"] for r in sel) / tot["triton_graph_ms"]
            line += (f"; graph ref {tot['ref_graph_ms']:.2f} ms, op {tot['op_graph_ms']:.2f} ms, "
                     f"x{tot['ref_graph_ms'] / tot['op_graph_ms']:.2f}, triton forced "
                     f"{tot['triton_graph_ms']:.2f} ms, x{tot['ref_graph_ms'] / tot['triton_graph_ms']:.2f}, "
                     f"tile eff {eff:.2f}")
        print(line)
        totals.append(dict(kind=kind, sparsity=sparsity, **tot))
    write_json(f"masked_conv_{device.type}", dict(
        op="masked_conv2d", batch=batch, dtype=str(dtype), cases=[list(c) for c in cases],
        block=BLOCK, channels_last=channels_last, totals=totals,
        machine=machine_info(device), rows=rows), args.out)


if __name__ == "__main__":
    main()
