"""Higher derivatives and torch.func for nt_xent, against the float64 reference.

create_graph=True makes the op's backward the gradient of a differentiable PyTorch
formulation; torch.func transforms and forward-mode AD run that formulation directly. Both are
compared with the same derivatives of `nt_xent_reference` (plain autograd over the
materialised matrix).
"""


import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402
from torch.func import grad, jacfwd, jacrev, jvp, vmap  # noqa: E402

from sdclr_fast.ops import nt_xent as op  # noqa: E402
from sdclr_fast.ops.nt_xent import nt_xent  # noqa: E402
from sdclr_fast.ops.reference import nt_xent_reference  # noqa: E402
from helpers import HYPOTHESIS_SETTINGS as SETTINGS, INTERPRET, interp  # noqa: E402

F64 = torch.float64


def _problem(form, n, d, seed, dtype=F64, classes=3):
    """(z1, z2 or None, labels) of a two-view or one-matrix problem."""
    g = torch.Generator().manual_seed(seed)
    m = 2 * n if form != "one_matrix" else n
    z = torch.randn(m, d, generator=g, dtype=F64).to(dtype)
    if form == "one_matrix":
        return z, None, torch.randint(0, classes, (n,), generator=g)
    z1, z2 = z[:n].contiguous(), z[n:].contiguous()
    labels = {"two_view": None, "labels_n": torch.randint(0, classes, (n,), generator=g),
              "labels_2n": torch.randint(0, classes, (2 * n,), generator=g)}[form]
    return z1, z2, labels


def _hvp(fn, z1, z2, tau, w, seed):
    """Loss, gradient (create_graph) and Hessian-vector products of fn with respect to all
    differentiable inputs; also checks that the gradient itself is differentiable."""
    leaves = [t for t in (z1, z2, tau, w) if isinstance(t, torch.Tensor)]
    out = fn(*(z1, z2, tau, w))
    gs = torch.autograd.grad(out, leaves, create_graph=True)
    assert all(g.requires_grad for g in gs)
    gen = torch.Generator().manual_seed(seed + 5)
    vs = [torch.randn(g.shape, generator=gen, dtype=F64).to(g.dtype) for g in gs]
    dot = sum((g * v).sum() for g, v in zip(gs, vs))
    hv = torch.autograd.grad(dot, leaves, allow_unused=True)
    hv = [torch.zeros_like(t) if h is None else h for t, h in zip(leaves, hv)]
    return [out.detach()] + [g.detach() for g in gs] + list(hv)


def _leaves(z1, z2, tau, w, dtype):
    def mk(t):
        return None if t is None else t.detach().to(dtype).clone().requires_grad_(True)

    return mk(z1), mk(z2), (mk(tau) if isinstance(tau, torch.Tensor) else tau), mk(w)


def _fn(impl, labels, normalize, reduction, multi_positive, **kw):
    def f(a, b, t, w):
        out = impl(a, b, t, weights=w, labels=labels, normalize=normalize,
                   reduction="none" if reduction == "none" else reduction,
                   multi_positive=multi_positive, **kw)
        if reduction == "none":  # a fixed, uneven cotangent
            out = (out * torch.linspace(-0.7, 1.3, out.shape[0], dtype=out.dtype)).sum()
        return out
    return f


case = dict(form=st.sampled_from(["two_view", "labels_n", "labels_2n", "one_matrix"]),
            n=st.integers(1, 9), d=st.integers(1, 11), seed=st.integers(0, 2 ** 16),
            tau=st.floats(0.1, 1.0), tau_tensor=st.booleans(), weights=st.booleans(),
            normalize=st.booleans(), reduction=st.sampled_from(["mean", "sum", "none"]),
            multi_positive=st.sampled_from(["out", "in"]))


def _inputs(form, n, d, seed, tau, tau_tensor, weights, normalize):
    if form == "one_matrix":
        n = max(n, 2)
    z1, z2, labels = _problem(form, n, d, seed)
    if not normalize:
        z1, z2 = z1 * 0.4, (None if z2 is None else z2 * 0.4)
    m = z1.shape[0] * (1 if z2 is None else 2)
    w = torch.rand(m, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.2 \
        if weights else None
    t = torch.tensor(tau, dtype=F64) if tau_tensor else tau
    return z1, z2, labels, w, t


@settings(max_examples=60, **SETTINGS)
@given(**case)
def test_double_backward_torch_path(form, n, d, seed, tau, tau_tensor, weights, normalize,
                                    reduction, multi_positive):
    """Gradient (create_graph=True) and Hessian-vector products for z1, z2, tau, weights."""
    z1, z2, labels, w, t = _inputs(form, n, d, seed, tau, tau_tensor, weights, normalize)
    kw = (labels, normalize, reduction, multi_positive)
    got = _hvp(_fn(nt_xent, *kw, _backend="torch"), *_leaves(z1, z2, t, w, F64), seed)
    ref = _hvp(_fn(nt_xent_reference, *kw), *_leaves(z1, z2, t, w, F64), seed)
    for a, b in zip(got, ref):
        # terms are bounded by (1 / tau)^3 (three derivatives of S = z z^T / tau)
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12 / tau ** 3)


