"""nt_xent's one-matrix form nt_xent(z, labels=idx) (any number of views), multi_positive
"out" / "in", and the exact zero of a row whose only column is its positive (N = 1).

Checked against the float64 reference and against solo-learn's simclr_loss_func, written
here from its definition: z normalised, sim = exp(z z^T / tau), pos_mask = equal index
without the diagonal, neg_mask = different index, loss = -mean(log(pos / (pos + neg))).
"""
import math


import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from sdclr_fast.ops.nt_xent import NTXentLoss, nt_xent  # noqa: E402
from sdclr_fast.ops.reference import nt_xent_reference  # noqa: E402
from helpers import HYPOTHESIS_SETTINGS as SETTINGS, INTERPRET, interp  # noqa: E402

BACKENDS = ["torch", "triton"] if INTERPRET else ["torch"]


def solo_learn_simclr(z, indexes, temperature):
    """solo-learn's simclr_loss_func (one process), from its definition."""
    z = F.normalize(z, dim=-1)
    sim = torch.exp(z @ z.t() / temperature)
    pos_mask = indexes[:, None] == indexes[None, :]
    pos_mask.fill_diagonal_(False)
    neg_mask = indexes[:, None] != indexes[None, :]
    pos = (sim * pos_mask).sum(1)
    neg = (sim * neg_mask).sum(1)
    return -torch.log(pos / (pos + neg)).mean()


def _data(m, d, seed, kind="randn", dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(m, d, generator=g, dtype=torch.float64)
    if kind == "ties":
        z[1::2] = z[0]
    elif kind == "zeros":
        z[0] = 0.0
        z[:, ::3] = 0.0
    return z.to(dtype)


def _labels(m, classes, seed, kind):
    g = torch.Generator().manual_seed(seed + 7)
    if kind == "views":  # solo-learn's batches: V views of m / V images, index = image id
        return torch.arange(m) % classes
    lab = torch.randint(0, classes, (m,), generator=g)
    if kind == "all_have_positive":
        lab[lab.bincount(minlength=classes)[lab] == 1] = lab[0]  # singletons join row 0's class
        if (lab == lab[0]).sum() == 1:
            lab[1] = lab[0]
    return lab


def _grads(fn, z, tau, weights, reduction, cot):
    z = z.detach().clone().requires_grad_(True)
    leaves = [z]
    if isinstance(tau, torch.Tensor):
        tau = tau.detach().clone().requires_grad_(True)
        leaves.append(tau)
    if weights is not None:
        weights = weights.detach().clone().requires_grad_(True)
        leaves.append(weights)
    out = fn(z, tau, weights)
    (out.double() * cot).sum().backward() if reduction == "none" else out.backward()
    return out.detach().double(), [t.grad.double() for t in leaves]


def _check_close(got, ref, scales, rtol, atol):
    """|got - ref| <= rtol |ref| + atol * scale, output and every gradient."""
    for a, b, scale in zip([got[0]] + got[1], [ref[0]] + ref[1], scales):
        assert a.shape == b.shape and torch.isfinite(a).all()
        err = (a - b).abs()
        bound = rtol * b.abs() + atol * scale
        assert (err <= bound).all(), (err - bound).max().item()


def _compare(z, labels, tau, multi_positive, normalize, reduction, weights, backend, seed):
    g = torch.Generator().manual_seed(seed + 1)
    cot = torch.rand(z.shape[0], generator=g, dtype=torch.float64) * 2 - 0.5
    kw = dict(labels=labels, multi_positive=multi_positive, normalize=normalize,
              reduction=reduction)
    got = _grads(lambda a, t, w: nt_xent(a, None, t, weights=w, _backend=backend, **kw),
                 z, tau, weights, reduction, cot)
    t64 = tau.double() if isinstance(tau, torch.Tensor) else tau
    w64 = weights.double() if weights is not None else None
    ref = _grads(lambda a, t, w: nt_xent_reference(a, None, t, weights=w, **kw),
                 z.double(), t64, w64, reduction, cot)
    # Natural scales: every score, and so every term summed into a row loss, is bounded by
    # smax; a row's gradient by smax / tau times its norm's reciprocal (the chain rule through
    # the normalisation: 1 / eps for a zero row); wmax: the largest weight (1 without).
    norms = z.double().norm(dim=1)
    zmax = 1.0 if normalize else norms.max().item() ** 2
    smax = zmax / float(tau) + 1 + math.log(z.shape[0])
    wmax = float(w64.abs().max()) if w64 is not None else 1.0
    r = 1 / norms.clamp_min(1e-12)[:, None] if normalize else norms.max().item()
    scales = [smax * wmax, smax / float(tau) * wmax * r]
    if isinstance(tau, torch.Tensor):
        scales.append(smax / float(tau) * wmax)
    if weights is not None:
        scales.append(smax)
    return got, ref, scales


one_matrix = dict(
    m=st.integers(2, 41), d=st.integers(1, 37), seed=st.integers(0, 2 ** 16),
    tau=st.floats(0.05, 1.0), classes=st.integers(1, 20),
    labels=st.sampled_from(["random", "all_have_positive", "views"]),
    multi_positive=st.sampled_from(["out", "in"]), normalize=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]), weights=st.booleans(),
    tau_tensor=st.booleans(), kind=st.sampled_from(["randn", "randn", "ties", "zeros"]))


