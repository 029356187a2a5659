"""info_nce against the materialised float64 reference (values and gradients of query, key,
negatives, weights and temperature), both paths; lightly's / MoCo's / CLIP's formulas
rewritten from their definitions; MemoryBank; torch.func; gather_distributed on 2 processes.

The Triton kernels run on CPU tensors in the interpreter (TRITON_INTERPRET=1, which
conftest.py sets where there is no CUDA device), so shapes on that path stay small.
"""
import copy
import math
import os


import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import assume, given, settings, strategies as st  # noqa: E402

from helpers import HYPOTHESIS_SETTINGS as SETTINGS, INTERPRET, free_port, interp  # noqa: E402

import sdclr_fast  # noqa: E402
from sdclr_fast.ops import _common as common  # noqa: E402
from sdclr_fast.ops import info_nce as op  # noqa: E402
from sdclr_fast.ops.info_nce import InfoNCELoss, MemoryBank, info_nce, momentum_update_  # noqa: E402
from sdclr_fast.ops.reference import info_nce_reference  # noqa: E402

EPS = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 2.0 ** -23}


# ------------------------------------------------------------------ helpers
def _inputs(m, d, q, seed, dtype, kind="randn", scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=g, dtype=torch.float64) * scale
    y = torch.randn(m, d, generator=g, dtype=torch.float64) * scale
    n = torch.randn(q, d, generator=g, dtype=torch.float64) * scale if q else None
    if kind == "ties":  # repeated rows, keys equal to queries, bank rows equal to keys
        x[1::2] = x[0]
        y = x.clone()
        if n is not None:
            n[: min(q, m)] = y[: min(q, m)]
    elif kind == "zeros":  # zero rows (+0 and -0) and exact zeros in places
        x[0] = 0.0
        y[-1] = -0.0
        x[:, ::3] = 0.0
        if n is not None:
            n[0] = 0.0
    elif kind == "close":  # positives nearly parallel: large margins at small tau
        y = x + 0.05 * y
    return x.to(dtype), y.to(dtype), n.to(dtype) if n is not None else None


def _cot(rows, seed, device="cpu"):
    """Upstream gradient of both signs for reduction="none"."""
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.rand(rows, generator=g, dtype=torch.float64) * 2.5 - 1.0).to(device)


def _run(fn, x, y, n, temperature, cot, weights=None, n_grad=True, **kw):
    """Output and gradients [query, key, negatives, weights, temperature] (None where absent)."""
    x = x.detach().clone().requires_grad_(True)
    y = y.detach().clone().requires_grad_(True)
    if n is not None:
        n = n.detach().clone().requires_grad_(n_grad)
    if weights is not None:
        weights = weights.detach().clone().requires_grad_(True)
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.detach().clone().requires_grad_(True)
    out = fn(x, y, temperature, negatives=n, weights=weights, **kw)
    if out.dim():
        (out.double() * cot).sum().backward()
    else:
        out.backward()
    tg = temperature.grad if isinstance(temperature, torch.Tensor) else None
    return out.detach(), [x.grad, y.grad, n.grad if n is not None else None,
                          weights.grad if weights is not None else None, tg]


def _compare(fn_kw, x, y, n, temperature=0.2, weights=None, seed=0, n_grad=True, **kw):
    """(out, grads) of the op and of the float64 reference on the same (rounded) inputs, and
    the natural scales of the outputs."""
    rows = x.shape[0] * (2 if kw.get("symmetric") else 1)
    cot = _cot(rows, seed, x.device)
    if seed % 2:
        cot = cot.abs()
    got = _run(info_nce, x, y, n, temperature, cot, weights, n_grad, **kw, **fn_kw)
    t64 = temperature.double() if isinstance(temperature, torch.Tensor) else temperature
    ref = _run(info_nce_reference, x.double(), y.double(), n.double() if n is not None else None,
               t64, cot, weights.double() if weights is not None else None, n_grad, **kw)
    return got, ref, _scales(x, y, n, float(temperature), weights, cot, **kw)


def _scales(x, y, n, tau, w, cot, symmetric=False, reduction="mean", normalize=True, **_):
    """Size of the terms each output is summed from (|S| <= smax, sum_j |dS_ij| <= 2 g_i), so
    that a near-zero result is compared at the precision of its terms."""
    m = x.shape[0]
    rows = 2 * m if symmetric else m
    if reduction == "none":
        up = cot.abs().cpu()
    else:
        up = torch.full((rows,), 1.0 / rows if reduction == "mean" else 1.0, dtype=torch.float64)
    ww = torch.cat([w, w]).double().abs().cpu() if (w is not None and symmetric) else (
        w.double().abs().cpu() if w is not None else torch.ones(rows, dtype=torch.float64))
    upw = (up * ww).sum().item()
    mats = [t.double().cpu() for t in (x, y, n) if t is not None]
    zmax = 1.0 if normalize else max(t.norm(dim=1).max().item() for t in mats)
    q = n.shape[0] if n is not None else 0
    smax = zmax * zmax / tau + 1.0 + math.log(m + q)
    dz = 4 * upw * zmax / tau
    return {"out": smax * upw, "z": dz, "w": smax * up.max().item(), "tau": 2 * upw * smax / tau,
            "r": [1.0 / t.norm(dim=1).clamp_min(1e-12) if normalize else torch.ones(t.shape[0],
                  dtype=torch.float64) for t in mats]}


