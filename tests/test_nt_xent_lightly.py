"""NTXentLoss as a drop-in for lightly's NTXentLoss(temperature, memory_bank_size,
gather_distributed): positional order, constructor checks, and the memory-bank loss against
lightly's formula written here from lightly's source (lightly/loss/ntx_ent_loss.py and
lightly/models/modules/memory_bank.py):

* out0, out1 = normalize(out0), normalize(out1);
* bank (size, dim): torch.randn, L2-normalised rows, float32; read as a detached copy
  before the update;
* with the bank: logits = [out0 . out1, out0 . bank^T] / tau, cross-entropy with target 0,
  mean over the batch (the bank alone gives the negatives);
* without: the 2N x (2N - 1) cross-entropy form of NT-Xent;
* update only if out0.requires_grad: ptr + B >= size -> bank[ptr:] = out1[:size - ptr],
  ptr = 0; else bank[ptr:ptr + B] = out1, ptr += B (out1 normalised and detached).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from sdclr_fast.ops.nt_xent import NTXentLoss, nt_xent
from helpers import HYPOTHESIS_SETTINGS as SETTINGS


class LightlyFormula:
    """lightly's NTXentLoss, float64, with its own bank state."""

    def __init__(self, temperature, size, bank):
        self.t, self.size = temperature, size
        self.bank = None if bank is None else bank.clone()
        self.ptr = 0

    def __call__(self, out0, out1):
        out0 = F.normalize(out0, dim=1)
        out1 = F.normalize(out1, dim=1)
        if self.size == 0:
            n = out0.shape[0]
            z = torch.cat([out0, out1])
            logits = z @ z.t() / self.t
            logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
            target = torch.cat([torch.arange(n) + n, torch.arange(n)])
            return F.cross_entropy(logits, target)
        negatives = self.bank.clone().detach().t().to(out0.dtype)  # (dim, size), as lightly
        if out0.requires_grad:
            batch = out1.detach()
            b = batch.shape[0]
            if self.ptr + b >= self.size:
                self.bank[self.ptr:] = batch[:self.size - self.ptr].to(self.bank.dtype)
                self.ptr = 0
            else:
                self.bank[self.ptr:self.ptr + b] = batch.to(self.bank.dtype)
                self.ptr += b
        sim_pos = torch.einsum("nc,nc->n", out0, out1).unsqueeze(-1)
        sim_neg = torch.einsum("nc,ck->nk", out0, negatives)
        logits = torch.cat([sim_pos, sim_neg], dim=1) / self.t
        return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))


@settings(max_examples=20, **SETTINGS)
@given(size=st.integers(1, 23), dim=st.integers(1, 17), tau=st.floats(0.05, 1.0),
       batches=st.lists(st.integers(1, 9), min_size=1, max_size=6), seed=st.integers(0, 2 ** 16),
       as_pair=st.booleans(), train=st.lists(st.booleans(), min_size=6, max_size=6))
def test_memory_bank_matches_lightly(size, dim, tau, batches, seed, as_pair, train):
    """Losses, gradients and the bank after every step, over batches that wrap around the
    end of the bank (and do not divide its size), with steps that must not update it (z1
    without grad). The bank is drawn from the global generator (in the constructor with a
    (size, dim) pair, at the first forward with an int): the first draw after the seed."""
    g = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(b, dim, generator=g, dtype=torch.float64),
             torch.randn(b, dim, generator=g, dtype=torch.float64)) for b in batches]
    torch.manual_seed(seed)
    loss_fn = NTXentLoss(tau, (size, dim) if as_pair else size)
    torch.manual_seed(seed)
    ref = LightlyFormula(tau, size, F.normalize(torch.randn(size, dim), dim=1))
    for step, (z1, z2) in enumerate(data):
        if step == 0:
            torch.manual_seed(seed)
        a1, a2 = z1.clone().requires_grad_(train[step]), z2.clone().requires_grad_(True)
        got = loss_fn(a1, a2)
        r1, r2 = z1.clone().requires_grad_(train[step]), z2.clone().requires_grad_(True)
        want = ref(r1, r2)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        got.backward()
        want.backward()
        if train[step]:
            torch.testing.assert_close(a1.grad, r1.grad, rtol=1e-9, atol=1e-11 / tau)
        torch.testing.assert_close(a2.grad, r2.grad, rtol=1e-9, atol=1e-11 / tau)
        assert loss_fn.bank.dtype == torch.float32
        assert torch.equal(loss_fn.bank, ref.bank) and int(loss_fn.bank_ptr) == ref.ptr


@settings(max_examples=20, **SETTINGS)
@given(n=st.integers(1, 30), dim=st.integers(1, 40), tau=st.floats(0.05, 1.0),
       seed=st.integers(0, 2 ** 16))
