"""Top-k magnitude pruning: the masks of SDCLR's self-competitor.

SDCLR pools |w| of every conv weight of the backbone, takes the value at index
ceil(sparsity * n) of the ascending sort as the threshold and keeps |w| >= threshold (ties
kept). The official code sorts on the CPU with NumPy once per epoch; here the threshold is an
exact radix select over the IEEE bits of |w| (C++ with at::parallel_for on CPU, CUDA kernels
that cover all tensors in a handful of launches on GPU) and the masks come from one fused pass.
Results equal the sort rule bit for bit, ties included.

Registered ops (``torch.ops.sdclr_fast.*``, fake implementations below so they trace under
``torch.compile``):

* ``kth_abs_value(Tensor[] tensors, int k) -> Tensor``: k-th smallest |w| (0-based) pooled.
* ``kth_abs_value_per_tensor(Tensor[] tensors, int[] k) -> Tensor``: one per tensor.
* ``abs_ge_masks(Tensor[] tensors, Tensor threshold) -> Tensor[]``: masks ``|w| >= t``.
* ``topk_abs_masks(Tensor[] tensors, int[] k, bool per_tensor) -> (Tensor, Tensor[])``: the
  thresholds and the masks together; on CPU large inputs take a single fused pass (a sample
  brackets the threshold, the pass writes the masks and collects the few keys inside the
  bracket, the exact threshold is selected among them and their mask bytes patched).

Thresholds are float32 (float16/bfloat16/float32 magnitudes convert to float32 exactly), or
float64 when a tensor is float64.
"""
import fnmatch
import math
import numbers

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

try:
    import sdclr_fast._C  # noqa: F401  (loads the TORCH_LIBRARY registrations)
except ImportError as exc:
    import importlib.util

    if importlib.util.find_spec("sdclr_fast._C") is None:  # a source checkout never built
        raise ImportError(
            "sdclr_fast._C, the C++ pruning extension, is not built: run `make setup`, or "
            "`pip install --no-build-isolation -e .` in the repository") from exc
    # built, but it does not load: usually compiled against another torch (a build-isolated
    # `pip install` builds against a torch of its own), which leaves undefined symbols
    raise ImportError(
        f"sdclr_fast._C does not load with this torch ({torch.__version__}): {exc}. It must be "
        f"compiled against the torch it runs with: reinstall with `pip install "
        f"--no-build-isolation <sdclr-fast source>` in this environment") from exc

__all__ = [
    "magnitude_threshold",
    "magnitude_masks",
    "block_scores",
    "conv_weights",
    "prune_model",
    "MagnitudePruning",
    "global_magnitude_unstructured",
]

_ops = torch.ops.sdclr_fast
PRUNE_SCOPES = ("global", "layer")  # also the choices of PretrainConfig.prune_scope


