"""masked_conv2d against F.conv2d(x, weight * mask): values and gradients, both backends.

Without a GPU the Triton kernels run on CPU tensors in the interpreter (TRITON_INTERPRET=1, which
conftest.py sets where there is no CUDA device); with a GPU they run on it, compiled.
Low-precision results follow the flash-attention rule: error against a float64 reference at
most 2x the error of the same-dtype PyTorch reference, plus a tiny atol.
"""
import os

import torch

CUDA = torch.cuda.is_available()

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sdclr_fast.ops.masked_conv import default_block, masked_conv2d, prepare_mask  # noqa: E402
from sdclr_fast.ops.reference import masked_conv2d_reference  # noqa: E402

TRITON_DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HYP = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def _ieee_fp32_on_gpu():
    """The kernels follow cudnn.allow_tf32 like F.conv2d, but cuDNN may still pick a non-TF32
    algorithm for some shapes; compare fp32 at full precision on both sides."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


# ------------------------------------------------------------------ helpers
def make_mask(kind, shape, gen, block=(16, 16), p=0.5):
    O, Cg, KH, KW = shape
    if kind == "zeros":
        return torch.zeros(shape, dtype=torch.bool)
    if kind == "ones":
        return torch.ones(shape, dtype=torch.bool)
    if kind == "random":
        return torch.rand(shape, generator=gen) < p
    if kind == "block":  # whole (bo, bi) blocks of the (O, Cg) plane, every tap together
        bo, bi = block
        blocks = torch.rand((-(-O // bo), -(-Cg // bi)), generator=gen) < p
        keep = blocks.repeat_interleave(bo, 0)[:O].repeat_interleave(bi, 1)[:, :Cg]
        return keep[:, :, None, None].expand(shape).contiguous()
    if kind == "block_tap":  # blocks chosen per tap
        bo, bi = block
        blocks = torch.rand((-(-O // bo), -(-Cg // bi), KH, KW), generator=gen) < p
        return blocks.repeat_interleave(bo, 0)[:O].repeat_interleave(bi, 1)[:, :Cg].contiguous()
    raise ValueError(kind)


def run(fn, x, w, m, b, gy, **conf):
    """Output and (grad_x, grad_w, grad_b) of fn with fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w)]
    bl = None if b is None else b.detach().clone().requires_grad_()
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        leaves[0] = leaves[0].detach().to(memory_format=torch.channels_last).requires_grad_()
    y = fn(leaves[0], leaves[1], m, bl, **conf)
    inputs = leaves + ([bl] if bl is not None else [])
    grads = torch.autograd.grad(y, inputs, gy.to(y.dtype))
    return [y.detach()] + [g.detach() for g in grads]


def err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def run_reference(x, w, m, b, gy, **conf):
    """masked_conv2d_reference in x's dtype. On the CPU a bfloat16 one runs in float32 and
    rounds once: oneDNN's own bfloat16 weight gradient returns uninitialised memory for some
    grouped strided shapes (see test_cpu_bfloat16_weight_grad_is_right)."""
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        up = [None if t is None else t.float() for t in (x, w, b, gy)]
        return [t.bfloat16() for t in run_reference(up[0], up[1], m, up[2], up[3], **conf)]
    return run(masked_conv2d_reference, x, w, m, b, gy, **conf)


def check_against_reference(x, w, m, b, gy, backend, **conf):
    """Op in x's dtype vs float64 reference; its error must be <= 2x the same-dtype PyTorch
    reference's error + atol."""
    dtype = x.dtype
    block = conf.pop("block", None)
    ours = run(lambda *a, **k: masked_conv2d(*a, **k, block=block, _backend=backend), x, w, m, b,
               gy, **conf)
    f64 = run(masked_conv2d_reference, x.double(), w.double(), m, None if b is None else b.double(),
              gy.double(), **conf)
    same = run_reference(x, w, m, b, gy, **conf)
    names = ["out", "grad_x", "grad_w", "grad_b"]
    eps = torch.finfo(dtype).eps
    for name, o, r, s in zip(names, ours, f64, same):
        assert o.shape == r.shape, name
        assert o.dtype == dtype, name
        atol = 4 * eps * max(1.0, r.abs().max().item())
        assert err(o, r) <= 2 * err(s, r) + atol, (name, err(o, r), err(s, r), atol)
    # pruned weights get exactly zero gradient from this op
    assert not ours[2][~m.bool().to(ours[2].device)].any()
    return ours


conv_cases = st.fixed_dictionaries({
    "n": st.integers(1, 2),
    "groups": st.sampled_from([1, 1, 2, 3]),
    "cg": st.integers(1, 6),
    "og": st.integers(1, 6),
    "k": st.sampled_from([1, 3, 5, 7]),
    "k2": st.sampled_from([None, 1, 3]),  # None: square kernel
    "stride": st.sampled_from([1, 2, 3, (1, 2)]),
    "dilation": st.sampled_from([1, 2, (2, 1)]),
    "padding": st.sampled_from([0, 1, 2, 3, (1, 0), "same", "valid"]),
    "h": st.integers(1, 9),
    "w": st.integers(1, 9),
    "mask": st.sampled_from(["random", "random", "block", "block_tap", "zeros", "ones"]),
    "density": st.sampled_from([0.1, 0.5, 0.9]),
    "bias": st.booleans(),
    "channels_last": st.booleans(),
    "seed": st.integers(0, 2**16),
})