def _close(got, ref, scales, rtol, atol):
    """|got - ref| <= rtol |ref| + atol * (natural scale of the output's terms)."""
    (out, grads), (rout, rgrads) = got, ref
    names = ["out", "query", "key", "negatives", "weights", "tau"]
    for i, (name, a, b) in enumerate(zip(names, [out] + grads, [rout] + rgrads)):
        if b is None:
            assert a is None, name
            continue
        assert a is not None and a.shape == b.shape, name
        if name in ("query", "key", "negatives"):
            scale = (scales["z"] * scales["r"][i - 1])[:, None]
        else:
            scale = scales[{"out": "out", "weights": "w", "tau": "tau"}[name]]
        err = (a.double().cpu() - b.cpu()).abs()
        bound = rtol * b.cpu().abs() + atol * scale
        assert torch.isfinite(a).all() and (err <= bound).all(), (
            f"{name}: worst excess {(err - bound).max().item():.3g}, max err "
            f"{err.max().item():.3g}")


def _lowp_rule(got, ref, x, y, n, temperature, weights, seed, dtype, factor=2.0, **kw):
    """flash-attention rule: error vs float64 <= factor x the same-dtype reference's error plus
    one unit of the dtype at the output's magnitude."""
    rows = x.shape[0] * (2 if kw.get("symmetric") else 1)
    cot = _cot(rows, seed, x.device)
    if seed % 2:
        cot = cot.abs()
    lowp = _run(info_nce_reference, x, y, n, temperature, cot, weights, **kw)
    (out, grads), (rout, rgrads), (lout, lgrads) = got, ref, lowp
    for mine, theirs, truth in zip([out] + grads[:3], [lout] + lgrads[:3], [rout] + rgrads[:3]):
        if truth is None:
            continue
        mine, theirs, truth = mine.cpu().double(), theirs.cpu().double(), truth.cpu()
        assert torch.isfinite(mine).all()
        err = (mine - truth).abs().max().item()
        base = (theirs - truth).abs().max().item() if torch.isfinite(theirs).all() else math.inf
        tol = factor * base + EPS[dtype] * truth.abs().max().item()
        assert err <= tol, (err, base)


def _labels(classes, m, seed):
    if classes is None:
        return None
    return torch.randint(0, classes, (m,), generator=torch.Generator().manual_seed(seed + 2))


def _weights(kind, m, seed, dtype):
    if kind is None:
        return None
    w = torch.rand(m, generator=torch.Generator().manual_seed(seed + 3), dtype=torch.float64) * 2
    if kind == "zeros":
        w[::2] = 0.0
    return w.to(dtype)


def _valid(q, symmetric, in_batch, classes):
    return in_batch or (q > 0 and not symmetric and classes is None)


# ------------------------------------------------------------------ PyTorch path
case = dict(
    m=st.integers(1, 50), d=st.integers(1, 40), q=st.sampled_from([0, 0, 1, 7, 33, 64]),
    seed=st.integers(0, 2 ** 16), tau=st.floats(0.05, 1.0), symmetric=st.booleans(),
    in_batch=st.sampled_from([True, True, False]), classes=st.sampled_from([None, None, 1, 3]),
    weights=st.sampled_from([None, "rand", "zeros"]),
    reduction=st.sampled_from(["mean", "sum", "none"]), normalize=st.booleans(),
    tau_tensor=st.booleans(), kind=st.sampled_from(["randn", "randn", "ties", "zeros", "close"]))


@settings(max_examples=80, **SETTINGS)
@given(**case)
def test_torch_path_float64(m, d, q, seed, tau, symmetric, in_batch, classes, weights, reduction,
                            normalize, tau_tensor, kind):
    assume(_valid(q, symmetric, in_batch, classes))
    x, y, n = _inputs(m, d, q, seed, torch.float64, kind, scale=1.0 if normalize else 0.3)
    temperature = torch.tensor(tau, dtype=torch.float64) if tau_tensor else tau
    got, ref, sc = _compare(dict(_backend="torch"), x, y, n, temperature,
                            _weights(weights, m, seed, torch.float64), seed,
                            symmetric=symmetric, in_batch_negatives=in_batch,
                            labels=_labels(classes, m, seed), reduction=reduction,
                            normalize=normalize)
    _close(got, ref, sc, rtol=1e-9, atol=1e-11)


@settings(max_examples=25, **SETTINGS)
@given(m=st.integers(1, 60), d=st.integers(1, 50), q=st.sampled_from([0, 5, 80]),
       seed=st.integers(0, 2 ** 16), tau=st.floats(0.05, 1.0), symmetric=st.booleans(),
       in_batch=st.booleans(), classes=st.sampled_from([None, 4]),
       reduction=st.sampled_from(["mean", "none"]))
def test_torch_path_float32(m, d, q, seed, tau, symmetric, in_batch, classes, reduction):
    assume(_valid(q, symmetric, in_batch, classes))
    x, y, n = _inputs(m, d, q, seed, torch.float32)
    got, ref, sc = _compare(dict(_backend="torch"), x, y, n, tau, None, seed,
                            symmetric=symmetric, in_batch_negatives=in_batch,
                            labels=_labels(classes, m, seed), reduction=reduction)
    assert got[0].dtype == torch.float32
    _close(got, ref, sc, rtol=2e-5, atol=2e-6)


def test_torch_path_blocks(monkeypatch):
    """Several row blocks, the last one partial, in every loop of both passes."""
    monkeypatch.setattr(common, "CPU_BLOCK_ELEMS", 16 * 150)
    x, y, n = _inputs(70, 19, 45, 5, torch.float64)
    w = _weights("rand", 70, 5, torch.float64)
    for kw in (dict(), dict(symmetric=True, labels=_labels(6, 70, 5)),
               dict(in_batch_negatives=False)):
        got, ref, sc = _compare(dict(_backend="torch"), x, y, n, 0.3, w, 5, reduction="none",
                                **kw)
        _close(got, ref, sc, rtol=1e-9, atol=1e-11)