@settings(max_examples=80, **SETTINGS)
@given(**one_matrix)
def test_one_matrix_torch_float64(m, d, seed, tau, classes, labels, multi_positive, normalize,
                                  reduction, weights, tau_tensor, kind):
    z = _data(m, d, seed, kind) * (1.0 if normalize else 0.3)
    lab = _labels(m, classes, seed, labels)
    w = torch.rand(m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) \
        if weights else None
    t = torch.tensor(tau, dtype=torch.float64) if tau_tensor else tau
    got, ref, scales = _compare(z, lab, t, multi_positive, normalize, reduction, w, "torch", seed)
    _check_close(got, ref, scales, 1e-9, 1e-12)


@interp
@pytest.mark.slow
@settings(max_examples=40, **SETTINGS)
@given(**one_matrix)
def test_one_matrix_triton_float32(m, d, seed, tau, classes, labels, multi_positive, normalize,
                                   reduction, weights, tau_tensor, kind):
    """fp32 tl.dot is exact in the interpreter: fp32 rounding of the float64 result."""
    z = _data(m, d, seed, kind, torch.float32) * (1.0 if normalize else 0.3)
    lab = _labels(m, classes, seed, labels)
    w = torch.rand(m, generator=torch.Generator().manual_seed(seed)) if weights else None
    t = torch.tensor(tau) if tau_tensor else tau
    got, ref, scales = _compare(z, lab, t, multi_positive, normalize, reduction, w, "triton",
                               seed)
    _check_close(got, ref, scales, 3e-5, 3e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=30, **SETTINGS)
@given(views=st.integers(2, 5), images=st.integers(1, 9), d=st.integers(1, 33),
       seed=st.integers(0, 2 ** 16), tau=st.floats(0.1, 1.0), shuffle=st.booleans())
def test_in_equals_solo_learn(backend, views, images, d, seed, tau, shuffle):
    """multi_positive="in" is solo-learn's loss (V views of each image, any V, odd M)."""
    m = views * images
    dtype = torch.float64 if backend == "torch" else torch.float32
    z = _data(m, d, seed, dtype=dtype)
    idx = torch.arange(images).repeat(views)
    if shuffle:
        idx = idx[torch.randperm(m, generator=torch.Generator().manual_seed(seed))]
    za = z.detach().clone().requires_grad_(True)
    zb = z.detach().double().requires_grad_(True)
    got = nt_xent(za, labels=idx, temperature=tau, multi_positive="in", _backend=backend)
    ref = solo_learn_simclr(zb, idx, tau)
    got.backward()
    ref.backward()
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else (3e-5, 3e-6)
    torch.testing.assert_close(got.double(), ref.detach(), rtol=rtol, atol=atol / tau)
    torch.testing.assert_close(za.grad.double(), zb.grad, rtol=rtol, atol=atol / tau)
    if views == 2:  # two views: every row has one positive, "in" = "out" = two-view NT-Xent
        z1, z2 = z[idx.argsort()[0::2]], z[idx.argsort()[1::2]]
        if not shuffle:
            z1, z2 = z[:images], z[images:]
        torch.testing.assert_close(nt_xent(z1, z2, tau, _backend=backend).double(),
                                   ref.detach(), rtol=rtol, atol=atol / tau)


def test_out_and_in_differ_with_several_positives():
    z = _data(9, 6, 0)
    idx = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    out = nt_xent(z, labels=idx, multi_positive="out", reduction="none")
    inn = nt_xent(z, labels=idx, multi_positive="in", reduction="none")
    # log-mean-exp >= mean: L_in <= L_out row by row, equal only with one positive
    assert (inn <= out + 1e-12).all() and (inn < out - 1e-6).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("multi_positive", ["out", "in"])
