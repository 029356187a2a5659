"""`MagnitudePruning` / `global_magnitude_unstructured` against torch's own L1 pruning.

The first half ports the L1 / global cases of PyTorch's test/nn/test_pruning.py (amount
validation, hand-made weights, importance scores, pruning containers, iterative pruning,
remove, pickling), run against our method. The second half compares with
`prune.L1Unstructured` / `prune.global_unstructured` over random sizes, amounts (int and float)
and values with zeros, signed zeros and ties: the same count always, the same mask wherever the
cut does not fall inside a run of equal magnitudes.
"""
import pickle

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

from sdclr_fast.ops.prune import MagnitudePruning, global_magnitude_unstructured

SETTINGS = dict(deadline=None, max_examples=80, suppress_health_check=[HealthCheck.too_slow])


def _linear(weight):
    weight = torch.tensor(weight, dtype=torch.float32)
    m = nn.Linear(weight.shape[1], weight.shape[0])
    m.weight = nn.Parameter(weight)
    return m


# ---------------------------------------------------------------- amount validation
@pytest.mark.parametrize("amount", ["I'm a string", None, 1.1, 20.0, -0.1, -10])
def test_invalid_amount_raises_what_torch_raises(amount):
    with pytest.raises((TypeError, ValueError)) as theirs:
        prune.L1Unstructured(amount)
    with pytest.raises(theirs.type) as ours:
        MagnitudePruning(amount)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("amount", [0.34, 1500, 0, 0.0, 1, 1.0])
def test_valid_amounts_are_accepted(amount):
    assert MagnitudePruning(amount).amount == amount


def test_int_amount_larger_than_the_tensor_raises_at_prune_time():
    w = torch.randn(19)
    with pytest.raises(ValueError) as theirs:
        prune.L1Unstructured(20).compute_mask(w, torch.ones(19))
    with pytest.raises(ValueError) as ours:
        MagnitudePruning(20).compute_mask(w, torch.ones(19))
    assert str(ours.value) == str(theirs.value)
    m = _linear(torch.randn(2, 3).tolist())
    with pytest.raises(ValueError, match="amount=7 should be smaller"):
        MagnitudePruning.apply(m, "weight", amount=7)
    assert "weight" in dict(m.named_parameters()) and not prune.is_pruned(m)  # rolled back


@pytest.mark.parametrize("n, amount, expected", [
    (15, 0, 0), (15, 10, 10), (15, 1, 1), (15, 1.0, 15), (17, 0.4, 7),
    (108, 0.3, 32),   # round(32.4); SDCLR's ceil rule would prune 33
    (100, 0.07, 7),   # 0.07 * 100 = 7.000000000000001: round, not ceil (8)
    (10, 0.25, 2),    # round half to even, as Python's round
    (10, 0.35, 4),
])
def test_count_is_torchs_round(n, amount, expected):
    w = torch.randn(n, generator=torch.Generator().manual_seed(n))
    mask = MagnitudePruning(amount).compute_mask(w, torch.ones(n))
    assert int((mask == 0).sum()) == expected
    assert torch.equal(mask, prune.L1Unstructured(amount).compute_mask(w, torch.ones(n)))


# ---------------------------------------------------------------- ported by-hand cases
def test_l1_unstructured_pruning():
    m = _linear([[1, 2, 3, 4], [-4, -3, -2, -1]])
    MagnitudePruning.apply(m, "weight", amount=2)
    assert torch.equal(m.weight, torch.tensor([[0.0, 2, 3, 4], [-4, -3, -2, 0]]))
    # again: the next two smallest of the entries still alive
    MagnitudePruning.apply(m, "weight", amount=2)
    assert torch.equal(m.weight, torch.tensor([[0.0, 0, 3, 4], [-4, -3, 0, 0]]))
    hook = next(iter(m._forward_pre_hooks.values()))
    assert isinstance(hook, prune.PruningContainer) and len(hook) == 2


