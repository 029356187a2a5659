"""Fused NT-Xent (normalised temperature-scaled cross-entropy), as SDCLR / SimCLR define it.

    z = L2-normalise([z1; z2])  (2N, D),   S = z z^T / tau,
    loss_i = -S[i, pos(i)] + logsumexp_{j != i} S[i, j],

with pos(i) = i +- N (the row's other view). A row whose only column is its positive (N = 1)
gives exactly 0 on every path. Neither path stores the 2N x 2N matrix:

* CUDA fp32 / fp16 / bf16: Triton kernels (kernels/nt_xent.py). The forward keeps an online
  log-sum-exp per row; the backward recomputes the score tiles and, using the symmetry of S,
  produces each row's gradient in one pass without atomics. Where the row blocks alone would
  leave SMs idle (small 2N) the columns are split across programs and the partial results
  merged in a fixed order (deterministic). Extra memory: O(N) per-row statistics plus O(N D)
  for the gradient (times the split count, which keeps 2N x splits below ~17k rows).
* everything else (CPU, float64): the same algorithm in PyTorch over blocks of rows
  (BLAS matmul of a row block against all rows, reduced and discarded); a block holds about
  2^21 scores (8 MiB in fp32) and at most two or three block temporaries live at once, so the
  extra memory is O(N D) plus a fixed ~25 MiB whatever N is.

Options beyond the plain loss:
* `labels` (N,) or (2N,) integers: multi-positive form (SupCon / index-based positives). Every
  other row with the same label is a positive; (N,) labels apply to both views.
  multi_positive="out" (default): loss_i = logsumexp_{j != i} S_ij - mean_{p in pos(i)} S_ip
  (SupCon's L_out); "in": loss_i = logsumexp_{j != i} S_ij - logsumexp_{p in pos(i)} S_ip
  (the positives' probabilities summed inside the log, solo-learn's simclr_loss_func). Rows
  with no positive contribute 0 (and count in the mean). Without labels both are the
  two-view loss.
* one matrix: `nt_xent(z, labels=idx)` with z (M, D) holding any number of views (M odd
  allowed) and idx (M,): rows with equal idx are positives of each other, all other rows
  negatives, self excluded (solo-learn's `simclr_loss_func(z, indexes, temperature)` with
  multi_positive="in"). weights are then (M,).
* `weights` (2N,): per-row weights (differentiable), applied before the reduction.
* `temperature`: a Python number or a 1-element tensor. A tensor reaches the kernels through
  memory, so a temperature schedule recompiles nothing; one that requires grad gets its
  gradient (learnable temperature).
* `gather_distributed=True` under torch.distributed (initialised, world size > 1): negatives
  come from all ranks (a ProcessGroup instead of True: from that group's ranks only).
  Convention: every rank holds N local pairs (the same N everywhere);
  the rows are gathered with the functional collective all_gather, whose backward sums
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

Autograd beyond first order: the backward is the fused one, except when it runs under
create_graph=True (double backward, Hessian-vector products): it then returns the gradient of
a differentiable PyTorch formulation over the materialised (M, M) score matrix (O(M^2)
memory), so higher derivatives are exact on every path. torch.func transforms (grad, jacrev,
jacfwd, jvp, vmap, hessian) and forward-mode AD (torch.autograd.forward_ad) run that
formulation directly: no host reads (the NaN/inf and temperature-value checks are skipped,
non-finite input gives NaN) and no data-dependent shapes, so vmap over a batch of
independent problems works; gather_distributed=True is refused there.

Checks: bad arguments raise ValueError naming the argument. Values (NaN / inf in z1 / z2, a
temperature tensor that is not finite and > 0) follow `check_finite`: None (default) checks
where it costs nothing (CPU tensors outside torch.compile; a Python temperature always), True
always (a device sync on CUDA), False never. So the eager CUDA default issues no host sync;
non-finite input then gives a NaN loss. The PyTorch path itself reads two values per call
(a rare-overflow redo and a sign test in the backward): free on CPU, a sync for float64 CUDA.

torch.compile: the per-row losses are custom ops (sdclr_fast::nt_xent_fwd / nt_xent_bwd, and
nt_xent_fwd_triton / nt_xent_bwd_triton as torch.library.triton_op with wrap_triton launches,
so Inductor sees the kernels) with fake implementations and a registered autograd formula;
a compiled function calling nt_xent has no graph break, and a temperature tensor whose value
changes recompiles nothing (a new Python temperature is a new constant: it recompiles).
Routed around the custom ops in Python: torch.func transforms / forward AD (the dense
formulation above), double backward (the create_graph branch of the registered backward, eager
only), gather_distributed (the gather runs before the op, eager; it reads the row counts).

NTXentLoss takes lightly's positional order (temperature, memory_bank_size,
gather_distributed) and its memory-bank loss; see its docstring.

Testing switch: SDCLR_FAST_FORCE_TRITON=1 (read at call time) or `_backend="triton"` sends CPU
tensors through the Triton kernels too; set TRITON_INTERPRET=1 before Triton is imported so
that they run in the interpreter.
"""
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from ._common import EPS as _EPS, REDUCTIONS as _REDUCTIONS
from ._common import chain as _chain, check_flag, check_matrix, check_pair, check_row_values, \
    check_temperature as _check_temperature