def test_detached_inputs_get_no_gradient():
    """A detached key (MoCo's momentum encoder) or bank: only the query gets a gradient, and
    it equals the one computed with every input requiring grad."""
    x, y, n = _inputs(9, 6, 13, 0, torch.float64)
    for inb in (True, False):
        xa = x.clone().requires_grad_(True)
        info_nce(xa, y, 0.2, negatives=n, in_batch_negatives=inb).backward()
        got, ref, sc = _compare(dict(), x, y, n, 0.2, in_batch_negatives=inb)
        torch.testing.assert_close(xa.grad, ref[1][0], rtol=1e-9, atol=1e-12)
    got, _, _ = _compare(dict(), x, y, n, 0.2, n_grad=False)
    assert got[1][2] is None


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interp)])
def test_tiny_temperature(backend):
    """tau = 0.01 with anti-parallel and parallel rows: scores of +-100 (1e4 unnormalised);
    finite, and within the first-order effect of fp32 score rounding."""
    x, y, n = _inputs(6, 5, 9, 0, torch.float32)
    y[0] = -3 * x[0]
    n[1] = x[2]
    for normalize in (True, False):
        for kw in (dict(symmetric=True), dict(in_batch_negatives=False)):
            got, ref, _ = _compare(dict(_backend=backend), x, y, n, 0.01,
                                   _weights("rand", 6, 0, torch.float32), reduction="none",
                                   normalize=normalize, **kw)
            norms = torch.cat([x, y, n]).double().norm(dim=1)
            smax = (1.0 if normalize else norms.max().item() ** 2) / 0.01
            for mine, truth in zip([got[0]] + got[1][:3], [ref[0]] + ref[1][:3]):
                assert torch.isfinite(mine).all()
                bound = 4 * EPS[torch.float32] * smax * max(truth.abs().max().item(), 1.0)
                assert (mine.double() - truth).abs().max().item() <= bound


def test_gradcheck_and_gradgradcheck_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    n = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 1])
    for kw in (dict(), dict(symmetric=True), dict(in_batch_negatives=False),
               dict(labels=labels, symmetric=True), dict(normalize=False, reduction="none")):
        def f(a, b, c, ww, tt):
            return info_nce(a, b, tt, negatives=c, weights=ww, **kw)

        assert torch.autograd.gradcheck(f, (x, y, n, w, t))
        assert torch.autograd.gradgradcheck(f, (x, y, n, w, t))


