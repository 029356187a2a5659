"""The shared op wiring (sdclr_fast/ops/_op.py): one backend flag for every op, the routes of
a fused loss (eager Function, dense formulation for transforms and second order)."""
import pytest
import torch

from sdclr_fast.ops import _op
from sdclr_fast.ops import info_nce as inf
from sdclr_fast.ops.info_nce import info_nce
from sdclr_fast.ops.masked_conv import masked_conv2d
from sdclr_fast.ops.masked_linear import masked_linear
from sdclr_fast.ops.nt_xent import nt_xent
from sdclr_fast.ops.reference import info_nce_reference


def _rows(m, d, seed, dtype=torch.float64):
    return torch.randn(m, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("SDCLR_FAST_FORCE_TRITON", raising=False)
    x = torch.zeros(2, 2)
    assert _op.backend_choice(x, "torch", "x") == "torch"
    assert _op.backend_choice(x, "triton", "x") == "triton"
    assert _op.backend_choice(x, "auto", "x") == "auto"
    monkeypatch.setenv("SDCLR_FAST_FORCE_TRITON", "1")
    assert _op.backend_choice(x, "auto", "x") == "triton"
    assert _op.backend_choice(x, "torch", "x") == "torch"  # the flag wins over the switch
    with pytest.raises(ValueError, match="Triton kernels take x of dtype"):
        _op.backend_choice(x.double(), "auto", "x")


@pytest.mark.parametrize("call", [
    lambda b: nt_xent(_rows(4, 3, 0), _rows(4, 3, 1), _backend=b),
    lambda b: info_nce(_rows(4, 3, 0), _rows(4, 3, 1), _backend=b),
    lambda b: masked_linear(_rows(2, 3, 0), _rows(4, 3, 1), torch.ones(4, 3), _backend=b),
    lambda b: masked_conv2d(_rows(2, 3, 0).reshape(1, 2, 3, 1), _rows(4, 2, 1).reshape(4, 2, 1, 1),
                            torch.ones(4, 2, 1, 1), _backend=b),
])
def test_every_op_names_a_bad_backend(call):
    with pytest.raises(ValueError, match="_backend must be 'auto', 'triton' or 'torch'"):
        call("cuda")
    with pytest.raises(ValueError, match="Triton kernels take"):
        call("triton")  # float64


def test_reduce_rows():
    rows = torch.tensor([1.0, 2.0, 3.0])
    w = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    assert _op.reduce_rows(rows, "sum", w, torch.float64).item() == 7.0
    assert _op.reduce_rows(rows, "mean", None, torch.float32).item() == 2.0
    assert _op.reduce_rows(rows, "none", None, torch.float16).dtype == torch.float16


def test_info_nce_second_order_goes_through_the_dense_formulation(monkeypatch):
    """As nt_xent: a plain backward is the fused one; create_graph=True differentiates the
    dense formulation (no hand-derived gradient formula)."""
    calls = []
    real = inf._rows_dense
    monkeypatch.setattr(inf._loss, "dense", lambda *a: calls.append(1) or real(*a))
    q, k = _rows(5, 4, 0).requires_grad_(), _rows(5, 4, 1)
    info_nce(q, k, symmetric=True).backward()
    assert not calls
    g, = torch.autograd.grad(info_nce(q, k, symmetric=True), q, create_graph=True)
    assert calls and g.requires_grad
    ref, = torch.autograd.grad(info_nce_reference(q, k, symmetric=True), q, create_graph=True)
    torch.testing.assert_close(g, ref)


def test_info_nce_forward_mode_ad():
    """torch.func.jvp runs the dense formulation (the eager Function has no forward rule)."""
    from torch.func import jvp

    q, k, n = _rows(5, 4, 0), _rows(5, 4, 1), _rows(3, 4, 2)
    t = _rows(5, 4, 3)
    for kw in (dict(), dict(symmetric=True), dict(in_batch_negatives=False)):
        out, tan = jvp(lambda a: info_nce(a, k, 0.3, negatives=n, **kw), (q,), (t,))
        ref, ref_tan = jvp(lambda a: info_nce_reference(a, k, 0.3, negatives=n, **kw), (q,), (t,))
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(tan, ref_tan)
