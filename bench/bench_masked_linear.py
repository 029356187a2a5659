"""masked_linear vs F.linear(x, weight * mask) (the masked copy) and dense F.linear (cuBLAS on
the plain weight) on ViT-S/16 and ViT-B/16 attention and MLP projections, 256 images x 197
tokens.

Forward and forward + backward (grad_x and grad_weight) time for unstructured masks and
32x32-block masks at 0 / 50 / 75 / 90 % sparsity, every implementation measured in the same
run; speedup = masked copy / op (above 1: the op is faster). On CUDA the Triton kernels are
also timed forced (whatever the dispatch picks), eagerly and as a CUDA-graph replay (kernel
time without host time), and "tile eff" = (dense graph time x tile density) / Triton graph
time: throughput per computed weight tile relative to cuBLAS per dense tile. On the CPU the op
runs its PyTorch path (the same GEMM as the masked copy). Writes JSON to
bench/results/masked_linear_<device>.json.

    .venv/bin/python bench/bench_masked_linear.py                 # 256 x 197 rows (CUDA), 2 x 197 (CPU)
    .venv/bin/python bench/bench_masked_linear.py --quick         # a short run
    .venv/bin/python bench/bench_masked_linear.py --device cuda --dtype bfloat16 --layers vit_b.fc1
    .venv/bin/python bench/bench_masked_linear.py --step     # + a ViT-S SDCLR step, op vs masked copies

--step also times one SDCLR step (dense view 1, pruned view 2, NT-Xent, one backward) of a
ViT-S/16 (plain torch, 224 px, 197 tokens; made a self-competitor by `self_competitor`, its
attention and MLP weights pruned to 90 % in 32x32 blocks) with masked_linear's dispatch
against the same step with every pruned Linear on the masked copy (DENSE_TILE_FRACTION = -1).
"""
import functools
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))  # the repo root, for a source checkout
sys.path.insert(0, _HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from _common import (bench_parser, machine_info, parse_bench_args, print_table,  # noqa: E402
                     time_ms, write_json)
from bench_masked_conv import graph_time_ms  # noqa: E402
from sdclr_fast.ops import masked_linear as ml_ops  # noqa: E402
from sdclr_fast.ops.masked_linear import masked_linear, prepare_linear_mask  # noqa: E402
from sdclr_fast.ops.reference import masked_linear_reference  # noqa: E402

# (name, in_features, out_features) of one transformer block: qkv, attention output projection,
# MLP up and down (ratio 4).
LAYERS = [(f"{m}.{n}", k, o) for m, d in (("vit_s", 384), ("vit_b", 768))
          for n, k, o in (("qkv", d, 3 * d), ("proj", d, d), ("fc1", d, 4 * d), ("fc2", 4 * d, d))]
TOKENS = 197
BLOCK = (32, 32)
CASES = tuple((kind, s) for kind in ("unstructured", "block") for s in (0.0, 0.5, 0.75, 0.9))


def make_mask(weight, kind, sparsity):
    """Magnitude mask of one layer (SDCLR's ceil rule): unstructured or whole 32x32 blocks."""
    if sparsity == 0:
        return torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
    from sdclr_fast.ops.prune import magnitude_masks

    block = BLOCK if kind == "block" else None
    return magnitude_masks([weight[:, :, None, None]], sparsity, scope="layer",
                           block=block)[0].reshape(weight.shape).to(weight.device)


def setup_case(spec, kind, sparsity, rows, dtype, device, seed=0):
    _, k, o = spec
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(o, k, generator=g) / k ** 0.5).to(device, dtype).requires_grad_()
    mask = make_mask(w.detach(), kind, sparsity)
    gy = torch.randn(rows, o, generator=g).to(device, dtype)
    return dict(x=x, w=w, mask=mask, gy=gy)