def test_l1_unstructured_pruning_with_importance_scores():
    m = _linear([[1, 2, 3, 4], [-4, -3, -2, -1]])
    scores = torch.tensor([[4.0, 2, 1, 3], [-3, -1, -2, -4]])
    MagnitudePruning.apply(m, "weight", amount=2, importance_scores=scores)
    assert torch.equal(m.weight, torch.tensor([[1.0, 2, 0, 4], [-4, 0, -2, -1]]))
    MagnitudePruning.apply(m, "weight", amount=2, importance_scores=scores)
    assert torch.equal(m.weight, torch.tensor([[1.0, 0, 0, 4], [-4, 0, 0, -1]]))


def test_unstructured_pruning_same_magnitude():
    # entries in {-2, 0, 2}: exactly the requested count goes, not everything at the threshold
    t = 2 * torch.randint(-1, 2, (10, 7), generator=torch.Generator().manual_seed(0))
    mask = MagnitudePruning(0.2).compute_mask(t, default_mask=torch.ones_like(t))
    assert int((mask == 0).sum()) == prune._compute_nparams_toprune(0.2, t.nelement()) == 14


def test_global_pruning():
    m = _linear([[1, 2, 3, 4], [-4, -3, -2, -1]])
    n = _linear([[0, 0.1, -2]])
    global_magnitude_unstructured([(m, "weight"), (n, "weight")], amount=4)
    assert torch.equal(m.weight, torch.tensor([[0.0, 2, 3, 4], [-4, -3, -2, 0]]))
    assert torch.equal(n.weight, torch.tensor([[0.0, 0, -2]]))  # the exact zero is pruned


def test_global_pruning_importance_scores():
    m = _linear([[1, 2, 3, 4], [-4, -3, -2, -1]])
    n = _linear([[0, 0.1, -2]])
    scores = {(m, "weight"): torch.tensor([[4.0, 2, 1, 3], [-3, -1, -2, -4]]),
              (n, "weight"): torch.tensor([[0, 10.0, -0.2]])}
    global_magnitude_unstructured([(m, "weight"), (n, "weight")], amount=4,
                                  importance_scores=scores)
    assert torch.equal(m.weight, torch.tensor([[1.0, 2, 0, 4], [-4, 0, -2, -1]]))
    assert torch.equal(n.weight, torch.tensor([[0, 0.1, 0]]))


def test_pruning_container_compute_mask():
    container = prune.PruningContainer()
    container._tensor_name = "test"
    p = MagnitudePruning(amount=2)
    p._tensor_name = "test"
    container.add_pruning_method(p)
    t = torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]])
    default_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 1]])
    expected = torch.tensor([[0.0, 0, 1, 0], [1, 1, 0, 1]])
    assert torch.equal(container.compute_mask(t, default_mask), expected)
    q = MagnitudePruning(amount=2)
    q._tensor_name = "another_test"
    with pytest.raises(ValueError):
        container.add_pruning_method(q)


def test_multiple_pruning_calls_compose_with_torch_methods():
    m = nn.Conv3d(2, 2, 2)
    MagnitudePruning.apply(m, "weight", amount=0.1)
    first = m.weight_mask.clone()
    prune.ln_structured(m, "weight", amount=0.3, n=2, dim=0)
    hook = next(iter(m._forward_pre_hooks.values()))
    assert isinstance(hook, prune.PruningContainer) and hook._tensor_name == "weight"
    assert [type(h) for h in hook] == [MagnitudePruning, prune.LnStructured]
    assert bool((m.weight_mask[first == 0] == 0).all())
    second = m.weight_mask.clone()
    MagnitudePruning.apply(m, "weight", amount=3)  # 3 more among the entries still alive
    assert len(next(iter(m._forward_pre_hooks.values()))) == 3
    assert int((m.weight_mask == 0).sum()) == int((second == 0).sum()) + 3
    assert bool((m.weight_mask[second == 0] == 0).all())
    assert torch.equal(m.weight, m.weight_orig * m.weight_mask)