def build(case, dtype, device):
    gen = torch.Generator().manual_seed(case["seed"])
    kh, kw = case["k"], case["k2"] or case["k"]
    stride = case["stride"]
    if case["padding"] == "same":
        stride = 1
    conf = dict(stride=stride, padding=case["padding"], dilation=case["dilation"],
                groups=case["groups"])
    d = conf["dilation"] if isinstance(conf["dilation"], tuple) else (conf["dilation"],) * 2
    p = case["padding"]
    p = (0, 0) if p in ("same", "valid") else (p if isinstance(p, tuple) else (p, p))
    if case["padding"] == "same":
        p = (d[0] * (kh - 1) // 2, d[1] * (kw - 1) // 2)
    # make the input large enough for at least one output pixel
    h = max(case["h"], d[0] * (kh - 1) + 1 - 2 * p[0])
    w_ = max(case["w"], d[1] * (kw - 1) + 1 - 2 * p[1])
    g = case["groups"]
    x = torch.randn((case["n"], case["cg"] * g, h, w_), generator=gen)
    wt = torch.randn((case["og"] * g, case["cg"], kh, kw), generator=gen) / (case["cg"] * kh * kw) ** 0.5
    m = make_mask(case["mask"], wt.shape, gen, block=(2, 2), p=case["density"])
    b = torch.randn(case["og"] * g, generator=gen) if case["bias"] else None
    y_shape = F.conv2d(x, wt, None, **conf).shape
    gy = torch.randn(y_shape, generator=gen)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    x, wt, b, gy = cast(x), cast(wt), cast(b), cast(gy)
    if case["channels_last"]:  # as after model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
        wt = wt.to(memory_format=torch.channels_last)
    return x, wt, m.to(device), b, gy, conf


# ------------------------------------------------------------------ Triton kernels
@pytest.mark.slow
@settings(max_examples=40, **HYP)
@given(case=conv_cases, dtype=st.sampled_from(DTYPES))
def test_triton_matches_reference(case, dtype):
    x, w, m, b, gy, conf = build(case, dtype, TRITON_DEVICE)
    check_against_reference(x, w, m, b, gy, "triton", **conf)


@pytest.mark.slow
@settings(max_examples=12, **HYP)
@given(groups=st.sampled_from([1, 2]), cg=st.sampled_from([1, 15, 17, 33, 40]),
       og=st.sampled_from([3, 16, 31, 40]), k=st.sampled_from([1, 3]), stride=st.integers(1, 2),
       kind=st.sampled_from(["block", "block_tap", "random"]),
       block=st.sampled_from([(16, 16), (32, 32), (8, 16)]), p=st.sampled_from([0.1, 0.5]),
       dtype=st.sampled_from(DTYPES), channels_last=st.booleans(), seed=st.integers(0, 999))
def test_triton_many_tiles(groups, cg, og, k, stride, kind, block, p, dtype, channels_last, seed):
    """Channel counts across tile edges with block masks: skipped, partial and full tiles."""
    case = dict(n=1, groups=groups, cg=cg, og=og, k=k, k2=None, stride=stride, dilation=1,
                padding=k // 2, h=4, w=3, mask="random", density=p, bias=True,
                channels_last=channels_last, seed=seed)
    x, w, _, b, gy, conf = build(case, dtype, TRITON_DEVICE)
    m = make_mask(kind, w.shape, torch.Generator().manual_seed(seed), block=block, p=p)
    check_against_reference(x, w, m.to(TRITON_DEVICE), b, gy, "triton", **conf)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch(backend):
    dev = "cpu" if backend == "torch" else TRITON_DEVICE
    x = torch.randn(0, 4, 5, 5, device=dev, requires_grad=True)
    w = torch.randn(3, 4, 3, 3, device=dev, requires_grad=True)
    b = torch.randn(3, device=dev, requires_grad=True)
    m = torch.rand(3, 4, 3, 3, device=dev) < 0.5
    y = masked_conv2d(x, w, m, b, padding=1, _backend=backend)
    assert y.shape == (0, 3, 5, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape and not w.grad.any() and not b.grad.any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["random", "zeros", "ones"])
def test_triton_small_fixed(dtype, mask_kind):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 7, 5, generator=gen)
    w = torch.randn(4, 3, 3, 3, generator=gen) / 3
    m = make_mask(mask_kind, w.shape, gen)
    b = torch.randn(4, generator=gen)
    gy = torch.randn(2, 4, 4, 3, generator=gen)
    dev = TRITON_DEVICE
    check_against_reference(x.to(dev, dtype), w.to(dev, dtype), m.to(dev), b.to(dev, dtype),
                            gy.to(dev, dtype), "triton", stride=2, padding=1, dilation=1, groups=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,block,tile", [("block", (32, 32), None), ("block_tap", (16, 16), None),
                                             ("random", None, None), ("block", (16, 16), (16, 64)),
                                             ("block_tap", (64, 16), (64, 16))])
def test_triton_multi_tile_block_masks(dtype, kind, block, tile):
    """Several weight tiles per tap, some empty: the skipped tiles must not change the result."""
    gen = torch.Generator().manual_seed(2)
    O, C = 64, 48
    x = torch.randn(1, C, 4, 5, generator=gen)
    w = torch.randn(O, C, 3, 3, generator=gen) / (C * 9) ** 0.5
    m = make_mask(kind, w.shape, gen, block=block or (1, 1), p=0.3)
    gy = torch.randn(1, O, 4, 5, generator=gen)
    dev = TRITON_DEVICE
    conf = dict(padding=1) if tile is None else dict(padding=1, block=tile)
    check_against_reference(x.to(dev, dtype), w.to(dev, dtype), m.to(dev), None,
                            gy.to(dev, dtype), "triton", **conf)
    tiles = prepare_mask(m.to(dev), block=tile)
    if kind != "random":
        assert tiles.tile_density < 1.0


@pytest.mark.parametrize("stride, padding", [(1, 0), (2, 0), (2, 1)])
def test_triton_one_by_one_kernels(stride, padding):
    """1x1 convolutions (ResNet shortcuts) take their own grad_weight branch (one tap, kh = kw =
    0 at compile time): values and all three gradients against the reference, several weight
    tiles with some empty."""
    gen = torch.Generator().manual_seed(3)
    O, C = 64, 48
    x = torch.randn(2, C, 5, 6, generator=gen)
    w = torch.randn(O, C, 1, 1, generator=gen) / C ** 0.5
    m = make_mask("block", w.shape, gen, block=(16, 16), p=0.4)
    y = F.conv2d(x, w, None, stride=stride, padding=padding)
    gy = torch.randn(y.shape, generator=gen)
    dev = TRITON_DEVICE
    check_against_reference(x.to(dev), w.to(dev), m.to(dev), None, gy.to(dev), "triton", stride=stride,
                            padding=padding, block=(16, 16))


@pytest.mark.parametrize("dtype, stride", [(torch.float32, 1), (torch.bfloat16, 1), (torch.float32, (2, 3))])
def test_triton_more_taps_than_the_tap_bitmask(dtype, stride):
    """A 7x6 kernel has 42 taps, more than the 32-bit in-bounds tap mask holds: the forward and
    grad_input (unit stride, and by phases at stride 2 x 3) test bounds inside the K loop
    instead (dilated, uneven kernel)."""
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(1, 5, 9, 8, generator=gen)
    w = torch.randn(6, 5, 7, 6, generator=gen) / 15
    m = make_mask("random", w.shape, gen)
    conf = dict(stride=stride, padding=(2, 3), dilation=(1, 2))
    gy = torch.randn(F.conv2d(x, w, **conf).shape, generator=gen)
    dev = TRITON_DEVICE
    check_against_reference(x.to(dev, dtype), w.to(dev, dtype), m.to(dev), None, gy.to(dev, dtype),
                            "triton", **conf)