def run(impl, s, backward):
    """impl: "ref" (masked copy), "dense" (F.linear on the plain weight), "op" (auto dispatch)
    or "triton" (forced)."""
    if impl == "ref":
        y = masked_linear_reference(s["x"], s["w"], s["mask"])
    elif impl == "dense":
        y = F.linear(s["x"], s["w"])
    else:
        y = masked_linear(s["x"], s["w"], s["mask"], _backend="triton" if impl == "triton" else "auto")
    if backward:
        return torch.autograd.grad(y, (s["x"], s["w"]), s["gy"])
    return y


# ------------------------------------------------------------------ the SDCLR step on a ViT-S
class _Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """A plain-torch ViT (pre-norm blocks, class token, learned position embedding) with the
    timm ViT's shapes, so that the GPU machine needs no timm; features: the class token."""

    def __init__(self, dim=384, depth=12, heads=6, img=224, patch=16, in_chans=3):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_chans, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (img // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*[_Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.num_features = dim

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.norm(self.blocks(x))[:, 0]


def step_rows(images, device, reps, quick):
    """ms per SDCLR step of a ViT-S with masked_linear's dispatch and with masked copies."""
    from sdclr_fast import nt_xent
    from sdclr_fast.nn import self_competitor

    cuda = device.type == "cuda"
    img, depth = (224, 12) if cuda and not quick else (224, 2) if cuda else (32, 2)
    torch.manual_seed(0)
    model = self_competitor(ViT(depth=depth, img=img)).to(device)
    model.update_masks(0.9, block=BLOCK)
    density = sum(prepare_linear_mask(m.mask, BLOCK).tile_density * m.mask.numel()
                  for m in model.masked_layers().values()) / sum(
        m.mask.numel() for m in model.masked_layers().values())
    g = torch.Generator().manual_seed(1)
    v1, v2 = (torch.randn(images, 3, img, img, generator=g).to(device) for _ in range(2))

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = nt_xent(model(v1, branch="dense"), model(v2, branch="pruned"), 0.2)
        loss.backward()
        model.zero_grad(set_to_none=True)

    old = ml_ops.DENSE_TILE_FRACTION
    t = {}
    try:
        for _ in range(2):  # interleaved rounds, best of each
            for name, frac in (("copies", -1.0), ("op", old)):
                ml_ops.DENSE_TILE_FRACTION = frac
                t[name] = min(t.get(name, float("inf")), time_ms(step, device, reps=reps))
    finally:
        ml_ops.DENSE_TILE_FRACTION = old
    row = dict(model=f"ViT-S/16 depth {depth} {img}px", images=images, tiles=f"{density:.2f}",
               copies_ms=f"{t['copies']:.2f}", op_ms=f"{t['op']:.2f}",
               speedup=f"{t['copies'] / t['op']:.2f}x",
               raw=dict(copies_ms=t["copies"], op_ms=t["op"], tile_density=density, depth=depth,
                        img=img, images=images))
    print(f"\nSDCLR step (bf16 autocast on CUDA), 90 % sparsity in 32x32 blocks; copies = every "
          f"pruned Linear as F.linear(x, w * mask)")
    print_table([row], [("model", "model"), ("images", "images"), ("tiles", "tiles"),
                        ("copies_ms", "copies ms"), ("op_ms", "op ms"), ("speedup", "speedup")])
    return row


def main():
    ap = bench_parser(__doc__, "fewer repetitions, rows 32 x 197 on CUDA",
                      "bench/results/masked_linear_<device>.json")
    ap.add_argument("--images", type=int, default=None,
                    help="images per batch (rows = images x 197); default 256 on CUDA, 2 on CPU")
    ap.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                    help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--layers", nargs="*", help="only these layers, e.g. vit_b.fc1")
    ap.add_argument("--cases", nargs="*", help="only these masks, e.g. block0.9 unstructured0.5")
    ap.add_argument("--step", action="store_true", help="also time a ViT-S SDCLR step (see above)")
    ap.add_argument("--step-images", type=int, default=None,
                    help="images per view in the step; default 128 on CUDA, 2 on CPU")
    args = parse_bench_args(ap)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    images = args.images or ((32 if args.quick else 256) if cuda else (1 if args.quick else 2))
    rows_n = images * TOKENS
    reps = 3 if args.quick else 10
    impls = ("ref", "dense", "op", "triton") if cuda else ("ref", "dense", "op")
    specs = [s for s in LAYERS if not args.layers or s[0] in args.layers]
    cases = [c for c in CASES if not args.cases or f"{c[0]}{c[1]:g}" in args.cases]
    rows = []
    for spec in specs:
        for kind, sparsity in cases:
            s = setup_case(spec, kind, sparsity, rows_n, dtype, device)
            density = prepare_linear_mask(s["mask"], BLOCK).tile_density
            t = {}
            for backward in (False, True):
                for impl in impls:  # best of two interleaved rounds
                    fn = functools.partial(run, impl, s, backward)
                    t[impl, backward] = min(time_ms(fn, device, reps=reps) for _ in range(2))
            tg = {impl: graph_time_ms(functools.partial(run, impl, s, True), device, reps)
                  for impl in ("dense", "triton")} if cuda else {}
            name, k, o = spec
            row = dict(layer=name, shape=f"{rows_n}x{k} -> {o}", mask=f"{kind} {sparsity:.0%}",
                       kept=f"{s['mask'].float().mean().item():.2f}", tiles=f"{density:.2f}",
                       ref_fwd=f"{t['ref', False]:.3f}", op_fwd=f"{t['op', False]:.3f}",
                       fwd_speedup=f"{t['ref', False] / t['op', False]:.2f}x",
                       ref_ms=f"{t['ref', True]:.3f}", dense_ms=f"{t['dense', True]:.3f}",
                       op_ms=f"{t['op', True]:.3f}", speedup=f"{t['ref', True] / t['op', True]:.2f}x",
                       raw=dict(kind=kind, sparsity=sparsity, tile_density=density, spec=list(spec),
                                **{f"{i}_{'fwdbwd' if b else 'fwd'}_ms": v for (i, b), v in t.items()},
                                dense_graph_ms=tg.get("dense"), triton_graph_ms=tg.get("triton")))
            if cuda:
                row.update(triton_fwd=f"{t['triton', False]:.3f}", triton_ms=f"{t['triton', True]:.3f}",
                           triton_speedup=f"{t['ref', True] / t['triton', True]:.2f}x",
                           tile_eff="-" if not (tg.get("dense") and tg.get("triton"))
                           else f"{tg['dense'] * density / tg['triton']:.2f}")
            rows.append(row)
            print(f"{name:10s} {kind:12s} {sparsity:4.0%} tiles {density:.2f} "
                  + "  ".join(f"{i} {t[i, True]:8.3f} ms" for i in impls), flush=True)

    print(f"\nmasked_linear, {rows_n} rows ({images} images x {TOKENS} tokens), {dtype}, {device}; "
          f"ms of forward (fwd) and forward + backward; ref = F.linear(x, w * mask), dense = "
          f"F.linear(x, w); speedup = ref / op (op = auto dispatch"
          f"{', triton = Triton kernels forced' if cuda else ''}); tiles = fraction of 32x32 "
          f"weight tiles computed")
    cols = [("layer", "layer"), ("shape", "shape"), ("mask", "mask"), ("kept", "kept"),
            ("tiles", "tiles"), ("ref_fwd", "ref fwd"), ("op_fwd", "op fwd"),
            ("fwd_speedup", "fwd speedup"), ("ref_ms", "ref ms"), ("dense_ms", "dense ms"),
            ("op_ms", "op ms"), ("speedup", "speedup")]
    if cuda:
        cols += [("triton_fwd", "triton fwd"), ("triton_ms", "triton ms"),
                 ("triton_speedup", "triton speedup"), ("tile_eff", "tile eff")]
    print_table(rows, cols)
    step = None
    if args.step:
        step = step_rows(args.step_images or (128 if cuda else 2), device, reps, args.quick)
    write_json(f"masked_linear_{device.type}", dict(
        op="masked_linear", rows_per_batch=rows_n, images=images, tokens=TOKENS, dtype=str(dtype),
        cases=[list(c) for c in cases], block=BLOCK, machine=machine_info(device), rows=rows,
        step=step), args.out)


if __name__ == "__main__":
    main()
