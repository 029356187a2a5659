"""nt_xent against the materialised float64 reference: values and gradients, both paths.

The Triton kernels run on CPU tensors in the interpreter (TRITON_INTERPRET=1, which
conftest.py sets where there is no CUDA device), so shapes on that path stay small.
"""
import math
import os


import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from helpers import HYPOTHESIS_SETTINGS as SETTINGS, INTERPRET, interp  # noqa: E402

import sdclr_fast  # noqa: E402
from sdclr_fast.ops import _common as common  # noqa: E402
from sdclr_fast.ops import nt_xent as op  # noqa: E402
from sdclr_fast.ops.nt_xent import NTXentLoss, nt_xent  # noqa: E402
from sdclr_fast.ops.reference import (  # noqa: E402
    nt_xent_cross_entropy_reference, nt_xent_reference)

# On a GPU machine run the CUDA tests with TRITON_INTERPRET=0
# (`TRITON_INTERPRET=0 pytest -m cuda tests/test_nt_xent.py`).
CPU_BACKENDS = ["torch", "triton"] if INTERPRET else ["torch"]
EPS = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 2.0 ** -23}


# ------------------------------------------------------------------ helpers
def _inputs(n, d, seed, dtype, kind="randn", scale=1.0):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    z2 = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    if kind == "ties":  # repeated rows and views equal to each other: ties in every row
        z1[1::2] = z1[0]
        z2 = z1.clone()
    elif kind == "zeros":  # zero rows (+0 and -0) and exact zeros in places
        z1[0] = 0.0
        z2[-1] = -0.0
        z1[:, ::3] = 0.0
    elif kind == "sparse":
        z1 = torch.where(z1.abs() > 1.0, z1, torch.zeros_like(z1))
        z2 = torch.where(z2.abs() > 1.0, z2, torch.zeros_like(z2))
    return z1.to(dtype), z2.to(dtype)


def _run(fn, z1, z2, temperature, reduction, weights, labels, normalize, cot, **kw):
    """Loss and gradients (z1, z2, weights, temperature) of fn; `cot` is the upstream gradient
    for reduction="none" (random, so the backward sees unequal row gradients)."""
    z1 = z1.detach().clone().requires_grad_(True)
    z2 = z2.detach().clone().requires_grad_(True)
    leaves = [z1, z2]
    if weights is not None:
        weights = weights.detach().clone().requires_grad_(True)
        leaves.append(weights)
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.detach().clone().requires_grad_(True)
        leaves.append(temperature)
    out = fn(z1, z2, temperature, normalize=normalize, reduction=reduction, weights=weights,
             labels=labels, **kw)
    (out.double() * cot).sum().backward() if reduction == "none" else out.backward()
    return out.detach(), [t.grad for t in leaves]


def _compare(fn_kw, z1, z2, temperature=0.2, reduction="mean", weights=None, labels=None,
             normalize=True, seed=0):
    """(out, grads) of the op and of the float64 reference on the same (rounded) inputs."""
    g = torch.Generator().manual_seed(seed + 1)
    # upstream gradients of both signs for "none": the PyTorch path folds g >= 0 into the
    # exponent and takes another branch otherwise
    cot = torch.rand(2 * z1.shape[0], generator=g, dtype=torch.float64) * 2.5 - 1.0
    if seed % 2:
        cot = cot.abs()
    cot = cot.to(z1.device)
    args = (temperature, reduction, weights, labels, normalize, cot)
    got = _run(nt_xent, z1, z2, *args, **fn_kw)
    t64 = temperature.double() if isinstance(temperature, torch.Tensor) else temperature
    w64 = weights.double() if weights is not None else None
    ref = _run(nt_xent_reference, z1.double(), z2.double(), t64, reduction, w64, labels,
               normalize, cot)
    ref = ref + (_natural_scales(z1, z2, float(temperature), reduction, w64, normalize, cot),)
    return got, ref, args


