"""One SDCLR training step: sdclr-fast against the official way of doing it in plain PyTorch.

fast:     sdclr_fast.nn SelfCompetitor (mask-applied convs, dual BN), two forwards (dense view 1,
          pruned view 2) and ONE backward of the fused NT-Xent; masks from the top-k pruning op.
official: a plain-PyTorch ResNet-18 with dual BN whose convs multiply weight * mask in every
          pruned forward, NT-Xent with the full 2N x 2N matrix, and the official code's three
          forwards and two backwards (pruned view without grad, dense view + backward, pruned view
          + backward); masks from a NumPy sort of all conv weights on the CPU.

simclr:   sdclr-fast's SimCLR step (one dense forward of both views, fused NT-Xent), for scale.
--compile adds "<impl>+compile" rows (the step as `pretrain --compile` runs it: forwards + loss
in one fullgraph function; the official one with its model forwards compiled) and, on CUDA,
"<impl>+cudagraphs" (`--compile reduce-overhead`). speed-up = official step time / this one,
measured in the same run.

Both sides see the same pre-augmented views (augmentation is not timed) and use the same
precision: fp32 on CPU, bf16 autocast + channels_last on CUDA. Pruning runs once per epoch in
both, so it is reported separately and amortised over an epoch of CIFAR-10-LT (11,165 images).

    .venv/bin/python bench/bench_step.py [--quick] [--device cpu|cuda] [--batch N]
"""
from __future__ import annotations

import contextlib
import functools
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import (bench_parser, cpu_peak_bytes, cuda_peak_bytes, fmt_bytes,  # noqa: E402
                           machine_info, parse_bench_args, print_table, time_ms, write_json)
from sdclr_fast.ops.reference import magnitude_masks_reference, nt_xent_reference  # noqa: E402

CIFAR10_LT_IMAGES = 11165
SPARSITY = 0.9
TAU = 0.2


# ---------------------------------------------------------------- the official-style model
class _Branch:
    """Which branch the whole network runs, switched by a flag as the official code does."""
    pruned = False


class OfficialConv(nn.Conv2d):
    def __init__(self, *args, branch: _Branch, **kwargs):
        super().__init__(*args, bias=False, **kwargs)
        self.branch = branch
        self.register_buffer("mask", torch.ones_like(self.weight, dtype=torch.bool))

    def forward(self, x):
        w = self.weight * self.mask if self.branch.pruned else self.weight
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.groups)


class OfficialDualBN(nn.Module):
    def __init__(self, c, branch: _Branch, bn=nn.BatchNorm2d):
        super().__init__()
        self.branch = branch
        self.bn = nn.ModuleList([bn(c), bn(c)])

    def forward(self, x):
        return self.bn[int(self.branch.pruned)](x)


