"""Static sm_90 / sm_80 report of every Triton kernel the ops launch on CUDA, beside anchors.

No GPU needed: each workload calls the public op (or the anchor's launch function) on CPU
tensors of the workload's shapes, with TRITON_INTERPRET=0 and `_backend="triton"`, while
`capture` replaces JITFunction.run: every launch is recorded (bound arguments, constexprs,
num_warps / num_stages, grid) instead of run, and torch.cuda's device queries answer as the
target GPU (capability, SM count, name), so the host code picks exactly the variants it
would pick there. Each captured launch is then compiled with Triton's own binder and
`triton.compile` for GPUTarget("cuda", 90 | 80, 32) -- the same specialisation a launch gets
(constexprs, divisibility by 16, options) -- and Triton's bundled cuobjdump reads the cubin.
Nothing here names a kernel's constexprs or grid: change the launch code and the report
follows.

Columns (per kernel variant, per target): registers / thread, stack + local memory / thread
(spills; STL / LDL instruction counts in the JSON),
shared memory / CTA, CTAs per SM (registers, shared memory, warps), wgmma (HGMMA) and
mma.sync (HMMA) instruction counts, TMA (UTMALDG/UTMASTG), cp.async (LDGSTS) and mbarrier
(SYNCS) counts, the instructions of one iteration of the innermost loop holding the MMAs and
that per MFLOP of the CTA's work in it (per warp, and times the CTA's warps: what the SM
issues, the figure to compare kernels with different num_warps by), MUFU ops in it, how many tiles the loop's loads run
ahead (modelled), grid size and fill of the SMs, and a MODELLED ceiling as a fraction of the
target's dense bf16 peak from three per-iteration costs on one SM: tensor-core time, warp
instruction issue (4 per clock), MUFU throughput (16 per clock) -- overlapped (max) and not
(sum). Modelled figures are a model of the loop, never a measurement.

    .venv/bin/python bench/kernel_report.py                  # all workloads, sm_90 and sm_80
    .venv/bin/python bench/kernel_report.py --quick          # a reduced set (tests)
    .venv/bin/python bench/kernel_report.py --only 'anchor|masked_conv' --targets sm_90

Writes bench/results/kernel_report.json and .md (--out DIR). Adding an op's workloads is one
entry in `_workloads()`: the op's name, a label and a function that builds its inputs on a
device and returns its forward + backward step. `--time` runs the same steps on a GPU and
times them (bench/run_gpu.sh does).
"""
import argparse
import contextlib
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from unittest import mock

import torch  # the package's kernels are imported later, in the child, under TRITON_INTERPRET=0

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _p in (_HERE, _ROOT):  # the source checkout first, then bench/ (bench_* helpers)
    if _p not in sys.path:
        sys.path.insert(0, _p)


# ------------------------------------------------------------------ targets
@dataclasses.dataclass(frozen=True)
class Gpu:
    """What the model needs of a GPU. Rates per SM per clock: dense tensor-core FLOP by input
    class, warp instructions issued (one per scheduler), MUFU results (ex2, rcp, ...)."""
    key: str
    name: str
    cc: tuple
    sms: int
    clock_ghz: float
    smem_per_sm: int
    tc_flop: dict
    regs_per_sm: int = 65536
    max_warps: int = 64
    max_ctas: int = 32
    issue_per_clk: int = 4
    mufu_per_clk: int = 16

    @property
    def peak_tflops(self):
        return self.sms * self.clock_ghz * self.tc_flop["bf16"] / 1e3


GPUS = {
    # H100 SXM: 132 SMs x 4096 bf16 FLOP/clk x 1.83 GHz = 989 TFLOP/s; 228 KB shared per SM
    "sm_90": Gpu("sm_90", "NVIDIA H100 80GB HBM3", (9, 0), 132, 1.83, 233472,
                 {"bf16": 4096, "tf32": 2048, "fp32": 256}),
    # A100 SXM: 108 SMs x 2048 bf16 FLOP/clk x 1.41 GHz = 312 TFLOP/s; 164 KB shared per SM
    "sm_80": Gpu("sm_80", "NVIDIA A100-SXM4-80GB", (8, 0), 108, 1.41, 167936,
                 {"bf16": 2048, "tf32": 1024, "fp32": 256}),
}
SMEM_RESERVED = 1024  # per CTA, sm_80 and later


# ------------------------------------------------------------------ capture
@dataclasses.dataclass
class Launch:
    fn: object  # the JITFunction
    args: tuple
    kwargs: dict
    grid: object
    note: str = ""