def _natural_scales(z1, z2, tau, reduction, w, normalize, cot):
    """Size of the terms each output is summed from, so that a near-zero result (cancelling
    terms, e.g. one label for every row) is compared at the precision of its terms:
    loss, dz (per row: (2N, 1)), dweights, dtau."""
    z = torch.cat([z1, z2]).double()
    m = z.shape[0]
    up = cot.abs() if reduction == "none" else torch.full(
        (m,), 1.0 / m if reduction == "mean" else 1.0, dtype=torch.float64, device=z.device)
    up_w = up * w.abs() if w is not None else up
    norms = z.norm(dim=1)
    if normalize:  # zhat = z / max(|z|, eps): the chain rule scales row k's gradient by r_k
        zmax, r = 1.0, 1.0 / norms.clamp_min(1e-12)
    else:
        zmax, r = norms.max().item(), torch.ones(m, dtype=torch.float64, device=z.device)
    smax = zmax * zmax / tau + 1.0 + math.log(m)  # bound on |S| and |loss_i|
    dz = 4 * up_w.max().item() * zmax / tau * r[:, None]
    return [smax * up_w.sum().item(), dz, smax * up.max().item(),
            2 * up_w.sum().item() * smax / tau]


def _close(got, ref, rtol, atol):
    """|got - ref| <= rtol |ref| + atol * (natural scale of the output's terms)."""
    (out, grads), (rout, rgrads, scales) = got, ref
    kinds = [0, 1, 1] + [2] * (len(grads) > 2 and grads[2].dim() == 1) + [3]
    for a, b, kind in zip([out] + list(grads), [rout] + list(rgrads), kinds):
        assert a.shape == b.shape
        scale = scales[kind]
        if kind == 1:
            scale = scale[: a.shape[0]] if a is grads[0] else scale[a.shape[0]:]
        err = (a.double() - b).abs()
        bound = rtol * b.abs() + atol * scale
        assert torch.isfinite(a).all() and (err <= bound).all(), (
            f"output {kind}: worst excess {(err - bound).max().item():.3g}, max err "
            f"{err.max().item():.3g}")


def _lowp_rule(got, ref, z1, z2, args, dtype, factor=2.0):
    """flash-attention rule: error vs float64 <= factor x the same-dtype reference's error
    plus one unit of the dtype at the output's magnitude (or the natural scale of its terms,
    where they cancel to about zero)."""
    lowp = _run(nt_xent_reference, z1, z2, *args)
    (out, grads), (rout, rgrads, scales), (lout, lgrads) = got, ref, lowp
    n = z1.shape[0]
    pairs = [(out, lout, rout, scales[0]),
             (grads[0], lgrads[0], rgrads[0], scales[1][:n].max().item()),
             (grads[1], lgrads[1], rgrads[1], scales[1][n:].max().item())]
    for mine, theirs, truth, natural in pairs:
        assert torch.isfinite(mine).all()
        err = (mine.double() - truth).abs().max().item()
        base = (theirs.double() - truth).abs().max().item()
        if not torch.isfinite(theirs).all():
            base = float("inf")
        tol = factor * base + EPS[dtype] * max(truth.abs().max().item(), natural)
        assert err <= tol, (err, base)


def _labels(kind, n, seed, classes):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed + 2)
    return torch.randint(0, classes, (n if kind == "n" else 2 * n,), generator=g)


def _weights(kind, n, seed, dtype):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed + 3)
    w = torch.rand(2 * n, generator=g, dtype=torch.float64) * 2
    if kind == "zeros":
        w[::2] = 0.0
    return w.to(dtype)


# ------------------------------------------------------------------ PyTorch path
case = dict(
    n=st.integers(1, 160), d=st.integers(1, 70), seed=st.integers(0, 2 ** 16),
    tau=st.floats(0.05, 1.0), reduction=st.sampled_from(["mean", "sum", "none"]),
    weights=st.sampled_from([None, "rand", "zeros"]), labels=st.sampled_from([None, "n", "2n"]),
    classes=st.integers(1, 12), normalize=st.booleans(), tau_tensor=st.booleans(),
    kind=st.sampled_from(["randn", "randn", "ties", "zeros", "sparse"]))


@settings(max_examples=60, **SETTINGS)
@given(**case)
def test_torch_path_float64(n, d, seed, tau, reduction, weights, labels, classes, normalize,
                            tau_tensor, kind):
    z1, z2 = _inputs(n, d, seed, torch.float64, kind, scale=1.0 if normalize else 0.3)
    temperature = torch.tensor(tau, dtype=torch.float64) if tau_tensor else tau
    got, ref, _ = _compare(dict(_backend="torch"), z1, z2, temperature, reduction,
                           _weights(weights, n, seed, torch.float64),
                           _labels(labels, n, seed, classes), normalize, seed)
    _close(got, ref, rtol=1e-9, atol=1e-11)


@settings(max_examples=25, **SETTINGS)
@given(n=st.integers(1, 120), d=st.integers(1, 50), seed=st.integers(0, 2 ** 16),
       tau=st.floats(0.05, 1.0), labels=st.sampled_from([None, "n", "2n"]),
       reduction=st.sampled_from(["mean", "none"]))