@settings(max_examples=40, **HYP)
@given(k=st.tuples(st.integers(1, 4), st.integers(1, 4)), s=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       pad=st.tuples(st.integers(0, 3), st.integers(0, 3)), dil=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       seed=st.integers(0, 2 ** 16))
def test_phase_steps_list_the_taps_that_reach_each_phase(k, s, pad, dil, seed):
    """grad_input's per-phase step lists of a strided conv: for input pixels with (h % sh,
    w % sw) = phase, exactly the steps of the unit-stride list (same order, same packed tile)
    whose tap reaches that phase, i.e. (phase + pad - tap * dil) % stride == 0 per axis."""
    gen = torch.Generator().manual_seed(seed)
    m = make_mask("block", (40, 24, *k), gen, block=(16, 16), p=0.5)
    t = prepare_mask(m, 1, (16, 16))
    idx, pk, cnt = t.phase_steps(s, pad, dil)
    rows = t.c_tiles
    assert idx.shape == (s[0] * s[1] * rows, t.bwd_idx.shape[1]) and cnt.dtype == torch.int32
    for ph in range(s[0]):
        for pw in range(s[1]):
            for ct in range(rows):
                r = (ph * s[1] + pw) * rows + ct
                steps = [(int(i), int(p)) for i, p in zip(t.bwd_idx[ct, :t.bwd_cnt[ct]], t.bwd_pk[ct, :t.bwd_cnt[ct]])]
                want = [(i, p) for i, p in steps
                        if (ph + pad[0] - (i // t.o_tiles // k[1]) * dil[0]) % s[0] == 0
                        and (pw + pad[1] - (i // t.o_tiles % k[1]) * dil[1]) % s[1] == 0]
                got = list(zip(idx[r, :cnt[r]].tolist(), pk[r, :cnt[r]].tolist()))
                assert got == want
    assert t.phase_steps(s, pad, dil)[0] is idx  # cached per geometry


def test_default_config_fits_shared_memory(monkeypatch):
    """Without a tuned entry: 5 stages for the GEMM (operands 2 steps ahead), 3 for grad_weight,
    and the largest BLOCK_M whose buffers fit the device's shared memory per block."""
    from sdclr_fast.ops.masked_conv import _kernels

    k = _kernels()
    monkeypatch.setattr(k, "_device_index", lambda device: 0)
    monkeypatch.setattr(k, "_smem_per_block", lambda index: 232448)  # H100
    dev = torch.device("cpu")
    assert k.default_config("gemm", 32, 32, 2, dev) == dict(BLOCK_M=256, num_warps=8, num_stages=5)
    # grad_input of a 128x64 tile: 3 x (256 x 128 + 128 x 64) bf16 = 245 KB does not fit
    assert k.default_config("gemm", 128, 64, 2, dev) == dict(BLOCK_M=128, num_warps=4, num_stages=5)
    assert k.default_config("gemm", 128, 64, 4, dev)["BLOCK_M"] == 64  # fp32
    # a 128-wide MMA takes 8 warps (4 alone sit at ~250 registers at 128 rows on sm_90)
    assert k.default_config("gemm", 128, 128, 2, dev) == dict(BLOCK_M=128, num_warps=8, num_stages=5)
    assert k.default_config("wgt", 32, 32, 2, dev) == dict(BLOCK_M=128, num_warps=4, num_stages=3)
    monkeypatch.setattr(k, "_smem_per_block", lambda index: 166912)  # A100
    assert k.default_config("gemm", 64, 128, 2, dev)["BLOCK_M"] == 256  # 3 x 48 KB fits
    assert k.default_config("gemm", 128, 128, 2, dev) == dict(BLOCK_M=64, num_warps=8, num_stages=5)  # 3 x 64 KB at 128 does not fit


def test_triton_noncontiguous_grad_and_weight():
    """grad_y with stride 0 (from .sum()), a weight that is a transposed view, a strided bias."""
    dev = TRITON_DEVICE
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 6, 6, generator=gen).to(dev).requires_grad_()
    w_store = torch.randn(5, 7, 3, 3, generator=gen).to(dev)
    w = w_store.transpose(0, 1).requires_grad_()  # (7, 5, 3, 3), non-contiguous leaf-like view
    m = (torch.rand(7, 5, 3, 3, generator=gen) < 0.6).to(dev)
    b = torch.randn(14, generator=gen).to(dev)[::2]  # strided bias view
    masked_conv2d(x, w, m, b, padding=1, _backend="triton").sum().backward()
    x2 = x.detach().clone().requires_grad_()
    w2 = w.detach().clone().requires_grad_()
    torch.testing.assert_close(masked_conv2d(x2, w2, m, b, padding=1, _backend="triton"),
                               F.conv2d(x2, w2 * m, b, padding=1), rtol=1e-5, atol=1e-5)
    F.conv2d(x2, w2 * m, b, padding=1).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-5)


def test_triton_grad_weight_split_reduction():
    """The M reduction split into several slices (as on a GPU for large batches) sums right."""
    from sdclr_fast.ops.masked_conv import _kernels

    k = _kernels()
    dev = TRITON_DEVICE
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 9, 9, generator=gen).to(dev)
    gy = torch.randn(2, 6, 9, 9, generator=gen).to(dev)
    m = (torch.rand(6, 4, 3, 3, generator=gen) < 0.5).to(dev)
    tiles = prepare_mask(m)
    geom = ((1, 1), (1, 1), (1, 1), 1)
    w = torch.zeros(6, 4, 3, 3, device=dev, requires_grad=True)
    ref = torch.autograd.grad(F.conv2d(x, w * m, padding=1), w, gy)[0]
    for splits in (1, 2, 3, 7):
        got = k.backward_weight(x, gy, tiles.mask, tiles, geom, torch.float32, splits=splits)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_fp32_dot_precision_follows_cudnn_flag():
    from sdclr_fast.ops.masked_conv import _kernels

    k = _kernels()
    torch.backends.cudnn.allow_tf32 = False  # restored by the autouse fixture
    assert k._dot_precision(torch.float32) == "ieee"
    torch.backends.cudnn.allow_tf32 = True
    assert k._dot_precision(torch.float32) == ("ieee" if k.interpreting() else "tf32")
    assert k._dot_precision(torch.bfloat16) == "tf32"  # the default, ignored for 16-bit inputs
    # the cached launch config follows the flag too
    torch.backends.cudnn.allow_tf32 = False
    assert k._config(torch.float32)[0]["PRECISION"] == "ieee"
    torch.backends.cudnn.allow_tf32 = True
    assert k._config(torch.float32)[0]["PRECISION"] == ("ieee" if k.interpreting() else "tf32")


def test_pruned_nonfinite_weights():
    """Triton: pruned entries contribute exactly zero even when they hold inf/nan (empty tiles
    are never read). PyTorch path: propagates them exactly as F.conv2d(x, weight * mask)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 5, 5, generator=gen)
    w = torch.randn(3, 4, 3, 3, generator=gen)
    m = torch.rand(3, 4, 3, 3, generator=gen) < 0.5
    w_bad = w.clone()
    w_bad[~m] = float("nan")
    w_bad[~m & (torch.rand(w.shape, generator=gen) < 0.5)] = float("inf")
    y = masked_conv2d(x.to(TRITON_DEVICE), w_bad.to(TRITON_DEVICE), m.to(TRITON_DEVICE),
                      _backend="triton")
    torch.testing.assert_close(y.cpu(), F.conv2d(x, w * m), rtol=1e-5, atol=1e-5)
    y_torch = masked_conv2d(x, w_bad, m, _backend="torch")
    torch.testing.assert_close(y_torch, F.conv2d(x, w_bad * m), equal_nan=True)


def test_forced_triton_via_env(monkeypatch):
    if CUDA:
        pytest.skip("the switch is for CPU tensors in the interpreter")
    calls = []
    from sdclr_fast.ops import masked_conv as mc

    real = mc._MaskedConv2dTriton.apply
    monkeypatch.setattr(mc._MaskedConv2dTriton, "apply",
                        staticmethod(lambda *a: calls.append(1) or real(*a)))
    x, w = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 1, 1)
    m = torch.ones(3, 2, 1, 1, dtype=torch.bool)
    masked_conv2d(x, w, m)
    assert not calls
    monkeypatch.setenv("SDCLR_FAST_FORCE_TRITON", "1")
    y = masked_conv2d(x, w, m)
    assert calls
    torch.testing.assert_close(y, F.conv2d(x, w))


_AOT_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sdclr_fast.kernels import masked_conv as K

arch, = sys.argv[1:]
ptr = {"x_ptr": "*D", "a_ptr": "*D", "p_ptr": "*D", "p_desc": "*D", "b_ptr": "*D",
       "out_ptr": "*D", "dy_ptr": "*D", "m_ptr": "*u8", "idx_ptr": "*i32", "pk_ptr": "*i32",
       "cnt_ptr": "*i32", "tiles_ptr": "*i32", "dw_ptr": "*fp32"}
# what the JIT specialises for channels-last tensors with 64 channels: unit channel strides,
# other strides and sizes divisible by 16
ones = {"s_xc", "s_ac", "s_oc", "s_dc", "s_mc"}
div16 = {"Cg", "Og", "KA", "NO", "H", "W", "AH", "AW", "OH", "OW", "s_xn", "s_xh", "s_xw",
         "s_an", "s_ah", "s_aw", "s_on", "s_oh", "s_ow", "s_dn", "s_dh", "s_dw",
         "s_mo", "s_mh", "s_mw", "s_gs", "s_go", "s_gc", "s_gh"}
# forward, grad_input (the same kernel, TRANSPOSED; at stride 2 by phases), grad_weight;
# pointer loads of the packed tiles (TMA is compiled by the GPU run's tests)
for kern, transposed, phases in ((K._conv_gemm_kernel, False, 1), (K._conv_gemm_kernel, True, 1),
                                 (K._conv_gemm_kernel, True, 2), (K._bwd_weight_kernel, None, 1)):
    names = kern.arg_names
    for dt in ("fp32", "fp16", "bf16"):
        const = dict(K_T=2, KH=3, KW=3, OH=16, OW=16, BLOCK_M=128, BLOCK_O=32, BLOCK_C=32,
                     BLOCK_N=32, BLOCK_K=32, UPCAST=dt == "fp32", PRECISION="tf32", HAS_BIAS=True,
                     TRANSPOSED=transposed, PHASES_H=phases, PHASES_W=phases, K_EVEN=True, DY_FLAT=True,
                     USE_TMA=False)
        const.update({n: 1 for n in ones})
        const = {n: v for n, v in const.items() if n in names}
        sig = {n: "constexpr" if n in const else ptr.get(n, "i32").replace("D", dt) for n in names}
        attrs = {(names.index(n),): [["tt.divisibility", 16]]
                 for n in names if (n in ptr or n in div16) and n not in const}
        src = ASTSource(fn=kern, signature=sig, attrs=attrs,
                        constexprs={(names.index(n),): v for n, v in const.items()})
        ck = triton.compile(src, target=GPUTarget("cuda", int(arch), 32),
                            options=dict(num_warps=4, num_stages=3))
        print(kern.fn.__name__ + ("_t" if transposed else "") + ("2" if phases > 1 else ""), dt,
              ck.asm["ttgir"].count("async_copy_global_to_local"))
"""


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_gpu(arch):
    """The kernels compile for A100/H100 without a GPU (Triton's bundled ptxas), and with
    channels-last tensors every variant's loads are software-pipelined (async copies)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, str(arch)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln.split() for ln in proc.stdout.strip().splitlines()]
    assert len(lines) == 12
    for name, dt, n_async in lines:
        assert int(n_async) > 0, (name, dt, "loads not pipelined")


def test_dispatch_policy(monkeypatch):
    from sdclr_fast.ops.masked_conv import _backend_for

    x = torch.randn(1, 64, 4, 4, device=TRITON_DEVICE)
    gen = torch.Generator().manual_seed(9)
    sparse = make_mask("block", (64, 64, 3, 3), gen, block=(32, 32), p=0.0).to(TRITON_DEVICE)
    dense = torch.ones(64, 64, 3, 3, dtype=torch.bool, device=TRITON_DEVICE)
    assert _backend_for(x, dense, 1, "triton") == "triton"
    assert _backend_for(x, sparse, 1, "torch") == "torch"
    win = {"triton_ms": 1.0, "cudnn_ms": 2.0}
    if CUDA:  # auto: Triton only where the tuned entry says it beats cuDNN
        assert _backend_for(x, sparse, 1, "auto") == "torch"  # no entry
        assert _backend_for(x, sparse, 1, "auto", win) == "triton"
        assert _backend_for(x, sparse, 1, "auto", dict(win, triton_ms=3.0)) == "torch"
    else:  # CPU tensors take the PyTorch path unless forced, whatever the table says
        assert _backend_for(x, sparse, 1, "auto") == "torch"
        assert _backend_for(x, sparse, 1, "auto", win) == "torch"
        monkeypatch.setenv("SDCLR_FAST_FORCE_TRITON", "1")
        assert _backend_for(x, dense, 1, "auto") == "triton"


# ------------------------------------------------------------------ tile-occupancy map
def brute_occupancy(m, groups, block):
    O, Cg, KH, KW = m.shape
    og = O // groups
    bo, bc = block
    o_t, c_t = -(-og // bo), -(-Cg // bc)
    occ = torch.zeros(groups, o_t, KH * KW, c_t, dtype=torch.bool)
    for g in range(groups):
        for ot in range(o_t):
            for ct in range(c_t):
                sub = m[g * og + ot * bo: g * og + min((ot + 1) * bo, og), ct * bc:(ct + 1) * bc]
                occ[g, ot, :, ct] = sub.reshape(sub.shape[0], sub.shape[1], -1).any(0).any(0)
    return occ


@settings(max_examples=30, **HYP)
@given(groups=st.sampled_from([1, 2, 3]), og=st.integers(1, 70), cg=st.integers(1, 70),
       k=st.sampled_from([1, 3]), kind=st.sampled_from(["random", "block", "block_tap", "zeros"]),
       block=st.sampled_from([None, (16, 16), (32, 16), (16, 64)]), seed=st.integers(0, 999))
def test_tile_map_matches_brute_force(groups, og, cg, k, kind, block, seed):
    gen = torch.Generator().manual_seed(seed)
    m = make_mask(kind, (og * groups, cg, k, k), gen, block=(16, 16), p=0.15)
    tiles = prepare_mask(m, groups, block)
    blk = block or default_block(og, cg)
    assert (tiles.block_o, tiles.block_c) == blk
    occ = brute_occupancy(m, groups, blk)
    assert torch.equal(tiles.occupancy, occ)
    # index lists: active tiles first, in order, and nothing else counted
    flat = occ.reshape(groups * tiles.o_tiles, -1)
    for r in range(flat.shape[0]):
        c = int(tiles.fwd_cnt[r])
        assert tiles.fwd_idx[r, :c].tolist() == flat[r].nonzero().flatten().tolist()
    flat_b = occ.permute(0, 3, 2, 1).reshape(groups * tiles.c_tiles, -1)
    for r in range(flat_b.shape[0]):
        c = int(tiles.bwd_cnt[r])
        assert tiles.bwd_idx[r, :c].tolist() == flat_b[r].nonzero().flatten().tolist()
    assert tiles.wgt_tiles.tolist() == occ.nonzero().tolist()


def test_default_block():
    assert default_block(64, 3) == (32, 16)
    assert default_block(512, 512) == (32, 32)
    assert default_block(20, 1) == (32, 16)
    assert default_block(17, 31) == (32, 32)
    assert default_block(16, 8) == (16, 16)


def test_tile_map_cached_and_recomputed_on_inplace_change():
    dev = TRITON_DEVICE
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(1, 40, 4, 4, generator=gen).to(dev)
    w = torch.randn(40, 40, 3, 3, generator=gen).to(dev)
    m = torch.zeros(40, 40, 3, 3, dtype=torch.bool, device=dev)
    y0 = masked_conv2d(x, w, m, padding=1, _backend="triton")
    t0 = prepare_mask(m)
    assert prepare_mask(m) is t0  # cached while the mask is unchanged
    assert t0.wgt_tiles.shape[0] == 0 and not y0.any()
    m[:20, :10] = True  # in place: bumps the version counter
    y1 = masked_conv2d(x, w, m, padding=1, _backend="triton")
    t1 = prepare_mask(m)
    assert t1 is not t0
    assert torch.equal(t1.occupancy.cpu(), brute_occupancy(m.cpu(), 1, (32, 32)))
    torch.testing.assert_close(y1, F.conv2d(x, w * m, padding=1), rtol=1e-5, atol=1e-4)
    m.fill_(True)
    y2 = masked_conv2d(x, w, m, padding=1, _backend="triton")
    torch.testing.assert_close(y2, F.conv2d(x, w, padding=1), rtol=1e-5, atol=1e-4)
    assert prepare_mask(m).tile_density == 1.0


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_mask_captured_at_forward(backend, mask_dtype):
    """An in-place change of the mask between forward and backward does not reach that
    backward: the gradients are those of the mask the forward used."""
    dev = "cpu" if backend == "torch" else TRITON_DEVICE
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 4, 4, generator=g).to(dev).requires_grad_()
    w = torch.randn(3, 2, 3, 3, generator=g).to(dev).requires_grad_()
    m = (torch.rand(3, 2, 3, 3, generator=g) < 0.5).to(dev, mask_dtype)
    m0 = m.clone()
    y = masked_conv2d(x, w, m, padding=1, _backend=backend)
    m.zero_()
    gy = torch.randn(y.shape, generator=g).to(dev)
    y.backward(gy)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    F.conv2d(x2, w2 * m0, padding=1).backward(gy)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    assert bool((w.grad[~m0.bool()] == 0).all())


# ------------------------------------------------------------------ CPU path
_DILATED_UNIT_KERNEL = """
import torch
from sdclr_fast.ops.masked_conv import masked_conv2d
x = torch.randn(2, 2, 6, 1).contiguous(memory_format=torch.channels_last).requires_grad_()
w = torch.randn(2, 2, 3, 1, requires_grad=True)
m = torch.rand(2, 2, 3, 1) < 0.5
y = masked_conv2d(x, w, m, torch.randn(2), stride=2, padding=1, dilation=2, _backend="torch")
y.sum().backward()
print(tuple(y.shape))
"""


def test_cpu_unit_kernel_side_with_dilation_does_not_crash():
    """torch 2.13's oneDNN segfaults on this call when given as is (a width-1 kernel dilated by
    2 over a channels-last width-1 input with bias); the op drops the dilation that changes
    nothing. In a child process, so that a crash fails this test instead of ending the run."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _DILATED_UNIT_KERNEL], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "(2, 2, 2, 2)", \
        (proc.returncode, proc.stderr[-2000:])


def test_cpu_bfloat16_weight_grad_is_right():
    """torch 2.13's oneDNN bfloat16 weight gradient of this grouped strided convolution returns
    uninitialised memory in most calls; the op's CPU path must not pass that on."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 9, 2, generator=g).bfloat16()
    w = torch.randn(3, 2, 7, 3, generator=g).bfloat16()
    m = torch.rand(3, 2, 7, 3, generator=g) < 0.5
    conf = dict(stride=3, padding=1, groups=3)
    gy = torch.randn(2, 3, 2, 1, generator=g).bfloat16()
    ref = run(masked_conv2d_reference, x.double(), w.double(), m, None, gy.double(), **conf)
    for _ in range(20):
        ours = run(lambda *a, **k: masked_conv2d(*a, **k, _backend="torch"), x, w, m, None, gy,
                   **conf)
        for o, r in zip(ours, ref):
            torch.testing.assert_close(o.double(), r, rtol=1e-2, atol=2e-2)


@settings(max_examples=60, **HYP)
@given(case=conv_cases, dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_cpu_path_matches_reference(case, dtype):
    x, w, m, b, gy, conf = build(case, dtype, "cpu")
    ours = run(lambda *a, **k: masked_conv2d(*a, **k, _backend="torch"), x, w, m, b, gy, **conf)
    ref = run_reference(x, w, m, b, gy, **conf)
    # the same oneDNN calls on the same masked weight (float32 ones for bfloat16): equal up to
    # kernel choice and one rounding
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype]
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=tol, atol=tol)
    assert not ours[2][~m].any()
    cl = torch.channels_last
    assert ours[0].is_contiguous(memory_format=cl) == ref[0].is_contiguous(memory_format=cl)


@pytest.mark.parametrize("conf", [
    dict(stride=1, padding=1, dilation=1, groups=1),
    dict(stride=2, padding=(2, 0), dilation=(1, 2), groups=2),
    dict(stride=(1, 2), padding="same", dilation=1, groups=1),
])
def test_cpu_path_gradcheck(conf):
    if conf["padding"] == "same":
        conf = dict(conf, stride=1)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4 // conf["groups"], 3, 2, generator=gen, dtype=torch.float64,
                    requires_grad=True)
    b = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    m = torch.rand(w.shape, generator=gen) < 0.6
    fn = lambda x, w, b: masked_conv2d(x, w, m, b, **conf, _backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_same_padding_even_kernel_both_backends():
    """Asymmetric 'same' padding (even kernel) matches F.conv2d's bottom/right convention."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(1, 3, 5, 6, generator=gen)
    w = torch.randn(4, 3, 2, 4, generator=gen)
    m = torch.rand(w.shape, generator=gen) < 0.7
    ref = F.conv2d(x, w * m, padding="same")
    for backend, dev in (("torch", "cpu"), ("triton", TRITON_DEVICE)):
        y = masked_conv2d(x.to(dev), w.to(dev), m.to(dev), padding="same", _backend=backend)
        torch.testing.assert_close(y.cpu(), ref, rtol=1e-5, atol=1e-5)


def test_float_mask_accepted_and_validated():
    x, w = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3)
    mf = (torch.rand(3, 2, 3, 3) < 0.5).float()
    torch.testing.assert_close(masked_conv2d(x, w, mf), F.conv2d(x, w * mf))
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        masked_conv2d(x, w, mf * 0.5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_casts_like_conv2d(backend):
    """Under autocast, fp32 weights meet bf16 activations (as in an AMP training step): the op
    casts x, weight and bias to the autocast dtype like F.conv2d does, and the fp32 weight gets
    the gradient of the bf16 computation."""
    dev = "cpu" if backend == "torch" else TRITON_DEVICE
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 6, generator=g).to(dev)
    w = torch.randn(5, 4, 3, 3, generator=g).to(dev).requires_grad_()
    b = torch.randn(5, generator=g).to(dev).requires_grad_()
    m = (torch.rand(5, 4, 3, 3, generator=g) < 0.5).to(dev)
    with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16):
        y = masked_conv2d(x.bfloat16(), w, m, b, padding=1, _backend=backend)
        assert y.dtype == torch.bfloat16
        ref = F.conv2d(x, w.detach() * m, b.detach(), padding=1)
    assert ref.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    # The same op on inputs cast by hand, outside autocast: identical values and gradients.
    wb = w.detach().bfloat16().requires_grad_()
    bb = b.detach().bfloat16().requires_grad_()
    yb = masked_conv2d(x.bfloat16(), wb, m, bb, padding=1, _backend=backend)
    yb.float().square().sum().backward()
    assert torch.equal(y, yb)
    assert torch.equal(w.grad, wb.grad.float()) and torch.equal(b.grad, bb.grad.float())