# ---------------------------------------------------------------- fake (meta) implementations
# They check what the C++ ops check (csrc/prune.h: prepare, check_*), with the same messages and
# ValueError, so that torch.compile / FakeTensor users see the errors an eager call raises. Only
# the NaN/inf check needs the data and stays with the kernels.
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _threshold_dtype(tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _fake_prepare(op, tensors):
    torch._check_value(len(tensors) > 0,
                       lambda: f"{op}: expected at least one tensor, got an empty list")
    device = tensors[0].device
    for i, t in enumerate(tensors):
        torch._check_value(t.device == device, lambda: (
            f"{op}: all tensors must be on one device; tensors[0] is on {device} but "
            f"tensors[{i}] is on {t.device}"))
        torch._check_value(t.dtype in _FLOAT_DTYPES, lambda: (
            f"{op}: tensors[{i}] has dtype {t.dtype}; expected float16, bfloat16, float32 or "
            f"float64"))


def _fake_pooled_rank(op, tensors, k):
    n = sum(t.numel() for t in tensors)
    torch._check_value(n > 0, lambda: f"{op}: the tensors hold no elements")
    msg = lambda: f"{op}: k must be in [0, {n}) for {n} elements, got {k}"  # noqa: E731
    torch._check_value(k >= 0, msg)
    torch._check_value(k < n, msg)


def _fake_tensor_ranks(op, tensors, k):
    torch._check_value(len(k) == len(tensors), lambda: (
        f"{op}: k must have one entry per tensor ({len(tensors)}), got {len(k)}"))
    for i, (t, ki) in enumerate(zip(tensors, k)):
        n = t.numel()
        msg = lambda: (f"{op}: k[{i}] must be in [0, {n}) for tensors[{i}] with {n} elements "  # noqa: E731
                       f"(0 for an empty tensor), got {ki}")
        if n == 0:
            torch._check_value(ki == 0, msg)
        else:
            torch._check_value(ki >= 0, msg)
            torch._check_value(ki < n, msg)


def _masks_like(tensors):
    return [torch.empty(t.shape, dtype=torch.bool, device=t.device) for t in tensors]


@torch.library.register_fake("sdclr_fast::kth_abs_value")
def _kth_abs_value_fake(tensors, k):
    op = "kth_abs_value"
    _fake_prepare(op, tensors)
    _fake_pooled_rank(op, tensors, k)
    return tensors[0].new_empty((), dtype=_threshold_dtype(tensors))


@torch.library.register_fake("sdclr_fast::kth_abs_value_per_tensor")
def _kth_abs_value_per_tensor_fake(tensors, k):
    op = "kth_abs_value_per_tensor"
    _fake_prepare(op, tensors)
    _fake_tensor_ranks(op, tensors, k)
    return tensors[0].new_empty((len(tensors),), dtype=_threshold_dtype(tensors))


@torch.library.register_fake("sdclr_fast::abs_ge_masks")
def _abs_ge_masks_fake(tensors, threshold):
    op = "abs_ge_masks"
    _fake_prepare(op, tensors)
    device, g = tensors[0].device, len(tensors)
    torch._check_value(threshold.device == device, lambda: (
        f"{op}: threshold must be on the tensors' device ({device}), got {threshold.device}"))
    torch._check_value(threshold.dtype.is_floating_point, lambda: (
        f"{op}: threshold must be a floating tensor, got {threshold.dtype}"))
    torch._check_value(threshold.numel() == 1 or threshold.numel() == g, lambda: (
        f"{op}: threshold must hold 1 value or one per tensor ({g}), got {threshold.numel()}"))
    return _masks_like(tensors)


@torch.library.register_fake("sdclr_fast::topk_abs_masks")
def _topk_abs_masks_fake(tensors, k, per_tensor):
    op = "topk_abs_masks"
    _fake_prepare(op, tensors)
    if per_tensor:
        _fake_tensor_ranks(op, tensors, k)
    else:
        torch._check_value(len(k) == 1, lambda: (
            f"{op}: k must hold one rank when per_tensor is false, got {len(k)}"))
        _fake_pooled_rank(op, tensors, k[0])
    thresholds = tensors[0].new_empty((len(k),), dtype=_threshold_dtype(tensors))
    return thresholds, _masks_like(tensors)


# ---------------------------------------------------------------- argument checks
def _check_sparsity(sparsity):
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    s = float(sparsity)
    if not 0.0 <= s < 1.0:  # also rejects NaN
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return s


def _check_tensors(tensors):
    """A list of detached tensors on one device (dtype and finiteness are checked in C++,
    fused into the passes that read the data anyway)."""
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    tensors = list(tensors)
    if not tensors:
        raise ValueError("tensors: expected at least one tensor, got an empty list")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"tensors[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.device != tensors[0].device:
            raise ValueError(f"tensors must all be on one device: tensors[0] is on "
                             f"{tensors[0].device} but tensors[{i}] is on {t.device}")
    return [t.detach() for t in tensors]


def _check_scope(scope):
    if scope not in PRUNE_SCOPES:
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")


def _check_block(block):
    if block is None:
        return None
    ok = (isinstance(block, (tuple, list)) and len(block) == 2
          and all(isinstance(b, numbers.Integral) and not isinstance(b, bool) and b > 0
                  for b in block))
    if not ok:
        raise ValueError(f"block must be None or a pair (out_channels, in_channels) of positive "
                         f"ints, got {block!r}")
    return int(block[0]), int(block[1])


# ---------------------------------------------------------------- public ops
def kth_index(sparsity, n):
    """SDCLR's threshold rank: index ceil(sparsity * n) into the ascending sorted |w| of n
    magnitudes, kept below n so that the largest magnitudes survive when sparsity is near 1."""
    return min(math.ceil(sparsity * n), n - 1)


def magnitude_threshold(tensors, sparsity):
    """The SDCLR pruning threshold of ``tensors``, without a sort.

    The value at index ``ceil(sparsity * n)`` (kept below n) of the ascending sorted |w| pooled
    over all ``tensors`` (n elements in all), found by the C++ / CUDA selection op
    ``torch.ops.sdclr_fast.kth_abs_value``.

    Args:
        tensors: a tensor or a list of tensors (float16, bfloat16, float32 or float64, any
            shapes) on one device.
        sparsity: the fraction to prune, a number in [0, 1).

    Returns:
        A 0-d tensor on the tensors' device: float32, or float64 if any tensor is float64.

    Raises:
        ValueError: for a sparsity outside [0, 1), an empty list, non-tensors, tensors on
            several devices, tensors without elements, NaN or inf.

    Examples:
        >>> import torch, sdclr_fast
        >>> w = torch.arange(10.0) - 4.5           # |w| = 0.5, 0.5, 1.5, 1.5, ..., 4.5, 4.5
        >>> sdclr_fast.magnitude_threshold([w], 0.3)   # sorted |w| at index ceil(0.3 * 10) = 3
        tensor(1.5000)
    """
    s = _check_sparsity(sparsity)
    tensors = _check_tensors(tensors)
    n = sum(t.numel() for t in tensors)
    if n == 0:
        raise ValueError("tensors: the tensors hold no elements")
    return _ops.kth_abs_value(tensors, kth_index(s, n))


def block_scores(weight, block):
    """Score of each (block[0] out-channels x block[1] in-channels x all kh*kw taps) group of a
    conv weight (O, I, kh, kw): its L1 norm divided by its element count, so that the partial
    blocks at the edges compete fairly with full ones. Float64, shape (ceil(O/bo), ceil(I/bi))."""
    bo, bi = block
    o, i, kh, kw = weight.shape
    nbo, nbi = -(-o // bo), -(-i // bi)
    per_pair = weight.detach().abs().to(torch.float64).sum(dim=(2, 3))  # (O, I)
    padded = per_pair.new_zeros(nbo * bo, nbi * bi)
    padded[:o, :i] = per_pair
    sums = padded.reshape(nbo, bo, nbi, bi).sum(dim=(1, 3))
    rows = torch.full((nbo,), bo, dtype=torch.float64, device=weight.device)
    cols = torch.full((nbi,), bi, dtype=torch.float64, device=weight.device)
    if nbo:
        rows[-1] = o - (nbo - 1) * bo
    if nbi:
        cols[-1] = i - (nbi - 1) * bi
    return sums / (rows[:, None] * cols[None, :] * (kh * kw))


def _expand_blocks(keep, shape, block):
    o, i, kh, kw = shape
    full = keep.repeat_interleave(block[0], dim=0)[:o].repeat_interleave(block[1], dim=1)[:, :i]
    return full[:, :, None, None].expand(o, i, kh, kw).contiguous()


def magnitude_masks(tensors, sparsity, scope="global", block=None, clip_block=False):
    """Bool masks ``|w| >= threshold``, one per tensor: SDCLR's magnitude pruning.

    ``scope="global"`` pools all tensors under one threshold (SDCLR's rule, see
    `magnitude_threshold`: ties at the threshold are kept, so at least one weight survives);
    ``"layer"`` gives each tensor its own. ``block=(bo, bi)`` prunes conv weights (O, I, kh, kw)
    in whole groups of bo out-channels x bi in-channels x all taps, so that a mask-aware conv
    (`masked_conv2d`) can skip them. Blocks are ranked by `block_scores` (mean |w|) and
    ``sparsity`` still counts weights: each block counts with its number of weights (edge blocks
    are smaller), and the cut falls at the block that holds weight number ceil(sparsity * n) of
    that ranking, so at most that many weights are pruned and the kept fraction exceeds
    1 - sparsity by less than one block.

    Args:
        tensors: a tensor or a list of tensors on one device (conv weights with ``block``).
        sparsity: the fraction to prune, a number in [0, 1).
        scope: ``"global"`` (one threshold) or ``"layer"`` (one per tensor).
        block: None (unstructured, as SDCLR) or ``(bo, bi)``, positive ints.
        clip_block: allow a block larger than a tensor in both channel dimensions (the whole
            layer would be one block; refused unless True).

    Returns:
        A list of bool tensors, each of its tensor's shape (contiguous), on the same device.

    Raises:
        ValueError: for a sparsity outside [0, 1), an unknown scope, a malformed block (or one
            that covers a whole layer without ``clip_block``), no elements, NaN or inf.

    Examples:
        >>> import torch, sdclr_fast
        >>> ws = [torch.randn(64, 64, 3, 3), torch.randn(128, 64, 3, 3)]
        >>> masks = sdclr_fast.magnitude_masks(ws, 0.9)                     # one global threshold
        >>> round(sum(m.sum().item() for m in masks) / sum(w.numel() for w in ws), 2)
        0.1
        >>> m = sdclr_fast.magnitude_masks([torch.randn(64, 64, 3, 3)], 0.9, block=(16, 16))[0]
        >>> m.float().mean().item()       # 16 blocks of 2304 weights: 2 kept, 14 <= ceil(0.9 * 16) pruned
        0.125
    """
    s = _check_sparsity(sparsity)
    _check_scope(scope)
    block = _check_block(block)
    tensors = _check_tensors(tensors)
    if block is not None:
        return _block_masks(tensors, s, scope, block, clip_block)
    if scope == "global":
        n = sum(t.numel() for t in tensors)
        if n == 0:
            raise ValueError("tensors: the tensors hold no elements")
        _, masks = _ops.topk_abs_masks(tensors, [kth_index(s, n)], False)
    else:
        ks = [kth_index(s, t.numel()) if t.numel() else 0 for t in tensors]
        _, masks = _ops.topk_abs_masks(tensors, ks, True)
    return list(masks)


def _block_sizes(shape, block):
    """Weights in each block of a conv weight of ``shape`` (edge blocks are smaller), float64."""
    o, i, kh, kw = shape
    sizes = []
    for n, b in ((o, block[0]), (i, block[1])):
        full = torch.full((-(-n // b),), float(b), dtype=torch.float64)
        if full.numel():
            full[-1] = n - (full.numel() - 1) * b
        sizes.append(full)
    return sizes[0][:, None] * sizes[1][None, :] * (kh * kw)


def _weighted_threshold(scores, sizes, s):
    """The score of the block that holds weight number ceil(s * n) (0-based) when the blocks are
    sorted by ascending score and each spans its number of weights: SDCLR's rule, counted in
    weights. Blocks below it hold at most that many weights."""
    scores, sizes = torch.cat([x.reshape(-1) for x in scores]), torch.cat([x.reshape(-1) for x in sizes])
    ranked, order = torch.sort(scores, stable=True)
    ends = torch.cumsum(sizes.to(scores.device)[order], 0)  # weights up to and including each block
    k = kth_index(s, int(round(float(ends[-1]))))
    return ranked[torch.searchsorted(ends, torch.tensor([float(k)], dtype=ends.dtype, device=ends.device),
                                     right=True)].reshape(())


def _block_masks(tensors, s, scope, block, clip_block):
    for i, t in enumerate(tensors):
        if t.dim() != 4:
            raise ValueError(f"block masks need 4-d conv weights (O, I, kh, kw); tensors[{i}] has "
                             f"shape {tuple(t.shape)}")
        o, c = t.shape[:2]
        if not clip_block and t.numel() and block[0] > o and block[1] > c:
            raise ValueError(f"block {block[0]}x{block[1]} is larger than tensors[{i}] ({o} out x {c} in "
                             f"channels): the whole layer would be one block; choose a smaller block, or pass "
                             f"clip_block=True if that is meant")
    scores = [block_scores(t, block) for t in tensors]
    sizes = [_block_sizes(t.shape, block).to(sc.device) for t, sc in zip(tensors, scores)]
    if scope == "global":
        if sum(sc.numel() for sc in scores) == 0:
            raise ValueError("tensors: the tensors hold no elements")
        _check_finite_scores(scores)
        thresholds = [_weighted_threshold(scores, sizes, s)] * len(scores)
    else:
        _check_finite_scores(scores)
        thresholds = [_weighted_threshold([sc], [sz], s) if sc.numel() else None for sc, sz in zip(scores, sizes)]
    return [_expand_blocks(sc >= th if th is not None else torch.zeros_like(sc, dtype=torch.bool), t.shape, block)
            for sc, th, t in zip(scores, thresholds, tensors)]


def _check_finite_scores(scores):
    # NaN / inf weights give NaN / inf block means; the C++ ops check this for the unstructured rule
    for i, sc in enumerate(scores):
        if sc.numel() and not bool(torch.isfinite(sc).all()):
            raise ValueError(f"tensors[{i}] contains NaN or inf; magnitude pruning needs finite values")


# ---------------------------------------------------------------- models
def _patterns(arg, name):
    if arg is None:
        return None
    pats = [arg] if isinstance(arg, str) else list(arg)
    if not all(isinstance(p, str) for p in pats):
        raise ValueError(f"{name} must be a glob pattern or a list of glob patterns, got {arg!r}")
    return pats


def conv_weights(model, include=None, exclude=None):
    """``{parameter name: weight}`` of every nn.Conv2d (subclasses included, e.g. MaskedConv2d)
    of ``model``, in module order: SDCLR's pruning set (first conv and 1x1 shortcuts included,
    Linear heads and BatchNorm excluded).

    include / exclude: shell-style glob patterns (``fnmatch.fnmatchcase``, e.g. ``"layer4.*"``
    or ``"*shortcut*"``) matched against the parameter name; a weight is kept when it matches
    some include pattern (all do when include is None) and no exclude pattern. A conv already
    under ``torch.nn.utils.prune`` contributes its dense ``weight_orig`` under the name
    ``<module>.weight``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inc, exc = _patterns(include, "include"), _patterns(exclude, "exclude")
    out, seen = {}, set()
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, nn.Conv2d):
            continue
        w = getattr(mod, "weight_orig", None)
        if not isinstance(w, nn.Parameter):
            w = mod.weight
        if not isinstance(w, torch.Tensor) or w.dim() != 4 or id(w) in seen:
            continue
        name = f"{mod_name}.weight" if mod_name else "weight"
        if inc is not None and not any(fnmatch.fnmatchcase(name, p) for p in inc):
            continue
        if exc is not None and any(fnmatch.fnmatchcase(name, p) for p in exc):
            continue
        seen.add(id(w))
        out[name] = w
    return out


def prune_model(model, sparsity, scope="global", include=None, exclude=None, block=None, clip_block=False):
    """SDCLR's self-competitor masks for the conv weights of ``model``.

    The pruning set is `conv_weights` (every nn.Conv2d, first conv and 1x1 shortcuts
    included; Linear heads and BatchNorm excluded), filtered by the ``include`` / ``exclude``
    glob patterns. With the defaults this is the official rule: one global threshold over all
    conv weights.

    Args:
        model: an nn.Module.
        sparsity: the fraction to prune, a number in [0, 1).
        scope: ``"global"`` or ``"layer"``, as in `magnitude_masks`.
        include: glob pattern(s) (``fnmatch``, e.g. ``"layer4.*"``) a parameter name must match;
            None takes all.
        exclude: glob pattern(s) of parameter names left out.
        block: None or ``(bo, bi)`` channel blocks, as in `magnitude_masks`.
        clip_block: as in `magnitude_masks`.

    Returns:
        ``{parameter name: bool mask}`` in module order.

    Raises:
        ValueError: for a model that is not an nn.Module, no conv weights left after include /
            exclude, and what `magnitude_masks` refuses.

    Examples:
        >>> import sdclr_fast
        >>> model = sdclr_fast.resnet18(in_channels=3, width=8)
        >>> masks = sdclr_fast.prune_model(model, sparsity=0.9)
        >>> next(iter(masks))                      # the first conv is pruned too, as in SDCLR
        'conv1.weight'
    """
    weights = conv_weights(model, include, exclude)
    if not weights:
        raise ValueError("model: no nn.Conv2d weights to prune (after include/exclude)")
    masks = magnitude_masks(list(weights.values()), sparsity, scope=scope, block=block, clip_block=clip_block)
    return dict(zip(weights.keys(), masks))


def _smallest_abs(t, count):
    """Flat bool mask of exactly ``count`` entries of ``t`` with the smallest |t|, the entries
    ``torch.topk(t.abs().view(-1), count, largest=False)`` returns wherever that choice is unique:
    every |t| below the count-th smallest magnitude, then, only where that magnitude is tied, the
    first tied entries in index order (topk leaves the choice among ties unspecified)."""
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if count >= n:
        return torch.ones(n, dtype=torch.bool, device=flat.device)
    if flat.dtype not in _FLOAT_DTYPES:  # e.g. integer importance scores; exact below 2**53
        flat = flat.to(torch.float64)
    try:
        thr, (keep,) = _ops.topk_abs_masks([flat], [count], False)  # keep: |t| >= count-th smallest
    except ValueError as exc:
        if "NaN or inf" not in str(exc):
            raise
        raise ValueError("MagnitudePruning: the tensor to prune (or its importance_scores) "
                         "contains NaN or inf; magnitude pruning needs finite values") from exc
    drop = keep.logical_not_()
    missing = count - int(drop.sum())  # entries tied at the threshold that must go too
    if missing:
        tied = (flat.abs().to(thr.dtype) == thr).nonzero().reshape(-1)
        drop[tied[:missing]] = True
    return drop


class MagnitudePruning(torch_prune.BasePruningMethod):
    """A ``torch.nn.utils.prune`` method: ``prune.L1Unstructured`` computed with the C++ selection op.

    Exactly round(amount * n) entries (or ``amount`` entries for an int) with the smallest |w|
    are pruned, zeros included, with torch's own validation and rounding; where the cut falls
    inside a run of equal magnitudes, the first entries of the run in index order go. Iterative
    pruning (``PruningContainer``), ``importance_scores``, ``prune.remove`` and the
    ``weight_orig`` / ``weight_mask`` reparametrisation are torch's; only the selection runs in
    C++ instead of ``torch.topk``. SDCLR's own rule (ceil, ties kept) is `magnitude_masks`.

    Args:
        amount: an int >= 0 (a count) or a float in [0, 1] (a fraction).

    Raises:
        TypeError: from torch's validation, for an amount that is neither an int nor a float.
        ValueError: from torch's validation, for a negative amount, a fraction above 1 or a
            count above the number of entries; naming the tensor to prune when it holds NaN or
            inf.

    Examples:
        >>> import torch
        >>> from torch.nn.utils import prune
        >>> conv = torch.nn.Conv2d(4, 8, 3)
        >>> _ = MagnitudePruning.apply(conv, "weight", amount=0.5)
        >>> int(conv.weight_mask.sum())           # 288 weights, 144 kept
        144
        >>> _ = prune.remove(conv, "weight")      # torch's machinery from here on
    """

    PRUNING_TYPE = "unstructured"

    def __init__(self, amount):
        torch_prune._validate_pruning_amount_init(amount)
        self.amount = amount

    def compute_mask(self, t, default_mask):
        n = t.nelement()
        count = torch_prune._compute_nparams_toprune(self.amount, n)
        torch_prune._validate_pruning_amount(count, n)
        mask = default_mask.clone(memory_format=torch.contiguous_format)
        if count:
            mask.view(-1).masked_fill_(_smallest_abs(t, count), 0)
        return mask

    @classmethod
    def apply(cls, module, name, amount, importance_scores=None):
        return super().apply(module, name, amount=amount, importance_scores=importance_scores)


def global_magnitude_unstructured(parameters, amount, importance_scores=None):
    """``prune.global_unstructured(..., pruning_method=prune.L1Unstructured)`` on the C++ selection op.

    One selection pooled over all ``(module, name)`` pairs (over the entries not pruned yet),
    the masks applied with each module's reparametrisation (``weight_orig`` and
    ``weight_mask``), through torch's ``prune.global_unstructured`` with `MagnitudePruning`.

    Args:
        parameters: an iterable of ``(module, parameter name)`` pairs.
        amount: an int (a count) or a float in [0, 1] (a fraction of all their entries).
        importance_scores: optional ``{(module, name): tensor}`` of scores to rank by instead of
            the parameters themselves (torch's argument).

    Raises:
        TypeError: from torch's validation, for parameters that are not an iterable of pairs.
        ValueError: as `MagnitudePruning`.

    Examples:
        >>> import torch, sdclr_fast
        >>> model = sdclr_fast.resnet18(in_channels=3, width=8)
        >>> convs = [(m, "weight") for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        >>> sdclr_fast.global_magnitude_unstructured(convs, amount=0.9)
        >>> kept = sum(int(m.weight_mask.sum()) for m, _ in convs)
        >>> total = sum(m.weight_mask.numel() for m, _ in convs)
        >>> round(kept / total, 3)
        0.1
    """
    torch_prune.global_unstructured(parameters, pruning_method=MagnitudePruning,
                                    importance_scores=importance_scores, amount=amount)