def test_torch_path_float32(n, d, seed, tau, labels, reduction):
    z1, z2 = _inputs(n, d, seed, torch.float32)
    got, ref, _ = _compare(dict(_backend="torch"), z1, z2, tau, reduction, None,
                           _labels(labels, n, seed, 5), True, seed)
    _close(got, ref, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@settings(max_examples=12, **SETTINGS)
@given(n=st.integers(1, 100), d=st.integers(2, 70), seed=st.integers(0, 2 ** 16),
       tau=st.floats(0.05, 1.0), labels=st.sampled_from([None, "n"]))
def test_torch_path_low_precision(dtype, n, d, seed, tau, labels):
    z1, z2 = _inputs(n, d, seed, dtype)
    got, ref, args = _compare(dict(_backend="torch"), z1, z2, tau, "mean", None,
                              _labels(labels, n, seed, 4), True, seed)
    assert got[0].dtype == dtype and got[1][0].dtype == dtype
    _lowp_rule(got, ref, z1, z2, args, dtype)


def test_torch_path_blocks(monkeypatch):
    """Several row blocks, the last one partial: the block loop must not change the result."""
    monkeypatch.setattr(common, "CPU_BLOCK_ELEMS", 16 * 150)
    z1, z2 = _inputs(70, 19, 5, torch.float64)
    for labels in (None, _labels("2n", 70, 5, 7)):
        got, ref, _ = _compare(dict(_backend="torch"), z1, z2, 0.3, "none",
                               _weights("rand", 70, 5, torch.float64), labels, True, 5)
        _close(got, ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend, dtype", [("torch", torch.float64), ("torch", torch.float32),
                                            pytest.param("triton", torch.float32, marks=interp)])
def test_tiny_temperature_underflow(backend, dtype):
    """tau = 0.005 with anti-parallel rows: exp(S - 1/tau) underflows to 0 for whole rows, so
    the PyTorch path's fixed-shift log-sum-exp must fall back to the row max."""
    z1, z2 = _inputs(6, 5, 0, dtype)
    z1 = torch.cat([z1, -z1[:1] * 3])
    z2 = torch.cat([z2, z1[:1]])
    for normalize in (True, False):
        got, ref, args = _compare(dict(_backend=backend), z1, z2, 0.005, "none",
                                  _weights("rand", 7, 0, dtype), None, normalize)
        assert torch.isfinite(got[0]).all()
        if dtype == torch.float64:
            _close(got, ref, 1e-9, 1e-11)
        else:
            # fp32 rounds every score by eps * |S| (|S| = 200 here, 1e4 unnormalised), which
            # moves each exp(S - lse) by that relative amount: the first-order bound (the
            # fp32 reference's own error is of the same order)
            z = torch.cat([z1, z2]).double()
            smax = (1.0 if normalize else z.norm(dim=1).max().item() ** 2) / 0.005
            for mine, truth in zip([got[0]] + got[1], [ref[0]] + ref[1]):
                bound = 4 * EPS[dtype] * smax * max(truth.abs().max().item(), 1.0)
                assert (mine.double() - truth).abs().max().item() <= bound


def test_negative_weights():
    z1, z2 = _inputs(9, 7, 0, torch.float64)
    w = torch.linspace(-1, 1, 18, dtype=torch.float64)
    for labels in (None, _labels("n", 9, 0, 3)):
        got, ref, _ = _compare(dict(_backend="torch"), z1, z2, 0.2, "sum", w, labels)
        _close(got, ref, 1e-9, 1e-11)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(10, generator=g, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 1])
    for lab in (None, labels):
        for normalize in (True, False):
            for reduction in ("mean", "none"):
                assert torch.autograd.gradcheck(
                    lambda a, b, ww, t: nt_xent(a, b, t, weights=ww, labels=lab,
                                                normalize=normalize, reduction=reduction),
                    (z1, z2, w, tau))


def test_cross_entropy_reference_agrees():
    z1, z2 = _inputs(33, 17, 1, torch.float64)
    torch.testing.assert_close(nt_xent(z1, z2, 0.2), nt_xent_cross_entropy_reference(z1, z2, 0.2))


