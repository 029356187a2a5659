"""Fused NT-Xent (normalised temperature-scaled cross-entropy), as SDCLR / SimCLR define it.

    z = L2-normalise([z1; z2])  (2N, D),   S = z z^T / tau,
    loss_i = -S[i, pos(i)] + logsumexp_{j != i} S[i, j],

with pos(i) = i +- N (the row's other view). Neither path stores the 2N x 2N matrix:

* CUDA fp32 / fp16 / bf16: Triton kernels (kernels/nt_xent.py). The forward keeps an online
  log-sum-exp per row; the backward recomputes the score tiles and, using the symmetry of S,
  produces each row's gradient in one pass without atomics. Extra memory: O(N) per-row
  statistics plus O(N D) for the gradient.
* everything else (CPU, float64): the same algorithm in PyTorch over blocks of rows
  (BLAS matmul of a row block against all rows, reduced and discarded); a block holds about
  2^21 scores (8 MiB in fp32) and at most two or three block temporaries live at once, so the
  extra memory is O(N D) plus a fixed ~25 MiB whatever N is.

Options beyond the plain loss:
* `labels` (N,) or (2N,) integers: multi-positive form (SupCon / index-based positives). Every
  other row with the same label is a positive, loss_i = logsumexp_{j != i} S_ij -
  mean_{p in pos(i)} S_ip; rows with no positive contribute 0 (and count in the mean).
  (N,) labels apply to both views.
* `weights` (2N,): per-row weights (differentiable), applied before the reduction.
* `temperature`: a Python number or a 1-element tensor. A tensor reaches the kernels through
  memory, so a temperature schedule recompiles nothing; one that requires grad gets its
  gradient (learnable temperature).
* `gather_distributed=True` under torch.distributed (initialised, world size > 1): negatives
  come from all ranks. Convention: every rank holds N local pairs (the same N everywhere);
  the rows are gathered with torch.distributed.nn.functional.all_gather, whose backward sums
  the gradients of all ranks; each rank returns the loss of its own 2N rows against all
  2N * world rows, reduced over its own rows ("mean" divides by 2N). The mean of the ranks'
  "mean" losses is the single-process loss of the concatenated batch
  [z1 of rank 0, z1 of rank 1, ...; z2 of rank 0, z2 of rank 1, ...], and the gradient that
  reaches each rank's z1 / z2 is world_size times the single-process gradient of those rows,
  so after DDP's gradient averaging (sum / world_size) the parameter gradients equal the
  single-process ones exactly. With "sum" the ranks' losses add up to the single-process sum
  and each z gets exactly the single-process gradient (DDP's averaging then divides by
  world_size); "none" returns the local rows' losses. `weights` and `labels` are the local
  ones; labels are gathered with the rows.

Checks: bad arguments raise ValueError naming the argument; z1 / z2 holding NaN or inf, and a
non-positive or non-finite temperature, are rejected too, which costs one device sync per call.
Under torch.compile the op is a graph break (the checks and the Triton launch run eagerly).

Testing switch: SDCLR_FAST_FORCE_TRITON=1 (read at call time) or `_backend="triton"` sends CPU
tensors through the Triton kernels too; set TRITON_INTERPRET=1 before Triton is imported so
that they run in the interpreter.
"""
import functools
import math
import os
import numbers

import torch
from torch import nn

__all__ = ["nt_xent", "NTXentLoss"]

_EPS = 1e-12  # F.normalize's eps: rows are divided by max(|z_i|, eps)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_REDUCTIONS = ("mean", "sum", "none")
_CPU_BLOCK_ELEMS = 1 << 21  # scores per row block of the PyTorch path (8 MiB in fp32)


def _kernels():
    # imported on first use so that CPU-only callers never load Triton; kernels/ is installed as
    # sdclr_fast.kernels (setup.py package_dir)
    from sdclr_fast.kernels import nt_xent as k

    return k