def test_no_grad_needed_inputs():
    """Only the weight needs a gradient (x frozen): grad_x is skipped, grad_w still right."""
    for backend, dev in (("torch", "cpu"), ("triton", TRITON_DEVICE)):
        x = torch.randn(1, 3, 5, 5, device=dev)
        w = torch.randn(2, 3, 3, 3, device=dev, requires_grad=True)
        m = torch.rand(2, 3, 3, 3, device=dev) < 0.5
        masked_conv2d(x, w, m, _backend=backend).square().sum().backward()
        w2 = w.detach().clone().requires_grad_()
        F.conv2d(x, w2 * m).square().sum().backward()
        torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs,match", [
    (dict(x=torch.randn(2, 4)), r"x must be a 3-d \(C, H, W\) or 4-d"),
    (dict(x=torch.randn(1, 1, 2, 4, 4)), r"x must be a 3-d \(C, H, W\) or 4-d"),
    (dict(mask=torch.ones(3, 2, 3, 1, dtype=torch.bool)), "mask must have the weight's shape"),
    (dict(x=torch.randn(1, 3, 5, 5)), "x has 3 channels"),
    (dict(groups=2), "groups=2 must divide"),
    (dict(groups=0), "groups must be a positive int"),
    (dict(stride=0), "stride must be >= 1"),
    (dict(stride=(1, 2, 3)), "stride must be an int or a pair"),
    (dict(padding=-1), "padding must be >= 0"),
    (dict(padding="full"), "padding must be an int, a pair"),
    (dict(padding="same", stride=2), "padding='same' needs stride 1"),
    (dict(dilation=0), "dilation must be >= 1"),
    (dict(bias=torch.randn(4)), r"bias must be None or a tensor of shape \(3,\)"),
    (dict(weight=torch.randn(3, 2, 3, 3, dtype=torch.float64)), "weight must have the dtype"),
    (dict(x=torch.randn(1, 2, 2, 2)), "smaller than the dilated kernel"),
    (dict(mask="not a tensor"), "mask must be a torch.Tensor"),
    (dict(_backend="cuda"), "_backend must be"),
])
def test_bad_arguments(kwargs, match):
    args = dict(x=torch.randn(1, 2, 5, 5), weight=torch.randn(3, 2, 3, 3),
                mask=torch.ones(3, 2, 3, 3, dtype=torch.bool))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        masked_conv2d(**args)