def test_fp16_small_temperature_does_not_overflow():
    """Large logits (tau = 0.05, nearly parallel rows): finite and close to float64."""
    z1, z2 = _inputs(64, 32, 3, torch.float64)
    z2 = z1 + 0.01 * z2
    z1, z2 = z1.half(), z2.half()
    for backend in CPU_BACKENDS:
        got, ref, _ = _compare(dict(_backend=backend), z1, z2, 0.05, "none", None, None, True)
        assert torch.isfinite(got[0]).all() and all(torch.isfinite(t).all() for t in got[1])
        torch.testing.assert_close(got[0].double(), ref[0], rtol=4e-3, atol=2e-3)
        # unnormalised too: |S| reaches hundreds, far above exp's fp16 range
        got, ref, _ = _compare(dict(_backend=backend), z1, z2, 0.05, "mean", None, None, False)
        assert torch.isfinite(got[0]) and all(torch.isfinite(t).all() for t in got[1])


# ------------------------------------------------------------------ Triton path (interpreter)
@interp
@pytest.mark.slow
@settings(max_examples=60, **SETTINGS)
@given(n=st.integers(1, 40), d=st.integers(1, 48), seed=st.integers(0, 2 ** 16),
       tau=st.floats(0.05, 1.0), reduction=st.sampled_from(["mean", "sum", "none"]),
       weights=st.sampled_from([None, "rand", "zeros"]), labels=st.sampled_from([None, "n", "2n"]),
       classes=st.integers(1, 8), normalize=st.booleans(), tau_tensor=st.booleans(),
       kind=st.sampled_from(["randn", "ties", "zeros", "sparse"]),
       block_d=st.sampled_from([None, None, 16]))
def test_triton_float32(n, d, seed, tau, reduction, weights, labels, classes, normalize,
                        tau_tensor, kind, block_d):
    """fp32 tl.dot is exact in the interpreter, so the kernels match float64 to fp32 rounding.
    block_d=16 forces the chunked-D path at small D."""
    z1, z2 = _inputs(n, d, seed, torch.float32, kind, scale=1.0 if normalize else 0.3)
    temperature = torch.tensor(tau) if tau_tensor else tau
    got, ref, _ = _compare(dict(_backend="triton", _block_d=block_d), z1, z2, temperature,
                           reduction, _weights(weights, n, seed, torch.float32),
                           _labels(labels, n, seed, classes), normalize, seed)
    _close(got, ref, rtol=3e-5, atol=3e-6)


@interp
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@settings(max_examples=20, **SETTINGS)
@given(n=st.integers(1, 40), d=st.integers(2, 48), seed=st.integers(0, 2 ** 16),
       tau=st.floats(0.05, 1.0), labels=st.sampled_from([None, "2n"]))
def test_triton_low_precision(dtype, n, d, seed, tau, labels):
    z1, z2 = _inputs(n, d, seed, dtype)
    got, ref, args = _compare(dict(_backend="triton"), z1, z2, tau, "mean", None,
                              _labels(labels, n, seed, 4), True, seed)
    assert got[0].dtype == dtype and got[1][0].dtype == dtype
    _lowp_rule(got, ref, z1, z2, args, dtype)


@interp
def test_triton_edge_shapes():
    """One pair, D = 1, rows spanning several row/column tiles (M = 2 * 37 > 2 * 32)."""
    for n, d in ((1, 1), (1, 5), (2, 3), (37, 20)):
        z1, z2 = _inputs(n, d, n + d, torch.float32)
        got, ref, _ = _compare(dict(_backend="triton"), z1, z2, 0.2, "none",
                               _weights("rand", n, 0, torch.float32), None, True, 1)
        _close(got, ref, rtol=3e-5, atol=3e-6)


def _kernel_rows(k, z, keys, R, tau, normalize, pos_lse, paired, splits, g):
    """The kernels' forward outputs and dL/dzhat for upstream gradient g (M,) at `splits`."""
    M = z.shape[0]
    r = 1.0 / torch.linalg.vector_norm(z, dim=1).clamp_min(common.EPS)
    inv_tau = torch.tensor([1.0 / tau])
    loss, lse, cnt, lsep = k.forward(z, r, keys, inv_tau, R, normalize, pos_lse=pos_lse,
                                     paired=paired, splits=splits)
    gg = torch.zeros(M)
    gg[:R] = torch.where(cnt > 0, g[:R], torch.zeros(R))
    gy = gg.clone()
    gy[:R] /= cnt.clamp_min(1)
    dz = k.backward(z, r, keys, inv_tau, lse, gg, gy, R, normalize, lsep2=lsep, paired=paired,
                    splits=splits)
    return [t for t in (loss, lse, cnt, lsep, dz) if t is not None]


