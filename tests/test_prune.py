"""Top-k magnitude pruning against the NumPy-sort rule of the official SDCLR code.

Masks are compared element for element (not just counts): the radix select must reproduce the
sort rule exactly, ties, +-0 and denormals included.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune as torch_prune

from sdclr_fast.ops import prune as P
from sdclr_fast.ops import reference as R

_ops = torch.ops.sdclr_fast
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Largest magnitude drawn per dtype, so that the cast cannot round to inf.
_MAX = {torch.float16: 6.0e4, torch.bfloat16: 1.0e38, torch.float32: 1.0e38, torch.float64: 1.0e300}
# Values that make ties, signed zeros and denormals likely.
_SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.0, 3.0, -3.0, 1e-3, 6e-8, -6e-8, 1e-40, 1e-45]

SETTINGS = dict(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])


def _same(masks, expected):
    assert len(masks) == len(expected)
    for i, (m, e) in enumerate(zip(masks, expected)):
        assert m.dtype == torch.bool, i
        assert m.shape == e.shape, (i, m.shape, e.shape)
        assert torch.equal(m.cpu(), e), f"mask {i} differs in {int((m.cpu() != e).sum())} places"


@st.composite
def values(draw, n, dtype):
    kind = draw(st.sampled_from(["random", "special", "equal", "mixed"]))
    top = _MAX[dtype]
    rnd = st.floats(-top, top, allow_nan=False, allow_infinity=False, allow_subnormal=True,
                    width=16 if dtype == torch.float16 else 64)
    if kind == "random":
        return draw(st.lists(rnd, min_size=n, max_size=n))
    if kind == "special":
        return draw(st.lists(st.sampled_from(_SPECIAL), min_size=n, max_size=n))
    if kind == "equal":
        v = draw(st.sampled_from(_SPECIAL) | rnd)
        return [v * draw(st.sampled_from([1.0, -1.0])) for _ in range(n)]
    return draw(st.lists(st.sampled_from(_SPECIAL) | rnd, min_size=n, max_size=n))


@st.composite
def tensor(draw, dtype, min_size=0, max_size=300):
    n = draw(st.integers(min_size, max_size))
    t = torch.tensor(draw(values(n, dtype)), dtype=torch.float64).to(dtype)
    layout = draw(st.sampled_from(["flat", "2d", "strided", "transposed"]))
    if layout == "2d" and n % 3 == 0 and n:
        t = t.reshape(3, -1)
    elif layout == "strided":  # a non-contiguous view with the same values
        t = torch.stack([t, torch.full_like(t, 7.0)], dim=1)[:, 0]
    elif layout == "transposed" and n % 2 == 0 and n:
        t = t.reshape(-1, 2).t().contiguous().t()
    return t


@st.composite
def tensor_lists(draw, mixed_dtypes=False, min_tensors=1, max_tensors=4):
    dtype = draw(st.sampled_from(DTYPES))
    k = draw(st.integers(min_tensors, max_tensors))
    ts = []
    for _ in range(k):
        d = draw(st.sampled_from(DTYPES)) if mixed_dtypes else dtype
        ts.append(draw(tensor(d)))
    return ts


sparsities = st.sampled_from([0.0, 0.5, 0.9, 0.99, 1 - 1e-9]) | st.floats(0.0, 1.0, exclude_max=True)


# ---------------------------------------------------------------- threshold and masks
@settings(**SETTINGS)
@given(ts=tensor_lists(), sparsity=sparsities)
def test_global_threshold_and_masks_match_sort(ts, sparsity):
    assume(sum(t.numel() for t in ts) > 0)
    thr = P.magnitude_threshold(ts, sparsity)
    ref = R.magnitude_threshold_reference(ts, sparsity)
    assert thr.dim() == 0 and thr.dtype == ref.dtype
    assert torch.equal(thr, ref), (thr, ref)
    _same(P.magnitude_masks(ts, sparsity), R.magnitude_masks_reference(ts, sparsity))


@settings(**SETTINGS)
@given(ts=tensor_lists(), sparsity=sparsities)
def test_layer_masks_match_sort(ts, sparsity):
    _same(P.magnitude_masks(ts, sparsity, scope="layer"),
          R.magnitude_masks_reference(ts, sparsity, scope="layer"))


@settings(**SETTINGS)
@given(ts=tensor_lists(mixed_dtypes=True), sparsity=sparsities,
       scope=st.sampled_from(["global", "layer"]))
def test_mixed_dtype_lists(ts, sparsity, scope):
    assume(sum(t.numel() for t in ts) > 0)
    _same(P.magnitude_masks(ts, sparsity, scope=scope),
          R.magnitude_masks_reference(ts, sparsity, scope=scope))


@settings(**SETTINGS)
@given(t=st.sampled_from(DTYPES).flatmap(lambda d: tensor(d, min_size=1, max_size=64)))
def test_every_rank_is_exact(t):
    """kth_abs_value(k) is the k-th entry of the sorted |w| for every k."""
    ref = np.sort(t.abs().to(torch.float64).reshape(-1).numpy())
    for k in range(t.numel()):
        assert float(_ops.kth_abs_value([t], k)) == ref[k], k


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["randn", "ties", "heavy", "zeros"])
def test_large_inputs_take_the_16_bit_digit_path(dtype, case):
    """Over 2**16 elements the select uses 16-bit digits and several parallel chunks."""
    g = torch.Generator().manual_seed(hash((str(dtype), case)) % 2**31)
    shapes = [(64, 64, 3, 3), (128, 64, 3, 3), (0, 3), (10,), (128, 64, 1, 1)]
    ts = []
    for s in shapes:
        x = torch.randn(s, generator=g, dtype=torch.float64)
        if case == "ties":
            x = torch.round(x * 4) / 4
        elif case == "heavy":
            x = x * torch.exp(4 * torch.randn(s, generator=g, dtype=torch.float64))
            x = x.clamp(-_MAX[dtype], _MAX[dtype])  # wide range, but no overflow to inf
        elif case == "zeros":
            x = torch.where(x > 0, torch.zeros_like(x), -torch.zeros_like(x))
        ts.append(x.to(dtype))
    ts[1] = ts[1].transpose(0, 1)  # non-contiguous
    for sparsity in (0.0, 0.3, 0.9, 0.999):
        assert torch.equal(P.magnitude_threshold(ts, sparsity),
                           R.magnitude_threshold_reference(ts, sparsity))
        for scope in ("global", "layer"):
            _same(P.magnitude_masks(ts, sparsity, scope=scope),
                  R.magnitude_masks_reference(ts, sparsity, scope=scope))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_fused_pass_falls_back_when_the_sample_misleads(dtype, sparsity):
    """Large inputs take a fused pass bracketed by the strided sample j * n / S, S = 2**12 here
    (every 32nd element, so x[::4] holds all of it). Data built against that sample must still
    give the exact masks (through the radix fallback)."""
    n = 2**17
    g = torch.Generator().manual_seed(3)
    # the bracket misses rank k: every sampled element is far above the rest
    x = torch.randn(n, generator=g, dtype=torch.float64)
    x[::4] = 1000 + torch.rand(n // 4, generator=g, dtype=torch.float64)
    # the bracket holds far too many keys: the unsampled 3/4 all tie inside it
    y = torch.ones(n, dtype=torch.float64)
    y[::4] = torch.linspace(0.5, 1.5, n // 4, dtype=torch.float64)
    for w in (x, y):
        w = w.to(dtype)
        for scope in ("global", "layer"):
            _same(P.magnitude_masks([w], sparsity, scope=scope),
                  R.magnitude_masks_reference([w], sparsity, scope=scope))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_fused_pass_reports_non_finite(dtype, value):
    """The one-pass path flags NaN/inf inside its vectorised loop: one bad element anywhere in a
    large tensor (sampled position or not, first or last strip) is reported with its index."""
    for pos in (0, 1, 2**16 + 7, 2**17 - 1):
        bad = torch.randn(2**17, dtype=torch.float64).to(dtype)
        bad[pos] = value
        with pytest.raises(ValueError, match=r"tensors\[1\] contains NaN or inf"):
            P.magnitude_masks([torch.randn(100).to(dtype), bad], 0.9)
        with pytest.raises(ValueError, match=r"tensors\[0\] contains NaN or inf"):
            P.magnitude_masks([bad], 0.5, scope="layer")


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
def test_fused_pass_mixed_dtypes(sparsity):
    """Large lists of mixed dtypes take the fused path in the float32 (or float64) key domain."""
    g = torch.Generator().manual_seed(11)
    shapes = [(64, 64, 3, 3), (128, 32, 3, 3), (7, 5), (256, 128, 1, 1)]
    for dtypes in ([torch.float32, torch.float16, torch.bfloat16, torch.float32],
                   [torch.float16, torch.float64, torch.bfloat16, torch.float32]):
        ts = [(torch.randn(s, generator=g, dtype=torch.float64) * (i + 1)).to(d)
              for i, (s, d) in enumerate(zip(shapes, dtypes))]
        assert torch.equal(P.magnitude_threshold(ts, sparsity),
                           R.magnitude_threshold_reference(ts, sparsity))
        _same(P.magnitude_masks(ts, sparsity), R.magnitude_masks_reference(ts, sparsity))


def test_semantics_by_hand():
    w = torch.tensor([-3.0, 1.0, -0.0, 2.0, 0.0, -1.0, 5.0])
    # sorted |w| = 0 0 1 1 2 3 5; ceil(0.5 * 7) = 4 -> threshold 2
    assert float(P.magnitude_threshold([w], 0.5)) == 2.0
    assert P.magnitude_masks([w], 0.5)[0].tolist() == [True, False, False, True, False, False, True]
    # sparsity 0: threshold is the smallest |w|, everything is kept (ties at 0 included)
    assert P.magnitude_masks([w], 0.0)[0].all()
    # sparsity near 1: the index is clamped to n - 1, the largest magnitude survives
    assert P.magnitude_masks([w], 0.9999)[0].tolist() == [False] * 6 + [True]
    # ties at the threshold are kept: more than (1 - sparsity) * n survive
    ones = torch.ones(10)
    assert P.magnitude_masks([ones], 0.7)[0].all()


def test_float64_huge_values_are_not_mistaken_for_inf():
    # 1e308 shares the top 8-bit radix bin with inf; the finiteness check must look closer.
    w = torch.tensor([1e308, -1.7e308, 1.0, 0.5], dtype=torch.float64)
    _same(P.magnitude_masks([w], 0.5), R.magnitude_masks_reference([w], 0.5))
    assert float(P.magnitude_threshold([w], 0.5)) == 1e308


def test_masks_do_not_track_gradients():
    w = torch.randn(5, 4, requires_grad=True)
    (m,) = P.magnitude_masks([w], 0.5)
    assert not m.requires_grad and m.dtype == torch.bool and m.is_contiguous()
    assert not P.magnitude_threshold([w], 0.5).requires_grad


def test_single_tensor_argument():
    w = torch.randn(20)
    _same(P.magnitude_masks(w, 0.4), R.magnitude_masks_reference([w], 0.4))


# ---------------------------------------------------------------- block masks
@st.composite
def conv_weights(draw):
    dtype = draw(st.sampled_from(DTYPES))
    ws = []
    for _ in range(draw(st.integers(1, 3))):
        shape = (draw(st.integers(0, 9)), draw(st.integers(1, 9)),
                 draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        n = math.prod(shape)
        ws.append(torch.tensor(draw(values(n, dtype)), dtype=torch.float64).reshape(shape).to(dtype))
    return ws


@settings(**SETTINGS)
@given(ws=conv_weights(), sparsity=sparsities, block=st.tuples(st.integers(1, 4), st.integers(1, 4)),
       scope=st.sampled_from(["global", "layer"]))
@example(ws=[torch.full((4, 1, 1, 2), 389527.03008776193, dtype=torch.float64),
             torch.zeros(0, 1, 1, 1, dtype=torch.float64)], sparsity=0.5, block=(3, 1),
         scope="global")  # equal means that round apart in the last bit (6x/6 vs 2x/2)
def test_block_masks_match_reference(ws, sparsity, block, scope):
    """Scores equal the mean-based reference to the last bit or so (summation order); the
    masks equal the reference's selection over the op's own scores exactly."""
    scores = []
    for w in ws:
        got = P.block_scores(w, block)
        ref = R.block_scores_reference(w, block)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-15, atol=0)
        scores.append(got)
    if scope == "global" and all(w.numel() == 0 for w in ws):
        with pytest.raises(ValueError, match="no elements"):
            P.magnitude_masks(ws, sparsity, scope=scope, block=block, clip_block=True)
        return
    if any(w.numel() and block[0] > w.shape[0] and block[1] > w.shape[1] for w in ws):
        with pytest.raises(ValueError, match=r"block .* is larger than tensors\[\d\].*clip_block=True"):
            P.magnitude_masks(ws, sparsity, scope=scope, block=block)
    masks = P.magnitude_masks(ws, sparsity, scope=scope, block=block, clip_block=True)
    _same(masks, R.magnitude_block_masks_reference(ws, sparsity, block, scope=scope,
                                                   scores=scores))
    for w, m in zip(ws, masks):  # whole blocks, all taps: constant over (kh, kw) and each block
        if m.numel():
            assert torch.equal(m, m[:, :, :1, :1].expand_as(m))
    # sparsity counts weights: at most ceil(sparsity * n) of them are pruned (per tensor for "layer")
    groups = [ws] if scope == "global" else [[w] for w in ws]
    mgroups = [masks] if scope == "global" else [[m] for m in masks]
    for g, mg in zip(groups, mgroups):
        n = sum(w.numel() for w in g)
        if n:
            assert sum(int((~m).sum()) for m in mg) <= P.kth_index(sparsity, n)


def test_block_masks_by_hand():
    w = torch.zeros(4, 4, 1, 1)
    w[:2, :2] = 1.0   # block (0, 0): mean 1
    w[2:, 2:] = 3.0   # block (1, 1): mean 3
    w[:2, 2:] = 2.0   # block (0, 1): mean 2
    (m,) = P.magnitude_masks([w], 0.5, block=(2, 2))  # 4 blocks, ceil(2) -> threshold 2
    expected = torch.zeros(4, 4, 1, 1, dtype=torch.bool)
    expected[:2, 2:] = True
    expected[2:, 2:] = True
    _same([m], [expected])
    # an edge block competes by its mean and counts its own weights: 4 weights of mean 1, 2 of
    # mean 4. At 0.5, weight ceil(3) of the ranking lies in the weak block, which is kept (pruning
    # it would prune 4 > 3 weights); at 0.7 (ceil(4.2) = 5) it lies in the strong one.
    w = torch.ones(3, 2, 1, 1)
    w[2, :] = 4.0
    (m,) = P.magnitude_masks([w], 0.5, block=(2, 2))
    assert m.all()
    (m,) = P.magnitude_masks([w], 0.7, block=(2, 2))
    assert m[2].all() and not m[:2].any()


@pytest.mark.parametrize("block", [(32, 32), (16, 16)])
def test_block_sparsity_counts_weights_on_the_cifar_resnet18(block):
    """The CIFAR ResNet-18 (width 64, 11.2M conv weights): block masks keep 1 - sparsity of the
    weights, as unstructured ones do. Ranking blocks by count instead kept 1.25 % at 0.9 (the
    small early layers have the largest mean |w| and win most blocks)."""
    from sdclr_fast.nn.resnet import resnet18

    torch.manual_seed(0)
    weights = list(P.conv_weights(resnet18(width=64)).values())
    n = sum(w.numel() for w in weights)
    for sparsity in (0.5, 0.9, 0.99):
        masks = P.magnitude_masks(weights, sparsity, block=block)
        kept = sum(int(m.sum()) for m in masks) / n
        assert 1 - sparsity <= kept < 1 - sparsity + 0.005, (sparsity, kept)


def test_a_block_larger_than_a_layer_is_refused_unless_clipped_on_purpose():
    from sdclr_fast.nn.resnet import resnet18

    weights = list(P.conv_weights(resnet18(width=4)).values())  # 4 to 32 channels
    with pytest.raises(ValueError, match=r"block 33x32 is larger than tensors\[0\] \(4 out x 3 in channels\)"):
        P.magnitude_masks(weights, 0.9, block=(33, 32))
    masks = P.magnitude_masks(weights, 0.9, block=(33, 32), clip_block=True)
    kept = sum(int(m.sum()) for m in masks) / sum(w.numel() for w in weights)
    assert 0.1 <= kept < 0.2  # whole layers are the blocks now, and still about 1 - sparsity is kept
    P.magnitude_masks(weights, 0.9, block=(4, 4))  # conv1 (4 x 3) is smaller in one dimension only


# ---------------------------------------------------------------- errors
def test_errors():
    w = torch.randn(10)
    for bad in (-0.1, 1.0, 1.5, float("nan"), "0.5", None, True, torch.tensor(0.5)):
        with pytest.raises(ValueError, match="sparsity"):
            P.magnitude_masks([w], bad)
        with pytest.raises(ValueError, match="sparsity"):
            P.magnitude_threshold([w], bad)
    with pytest.raises(ValueError, match="at least one tensor"):
        P.magnitude_masks([], 0.5)
    with pytest.raises(ValueError, match="no elements"):
        P.magnitude_masks([torch.empty(0), torch.empty(2, 0)], 0.5)
    with pytest.raises(ValueError, match="no elements"):
        P.magnitude_threshold([torch.empty(0)], 0.5)
    with pytest.raises(ValueError, match="scope"):
        P.magnitude_masks([w], 0.5, scope="local")
    with pytest.raises(ValueError, match=r"tensors\[1\] must be a torch.Tensor"):
        P.magnitude_masks([w, [1.0, 2.0]], 0.5)
    with pytest.raises(ValueError, match=r"one device.*tensors\[1\] is on meta"):
        P.magnitude_masks([w, torch.empty(3, device="meta")], 0.5)
    with pytest.raises(ValueError, match=r"tensors\[1\] has dtype Long"):
        P.magnitude_masks([w, torch.arange(3)], 0.5)
    for value in (float("nan"), float("inf"), -float("inf")):
        for dtype in DTYPES:
            bad = torch.tensor([1.0, value, 2.0], dtype=dtype)
            with pytest.raises(ValueError, match=r"tensors\[2\] contains NaN or inf"):
                P.magnitude_masks([w, torch.ones(3), bad], 0.5)
            with pytest.raises(ValueError, match=r"tensors\[0\] contains NaN or inf"):
                P.magnitude_masks([bad], 0.5, scope="layer")
    conv = torch.randn(4, 4, 3, 3)
    for block in ((0, 2), (2, -1), (2,), (2, 2, 2), "ab", (2.0, 2), (True, 2), 4):
        with pytest.raises(ValueError, match="block"):
            P.magnitude_masks([conv], 0.5, block=block)
    with pytest.raises(ValueError, match=r"4-d conv weights.*tensors\[1\]"):
        P.magnitude_masks([conv, torch.randn(4, 4)], 0.5, block=(2, 2))
    with pytest.raises(ValueError, match=r"tensors\[0\] contains NaN"):
        P.magnitude_masks([torch.full((2, 2, 1, 1), float("nan"))], 0.5, block=(1, 1))


def test_op_argument_errors():
    w = torch.randn(10)
    with pytest.raises(ValueError, match=r"k must be in \[0, 10\)"):
        _ops.kth_abs_value([w], 10)
    with pytest.raises(ValueError, match=r"k must be in"):
        _ops.kth_abs_value([w], -1)
    with pytest.raises(ValueError, match="one entry per tensor"):
        _ops.kth_abs_value_per_tensor([w, w], [1])
    with pytest.raises(ValueError, match=r"k\[1\] must be in \[0, 0\)"):
        _ops.kth_abs_value_per_tensor([w, torch.empty(0)], [1, 1])
    with pytest.raises(ValueError, match="1 value or one per tensor"):
        _ops.abs_ge_masks([w, w, w], torch.ones(2))
    with pytest.raises(ValueError, match="floating"):
        _ops.abs_ge_masks([w], torch.ones(1, dtype=torch.long))


def test_per_tensor_op_and_empty_tensors():
    ts = [torch.tensor([3.0, -1.0, 2.0]), torch.empty(0), torch.tensor([-4.0, 0.5])]
    thr = _ops.kth_abs_value_per_tensor(ts, [1, 0, 0])
    assert thr.tolist() == [2.0, 0.0, 0.5]
    masks = _ops.abs_ge_masks(ts, thr)
    assert [m.tolist() for m in masks] == [[True, False, True], [], [True, True]]


def test_mask_threshold_precision():
    # a float64 threshold between two float32 values must not be rounded to either
    w = torch.tensor([1.0, 1.0 + 2**-23], dtype=torch.float32)
    (m,) = _ops.abs_ge_masks([w], torch.tensor([1.0 + 2**-24], dtype=torch.float64))
    assert m.tolist() == [False, True]


# ---------------------------------------------------------------- torch.library integration
def _samples():
    g = torch.Generator().manual_seed(0)
    return [
        [torch.randn(4, 3, 3, 3, generator=g), torch.randn(7, generator=g)],
        [torch.randn(5, 5, generator=g).t(), torch.empty(0)],
        [torch.randn(9, generator=g).half(), torch.randn(3, generator=g).half()],
    ]


@pytest.mark.parametrize("i", range(3))
def test_opcheck(i):
    ts = _samples()[i]
    n = sum(t.numel() for t in ts)
    torch.library.opcheck(_ops.kth_abs_value.default, (ts, n // 2))
    ks = [t.numel() // 2 for t in ts]
    torch.library.opcheck(_ops.kth_abs_value_per_tensor.default, (ts, ks))
    torch.library.opcheck(_ops.abs_ge_masks.default, (ts, torch.tensor([0.5])))
    torch.library.opcheck(_ops.abs_ge_masks.default, (ts, torch.full((len(ts),), 0.25)))
    torch.library.opcheck(_ops.topk_abs_masks.default, (ts, [n // 2], False))
    torch.library.opcheck(_ops.topk_abs_masks.default, (ts, ks, True))


def test_opcheck_fused_path():
    """Large enough for the fused one-pass CPU path of topk_abs_masks."""
    g = torch.Generator().manual_seed(1)
    ts = [torch.randn(300, 257, generator=g), torch.randn(40_000, generator=g)]
    n = sum(t.numel() for t in ts)
    torch.library.opcheck(_ops.topk_abs_masks.default, (ts, [int(0.9 * n)], False))


def _bad_calls():
    w, e = torch.randn(10), torch.empty(0)
    return [
        ("kth_abs_value", ([w], 10)),
        ("kth_abs_value", ([w], -1)),
        ("kth_abs_value", ([e, e], 0)),
        ("kth_abs_value", ([w, w.int()], 1)),
        ("kth_abs_value_per_tensor", ([w, w], [1])),
        ("kth_abs_value_per_tensor", ([w, e], [1, 1])),
        ("kth_abs_value_per_tensor", ([w, w], [1, 10])),
        ("abs_ge_masks", ([w, w, w], torch.ones(2))),
        ("abs_ge_masks", ([w], torch.ones(1, dtype=torch.long))),
        ("abs_ge_masks", ([w.bool()], torch.ones(1))),
        ("topk_abs_masks", ([w], [1, 2], False)),
        ("topk_abs_masks", ([w, e], [10], False)),
        ("topk_abs_masks", ([w, w], [1], True)),
        ("topk_abs_masks", ([w, e], [0, 1], True)),
        ("topk_abs_masks", ([w.half(), w.long()], [1, 1], True)),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_fake_implementations_raise_what_the_ops_raise(i):
    """A FakeTensor call (what torch.compile and opcheck trace with) raises the eager op's
    ValueError, with its message (dtype names are spelt torch's way in Python: 'torch.int32'
    for C++'s 'Int')."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_map_only

    name, args = _bad_calls()[i]
    op = getattr(_ops, name).default
    with pytest.raises(ValueError) as eager:
        op(*args)
    mode = FakeTensorMode()
    fake_args = tree_map_only(torch.Tensor, mode.from_tensor, args)
    with mode, pytest.raises(ValueError) as fake:
        op(*fake_args)
    got, want = str(fake.value), str(eager.value)
    if "dtype" in want or "floating" in want:
        prefix = want.split(" has dtype ")[0] if " has dtype " in want else want.split(", got")[0]
        assert got.startswith(prefix), (got, want)
    else:
        assert got == want


def test_fake_implementations_accept_valid_calls():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        ts = [torch.empty(4, 3), torch.empty(0), torch.empty(5, dtype=torch.float64)]
        assert _ops.kth_abs_value(ts, 16).dtype == torch.float64
        assert _ops.kth_abs_value_per_tensor(ts, [11, 0, 4]).shape == (3,)
        thr, masks = _ops.topk_abs_masks(ts, [0, 0, 0], True)
        assert thr.shape == (3,) and [m.shape for m in masks] == [t.shape for t in ts]
        assert all(m.dtype == torch.bool for m in _ops.abs_ge_masks(ts, torch.empty(1)))


def test_torch_compile():
    def fn(a, b):
        return P.magnitude_masks([a, b], 0.7)

    compiled = torch.compile(fn, backend="aot_eager")
    a, b = torch.randn(8, 4, 3, 3), torch.randn(6, 4, 1, 1)
    _same(compiled(a, b), R.magnitude_masks_reference([a, b], 0.7))


# ---------------------------------------------------------------- models and torch.nn.utils.prune
class _MyConv(nn.Conv2d):
    """Stands in for MaskedConv2d: a Conv2d subclass must be picked up."""


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(_MyConv(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.shortcut = nn.Conv2d(8, 16, 1, bias=True)
        self.conv1d = nn.Conv1d(4, 4, 3)
        self.head = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Linear(16, 4))


def test_prune_model_picks_conv_weights():
    net = _Net()
    masks = P.prune_model(net, 0.8)
    assert list(masks) == ["conv1.weight", "layer1.0.weight", "shortcut.weight"]
    ws = [net.conv1.weight, net.layer1[0].weight, net.shortcut.weight]
    _same(list(masks.values()), R.magnitude_masks_reference(ws, 0.8))
    layer = P.prune_model(net, 0.8, scope="layer")
    _same(list(layer.values()), R.magnitude_masks_reference(ws, 0.8, scope="layer"))
    assert list(P.prune_model(net, 0.5, include="layer1.*")) == ["layer1.0.weight"]
    assert list(P.prune_model(net, 0.5, exclude=["*shortcut*", "conv1.*"])) == ["layer1.0.weight"]
    assert list(P.prune_model(net, 0.5, include=["conv1.*", "shortcut.*"], exclude="conv1.*")) == [
        "shortcut.weight"]
    blocks = P.prune_model(net, 0.5, block=(4, 4))
    _same(list(blocks.values()), R.magnitude_block_masks_reference(ws, 0.5, (4, 4)))
    with pytest.raises(ValueError, match="no nn.Conv2d weights"):
        P.prune_model(net, 0.5, include="nothing*")
    with pytest.raises(ValueError, match="no nn.Conv2d weights"):
        P.prune_model(nn.Linear(3, 3), 0.5)
    with pytest.raises(ValueError, match="model must be"):
        P.prune_model([net.conv1], 0.5)
    with pytest.raises(ValueError, match="include"):
        P.prune_model(net, 0.5, include=[3])


def test_prune_model_sees_dense_weight_under_torch_prune():
    net = _Net()
    before = P.prune_model(net, 0.6)
    torch_prune.l1_unstructured(net.conv1, "weight", amount=0.5)
    after = P.prune_model(net, 0.6)
    assert list(after) == list(before)
    _same(list(after.values()), list(before.values()))


def test_torch_prune_method_follows_torch_and_masks_follow_sdclr():
    """The two rules side by side (tests/test_torch_prune_compat.py checks the method in full):
    the prune method removes round(p * n) entries as L1Unstructured does, magnitude_masks keeps
    SDCLR's ceil rule."""
    w = torch.randn(108, generator=torch.Generator().manual_seed(3))
    single = nn.Linear(108, 1, bias=False)
    single.weight = nn.Parameter(w.reshape(1, -1).clone())
    P.MagnitudePruning.apply(single, "weight", amount=0.3)
    assert int((single.weight_mask == 0).sum()) == 32
    theirs = torch_prune.L1Unstructured(0.3).compute_mask(w, torch.ones(108))
    assert torch.equal(single.weight_mask.reshape(-1), theirs)
    (sdclr,) = P.magnitude_masks([w], 0.3)
    _same([sdclr], R.magnitude_masks_reference([w], 0.3))
    assert int((~sdclr).sum()) == 33


@settings(**SETTINGS)
@given(sparsity=sparsities, n=st.integers(1, 10**9))
@example(sparsity=0.7, n=100)   # 0.7 * 100 = 70.00000000000001: the official code takes 71
@example(sparsity=0.9999999, n=10)  # capped at the last index
@example(sparsity=0.0, n=1)
def test_kth_index_matches_the_official_rule(sparsity, n):
    assert P.kth_index is not R.kth_index
    assert P.kth_index(sparsity, n) == R.kth_index(sparsity, n)
    assert 0 <= P.kth_index(sparsity, n) < n


# ---------------------------------------------------------------- CUDA (where a GPU exists)
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@settings(**SETTINGS)
@given(ts=tensor_lists(mixed_dtypes=True), sparsity=sparsities,
       scope=st.sampled_from(["global", "layer"]), block=st.sampled_from([None, (2, 3)]))
def test_cuda_matches_cpu(ts, sparsity, scope, block):
    assume(sum(t.numel() for t in ts) > 0)
    if block is not None:
        ts = [t.reshape(-1, 1, 1, 1) if t.numel() else t.reshape(0, 1, 1, 1) for t in ts]
    cpu = P.magnitude_masks(ts, sparsity, scope=scope, block=block)
    gpu = P.magnitude_masks([t.cuda() for t in ts], sparsity, scope=scope, block=block)
    assert all(m.is_cuda for m in gpu)
    _same(gpu, cpu)
    if scope == "global" and block is None:
        assert torch.equal(P.magnitude_threshold([t.cuda() for t in ts], sparsity).cpu(),
                           P.magnitude_threshold(ts, sparsity))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_large_and_errors(dtype):
    g = torch.Generator().manual_seed(1)
    ts = [torch.randn(s, generator=g).to(dtype) for s in [(512, 256, 3, 3), (64, 3, 3, 3), (0,)]]
    ts.append(torch.round(torch.randn(300_000, generator=g) * 4).to(dtype) / 4)
    for sparsity in (0.0, 0.9, 0.999):
        for scope in ("global", "layer"):
            _same(P.magnitude_masks([t.cuda() for t in ts], sparsity, scope=scope),
                  R.magnitude_masks_reference(ts, sparsity, scope=scope))
    bad = torch.tensor([1.0, float("nan")], dtype=dtype, device="cuda")
    with pytest.raises(ValueError, match=r"tensors\[1\] contains NaN or inf"):
        P.magnitude_masks([ts[0].cuda(), bad], 0.5)
    with pytest.raises(ValueError, match="one device"):
        P.magnitude_masks([ts[0].cuda(), ts[1]], 0.5)
    torch.library.opcheck(_ops.kth_abs_value.default, ([t.cuda() for t in ts[1:]], 5))
    torch.library.opcheck(_ops.abs_ge_masks.default, ([t.cuda() for t in ts[1:]],
                                                      torch.tensor([0.5], device="cuda")))
    torch.library.opcheck(_ops.topk_abs_masks.default, ([t.cuda() for t in ts[1:]], [5], False))