# ------------------------------------------------------------------ argument checks
def _check(z1, z2, temperature, normalize, reduction, weights, labels):
    for name, z in (("z1", z1), ("z2", z2)):
        if not isinstance(z, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() != 2:
            raise ValueError(f"{name} must be a 2-d (N, D) tensor, got shape {tuple(z.shape)}")
        if not z.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {z.dtype}")
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    n, d = z1.shape
    if n == 0 or d == 0:
        raise ValueError(f"z1 and z2 must hold at least one row and one column, got shape "
                         f"{tuple(z1.shape)}")
    if z2.device != z1.device:
        raise ValueError(f"z2 is on {z2.device} but z1 is on {z1.device}")
    if z2.dtype != z1.dtype:
        raise ValueError(f"z2 has dtype {z2.dtype} but z1 has dtype {z1.dtype}")
    if not isinstance(normalize, bool):
        raise ValueError(f"normalize must be a bool, got {normalize!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")

    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1 or not temperature.dtype.is_floating_point:
            raise ValueError(f"temperature must be a number or a 1-element floating tensor, got "
                             f"shape {tuple(temperature.shape)} dtype {temperature.dtype}")
        if temperature.device != z1.device and temperature.device.type != "cpu":
            raise ValueError(f"temperature is on {temperature.device} but z1 is on {z1.device}")
    elif isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature must be a positive number or a 1-element tensor, got "
                         f"{temperature!r}")
    elif not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")

    if weights is not None:
        if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (2 * n,):
            raise ValueError(f"weights must be a tensor of shape (2N,) = ({2 * n},), got "
                             f"{getattr(weights, 'shape', type(weights).__name__)}")
        if not weights.dtype.is_floating_point:
            raise ValueError(f"weights must be a floating-point tensor, got {weights.dtype}")
        if weights.device != z1.device:
            raise ValueError(f"weights is on {weights.device} but z1 is on {z1.device}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or \
                labels.shape[0] not in (n, 2 * n):
            raise ValueError(f"labels must be a 1-d tensor of length N = {n} or 2N = {2 * n}, "
                             f"got {getattr(labels, 'shape', type(labels).__name__)}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")


def _check_values(z1, z2, u, temperature):
    """NaN/inf in z1 or z2 (u = [z1; z2]), or a non-positive temperature tensor: ValueError.
    One pass over the rows and one host sync; which input is bad is worked out on failure."""
    flags = [torch.isfinite(u.detach()).all()]
    tau_on_dev = isinstance(temperature, torch.Tensor) and temperature.device == z1.device
    if tau_on_dev:
        t = temperature.detach().reshape(())
        flags.append(torch.isfinite(t) & (t > 0))
    ok = torch.stack(flags).tolist() if tau_on_dev else [bool(flags[0])]
    if not ok[0]:
        name = "z1" if not bool(torch.isfinite(z1).all()) else "z2"
        raise ValueError(f"{name} holds NaN or inf values")
    if isinstance(temperature, torch.Tensor):
        good = ok[1] if tau_on_dev else bool(
            torch.isfinite(temperature).all() and (temperature > 0).all())
        if not good:
            raise ValueError(f"temperature must be finite and > 0, got {temperature.item()!r}")


# ------------------------------------------------------------------ shared math
def _inv_norms(u, dtype):
    """1 / max(|u_i|, eps) in `dtype` (fp32 for 16-bit inputs), and the mask norm >= eps where
    the normalisation's gradient goes through the norm (F.normalize's clamp)."""
    norm = torch.linalg.vector_norm(u, dim=1, dtype=dtype)
    return 1.0 / norm.clamp_min(_EPS), norm >= _EPS


def _chain(zh, dzh, r, through_norm, normalize):
    """dL/du from dL/dzhat, zhat = r * u: r (dzhat - zhat (zhat . dzhat)) where the norm is
    above eps (below it the norm is clamped and zhat = u / eps is linear in u)."""
    if not normalize:
        return dzh
    proj = (zh * dzh).sum(1, keepdim=True).mul_(through_norm[:, None])
    return torch.addcmul(dzh, zh, proj, value=-1).mul_(r[:, None])


# Small read-only tensors that every step would otherwise build again (host time is what a
# small loss on a GPU waits for): 1 / tau for a Python-float temperature, and the two-view keys.
@functools.lru_cache(maxsize=16)
def _const_inv_tau(tau_value, device):
    return torch.full((1,), 1.0 / tau_value, device=device, dtype=torch.float32)


@functools.lru_cache(maxsize=8)
def _pair_keys(m, half, device):
    return torch.arange(m, device=device, dtype=torch.int32).remainder_(half)


def _cpu_block(m):
    return max(16, min(1024, _CPU_BLOCK_ELEMS // max(m, 1)))


# exp(S - shift) summed over a row below this means the fixed shift lost precision to underflow
_UNDERFLOW = {torch.float32: 1e-20, torch.float64: 1e-200}


def _torch_forward(zh, inv_tau, R, keys, normalize):
    """PyTorch path over row blocks. zh: (M, D) normalised rows; keys None = two-view pairs
    (row i < R pairs with (i + R/2) mod R). Returns loss (R,), lse (M,) (+inf beyond R),
    cnt (R,).

    Each pass over a (B, M) block costs about half a matmul on a CPU, so passes are saved:
    1/tau is folded into one operand of the matmul, and with normalised rows S <= 1/tau lets
    the log-sum-exp use the fixed shift 1/tau instead of a row max (rows whose sum underflows
    are redone with torch.logsumexp)."""
    M = zh.shape[0]
    dt = zh.dtype
    zs = zh * inv_tau
    loss = torch.empty(R, dtype=dt, device=zh.device)
    lse = torch.full((M,), float("inf"), dtype=dt, device=zh.device)
    cnt = torch.ones(R, dtype=torch.int64, device=zh.device)
    B = _cpu_block(M)
    half = R // 2
    for s in range(0, R, B):
        e = min(s + B, R)
        S = torch.mm(zs[s:e], zh.t())
        S.diagonal(offset=s).fill_(float("-inf"))
        if keys is None:
            rows = torch.arange(s, e, device=zh.device)
            pos = torch.where(rows < half, rows + half, rows - half)
            pos_term = S.gather(1, pos[:, None]).squeeze(1)
        else:
            same = keys[s:e, None] == keys[None, :]
            same.diagonal(offset=s).fill_(False)
            c = same.sum(1)
            psum = torch.where(same, S, torch.zeros((), dtype=dt, device=zh.device)).sum(1)
            pos_term = psum / c.clamp_min(1)
            cnt[s:e] = c
            del same
        if normalize:
            total = S.sub_(inv_tau).exp_().sum(1)
            bad = (total < _UNDERFLOW[dt]).nonzero().squeeze(1)
            lse_b = total.log_().add_(inv_tau)
            if bad.numel():
                redo = torch.mm(zs[s + bad], zh.t())
                redo[torch.arange(bad.numel(), device=zh.device), s + bad] = float("-inf")
                lse_b[bad] = torch.logsumexp(redo, dim=1)
        else:
            lse_b = torch.logsumexp(S, dim=1)
        del S
        lse[s:e] = lse_b
        loss_b = lse_b - pos_term
        if keys is not None:
            loss_b = torch.where(cnt[s:e] > 0, loss_b, torch.zeros_like(loss_b))
        loss[s:e] = loss_b
    return loss, lse, cnt


def _torch_backward(zh, inv_tau, R, keys, lse, g, gy):
    """dL/dzhat (M, D) by row blocks: dzhat_k = (1/tau) sum_j A_kj zhat_j with
    A_kj = g_k P_kj + g_j P_jk - [j in pos(k)] (gy_k + gy_j).

    With g >= 0 (the usual case) g_k P_kj = exp(S_kj - (lse_k - log g_k)), which saves two
    passes over each block."""
    M = zh.shape[0]
    zs = zh * inv_tau
    dzh = torch.empty_like(zh)
    B = _cpu_block(M)
    half = R // 2
    folded = bool((g >= 0).all())
    if folded:
        c = lse - torch.log(g)  # g = 0 -> +inf -> exp(-inf) = 0
    for s in range(0, M, B):
        e = min(s + B, M)
        ncol = M if s < R else R  # rows past R only pair with the query rows
        S = torch.mm(zs[s:e], zh[:ncol].t())
        if folded:
            A = S.sub_(c[None, :ncol]).exp_() if s >= R else None
            if s < R:
                A = torch.sub(S, c[s:e, None]).exp_()
                A.add_(S.sub_(c[None, :ncol]).exp_())
        else:
            A = S.sub(lse[None, :ncol]).exp_().mul_(g[None, :ncol])
            if s < R:
                A.add_(S.sub_(lse[s:e, None]).exp_().mul_(g[s:e, None]))
        del S
        A.diagonal(offset=s).zero_()
        if keys is None:
            q = min(e, R)
            if q > s:
                rows = torch.arange(s, q, device=zh.device)
                pos = torch.where(rows < half, rows + half, rows - half)
                A.index_put_((rows - s, pos), -(g[s:q] + g[pos]), accumulate=True)
        else:
            same = keys[s:e, None] == keys[None, :ncol]
            same.diagonal(offset=s).fill_(False)
            A.sub_(torch.where(same, gy[s:e, None] + gy[None, :ncol],
                               torch.zeros((), dtype=A.dtype, device=A.device)))
        torch.mm(A, zs[:ncol], out=dzh[s:e])
    return dzh


# ------------------------------------------------------------------ autograd
class _NTXentRows(torch.autograd.Function):
    """Unweighted per-row losses of the first R rows of u (M, D) against all M rows.

    keys: (M,) int keys (row j is a positive of row i iff keys equal, j != i), or None for the
    two-view pairing of the first R rows (i <-> (i + R/2) mod R) with no positives beyond R.
    tau: the temperature tensor (possibly requiring grad) or None, then tau_value is used."""

    @staticmethod
    def forward(ctx, u, tau, tau_value, keys, R, normalize, use_triton, block_d):
        M = u.shape[0]
        # Two views in one process: every row has exactly one positive (cnt = 1), which saves
        # the backward five small ops.
        ctx.one_positive = keys is None and M == R
        if use_triton:
            k = _kernels()
            if tau is not None:
                inv_tau = (1.0 / tau.detach().to(device=u.device, dtype=torch.float32)).reshape(1)
            else:
                inv_tau = _const_inv_tau(tau_value, u.device)
            if keys is None:  # the pair index is the key: row i and row i + R/2 share it
                keys = _pair_keys(M, R // 2, u.device)
            keys = keys.to(torch.int32).contiguous()
            u = u.contiguous()
            r, through = _inv_norms(u, torch.float32)
            loss, lse, cnt = k.forward(u, r, keys, inv_tau, R, normalize, block_d)
            ctx.save_for_backward(u, r, through, keys, inv_tau, lse, cnt, tau)
        else:
            cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
            tv = float(tau.detach()) if tau is not None else tau_value
            r, through = _inv_norms(u, cdt)
            zh = u.to(cdt) / r.reciprocal()[:, None] if normalize else u.to(cdt)
            loss, lse, cnt = _torch_forward(zh, 1.0 / tv, R, keys, normalize)
            ctx.save_for_backward(zh, r, through, keys, None, lse, cnt, tau)
            ctx.tau_value = tv
        ctx.conf = (R, normalize, use_triton, block_d, u.dtype)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        x, r, through, keys, inv_tau, lse, cnt, tau = ctx.saved_tensors
        R, normalize, use_triton, block_d, dtype = ctx.conf
        M = x.shape[0]
        if ctx.one_positive:
            g = gy = grad_loss.to(lse.dtype).contiguous()
        else:
            g = torch.zeros(M, dtype=lse.dtype, device=lse.device)
            g[:R] = torch.where(cnt > 0, grad_loss.to(lse.dtype), torch.zeros_like(g[:R]))
            gy = g.clone()
            gy[:R] /= cnt.clamp_min(1)
        if use_triton:
            dzh = _kernels().backward(x, r, keys, inv_tau, lse, g, gy, R, normalize, block_d)
            zh = x.float() * r[:, None] if normalize else x.float()
            tau_value = None
        else:
            zh = x
            tau_value = ctx.tau_value
            dzh = _torch_backward(zh, 1.0 / tau_value, R, keys, lse, g, gy)
        grad_tau = None
        if tau is not None and ctx.needs_input_grad[1]:
            # sum_k zhat_k . dzhat_k = 2 sum_ij G_ij S_ij and dS/dtau = -S/tau.
            tv = tau.detach().to(zh) if tau_value is None else tau_value
            grad_tau = (-(zh * dzh).sum() / (2 * tv)).to(tau).reshape(tau.shape)  # tau's device
        grad_u = None
        if ctx.needs_input_grad[0]:
            grad_u = _chain(zh, dzh, r.to(zh.dtype), through, normalize).to(dtype)
        return grad_u, grad_tau, None, None, None, None, None, None


# ------------------------------------------------------------------ distributed gather
def _dist_world(gather_distributed):
    if not gather_distributed:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return dist.get_rank(), dist.get_world_size()


def _gather_rows(z1, local, labels, rank, world):
    """Local rows ([z1; z2]) first, then the other ranks' rows; keys = global pair index or
    label."""
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_nn

    n = z1.shape[0]
    sizes = [torch.zeros(1, dtype=torch.int64, device=z1.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.int64, device=z1.device))
    sizes = [int(s) for s in sizes]
    if any(s != n for s in sizes):
        raise ValueError(f"gather_distributed needs the same N on every rank, got {sizes}")
    gathered = dist_nn.all_gather(local)  # backward: sum of all ranks' gradients
    u = torch.cat([local] + [gathered[q] for q in range(world) if q != rank])
    order = [rank] + [q for q in range(world) if q != rank]
    if labels is None:
        pair = torch.arange(n, device=z1.device)
        keys = torch.cat([torch.cat([pair + q * n, pair + q * n]) for q in order])
    else:
        lab = labels.to(z1.device).long()
        lab = torch.cat([lab, lab]) if lab.shape[0] == n else lab
        lab = lab.contiguous()
        all_lab = [torch.empty_like(lab) for _ in range(world)]
        dist.all_gather(all_lab, lab)
        keys = torch.cat([all_lab[q] for q in order])
    return u, keys


def _dense_keys(keys):
    """Labels of any integer range as int32 ids < M (for the kernels)."""
    return torch.unique(keys, return_inverse=True)[1].to(torch.int32)


# ------------------------------------------------------------------ public API
def _use_triton(z, backend):
    if backend == "torch":
        return False
    if backend == "triton" or os.environ.get("SDCLR_FAST_FORCE_TRITON", "0") == "1":
        if z.dtype not in _TRITON_DTYPES:
            raise ValueError(f"the Triton kernels take z1/z2 of dtype float32/float16/bfloat16, "
                             f"got {z.dtype}")
        return True
    if backend != "auto":
        raise ValueError(f"_backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    return z.is_cuda and z.dtype in _TRITON_DTYPES


def nt_xent(z1, z2, temperature=0.2, *, normalize=True, reduction="mean", weights=None,
            labels=None, gather_distributed=False, _backend="auto", _block_d=None):
    """NT-Xent loss of two views z1, z2 (N, D) without the 2N x 2N similarity matrix.

    Returns a scalar ("mean" over the 2N rows, or "sum") or the 2N per-row losses ("none",
    rows of z1 first), in the dtype of z1. See the module docstring for labels, weights,
    temperature tensors and the distributed convention. The value and gradients equal
    `sdclr_fast.ops.reference.nt_xent_reference`."""
    _check(z1, z2, temperature, normalize, reduction, weights, labels)
    use_triton = _use_triton(z1, _backend)
    world = _dist_world(gather_distributed)
    n = z1.shape[0]
    u = torch.cat([z1, z2])
    _check_values(z1, z2, u, temperature)
    if world is not None:
        u, keys = _gather_rows(z1, u, labels, *world)
        if labels is None and not use_triton:
            keys = None  # the PyTorch path pairs the leading local rows by index
    else:
        keys = None
        if labels is not None:
            lab = labels.to(z1.device)
            keys = torch.cat([lab, lab]) if lab.shape[0] == n else lab
    if keys is not None:
        keys = _dense_keys(keys)
    tau = temperature if isinstance(temperature, torch.Tensor) else None
    tau_value = None if tau is not None else float(temperature)
    rows = _NTXentRows.apply(u, tau, tau_value, keys, 2 * n, normalize, use_triton, _block_d)
    if weights is not None:
        rows = rows * weights.to(rows.dtype)
    if reduction == "none":
        out = rows
    elif reduction == "sum":
        out = rows.sum()
    else:
        out = rows.mean()
    return out.to(z1.dtype)


class NTXentLoss(nn.Module):
    """Module form of `nt_xent`: `NTXentLoss(temperature, normalize=..., reduction=...,
    gather_distributed=...)(z1, z2, weights=None, labels=None)`.

    A tensor temperature is kept as a buffer (an nn.Parameter as a learnable parameter)."""

    def __init__(self, temperature=0.2, *, normalize=True, reduction="mean",
                 gather_distributed=False):
        super().__init__()
        if isinstance(temperature, torch.Tensor) and not isinstance(temperature, nn.Parameter):
            self.register_buffer("temperature", temperature)
        else:
            self.temperature = temperature
        self.normalize = normalize
        self.reduction = reduction
        self.gather_distributed = gather_distributed

    def forward(self, z1, z2, weights=None, labels=None):
        return nt_xent(z1, z2, self.temperature, normalize=self.normalize,
                       reduction=self.reduction, weights=weights, labels=labels,
                       gather_distributed=self.gather_distributed)

    def extra_repr(self):
        t = self.temperature
        t = f"{t.item():g}" if isinstance(t, torch.Tensor) else f"{t:g}"
        return (f"temperature={t}, normalize={self.normalize}, reduction={self.reduction!r}, "
                f"gather_distributed={self.gather_distributed}")