@pytest.mark.parametrize("form", ["two_view", "labels_n", "labels_2n", "one_matrix"])
@pytest.mark.parametrize("multi_positive", ["out", "in"])
def test_gradgradcheck(form, multi_positive):
    z1, z2, labels = _problem(form, 3, 4, 0)
    z1 = z1.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    tau = torch.tensor(0.4, dtype=F64, requires_grad=True)
    m = z1.shape[0] * (1 if z2 is None else 2)
    w = (torch.rand(m, generator=g, dtype=F64) + 0.5).requires_grad_(True)
    for normalize in (True, False):
        for reduction in ("mean", "none"):
            if z2 is None:
                def f(a, t, ww):
                    return nt_xent(a, None, t, weights=ww, labels=labels, normalize=normalize,
                                   reduction=reduction, multi_positive=multi_positive)
                inputs = (z1, tau, w)
            else:
                def f(a, b, t, ww):
                    return nt_xent(a, b, t, weights=ww, labels=labels, normalize=normalize,
                                   reduction=reduction, multi_positive=multi_positive)
                inputs = (z1, z2.requires_grad_(True), tau, w)
            assert torch.autograd.gradgradcheck(f, inputs)


@interp
@pytest.mark.slow
@settings(max_examples=25, **SETTINGS)
@given(**case)
def test_double_backward_triton_path(form, n, d, seed, tau, tau_tensor, weights, normalize,
                                     reduction, multi_positive):
    """The kernels take fp32 (gradgradcheck needs float64, which they do not take): the
    Hessian-vector products through the Triton path, in fp32, against float64, within twice
    the error of the same fp32 derivatives of the reference plus an fp32 unit of the terms'
    size (flash-attention's rule, as for the first-order low-precision tests)."""
    z1, z2, labels, w, t = _inputs(form, n, d, seed, tau, tau_tensor, weights, normalize)
    kw = (labels, normalize, reduction, multi_positive)
    t32 = t.float() if isinstance(t, torch.Tensor) else t
    got = _hvp(_fn(nt_xent, *kw, _backend="triton"), *_leaves(z1, z2, t32, w, torch.float32),
               seed)
    ref = _hvp(_fn(nt_xent_reference, *kw), *_leaves(z1, z2, t, w, F64), seed)
    same = _hvp(_fn(nt_xent_reference, *kw), *_leaves(z1, z2, t32, w, torch.float32), seed)
    eps = torch.finfo(torch.float32).eps
    for a, b, c in zip(got, ref, same):
        err = (a.double() - b).abs().max().item()
        base = (c.double() - b).abs().max().item()
        assert err <= 2 * base + 4 * eps * max(b.abs().max().item(), 1.0) / tau ** 3, (err, base)


@interp
def test_create_graph_on_triton_path_is_differentiable():
    """The silent failure this replaces: the gradient came back with requires_grad False."""
    z1, z2, _ = _problem("two_view", 4, 5, 0, torch.float32)
    z1.requires_grad_(True)
    g, = torch.autograd.grad(nt_xent(z1, z2, _backend="triton"), z1, create_graph=True)
    assert g.requires_grad
    ref, = torch.autograd.grad(nt_xent_reference(z1, z2), z1, create_graph=True)
    torch.testing.assert_close(g, ref)


def test_first_order_path_unchanged_without_create_graph(monkeypatch):
    """A plain backward uses the fused backward, never the materialised formulation."""
    calls = []
    real = op._rows_dense
    monkeypatch.setattr(op, "_rows_dense", lambda *a: calls.append(1) or real(*a))
    z1, z2, _ = _problem("two_view", 5, 4, 0)
    z1.requires_grad_(True)
    nt_xent(z1, z2).backward()
    assert not calls
    torch.autograd.grad(nt_xent(z1, z2), z1, create_graph=True)
    assert calls


# ------------------------------------------------------------------ torch.func
BACKENDS = ["torch", "triton"] if INTERPRET else ["torch"]


def _func_inputs(backend, n=4, d=5, seed=0):
    dtype = F64 if backend == "torch" else torch.float32
    z1, z2, _ = _problem("two_view", n, d, seed, dtype)
    return z1, z2


@pytest.mark.parametrize("backend", BACKENDS)
def test_func_grad_and_jacrev(backend):
    z1, z2 = _func_inputs(backend)
    tau = torch.tensor(0.3, dtype=z1.dtype)
    g = grad(lambda a, b, t: nt_xent(a, b, t, _backend=backend), argnums=(0, 1, 2))(z1, z2, tau)
    r = grad(lambda a, b, t: nt_xent_reference(a, b, t), argnums=(0, 1, 2))(z1, z2, tau)
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b)
    jac = jacrev(lambda a: nt_xent(a, z2, 0.3, reduction="none", _backend=backend))(z1)
    rjac = jacrev(lambda a: nt_xent_reference(a, z2, 0.3, reduction="none"))(z1)
    assert jac.shape == (8, 4, 5)
    torch.testing.assert_close(jac, rjac)
    hess = jacfwd(jacrev(lambda a: nt_xent(a, z2, 0.3, _backend=backend)))(z1)
    rhess = jacfwd(jacrev(lambda a: nt_xent_reference(a, z2, 0.3)))(z1)
    torch.testing.assert_close(hess, rhess)