@interp
@pytest.mark.slow
@settings(max_examples=25, **SETTINGS)
@given(rows=st.sampled_from([(64, 64), (128, 128), (192, 192), (320, 320), (66, 66), (96, 70),
                             (33, 33), (20, 20)]),
       d=st.integers(1, 40), seed=st.integers(0, 2 ** 16), tau=st.floats(0.02, 1.0),
       splits=st.integers(2, 7), form=st.sampled_from(["pairs", "labels", "in"]),
       normalize=st.booleans())
def test_column_splits_match_one_program_per_row_block(rows, d, seed, tau, splits, form,
                                                       normalize):
    """Column splits merged (forward: partial log-sum-exps, positive sums and counts;
    backward: partial gradients) give what one program per row block gives, to fp32
    rounding: 2N a multiple of the split or not (the last chunk short), PAIRED windows in
    any chunk, one column tile (20 rows), a chunk whose only column for a row is the row
    itself (33 rows: column 32 alone in the last chunk), rows beyond R (other ranks'
    rows: (96, 70)), and tau down to 0.02 (the backward's two-exponential form)."""
    from sdclr_fast.kernels import nt_xent as k

    M, R = rows
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(M, d, generator=g)
    if form == "pairs":
        keys = torch.arange(M, dtype=torch.int32).remainder(M // 2 if M == R else M)
    else:
        keys = torch.randint(0, 4, (M,), generator=g, dtype=torch.int32)
    up = torch.rand(M, generator=g)
    args = (k, z, keys, R, tau, normalize, form == "in", form == "pairs")
    one = _kernel_rows(*args, 1, up)
    many = _kernel_rows(*args, splits, up)
    for a, b in zip(one, many):
        if a.dtype == torch.int32:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(b, a, rtol=3e-5, atol=3e-6 * max(1.0, a.abs().max()))


@interp
def test_paired_path_and_splits_against_the_reference(monkeypatch):
    """Two views with N a multiple of the row tile take the PAIRED kernels (diagonal and
    positive only in their windows, one exponential per score in the backward) and, on a
    device of a few SMs, split their columns; values and gradients match float64."""
    from sdclr_fast.kernels import _common as kc
    from sdclr_fast.kernels import nt_xent as k

    launched = []
    real = k.plan
    monkeypatch.setattr(k, "plan", lambda *a, **kw: launched.append(real(*a, **kw)) or
                        launched[-1])
    for sms, n, tau in ((4, 64, 0.2), (12, 96, 0.05), (3, 32, 0.02)):
        monkeypatch.setattr(kc, "INTERP_SMS", sms)
        z1, z2 = _inputs(n, 24, n, torch.float32)
        got, ref, _ = _compare(dict(_backend="triton"), z1, z2, tau, "none",
                               _weights("rand", n, 0, torch.float32), None, True, 1)
        _close(got, ref, rtol=3e-5, atol=3e-6)
    assert all(p["meta"]["PAIRED"] for p in launched)
    assert any(p["fwd_grid"][1] > 1 for p in launched)
    assert any(p["bwd_grid"][1] > 1 for p in launched)


@interp
@pytest.mark.parametrize("rows, splits, tau", [((128, 64), 1, 0.2), ((96, 64), 3, 0.2),
                                               ((192, 128), 4, 0.03), ((160, 64), 2, 0.5)])
def test_paired_kernels_take_other_ranks_rows(rows, splits, tau):
    """Two views under a gather (the R = 2N local rows first, then the other ranks' M - R
    rows, negatives only) take the PAIRED kernels and give what the keyed kernels give with
    the global pair indices as keys: losses, log-sum-exps (+inf past R), counts and the
    gradient of every row, the other ranks' rows included; tau 0.03 takes the backward's
    two-exponential form, the rest the one-exponential form over the query rows' spread."""
    from sdclr_fast.kernels import nt_xent as k

    M, R = rows
    n = R // 2
    assert k.plan(M, R, 24, torch.float32, 4, True)["meta"]["PAIRED"]
    g = torch.Generator().manual_seed(M + R)
    z = torch.randn(M, 24, generator=g)
    # local pairs (i, i + n), then each other rank's block [pairs; pairs] with its own indices
    local = torch.arange(n).repeat(2)
    others = torch.arange(n, n + (M - R) // 2).repeat(2)
    keys = torch.cat([local, others]).to(torch.int32)
    up = torch.rand(M, generator=g)
    paired = _kernel_rows(k, z, keys, R, tau, True, False, True, splits, up)
    keyed = _kernel_rows(k, z, keys, R, tau, True, False, False, splits, up)
    for a, b in zip(keyed, paired):
        if a.dtype == torch.int32:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(b, a, rtol=3e-5, atol=3e-6 * max(1.0, a[a.isfinite()].abs().max()))
    assert torch.isinf(paired[1][R:]).all() and paired[-1][R:].abs().sum() > 0


def test_column_splits_fill_the_sms():
    """The split count fills the SMs without a second partial wave: nt_xent at 2N = 4,096
    and info_nce's MoCo form (M = 1,024, Q = 65,536) take >= 90 % of 132 SMs, a large 2N
    takes no split; chunks are whole multiples of the alignment and none is empty."""
    from sdclr_fast.kernels import _common as kc
    from sdclr_fast.kernels import info_nce as ki
    from sdclr_fast.kernels import nt_xent as k

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kc, "interpreting", lambda: False)
        p = k.plan(4096, 4096, 128, torch.bfloat16, 132, True)
        assert p["meta"]["PAIRED"]
        for grid in (p["fwd_grid"], p["bwd_grid"]):
            assert 0.9 * 132 <= math.prod(grid) <= 132, grid
        assert k.plan(65536, 65536, 128, torch.bfloat16, 132, True)["fwd_grid"][1] == 1
        _, _, grid, _ = ki.plan(1024, 1024, 65536, 128, torch.bfloat16, 132)
        assert 0.9 * 132 <= math.prod(grid) <= 132, grid
    for rb, cols, align, sms in ((32, 4096, 128, 132), (3, 100, 16, 132), (1, 5, 32, 132),
                                 (200, 4096, 64, 132), (5, 160, 32, 15)):
        n, chunk = kc.column_splits(rb, cols, align, sms)
        assert chunk % align == 0 and n * chunk >= cols > (n - 1) * chunk
        assert rb * n <= max(sms, rb)
    assert kc.column_splits(5, 160, 32, 15) == (3, 64)  # 160 = 64 + 64 + 32


def test_fp32_dot_precision_follows_torch(monkeypatch):
    """fp32 takes TF32 exactly where torch.matmul would (the legacy flag, the precision
    setting, or the newer fp32_precision API), IEEE otherwise and always in the interpreter;
    16-bit inputs ignore it."""
    from sdclr_fast.kernels import _common as kc

    m = torch.backends.cuda.matmul
    old = torch.get_float32_matmul_precision()
    monkeypatch.setattr(kc, "interpreting", lambda: False)
    try:
        torch.set_float32_matmul_precision("highest")
        assert kc.dot_precision(torch.float32) == "ieee"
        assert kc.config(torch.float32, 128)[0]["PRECISION"] == "ieee"
        torch.set_float32_matmul_precision("high")
        assert kc.dot_precision(torch.float32) == "tf32"
        assert kc.config(torch.float32, 128)[0]["PRECISION"] == "tf32"
        assert kc.dot_precision(torch.bfloat16) == "tf32"  # ignored by 16-bit dots
        monkeypatch.setattr(kc, "interpreting", lambda: True)
        assert kc.dot_precision(torch.float32) == "ieee"
    finally:
        torch.set_float32_matmul_precision(old)
    assert not m.allow_tf32 or old != "highest"


@interp
def test_force_triton_env(monkeypatch):
    """SDCLR_FAST_FORCE_TRITON=1 routes CPU tensors to the kernels (read at call time)."""
    calls = []
    k = op._kernels()
    real = k.forward
    monkeypatch.setattr(k, "forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    z1, z2 = _inputs(4, 8, 0, torch.float32)
    nt_xent(z1, z2)
    assert not calls
    monkeypatch.setenv("SDCLR_FAST_FORCE_TRITON", "1")
    torch.testing.assert_close(nt_xent(z1, z2), nt_xent_reference(z1, z2))
    assert calls


# ------------------------------------------------------------------ API
def test_public_exports():
    assert sdclr_fast.nt_xent is nt_xent and sdclr_fast.NTXentLoss is NTXentLoss


def test_reduction_none_order_and_dtype():
    z1, z2 = _inputs(6, 5, 0, torch.float32)
    rows = nt_xent(z1, z2, reduction="none")
    assert rows.shape == (12,) and rows.dtype == torch.float32
    torch.testing.assert_close(rows, nt_xent_reference(z1, z2, reduction="none"))
    # swapping the views swaps the halves
    torch.testing.assert_close(nt_xent(z2, z1, reduction="none"), torch.cat([rows[6:], rows[:6]]))


def test_rows_without_positives_count_in_the_mean():
    z1, z2 = _inputs(4, 6, 0, torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0])  # only rows 0 and 7 have a positive
    rows = nt_xent(z1, z2, labels=labels, reduction="none")
    assert (rows[1:7] == 0).all() and (rows[[0, 7]] != 0).all()
    torch.testing.assert_close(nt_xent(z1, z2, labels=labels), rows.sum() / 8)


def test_labels_equal_to_pair_index_is_two_view():
    z1, z2 = _inputs(9, 7, 0, torch.float64)
    torch.testing.assert_close(nt_xent(z1, z2, labels=torch.arange(9)), nt_xent(z1, z2))


def test_module_and_learnable_temperature():
    z1, z2 = _inputs(8, 6, 0, torch.float64)
    loss_fn = NTXentLoss(0.3, reduction="sum")
    torch.testing.assert_close(loss_fn(z1, z2), nt_xent(z1, z2, 0.3, reduction="sum"))
    assert "temperature=0.3" in repr(loss_fn)
    learn = NTXentLoss(torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64)))
    assert [p for p in learn.parameters()] == [learn.temperature]
    learn(z1, z2).backward()
    t = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    nt_xent_reference(z1, z2, t).backward()
    torch.testing.assert_close(learn.temperature.grad, t.grad)
    buf = NTXentLoss(torch.tensor(0.25))
    assert "temperature" in dict(buf.named_buffers())
    torch.testing.assert_close(buf(z1.float(), z2.float()), nt_xent(z1.float(), z2.float(), 0.25))