def test_rows_without_positives_give_zero(backend, multi_positive):
    """A row whose label no other row has gives 0 and no gradient through its own loss (it
    is still a negative of the others) and counts in the mean; solo-learn's formula gives
    inf there (log 0)."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    z = _data(7, 5, 3, dtype=dtype)
    idx = torch.tensor([0, 0, 1, 2, 2, 2, 3])  # rows 2 and 6 have no positive
    rows = nt_xent(z, labels=idx, multi_positive=multi_positive, reduction="none",
                   _backend=backend)
    assert rows[2] == 0 and rows[6] == 0 and (rows[[0, 1, 3, 4, 5]] > 0).all()
    torch.testing.assert_close(nt_xent(z, labels=idx, multi_positive=multi_positive,
                                       _backend=backend), rows.sum() / 7)
    assert torch.isinf(solo_learn_simclr(z.double(), idx, 0.2))
    # row 6's own loss has no gradient: with only row 6 weighted, everything is 0
    zg = z.detach().clone().requires_grad_(True)
    w = torch.zeros(7, dtype=dtype)
    w[6] = 1.0
    nt_xent(zg, labels=idx, multi_positive=multi_positive, weights=w, reduction="sum",
            _backend=backend).backward()
    assert (zg.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_matrix_equals_two_view_form(backend):
    """z = [z1; z2] with idx = [0..N-1, 0..N-1] is the two-view loss, rows and gradients."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    z1, z2 = _data(6, 10, 1, dtype=dtype), _data(6, 10, 2, dtype=dtype)
    idx = torch.arange(6).repeat(2)
    for mp in ("out", "in"):
        a = torch.cat([z1, z2]).requires_grad_(True)
        got = nt_xent(a, labels=idx, multi_positive=mp, reduction="none", _backend=backend)
        b1, b2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
        ref = nt_xent(b1, b2, reduction="none", _backend=backend)
        torch.testing.assert_close(got, ref)
        cot = torch.linspace(0.1, 1.0, 12, dtype=dtype)
        torch.autograd.backward(got, cot)
        torch.autograd.backward(ref, cot)
        torch.testing.assert_close(a.grad, torch.cat([b1.grad, b2.grad]))


# ------------------------------------------------------------------ N = 1: exactly zero
@pytest.mark.parametrize("backend, dtype", [("torch", torch.float64), ("torch", torch.float32),
                                            ("torch", torch.bfloat16), ("torch", torch.float16),
                                            pytest.param("triton", torch.float32, marks=interp),
                                            pytest.param("triton", torch.bfloat16, marks=interp)])
@settings(max_examples=25, **SETTINGS)
@given(d=st.integers(1, 40), seed=st.integers(0, 2 ** 16), tau=st.floats(0.01, 2.0),
       normalize=st.booleans(), tau_tensor=st.booleans())
def test_one_pair_is_exactly_zero(backend, dtype, d, seed, tau, normalize, tau_tensor):
    """One pair: each row's only column is its positive, so loss_i = log(exp(0)) = 0 exactly
    (the log-sum-exp is shifted by the positive's own score), also as one matrix of two rows
    with one label, in both multi-positive forms."""
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(1, d, generator=g).to(dtype)
    z2 = torch.randn(1, d, generator=g).to(dtype)
    t = torch.tensor(tau) if tau_tensor else tau
    kw = dict(normalize=normalize, _backend=backend)
    rows = nt_xent(z1, z2, t, reduction="none", **kw)
    assert rows.tolist() == [0.0, 0.0]
    for mp in ("out", "in"):
        rows = nt_xent(torch.cat([z1, z2]), labels=torch.tensor([4, 4]), temperature=t,
                       multi_positive=mp, reduction="none", **kw)
        assert rows.tolist() == [0.0, 0.0]
    a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    loss = nt_xent(a, b, t, **kw)
    loss.backward()
    assert loss.item() == 0.0
    # the gradient of a constant 0: A_12 = g (P_12 + P_21 - 2) with P = exp(S - lse) = 1 up
    # to the rounding of S (|S| eps; S_21 is recomputed and may differ from S_12 in the last
    # bit); dz_k = A_12 / tau * zhat_other, chained through 1 / |z_k| when normalised
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    n1, n2 = float(z1.double().norm()), float(z2.double().norm())
    s_abs = (1.0 if normalize else n1 * n2) / tau
    for gz, own, other in ((a.grad, n1, n2), (b.grad, n2, n1)):
        bound = 8 * eps * (1 + s_abs) / tau * (1 / max(own, 1e-12) if normalize else other)
        assert gz.double().abs().max().item() <= bound