def test_without_bank_matches_lightly(n, dim, tau, seed):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, dim, generator=g, dtype=torch.float64)
    z2 = torch.randn(n, dim, generator=g, dtype=torch.float64)
    a1, a2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    r1, r2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    got = NTXentLoss(tau, 0, False)(a1, a2)
    want = LightlyFormula(tau, 0, None)(r1, r2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got.backward()
    want.backward()
    torch.testing.assert_close(a1.grad, r1.grad, rtol=1e-9, atol=1e-11 / tau)
    torch.testing.assert_close(a2.grad, r2.grad, rtol=1e-9, atol=1e-11 / tau)


def test_memory_bank_per_row_and_weights():
    """reduction="none" gives the N rows of z1; weights (N,) multiply them."""
    torch.manual_seed(0)
    loss_fn = NTXentLoss(0.3, (11, 6), reduction="none")
    ref = LightlyFormula(0.3, 11, loss_fn.bank)
    z1, z2 = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    rows = loss_fn(z1, z2)
    q, k = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ ref.bank.double().t()], 1) / 0.3
    torch.testing.assert_close(rows, -logits.log_softmax(1)[:, 0], rtol=1e-10, atol=1e-12)
    w = torch.linspace(0, 2, 5, dtype=torch.float64)
    weighted = NTXentLoss(0.3, (11, 6), reduction="sum")
    weighted.bank = ref.bank.clone()
    torch.testing.assert_close(weighted(z1, z2, weights=w), (rows * w).sum())


def test_positional_arguments_in_lightlys_order():
    a = NTXentLoss(0.5, 0)
    assert a.temperature == 0.5 and a.memory_bank_size == 0 and not a.gather_distributed
    b = NTXentLoss(0.1, (64, 8), True)
    assert b.memory_bank_size == 64 and b.bank.shape == (64, 8) and b.gather_distributed
    c = NTXentLoss(0.5, 32)
    assert c.bank.numel() == 0  # an int size: the dimension comes from the first batch
    c(torch.randn(4, 3), torch.randn(4, 3, requires_grad=True))
    assert c.bank.shape == (32, 3)
    assert NTXentLoss().temperature == 0.2  # sdclr-fast's default (lightly: 0.5)
    assert "memory_bank_size=32" in repr(c)


def test_bank_not_updated_without_grad_or_under_no_grad():
    torch.manual_seed(0)
    loss_fn = NTXentLoss(0.5, (8, 4))
    before = loss_fn.bank.clone()
    loss_fn(torch.randn(3, 4), torch.randn(3, 4))
    with torch.no_grad():
        loss_fn(torch.randn(3, 4, requires_grad=True), torch.randn(3, 4))
    assert torch.equal(loss_fn.bank, before) and int(loss_fn.bank_ptr) == 0
    loss_fn(torch.randn(3, 4, requires_grad=True), torch.randn(3, 4))
    assert not torch.equal(loss_fn.bank, before) and int(loss_fn.bank_ptr) == 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=0.0), "temperature must be finite and > 0"),
    (dict(temperature=-0.5), "temperature must be finite and > 0"),
    (dict(temperature=math.nan), "temperature must be finite and > 0"),
    (dict(temperature=math.inf), "temperature must be finite and > 0"),
    (dict(temperature="0.5"), "temperature must be a positive number"),
    (dict(temperature=True), "temperature must be a positive number"),
    (dict(temperature=torch.tensor(0.0)), "temperature must be finite and > 0"),
    (dict(temperature=torch.tensor([0.1, 0.2])), "temperature must be a number or a 1"),
    (dict(memory_bank_size=-1), "memory_bank_size must be an int >= 0"),
    (dict(memory_bank_size=2.5), "memory_bank_size must be an int >= 0"),
    (dict(memory_bank_size=True), "memory_bank_size must be an int >= 0"),
    (dict(memory_bank_size=(8,)), "memory_bank_size must be an int >= 0"),
    (dict(memory_bank_size=(8, 0)), "memory_bank_size must be an int >= 0"),
    (dict(memory_bank_size="8"), "memory_bank_size must be an int >= 0"),
    (dict(gather_distributed=1), "gather_distributed must be a bool"),
    (dict(reduction="avg"), "reduction must be one of"),
    (dict(normalize=None), "normalize must be a bool"),
    (dict(multi_positive="all"), "multi_positive must be one of"),
])
def test_constructor_checks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NTXentLoss(**kwargs)


def test_gather_distributed_needs_torch_distributed(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"gather_distributed=True needs torch.distributed"):
        NTXentLoss(0.5, 0, True)
    NTXentLoss(0.5, 0, False)


def test_bank_errors():
    loss_fn = NTXentLoss(0.5, (8, 4))
    with pytest.raises(ValueError, match="z1 has 3 columns but the memory bank holds rows of 4"):
        loss_fn(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="takes two views z1, z2 and no labels"):
        loss_fn(torch.randn(2, 4), labels=torch.zeros(2, dtype=torch.long))


def test_bank_size_zero_pair_is_plain_nt_xent():
    z1, z2 = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(NTXentLoss(0.5, (0, 3))(z1, z2), nt_xent(z1, z2, 0.5))


@pytest.mark.parametrize("bank", [0, 8])
def test_non_finite_input_is_named_as_passed(bank):
    """With a memory bank the loss runs through info_nce, whose arguments are query / key; the
    error must still name the argument the user passed."""
    z = torch.randn(4, 3)
    bad = z.clone()
    bad[1, 2] = float("nan")
    loss_fn = NTXentLoss(0.2, bank)
    with pytest.raises(ValueError, match="^z1 holds NaN"):
        loss_fn(bad, z)
    with pytest.raises(ValueError, match="^z2 holds NaN"):
        loss_fn(z, bad.requires_grad_(True))