@interp
def test_temperature_schedule():
    """Python and tensor temperatures reach the kernels as runtime values (read from memory):
    results follow the schedule, and on a GPU the compiled-kernel cache does not grow."""
    z1, z2 = _inputs(5, 16, 0, torch.float32)
    k = op._kernels()
    nt_xent(z1, z2, torch.tensor(0.2), _backend="triton")
    before = len(k._nt_xent_fwd_kernel.cache.get(0, {})) if hasattr(
        k._nt_xent_fwd_kernel, "cache") else None
    for tau in (0.1, 0.3, torch.tensor(0.7)):
        torch.testing.assert_close(nt_xent(z1, z2, tau, _backend="triton"),
                                   nt_xent_reference(z1, z2, tau))
    if before is not None:
        assert len(k._nt_xent_fwd_kernel.cache.get(0, {})) == before


def test_torch_compile_training_step():
    """Inside a compiled step (the loss and its backward included) values and gradients stay
    right; tests/test_compile_ops.py checks fullgraph compilation and recompiles."""
    lin = torch.nn.Linear(6, 5, dtype=torch.float64)
    x1, x2 = _inputs(7, 6, 0, torch.float64)

    def step(a, b):
        loss = nt_xent(lin(a), lin(b), 0.2)
        loss.backward()
        return loss

    compiled = torch.compile(step, backend="aot_eager")
    loss = compiled(x1, x2)
    grads = [p.grad.clone() for p in lin.parameters()]
    lin.zero_grad()
    ref = nt_xent_reference(lin(x1), lin(x2), 0.2)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for a, p in zip(grads, lin.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_gather_distributed_without_process_group_is_local():
    z1, z2 = _inputs(5, 4, 0, torch.float64)
    torch.testing.assert_close(nt_xent(z1, z2, gather_distributed=True), nt_xent(z1, z2))


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("call, match", [
    (lambda z: nt_xent(z, z[:, :3]), "same shape"),
    (lambda z: nt_xent(z[:0], z[:0]), "at least one row"),
    (lambda z: nt_xent(z[0], z[0]), "z1 must be a 2-d"),
    (lambda z: nt_xent(z, z.long()), "z2 must be a floating-point"),
    (lambda z: nt_xent(z, z.double()), "z2 has dtype"),
    (lambda z: nt_xent(z, z.to("meta")), "z2 is on meta"),
    (lambda z: nt_xent(z.tolist(), z), "z1 must be a torch.Tensor"),
    (lambda z: nt_xent(z, z, 0.0), "temperature must be finite and > 0"),
    (lambda z: nt_xent(z, z, -0.1), "temperature must be finite and > 0"),
    (lambda z: nt_xent(z, z, float("nan")), "temperature must be finite and > 0"),
    (lambda z: nt_xent(z, z, float("inf")), "temperature must be finite and > 0"),
    (lambda z: nt_xent(z, z, torch.tensor(0.0)), "temperature must be finite and > 0"),
    (lambda z: nt_xent(z, z, torch.tensor(float("nan"))), "temperature must be finite"),
    (lambda z: nt_xent(z, z, torch.tensor([0.1, 0.2])), "temperature must be a number or a 1"),
    (lambda z: nt_xent(z, z, "0.2"), "temperature must be a positive number"),
    (lambda z: nt_xent(z, z, True), "temperature must be a positive number"),
    (lambda z: nt_xent(z, z, reduction="avg"), "reduction must be one of"),
    (lambda z: nt_xent(z, z, normalize=1), "normalize must be a bool"),
    (lambda z: nt_xent(z, z, weights=torch.ones(4)), r"weights must be a tensor of shape \(2N,\)"),
    (lambda z: nt_xent(z, z, weights=torch.ones(8, dtype=torch.long)),
     "weights must be a floating-point"),
    (lambda z: nt_xent(z, z, labels=torch.zeros(3, dtype=torch.long)), "labels must be a 1-d"),
    (lambda z: nt_xent(z, z, labels=torch.zeros(4, 2, dtype=torch.long)), "labels must be a 1-d"),
    (lambda z: nt_xent(z, z, labels=torch.zeros(4)), "labels must be an integer tensor"),
    (lambda z: nt_xent(z, z, _backend="cuda"), "_backend must be"),
    (lambda z: nt_xent(z.double(), z.double(), _backend="triton"), "float32/float16/bfloat16"),
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
    with pytest.raises(ValueError, match="z1 holds NaN or inf"):
        nt_xent(zb, z)
    with pytest.raises(ValueError, match="z2 holds NaN or inf"):
        nt_xent(z, zb)


# ------------------------------------------------------------------ compiled kernels on a GPU
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET,
                    reason="needs CUDA and TRITON_INTERPRET=0")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, d, labels", [(1, 16, None), (37, 100, None), (300, 128, "2n"),
                                          (129, 300, None), (64, 257, "n")])