def test_bad_arguments_triton_dtype_and_block():
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        masked_conv2d(torch.randn(1, 2, 5, 5, dtype=torch.float64),
                      torch.randn(3, 2, 3, 3, dtype=torch.float64),
                      torch.ones(3, 2, 3, 3, dtype=torch.bool), _backend="triton")
    with pytest.raises(ValueError, match="block must be a pair of powers of two"):
        prepare_mask(torch.ones(3, 2, 3, 3, dtype=torch.bool), block=(24, 16))


def test_device_mismatch():
    with pytest.raises(ValueError, match="mask is on meta but x is on cpu"):
        masked_conv2d(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3),
                      torch.ones(3, 2, 3, 3, dtype=torch.bool, device="meta"))


# ------------------------------------------------------------------ unbatched input, torch.func
BACKENDS = [("torch", "cpu"), ("triton", TRITON_DEVICE)]


@pytest.mark.parametrize("backend,dev", BACKENDS)
@pytest.mark.parametrize("conf", [dict(padding=1), dict(stride=2, groups=2, bias=True),
                                  dict(padding="same", dilation=2)])
def test_unbatched_input(backend, dev, conf):
    """(C, H, W) in, (O, H', W') out, values and gradients as F.conv2d on the same input."""
    conf = dict(conf)
    use_bias = conf.pop("bias", False)
    gen = torch.Generator().manual_seed(11)
    g = conf.get("groups", 1)
    x = torch.randn(4, 6, 5, generator=gen).to(dev)
    w = torch.randn(6, 4 // g, 3, 3, generator=gen).to(dev)
    m = (torch.rand(w.shape, generator=gen) < 0.5).to(dev)
    b = torch.randn(6, generator=gen).to(dev) if use_bias else None
    gy = torch.randn(masked_conv2d_reference(x, w, m, b, **conf).shape, generator=gen).to(dev)
    ours = run(lambda *a, **k: masked_conv2d(*a, **k, _backend=backend), x, w, m, b, gy, **conf)
    ref = run(masked_conv2d_reference, x, w, m, b, gy, **conf)
    assert ours[0].dim() == 3 and ours[0].shape == ref[0].shape
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


def _func_case(dev, seed=0, n=2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 5, 4, generator=gen).to(dev)
    w = torch.randn(4, 3, 3, 3, generator=gen).to(dev)
    m = (torch.rand(w.shape, generator=gen) < 0.5).to(dev)
    b = torch.randn(4, generator=gen).to(dev)
    return x, w, m, b


@pytest.mark.parametrize("backend,dev", BACKENDS)
def test_torch_func_grad_vmap_jacrev(backend, dev):
    from torch.func import grad, jacrev, vmap

    x, w, m, b = _func_case(dev)

    def ours(x, w, b):
        return masked_conv2d(x, w, m, b, padding=1, _backend=backend)

    def ref(x, w, b):
        return F.conv2d(x, w * m, b, padding=1)

    def close(a, r):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)

    loss = lambda f: lambda x, w, b: f(x, w, b).square().sum()  # noqa: E731
    for a, r in zip(grad(loss(ours), argnums=(0, 1, 2))(x, w, b),
                    grad(loss(ref), argnums=(0, 1, 2))(x, w, b)):
        close(a, r)
    # vmap over per-sample (C, H, W) inputs, over weights, over both
    close(vmap(ours, in_dims=(0, None, None))(x, w, b), ref(x, w, b))
    ws = torch.stack([w, 2 * w, -w])
    close(vmap(ours, in_dims=(None, 0, None))(x, ws, b), vmap(ref, in_dims=(None, 0, None))(x, ws, b))
    xs = torch.stack([x, x.flip(0), 3 * x])
    close(vmap(ours, in_dims=(0, 0, None))(xs, ws, b), vmap(ref, in_dims=(0, 0, None))(xs, ws, b))
    # per-sample gradients: vmap over grad
    per = lambda f: vmap(grad(lambda w, xi: f(xi, w, b).square().sum()), in_dims=(None, 0))  # noqa: E731
    close(per(ours)(w, x), per(ref)(w, x))
    # jacrev: vmap over the backward
    x1 = x[:1, :, :3, :3]
    for a, r in zip(jacrev(ours, argnums=(0, 1))(x1, w, b), jacrev(ref, argnums=(0, 1))(x1, w, b)):
        close(a, r)
    # the per-mask cache, first filled inside grad above, holds plain tensors
    from sdclr_fast.ops._masked import cached as _cached

    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    entry = _cached(m)
    cached = [v for v in entry.values() if isinstance(v, torch.Tensor)]
    cached += [t.mask for t in entry["tiles"].values()]
    assert cached and not any(wrapped(t) for t in cached)
    close(ours(x, w, b), ref(x, w, b))