from ._common import (check_same_rows, check_values, cpu_block as _cpu_block,
                      dist_world as _dist_world, gather_rows, index_keys)
from ._common import inv_norms as _inv_norms, inv_tau_tensor
from ._op import FusedLoss, compute_dtype, kernels, reduce_rows, transformed, use_triton

__all__ = ["nt_xent", "NTXentLoss"]

_MULTI_POSITIVE = ("out", "in")


def _kernels():
    return kernels("nt_xent")


# ------------------------------------------------------------------ argument checks
def _check_options(normalize, reduction, multi_positive):
    if not isinstance(normalize, bool):
        raise ValueError(f"normalize must be a bool, got {normalize!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if multi_positive not in _MULTI_POSITIVE:
        raise ValueError(f"multi_positive must be one of {_MULTI_POSITIVE}, got "
                         f"{multi_positive!r}")


def _check(z1, z2, temperature, normalize, reduction, weights, labels, multi_positive):
    """Returns the number of rows whose losses are computed: 2N (two views) or M (one matrix)."""
    single = z2 is None
    if not single and not isinstance(z2, torch.Tensor):
        raise ValueError(f"z2 must be a torch.Tensor (N, D) or None (one matrix z1 with labels), "
                         f"got {type(z2).__name__}; in the one-matrix form pass the temperature "
                         f"by keyword: nt_xent(z, temperature=0.1, labels=idx)")
    for name, z in (("z1", z1),) if single else (("z1", z1), ("z2", z2)):
        check_matrix(name, z, "2-d (N, D)")
    if single:
        m, d = z1.shape
        if labels is None:
            raise ValueError("labels must be given with one matrix z1 (M, D) and z2=None: rows "
                             "with equal labels are positives of each other")
        if m < 2 or d == 0:
            raise ValueError(f"z1 must hold at least two rows and one column in the one-matrix "
                             f"form, got shape {tuple(z1.shape)}")
        rows, label_lengths, what = m, (m,), f"M = {m}"
    else:
        check_pair("z1", z1, "z2", z2)
        n = z1.shape[0]
        rows, label_lengths, what = 2 * n, (n, 2 * n), f"N = {n} or 2N = {2 * n}"
    _check_options(normalize, reduction, multi_positive)
    _check_temperature(temperature, z1.device)

    check_row_values(weights, labels, rows, "(M,)" if single else "(2N,)", label_lengths, what,
                     "z1", z1)
    return rows


# ------------------------------------------------------------------ shared math
# exp(S - shift) summed over a row below this means the fixed shift lost precision to underflow
_UNDERFLOW = {torch.float32: 1e-20, torch.float64: 1e-200}


def _torch_forward(zh, inv_tau, R, keys, normalize, pos_lse=False):
    """PyTorch path over row blocks. zh: (M, D) normalised rows; keys None = two-view pairs
    (row i < R pairs with (i + R/2) mod R). pos_lse: the "in" form (log-sum-exp over the
    positives). Returns loss (R,), lse (M,) (+inf beyond R), cnt (R,), and lsep (M,) (+inf
    where a row has no positive and beyond R) or None.

    Each pass over a (B, M) block costs about half a matmul on a CPU, so passes are saved:
    1/tau is folded into one operand of the matmul, and with normalised rows the log-sum-exp
    is shifted by the row's positive term (its positive score, the mean of its positives, or
    their max for "in") instead of a row max: sum_j exp(S_ij - shift) >= 1 cannot underflow,
    and loss_i = log of that sum is exactly 0 when the positive is the row's only column.
    Rows whose sum overflows (a negative above the positive by more than the float range),
    and rows without positives (shift 1/tau >= S) whose sum underflows, are redone with
    torch.logsumexp."""
    M = zh.shape[0]
    dt = zh.dtype
    dev = zh.device
    zs = zh * inv_tau
    loss = torch.empty(R, dtype=dt, device=dev)
    lse = torch.full((M,), float("inf"), dtype=dt, device=dev)
    lsep = torch.full((M,), float("inf"), dtype=dt, device=dev) if pos_lse else None
    cnt = torch.ones(R, dtype=torch.int64, device=dev)
    B = _cpu_block(M)
    half = R // 2
    for s in range(0, R, B):
        e = min(s + B, R)
        S = torch.mm(zs[s:e], zh.t())
        S.diagonal(offset=s).fill_(float("-inf"))
        has = Sp = None
        if keys is None:
            rows = torch.arange(s, e, device=dev)
            pos = torch.where(rows < half, rows + half, rows - half)
            pos_term = S.gather(1, pos[:, None]).squeeze(1)
        else:
            same = keys[s:e, None] == keys[None, :]
            same.diagonal(offset=s).fill_(False)
            c = same.sum(1)
            cnt[s:e] = c
            has = c > 0
            if pos_lse:
                Sp = torch.where(same, S, torch.full((), float("-inf"), dtype=dt, device=dev))
                pos_term = Sp.amax(1)  # -inf for rows without positives
            else:
                psum = torch.where(same, S, torch.zeros((), dtype=dt, device=dev)).sum(1)
                pos_term = psum / c.clamp_min(1)
            del same
        if normalize:
            shift = pos_term if has is None else torch.where(has, pos_term, inv_tau)
            if pos_lse:
                lsep_b = Sp.sub_(shift[:, None]).exp_().sum(1).log_()  # 0 .. log(count)
            total = S.sub_(shift[:, None]).exp_().sum(1)
            bad = (total < _UNDERFLOW[dt]) | (total == float("inf"))
            loss_b = total.log_()
            lse_b = loss_b + shift
            if pos_lse:
                loss_b = loss_b - lsep_b
                lsep_b = lsep_b.add_(shift)
            if bool(bad.any()):  # rare: redo the block with a row max (no data-dependent shapes)
                redo = torch.mm(zs[s:e], zh.t())
                redo.diagonal(offset=s).fill_(float("-inf"))
                lse_r = torch.logsumexp(redo, dim=1)
                lse_b = torch.where(bad, lse_r, lse_b)
                loss_b = torch.where(bad, lse_r - (lsep_b if pos_lse else pos_term), loss_b)
        else:
            lse_b = torch.logsumexp(S, dim=1)
            if pos_lse:
                lsep_b = torch.logsumexp(Sp.masked_fill_(~has[:, None], 0.0), dim=1)
                loss_b = lse_b - lsep_b
            else:
                loss_b = lse_b - pos_term
        del S, Sp
        lse[s:e] = lse_b
        if has is not None:
            loss_b = torch.where(has, loss_b, torch.zeros_like(loss_b))
            if pos_lse:
                lsep[s:e] = torch.where(has, lsep_b, torch.full_like(lsep_b, float("inf")))
        loss[s:e] = loss_b
    return loss, lse, cnt, lsep


def _torch_backward(zh, inv_tau, R, keys, lse, g, gpos, lsep=None):
    """dL/dzhat (M, D) by row blocks: dzhat_k = (1/tau) sum_j A_kj zhat_j with
    A_kj = g_k P_kj + g_j P_jk - [j in pos(k)] (gpos_k + gpos_j)   ("out"; the two-view loss),
    A_kj = g_k P_kj + g_j P_jk - [j in pos(k)] (g_k Q_kj + g_j Q_jk)   ("in", lsep given),
    with P_ij = exp(S_ij - lse_i) and Q_ij = exp(S_ij - lsep_i).

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
        same = Q = None
        if keys is not None:
            same = keys[s:e, None] == keys[None, :ncol]
            same.diagonal(offset=s).fill_(False)
            if lsep is not None:  # before S is overwritten below
                Sp = S.masked_fill(~same, float("-inf"))
                Q = torch.sub(Sp, lsep[s:e, None]).exp_().mul_(g[s:e, None])
                Q.add_(Sp.sub_(lsep[None, :ncol]).exp_().mul_(g[None, :ncol]))
                del Sp
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
        elif Q is not None:
            A.sub_(Q)
        else:
            A.sub_(torch.where(same, gpos[s:e, None] + gpos[None, :ncol],
                               torch.zeros((), dtype=A.dtype, device=A.device)))
        torch.mm(A, zs[:ncol], out=dzh[s:e])
    return dzh


def _rows_dense(u, tau, inv_tau, keys, R, normalize, block_d, pos_lse, one_positive):
    """The per-row losses of the custom ops (same arguments) in differentiable PyTorch ops over
    the whole (R, M) score matrix: the route of torch.func transforms and forward-mode AD, and
    the backward when create_graph=True (double backward). O(R M) memory; no host reads, no
    data-dependent shapes, so vmap, jvp and higher derivatives see plain PyTorch ops."""
    cdt = compute_dtype(u)
    z = u.to(cdt)
    if normalize:
        z = F.normalize(z, dim=1, eps=_EPS)
    S = z[:R] @ z.t()
    if tau is not None:
        S = S / tau.to(device=z.device, dtype=cdt).reshape(())
    else:  # a Python temperature: 1 / value as a (1,) tensor
        S = S * inv_tau.to(device=z.device, dtype=cdt)
    eye = torch.eye(R, z.shape[0], dtype=torch.bool, device=z.device)
    lse = torch.logsumexp(S.masked_fill(eye, float("-inf")), dim=1)
    if keys is None or one_positive:  # two views: row i's positive is row (i + R/2) mod R
        idx = torch.arange(R, device=z.device)
        return lse - S.gather(1, ((idx + R // 2) % R)[:, None]).squeeze(1)
    keys = keys.to(z.device)
    same = (keys[:R, None] == keys[None, :]) & ~eye
    cnt = same.sum(1)
    has = cnt > 0
    if pos_lse:
        # rows without positives get a finite placeholder: where() must not see NaN gradients
        pos = torch.logsumexp(S.masked_fill(~same, float("-inf")).masked_fill(~has[:, None], 0.0),
                              dim=1)
    else:
        pos = (S * same).sum(1) / cnt.clamp_min(1)
    return torch.where(has, lse - pos, torch.zeros_like(lse))


# ------------------------------------------------------------------ custom ops
# The per-row losses, filled into the shared wiring of ops/_op.py (FusedLoss): the custom ops
# sdclr_fast::nt_xent_fwd / _bwd (PyTorch path) and nt_xent_fwd_triton / _bwd_triton (the
# kernels), their eager autograd.Function, and the dense formulation _rows_dense. Inputs:
#   u (M, D): the rows; losses of the first R against all M.
#   tau: the temperature tensor (only for its gradient) or None; inv_tau: 1 / tau as a (1,)
#     tensor (fp32 for the kernels, the compute dtype otherwise).
#   keys (M,) integers: row j is a positive of row i iff keys equal, j != i; None for the
#     two-view pairing i <-> (i + R/2) mod R with no positives beyond R (PyTorch path only;
#     the kernels get the pair index as keys).
#   pos_lse: the "in" multi-positive form; one_positive: two views, every query row has exactly one
#     positive, its other view among the R local rows (any other rank's rows follow), which
#     saves the backward five small ops and takes the PAIRED kernels.
# Outputs: loss (R,), then the backward's statistics: lse (M,), cnt (R,), lsep (M,) (empty
# without pos_lse), and the inverse row norms r with the mask through (norm >= eps).
def _fwd_torch(u: torch.Tensor, tau: torch.Tensor | None, inv_tau: torch.Tensor,
               keys: torch.Tensor | None, R: int, normalize: bool, block_d: int | None,
               pos_lse: bool, one_positive: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                             torch.Tensor, torch.Tensor,
                                                             torch.Tensor, torch.Tensor]:
    r, through = _inv_norms(u, compute_dtype(u))
    loss, lse, cnt, lsep = _torch_forward(_normalised(u, r, normalize), inv_tau, R, keys,
                                          normalize, pos_lse)
    return loss, lse, cnt, lse.new_empty(0) if lsep is None else lsep, r, through


def _fwd_triton(u: torch.Tensor, tau: torch.Tensor | None, inv_tau: torch.Tensor,
                keys: torch.Tensor | None, R: int, normalize: bool, block_d: int | None,
                pos_lse: bool, one_positive: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                              torch.Tensor, torch.Tensor,
                                                              torch.Tensor, torch.Tensor]:
    u = u.contiguous()
    r, through = _inv_norms(u, torch.float32)
    loss, lse, cnt, lsep = _kernels().forward(u, r, keys, inv_tau, R, normalize, block_d,
                                              pos_lse, paired=one_positive)
    return loss, lse, cnt, lse.new_empty(0) if lsep is None else lsep, r, through


def _fwd_fake(u, tau, inv_tau, keys, R, normalize, block_d, pos_lse, one_positive, triton):
    M = u.shape[0]
    dt = torch.float32 if triton else compute_dtype(u)
    ct = torch.int32 if triton else torch.int64
    return (u.new_empty(R, dtype=dt), u.new_empty(M, dtype=dt), u.new_empty(R, dtype=ct),
            u.new_empty(M if pos_lse else 0, dtype=dt), u.new_empty(M, dtype=dt),
            u.new_empty(M, dtype=torch.bool))


def _bwd_prepare(grad_loss, lse, cnt, R, M, pos_lse, one_positive):
    """g, gpos (M,): upstream gradient of each row's loss and the same over its positive count
    (0 beyond R and for rows without positives)."""
    if one_positive:
        g = grad_loss.to(lse.dtype).contiguous()
        if M > R:  # another rank's rows: no loss of their own here
            g = torch.cat([g, g.new_zeros(M - R)])
        return g, g
    g = torch.zeros(M, dtype=lse.dtype, device=lse.device)
    g[:R] = torch.where(cnt > 0, grad_loss.to(lse.dtype), torch.zeros_like(g[:R]))
    if pos_lse:
        return g, g
    gpos = g.clone()
    gpos[:R] /= cnt.clamp_min(1)
    return g, gpos


def _bwd_finish(u, tau, zh, dzh, r, through, normalize, need_u, need_tau):
    grad_tau = u.new_empty(0)
    if need_tau:
        # sum_k zhat_k . dzhat_k = 2 sum_ij G_ij S_ij and dS/dtau = -S/tau (tau's device)
        t = tau.detach().to(zh)
        grad_tau = (-(zh * dzh).sum() / (2 * t)).to(tau).reshape(tau.shape)
    grad_u = u.new_empty(0)
    if need_u:
        grad_u = _chain(zh, dzh, r.to(zh.dtype), through, normalize).to(u.dtype)
    return grad_u, grad_tau


def _bwd_torch(grad_loss: torch.Tensor, u: torch.Tensor, tau: torch.Tensor | None,
               inv_tau: torch.Tensor, keys: torch.Tensor | None, R: int, normalize: bool,
               block_d: int | None, pos_lse: bool, one_positive: bool, lse: torch.Tensor,
               cnt: torch.Tensor, lsep: torch.Tensor, r: torch.Tensor, through: torch.Tensor,
               need_u: bool, need_tau: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g, gpos = _bwd_prepare(grad_loss, lse, cnt, R, u.shape[0], pos_lse, one_positive)
    zh = _normalised(u, r, normalize)
    dzh = _torch_backward(zh, inv_tau, R, keys, lse, g, gpos, lsep if pos_lse else None)
    return _bwd_finish(u, tau, zh, dzh, r, through, normalize, need_u, need_tau)


def _bwd_triton(grad_loss: torch.Tensor, u: torch.Tensor, tau: torch.Tensor | None,
                inv_tau: torch.Tensor, keys: torch.Tensor | None, R: int, normalize: bool,
                block_d: int | None, pos_lse: bool, one_positive: bool, lse: torch.Tensor,
                cnt: torch.Tensor, lsep: torch.Tensor, r: torch.Tensor, through: torch.Tensor,
                need_u: bool, need_tau: bool) -> tuple[torch.Tensor, torch.Tensor]:
    u = u.contiguous()
    g, gpos = _bwd_prepare(grad_loss, lse, cnt, R, u.shape[0], pos_lse, one_positive)
    dzh = _kernels().backward(u, r, keys, inv_tau, lse, g, gpos, R, normalize, block_d,
                              lsep if pos_lse else None, paired=one_positive)
    zh = u.float() * r[:, None] if normalize else u.float()
    return _bwd_finish(u, tau, zh, dzh, r, through, normalize, need_u, need_tau)


def _bwd_fake(grad_loss, u, tau, inv_tau, keys, R, normalize, block_d, pos_lse, one_positive,
              lse, cnt, lsep, r, through, need_u, need_tau):
    return (torch.empty_like(u) if need_u else u.new_empty(0),
            torch.empty_like(tau) if need_tau else u.new_empty(0))


def _normalised(u, r, normalize):
    """zhat in the PyTorch path's compute dtype (float64 for float64 input, else float32):
    u / max(|u|, eps) as F.normalize divides."""
    cdt = compute_dtype(u)
    return u.to(cdt) / r.reciprocal()[:, None] if normalize else u.to(cdt)


_loss = FusedLoss("nt_xent", {False: _fwd_torch, True: _fwd_triton},
                  {False: _bwd_torch, True: _bwd_triton}, _fwd_fake, _bwd_fake,
                  lambda *inputs: _rows_dense(*inputs), n_grads=2)  # looked up at call time
_ops = _loss.ops


# ------------------------------------------------------------------ distributed gather
def _gather_rows(local, labels, two_view, rank, world, group=None):
    """Local rows first, then the other ranks' rows; keys = the global pair index (two views,
    no labels) or the gathered labels. labels: None or (M_local,)."""
    m = local.shape[0]
    check_same_rows(m // 2 if two_view else m, local.device, world, group,
                    "N" if two_view else "number of rows M")
    u = gather_rows(local, rank, world, group)
    if labels is not None:
        return u, gather_rows(labels.to(local.device).long(), rank, world, group, autograd=False)
    n = m // 2
    pair = torch.arange(n, device=local.device)
    order = [rank] + [q for q in range(world) if q != rank]
    return u, torch.cat([torch.cat([pair + q * n, pair + q * n]) for q in order])


# ------------------------------------------------------------------ public API
def nt_xent(z1, z2=None, temperature=0.2, *, normalize=True, reduction="mean", weights=None,
            labels=None, multi_positive="out", gather_distributed=False, check_finite=None,
            _backend="auto", _block_d=None):
    """NT-Xent loss (SimCLR / SDCLR) without the M x M similarity matrix.

    Two views: ``z1``, ``z2`` (N, D) give M = 2N rows [z1; z2], and row i's positive is its
    other view. One matrix: ``z1`` (M, D) holds any number of views, ``z2=None``, and
    ``labels`` (M,) (solo-learn's ``indexes``) say which rows are positives of each other; every
    other row is a negative. ``multi_positive="out"`` averages the positives' log-probabilities
    (SupCon's L_out, the default), ``"in"`` puts the sum of their probabilities inside the log
    (solo-learn); a row without a positive gives 0 and counts in the mean. The value and
    gradients equal `sdclr_fast.ops.reference.nt_xent_reference`. The module docstring
    (`sdclr_fast.ops.nt_xent`) covers weights, temperature tensors, higher derivatives,
    torch.func and the distributed convention.

    Args:
        z1: (N, D) embeddings of the first view, or (M, D) rows of all views when ``z2`` is
            None. float16, bfloat16, float32 or float64, on the CPU or a CUDA device.
        z2: (N, D) embeddings of the second view (same dtype and device as ``z1``), or None.
        temperature: tau > 0, a Python number or a one-element tensor. A tensor changes value
            without a recompile under torch.compile; one that requires grad is learnt.
        normalize: L2-normalise the rows first, so the scores are cosine similarities / tau.
        reduction: ``"mean"`` over the M rows, ``"sum"``, or ``"none"`` for the M per-row
            losses (rows of ``z1`` first).
        weights: optional (M,) per-row weights (differentiable), applied before the reduction.
        labels: optional integer labels: (N,) (both views) or (2N,) with two views, (M,) with
            one matrix. Rows with equal labels are extra positives of each other.
        multi_positive: ``"out"`` or ``"in"``, how several positives combine (see above).
        gather_distributed: under an initialised torch.distributed (world size > 1), take the
            negatives from every rank's rows (True) or from the ranks of a given ProcessGroup;
            the gathered rows' gradients go back to their owners.
        check_finite: look for NaN / inf in the embeddings: None checks where it costs no
            device sync (CPU tensors outside torch.compile), True always, False never.

    Returns:
        A 0-d tensor (``"mean"``, ``"sum"``) or the (M,) per-row losses (``"none"``), in the
        dtype of ``z1``.

    Raises:
        ValueError: naming the argument: mismatched shapes, dtypes or devices, a temperature
            that is not > 0 and finite, labels or weights of the wrong length, an unknown
            ``reduction`` or ``multi_positive``, NaN / inf in the embeddings (when checked).

    Examples:
        >>> import torch, sdclr_fast
        >>> z1, z2 = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16)
        >>> loss = sdclr_fast.nt_xent(z1, z2, temperature=0.2)
        >>> loss.backward()
        >>> sdclr_fast.nt_xent(z1, z2, 0.2, reduction="none").shape
        torch.Size([16])
        >>> z = torch.randn(12, 16)                      # three views of four images
        >>> idx = torch.arange(4).repeat(3)
        >>> sdclr_fast.nt_xent(z, labels=idx, multi_positive="in").dim()
        0
    """
    R = _check(z1, z2, temperature, normalize, reduction, weights, labels, multi_positive)
    check_flag("check_finite", check_finite)
    single = z2 is None
    # "in" equals "out" when every row has exactly one positive (two views without labels)
    pos_lse = multi_positive == "in" and labels is not None
    tau = temperature if isinstance(temperature, torch.Tensor) else None
    u = z1 if single else torch.cat([z1, z2])
    keys = labels
    if keys is not None:
        keys = keys.to(z1.device)
        keys = torch.cat([keys, keys]) if keys.shape[0] != R else keys
    # a torch.func transform runs the dense formulation: no host reads, no gather
    dense = transformed(z1, z2, temperature, weights, labels)
    world = _dist_world(gather_distributed)
    if dense and world is not None:
        raise ValueError("gather_distributed=True cannot run under torch.func transforms or "
                         "forward-mode AD")
    triton = not dense and use_triton(z1, _backend, "z1/z2")
    if not dense:
        check_values([("z1", z1), ("z2", z2)], temperature, check_finite)
    if world is not None:
        u, keys = _gather_rows(u, keys, not single, *world)
        if labels is None and not triton:
            keys = None  # the PyTorch path pairs the leading local rows by index
    if keys is not None:
        keys = keys.long()  # labels of any range, no data-dependent relabelling
    elif triton:  # the pair index is the key: row i and row i + R/2 share it
        keys = index_keys(u.shape[0], u.device, R // 2)
    inv_tau = inv_tau_tensor(tau, None if tau is not None else float(temperature), u.device,
                             torch.float32 if triton else compute_dtype(u))
    one_positive = labels is None  # two views: the local rows' pairs (other ranks' rows follow)
    rows = _loss(u, tau, inv_tau, keys, R, normalize, _block_d, pos_lse, one_positive,
                 triton=triton)
    return reduce_rows(rows, reduction, weights, z1.dtype)


def _bank_shape(memory_bank_size):
    """lightly's memory_bank_size: an int (the dimension is taken from the first batch) or a
    (size, dim) pair; size 0 switches the bank off. Returns (size, dim or None)."""
    def is_int(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    if is_int(memory_bank_size) and memory_bank_size >= 0:
        return int(memory_bank_size), None
    if isinstance(memory_bank_size, (tuple, list, torch.Size)) and len(memory_bank_size) == 2 \
            and all(is_int(v) for v in memory_bank_size) and memory_bank_size[0] >= 0 \
            and memory_bank_size[1] >= 1:
        return int(memory_bank_size[0]), int(memory_bank_size[1])
    raise ValueError(f"memory_bank_size must be an int >= 0 or a (size >= 0, dim >= 1) pair of "
                     f"ints, got {memory_bank_size!r}")


class NTXentLoss(nn.Module):
    """Module form of `nt_xent`, a drop-in for lightly's ``NTXentLoss``.

    Takes lightly's arguments in lightly's positional order (temperature, memory_bank_size,
    gather_distributed) and checks every argument here, in the constructor. A tensor
    temperature is kept as a buffer (an nn.Parameter as a learnable parameter). The default
    temperature is the SDCLR paper's 0.2 (lightly's default is 0.5). ``forward(z1, z2=None,
    weights=None, labels=None)`` takes what `nt_xent` takes: two views, or one matrix with
    labels (solo-learn style).

    With a memory bank (``memory_bank_size`` > 0) it is lightly's memory-bank (MoCo-style)
    loss: row i of z1 against [its positive z2_i; the bank], loss_i = -log softmax at the
    positive, mean over the N rows of z1; the bank alone gives the negatives (no in-batch
    ones). The bank starts as random unit rows (torch.randn from the global generator, then
    L2-normalised; with an int size at the first forward, with the dimension of z1), float32,
    and is read (a detached copy) before it is updated. After the loss, if the normalised z1
    requires grad (a training step; not under no_grad, not for evaluation), the normalised z2
    (detached; of all ranks, in rank order, with gather_distributed under an initialised process
    group) are written at the pointer; a batch that reaches the end fills the bank up to the
    end, drops its remaining rows and sets the pointer back to 0 (lightly's rule). As in lightly,
    the bank and its pointer are non-persistent buffers (not in state_dict). The loss itself is
    ``info_nce(..., negatives=bank, in_batch_negatives=False)``.

    Args:
        temperature: tau > 0: a Python number, a one-element tensor, or an nn.Parameter.
        memory_bank_size: 0 (in-batch negatives), an int > 0 (bank rows; the dimension is
            taken from the first batch) or a ``(size, dim)`` pair.
        gather_distributed: a bool; True takes negatives from all ranks (and enqueues all
            ranks' keys) and needs ``torch.distributed.is_available()``.
        normalize: L2-normalise the rows first.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        multi_positive: ``"out"`` or ``"in"`` (see `nt_xent`).

    Raises:
        ValueError: naming the argument: a temperature that is not a finite number > 0 (or a
            tensor of more than one element), a malformed ``memory_bank_size``, a
            ``gather_distributed`` that is not a bool or that this torch cannot serve, an unknown
            ``reduction`` or ``multi_positive``.

    Examples:
        >>> import torch
        >>> from sdclr_fast import NTXentLoss         # instead of: from lightly.loss import NTXentLoss
        >>> loss_fn = NTXentLoss(0.5)
        >>> loss = loss_fn(torch.randn(8, 16), torch.randn(8, 16))
        >>> moco = NTXentLoss(0.1, (64, 16))            # a bank of 64 rows of 16
        >>> loss = moco(torch.randn(8, 16, requires_grad=True), torch.randn(8, 16))
        >>> int(moco.bank_ptr)                           # the 8 keys were enqueued
        8
    """

    def __init__(self, temperature=0.2, memory_bank_size=0, gather_distributed=False, *,
                 normalize=True, reduction="mean", multi_positive="out"):
        super().__init__()
        _check_temperature(temperature)
        if isinstance(temperature, torch.Tensor):
            t = temperature.detach()
            if not bool(torch.isfinite(t).all() and (t > 0).all()):
                raise ValueError(f"temperature must be finite and > 0, got {t.item()!r}")
        _check_options(normalize, reduction, multi_positive)
        if not isinstance(gather_distributed, bool):
            raise ValueError(f"gather_distributed must be a bool, got {gather_distributed!r}")
        if gather_distributed and not torch.distributed.is_available():
            raise ValueError("gather_distributed=True needs torch.distributed, which this torch "
                             "build does not have (torch.distributed.is_available() is False); "
                             "set gather_distributed=False")
        size, dim = _bank_shape(memory_bank_size)
        if isinstance(temperature, torch.Tensor) and not isinstance(temperature, nn.Parameter):
            self.register_buffer("temperature", temperature)
        else:
            self.temperature = temperature
        self.memory_bank_size = size
        self.normalize = normalize
        self.reduction = reduction
        self.multi_positive = multi_positive
        self.gather_distributed = gather_distributed
        self.register_buffer("bank", torch.empty(0), persistent=False)
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long), persistent=False)
        if size and dim is not None:
            self._init_bank(dim, None)

    @torch.no_grad()
    def _init_bank(self, dim, device):
        bank = F.normalize(torch.randn(self.memory_bank_size, dim), dim=1)
        self.bank = bank.to(self.bank.device if device is None else device)
        self.bank_ptr = torch.zeros(1, dtype=torch.long, device=self.bank.device)

    def forward(self, z1, z2=None, weights=None, labels=None):
        if not self.memory_bank_size:
            return nt_xent(z1, z2, self.temperature, normalize=self.normalize,
                           reduction=self.reduction, weights=weights, labels=labels,
                           multi_positive=self.multi_positive,
                           gather_distributed=self.gather_distributed)
        if z2 is None or labels is not None:
            raise ValueError("the memory bank (memory_bank_size > 0) takes two views z1, z2 "
                             "and no labels")
        for name, z in (("z1", z1), ("z2", z2)):
            if not isinstance(z, torch.Tensor) or z.dim() != 2:
                raise ValueError(f"{name} must be a 2-d (N, D) tensor, got "
                                 f"{getattr(z, 'shape', type(z).__name__)}")
        if self.bank.dim() != 2:
            self._init_bank(z1.shape[1], z1.device)
        if z1.shape[1] != self.bank.shape[1]:
            raise ValueError(f"z1 has {z1.shape[1]} columns but the memory bank holds rows of "
                             f"{self.bank.shape[1]} (memory_bank_size)")
        from .info_nce import enqueue_, info_nce

        # named as the caller passed them (info_nce below would say "query" / "key")
        check_values((("z1", z1), ("z2", z2)), self.temperature, None)
        q = F.normalize(z1, dim=1) if self.normalize else z1
        k = F.normalize(z2, dim=1) if self.normalize else z2
        negatives = self.bank.detach().clone().to(device=q.device, dtype=q.dtype)
        loss = info_nce(q, k, self.temperature, negatives=negatives, normalize=False,
                        reduction=self.reduction, weights=weights, in_batch_negatives=False)
        if q.requires_grad:  # lightly's test, on the normalised z1: False under no_grad
            enqueue_(self.bank, self.bank_ptr, k, self.gather_distributed)
        return loss

    def extra_repr(self):
        t = self.temperature
        t = f"{t.item():g}" if isinstance(t, torch.Tensor) else f"{t:g}"
        return (f"temperature={t}, memory_bank_size={self.memory_bank_size}, "
                f"gather_distributed={self.gather_distributed}, normalize={self.normalize}, "
                f"reduction={self.reduction!r}, multi_positive={self.multi_positive!r}")