@contextlib.contextmanager
def as_gpu(gpu):
    """torch.cuda's device queries answer as `gpu` (the host code's launch decisions)."""
    props = types.SimpleNamespace(name=gpu.name, major=gpu.cc[0], minor=gpu.cc[1],
                                  multi_processor_count=gpu.sms, total_memory=80 << 30,
                                  shared_memory_per_block_optin=gpu.smem_per_sm - SMEM_RESERVED,
                                  regs_per_multiprocessor=gpu.regs_per_sm, warp_size=32)
    with contextlib.ExitStack() as stack:
        for name, fake in (("get_device_capability", lambda device=None: gpu.cc),
                           ("get_device_properties", lambda device=None: props),
                           ("get_device_name", lambda device=None: gpu.name),
                           ("current_device", lambda: 0)):
            stack.enter_context(mock.patch.object(torch.cuda, name, fake))
        yield


def _flags(fn, args, kwargs):
    """The boolean constexprs that are on, and the masked conv's phases (strided grad_input):
    tells a kernel's variants apart in the table."""
    names = [p.name for p in fn.params if p.is_constexpr]
    bound = dict(zip(fn.arg_names, args), **kwargs)
    on = [n for n in names if bound.get(n) is True and n != "UPCAST"]
    if bound.get("PHASES_H", 1) * bound.get("PHASES_W", 1) > 1:
        on.append(f"PHASES {bound['PHASES_H']}x{bound['PHASES_W']}")
    return " ".join(on)


@contextlib.contextmanager
def capture():
    """Record every Triton launch instead of running it. An autotuned kernel yields one
    launch per config (the host cannot know which one a GPU would pick)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    launches = []

    def jit_run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, grid, _flags(self, args, kwargs)))

    def tuner_run(self, *args, **kwargs):
        grid = kwargs.pop("grid")
        kwargs.pop("warmup", None)
        for i, cfg in enumerate(self.configs):
            kw = {**kwargs, **cfg.all_kwargs()}
            launches.append(Launch(self.fn, args, kw, grid, ", ".join(filter(None, (
                _flags(self.fn, args, kw), f"autotune config {i + 1}/{len(self.configs)}")))))

    with mock.patch.object(JITFunction, "run", jit_run), mock.patch.object(Autotuner, "run", tuner_run):
        yield launches


# ------------------------------------------------------------------ compile like a launch
def compile_launch(launch, gpu):
    """(compiled kernel, grid tuple): the launch's specialisation compiled for `gpu`, through
    the binder and option parsing JITFunction.run uses."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    target = GPUTarget("cuda", gpu.cc[0] * 10 + gpu.cc[1], 32)
    backend = make_backend(target)
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    if hasattr(knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    grid = launch.grid(bound) if callable(launch.grid) else launch.grid
    grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
    out = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                         options=options.__dict__)
    key = (fn.fn.__qualname__, str(spec), str(options.__dict__))
    return out, grid, key


# ------------------------------------------------------------------ reading the cubin
def _tool(name):
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: the report needs Triton's bundled {name}")
    return path


_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_BRA = re.compile(r"0x([0-9a-f]+)")
_HGMMA = re.compile(r"HGMMA\.(\d+)x(\d+)x(\d+)\.F32\.(\w+)")
_HMMA = re.compile(r"HMMA\.(\d+)\.F32(?:\.(\w+))?")
_HMMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4)}
_DEPBAR = re.compile(r"SB0,\s*0x([0-9a-f]+)")


def _cuobjdump(cubin, flag):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("cuobjdump"), flag, f.name], check=True,
                              capture_output=True, text=True).stdout


def resources(cubin):
    """Resource usage of the cubin's one kernel: {REG, STACK, SHARED, LOCAL} (cuobjdump
    -res-usage; STACK / LOCAL > 0: spills)."""
    usage = _cuobjdump(cubin, "-res-usage")
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage)}


def sass(cubin, keep=None):
    """([(address, opcode, operands)], resource usage) of the cubin's one kernel; keep: a path
    to write the disassembly to."""
    text = _cuobjdump(cubin, "-sass")
    if keep:
        os.makedirs(os.path.dirname(keep), exist_ok=True)
        with open(keep, "w") as f:
            f.write(text)
    ins = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in _SASS.finditer(text)]
    return ins, resources(cubin)


def _mma_flops(op, operands, num_warps):
    """(FLOP per CTA, input class) of one MMA warp instruction, or None."""
    m = _HGMMA.match(op)
    if m:  # a warpgroup (4 warps) instruction: each warpgroup of the CTA issues its own
        mm, nn, kk, t = int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)
        return 2 * mm * nn * kk * num_warps // 4, "tf32" if t == "TF32" else "bf16"
    m = _HMMA.match(op)
    if m:
        (mm, nn, kk), t = _HMMA_SHAPES[m.group(1)], m.group(2)
        return 2 * mm * nn * kk * num_warps, "tf32" if t == "TF32" else "bf16"
    if op.startswith("FFMA"):
        return 2 * 32 * num_warps, "fp32"
    return None


