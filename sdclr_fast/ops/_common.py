"""Host helpers shared by the fused losses (ops/nt_xent.py, ops/info_nce.py): argument and
value checks, the L2-normalisation chain rule, the temperature constant, the kernels' index
keys and the distributed gather. Their wiring (custom ops, eager Function, routes, backend
choice) is in ops/_op.py."""
import functools
import math
import numbers

import torch

EPS = 1e-12  # F.normalize's eps: rows are divided by max(|z_i|, eps)
REDUCTIONS = ("mean", "sum", "none")
CPU_BLOCK_ELEMS = 1 << 21  # scores per row block of the PyTorch paths (8 MiB in fp32)


# ------------------------------------------------------------------ argument checks
def check_temperature(temperature, device=None, anchor="z1"):
    """Type, shape and device of `temperature`; a Python number must be finite and > 0."""
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1 or not temperature.dtype.is_floating_point:
            raise ValueError(f"temperature must be a number or a 1-element floating tensor, got "
                             f"shape {tuple(temperature.shape)} dtype {temperature.dtype}")
        if device is not None and temperature.device != device and \
                temperature.device.type != "cpu":
            raise ValueError(f"temperature is on {temperature.device} but {anchor} is on {device}")
    elif isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature must be a positive number or a 1-element tensor, got "
                         f"{temperature!r}")
    elif not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")