class OfficialBlock(nn.Module):
    def __init__(self, cin, cout, stride, branch):
        super().__init__()
        self.conv1 = OfficialConv(cin, cout, 3, stride=stride, padding=1, branch=branch)
        self.bn1 = OfficialDualBN(cout, branch)
        self.conv2 = OfficialConv(cout, cout, 3, stride=1, padding=1, branch=branch)
        self.bn2 = OfficialDualBN(cout, branch)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(OfficialConv(cin, cout, 1, stride=stride, branch=branch),
                                          OfficialDualBN(cout, branch))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class OfficialResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem and SDCLR's 512-512-512-128 projection head (dual BN), the
    same parameters as sdclr_fast.nn.build_model(method="sdclr")."""

    def __init__(self, in_channels=3, width=64, proj_dim=128):
        super().__init__()
        self.branch = _Branch()
        b = self.branch
        self.conv1 = OfficialConv(in_channels, width, 3, stride=1, padding=1, branch=b)
        self.bn1 = OfficialDualBN(width, b)
        layers, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2 ** i
            layers += [OfficialBlock(cin, cout, stride, b), OfficialBlock(cout, cout, 1, b)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc1, self.hbn1 = nn.Linear(cin, cin, bias=False), OfficialDualBN(cin, b, nn.BatchNorm1d)
        self.fc2, self.hbn2 = nn.Linear(cin, cin, bias=False), OfficialDualBN(cin, b, nn.BatchNorm1d)
        self.fc3 = nn.Linear(cin, proj_dim, bias=False)
        self.hbn3 = OfficialDualBN(proj_dim, b, nn.BatchNorm1d)  # the official head ends in BN

    def forward(self, x):
        h = self.layers(F.relu(self.bn1(self.conv1(x))))
        h = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)
        h = F.relu(self.hbn1(self.fc1(h)))
        h = F.relu(self.hbn2(self.fc2(h)))
        return self.hbn3(self.fc3(h))

    def convs(self):
        return [m for m in self.modules() if isinstance(m, OfficialConv)]


def official_update_masks(model):
    """The official rule: NumPy sort of all pooled |w| on the CPU, masks copied back."""
    convs = model.convs()
    masks = magnitude_masks_reference([c.weight for c in convs], SPARSITY)
    for c, m in zip(convs, masks):
        c.mask.copy_(m)


def official_step(model, opt, v1, v2, amp, forward=None):
    """Three forwards and two backwards, as the official SDCLR training loop does."""
    forward = model if forward is None else forward
    opt.zero_grad(set_to_none=True)
    with amp():
        model.branch.pruned = True
        with torch.no_grad():
            z2_fixed = forward(v2)
        model.branch.pruned = False
        z1 = forward(v1)
    nt_xent_reference(z1.float(), z2_fixed.float(), TAU).backward()
    with amp():
        model.branch.pruned = True
        z2 = forward(v2)
    nt_xent_reference(z1.detach().float(), z2.float(), TAU).backward()
    model.branch.pruned = False
    opt.step()


# ---------------------------------------------------------------- the sdclr-fast step
def fast_model(width=64, method="sdclr"):
    from sdclr_fast.nn import build_model

    return build_model(arch="resnet18", method=method, in_channels=3, width=width, cifar_stem=True, proj_dim=128)


def fast_step(step_module, opt, v1, v2, amp):
    from sdclr_fast.ops.nt_xent import nt_xent

    opt.zero_grad(set_to_none=True)
    with amp():
        z1, z2 = step_module(v1, v2)
    nt_xent(z1.float(), z2.float(), TAU).backward()
    opt.step()


def compiled_step(step_module, opt, kind, device, v1, v2, amp, _cache={}):
    """The step as `pretrain --compile` runs it: forwards + loss in one fullgraph function
    (mode "default", or "reduce-overhead" = CUDA graphs for *+cudagraphs), one backward."""
    from types import SimpleNamespace

    from sdclr_fast.train.pretrain import compile_step

    key = id(step_module)
    if key not in _cache:
        mode = "reduce-overhead" if kind.endswith("+cudagraphs") else "default"
        cfg = SimpleNamespace(compile=mode, method=step_module.method, temperature=TAU)
        ex = SimpleNamespace(device=torch.device(device), autocast=amp)
        _cache[key] = compile_step(step_module, cfg, ex, False)[1]
    opt.zero_grad(set_to_none=True)
    _cache[key](v1, v2).backward()
    opt.step()


# ---------------------------------------------------------------- set-up shared by timing and memory
def _setup(kind, batch, width, device):
    """kind: "official", "fast", or "fast+compile" (the fast step with the forward compiled by
    torch.compile, as `sdclr-fast pretrain --compile` runs it)."""
    torch.manual_seed(0)
    device = torch.device(device)
    cuda = device.type == "cuda"
    method = "simclr" if kind.startswith("simclr") else "sdclr"
    if kind.startswith("official"):
        model = OfficialResNet18(width=width).to(device)
    else:
        from sdclr_fast.train.pretrain import ContrastiveForward

        model = fast_model(width, method).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    if kind.startswith("official"):
        official_update_masks(model)
        # official+compile: its forwards compiled (one graph per branch flag value)
        fwd = torch.compile(model) if kind == "official+compile" else model
        step = functools.partial(official_step, model, opt, forward=fwd)
    else:
        if method == "sdclr":
            model.update_masks(sparsity=SPARSITY, block=_block(kind), clip_block=True)
        step_module = ContrastiveForward(model, method)
        if kind.endswith(("+compile", "+cudagraphs")):
            step = functools.partial(compiled_step, step_module, opt, kind, device)
        else:
            step = functools.partial(fast_step, step_module, opt)
    model.train()
    fmt = torch.channels_last if cuda else torch.contiguous_format
    v1 = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    v2 = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    amp = (functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext)
    return model, functools.partial(step, v1, v2, amp)


def _memory_setup(kind, batch, width):
    _, run = _setup(kind, batch, width, "cpu")
    run()  # optimiser state and autograd buffers exist from here on, as in training
    return run


def _memory_run(run):
    run()


def _prune_fn(kind, model):
    if kind.startswith("official"):
        return lambda: official_update_masks(model)
    if kind.startswith("simclr"):
        return lambda: None
    return lambda: model.update_masks(sparsity=SPARSITY, block=_block(kind), clip_block=True)


# ---- SDCLR with --prune-block 32x32 ("fast+block"): the pruned branch on the block-sparse
# masked conv (Triton where the tuned table says it wins, on CUDA), beside unstructured "fast".
PRUNE_BLOCK = (32, 32)


def _block(kind):
    return PRUNE_BLOCK if kind == "fast+block" else None


def _block_vs_unstructured(rec):
    """step-time ratio unstructured SDCLR / --prune-block SDCLR (the goal on a GPU: >= 1.4)."""
    return rec["fast"]["step_ms"] / rec["fast+block"]["step_ms"]


def _interleaved_ms(runs, reps, warmup=1):
    """Median wall time of each fn, the fns run alternately so that load changes on a shared CPU
    hit them alike."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times = {k: [] for k in runs}
    for _ in range(reps):
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def measure(batch, width, device, reps, with_memory, compile_=False):
    cuda = torch.device(device).type == "cuda"
    kinds = ("official", "fast", "fast+block", "simclr")
    if compile_:  # compiled as `pretrain --compile`; CUDA graphs (reduce-overhead) on CUDA only
        modes = ("+compile", "+cudagraphs") if cuda else ("+compile",)
        kinds += ("official+compile",) + tuple(m + x for m in ("fast", "simclr") for x in modes)
    built = {k: _setup(k, batch, width, device) for k in kinds}
    if torch.device(device).type == "cuda":
        step_ms = {k: time_ms(built[k][1], device) for k in kinds}
        prune_ms = {k: time_ms(_prune_fn(k, built[k][0]), device) for k in kinds}
    else:
        step_ms = _interleaved_ms({k: built[k][1] for k in kinds}, reps)
        prune_ms = _interleaved_ms({k: _prune_fn(k, built[k][0]) for k in kinds}, max(3, reps))
    out = {}
    for k in kinds:
        model, run = built[k]
        if not with_memory or (not cuda and k.endswith("+compile")):
            mem = None  # on a CPU the compiler's own peak RSS hides the step's
        elif torch.device(device).type == "cuda":
            mem = cuda_peak_bytes(run, device)
        else:
            mem = cpu_peak_bytes(functools.partial(_memory_setup, k, batch, width), _memory_run)
        out[k] = {"step_ms": step_ms[k], "prune_ms": prune_ms[k], "peak": mem,
                  "params": sum(p.numel() for p in model.parameters())}
    del built
    # Same network on both SDCLR sides, or the comparison means nothing (SimCLR's head is smaller).
    sdclr = {k: v["params"] for k, v in out.items() if not k.startswith("simclr")}
    assert len(set(sdclr.values())) == 1, sdclr
    return out