def test_func_jvp_and_forward_ad():
    z1, z2 = _func_inputs("torch")
    v1, v2 = torch.randn_like(z1), torch.randn_like(z2)
    labels = torch.tensor([0, 1, 0, 2])
    for kw in (dict(), dict(labels=labels, multi_positive="in"), dict(normalize=False)):
        out, tan = jvp(lambda a, b: nt_xent(a, b, 0.3, **kw), (z1, z2), (v1, v2))
        rout, rtan = jvp(lambda a, b: nt_xent_reference(a, b, 0.3, **kw), (z1, z2), (v1, v2))
        torch.testing.assert_close(out, rout)
        torch.testing.assert_close(tan, rtan)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        out = nt_xent(fwAD.make_dual(z1, v1), z2, 0.3)
        tan = fwAD.unpack_dual(out).tangent
    torch.testing.assert_close(tan, jvp(lambda a: nt_xent_reference(a, z2, 0.3), (z1,), (v1,))[1])


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=15, **SETTINGS)
@given(b=st.integers(1, 4), n=st.integers(1, 6), d=st.integers(1, 9), seed=st.integers(0, 999),
       form=st.sampled_from(["two_view", "labels", "one_matrix"]),
       multi_positive=st.sampled_from(["out", "in"]), reduction=st.sampled_from(["mean", "none"]))
def test_vmap_over_independent_problems(backend, b, n, d, seed, form, multi_positive, reduction):
    """vmap over a batch of problems (labels batched too) equals the reference per problem;
    vmap of grad gives every problem's own gradient."""
    dtype = F64 if backend == "torch" else torch.float32
    g = torch.Generator().manual_seed(seed)
    m = max(n, 2) if form == "one_matrix" else n
    Z1 = torch.randn(b, m, d, generator=g, dtype=F64).to(dtype)
    Z2 = None if form == "one_matrix" else torch.randn(b, n, d, generator=g, dtype=F64).to(dtype)
    L = None if form == "two_view" else torch.randint(0, 3, (b, m), generator=g)
    kw = dict(temperature=0.3, multi_positive=multi_positive, reduction=reduction)

    def mine(z1, z2, lab):
        return nt_xent(z1, z2, labels=lab, _backend=backend, **kw)

    def ref(z1, z2, lab):
        return nt_xent_reference(z1.double(), None if z2 is None else z2.double(), labels=lab,
                                 **kw)

    in_dims = (0, None if Z2 is None else 0, None if L is None else 0)
    out = vmap(mine, in_dims=in_dims)(Z1, Z2, L)
    want = torch.stack([ref(Z1[i], None if Z2 is None else Z2[i], None if L is None else L[i])
                        for i in range(b)])
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == F64 else dict(rtol=3e-5, atol=3e-6)
    torch.testing.assert_close(out.double(), want, **tol)
    scalar = lambda z1, z2, lab: mine(z1, z2, lab).sum()  # noqa: E731
    gz = vmap(grad(scalar), in_dims=in_dims)(Z1, Z2, L)
    for i in range(b):
        zi = Z1[i].double().requires_grad_(True)
        ref(zi, None if Z2 is None else Z2[i], None if L is None else L[i]).sum().backward()
        torch.testing.assert_close(gz[i].double(), zi.grad, **tol)


def test_vmap_does_not_read_values_on_the_host():
    """No NaN check (a host read) under vmap: a non-finite problem gives NaN, the others
    their own loss; the same input outside vmap is refused."""
    Z1 = torch.randn(3, 4, 5, dtype=F64)
    Z2 = torch.randn(3, 4, 5, dtype=F64)
    Z1[1, 2, 0] = float("nan")
    out = vmap(lambda a, b: nt_xent(a, b, 0.2))(Z1, Z2)
    assert torch.isnan(out[1])
    for i in (0, 2):
        torch.testing.assert_close(out[i], nt_xent_reference(Z1[i], Z2[i], 0.2))
    with pytest.raises(ValueError, match="z1 holds NaN"):
        nt_xent(Z1[1], Z2[1])


def test_func_grad_with_closed_over_inputs():
    """Only the temperature is transformed (z1, z2 are plain tensors captured by the
    closure): the op still sees the transform through the temperature."""
    z1, z2 = _func_inputs("torch")
    gt = grad(lambda t: nt_xent(z1, z2, t))(torch.tensor(0.3, dtype=F64))
    rt = grad(lambda t: nt_xent_reference(z1, z2, t))(torch.tensor(0.3, dtype=F64))
    torch.testing.assert_close(gt, rt)


def test_gather_distributed_under_transform_without_process_group_is_local():
    z1, z2 = _func_inputs("torch")
    g = grad(lambda a: nt_xent(a, z2, gather_distributed=True))(z1)
    torch.testing.assert_close(g, grad(lambda a: nt_xent_reference(a, z2))(z1))