@pytest.mark.parametrize("backend,dev", BACKENDS)
def test_vmap_over_masks(backend, dev):
    from torch.func import vmap

    x, w, m, b = _func_case(dev)
    ms = torch.stack([m, ~m, torch.ones_like(m)])
    fn = lambda mi: masked_conv2d(x, w, mi, b, _backend=backend)  # noqa: E731
    if backend == "triton":
        with pytest.raises(ValueError, match="a mask batched by torch.func.vmap"):
            vmap(fn)(ms)
        fn = lambda mi: masked_conv2d(x, w, mi, b)  # noqa: E731  (auto: the PyTorch path)
    ref = torch.stack([F.conv2d(x, w * mi, b) for mi in ms])
    torch.testing.assert_close(vmap(fn)(ms), ref, rtol=1e-5, atol=1e-5)


@settings(max_examples=8, **HYP)
@given(case=conv_cases, backend=st.sampled_from(["torch", "triton"]))
def test_vmap_and_grad_match_reference(case, backend):
    """vmap over x (folded into N on the Triton path) and grad w.r.t. the weight, on random
    convolutions, against the same transforms of F.conv2d(x, w * mask)."""
    from torch.func import grad, vmap

    dev = "cpu" if backend == "torch" else TRITON_DEVICE
    x, w, m, b, gy, conf = build(case, torch.float32, dev)
    xs = torch.stack([x, -x])
    ours = vmap(lambda xi: masked_conv2d(xi, w, m, b, **conf, _backend=backend))(xs)
    ref = vmap(lambda xi: masked_conv2d_reference(xi, w, m, b, **conf))(xs)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    g_ours = grad(lambda w: (masked_conv2d(x, w, m, b, **conf, _backend=backend) * gy).sum())(w)
    g_ref = grad(lambda w: (masked_conv2d_reference(x, w, m, b, **conf) * gy).sum())(w)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-4)


