"""masked_linear against F.linear(x, weight * mask): values and gradients, both backends.

Without a GPU the Triton kernels run on CPU tensors in the interpreter (TRITON_INTERPRET=1 set
before Triton is imported). Low-precision results follow the flash-attention rule: error
against a float64 reference at most 2x the error of the same-dtype PyTorch reference, plus a
few ulps.
"""
import os

import torch

CUDA = torch.cuda.is_available()

import pytest  # noqa: E402
import torch._dynamo.testing  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sdclr_fast.ops import masked_linear as ml  # noqa: E402
from sdclr_fast.ops.masked_linear import masked_linear, prepare_linear_mask  # noqa: E402
from sdclr_fast.ops.reference import masked_linear_reference  # noqa: E402

TRITON_DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HYP = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
INTERP_ONLY = pytest.mark.skipif(CUDA, reason="CPU tensors through the kernels: interpreter only")


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """The kernels follow cuda.matmul.allow_tf32 like F.linear; compare fp32 at full precision."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


# ------------------------------------------------------------------ helpers
def make_mask(kind, shape, gen, block=(32, 32), p=0.5):
    N, K = shape
    if kind == "zeros":
        return torch.zeros(shape, dtype=torch.bool)
    if kind == "ones":
        return torch.ones(shape, dtype=torch.bool)
    if kind == "random":
        return torch.rand(shape, generator=gen) < p
    if kind == "block":  # whole (bn, bk) blocks kept or dropped
        bn, bk = block
        blocks = torch.rand((-(-N // bn), -(-K // bk)), generator=gen) < p
        return blocks.repeat_interleave(bn, 0)[:N].repeat_interleave(bk, 1)[:, :K].contiguous()
    raise ValueError(kind)


def make_values(kind, shape, gen):
    t = torch.randn(shape, generator=gen)
    if kind == "ties":  # few distinct values, many equal products
        t = torch.round(t * 2) / 2
    elif kind == "signed_zeros":  # +0 and -0 among the values
        t = torch.where(torch.rand(shape, generator=gen) < 0.3, torch.zeros(()), t)
        t = torch.where(torch.rand(shape, generator=gen) < 0.5, -t, t)
    return t


def run(fn, x, w, m, b, gy):
    """Output and (grad_x, grad_w[, grad_b]) of fn with fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w)]
    if b is not None:
        leaves.append(b.detach().clone().requires_grad_())
    y = fn(leaves[0], leaves[1], m, leaves[2] if b is not None else None)
    grads = torch.autograd.grad(y, leaves, gy.to(y.dtype))
    return [y.detach()] + [g.detach() for g in grads]


def err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_against_reference(x, w, m, b, gy, backend, block=None):
    """Op in x's dtype vs the float64 reference; its error must be <= 2x the same-dtype
    reference's error + a few ulps. Pruned weights get exactly zero gradient."""
    dtype = x.dtype
    ours = run(lambda *a: masked_linear(*a, block=block, _backend=backend), x, w, m, b, gy)
    f64 = run(masked_linear_reference, x.double(), w.double(), m,
              None if b is None else b.double(), gy.double())
    same = run(masked_linear_reference, x, w, m, b, gy)
    eps = torch.finfo(dtype).eps
    for name, o, r, s in zip(["out", "grad_x", "grad_w", "grad_b"], ours, f64, same):
        assert o.shape == r.shape and o.dtype == dtype, name
        atol = 4 * eps * max(1.0, r.abs().max().item())
        assert err(o, r) <= 2 * err(s, r) + atol, (name, err(o, r), err(s, r), atol)
    assert not ours[2][~m.bool().to(ours[2].device)].any()
    return ours


linear_cases = st.fixed_dictionaries({
    "lead": st.sampled_from([(), (1,), (5,), (2, 3), (37,), (2, 1, 4)]),
    "n": st.sampled_from([1, 3, 16, 17, 33, 40]),
    "k": st.sampled_from([1, 5, 16, 24, 33, 48]),  # K not a power of two, across tile edges
    "mask": st.sampled_from(["random", "random", "block", "zeros", "ones"]),
    "density": st.sampled_from([0.0, 0.1, 0.5, 0.9]),
    "values": st.sampled_from(["normal", "ties", "signed_zeros"]),
    "bias": st.booleans(),
    "seed": st.integers(0, 2 ** 16),
})