def analyse(ins, num_warps):
    """Static counts of the kernel and of one iteration of its innermost MMA loop (the
    smallest back-edge range holding an HGMMA/HMMA; FFMA where the kernel has neither)."""
    ops = [op for _, op, _ in ins]
    count = lambda *pre: sum(op.startswith(pre) for op in ops)  # noqa: E731
    out = dict(wgmma=count("HGMMA"), mma_sync=count("HMMA"), tma=count("UTMALDG", "UTMASTG", "UBLKCP"),
               cp_async=count("LDGSTS"), mbarrier=count("SYNCS"), stl=count("STL"), ldl=count("LDL"),
               instructions=len(ins))
    tensor = out["wgmma"] + out["mma_sync"] > 0
    is_mma = (lambda op: op.startswith(("HGMMA", "HMMA"))) if tensor else (lambda op: op.startswith("FFMA"))
    # a loop: a backward branch whose range holds no EXIT (the out-of-line mbarrier wait
    # stubs after the exit jump back into the body, but are not loops)
    exits = [a for a, op, _ in ins if op == "EXIT"]
    loops = []
    for addr, op, rest in ins:
        t = _BRA.search(rest) if op.startswith("BRA") else None
        start = int(t.group(1), 16) if t else addr + 1
        if start <= addr and not any(start <= e <= addr for e in exits):
            body = [x for x in ins if start <= x[0] <= addr]
            if any(is_mma(o) for _, o, _ in body):
                loops.append((addr - start, start, addr, body))
    if not loops:
        out["loop"] = None
        return out
    _, start, end, body = min(loops, key=lambda l: l[0])
    flops, kind = 0, None
    for _, op, rest in body:
        f = _mma_flops(op, rest, num_warps) if is_mma(op) else None
        if f:
            flops += f[0]
            kind = kind or f[1]
    body_ops = [op for _, op, _ in body if op != "NOP"]
    # tiles in flight ahead of the MMAs: async copies (cp.async commit groups, TMA loads) issued
    # before the loop, since the previous loop, over those issued per iteration (rounded down:
    # one-off loads of the prologue, e.g. a Q tile, do not count); 0 with synchronous loads only
    prev_end = max([e for _, s_, e, _ in loops if e < start] + [-1])
    ahead = []
    for kind_op in ("LDGDEPBAR", "UTMALDG"):
        per_iter = sum(op.startswith(kind_op) for op in body_ops)
        if per_iter:
            before = sum(op.startswith(kind_op) for a, op, _ in ins if prev_end < a < start)
            ahead.append(before // per_iter)
    out["loop"] = dict(
        start=hex(start), end=hex(end), instructions=len(body_ops), mma=sum(is_mma(o) for o in body_ops),
        flops=flops, kind=kind, mufu=sum(op.startswith("MUFU") for op in body_ops),
        ex2=sum(op.startswith("MUFU.EX2") for op in body_ops),
        ldg=sum(op.startswith("LDG.") or op == "LDG" for op in body_ops),
        prefetch=min(ahead) if ahead else 0)
    return out


def occupancy(gpu, regs, smem, num_warps):
    """(CTAs per SM, what limits it); 0: the CTA does not fit (a launch would fail). Registers
    are allocated per warp in 256-register units."""
    per_warp = -(-regs * 32 // 256) * 256
    lim = {"regs": gpu.regs_per_sm // max(per_warp * num_warps, 1),
           "smem": gpu.smem_per_sm // (smem + SMEM_RESERVED),
           "warps": gpu.max_warps // num_warps, "ctas": gpu.max_ctas}
    by = min(lim, key=lim.get)
    return lim[by], by


def model(gpu, loop, num_warps):
    """MODELLED ceiling of one loop iteration on one SM as a fraction of the dense bf16 peak:
    tensor-core cycles over max (overlapped) / sum (serial) of tensor, issue and MUFU cycles."""
    if not loop or not loop["flops"]:
        return None
    rate = gpu.tc_flop[loop["kind"]]
    tc = loop["flops"] / rate
    issue = loop["instructions"] * num_warps / gpu.issue_per_clk
    mufu = loop["mufu"] * num_warps * 32 / gpu.mufu_per_clk
    scale = rate / gpu.tc_flop["bf16"]
    costs = dict(tensor=tc, issue=issue, mufu=mufu)
    return dict(cycles=dict((k, round(v, 1)) for k, v in costs.items()),
                bound=max(costs, key=costs.get),
                overlap=scale * tc / max(costs.values()), serial=scale * tc / sum(costs.values()))


def report_row(gpu, launch, compiled, grid, sass_dir=None):
    meta = compiled.metadata
    keep = None
    if sass_dir:
        keep = os.path.join(sass_dir, gpu.key, f"{launch.fn.fn.__name__}_{meta.hash[:10]}.sass")
    ins, res = sass(compiled.asm["cubin"], keep)
    a = analyse(ins, meta.num_warps)
    ctas, limit = occupancy(gpu, res.get("REG", 0), meta.shared, meta.num_warps)
    loop = a.pop("loop")
    ctas_total = grid[0] * grid[1] * grid[2]
    row = dict(kernel=launch.fn.fn.__name__, note=launch.note, target=gpu.key, grid=list(grid),
               ctas=ctas_total, sm_fill=min(1.0, ctas_total / gpu.sms),
               waves=ctas_total / (gpu.sms * ctas) if ctas else None, num_warps=meta.num_warps,
               num_stages=meta.num_stages, regs=res.get("REG", 0),
               spill_bytes=res.get("STACK", 0) + res.get("LOCAL", 0),
               smem=meta.shared, ctas_per_sm=ctas, occupancy_limit=limit, **a, loop=loop)
    if loop and loop["flops"]:
        loop["instr_per_mflop"] = loop["instructions"] / (loop["flops"] / 1e6)
        # every warp of the CTA issues the loop: what the SM's schedulers issue per MFLOP, the
        # figure that compares kernels launched with different num_warps (the issue model's)
        loop["warp_instr_per_mflop"] = loop["instr_per_mflop"] * meta.num_warps
    row["modelled"] = model(gpu, loop, meta.num_warps)
    return row


# ------------------------------------------------------------------ workloads
@contextlib.contextmanager
def _tf32(on):
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# Each workload function builds the op's inputs on `device` and returns its step (forward +
# backward): the report calls it on CPU tensors under `capture`, `--time` on a GPU under
# triton.testing.do_bench. small=True: tiny shapes of the same kind (the run_gpu.sh dry run).
def _nt_xent(two_n, d, dtype, tf32=False, labels=False, device="cpu", small=False):
    from sdclr_fast import nt_xent

    two_n = 64 if small else two_n
    z = torch.randn(two_n, d, device=device).to(dtype).requires_grad_()
    # labels: the same positives (row i and i + N) given as labels of one matrix, which takes
    # the keyed kernels (labels, several views in one matrix) instead of the two-view ones
    lab = torch.arange(two_n, device=device) % (two_n // 2)

    def step():
        with _tf32(tf32):
            if labels:
                nt_xent(z, None, 0.2, labels=lab, _backend="triton").backward()
            else:
                nt_xent(z[: two_n // 2], z[two_n // 2:], 0.2, _backend="triton").backward()
    return step


def _info_nce(m, bank, d, dtype, tf32=False, device="cpu", small=False):
    from sdclr_fast import info_nce

    m, bank = (32, bank and 64) if small else (m, bank)
    q = torch.randn(m, d, device=device).to(dtype).requires_grad_()
    k = torch.randn(m, d, device=device).to(dtype).requires_grad_()
    neg = torch.randn(bank, d, device=device).to(dtype) if bank else None

    def step():
        with _tf32(tf32):
            if bank:
                info_nce(q, k, 0.2, negatives=neg, _backend="triton").backward()
            else:  # CLIP form: both directions, in-batch negatives
                info_nce(q, k, 0.2, symmetric=True, _backend="triton").backward()
    return step


@functools.lru_cache(maxsize=None)
def _conv_case(name, batch, block, device):
    import bench_masked_conv as bmc

    spec = next(s for s in bmc.RESNET18_CIFAR if s[0] == name)
    old = bmc.BLOCK
    bmc.BLOCK = block
    try:
        return bmc.setup_case(spec, "block", batch, torch.bfloat16, device, True, sparsity=0.9)
    finally:
        bmc.BLOCK = old


def _masked_conv(name, batch=256, block=(32, 32), device="cpu", small=False):
    from sdclr_fast.ops.masked_conv import masked_conv2d

    s = _conv_case(name, 2 if small else batch, block, device)
    x, w = s["x"].detach().requires_grad_(), s["w"].detach().requires_grad_()

    def step():
        y = masked_conv2d(x, w, s["mask"], None, s["stride"], s["pad"], block=block, _backend="triton")
        torch.autograd.grad(y, (x, w), s["gy"])
    return step


@functools.lru_cache(maxsize=None)
def _linear_case(name, images, kind, sparsity, device):
    import bench_masked_linear as bml

    spec = next(s for s in bml.LAYERS if s[0] == name)
    return bml.setup_case(spec, kind, sparsity, images * bml.TOKENS, torch.bfloat16, device)


def _masked_linear(name, images=256, kind="block", sparsity=0.9, device="cpu", small=False):
    from sdclr_fast.ops.masked_linear import masked_linear

    s = _linear_case(name, 1 if small else images, kind, sparsity, device)
    x, w = s["x"].detach().requires_grad_(), s["w"].detach().requires_grad_()

    def step():
        y = masked_linear(x, w, s["mask"], _backend="triton")
        torch.autograd.grad(y, (x, w), s["gy"])
    return step


def _anchor(which, device="cpu", small=False):
    import kernel_anchors as ka

    def alloc(*shape):  # the report never reads them; a timed run gets real values
        return (torch.empty if device == "cpu" and not small else torch.randn)(
            *shape, device=device, dtype=torch.bfloat16)
    if which.startswith("attention"):
        q, k, v = (alloc(1, 2, 256, 128) if small else alloc(4, 32, 4096, 128) for _ in range(3))
        return lambda: ka.attention_fwd(q, k, v, tma=which.endswith("tma"))
    a, b = (alloc(256, 256) if small else alloc(8192, 8192) for _ in range(2))
    return lambda: ka.matmul(a, b, tma=which.endswith("tma"))


COARSE_BLOCKS = ((64, 64), (128, 64), (128, 128))
COARSE_LAYERS = ("layer1.conv", "layer2.conv", "layer3.conv", "layer2.0.shortcut")


@dataclasses.dataclass(frozen=True)
class Workload:
    """One named workload: the report captures and compiles the launches of `make()()` on CPU
    tensors; `--time` times `make(device="cuda")`'s step."""
    op: str
    label: str
    make: object  # (device="cpu", small=False) -> step(): the op's forward + backward
    quick: bool = False  # part of the reduced set (--quick, tests)
    flops: float = 0.0  # of one step, where known (--time prints TFLOP/s)
    # {kernel name: its share of the step's tensor work}: the report then models the whole
    # step (`step_ceilings`); kernels left out are treated as free
    flop_share: tuple = ()


def _workloads():
    attn, mm = 4 * 4 * 32 * 4096 ** 2 * 128, 2 * 8192 ** 3
    w = [Workload("anchor", "attention fwd, TMA 128x128, Z4 H32 N4096 D128 bf16",
                  functools.partial(_anchor, "attention_tma"), quick=True, flops=attn),
         Workload("anchor", "attention fwd, pointers 128x64, Z4 H32 N4096 D128 bf16",
                  functools.partial(_anchor, "attention_ptr"), quick=True, flops=attn),
         Workload("anchor", "matmul 128x256x64, pointers, 8192^3 bf16",
                  functools.partial(_anchor, "matmul_ptr"), quick=True, flops=mm),
         Workload("anchor", "matmul 128x256x64, TMA, 8192^3 bf16",
                  functools.partial(_anchor, "matmul_tma"), flops=mm)]
    for two_n in (4096, 65536):
        for dtype, tf32, tag in ((torch.bfloat16, False, "bf16"), (torch.float32, True, "fp32 tf32"),
                                 (torch.float32, False, "fp32 ieee")):
            # forward one score matmul, backward two (the scores again and dz)
            w.append(Workload("nt_xent", f"2N={two_n} D=128 {tag}",
                              functools.partial(_nt_xent, two_n, 128, dtype, tf32),
                              quick=two_n == 4096 and tag == "bf16", flops=3 * 2 * two_n ** 2 * 128,
                              flop_share=(("_nt_xent_fwd_kernel", 1 / 3), ("_nt_xent_bwd_kernel", 2 / 3))))
    w.append(Workload("nt_xent", "labels 2N=4096 D=128 bf16",
                      functools.partial(_nt_xent, 4096, 128, torch.bfloat16, labels=True),
                      flops=3 * 2 * 4096 ** 2 * 128,
                      flop_share=(("_nt_xent_fwd_kernel", 1 / 3), ("_nt_xent_bwd_kernel", 2 / 3))))
    w += [Workload("info_nce", "MoCo M=1024 Q=65536 D=128 bf16",
                   functools.partial(_info_nce, 1024, 65536, 128, torch.bfloat16)),
          Workload("info_nce", "CLIP M=32768 D=128 bf16",
                   functools.partial(_info_nce, 32768, 0, 128, torch.bfloat16))]
    import bench_masked_conv as bmc

    for spec in bmc.RESNET18_CIFAR:
        w.append(Workload("masked_conv", f"{spec[0]} b256 bf16 CL 32x32 90%",
                          functools.partial(_masked_conv, spec[0]),
                          quick=spec[0] == "layer2.conv"))
    # coarser pruning blocks (--prune-block OUTxIN): the weight tile follows the block
    # (quick: the 1x1 stride-2 shortcut at 128x128, whose grad_weight once spilled at 4 warps)
    for block in COARSE_BLOCKS:
        for name in COARSE_LAYERS:
            w.append(Workload("masked_conv", f"{name} b256 bf16 CL {block[0]}x{block[1]} 90%",
                              functools.partial(_masked_conv, name, block=block),
                              quick=(name, block) == ("layer2.0.shortcut", (128, 128))))
    # ViT projections at 256 images x 197 tokens (bench_masked_linear's goal shapes)
    for name in ("vit_b.fc1", "vit_b.fc2", "vit_s.qkv", "vit_s.proj"):
        w.append(Workload("masked_linear", f"{name} 256x197 bf16 32x32 90%",
                          functools.partial(_masked_linear, name)))
    return w


# ------------------------------------------------------------------ what coarser blocks do to pruning
def prune_block_effect(blocks=COARSE_BLOCKS, sparsity=0.9, seed=0):
    """Global magnitude pruning (SDCLR's scope) of every conv weight of a CIFAR ResNet-18 at
    `sparsity` with 32x32 blocks vs each coarser block: the fraction of all weights whose
    keep / prune decision differs, and the fraction of the 32x32 mask's kept weights that the
    coarser mask keeps too. Seeded random init (no trained checkpoint here): layers differ in
    init scale, so this measures the block shape, not a trained network's structure."""
    from sdclr_fast.nn.resnet import resnet18
    from sdclr_fast.ops.prune import magnitude_masks

    torch.manual_seed(seed)
    ws = [p.detach() for p in resnet18().parameters() if p.dim() == 4]
    n = sum(w.numel() for w in ws)
    ref = magnitude_masks(ws, sparsity, block=(32, 32), clip_block=True)
    kept = sum(int(m.sum()) for m in ref)
    out = [dict(block="unstructured", differ=sum(int((a != b).sum()) for a, b in
                                                 zip(ref, magnitude_masks(ws, sparsity))) / n)]
    for block in blocks:
        masks = magnitude_masks(ws, sparsity, block=block, clip_block=True)
        out.append(dict(block=f"{block[0]}x{block[1]}",
                        differ=sum(int((a != b).sum()) for a, b in zip(ref, masks)) / n,
                        kept_of_32x32=sum(int((a & b).sum()) for a, b in zip(ref, masks)) / kept,
                        density=sum(int(m.sum()) for m in masks) / n))
    return dict(sparsity=sparsity, weights=n, seed=seed, rows=out)


# ------------------------------------------------------------------ one target (child process)
def run_target(gpu, workloads, log=print, sass_dir=None):
    rows, seen = [], {}
    for wl in workloads:
        t0 = time.time()
        with as_gpu(gpu), capture() as launches:
            wl.make()()
        for launch in launches:
            compiled, grid, key = compile_launch(launch, gpu)
            if key not in seen:
                seen[key] = report_row(gpu, launch, compiled, (1, 1, 1), sass_dir)
            row = dict(seen[key], op=wl.op, workload=wl.label, grid=list(grid))
            row["ctas"] = grid[0] * grid[1] * grid[2]
            row["sm_fill"] = min(1.0, row["ctas"] / gpu.sms)
            row["waves"] = row["ctas"] / (gpu.sms * row["ctas_per_sm"]) if row["ctas_per_sm"] else None
            dup = next((r for r in rows if r["workload"] == wl.label and r["kernel"] == row["kernel"]
                        and r["grid"] == row["grid"] and r["key"] == repr(key)), None)
            if dup is None:
                row["key"] = repr(key)
                rows.append(row)
        log(f"{gpu.key} {wl.op}: {wl.label}: {len(launches)} launches, {time.time() - t0:.1f} s")
    return rows


def step_ceilings(rows, workloads):
    """MODELLED ceiling of whole steps: 1 / sum(share_k / ceiling_k) over the kernels of a
    workload that declares its kernels' shares of the tensor work (with and without overlap),
    per target; the grid's SM fill is folded in (a CTA per SM at most: idle SMs add no work)."""
    out = []
    for wl in workloads:
        if not wl.flop_share:
            continue
        share = dict(wl.flop_share)
        for target in sorted({r["target"] for r in rows}):
            ks = [r for r in rows if r["workload"] == wl.label and r["op"] == wl.op
                  and r["target"] == target and r["kernel"] in share and r.get("modelled")]
            if {r["kernel"] for r in ks} != set(share):
                continue
            res = dict(op=wl.op, workload=wl.label, target=target)
            for how in ("overlap", "serial"):
                # kernels launched several times (variants) split their share evenly
                n = {k: sum(r["kernel"] == k for r in ks) for k in share}
                res[how] = 1 / sum(share[r["kernel"]] / n[r["kernel"]]
                                   / (r["modelled"][how] * r["sm_fill"]) for r in ks)
            out.append(res)
    return out


# ------------------------------------------------------------------ timed rows (GPU)
def time_workloads(workloads, device, small, budget_s, log=print):
    """Measured milliseconds of each workload's step (forward + backward; anchors: forward)
    on `device`: triton.testing.do_bench on CUDA, one call on the CPU (the dry run). No new
    workload starts after budget_s seconds; a failing one is recorded, not raised."""
    rows, t0 = [], time.time()
    for wl in workloads:
        row = dict(op=wl.op, workload=wl.label, device=str(device), small=small)
        if time.time() - t0 > budget_s:
            rows.append(dict(row, status="skipped (time budget)"))
            continue
        try:
            step = wl.make(device=device, small=small)
            step()  # compiles
            if torch.device(device).type == "cuda":
                import triton.testing

                ms = float(triton.testing.do_bench(step, warmup=5, rep=50, return_mode="median"))
            else:
                t = time.perf_counter()
                step()
                ms = (time.perf_counter() - t) * 1e3
            row.update(status="ok", ms=ms)
            if wl.flops and not small:
                row.update(tflops=wl.flops / ms / 1e9, of_bf16_peak=wl.flops / ms / 1e9 / 990)
        except Exception as exc:  # noqa: BLE001 - one broken workload must not hide the rest
            row.update(status=f"error: {type(exc).__name__}: {str(exc)[:200]}")
        rows.append(row)
        log(f"{wl.op}: {wl.label}: {row.get('ms', float('nan')):.3f} ms ({row['status']})")
    return rows


def timed_markdown(rows):
    lines = ["| op | workload | ms (measured) | TFLOP/s | of 990 bf16 | status |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['workload']} | {_f(r.get('ms'), '{:.3f}')} | "
                     f"{_f(r.get('tflops'), '{:.0f}')} | "
                     f"{_f(r.get('of_bf16_peak') and 100 * r['of_bf16_peak'], '{:.0f} %')} | {r['status']} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ markdown
def _f(v, fmt="{:.0f}"):
    return "-" if v is None else fmt.format(v)


HEADER = ("| op | workload | kernel | target | regs | stack B | smem KB | CTA/SM | wgmma | mma.sync "
          "| TMA | cp.async | mbar | loop instr | instr/MFLOP | warp instr/MFLOP | MUFU/iter | prefetch | grid | SM fill "
          "| modelled ceil. overlap | modelled ceil. serial | bound |")


def markdown(rows, meta):
    lines = [f"# Kernel report (static; modelled figures are modelled, not measured)", "",
             f"Triton {meta['triton']}, generated {meta['date']}; targets "
             + ", ".join(f"{g['key']} = {g['name']} ({g['sms']} SMs, {g['peak_tflops']:.0f} TFLOP/s bf16 dense)"
                         for g in meta["gpus"]), "",
             HEADER, "|" + "|".join(" --- " for _ in range(HEADER.count("|") - 1)) + "|"]
    for r in rows:
        loop, mod = r.get("loop") or {}, r.get("modelled") or {}
        kname = r["kernel"] + (f" ({r['note']})" if r.get("note") else "")
        lines.append("| " + " | ".join([
            r["op"], r["workload"], kname, r["target"], str(r["regs"]), str(r["spill_bytes"]),
            f"{r['smem'] / 1024:.1f}", f"{r['ctas_per_sm']} ({r['occupancy_limit']})",
            str(r["wgmma"]), str(r["mma_sync"]), str(r["tma"]), str(r["cp_async"]), str(r["mbarrier"]),
            _f(loop.get("instructions")), _f(loop.get("instr_per_mflop")),
            _f(loop.get("warp_instr_per_mflop")), _f(loop.get("mufu")),
            _f(loop.get("prefetch"), "{:g}"), "x".join(map(str, r["grid"][:2] if r["grid"][2] == 1 else r["grid"]))
            + f" = {r['ctas']}", f"{100 * r['sm_fill']:.0f} %",
            _f(mod.get("overlap") and 100 * mod["overlap"], "{:.0f} %"),
            _f(mod.get("serial") and 100 * mod["serial"], "{:.0f} %"), mod.get("bound", "-")]) + " |")
    steps = meta.get("step_ceilings")
    if steps:
        lines += ["", "Whole steps (forward + backward, kernels weighted by their share of the tensor work, "
                  "SM fill folded in), modelled:", "",
                  "| op | workload | target | modelled ceil. overlap | modelled ceil. serial |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['op']} | {r['workload']} | {r['target']} | {100 * r['overlap']:.0f} % | "
                  f"{100 * r['serial']:.0f} % |" for r in steps]
    pe = meta.get("prune_block_effect")
    if pe:
        lines += ["", f"Global magnitude pruning of ResNet-18's {pe['weights']:,} conv weights at "
                  f"{100 * pe['sparsity']:.0f} % (seeded random init), against the 32x32 block mask:", "",
                  "| block | weights that differ | 32x32-kept weights still kept |", "| --- | --- | --- |"]
        for r in pe["rows"]:
            k = r.get("kept_of_32x32")
            lines.append(f"| {r['block']} | {100 * r['differ']:.1f} % | "
                         + ("-" if k is None else f"{100 * k:.1f} %") + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ command line
def _child(args):
    if os.environ.get("TRITON_INTERPRET") != "0":
        raise SystemExit("the report's child needs TRITON_INTERPRET=0 before Triton kernels load")
    torch.manual_seed(0)
    names = set(args.workload_ids.split(",")) if args.workload_ids else None
    wls = [w for i, w in enumerate(_workloads()) if names is None or str(i) in names]
    rows = run_target(GPUS[args.child], wls, log=lambda s: print(s, file=sys.stderr, flush=True),
                      sass_dir=args.sass and os.path.join(args.out, "sass"))
    json.dump(rows, sys.stdout)


def select(workloads, quick, only):
    pat = re.compile(only) if only else None
    return [i for i, w in enumerate(workloads)
            if (not quick or w.quick) and (pat is None or pat.search(f"{w.op} {w.label}"))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--targets", default="sm_90,sm_80", help="comma list of " + ", ".join(GPUS))
    ap.add_argument("--quick", action="store_true", help="the reduced workload set")
    ap.add_argument("--only", default=None, help="regex over 'op label' of the workloads")
    ap.add_argument("--out", default=os.path.join(_HERE, "results"), help="output folder")
    ap.add_argument("--no-prune-effect", action="store_true",
                    help="skip the 32x32-vs-coarser block pruning comparison (about 30 s)")
    ap.add_argument("--sass", action="store_true", help="also write each kernel's SASS to OUT/sass/")
    ap.add_argument("--time", action="store_true",
                    help="time the workloads on --device instead (a GPU; writes kernel_workloads_timed.*)")
    ap.add_argument("--device", default="cuda", help="--time: cuda, or cpu for a dry run")
    ap.add_argument("--small", action="store_true", help="--time: tiny shapes (dry run)")
    ap.add_argument("--budget-s", type=float, default=150, help="--time: start no workload after this")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workload-ids", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args)
    import triton

    workloads = _workloads()
    ids = select(workloads, args.quick, args.only)
    if not ids:
        raise SystemExit(f"--only {args.only!r} matches no workload")
    if args.time:
        from sdclr_fast.files import write_json, write_text

        rows = time_workloads([workloads[i] for i in ids], args.device, args.small, args.budget_s,
                              log=lambda m: print(m, flush=True))
        name = os.path.join(args.out, "kernel_workloads_timed")
        write_json(name + ".json", dict(rows=rows, triton=triton.__version__), what="timed workloads")
        md = timed_markdown(rows)
        write_text(name + ".md", md, what="timed workloads")
        print(md)
        return 0 if all(r["status"].startswith(("ok", "skipped")) for r in rows) else 1
    targets = args.targets.split(",")
    for t in targets:
        if t not in GPUS:
            raise SystemExit(f"--targets takes {', '.join(GPUS)}; got {t!r}")
    env = dict(os.environ, TRITON_INTERPRET="0")
    procs = [(t, subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", t,
                                   "--workload-ids", ",".join(map(str, ids)), "--out", args.out]
                                  + (["--sass"] if args.sass else []),
                                  env=env, stdout=subprocess.PIPE, text=True)) for t in targets]
    # while the children compile
    pe = None if (args.quick or args.no_prune_effect or args.only) else prune_block_effect()
    rows = []
    for t, p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"kernel report for {t} failed (exit {p.returncode})")
        rows += json.loads(out)
    order = {t: i for i, t in enumerate(targets)}
    rows.sort(key=lambda r: (order[r["target"]],))  # stable: workload order within a target
    meta = dict(triton=triton.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                gpus=[dict(dataclasses.asdict(GPUS[t]), peak_tflops=GPUS[t].peak_tflops) for t in targets],
                note="modelled figures model one iteration of the innermost MMA loop; not measured")
    meta["step_ceilings"] = step_ceilings(rows, [workloads[i] for i in ids])
    if pe is not None:
        meta["prune_block_effect"] = pe
    os.makedirs(args.out, exist_ok=True)
    from sdclr_fast.files import write_json, write_text

    write_json(os.path.join(args.out, "kernel_report.json"), dict(meta=meta, rows=rows),
               what="the kernel report")
    md = markdown(rows, meta)
    write_text(os.path.join(args.out, "kernel_report.md"), md, what="the kernel report")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