def test_one_pair_under_torch_func_is_zero():
    z1, z2 = _data(1, 5, 0), _data(1, 5, 1)
    out = torch.func.vmap(lambda a, b: nt_xent(a, b, reduction="none"))(z1[None], z2[None])
    assert out.tolist() == [[0.0, 0.0]]


# ------------------------------------------------------------------ API and errors
def test_module_one_matrix():
    z = _data(7, 4, 0)
    idx = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    loss_fn = NTXentLoss(0.3, multi_positive="in")
    torch.testing.assert_close(loss_fn(z, labels=idx),
                               nt_xent_reference(z, None, 0.3, labels=idx, multi_positive="in"))


@pytest.mark.parametrize("call, match", [
    (lambda z: nt_xent(z), "labels must be given with one matrix"),
    (lambda z: nt_xent(z, 0.5, labels=torch.zeros(5, dtype=torch.long)),
     "z2 must be a torch.Tensor .* or None"),
    (lambda z: nt_xent(z[:1], labels=torch.zeros(1, dtype=torch.long)), "at least two rows"),
    (lambda z: nt_xent(z, labels=torch.zeros(4, dtype=torch.long)),
     r"labels must be a 1-d tensor of length M = 5"),
    (lambda z: nt_xent(z, labels=torch.zeros(5)), "labels must be an integer tensor"),
    (lambda z: nt_xent(z, labels=torch.zeros(5, dtype=torch.long), weights=torch.ones(4)),
     r"weights must be a tensor of shape \(M,\) = \(5,\)"),
    (lambda z: nt_xent(z, labels=torch.zeros(5, dtype=torch.long), multi_positive="sum"),
     "multi_positive must be one of"),
    (lambda z: nt_xent(z, z, multi_positive=None), "multi_positive must be one of"),
    (lambda z: nt_xent(z[:, 0], labels=torch.zeros(5, dtype=torch.long)), "z1 must be a 2-d"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(5, 3))


def test_non_finite_one_matrix_is_named():
    z = torch.randn(5, 3)
    z[1, 1] = float("nan")
    with pytest.raises(ValueError, match="z1 holds NaN or inf"):
        nt_xent(z, labels=torch.zeros(5, dtype=torch.long))


# ------------------------------------------------------------------ compiled kernels on a GPU
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET,
                    reason="needs CUDA and TRITON_INTERPRET=0")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, d, classes, multi_positive", [
    (2, 64, 1, "in"), (7, 16, 3, "in"), (301, 128, 40, "in"), (300, 300, 150, "out"),
    (129, 257, 200, "in")])
def test_cuda_one_matrix(dtype, m, d, classes, multi_positive):
    """The compiled kernels in the one-matrix form (POS_LSE for "in", D chunks above 256):
    error against float64 within twice the same-dtype reference's plus one unit of the dtype
    (flash-attention's rule); one pair gives exactly 0."""
    z = _data(m, d, m + d)
    lab = _labels(m, classes, m, "random")
    cot = torch.rand(m, generator=torch.Generator().manual_seed(m), dtype=torch.float64) + 0.1

    def run(fn, zz):
        a = zz.detach().clone().cuda().requires_grad_(True)
        out = fn(a, None, 0.1, labels=lab.cuda(), multi_positive=multi_positive,
                 reduction="none")
        (out.double() * cot.cuda()).sum().backward()
        return out.detach().double().cpu(), a.grad.double().cpu()

    got = run(nt_xent, z.to(dtype))
    truth = run(nt_xent_reference, z)
    same = run(nt_xent_reference, z.to(dtype))
    if m == 2:
        assert got[0].tolist() == [0.0, 0.0]
    eps = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dtype]
    for mine, t, theirs in zip(got, truth, same):
        assert torch.isfinite(mine).all()
        err = (mine - t).abs().max().item()
        base = (theirs - t).abs().max().item() if torch.isfinite(theirs).all() else float("inf")
        assert err <= 2 * base + eps * max(t.abs().max().item(), 1.0 / 0.1), (err, base)