def build(case, dtype, device):
    gen = torch.Generator().manual_seed(case["seed"])
    n, k = case["n"], case["k"]
    x = make_values(case["values"], case["lead"] + (k,), gen)
    w = make_values(case["values"], (n, k), gen) / k ** 0.5
    m = make_mask(case["mask"], (n, k), gen, block=(16, 16), p=case["density"])
    b = torch.randn(n, generator=gen) if case["bias"] else None
    gy = torch.randn(case["lead"] + (n,), generator=gen)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(w), m.to(device), cast(b), cast(gy)


# ------------------------------------------------------------------ Triton kernels
@settings(max_examples=30, **HYP)
@given(case=linear_cases, dtype=st.sampled_from(DTYPES))
def test_triton_matches_reference(case, dtype):
    x, w, m, b, gy = build(case, dtype, TRITON_DEVICE)
    check_against_reference(x, w, m, b, gy, "triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,block,tile,p", [(64, 96, (32, 32), None, 0.3),
                                              (65, 97, (32, 32), None, 0.3),
                                              (48, 80, (16, 16), (16, 16), 0.5),
                                              (64, 64, (16, 32), (16, 32), 0.2)])
def test_triton_block_masks_skip_tiles(dtype, n, k, block, tile, p):
    """Block masks leave whole tiles empty: the skipped tiles must not change the result."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 11, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    m = make_mask("block", (n, k), gen, block=block, p=p)
    gy = torch.randn(3, 11, n, generator=gen)
    b = torch.randn(n, generator=gen)
    dev = TRITON_DEVICE
    check_against_reference(x.to(dev, dtype), w.to(dev, dtype), m.to(dev), b.to(dev, dtype),
                            gy.to(dev, dtype), "triton", block=tile)
    assert 0 < prepare_linear_mask(m.to(dev), tile).tile_density < 1


@pytest.mark.parametrize("n,k,block", [(5, 7, (16, 16)), (40, 33, (32, 32)), (64, 48, (16, 32))])
def test_tile_map_matches_brute_force(n, k, block):
    """Forward lists: per output tile row the non-empty K tiles; grad_input lists: per K tile
    the non-empty output tiles; both point into the packed order."""
    m = make_mask("random", (n, k), torch.Generator().manual_seed(n), p=0.02)
    t = prepare_linear_mask(m, block)
    bn, bk = block
    occ = [[bool(m[i:i + bn, j:j + bk].any()) for j in range(0, k, bk)] for i in range(0, n, bn)]
    packed = [(i, j) for i in range(len(occ)) for j in range(len(occ[0])) if occ[i][j]]
    for i, row in enumerate(occ):
        want = [j for j, o in enumerate(row) if o]
        assert t.fwd_idx[i, :t.fwd_cnt[i]].tolist() == want
        assert t.fwd_pk[i, :t.fwd_cnt[i]].tolist() == [packed.index((i, j)) for j in want]
    for j in range(len(occ[0])):
        want = [i for i in range(len(occ)) if occ[i][j]]
        assert t.bwd_idx[j, :t.bwd_cnt[j]].tolist() == want
        assert t.bwd_pk[j, :t.bwd_cnt[j]].tolist() == [packed.index((i, j)) for i in want]
    assert t.tile_density == len(packed) / (len(occ) * len(occ[0]))


def test_tile_map_cached_and_recomputed_on_inplace_change():
    m = torch.zeros(40, 40, dtype=torch.bool)
    m[:16, :16] = True
    t1 = prepare_linear_mask(m, (16, 16))
    assert prepare_linear_mask(m, (16, 16)) is t1  # cached
    m[30, 30] = True  # in-place change: new version, new map
    t2 = prepare_linear_mask(m, (16, 16))
    assert t2 is not t1 and t2.tile_density > t1.tile_density


def test_triton_grad_weight_split_reduction():
    """The row reduction of grad_weight split into several slices sums right."""
    k = ml._kernels()
    dev = TRITON_DEVICE
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(150, 20, generator=gen).to(dev)
    gy = torch.randn(150, 18, generator=gen).to(dev)
    m = (torch.rand(18, 20, generator=gen) < 0.5).to(dev)
    tiles = prepare_linear_mask(m)
    assert k.num_splits(tiles.wgt_tiles.shape[0], 150, 32, torch.device(dev)) == 2 or CUDA
    got = k.backward_weight(x, gy, tiles, torch.float32)
    torch.testing.assert_close(got, (gy.t() @ x) * m, rtol=1e-5, atol=1e-5)


def test_triton_noncontiguous_inputs():
    """A transposed weight view, a strided bias, x with a non-unit feature stride, grad_y with
    stride 0 (from .sum())."""
    dev = TRITON_DEVICE
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(20, 8, generator=gen).to(dev).t()[::2]  # (4, 20), feature stride 8
    x = x.detach().requires_grad_()
    w = torch.randn(20, 9, generator=gen).to(dev).t().requires_grad_()  # (9, 20)
    b = torch.randn(18, generator=gen).to(dev)[::2]
    m = (torch.rand(9, 20, generator=gen) < 0.6).to(dev)
    masked_linear(x, w, m, b, _backend="triton").sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    F.linear(x2, w2 * m, b).sum().backward()
    torch.testing.assert_close(masked_linear(x, w, m, b, _backend="triton"), F.linear(x, w * m, b))
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_rows_and_zero_in_features(backend):
    dev = "cpu" if backend == "torch" else TRITON_DEVICE
    x = torch.randn(0, 4, device=dev, requires_grad=True)
    w = torch.randn(3, 4, device=dev, requires_grad=True)
    b = torch.randn(3, device=dev, requires_grad=True)
    m = torch.rand(3, 4, device=dev) < 0.5
    y = masked_linear(x, w, m, b, _backend=backend)
    assert y.shape == (0, 3)
    y.sum().backward()
    assert not w.grad.any() and not b.grad.any()
    x0, w0 = torch.randn(2, 0, device=dev), torch.randn(3, 0, device=dev)
    y0 = masked_linear(x0, w0, torch.ones(3, 0, dtype=torch.bool, device=dev), b.detach(),
                       _backend=backend)
    torch.testing.assert_close(y0, b.detach().expand(2, 3))


def test_pruned_nonfinite_weights():
    """Triton: pruned inf/nan contribute exactly zero (selected away). PyTorch path: propagated
    exactly as F.linear(x, weight * mask)."""
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(6, 20, generator=gen), torch.randn(10, 20, generator=gen)
    m = torch.rand(10, 20, generator=gen) < 0.5
    w_bad = w.clone()
    w_bad[~m] = float("nan")
    w_bad[~m & (torch.rand(w.shape, generator=gen) < 0.5)] = float("inf")
    dev = TRITON_DEVICE
    y = masked_linear(x.to(dev), w_bad.to(dev), m.to(dev), _backend="triton")
    torch.testing.assert_close(y.cpu(), F.linear(x, w * m))
    torch.testing.assert_close(masked_linear(x, w_bad, m, _backend="torch"), F.linear(x, w_bad * m),
                               equal_nan=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mask_captured_at_forward(backend):
    dev = "cpu" if backend == "torch" else TRITON_DEVICE
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(5, 8, generator=gen).to(dev)
    w = torch.randn(6, 8, generator=gen).to(dev).requires_grad_()
    m = (torch.rand(6, 8, generator=gen) < 0.5).to(dev)
    m0 = m.clone()
    y = masked_linear(x, w, m, _backend=backend)
    m.fill_(True)
    (gw,) = torch.autograd.grad(y.sum(), w)
    assert not gw[~m0].any()


@INTERP_ONLY
def test_forced_triton_via_env(monkeypatch):
    calls = []
    real = ml._MaskedLinearTriton.apply
    monkeypatch.setattr(ml._MaskedLinearTriton, "apply",
                        staticmethod(lambda *a: calls.append(1) or real(*a)))
    x, w, m = torch.randn(2, 5), torch.randn(3, 5), torch.ones(3, 5, dtype=torch.bool)
    masked_linear(x, w, m)
    assert not calls  # CPU default: the PyTorch path
    monkeypatch.setenv("SDCLR_FAST_FORCE_TRITON", "1")
    torch.testing.assert_close(masked_linear(x, w, m), F.linear(x, w))
    assert calls


def test_dispatch_follows_tile_density(monkeypatch):
    """auto on CUDA: Triton at most DENSE_TILE_FRACTION of occupied tiles, else the masked
    copy; on the CPU always the PyTorch path."""
    class _Cuda:  # a stand-in with is_cuda for the policy alone
        is_cuda, dtype = True, torch.float16
    sparse = torch.zeros(64, 64, dtype=torch.bool)
    sparse[:32, :32] = True
    dense = torch.rand(64, 64, generator=torch.Generator().manual_seed(0)) < 0.1
    assert ml._backend_for(_Cuda(), sparse, "auto", None) == "triton"
    assert ml._backend_for(_Cuda(), dense, "auto", None) == "torch"  # unstructured: every tile
    assert ml._backend_for(torch.randn(2, 64), sparse, "auto", None) == "torch"
    monkeypatch.setattr(ml, "DENSE_TILE_FRACTION", 0.2)
    assert ml._backend_for(_Cuda(), sparse, "auto", None) == "torch"


# ------------------------------------------------------------------ PyTorch path
@settings(max_examples=30, **HYP)
@given(case=linear_cases, dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_cpu_path_matches_reference(case, dtype):
    x, w, m, b, gy = build(case, dtype, "cpu")
    check_against_reference(x, w, m, b, gy, "torch")


@pytest.mark.parametrize("lead", [(), (3,), (2, 2)])
def test_cpu_path_gradcheck(lead):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(lead + (5,), generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    m = torch.rand(4, 5, generator=gen) < 0.5
    fn = lambda x, w, b: masked_linear(x, w, m, b)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_float_mask_accepted_and_validated():
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    m = (torch.rand(3, 4) < 0.5).float()
    torch.testing.assert_close(masked_linear(x, w, m), F.linear(x, w * m))
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        masked_linear(x, w, m * 2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_casts_like_linear(backend):
    """Under CPU bf16 autocast x, weight and bias are used in bf16, as F.linear does; the
    gradient reaches the fp32 weight in fp32."""
    dev = "cpu" if backend == "torch" else TRITON_DEVICE
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(6, 40, generator=gen).to(dev)
    w = torch.randn(20, 40, generator=gen).to(dev).requires_grad_()
    b = torch.randn(20, generator=gen).to(dev)
    m = (torch.rand(20, 40, generator=gen) < 0.5).to(dev)
    with torch.autocast(dev, dtype=torch.bfloat16):
        y = masked_linear(x, w, m, b, _backend=backend)
        ref = F.linear(x, w * m, b)
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    (gw,) = torch.autograd.grad(y.float().sum(), w)
    assert gw.dtype == torch.float32 and not gw[~m].any()


@pytest.mark.parametrize("kwargs,match", [
    (dict(x=torch.randn(2, 5)), "x has 5 features in its last dimension but weight expects in_features = 4"),
    (dict(weight=torch.randn(3, 4, 1)), r"weight must be a 2-d \(out_features, in_features\)"),
    (dict(mask=torch.ones(3, 5, dtype=torch.bool)), r"mask must have the weight's shape \(3, 4\)"),
    (dict(bias=torch.randn(4)), r"bias must be None or a tensor of shape \(3,\)"),
    (dict(x=torch.randn(2, 4, dtype=torch.float64)), "weight must have the dtype of x"),
    (dict(x=torch.ones(2, 4, dtype=torch.long)), "x must be a floating-point tensor"),
    (dict(x=torch.tensor(1.0)), "x must have at least 1 dimension"),
    (dict(mask=[1]), "mask must be a torch.Tensor"),
    (dict(block=(8, 16)), "block must be a pair of powers of two >= 16"),
    (dict(_backend="cuda"), "_backend must be 'auto', 'triton' or 'torch'"),
])
def test_bad_arguments(kwargs, match):
    args = dict(x=torch.randn(2, 4), weight=torch.randn(3, 4), mask=torch.ones(3, 4, dtype=torch.bool),
                bias=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        masked_linear(**args)


def test_bad_triton_dtype():
    with pytest.raises(ValueError, match="the Triton kernels take x of dtype"):
        masked_linear(torch.randn(2, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64),
                      torch.ones(3, 4, dtype=torch.bool), _backend="triton")


# ------------------------------------------------------------------ torch.func
BACKENDS = [("torch", "cpu"), ("triton", TRITON_DEVICE)]


@pytest.mark.parametrize("backend,dev", BACKENDS)
def test_torch_func_grad_vmap_jacrev(backend, dev):
    from torch.func import grad, jacrev, vmap

    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 6, generator=gen).to(dev)
    w = torch.randn(5, 6, generator=gen).to(dev)
    m = (torch.rand(5, 6, generator=gen) < 0.5).to(dev)
    b = torch.randn(5, generator=gen).to(dev)
    ours = lambda x, w, b: masked_linear(x, w, m, b, _backend=backend)  # noqa: E731
    ref = lambda x, w, b: F.linear(x, w * m, b)  # noqa: E731

    def close(a, r):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)

    loss = lambda f: lambda x, w, b: f(x, w, b).square().sum()  # noqa: E731
    for a, r in zip(grad(loss(ours), argnums=(0, 1, 2))(x, w, b),
                    grad(loss(ref), argnums=(0, 1, 2))(x, w, b)):
        close(a, r)
    close(vmap(ours, in_dims=(0, None, None))(x, w, b), ref(x, w, b))  # rows folded in
    ws = torch.stack([w, 2 * w, -w])
    close(vmap(ours, in_dims=(None, 0, None))(x, ws, b), vmap(ref, in_dims=(None, 0, None))(x, ws, b))
    per = lambda f: vmap(grad(lambda w, xi: f(xi, w, b).square().sum()), in_dims=(None, 0))  # noqa: E731
    close(per(ours)(w, x), per(ref)(w, x))  # per-sample gradients
    for a, r in zip(jacrev(ours, argnums=(0, 1))(x, w, b), jacrev(ref, argnums=(0, 1))(x, w, b)):
        close(a, r)  # vmap over the backward


@pytest.mark.parametrize("backend,dev", BACKENDS)
def test_vmap_over_masks(backend, dev):
    from torch.func import vmap

    x, w = torch.randn(3, 6).to(dev), torch.randn(5, 6).to(dev)
    m = (torch.rand(5, 6) < 0.5).to(dev)
    ms = torch.stack([m, ~m, torch.ones_like(m)])
    fn = lambda mi: masked_linear(x, w, mi, _backend=backend)  # noqa: E731
    if backend == "triton":
        with pytest.raises(ValueError, match="a mask batched by torch.func.vmap"):
            vmap(fn)(ms)
        fn = lambda mi: masked_linear(x, w, mi)  # noqa: E731
    torch.testing.assert_close(vmap(fn)(ms), torch.stack([F.linear(x, w * mi) for mi in ms]))


def test_triton_path_second_derivative_raises_clearly():
    dev = TRITON_DEVICE
    x = torch.randn(3, 6, device=dev)
    w = torch.randn(5, 6, device=dev, requires_grad=True)
    m = torch.rand(5, 6, device=dev) < 0.5
    (gw,) = torch.autograd.grad(masked_linear(x, w, m, _backend="triton").square().sum(), w,
                                create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        gw.sum().backward()


# ------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize("triton", [False, True])
def test_opcheck(triton):
    """Schema, fake tensors, autograd registration and AOT dispatch of the forward op (its
    autograd formula calls the backward op), with and without bias."""
    if triton and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton ops run on CPU tensors in the interpreter only")
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(7, 20, generator=gen, requires_grad=True)
    w = torch.randn(18, 20, generator=gen, requires_grad=True)
    m = torch.rand(18, 20, generator=gen) < 0.5
    b = torch.randn(18, generator=gen, requires_grad=True)
    torch.library.opcheck(ml._ops["fwd"], (x, w, m, b, None, triton))
    torch.library.opcheck(ml._ops["fwd"], (x, w, m, None, [16, 16], triton))


def test_fake_checks_match_eager():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w, m, b = torch.randn(4, 6), torch.randn(3, 6), torch.ones(3, 6, dtype=torch.bool), torch.randn(3)
    for args, match in [((x, w, m[:2], b), "mask must have the weight's shape"),
                        ((x[:, :5], w, m, b), "x has 5 features"),
                        ((x, w, m, b[:2]), "bias must be None or a tensor of shape")]:
        with pytest.raises(ValueError, match=match):
            masked_linear(*args)
        with FakeTensorMode() as mode, pytest.raises(ValueError, match=match):
            ml._ops["fwd"](*[mode.from_tensor(a) for a in args], None, False)


@pytest.mark.parametrize("path", [pytest.param("auto", marks=pytest.mark.slow), "triton"])
def test_compile_fullgraph_no_recompile(path):
    """fullgraph=True (a graph break raises) over masked_linear with leading batch dims: one
    frame compiled once over three calls with a new batch, an in-place mask update and an
    in-place weight change; values and gradients match eager."""
    if path == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton ops run on CPU tensors in the interpreter only")
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(18, 20, generator=gen).requires_grad_()
    b = torch.randn(18, generator=gen).requires_grad_()
    mask = torch.rand(18, 20, generator=gen) < 0.5

    def step(x):
        return masked_linear(x, w, mask, b, _backend=path).tanh()

    cnt = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, backend=cnt, fullgraph=True)
    before = None
    for i in range(3):
        x = torch.randn(2, 3, 20, generator=gen).requires_grad_()
        if i == 1:
            mask.copy_(torch.rand(18, 20, generator=gen) < 0.5)
        if i == 2:
            with torch.no_grad():
                w.mul_(0.5)
        out = compiled(x)
        g = torch.autograd.grad(out.square().sum(), [x, w, b])
        ref = step(x)
        gr = torch.autograd.grad(ref.square().sum(), [x, w, b])
        torch.testing.assert_close(out, ref)
        for a, e in zip(g, gr):
            torch.testing.assert_close(a, e)
        assert g[1][~mask].abs().max() == 0
        if i == 1:
            assert not torch.allclose(out, before)
        before = out
    assert cnt.frame_count == 1 and cnt.op_count > 0


# ------------------------------------------------------------------ GPU code (no GPU needed)
_AOT_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sdclr_fast.kernels import masked_linear as K

arch, = sys.argv[1:]
ptr = {"a_ptr": "*D", "p_ptr": "*D", "out_ptr": "*D", "b_ptr": "*D", "x_ptr": "*D", "dy_ptr": "*D",
       "m_ptr": "*u8", "dw_ptr": "*fp32", "idx_ptr": "*i32", "pk_ptr": "*i32", "cnt_ptr": "*i32",
       "tiles_ptr": "*i32"}
# what the JIT specialises for row-major tensors with 768 / 3072 features: unit feature strides,
# other strides and sizes divisible by 16
ones = {"s_ak", "s_on", "s_xk", "s_dn", "s_mk", "s_gk"}
div16 = {"NO", "KA", "N", "K", "M_PER_SPLIT", "s_am", "s_om", "s_xm", "s_dm", "s_mn", "s_gs", "s_gn"}
# launch configs as default_config picks them for 32x32 tiles on A100 / H100 shared memory
for kern, transposed, (bm, nw, ns) in ((K._gemm_kernel, False, (256, 8, 5)),
                                        (K._gemm_kernel, True, (256, 8, 5)),
                                        (K._wgt_kernel, None, (128, 4, 3))):
    names = kern.arg_names
    for dt in ("fp32", "bf16"):
        const = dict(BLOCK_M=bm, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, UPCAST=dt == "fp32",
                     PRECISION="tf32", HAS_BIAS=True, TRANSPOSED=transposed)
        const.update({n: 1 for n in ones})
        const = {n: v for n, v in const.items() if n in names}
        sig = {n: "constexpr" if n in const else ptr.get(n, "i32").replace("D", dt) for n in names}
        attrs = {(names.index(n),): [["tt.divisibility", 16]]
                 for n in names if (n in ptr or n in div16) and n not in const}
        src = ASTSource(fn=kern, signature=sig, attrs=attrs,
                        constexprs={(names.index(n),): v for n, v in const.items()})
        ck = triton.compile(src, target=GPUTarget("cuda", int(arch), 32),
                            options=dict(num_warps=nw, num_stages=ns))
        ttgir = ck.asm["ttgir"]
        print(kern.fn.__name__ + ("_t" if transposed else ""), dt,
              ttgir.count("async_copy_global_to_local"), ttgir.count("warp_group_dot"),
              ck.asm["ptx"].count("mma"))
"""


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_gpu(arch):
    """The kernels compile for A100 / H100 without a GPU (Triton's bundled ptxas): every
    variant's loads are software-pipelined (async copies) and its dot runs on the tensor cores
    (wgmma for the forward / grad_input GEMM on sm_90)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, str(arch)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln.split() for ln in proc.stdout.strip().splitlines()]
    assert len(lines) == 6
    for name, dt, n_async, n_wgmma, n_mma in lines:
        assert int(n_async) > 0, (name, dt, "loads not pipelined")
        assert int(n_mma) > 0, (name, dt, "no tensor-core instruction")
        if arch == 90 and name.startswith("_gemm_kernel"):
            assert int(n_wgmma) > 0, (name, dt, "no wgmma on Hopper")