def main(argv=None):
    ap = bench_parser(__doc__, "fewer repetitions, no memory measurement on CPU", "bench/results/step.json")
    ap.add_argument("--batch", type=int, nargs="+", default=None,
                    help="per-step batch sizes (default: 512 on CUDA, 32 on CPU; --quick: 256 / 16)")
    ap.add_argument("--width", type=int, default=64, help="ResNet-18 width (default 64, the standard)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions on CPU (default 5; --quick 3)")
    ap.add_argument("--compile", action="store_true",
                    help="also time the fast step compiled as `pretrain --compile` runs it (one "
                         "fullgraph step; on CUDA also under CUDA graphs, --compile reduce-overhead)")
    args = parse_bench_args(ap, argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.batch:
        batches = args.batch
    else:
        batches = ([256] if args.quick else [512]) if cuda else ([16] if args.quick else [32])
    reps = args.reps or (3 if args.quick else 5)
    with_memory = cuda or not args.quick

    rows, records = [], []
    for b in batches:
        res = measure(b, args.width, device, reps, with_memory, args.compile)
        steps = CIFAR10_LT_IMAGES // b
        rec = {"batch": b, "steps_per_epoch": steps}
        for k, r in res.items():
            epoch_ms = steps * r["step_ms"] + r["prune_ms"]
            rec[k] = dict(r, images_per_s=b / r["step_ms"] * 1e3,
                          epoch_images_per_s=steps * b / epoch_ms * 1e3,
                          prune_fraction_of_epoch=r["prune_ms"] / epoch_ms)
            r = rec[k]
            r["speedup"] = r["images_per_s"] / rec["official"]["images_per_s"]
            r["epoch_speedup"] = r["epoch_images_per_s"] / rec["official"]["epoch_images_per_s"]
        rec["speedup"], rec["epoch_speedup"] = rec["fast"]["speedup"], rec["fast"]["epoch_speedup"]
        records.append(rec)
        for k in res:
            r = rec[k]
            rows.append({"impl": k, "batch": b, "step": f"{r['step_ms']:.2f} ms", "img_s": f"{r['images_per_s']:.1f}",
                         "epoch_img_s": f"{r['epoch_images_per_s']:.1f}", "prune": f"{r['prune_ms']:.1f} ms",
                         "prune_pct": f"{100 * r['prune_fraction_of_epoch']:.3f}%", "peak": fmt_bytes(r["peak"]),
                         "ratio": f"{r['speedup']:.2f}x", "epoch_ratio": f"{r['epoch_speedup']:.2f}x"})
    print(f"SDCLR training step, ResNet-18 width {args.width}, 32x32, {device} "
          f"({'bf16 autocast' if cuda else 'fp32'}); epoch = CIFAR-10-LT, {CIFAR10_LT_IMAGES} images")
    print_table(rows, [("impl", "impl"), ("batch", "batch"), ("step", "step time"), ("img_s", "image pairs/s"),
                       ("ratio", "speed-up"), ("prune", "pruning"), ("prune_pct", "pruning % of epoch"),
                       ("epoch_img_s", "images/s incl. pruning"), ("epoch_ratio", "epoch speed-up"),
                       ("peak", "peak memory")])
    for rec in records:
        print(f"batch {rec['batch']}: --prune-block {PRUNE_BLOCK[0]}x{PRUNE_BLOCK[1]} step "
              f"x{_block_vs_unstructured(rec):.2f} against unstructured SDCLR")
    write_json("step", {"machine": machine_info(device), "width": args.width, "sparsity": SPARSITY,
                        "records": records}, args.out)


if __name__ == "__main__":
    main()