def test_triton_path_second_derivative_raises_clearly():
    x, w, m, b = _func_case(TRITON_DEVICE)
    w = w.requires_grad_()
    y = masked_conv2d(x, w, m, b, _backend="triton")
    (gw,) = torch.autograd.grad(y.square().sum(), w, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once.*_backend='torch'"):
        gw.sum().backward()


# ------------------------------------------------------------------ block masks, packed tiles, TMA, tuned table
@pytest.mark.slow
@settings(max_examples=20, **HYP)
@given(og=st.sampled_from([16, 32, 40, 64]), cg=st.sampled_from([3, 16, 33, 48]),
       groups=st.sampled_from([1, 1, 2]), k=st.sampled_from([1, 3]), stride=st.integers(1, 2),
       block=st.sampled_from([(16, 16), (32, 32), (16, 32), (32, 16)]),
       tile=st.sampled_from([None, (16, 16), (32, 32), (64, 32), (32, 64)]),
       sparsity=st.sampled_from([0.5, 0.75, 0.9]), dtype=st.sampled_from(DTYPES),
       channels_last=st.booleans(), seed=st.integers(0, 999))
def test_triton_block_masks(og, cg, groups, k, stride, block, tile, sparsity, dtype, channels_last,
                            seed):
    """magnitude_masks(..., block=...) masks as SDCLR --prune-block makes them (whole blocks,
    every tap together) at 50-90% sparsity, kernel tiles equal to, smaller or larger than the
    blocks: values and both gradients against F.conv2d(x, w * mask)."""
    from sdclr_fast.ops.prune import magnitude_masks

    case = dict(n=1, groups=groups, cg=cg, og=og, k=k, k2=None, stride=stride, dilation=1,
                padding=k // 2, h=5, w=4, mask="ones", density=1.0, bias=True,
                channels_last=channels_last, seed=seed)
    x, w, _, b, gy, conf = build(case, dtype, TRITON_DEVICE)
    # clip_block: the small layers drawn here may be narrower than a block in both channels
    m = magnitude_masks([w.float()], sparsity, scope="layer", block=block,
                        clip_block=True)[0].to(TRITON_DEVICE)
    check_against_reference(x, w, m, b, gy, "triton", block=tile, **conf)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_holds_the_masked_nonempty_tiles(dtype):
    """P[j] = (w * mask)[tile j] in wgt_tiles order, zero-padded; pruned inf/nan become 0."""
    from sdclr_fast.ops.masked_conv import _kernels

    gen = torch.Generator().manual_seed(12)
    w = torch.randn(3 * 14, 24, 3, 3, generator=gen)
    m = make_mask("block_tap", w.shape, gen, block=(16, 16), p=0.4)
    w[~m] = float("nan")
    tiles = prepare_mask(m.to(TRITON_DEVICE), groups=3, block=(16, 16))
    p = _kernels().pack(w.to(TRITON_DEVICE), tiles, dtype).cpu()
    assert p.shape == (tiles.wgt_tiles.shape[0], 16, 16) and p.dtype == dtype
    og = 14
    wm = torch.where(m, w, torch.zeros(()))
    for j, (g, ot, tap, ct) in enumerate(tiles.wgt_tiles.tolist()):
        ref = torch.zeros(16, 16)
        blk = wm[g * og + ot * 16: g * og + min(ot * 16 + 16, og), ct * 16: ct * 16 + 16,
                 tap // 3, tap % 3]
        ref[:blk.shape[0], :blk.shape[1]] = blk
        assert torch.equal(p[j], ref.to(dtype)), (j, g, ot, tap, ct)
    # the index lists point at those tiles
    rank = {tuple(t): j for j, t in enumerate(tiles.wgt_tiles.tolist())}
    for r in range(tiles.fwd_cnt.shape[0]):
        g, ot = divmod(r, tiles.o_tiles)
        for i in range(int(tiles.fwd_cnt[r])):
            tap, ct = divmod(int(tiles.fwd_idx[r, i]), tiles.c_tiles)
            assert int(tiles.fwd_pk[r, i]) == rank[(g, ot, tap, ct)]
    for r in range(tiles.bwd_cnt.shape[0]):
        g, ct = divmod(r, tiles.c_tiles)
        for i in range(int(tiles.bwd_cnt[r])):
            tap, ot = divmod(int(tiles.bwd_idx[r, i]), tiles.o_tiles)
            assert int(tiles.bwd_pk[r, i]) == rank[(g, ot, tap, ct)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tma_descriptor_path(monkeypatch, dtype):
    """The packed tiles loaded through TMA tensor descriptors (the interpreter runs them too on
    CPU; on a GPU without TMA support the plain-pointer path is tested everywhere else)."""
    from sdclr_fast.ops.masked_conv import _kernels

    k = _kernels()
    if k.TensorDescriptor is None:
        pytest.skip("this Triton has no tensor descriptors")
    if CUDA and not k.use_tma(torch.device("cuda")):
        pytest.skip("TMA needs a Hopper GPU")
    monkeypatch.setattr(k, "use_tma", lambda device: True)
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(2, 48, 5, 4, generator=gen)
    w = torch.randn(64, 48, 3, 3, generator=gen) / (48 * 9) ** 0.5
    m = make_mask("block", w.shape, gen, block=(16, 16), p=0.4)
    gy = torch.randn(2, 64, 3, 2, generator=gen)
    dev = TRITON_DEVICE
    check_against_reference(x.to(dev, dtype), w.to(dev, dtype), m.to(dev), None,
                            gy.to(dev, dtype), "triton", stride=2, padding=1, block=(32, 16))


def test_tuned_table(tmp_path, monkeypatch):
    import json

    from sdclr_fast.ops import _masked_conv_tuned as tuned
    from sdclr_fast.ops.masked_conv import _tuned_cfg

    assert tuned.bucket(0.09) == "s90" and tuned.bucket(0.27) == "s75"
    assert tuned.bucket(0.55) == "s50" and tuned.bucket(0.9) is None
    key = tuned.shape_key("GPU X", torch.bfloat16, (256, 64, 32, 32), (128, 64, 3, 3), (2, 2),
                          (1, 1), (1, 1), 1, "s90")
    assert key == "GPU X|bfloat16|C64-O128-H32-W32-k3x3-s2x2-p1x1-d1x1-g1|s90"
    # the repository's table parses
    assert isinstance(tuned.entries(tuned.default_path()), dict)
    path = tmp_path / "t.json"
    monkeypatch.setenv("SDCLR_FAST_MASKED_CONV_TUNED", str(path))
    assert tuned.entries() == {}  # missing file: no entries, cuDNN everywhere
    entry = {"batch": 256, "tile": [64, 32], "fwd": {"BLOCK_M": 128, "num_warps": 4, "num_stages": 3},
             "bgi": {"BLOCK_M": 64, "num_warps": 4, "num_stages": 4},
             "bgw": {"BLOCK_M": 64, "num_warps": 4, "num_stages": 3, "splits": 4},
             "triton_ms": 1.0, "cudnn_ms": 2.0}
    path.write_text(json.dumps({"format": 1, "entries": {key: entry}}))
    assert tuned.entries()[key] == entry and tuned.triton_wins(entry)
    assert not tuned.triton_wins(dict(entry, triton_ms=2.5)) and not tuned.triton_wins(None)
    path.write_text(json.dumps({"format": 99, "entries": {}}))
    with pytest.raises(ValueError, match="format must be 1"):
        tuned.entries()
    m = torch.ones(128, 64, 3, 3, dtype=torch.bool)
    assert _tuned_cfg(entry, prepare_mask(m, block=(64, 32)), "fwd") == entry["fwd"]
    assert _tuned_cfg(entry, prepare_mask(m), "fwd") is None  # another tile: autotune picks


def test_triton_forced_with_tuned_configs_matches_reference(monkeypatch):
    """The Triton path with a tuned entry's tile and configs (on CPU the interpreter's one
    config runs, but the tile and the grad_weight split count come from the entry)."""
    from sdclr_fast.ops import masked_conv as mc

    entry = {"batch": 1, "tile": [16, 32], "fwd": {"BLOCK_M": 64, "num_warps": 4, "num_stages": 3},
             "bgi": {"BLOCK_M": 64, "num_warps": 4, "num_stages": 3},
             "bgw": {"BLOCK_M": 64, "num_warps": 4, "num_stages": 3, "splits": 3},
             "triton_ms": 1.0, "cudnn_ms": 2.0}
    seen = []
    monkeypatch.setattr(mc, "_tuned_entry", lambda *a: seen.append(1) or entry)
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(2, 40, 6, 6, generator=gen)
    w = torch.randn(36, 40, 3, 3, generator=gen) / 20
    m = make_mask("block", w.shape, gen, block=(16, 16), p=0.5)
    gy = torch.randn(2, 36, 6, 6, generator=gen)
    dev = TRITON_DEVICE
    check_against_reference(x.to(dev), w.to(dev), m.to(dev), None, gy.to(dev), "triton", padding=1)
    assert seen


_AOT_TMA_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sdclr_fast.kernels import masked_conv as K

kern = K._conv_gemm_kernel
names = kern.arg_names
ptr = {"a_ptr": "*bf16", "p_ptr": "*bf16", "out_ptr": "*bf16", "b_ptr": "*bf16",
       "idx_ptr": "*i32", "pk_ptr": "*i32", "cnt_ptr": "*i32"}
for transposed in (False, True):
    const = dict(K_T=2, KH=3, KW=3, BLOCK_M=128, BLOCK_N=32, BLOCK_K=32, UPCAST=False,
                 PRECISION="tf32", HAS_BIAS=False, TRANSPOSED=transposed, PHASES_H=1, PHASES_W=1,
                 K_EVEN=True, USE_TMA=True)
    sig = {n: "constexpr" if n in const else ("tensordesc<bf16[32, 32]>" if n == "p_desc"
                                              else ptr.get(n, "i32")) for n in names}
    src = ASTSource(fn=kern, signature=sig,
                    constexprs={(names.index(n),): v for n, v in const.items()})
    ttgir = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=4, num_stages=3)).asm["ttgir"]
    print(ttgir.count("tma"), ttgir.count("async_copy_global_to_local"), ttgir.count("warp_group_dot"))
"""


@pytest.mark.slow
def test_tma_variant_compiles_for_hopper():
    """Forward and grad_input with the packed tiles behind a TMA descriptor compile for sm_90:
    TMA loads of the weight tiles, pipelined loads of the activations, wgmma."""
    import subprocess
    import sys

    from sdclr_fast.ops.masked_conv import _kernels

    if _kernels().TensorDescriptor is None:
        pytest.skip("this Triton has no tensor descriptors")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _AOT_TMA_SCRIPT], cwd=root,
                          env=dict(os.environ, TRITON_INTERPRET="0"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [[int(v) for v in ln.split()] for ln in proc.stdout.strip().splitlines()]
    assert len(lines) == 2
    for n_tma, n_async, n_wgmma in lines:
        assert n_tma > 0 and n_async > 0 and n_wgmma > 0, (n_tma, n_async, n_wgmma)