def check_matrix(name, t, what="2-d"):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be a {what} tensor, got shape {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_pair(a_name, a, b_name, b):
    """Two row matrices of one shape (at least one row and one column), device and dtype."""
    if a.shape != b.shape:
        raise ValueError(f"{a_name} and {b_name} must have the same shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{a_name} and {b_name} must hold at least one row and one column, "
                         f"got shape {tuple(a.shape)}")
    if b.device != a.device:
        raise ValueError(f"{b_name} is on {b.device} but {a_name} is on {a.device}")
    if b.dtype != a.dtype:
        raise ValueError(f"{b_name} has dtype {b.dtype} but {a_name} has dtype {a.dtype}")


def check_row_values(weights, labels, rows, form, label_lengths, label_form, anchor_name, anchor):
    """`weights` (rows,) floating on the anchor's device and `labels` 1-d integer of one of
    `label_lengths`, where given; form / label_form name the expected lengths."""
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (rows,):
            raise ValueError(f"weights must be a tensor of shape {form} = ({rows},), got "
                             f"{getattr(weights, 'shape', type(weights).__name__)}")
        if not weights.dtype.is_floating_point:
            raise ValueError(f"weights must be a floating-point tensor, got {weights.dtype}")
        if weights.device != anchor.device:
            raise ValueError(f"weights is on {weights.device} but {anchor_name} is on "
                             f"{anchor.device}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or \
                labels.shape[0] not in label_lengths:
            raise ValueError(f"labels must be a 1-d tensor of length {label_form}, "
                             f"got {getattr(labels, 'shape', type(labels).__name__)}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")


def check_flag(name, value):
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{name} must be True, False or None, got {value!r}")


def value_checked(check_finite, t):
    """Whether the values of tensor t are checked: check_finite=True always (a device sync on
    CUDA), False never, None where it costs nothing: a CPU tensor outside torch.compile (a
    compiled graph cannot branch on a value without a graph break) and torch.func transforms."""
    if check_finite is not None:
        return check_finite
    return (t.device.type == "cpu" and not torch.compiler.is_compiling()
            and not torch._C._functorch.is_functorch_wrapped_tensor(t))  # vmap: no values


def check_values(named, temperature, check_finite):
    """ValueError naming the first of `named` ((name, tensor) pairs) that holds NaN / inf, or a
    temperature tensor that is not finite and > 0; only the tensors value_checked() selects
    are read, with one host read for all of them."""
    named = [(n, t) for n, t in named if t is not None and value_checked(check_finite, t)]
    tau = temperature if isinstance(temperature, torch.Tensor) and \
        value_checked(check_finite, temperature) else None
    if not named and tau is None:
        return
    flags = [torch.isfinite(t.detach()).all().to(named[0][1].device if named else "cpu")
             for _, t in named]
    if tau is not None:
        t = tau.detach().reshape(())
        flags.append((torch.isfinite(t) & (t > 0)).to(flags[0].device if flags else t.device))
    ok = torch.stack(flags).tolist()
    for (name, _), good in zip(named, ok):
        if not good:
            raise ValueError(f"{name} holds NaN or inf values")
    if tau is not None and not ok[-1]:
        raise ValueError(f"temperature must be finite and > 0, got {tau.item()!r}")


# ------------------------------------------------------------------ shared math
def inv_norms(u, dtype):
    """1 / max(|u_i|, eps) in `dtype` (fp32 for 16-bit inputs), and the mask norm >= eps where
    the normalisation's gradient goes through the norm (F.normalize's clamp)."""
    norm = torch.linalg.vector_norm(u, dim=1, dtype=dtype)
    return 1.0 / norm.clamp_min(EPS), norm >= EPS


def chain(zh, dzh, r, through, normalize):
    """dL/du from dL/dzhat, zhat = r * u: r (dzhat - zhat (zhat . dzhat)) where the norm is at
    least eps (below it the norm is clamped and zhat = u / eps is linear in u). Out of place,
    so that it is differentiable again (the create_graph backward uses it too)."""
    if not normalize:
        return dzh
    proj = (zh * dzh).sum(1, keepdim=True) * through[:, None]
    return torch.addcmul(dzh, zh, proj, value=-1) * r[:, None]


def cpu_block(cols):
    return max(16, min(1024, CPU_BLOCK_ELEMS // max(cols, 1)))


@functools.lru_cache(maxsize=32)
def _const_inv_tau(tau_value, device, dtype):
    return torch.full((1,), 1.0 / tau_value, device=device, dtype=dtype)


def inv_tau_tensor(tau, tau_value, device, dtype):
    """1 / tau as a (1,) tensor of `dtype` on `device`: from the temperature tensor (detached:
    its gradient is the op's own), or for a Python number a cached constant (host time is what
    a small loss on a GPU waits for); under torch.compile a graph constant."""
    if tau is not None:
        return (1.0 / tau.detach().to(device=device, dtype=dtype)).reshape(1)
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        # a graph constant; inside a transform a new tensor may be wrapped for its level
        return torch.full((1,), 1.0 / tau_value, device=device, dtype=dtype)
    return _const_inv_tau(tau_value, device, dtype)


@functools.lru_cache(maxsize=16)
def _index_keys_cached(m, device, period):
    keys = torch.arange(m, device=device, dtype=torch.int32)
    return keys if period is None else keys.remainder_(period)


def index_keys(m, device, period=None):
    """torch.arange(m) as int32, modulo `period` where given: the kernels' positive keys without
    labels (row i pairs with column i, or with every row of the same index modulo `period`).
    Cached outside torch.compile: a read-only tensor that every step would build again."""
    if torch.compiler.is_compiling():
        keys = torch.arange(m, device=device, dtype=torch.int32)
        return keys if period is None else keys.remainder(period)
    return _index_keys_cached(m, device, period)


# ------------------------------------------------------------------ distributed
def dist_world(gather_distributed):
    """(rank, world size, group) when gather_distributed applies (initialised, world > 1), else
    None. gather_distributed: True (the default group) or a ProcessGroup (its ranks only: e.g.
    one DnC expert's group of ranks)."""
    if gather_distributed is None or gather_distributed is False:
        return None
    import torch.distributed as dist

    group = None if gather_distributed is True else gather_distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return None
    return dist.get_rank(group), dist.get_world_size(group), group


def all_gather_autograd(local, group=None):
    """Every rank's ``local`` (same shape everywhere) concatenated along dim 0 in rank order,
    through the functional collective (``torch.distributed.nn.functional.all_gather`` is
    deprecated): its backward is a sum-reduce-scatter, so each rank's rows get the sum of the
    gradients that all ranks put on them. ``group``: a process group (None: the default one)."""
    import torch.distributed as dist
    from torch.distributed import _functional_collectives as fc

    # torch >= 2.13 names it all_gather_single_autograd (and deprecates the older name)
    gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
    out = gather(local.contiguous(), 0, dist.group.WORLD if group is None else group)
    return fc.wait_tensor(out) if isinstance(out, fc.AsyncCollectiveTensor) else out


def check_same_rows(count, device, world, group, what):
    """ValueError unless every rank of the group has the same `count` (`what` names it)."""
    import torch.distributed as dist

    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([count], dtype=torch.int64, device=device), group=group)
    sizes = [int(s) for s in sizes]
    if any(s != count for s in sizes):
        raise ValueError(f"gather_distributed needs the same {what} on every rank, got {sizes}")


def gather_rows(local, rank, world, group=None, *, autograd=True):
    """[local; the other ranks' rows in rank order]: each rank's own rows come first. autograd:
    through `all_gather_autograd`, so the gradients of the other ranks' copies go back to their
    owners; else a plain all_gather (labels)."""
    if autograd:
        parts = all_gather_autograd(local, group).split(local.shape[0])
    else:
        import torch.distributed as dist

        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat([local] + [parts[q] for q in range(world) if q != rank])