def test_remove_pruning_makes_it_final():
    for m in (nn.Linear(5, 7), nn.Conv3d(2, 2, 2)):
        for name in ("weight", "bias"):
            MagnitudePruning.apply(m, name, amount=0.5)
            assert name + "_orig" in dict(m.named_parameters())
            assert name + "_mask" in dict(m.named_buffers())
            pruned = getattr(m, name).detach().clone()
            prune.remove(m, name)
            assert name in dict(m.named_parameters())
            assert name + "_orig" not in dict(m.named_parameters())
            assert name + "_mask" not in dict(m.named_buffers())
            assert torch.equal(getattr(m, name), pruned)


def test_remove_unpruned_raises():
    m = nn.Linear(5, 7)
    with pytest.raises(ValueError):
        prune.remove(m, "weight")


def test_pruning_keeps_parameter_identity_and_pickles():
    m = nn.Linear(5, 2, bias=False)
    pid = id(next(iter(m.parameters())))
    MagnitudePruning.apply(m, "weight", amount=0.9)
    assert id(next(iter(m.parameters()))) == pid
    clone = pickle.loads(pickle.dumps(m))
    assert torch.equal(clone.weight, m.weight)
    prune.remove(m, "weight")
    assert id(next(iter(m.parameters()))) == pid


def test_gradient_is_masked():
    m = _linear([[1, 2, 3, 4], [-4, -3, -2, -1]])
    MagnitudePruning.apply(m, "weight", amount=3)
    m(torch.ones(1, 4)).sum().backward()
    assert torch.equal(m.weight_orig.grad, m.weight_mask)


# ---------------------------------------------------------------- against torch, random cases
_TIE_VALUES = [0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 2.0]


