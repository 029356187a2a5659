"""DnC distillation: the loss and its gradient against a plain-PyTorch reference, the student's
heads, and the teacher targets (each expert sees only its cluster's images)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from sdclr_fast.train.distill import (DnCStudent, PredictionHead, cosine_regression_loss,
                                      dnc_distillation_loss, teacher_targets)


def reference_loss(base_pred, base_target, expert_preds, expert_target, clusters, wb=1.0, we=1.0):
    """Written the obvious way: a Python loop over images, F.cosine_similarity, float64."""
    terms = []
    for i in range(base_pred.shape[0]):
        cb = F.cosine_similarity(base_pred[i].double(), base_target[i].double(), dim=0)
        ce = F.cosine_similarity(expert_preds[int(clusters[i]), i].double(),
                                 expert_target[i].double(), dim=0)
        terms.append(wb * (2 - 2 * cb) + we * (2 - 2 * ce))
    return torch.stack(terms)


def make(n, k, d, seed, dtype=torch.float32, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    bp = torch.randn(n, d, generator=g, dtype=torch.float64)
    bt = torch.randn(n, d, generator=g, dtype=torch.float64)
    ep = torch.randn(k, n, d, generator=g, dtype=torch.float64)
    et = torch.randn(n, d, generator=g, dtype=torch.float64)
    cl = torch.randint(k, (n,), generator=g)
    out = [t.to(dtype).requires_grad_(requires_grad) for t in (bp, bt, ep, et)]
    return (*out, cl)


@settings(deadline=None, max_examples=40)
@given(n=st.integers(1, 33), k=st.integers(1, 6), d=st.integers(1, 70), seed=st.integers(0, 2**31 - 1),
       wb=st.sampled_from([1.0, 0.5, 0.0]), we=st.sampled_from([1.0, 2.0]),
       reduction=st.sampled_from(["mean", "sum", "none"]))
def test_loss_and_grad_match_reference(n, k, d, seed, wb, we, reduction):
    bp, bt, ep, et, cl = make(n, k, d, seed, torch.float64)
    got = dnc_distillation_loss(bp, bt, ep, et, cl, base_weight=wb, expert_weight=we,
                                reduction=reduction)
    ref_rows = reference_loss(bp, bt, ep, et, cl, wb, we)
    ref = {"none": ref_rows, "sum": ref_rows.sum(), "mean": ref_rows.mean()}[reduction]
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, (bp, ep), g)
    ref_grads = torch.autograd.grad(ref, (bp, ep), g)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # expert heads that do not own an image get exactly zero gradient on that image
    owner = torch.zeros(k, n, dtype=torch.bool)
    owner[cl, torch.arange(n)] = True
    assert (got_grads[1][~owner] == 0).all()


def test_targets_receive_no_gradient():
    bp, bt, ep, et, cl = make(5, 3, 8, 0, torch.float64)
    dnc_distillation_loss(bp, bt, ep, et, cl).backward()
    assert bt.grad is None and et.grad is None
    assert bp.grad is not None and ep.grad is not None


def test_gradcheck_float64():
    bp, bt, ep, et, cl = make(6, 3, 5, 1, torch.float64)
    bt, et = bt.detach(), et.detach()
    assert torch.autograd.gradcheck(
        lambda a, b: dnc_distillation_loss(a, bt, b, et, cl, base_weight=0.7, reduction="none"),
        (bp, ep))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_bounded_by_reference(dtype):
    """Flash-attention rule: our low-precision loss (computed in fp32 internally) must be at
    most ~2x as far from the float64 truth as the same-dtype plain-PyTorch loss."""
    bp, bt, ep, et, cl = make(64, 5, 128, 2, requires_grad=False)
    truth = reference_loss(bp, bt, ep, et, cl).mean()
    low = [t.to(dtype) for t in (bp, bt, ep, et)]
    ours = dnc_distillation_loss(*low, cl).double()
    # the same formula evaluated entirely in the low dtype
    e_pick = low[2][cl, torch.arange(64)]
    naive = ((2 - 2 * F.cosine_similarity(low[0], low[1], dim=1))
             + (2 - 2 * F.cosine_similarity(e_pick, low[3], dim=1))).mean().double()
    assert (ours - truth).abs() <= 2 * (naive - truth).abs() + 1e-6


def test_zero_vectors_are_finite():
    z = torch.zeros(3, 4, requires_grad=True)
    loss = cosine_regression_loss(z, torch.randn(3, 4))
    loss.backward()
    assert loss.item() == pytest.approx(2.0)
    assert torch.isfinite(z.grad).all()


def test_loss_is_zero_for_scaled_targets_and_four_for_opposite():
    t = torch.randn(4, 6)
    assert cosine_regression_loss(3.0 * t, t).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_regression_loss(-t, t).item() == pytest.approx(4.0, abs=1e-6)


def test_preselected_expert_predictions():
    bp, bt, ep, et, cl = make(7, 4, 9, 3, torch.float64)
    picked = ep[cl, torch.arange(7)]
    torch.testing.assert_close(dnc_distillation_loss(bp, bt, picked, et, None),
                               dnc_distillation_loss(bp, bt, ep, et, cl))


@pytest.mark.parametrize("call, match", [
    (lambda: dnc_distillation_loss(torch.randn(3, 4), torch.randn(3, 5), torch.randn(2, 3, 4),
                                   torch.randn(3, 4), torch.tensor([0, 1, 0])), "shape"),
    (lambda: dnc_distillation_loss(torch.randn(3, 4), torch.randn(3, 4), torch.randn(2, 3, 4),
                                   torch.randn(3, 4), torch.tensor([0, 2, 0])), r"\[0, 2\)"),
    (lambda: dnc_distillation_loss(torch.randn(3, 4), torch.randn(3, 4), torch.randn(2, 3, 4),
                                   torch.randn(3, 4), torch.tensor([0, -1, 0])), r"\[0, 2\)"),
    (lambda: dnc_distillation_loss(torch.randn(3, 4), torch.randn(3, 4), torch.randn(2, 3, 4),
                                   torch.randn(3, 4), torch.tensor([0.0, 1.0, 0.0])), "clusters"),
    (lambda: dnc_distillation_loss(torch.randn(3, 4), torch.randn(3, 4), torch.randn(2, 3, 4),
                                   torch.randn(3, 4), torch.tensor([0, 1])), "clusters"),
    (lambda: cosine_regression_loss(torch.randn(3), torch.randn(3)), "2-D"),
    (lambda: cosine_regression_loss(torch.randn(2, 3), torch.randn(2, 3), "avg"), "reduction"),
    (lambda: DnCStudent(nn.Identity(), 4, 0, 4), "num_experts"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------ student and teachers
def test_student_heads_and_training_step():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU())
    student = DnCStudent(backbone, feature_dim=16, num_experts=3, target_dim=5, hidden_dim=8)
    x = torch.randn(10, 3, 2, 2)
    bp, ep = student(x)
    assert bp.shape == (10, 5) and ep.shape == (3, 10, 5)
    assert len(student.heads) == 4 and isinstance(student.heads[0], PredictionHead)
    torch.testing.assert_close(student.features(x), backbone(x))
    bt, et = torch.randn(10, 5), torch.randn(10, 5)
    cl = torch.tensor([0, 0, 1, 2, 2, 2, 1, 0, 0, 1])
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    first = dnc_distillation_loss(bp, bt, ep, et, cl)
    for _ in range(60):
        opt.zero_grad()
        bp, ep = student(x)
        loss = dnc_distillation_loss(bp, bt, ep, et, cl)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first.item()


def test_student_single_image_cluster_in_batch():
    # a cluster with one image in the batch must not break BatchNorm (heads see the full batch)
    student = DnCStudent(nn.Linear(4, 6), 6, 2, 3)
    bp, ep = student(torch.randn(5, 4))
    loss = dnc_distillation_loss(bp, torch.randn(5, 3), ep, torch.randn(5, 3), torch.tensor([0, 0, 0, 0, 1]))
    loss.backward()
    assert torch.isfinite(loss)


class Recorder(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return x.flatten(1) * self.scale


def test_teacher_targets_route_images_to_their_expert():
    x = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    cl = torch.tensor([2, 0, 2, 1, 0, 2])
    base, experts = Recorder(1.0), [Recorder(10.0), Recorder(100.0), Recorder(1000.0)]
    bt, et = teacher_targets(x, cl, base, experts)
    torch.testing.assert_close(bt, x)
    scale = torch.tensor([10.0, 100.0, 1000.0])[cl]
    torch.testing.assert_close(et, x * scale[:, None])
    for k, e in enumerate(experts):
        assert len(e.seen) == 1
        torch.testing.assert_close(e.seen[0], x[cl == k])
    assert not bt.requires_grad and not et.requires_grad


def test_teacher_targets_skip_absent_clusters_and_check_ids():
    x = torch.randn(3, 2)
    experts = [Recorder(1.0), Recorder(2.0)]
    teacher_targets(x, torch.tensor([1, 1, 1]), Recorder(1.0), experts)
    assert experts[0].seen == [] and len(experts[1].seen) == 1
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        teacher_targets(x, torch.tensor([1, 2, 0]), Recorder(1.0), experts)