def test_cuda_kernels(dtype, n, d, labels):
    """The compiled kernels (tiles, tensor cores, D chunks above 256) against float64, with the
    2x rule against the same-dtype reference; fp32 is compared to the fp32 reference likewise
    (TF32 stays off, as in torch.matmul's default)."""
    z1, z2 = _inputs(n, d, n + d, dtype)
    lab = _labels(labels, n, 0, 5)
    w = _weights("rand", n, 0, dtype)
    got, ref, args = _compare(dict(), z1.cuda(), z2.cuda(), 0.1, "none",
                              w.cuda(), lab.cuda() if lab is not None else None, True, 1)
    got = (got[0].cpu(), [t.cpu() for t in got[1]])
    ref = (ref[0].cpu(), [t.cpu() for t in ref[1]], [t.cpu() if isinstance(t, torch.Tensor)
                                                     else t for t in ref[2]])
    args = (args[0], args[1], w, lab, args[4], args[5].cpu())
    _lowp_rule(got, ref, z1, z2, args, dtype)


# ------------------------------------------------------------------ GPU lowering without a GPU
def _aot(mode):
    """tests/aot_kernels.py in a child process (it needs TRITON_INTERPRET=0)."""
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0")
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, os.path.join(here, "aot_kernels.py"),
                           os.path.dirname(here), mode], env=env, capture_output=True,
                          text=True, timeout=1500)
    if proc.returncode and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("Triton's ptxas is not available")
    return proc


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """The interpreter accepts code that the compiler rejects (e.g. non-constexpr globals):
    lower the kernels, in every launch variant, to sm_90 and sm_80 cubins with the GPU launch
    configuration, none of them spilling (needs only Triton's bundled ptxas and cuobjdump,
    no GPU)."""
    pytest.importorskip("triton.backends.nvidia")
    proc = _aot("nt_xent")
    assert proc.returncode == 0 and proc.stdout.split() == ["ok", "76"], proc.stderr[-3000:]


@pytest.mark.slow
def test_kernel_compile_check_rejects_broken_kernel():
    """The harness of test_kernels_compile_for_sm90 fails on a kernel the compiler rejects."""
    pytest.importorskip("triton.backends.nvidia")
    proc = _aot("broken")
    assert proc.returncode != 0 and "compiled" not in proc.stdout
    assert "SCALE" in proc.stderr or "constexpr" in proc.stderr, proc.stderr[-3000:]