class _Holder(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.weight = nn.Parameter(w.clone())


@st.composite
def weight_lists(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    sizes = draw(st.lists(st.integers(1, 40), min_size=1, max_size=3))
    ties = draw(st.booleans())
    elems = (st.sampled_from(_TIE_VALUES) if ties
             else st.floats(-100, 100, allow_nan=False, width=16))
    ws = [torch.tensor(draw(st.lists(elems, min_size=n, max_size=n)), dtype=torch.float64)
          .to(dtype).reshape(n, 1) for n in sizes]
    return ws


@st.composite
def amounts(draw, n):
    if draw(st.booleans()):
        return draw(st.integers(0, n))
    return draw(st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(0.0, 1.0)))


def _boundary_tie(scores, mask_before, count):
    """Whether the count-th smallest |score| among the alive entries equals the next one (the
    cut falls inside a run of equal magnitudes, where topk's choice is unspecified)."""
    alive = torch.cat([s.reshape(-1) for s in scores])[torch.cat(
        [m.reshape(-1) for m in mask_before]) == 1].abs().double().sort().values
    return 0 < count < alive.numel() and alive[count - 1] == alive[count]


def _check_same(ours, theirs, scores, before, amount):
    n_alive = int(sum(int(b.sum()) for b in before))
    count = prune._compute_nparams_toprune(amount, n_alive)
    ours_m = [h.weight_mask for h in ours]
    theirs_m = [h.weight_mask for h in theirs]
    assert sum(int((m == 0).sum()) for m in ours_m) == sum(int((m == 0).sum()) for m in theirs_m)
    for h in ours:  # the reparametrisation is torch's
        assert torch.equal(h.weight, h.weight_orig * h.weight_mask)
    tie = _boundary_tie(scores, before, count)
    if not tie:
        for a, b in zip(ours_m, theirs_m):
            assert torch.equal(a, b)
    return tie


@settings(**SETTINGS)
@given(data=st.data(), ws=weight_lists())
@example(data=None, ws=[torch.tensor([[0.0], [-0.0], [0.0]]), torch.tensor([[1.0], [0.0]])])
def test_global_matches_torch(data, ws):
    n = sum(w.numel() for w in ws)
    a1 = data.draw(amounts(n)) if data is not None else 3
    ours, theirs = [_Holder(w) for w in ws], [_Holder(w) for w in ws]
    ones = [torch.ones_like(w) for w in ws]
    global_magnitude_unstructured([(h, "weight") for h in ours], amount=a1)
    prune.global_unstructured([(h, "weight") for h in theirs], pruning_method=prune.L1Unstructured,
                              amount=a1)
    if _check_same(ours, theirs, ws, ones, a1):
        return  # after a tie the two masks may differ, so the next round would too
    # a second round prunes among the entries still alive; the masks multiply
    before = [h.weight_mask.clone() for h in ours]
    scores = [h.weight.detach().clone() for h in ours]  # what global_unstructured ranks
    alive = int(sum(int(b.sum()) for b in before))
    a2 = data.draw(amounts(alive)) if data is not None else 0.5
    global_magnitude_unstructured([(h, "weight") for h in ours], amount=a2)
    prune.global_unstructured([(h, "weight") for h in theirs], pruning_method=prune.L1Unstructured,
                              amount=a2)
    _check_same(ours, theirs, scores, before, a2)
    for h, b in zip(ours, before):
        assert bool((h.weight_mask[b == 0] == 0).all())
    for o, t in zip(ours, theirs):
        prune.remove(o, "weight")
        prune.remove(t, "weight")
        assert "weight_orig" not in dict(o.named_parameters())
        assert o.weight.dtype == t.weight.dtype


@settings(**SETTINGS)
@given(data=st.data(), ws=weight_lists(), with_scores=st.booleans())
def test_per_tensor_matches_torch(data, ws, with_scores):
    w = ws[0]
    amount = data.draw(amounts(w.numel()))
    scores = None
    if with_scores:
        scores = torch.tensor(data.draw(st.lists(st.sampled_from(_TIE_VALUES + [3.0, -4.0]),
                                                 min_size=w.numel(), max_size=w.numel())),
                              dtype=torch.float32).reshape(w.shape)
    ours, theirs = _Holder(w), _Holder(w)
    MagnitudePruning.apply(ours, "weight", amount=amount, importance_scores=scores)
    prune.l1_unstructured(theirs, "weight", amount=amount, importance_scores=scores)
    _check_same([ours], [theirs], [w if scores is None else scores], [torch.ones_like(w)], amount)


def test_tied_cut_prunes_the_first_tied_entries():
    w = torch.tensor([1.0, 0.0, -0.0, 0.0, 2.0, 0.0, 1.0, 1.0])
    for amount, expected in [(1, [1, 0, 1, 1, 1, 1, 1, 1]), (3, [1, 0, 0, 0, 1, 1, 1, 1]),
                             (6, [0, 0, 0, 0, 1, 0, 0, 1]), (8, [0] * 8)]:
        mask = MagnitudePruning(amount).compute_mask(w, torch.ones(8))
        assert mask.tolist() == expected, amount
        theirs = prune.L1Unstructured(amount).compute_mask(w, torch.ones(8))
        assert int((theirs == 0).sum()) == amount


def test_integer_importance_scores():
    t = torch.tensor([[5, -1, 3], [0, 2, -7]])
    mask = MagnitudePruning(3).compute_mask(t, torch.ones_like(t))
    assert torch.equal(mask, prune.L1Unstructured(3).compute_mask(t, torch.ones_like(t)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_raise_naming_the_tensor(bad):
    """A documented difference: torch's topk orders NaN/inf somewhere, the C++ select refuses."""
    m = _linear([[1.0, bad, 2.0]])
    with pytest.raises(ValueError, match="tensor to prune .* contains NaN or inf"):
        MagnitudePruning.apply(m, "weight", amount=1)
    assert not prune.is_pruned(m)