def test_double_backward_matches_reference():
    """Hessian-vector products (create_graph=True) against autograd through the reference."""
    x, y, n = _inputs(7, 6, 5, 3, torch.float64)
    t = torch.tensor(0.3, dtype=torch.float64)
    v = [torch.randn(s.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
         for s in (x, y, n)]
    res = []
    for fn in (info_nce, info_nce_reference):
        a, b, c, tt = (u.clone().requires_grad_(True) for u in (x, y, n, t))
        gs = torch.autograd.grad(fn(a, b, tt, negatives=c, symmetric=True), (a, b, c),
                                 create_graph=True)
        dot = sum((gi * vi).sum() for gi, vi in zip(gs, v))
        res.append(torch.autograd.grad(dot, (a, b, c, tt)))
    for p, r in zip(*res):
        torch.testing.assert_close(p, r, rtol=1e-9, atol=1e-12)


def test_torch_func_grad_vmap_jacrev():
    from torch.func import grad, jacrev, vmap

    x, y, n = _inputs(5, 4, 6, 1, torch.float64)
    xb = torch.randn(3, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for fn_kw in (dict(), dict(symmetric=True), dict(in_batch_negatives=False)):
        def mine(a, b):
            return info_nce(a, b, 0.3, negatives=n, **fn_kw)

        def ref(a, b):
            return info_nce_reference(a, b, 0.3, negatives=n, **fn_kw)

        for tr in (grad, jacrev):
            for p, r in zip(tr(mine, argnums=(0, 1))(x, y), tr(ref, argnums=(0, 1))(x, y)):
                torch.testing.assert_close(p, r, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(vmap(mine, (0, None))(xb, y), vmap(ref, (0, None))(xb, y))
        torch.testing.assert_close(vmap(grad(mine), (0, None))(xb, y),
                                   vmap(grad(ref), (0, None))(xb, y))


def test_lightly_memory_bank_formula():
    """lightly's NTXentLoss with a memory bank: out0, out1 normalised, logits
    [out0_i . out1_i, out0_i . bank_j] / tau with target 0, mean cross-entropy; the bank is
    the one from before this step's keys are enqueued."""
    x, y, n = _inputs(12, 16, 40, 4, torch.float64)
    bank = F.normalize(n, dim=1)
    o0, o1 = F.normalize(x, dim=1), F.normalize(y, dim=1)
    logits = torch.cat([torch.einsum("nc,nc->n", o0, o1)[:, None],
                        torch.einsum("nc,kc->nk", o0, bank)], 1) / 0.5
    want = F.cross_entropy(logits, torch.zeros(12, dtype=torch.long))
    torch.testing.assert_close(info_nce(x, y, 0.5, negatives=bank, in_batch_negatives=False),
                               want)
    # the MoCo / lightly step order with the bank module
    mb = MemoryBank(40, 16, dtype=torch.float64)
    mb.bank.copy_(bank)
    neg = mb.negatives()
    mb.enqueue(o1)
    torch.testing.assert_close(info_nce(x, y, 0.5, negatives=neg, in_batch_negatives=False),
                               want)


def test_clip_and_moco_formulas():
    """CLIP: mean of the image->text and text->image cross-entropies over the M x M logits;
    in-batch InfoNCE with a bank: cross-entropy over [all keys, bank] with target i."""
    x, y, n = _inputs(10, 8, 6, 5, torch.float64)
    a, b = F.normalize(x, dim=1), F.normalize(y, dim=1)
    logits = a @ b.t() / 0.07
    target = torch.arange(10)
    clip = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    torch.testing.assert_close(info_nce(x, y, 0.07, symmetric=True), clip)
    full = torch.cat([logits, a @ F.normalize(n, dim=1).t() / 0.07], 1)
    torch.testing.assert_close(info_nce(x, y, 0.07, negatives=n), F.cross_entropy(full, target))


def test_labels_supcon_average():
    """Equal labels: every same-label key is a positive; label = row index is plain InfoNCE."""
    x, y, n = _inputs(9, 7, 4, 0, torch.float64)
    torch.testing.assert_close(info_nce(x, y, negatives=n, labels=torch.arange(9) * 5 - 3),
                               info_nce(x, y, negatives=n))
    lab = torch.tensor([0, 1, 0, 2, 1, 0, 3, 3, 2])
    rows = info_nce(x, y, 0.2, negatives=n, labels=lab, reduction="none")
    s = F.normalize(x, dim=1) @ F.normalize(torch.cat([y, n]), dim=1).t() / 0.2
    logp = s - torch.logsumexp(s, 1, keepdim=True)
    for i in range(9):
        p = (lab == lab[i]).nonzero().squeeze(1)
        torch.testing.assert_close(rows[i], -logp[i, p].mean())


def test_module_and_learnable_temperature():
    x, y, n = _inputs(8, 6, 5, 0, torch.float64)
    loss_fn = InfoNCELoss(0.3, reduction="sum", symmetric=True)
    torch.testing.assert_close(loss_fn(x, y), info_nce(x, y, 0.3, reduction="sum",
                                                        symmetric=True))
    learn = InfoNCELoss(torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64)))
    assert list(learn.parameters()) == [learn.temperature]
    learn(x, y, negatives=n).backward()
    t = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    info_nce_reference(x, y, t, negatives=n).backward()
    torch.testing.assert_close(learn.temperature.grad, t.grad)


def test_public_exports():
    assert sdclr_fast.info_nce is info_nce and sdclr_fast.MemoryBank is MemoryBank


def test_reduction_none_order():
    x, y, _ = _inputs(6, 5, 0, 0, torch.float32)
    rows = info_nce(x, y, symmetric=True, reduction="none")
    assert rows.shape == (12,) and rows.dtype == torch.float32
    torch.testing.assert_close(rows[:6], info_nce(x, y, reduction="none"))
    torch.testing.assert_close(rows[6:], info_nce(y, x, reduction="none"))
    torch.testing.assert_close(info_nce(x, y, symmetric=True), rows.mean())


def test_empty_bank_is_no_bank():
    x, y, _ = _inputs(5, 4, 0, 0, torch.float64)
    torch.testing.assert_close(info_nce(x, y, negatives=torch.empty(0, 4, dtype=torch.float64)),
                               info_nce(x, y))


def test_gather_distributed_without_process_group_is_local():
    x, y, n = _inputs(5, 4, 3, 0, torch.float64)
    torch.testing.assert_close(info_nce(x, y, negatives=n, gather_distributed=True,
                                        symmetric=True), info_nce(x, y, negatives=n,
                                                                  symmetric=True))


# ------------------------------------------------------------------ Triton path (interpreter)
@interp
@pytest.mark.slow
@settings(max_examples=40, **SETTINGS)
@given(m=st.integers(1, 40), d=st.integers(1, 40), q=st.sampled_from([0, 1, 19, 40]),
       seed=st.integers(0, 2 ** 16), tau=st.floats(0.05, 1.0), symmetric=st.booleans(),
       in_batch=st.sampled_from([True, True, False]), classes=st.sampled_from([None, 1, 3]),
       weights=st.sampled_from([None, "rand", "zeros"]),
       reduction=st.sampled_from(["mean", "sum", "none"]), normalize=st.booleans(),
       tau_tensor=st.booleans(), kind=st.sampled_from(["randn", "ties", "zeros", "close"]),
       block_d=st.sampled_from([None, None, 16]))
def test_triton_float32(m, d, q, seed, tau, symmetric, in_batch, classes, weights, reduction,
                        normalize, tau_tensor, kind, block_d):
    """fp32 tl.dot is exact in the interpreter, so the kernels match float64 to fp32 rounding.
    block_d=16 forces the chunked-D path at small D; tiles are 16 x 16 there, so these
    shapes span several row and column tiles."""
    assume(_valid(q, symmetric, in_batch, classes))
    x, y, n = _inputs(m, d, q, seed, torch.float32, kind, scale=1.0 if normalize else 0.3)
    temperature = torch.tensor(tau) if tau_tensor else tau
    got, ref, sc = _compare(dict(_backend="triton", _block_d=block_d), x, y, n, temperature,
                            _weights(weights, m, seed, torch.float32), seed,
                            symmetric=symmetric, in_batch_negatives=in_batch,
                            labels=_labels(classes, m, seed), reduction=reduction,
                            normalize=normalize)
    _close(got, ref, sc, rtol=3e-5, atol=3e-6)


@interp
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@settings(max_examples=12, **SETTINGS)
@given(m=st.integers(1, 40), d=st.integers(2, 40), q=st.sampled_from([0, 23, 48]),
       seed=st.integers(0, 2 ** 16), tau=st.floats(0.05, 1.0), symmetric=st.booleans(),
       in_batch=st.booleans())
def test_triton_low_precision(dtype, m, d, q, seed, tau, symmetric, in_batch):
    assume(_valid(q, symmetric, in_batch, None))
    x, y, n = _inputs(m, d, q, seed, dtype)
    kw = dict(symmetric=symmetric, in_batch_negatives=in_batch)
    got, ref, _ = _compare(dict(_backend="triton"), x, y, n, tau, None, seed, **kw)
    assert got[0].dtype == dtype and got[1][0].dtype == dtype and got[1][2] is None or \
        got[1][2].dtype == dtype
    _lowp_rule(got, ref, x, y, n, tau, None, seed, dtype, **kw)


@interp
@pytest.mark.slow
@settings(max_examples=25, **SETTINGS)
@given(m=st.sampled_from([1, 16, 20, 33, 48]), d=st.integers(1, 24),
       q=st.sampled_from([0, 1, 16, 17, 50, 100]), seed=st.integers(0, 2 ** 16),
       sms=st.integers(2, 24), symmetric=st.booleans(), in_batch=st.booleans(),
       classes=st.sampled_from([None, 3]))
def test_column_splits_against_the_reference(m, d, q, seed, sms, symmetric, in_batch, classes):
    """On a device of `sms` SMs the columns ([keys; bank], or only the bank with
    in_batch_negatives=False) are split across programs and the partial log-sum-exps and
    gradients merged: the bank or the key count not a multiple of the split (the last chunk
    short or a chunk that straddles keys and bank), one column tile, a split that holds no
    column of a row (only the diagonal tile in split 0) - values and gradients match
    float64 with the unsplit tolerance."""
    from sdclr_fast.kernels import _common as kc

    assume(_valid(q, symmetric, in_batch, classes))
    x, y, n = _inputs(m, d, q, seed, torch.float32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kc, "INTERP_SMS", sms)
        got, ref, sc = _compare(dict(_backend="triton"), x, y, n, 0.2,
                                _weights("rand", m, seed, torch.float32), seed,
                                symmetric=symmetric, in_batch_negatives=in_batch,
                                labels=_labels(classes, m, seed), reduction="none")
    _close(got, ref, sc, rtol=3e-5, atol=3e-6)


@interp
def test_moco_form_splits_the_bank(monkeypatch):
    """The MoCo form at a small scale takes several column splits (the bank cut into chunks
    that are not a multiple of the split), forward and backward, and matches float64."""
    from sdclr_fast.kernels import _common as kc
    from sdclr_fast.kernels import info_nce as k

    grids = []
    real = k.plan
    monkeypatch.setattr(k, "plan", lambda *a, **kw: grids.append(real(*a, **kw)[2]) or
                        real(*a, **kw))
    monkeypatch.setattr(kc, "INTERP_SMS", 12)
    x, y, n = _inputs(20, 8, 70, 3, torch.float32)
    got, ref, sc = _compare(dict(_backend="triton"), x, y, n, 0.1,
                            _weights("rand", 20, 0, torch.float32), 1, reduction="none")
    _close(got, ref, sc, rtol=3e-5, atol=3e-6)
    assert grids and max(g[1] for g in grids) > 1


@interp
def test_triton_edge_shapes():
    """One row, D = 1, D past one chunk (block_d 16), rows and bank spanning several tiles."""
    for m, d, q, bd in ((1, 1, 0, None), (1, 5, 3, None), (3, 2, 1, None), (37, 20, 50, 16),
                        (17, 33, 17, None)):
        x, y, n = _inputs(m, d, q, m + d, torch.float32)
        for kw in (dict(symmetric=True), dict(in_batch_negatives=False)):
            if n is None and not kw.get("symmetric"):
                continue
            got, ref, sc = _compare(dict(_backend="triton", _block_d=bd), x, y, n, 0.2,
                                    _weights("rand", m, 0, torch.float32), 1, reduction="none",
                                    labels=_labels(3, m, 0) if kw.get("symmetric") else None,
                                    **kw)
            _close(got, ref, sc, rtol=3e-5, atol=3e-6)
    # "sum" / "mean" hand the backward an expanded (stride-0) upstream gradient
    x, y, n = _inputs(20, 3, 18, 0, torch.float32)
    for reduction in ("sum", "mean"):
        for kw in (dict(symmetric=True), dict(in_batch_negatives=False)):
            got, ref, sc = _compare(dict(_backend="triton"), x, y, n, 0.5, None, 0,
                                    reduction=reduction, normalize=False, **kw)
            _close(got, ref, sc, rtol=3e-5, atol=3e-6)


@interp
def test_force_triton_env(monkeypatch):
    """SDCLR_FAST_FORCE_TRITON=1 routes CPU tensors to the kernels (read at call time)."""
    calls = []
    k = op._kernels()
    real = k.forward
    monkeypatch.setattr(k, "forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x, y, n = _inputs(4, 8, 5, 0, torch.float32)
    info_nce(x, y, negatives=n)
    assert not calls
    monkeypatch.setenv("SDCLR_FAST_FORCE_TRITON", "1")
    torch.testing.assert_close(info_nce(x, y, negatives=n),
                               info_nce_reference(x, y, negatives=n))
    assert calls


@interp
def test_triton_temperature_schedule():
    """Temperatures reach the kernels as runtime values (read from memory)."""
    x, y, n = _inputs(5, 16, 7, 0, torch.float32)
    for tau in (0.1, 0.3, torch.tensor(0.7)):
        torch.testing.assert_close(info_nce(x, y, tau, negatives=n, _backend="triton"),
                                   info_nce_reference(x, y, tau, negatives=n))


# ------------------------------------------------------------------ MemoryBank
def test_memory_bank_follows_lightly_rule():
    """lightly's MemoryBankModule rule, as NTXentLoss(memory_bank_size=...) follows it: a batch
    that reaches the end fills the bank to the end, drops the rest and sets the pointer to 0."""
    mb = MemoryBank(5, 2, generator=torch.Generator().manual_seed(0))
    assert mb.bank.shape == (5, 2) and torch.allclose(mb.bank.norm(dim=1), torch.ones(5))
    batches = [torch.full((3, 2), float(i + 1)) for i in range(3)]
    for keys in batches:
        mb.enqueue(keys.requires_grad_(True))
    torch.testing.assert_close(mb.bank[:3], batches[2])  # the last batch
    torch.testing.assert_close(mb.bank[3:], batches[1][:2])  # batch 2 filled to the end, its 3rd row dropped
    assert int(mb.ptr) == 3
    assert not mb.bank.requires_grad and not mb.negatives().requires_grad
    # over many batches: the rule, simulated one batch at a time
    mb = MemoryBank(10, 3, generator=torch.Generator().manual_seed(1))
    expect, ptr = mb.bank.clone(), 0
    for step, b in enumerate([4, 4, 2, 7, 12, 1, 9]):  # ends exactly at the end, and a batch > size
        keys = torch.full((b, 3), float(step)) + torch.arange(float(b))[:, None] / 100
        mb.enqueue(keys)
        if ptr + b >= 10:
            expect[ptr:] = keys[:10 - ptr]
            ptr = 0
        else:
            expect[ptr:ptr + b] = keys
            ptr += b
        torch.testing.assert_close(mb.bank, expect)
        assert int(mb.ptr) == ptr


def test_memory_bank_negatives_is_a_copy_and_state_dict():
    mb = MemoryBank(6, 4, dtype=torch.float64)
    neg = mb.negatives()
    mb.enqueue(torch.zeros(2, 4, dtype=torch.float64))
    assert neg.abs().sum(1).min() > 0  # enqueue did not write into the returned negatives
    state = mb.state_dict()
    assert set(state) == {"bank", "ptr"}
    other = MemoryBank(6, 4, dtype=torch.float64)
    other.load_state_dict(state)
    torch.testing.assert_close(other.bank, mb.bank)
    assert int(other.ptr) == 2
    with pytest.raises(ValueError, match=r"keys must be a \(B, 4\)"):
        mb.enqueue(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="size must be a positive int"):
        MemoryBank(0, 4)


def test_moco_step():
    """The documented MoCo loop: the query gradient is the reference's with the bank from
    before the step, the key encoder is the EMA of the query encoder, and the bank holds the
    last steps' keys."""
    torch.manual_seed(0)
    f_q = torch.nn.Linear(8, 4, dtype=torch.float64)
    f_k = torch.nn.Linear(8, 4, dtype=torch.float64)
    f_k.load_state_dict(f_q.state_dict())
    ema = [p.detach().clone() for p in f_k.parameters()]
    bank = MemoryBank(32, 4, dtype=torch.float64)
    opt = torch.optim.SGD(f_q.parameters(), lr=0.5)
    data = torch.randn(16, 8, dtype=torch.float64)
    keys = []
    for _ in range(3):
        x1 = data + 0.05 * torch.randn_like(data)
        x2 = data + 0.05 * torch.randn_like(data)
        q = f_q(x1)
        with torch.no_grad():
            momentum_update_(f_k, f_q, 0.9)
            ema = [0.9 * e + 0.1 * p for e, p in zip(ema, f_q.parameters())]
            k = f_k(x2)
        neg = bank.negatives()
        before = neg.clone()
        loss = info_nce(q, k, 0.2, negatives=neg, in_batch_negatives=False)
        bank.enqueue(F.normalize(k, dim=1))  # MoCo enqueues inside forward, before backward
        opt.zero_grad()
        loss.backward()
        grads = [p.grad.clone() for p in f_q.parameters()]
        opt.zero_grad()
        info_nce_reference(f_q(x1), k, 0.2, negatives=before, in_batch_negatives=False).backward()
        for a, p in zip(grads, f_q.parameters()):
            torch.testing.assert_close(a, p.grad)
        for e, p in zip(ema, f_k.parameters()):
            torch.testing.assert_close(e, p)
        opt.step()
        keys.append(F.normalize(k, dim=1))
    # 48 keys into 32 slots: the pointer is at 48 % 32 = 16, slots 16..31 hold step 2's keys
    assert int(bank.ptr) == 16
    torch.testing.assert_close(bank.bank[16:], keys[1])
    torch.testing.assert_close(bank.bank[:16], keys[2])


def test_momentum_update_refuses_mismatched_models():
    """zip() used to pair the parameters and silently skip the extras of the larger model."""
    online = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    target = copy.deepcopy(online)
    before = [p.clone() for p in target.parameters()]
    cases = [
        (torch.nn.Sequential(torch.nn.Linear(4, 3)), "target has 2, online has 4"),  # fewer parameters
        (torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 5)), r"shape of parameter '1.weight'"),
        (torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2, bias=False), torch.nn.Linear(2, 2)),
         "differ at parameter 3"),
    ]
    for other, match in cases:
        with pytest.raises(ValueError, match=match):
            momentum_update_(other, online, 0.5)
    named = torch.nn.Module()
    named.a, named.b = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"target has 'a.weight', online has '0.weight'"):
        momentum_update_(named, online, 0.5)
    for b, p in zip(before, target.parameters()):
        assert torch.equal(b, p)  # nothing was updated by a refused call
    # a DDP / torch.compile wrapper's prefix is not a mismatch
    wrapped = torch.nn.Module()
    wrapped.module = copy.deepcopy(online)
    momentum_update_(target, wrapped, 0.5)
    momentum_update_(target, online, 0.5)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("call, match", [
    (lambda z: info_nce(z, z[:, :3]), "same shape"),
    (lambda z: info_nce(z[:0], z[:0]), "at least one row"),
    (lambda z: info_nce(z[0], z[0]), "query must be a 2-d"),
    (lambda z: info_nce(z, z.long()), "key must be a floating-point"),
    (lambda z: info_nce(z, z.double()), "key has dtype"),
    (lambda z: info_nce(z, z.to("meta")), "key is on meta"),
    (lambda z: info_nce(z.tolist(), z), "query must be a torch.Tensor"),
    (lambda z: info_nce(z, z, negatives=torch.randn(3, 4)), "negatives must have D = 5"),
    (lambda z: info_nce(z, z, negatives=torch.randn(3)), "negatives must be a 2-d"),
    (lambda z: info_nce(z, z, negatives=torch.randn(3, 5).double()), "negatives has dtype"),
    (lambda z: info_nce(z, z, negatives=torch.randn(3, 5, device="meta")), "negatives is on"),
    (lambda z: info_nce(z, z, in_batch_negatives=False), "needs a non-empty negatives"),
    (lambda z: info_nce(z, z, negatives=z, in_batch_negatives=False, symmetric=True),
     "symmetric=True needs in_batch_negatives=True"),
    (lambda z: info_nce(z, z, negatives=z, in_batch_negatives=False, labels=torch.arange(4)),
     "labels need in_batch_negatives=True"),
    (lambda z: info_nce(z, z, 0.0), "temperature must be finite and > 0"),
    (lambda z: info_nce(z, z, -0.1), "temperature must be finite and > 0"),
    (lambda z: info_nce(z, z, float("nan")), "temperature must be finite and > 0"),
    (lambda z: info_nce(z, z, float("inf")), "temperature must be finite and > 0"),
    (lambda z: info_nce(z, z, torch.tensor(0.0)), "temperature must be finite and > 0"),
    (lambda z: info_nce(z, z, torch.tensor(-1.0)), "temperature must be finite and > 0"),
    (lambda z: info_nce(z, z, torch.tensor(float("nan"))), "temperature must be finite"),
    (lambda z: info_nce(z, z, torch.tensor([0.1, 0.2])), "temperature must be a number or a 1"),
    (lambda z: info_nce(z, z, "0.2"), "temperature must be a positive number"),
    (lambda z: info_nce(z, z, True), "temperature must be a positive number"),
    (lambda z: info_nce(z, z, reduction="avg"), "reduction must be one of"),
    (lambda z: info_nce(z, z, normalize=1), "normalize must be a bool"),
    (lambda z: info_nce(z, z, symmetric=None), "symmetric must be a bool"),
    (lambda z: info_nce(z, z, weights=torch.ones(5)), r"weights must be a tensor of shape \(M,\)"),
    (lambda z: info_nce(z, z, weights=torch.ones(4, dtype=torch.long)),
     "weights must be a floating-point"),
    (lambda z: info_nce(z, z, labels=torch.zeros(3, dtype=torch.long)),
     r"labels must be a 1-d tensor of length M = "),
    (lambda z: info_nce(z, z, labels=torch.zeros(4)), "labels must be an integer tensor"),
    (lambda z: info_nce(z, z, _backend="cuda"), "_backend must be"),
    (lambda z: info_nce(z.double(), z.double(), _backend="triton"), "float32/float16/bfloat16"),
])
def test_bad_input(call, match):
    z = torch.randn(4, 5)
    with pytest.raises(ValueError, match=match):
        call(z)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_name_the_tensor(bad):
    z = torch.randn(4, 5)
    zb = z.clone()
    zb[2, 1] = bad
    with pytest.raises(ValueError, match="query holds NaN or inf"):
        info_nce(zb, z)
    with pytest.raises(ValueError, match="key holds NaN or inf"):
        info_nce(z, zb)
    with pytest.raises(ValueError, match="negatives holds NaN or inf"):
        info_nce(z, z, negatives=zb)


# ------------------------------------------------------------------ GPU lowering without a GPU
@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """The interpreter accepts code that the compiler rejects: lower every launch variant
    (tests/aot_kernels.py: the launch plan's constexprs, split and unsplit, the merge kernel)
    to sm_90 and sm_80 cubins, none of them spilling (needs Triton's bundled ptxas and
    cuobjdump only)."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_INTERPRET="0")
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, os.path.join(here, "aot_kernels.py"),
                           os.path.dirname(here), "info_nce"], env=env, capture_output=True,
                          text=True, timeout=1500)
    if proc.returncode and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("Triton's ptxas is not available")
    assert proc.returncode == 0 and proc.stdout.split() == ["ok", "82"], proc.stderr[-3000:]


# ------------------------------------------------------------------ compiled kernels on a GPU
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET,
                    reason="needs CUDA and TRITON_INTERPRET=0")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, d, q, kw", [(1, 16, 0, dict(symmetric=True)),
                                         (300, 128, 1000, dict()),
                                         (129, 300, 70, dict(in_batch_negatives=False)),
                                         (200, 64, 0, dict(symmetric=True, labels=5))])
def test_cuda_kernels(dtype, m, d, q, kw):
    """The compiled kernels against float64 with the 2x rule against the same-dtype
    reference (fp32 with TF32 off, as torch.matmul's default)."""
    x, y, n = (t.cuda() if t is not None else None for t in _inputs(m, d, q, m + d, dtype))
    if "labels" in kw:
        kw = dict(kw, labels=_labels(kw["labels"], m, 0).cuda())
    got, ref, _ = _compare(dict(), x, y, n, 0.1, None, 1, reduction="none", **kw)
    _lowp_rule(got, ref, x, y, n, 0.1, None, 1, dtype, reduction="none", **kw)


# ------------------------------------------------------------------ gather_distributed (2 gloo processes)
WORLD, DM, DD, DQ = 2, 5, 7, 6

# name: (dtype, backend, reduction, symmetric, labels, weights, bank requires grad)
DIST_CASES = {
    "bank_mean": (torch.float64, "torch", "mean", False, False, False, True),
    "sym_labels_none": (torch.float64, "torch", "none", True, True, True, False),
    "sym_sum": (torch.float64, "torch", "sum", True, False, False, True),
    "triton_sym_labels": (torch.float32, "triton", "none", True, True, False, True),
    "triton_bank_mean": (torch.float32, "triton", "mean", False, False, True, False),
}


def _dist_data(name):
    """Every rank's inputs, generated identically in all processes; one shared bank."""
    import zlib

    dtype, _, _, _, labels, weights, _ = DIST_CASES[name]
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    x = torch.randn(WORLD, DM, DD, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(WORLD, DM, DD, generator=g, dtype=torch.float64).to(dtype)
    n = torch.randn(DQ, DD, generator=g, dtype=torch.float64).to(dtype)
    lab = torch.randint(0, 3, (WORLD, DM), generator=g) if labels else None
    w = torch.rand(WORLD, DM, generator=g, dtype=torch.float64).to(dtype) if weights else None
    cot = torch.rand(WORLD, 2 * DM, generator=g, dtype=torch.float64) + 0.5
    return x, y, n, lab, w, cot


def _dist_worker(rank, port, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name, (dtype, backend, reduction, symmetric, _, _, bank_grad) in DIST_CASES.items():
            x, y, n, lab, w, cot = _dist_data(name)
            a = x[rank].clone().requires_grad_(True)
            b = y[rank].clone().requires_grad_(True)
            nb = n.clone().requires_grad_(bank_grad)
            t = torch.tensor(0.3, dtype=dtype, requires_grad=True)
            out = info_nce(a, b, t, negatives=nb, symmetric=symmetric, reduction=reduction,
                           weights=None if w is None else w[rank],
                           labels=None if lab is None else lab[rank],
                           gather_distributed=True, _backend=backend)
            if reduction == "none":
                (out.double() * cot[rank][: out.shape[0]]).sum().backward()
            else:
                out.backward()
            results[name] = (out.detach(), a.grad, b.grad, nb.grad, t.grad)
        # the bank of every rank receives the keys of all ranks, in rank order
        mb = MemoryBank(8, 3, gather_distributed=True)
        mb.enqueue(torch.full((2, 3), float(rank)))
        results["bank"] = mb.bank.clone()
        try:
            k = DM if rank == 0 else DM - 1
            info_nce(torch.randn(k, DD), torch.randn(k, DD), gather_distributed=True)
        except ValueError as exc:
            results["unequal"] = str(exc)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # leave together: see helpers.free_port
    finally:
        dist.destroy_process_group()


def _dist_single(name):
    """The single-process run on the concatenated batch (rank 0's rows, then rank 1's)."""
    dtype, _, reduction, symmetric, labels, weights, bank_grad = DIST_CASES[name]
    x, y, n, lab, w, cot = _dist_data(name)
    a = torch.cat(list(x)).double().requires_grad_(True)
    b = torch.cat(list(y)).double().requires_grad_(True)
    nb = n.double().requires_grad_(bank_grad)
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    out = info_nce_reference(a, b, t, negatives=nb, symmetric=symmetric, reduction=reduction,
                             weights=torch.cat(list(w)).double() if weights else None,
                             labels=torch.cat(list(lab)) if labels else None)
    if reduction == "none":
        # rank r's cot covers its query rows, then its key rows
        c = cot[:, :DM].reshape(-1)
        if symmetric:
            c = torch.cat([c, cot[:, DM:].reshape(-1)])
        (out * c).sum().backward()
    else:
        out.backward()
    return out.detach(), a.grad, b.grad, nb.grad, t.grad


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    import torch.multiprocessing as mp

    out_dir = str(tmp_path_factory.mktemp("dist"))
    mp.spawn(_dist_worker, args=(free_port(), out_dir), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DIST_CASES))
def test_gather_distributed_matches_single_process(dist_results, name):
    """Each rank's loss is over its own rows against all ranks' keys (and queries when
    symmetric); the gathered rows' gradients come back to their owners: the gradient of each
    rank's inputs is the single-process one (x WORLD for "mean", whose ranks' losses
    average to the single-process loss); the shared bank's and temperature's gradients,
    summed over ranks, likewise."""
    dtype, _, reduction, symmetric, *_ = DIST_CASES[name]
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    out, ga, gb, gn, gt = _dist_single(name)
    res = [dist_results[r][name] for r in range(WORLD)]
    if reduction == "none":
        for r in range(WORLD):
            want = out[r * DM:(r + 1) * DM]
            if symmetric:
                want = torch.cat([want, out[WORLD * DM + r * DM:WORLD * DM + (r + 1) * DM]])
            torch.testing.assert_close(res[r][0].double(), want, **tol)
    elif reduction == "mean":
        torch.testing.assert_close(sum(p[0].double() for p in res) / WORLD, out, **tol)
    else:
        torch.testing.assert_close(sum(p[0].double() for p in res), out, **tol)
    factor = WORLD if reduction == "mean" else 1.0
    for r in range(WORLD):
        torch.testing.assert_close(res[r][1].double(), ga[r * DM:(r + 1) * DM] * factor, **tol)
        torch.testing.assert_close(res[r][2].double(), gb[r * DM:(r + 1) * DM] * factor, **tol)
    if gn is not None:
        torch.testing.assert_close(sum(p[3].double() for p in res), gn * factor, **tol)
    torch.testing.assert_close(sum(p[4].double() for p in res), gt * factor, **tol)


@pytest.mark.slow
def test_memory_bank_gathers_all_ranks_and_unequal_batches_are_refused(dist_results):
    for r in range(WORLD):
        bank = dist_results[r]["bank"]
        torch.testing.assert_close(bank[:4], torch.tensor([[0.0] * 3] * 2 + [[1.0] * 3] * 2))
        assert "same M on every rank" in dist_results[r]["unequal"]


def _group_bank_worker(rank, port, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=4)
    try:
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates both, in order
        mb = MemoryBank(8, 3, gather_distributed=groups[rank // 2])
        mb.enqueue(torch.full((2, 3), float(rank)))
        torch.save(mb.bank.clone(), os.path.join(out_dir, f"bank{rank}.pt"))
        dist.barrier()  # leave together: see helpers.free_port
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_memory_bank_of_a_process_group_gathers_that_group_only(tmp_path):
    """gather_distributed=<a group> (a DnC expert's ranks): the bank takes the keys of the
    group's ranks, in their order, not the whole world's."""
    import torch.multiprocessing as mp

    mp.spawn(_group_bank_worker, args=(free_port(), str(tmp_path)), nprocs=4, join=True)
    for rank in range(4):
        first = 2 * (rank // 2)
        want = torch.tensor([first] * 2 + [first + 1] * 2, dtype=torch.float32)
        assert torch.equal(torch.load(tmp_path / f"bank{rank}.pt")[:4, 0], want), rank
