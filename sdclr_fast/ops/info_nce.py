"""Fused InfoNCE of queries against keys and an optional bank of extra negatives.

    qhat, khat, nhat = L2-normalised query (M, D), key (M, D), negatives (Q, D),
    S = qhat [khat; nhat]^T / tau  (M, M + Q),
    loss_i = -S[i, i] + logsumexp_{j in cols(i)} S[i, j],

with cols(i) = all M keys and the Q negatives (in_batch_negatives=True: SimCLR's
cross-view form, CLIP, MoCLR), or only k_i and the Q negatives (in_batch_negatives=False:
MoCo's queue, lightly's memory-bank NTXentLoss: logits [q.k_i, q.n_1 .. q.n_Q] / tau with
target 0). Neither path stores the (M, M + Q) matrix:

* CUDA fp32 / fp16 / bf16: Triton kernels (kernels/info_nce.py): an online log-sum-exp per
  row over column tiles of [key; negatives] in the forward (per-row lse kept), tiles
  recomputed in the backward; one kernel produces the query gradient and another the key /
  negatives gradients, so no atomics. Extra memory O((M + Q) D).
* everything else (CPU, float64): the same algorithm in PyTorch over row blocks (BLAS matmul
  of a block of queries against all columns, reduced and discarded; the key / negatives
  gradients accumulate block by block). Extra memory O((M + Q) D) plus a fixed ~25 MiB.

Options:
* `symmetric=True` appends the key -> query direction (row j of key against all queries,
  positive q_j), as CLIP does ("mean" is the mean of the 2M rows = the mean of both
  directions). The `negatives` bank is used by the query -> key direction only: a bank
  holds key-side embeddings, which are not candidates for a key anchor. (ALBEF-style
  training with one queue per side calls info_nce once per direction with its own bank.)
  MoCLR / DnC's "symmetric over views" is a different thing: two calls,
  info_nce(online(v1), target(v2)) + info_nce(online(v2), target(v1)).
* `labels` (M,) integers: every key with query i's label is a positive (query i and key i
  share label i, so each row has at least one); loss_i = lse_i - mean_{p in pos(i)} S_ip
  (SupCon-style average of positive log-probabilities). Bank entries are always negatives.
  Needs in_batch_negatives=True.
* `weights` (M,): per-row weights (differentiable), applied before the reduction, to both
  directions when symmetric.
* `temperature`: a number or a 1-element tensor; a tensor that requires grad gets its
  gradient (learnable temperature, as in CLIP).
* `negatives` is usually a detached bank (MemoryBank.negatives()); if it requires grad it
  gets its gradient too.
* `gather_distributed=True` under torch.distributed (initialised, world size > 1): keys (and
  queries when symmetric) of all ranks are the in-batch negatives, gathered with
  the functional collective all_gather (its backward sums every rank's gradient).
  A ProcessGroup instead of True gathers over that group's ranks only.
  Every rank holds the same M; each rank returns the loss of its own rows reduced over them,
  so the mean of the ranks' "mean" losses is the single-process loss of the concatenated
  batch, and the gradient reaching each rank's inputs is world_size x the single-process one
  (DDP's averaging then gives the single-process parameter gradient); "sum" adds up to the
  single-process sum with exactly its gradients. Labels are gathered with the rows. With
  in_batch_negatives=False there is nothing to gather (MemoryBank.enqueue gathers the keys
  for the queue instead, as MoCo does).

Autograd: first derivatives come from the fused backward. When the backward runs in grad
mode (create_graph=True), it instead differentiates the same losses written in plain PyTorch
ops on the materialised (M, M + Q) matrix, so that second derivatives are exact; torch.func
transforms (grad, jacrev, vmap, jvp, ...) and forward-mode AD run that formulation directly.
Those paths cost the reference's memory.

Checks: bad arguments raise ValueError naming the argument; values (NaN / inf in query, key or
negatives, a temperature tensor that is not finite and > 0) follow `check_finite` as in
nt_xent: None checks CPU tensors outside torch.compile and vmap, True always (a device sync on
CUDA), False never; the eager CUDA default issues no host sync.

torch.compile: the per-row losses are custom ops (sdclr_fast::info_nce_fwd / info_nce_bwd, the
_triton variants as torch.library.triton_op) with fake implementations and registered
autograd; a compiled function calling info_nce has no graph break and a temperature tensor's
new value recompiles nothing. gather_distributed gathers (eagerly) before the op.

Testing switch: SDCLR_FAST_FORCE_TRITON=1 (read at call time) or `_backend="triton"` sends CPU
tensors through the Triton kernels; set TRITON_INTERPRET=1 before Triton is imported.
"""
import itertools

import torch
import torch.nn.functional as F
from torch import nn

from ._common import EPS as _EPS, REDUCTIONS as _REDUCTIONS
from ._common import chain as _chain, check_flag, check_matrix, check_pair, check_row_values, \
    check_temperature, check_values
from ._common import check_same_rows, cpu_block as _cpu_block, dist_world as _dist_world, \
    gather_rows, index_keys
from ._common import inv_norms as _inv_norms, inv_tau_tensor
from ._op import FusedLoss, compute_dtype, kernels, reduce_rows, use_triton

__all__ = ["info_nce", "InfoNCELoss", "MemoryBank", "momentum_update_"]


def _kernels():
    return kernels("info_nce")


# ------------------------------------------------------------------ argument checks
def _check(query, key, temperature, negatives, symmetric, normalize, reduction, weights, labels,
           in_batch_negatives):
    check_matrix("query", query)
    check_matrix("key", key)
    check_pair("query", query, "key", key)
    m, d = query.shape
    if negatives is not None:
        check_matrix("negatives", negatives)
        if negatives.shape[1] != d:
            raise ValueError(f"negatives must have D = {d} columns like query, got shape "
                             f"{tuple(negatives.shape)}")
        if negatives.device != query.device:
            raise ValueError(f"negatives is on {negatives.device} but query is on "
                             f"{query.device}")
        if negatives.dtype != query.dtype:
            raise ValueError(f"negatives has dtype {negatives.dtype} but query has dtype "
                             f"{query.dtype} (cast the bank with .to(query.dtype))")
    for name, flag in (("symmetric", symmetric), ("normalize", normalize),
                       ("in_batch_negatives", in_batch_negatives)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {flag!r}")
    if not in_batch_negatives:
        if negatives is None or negatives.shape[0] == 0:
            raise ValueError("in_batch_negatives=False needs a non-empty negatives bank "
                             "(with only the positive every loss would be 0)")
        if symmetric:
            raise ValueError("symmetric=True needs in_batch_negatives=True (the key -> query "
                             "direction has no negatives otherwise)")
        if labels is not None:
            raise ValueError("labels need in_batch_negatives=True (they select positives among "
                             "the in-batch keys)")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")

    check_temperature(temperature, query.device, "query")

    check_row_values(weights, labels, m, "(M,)", (m,), f"M = {m}", "query", query)


# ------------------------------------------------------------------ shared math
def _prepared(u, cdt, normalize):
    """(zhat in cdt, r, through) of a row matrix, or Nones for a missing one."""
    if u is None:
        return None, None, None
    r, through = _inv_norms(u, cdt)
    zh = u.to(cdt) * r[:, None] if normalize else u.to(cdt)
    return zh, r, through


def _pos_term(S, s, e, keys_r, keys_c, ncol):
    """mean of S over each row's positives and the counts: row s + t of the block pairs with
    column s + t (keys None), or with every column of its key."""
    if keys_r is None:
        return S.diagonal(offset=s)[: e - s], None
    same = keys_r[s:e, None] == keys_c[None, :ncol]
    c = same.sum(1)
    return torch.where(same, S[:, :ncol], torch.zeros((), dtype=S.dtype, device=S.device)).sum(1) / c, c


def _torch_forward(xh, yh, nh, inv_tau, M, keys_x, keys_y, symmetric, in_batch):
    """PyTorch path over row blocks. xh (Cq, D) normalised queries, yh (Ck, D) keys (the local
    M rows first, then other ranks' rows), nh (Q, D) or None. Returns the per-row losses (M, or
    2M when symmetric), lse of the query rows (Cq,) and of the key rows (Ck,) (+inf beyond M and
    for a direction not computed), positive counts (M,) of each direction (None: one)."""
    dt, dev = xh.dtype, xh.device
    Cq, Ck = xh.shape[0], yh.shape[0]
    xs = xh * inv_tau
    lse1 = torch.full((Cq,), float("inf"), dtype=dt, device=dev)
    lse2 = torch.full((Ck,), float("inf"), dtype=dt, device=dev)
    loss1 = torch.empty(M, dtype=dt, device=dev)
    cnt1 = cnt2 = None
    if in_batch:
        cols = torch.cat([yh, nh]) if nh is not None else yh
        B = _cpu_block(cols.shape[0])
        if keys_x is not None:
            cnt1 = torch.empty(M, dtype=torch.int64, device=dev)
        for s in range(0, M, B):
            e = min(s + B, M)
            S = torch.mm(xs[s:e], cols.t())
            pos, c = _pos_term(S, s, e, keys_x, keys_y, Ck)
            if c is not None:
                cnt1[s:e] = c
            lse1[s:e] = torch.logsumexp(S, 1)
            loss1[s:e] = lse1[s:e] - pos
    else:
        B = _cpu_block(nh.shape[0])
        for s in range(0, M, B):
            e = min(s + B, M)
            diag = (xs[s:e] * yh[s:e]).sum(1)
            lse = torch.logaddexp(diag, torch.logsumexp(torch.mm(xs[s:e], nh.t()), 1))
            lse1[s:e] = lse
            loss1[s:e] = lse - diag
    if not symmetric:
        return loss1, lse1, lse2, cnt1, cnt2
    ys = yh * inv_tau
    loss2 = torch.empty(M, dtype=dt, device=dev)
    if keys_y is not None:
        cnt2 = torch.empty(M, dtype=torch.int64, device=dev)
    B = _cpu_block(Cq)
    for s in range(0, M, B):
        e = min(s + B, M)
        T = torch.mm(ys[s:e], xh.t())
        pos, c = _pos_term(T, s, e, keys_y, keys_x, Cq)
        if c is not None:
            cnt2[s:e] = c
        lse2[s:e] = torch.logsumexp(T, 1)
        loss2[s:e] = lse2[s:e] - pos
    return torch.cat([loss1, loss2]), lse1, lse2, cnt1, cnt2


def _sub_positives(A, s, e, keys_r, keys_c, ncol, wr, wc):
    """A[t, j] -= wr[s + t] + wc[j] where column j is a positive of row s + t (wc may be None)."""
    if keys_r is None:
        rows = torch.arange(e - s, device=A.device)
        v = wr[s:e] if wc is None else wr[s:e] + wc[s:e]
        A[rows, rows + s] -= v
        return
    same = keys_r[s:e, None] == keys_c[None, :ncol]
    v = wr[s:e, None] if wc is None else wr[s:e, None] + wc[None, :ncol]
    A[:, :ncol] -= torch.where(same, v, torch.zeros((), dtype=A.dtype, device=A.device))


def _torch_backward(xh, yh, nh, inv_tau, M, keys_x, keys_y, symmetric, in_batch, lse1, lse2,
                    g, gpos, h, hpos, need_y, need_n):
    """dL/dxhat (Cq, D), dL/dyhat (Ck, D) and dL/dnhat (Q, D) (None where not needed) by row
    blocks: dS_ij = g_i (P_ij - Y_ij) + h_j (P'_ji - Y'_ji) with P, P' the softmaxes of the
    two directions and Y, Y' their normalised positive masks; dxhat = dS [yhat; nhat] / tau,
    d[yhat; nhat] = dS^T xhat / tau. g, gpos = g / cnt: (M,) upstream of the query rows; h, hpos
    of the key rows (None unless symmetric)."""
    Cq, Ck = xh.shape[0], yh.shape[0]
    xs = xh * inv_tau
    dx = torch.empty_like(xh)
    dy = torch.zeros_like(yh) if need_y else None
    dn = torch.zeros_like(nh) if need_n else None
    if in_batch:
        cols = torch.cat([yh, nh]) if nh is not None else yh
        # 0 for other ranks' keys
        hpos_cols = F.pad(hpos, (0, Ck - M)) if hpos is not None else None
        B = _cpu_block(cols.shape[0])
        for s in range(0, M, B):
            e = min(s + B, M)
            S = torch.mm(xs[s:e], cols.t())
            A = torch.sub(S, lse1[s:e, None]).exp_().mul_(g[s:e, None])
            if symmetric:
                A[:, :M] += S[:, :M].sub_(lse2[None, :M]).exp_().mul_(h[None, :])
            del S
            _sub_positives(A, s, e, keys_x, keys_y, Ck, gpos, hpos_cols)
            torch.mm(A, cols, out=dx[s:e])
            if need_y:
                dy.addmm_(A[:, :Ck].t(), xh[s:e])
            if need_n:
                dn.addmm_(A[:, Ck:].t(), xh[s:e])
        if symmetric and Cq > M:  # other ranks' queries: only the key -> query terms
            B = _cpu_block(M)
            for s in range(M, Cq, B):
                e = min(s + B, Cq)
                A = torch.mm(xs[s:e], yh[:M].t()).sub_(lse2[None, :M]).exp_().mul_(h[None, :])
                if keys_x is not None:
                    same = keys_x[s:e, None] == keys_y[None, :M]
                    A -= torch.where(same, hpos[None, :], torch.zeros((), dtype=A.dtype))
                torch.mm(A, yh[:M], out=dx[s:e])
                if need_y:
                    dy[:M].addmm_(A.t(), xh[s:e])
    else:
        B = _cpu_block(nh.shape[0])
        a_d = torch.empty(M, dtype=xh.dtype, device=xh.device)
        for s in range(0, M, B):
            e = min(s + B, M)
            A = torch.mm(xs[s:e], nh.t()).sub_(lse1[s:e, None]).exp_().mul_(g[s:e, None])
            diag = (xs[s:e] * yh[s:e]).sum(1)
            a_d[s:e] = g[s:e] * (torch.exp(diag - lse1[s:e]) - 1)  # positive column
            torch.mm(A, nh, out=dx[s:e])
            dx[s:e] += a_d[s:e, None] * yh[s:e]
            if need_n:
                dn.addmm_(A.t(), xh[s:e])
        if need_y:
            dy = a_d[:, None] * xh
    dx *= inv_tau
    if dy is not None:
        dy *= inv_tau
    if dn is not None:
        dn *= inv_tau
    return dx, dy, dn


def _rows_dense(x, y, n, tau, inv_tau, keys_x, keys_y, M, symmetric, in_batch, normalize,
               block_d):
    """The per-row losses of the custom ops (same arguments) in differentiable PyTorch ops on
    the materialised (M, Ck + Q) matrix: the route of torch.func transforms and forward-mode
    AD, and the backward under create_graph=True (double backward)."""
    cdt = compute_dtype(x)

    def prepared(u):
        u = u.to(cdt)
        return F.normalize(u, dim=1, eps=_EPS) if normalize else u

    def scores(a, b):
        S = a @ b.t()
        if tau is not None:
            return S / tau.to(device=S.device, dtype=cdt).reshape(())
        return S * inv_tau.to(device=S.device, dtype=cdt)  # a Python temperature

    def direction(S, keys_r, keys_c, ncol):
        """lse over the row minus the mean positive score (column i, or equal keys)."""
        if keys_r is None:
            pos = S.diagonal()
        else:
            same = keys_r[:M, None] == keys_c[None, :ncol]
            pos = (S[:, :ncol] * same).sum(1) / same.sum(1)
        return torch.logsumexp(S, 1) - pos

    xh, yh = prepared(x), prepared(y)
    Ck = yh.shape[0]
    cols = torch.cat([yh, prepared(n)]) if n is not None else yh
    S = scores(xh[:M], cols)
    if in_batch:
        rows = direction(S, keys_x, keys_y, Ck)
    else:  # its own key and the bank only (no gather: Ck = M)
        diag = S.diagonal()
        rows = torch.logaddexp(diag, torch.logsumexp(S[:, Ck:], 1)) - diag
    if symmetric:  # key rows against all queries
        rows = torch.cat([rows, direction(scores(yh[:M], xh), keys_y, keys_x, xh.shape[0])])
    return rows


# ------------------------------------------------------------------ custom ops
# The per-row losses are custom ops (sdclr_fast::info_nce_fwd / _bwd for the PyTorch path,
# info_nce_fwd_triton / _bwd_triton for the kernels), filled into the shared wiring of
# ops/_op.py (FusedLoss: custom ops, eager Function, router; _rows_dense is the dense route).
# Rows: the first M rows of x (queries, (Cq, D)) against the columns [y; n] (keys (Ck, D),
# negatives (Q, D) or None), then the first M rows of y against x when symmetric.
# keys_x / keys_y: integer positive keys of the rows of x / y (query i and key j are positives
# iff equal), or None: query i <-> key i only (the kernels then get the row index as keys).
# tau: the temperature tensor (for its gradient) or None; inv_tau: 1 / tau as a (1,) tensor
# (fp32 for the kernels, the compute dtype otherwise). Outputs (rows, lse1, lse2, cnt1, cnt2);
# only rows is differentiable.
def _fwd_torch(x: torch.Tensor, y: torch.Tensor, n: torch.Tensor | None,
               tau: torch.Tensor | None, inv_tau: torch.Tensor, keys_x: torch.Tensor | None,
               keys_y: torch.Tensor | None, M: int, symmetric: bool, in_batch: bool,
               normalize: bool, block_d: int | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    cdt = compute_dtype(x)
    xh, yh, nh = (_prepared(u, cdt, normalize)[0] for u in (x, y, n))
    rows, lse1, lse2, cnt1, cnt2 = _torch_forward(xh, yh, nh, inv_tau, M, keys_x, keys_y,
                                                  symmetric, in_batch)
    one = torch.ones(M, dtype=torch.int64, device=x.device)
    return (rows, lse1, lse2, one if cnt1 is None else cnt1,
            torch.ones_like(one) if cnt2 is None else cnt2)


def _fwd_triton(x: torch.Tensor, y: torch.Tensor, n: torch.Tensor | None,
                tau: torch.Tensor | None, inv_tau: torch.Tensor, keys_x: torch.Tensor | None,
                keys_y: torch.Tensor | None, M: int, symmetric: bool, in_batch: bool,
                normalize: bool, block_d: int | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    k = _kernels()
    x, y = x.contiguous(), y.contiguous()
    n = n.contiguous() if n is not None else None
    kx = keys_x if keys_x is not None else index_keys(x.shape[0], x.device)
    ky = keys_y if keys_y is not None else index_keys(y.shape[0], x.device)
    rx, _ = _inv_norms(x, torch.float32)
    ry, _ = _inv_norms(y, torch.float32)
    rn = _inv_norms(n, torch.float32)[0] if n is not None else None
    index = keys_x is None and keys_y is None  # positives on the diagonal (local rows first)
    loss1, lse1, cnt1 = k.forward(x, rx, kx, y, ry, ky, n, rn, inv_tau, M, normalize,
                                  not in_batch, block_d, index_keys=index)
    if symmetric:
        loss2, lse2, cnt2 = k.forward(y, ry, ky, x, rx, kx, None, None, inv_tau, M, normalize,
                                      False, block_d, index_keys=index)
        return torch.cat([loss1, loss2]), lse1, lse2, cnt1, cnt2
    lse2 = torch.full((y.shape[0],), float("inf"), device=x.device)
    return loss1, lse1, lse2, cnt1, cnt1.clone()


def _fwd_fake(x, y, n, tau, inv_tau, keys_x, keys_y, M, symmetric, in_batch, normalize,
              block_d, triton):
    dt = torch.float32 if triton else compute_dtype(x)
    ct = torch.int32 if triton else torch.int64
    return (x.new_empty(2 * M if symmetric else M, dtype=dt), x.new_empty(x.shape[0], dtype=dt),
            x.new_empty(y.shape[0], dtype=dt), x.new_empty(M, dtype=ct),
            x.new_empty(M, dtype=ct))


def _bwd_impl(grad_rows, x, y, n, tau, inv_tau, keys_x, keys_y, M, symmetric, in_batch,
              normalize, block_d, lse1, lse2, cnt1, cnt2, need_x, need_y, need_n, need_tau,
              triton):
    cdt = compute_dtype(x)
    grad_rows = grad_rows.to(cdt)
    g = grad_rows[:M]
    gpos = g / cnt1.to(cdt)
    h = hpos = None
    if symmetric:
        h = grad_rows[M:]
        hpos = h / cnt2.to(cdt)
    (xh, rx, tx), (yh, ry, ty), (nh, rn, tn) = (_prepared(u, cdt, normalize)
                                                for u in (x, y, n))
    need_n = need_n and n is not None
    if triton:
        k = _kernels()
        kx = keys_x if keys_x is not None else index_keys(x.shape[0], x.device)
        ky = keys_y if keys_y is not None else index_keys(y.shape[0], x.device)
        rx32, ry32 = rx.float(), ry.float()
        rn32 = rn.float() if rn is not None else None
        dxh, dyh, dnh = k.backward(
            x.contiguous(), rx32, kx, y.contiguous(), ry32, ky,
            n.contiguous() if n is not None else None, rn32, inv_tau, M, normalize,
            not in_batch, symmetric, lse1, lse2, g.float(), gpos.float(),
            h.float() if h is not None else None, hpos.float() if h is not None else None,
            need_x or need_tau, need_y, need_n, block_d,
            index_keys=keys_x is None and keys_y is None)
    else:
        dxh, dyh, dnh = _torch_backward(xh, yh, nh, inv_tau, M, keys_x, keys_y, symmetric,
                                        in_batch, lse1, lse2, g, gpos, h, hpos, need_y, need_n)

    def empty():  # one per output: the outputs of a custom op must not alias each other
        return x.new_empty(0)

    gt = empty()
    if need_tau:
        gt = (-(xh * dxh.to(cdt)).sum() / tau.detach().to(cdt)).to(tau.dtype).reshape(tau.shape)
    gx = _chain(xh, dxh.to(cdt), rx, tx, normalize).to(x.dtype) if need_x else empty()
    gy = _chain(yh, dyh.to(cdt), ry, ty, normalize).to(y.dtype) if need_y else empty()
    gn = _chain(nh, dnh.to(cdt), rn, tn, normalize).to(n.dtype) if need_n else empty()
    return gx, gy, gn, gt


def _bwd_torch(grad_rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
               n: torch.Tensor | None, tau: torch.Tensor | None, inv_tau: torch.Tensor,
               keys_x: torch.Tensor | None, keys_y: torch.Tensor | None, M: int,
               symmetric: bool, in_batch: bool, normalize: bool, block_d: int | None,
               lse1: torch.Tensor, lse2: torch.Tensor, cnt1: torch.Tensor, cnt2: torch.Tensor,
               need_x: bool, need_y: bool, need_n: bool, need_tau: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(grad_rows, x, y, n, tau, inv_tau, keys_x, keys_y, M, symmetric, in_batch,
                     normalize, block_d, lse1, lse2, cnt1, cnt2, need_x, need_y, need_n,
                     need_tau, False)


def _bwd_triton(grad_rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                n: torch.Tensor | None, tau: torch.Tensor | None, inv_tau: torch.Tensor,
                keys_x: torch.Tensor | None, keys_y: torch.Tensor | None, M: int,
                symmetric: bool, in_batch: bool, normalize: bool, block_d: int | None,
                lse1: torch.Tensor, lse2: torch.Tensor, cnt1: torch.Tensor, cnt2: torch.Tensor,
                need_x: bool, need_y: bool, need_n: bool, need_tau: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(grad_rows, x, y, n, tau, inv_tau, keys_x, keys_y, M, symmetric, in_batch,
                     normalize, block_d, lse1, lse2, cnt1, cnt2, need_x, need_y, need_n,
                     need_tau, True)


def _bwd_fake(grad_rows, x, y, n, tau, inv_tau, keys_x, keys_y, M, symmetric, in_batch,
              normalize, block_d, lse1, lse2, cnt1, cnt2, need_x, need_y, need_n, need_tau):
    e = x.new_empty(0)
    return (torch.empty_like(x) if need_x else e, torch.empty_like(y) if need_y else e,
            torch.empty_like(n) if need_n and n is not None else e,
            torch.empty_like(tau) if need_tau else e)


_loss = FusedLoss("info_nce", {False: _fwd_torch, True: _fwd_triton},
                  {False: _bwd_torch, True: _bwd_triton}, _fwd_fake, _bwd_fake, _rows_dense,
                  n_grads=4)
_ops = _loss.ops


# ------------------------------------------------------------------ public API
def info_nce(query, key, temperature=0.2, *, negatives=None, symmetric=False, normalize=True,
             reduction="mean", weights=None, labels=None, gather_distributed=False,
             in_batch_negatives=True, check_finite=None, _backend="auto", _block_d=None):
    """InfoNCE of queries against keys and an optional negatives bank, without the logit matrix.

    Row i of ``query`` (M, D) is positive with row i of ``key`` (M, D); the other keys
    (``in_batch_negatives=True``) and the rows of ``negatives`` (Q, D) are its negatives. Neither
    path stores the (M, M + Q) logits. The module docstring (`sdclr_fast.ops.info_nce`) details
    the options, the distributed convention and the autograd paths. Values and gradients equal
    `sdclr_fast.ops.reference.info_nce_reference`.

    Args:
        query: (M, D) float16, bfloat16, float32 or float64, on the CPU or a CUDA device.
        key: (M, D), same dtype and device as ``query``.
        temperature: tau > 0, a Python number or a one-element tensor (learnt when it
            requires grad, as CLIP's).
        negatives: optional (Q, D) bank of extra negatives (e.g. `MemoryBank.negatives()`),
            used by the query -> key direction only.
        symmetric: add the key -> query direction (CLIP); ``"mean"`` then averages the 2M rows.
        normalize: L2-normalise the rows first (cosine similarities).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-row losses).
        weights: optional (M,) per-row weights, applied to both directions when symmetric.
        labels: optional (M,) integer labels: keys with query i's label are extra positives
            (SupCon-style mean); needs ``in_batch_negatives=True``.
        gather_distributed: under torch.distributed, the keys (and queries when symmetric) of
            all ranks, or of a given ProcessGroup's ranks, are in-batch negatives.
        in_batch_negatives: False scores each query against its own key and the bank only
            (MoCo's queue, lightly's memory-bank loss).
        check_finite: look for NaN / inf: None where it costs no device sync, True always,
            False never.

    Returns:
        A 0-d tensor (``"mean"``, ``"sum"``) or the per-row losses (``"none"``: the M query
        rows, then the M key rows when symmetric), in the dtype of ``query``.

    Raises:
        ValueError: naming the argument: mismatched shapes, dtypes or devices, a temperature
            that is not > 0 and finite, weights or labels of the wrong length, labels without
            in-batch negatives, an unknown ``reduction``, NaN / inf in the inputs (when checked).

    Examples:
        >>> import torch, sdclr_fast
        >>> q, k = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16)
        >>> bank = sdclr_fast.MemoryBank(32, 16)
        >>> loss = sdclr_fast.info_nce(q, k, 0.2, negatives=bank.negatives(), in_batch_negatives=False)
        >>> loss.backward()
        >>> sdclr_fast.info_nce(q, k, symmetric=True, reduction="none").shape   # CLIP: both directions
        torch.Size([16])
    """
    _check(query, key, temperature, negatives, symmetric, normalize, reduction, weights, labels,
           in_batch_negatives)
    check_flag("check_finite", check_finite)
    triton = use_triton(query, _backend, "query/key")
    if negatives is not None and negatives.shape[0] == 0:
        negatives = None
    named = [("query", query), ("key", key)]
    if negatives is not None:
        named.append(("negatives", negatives))
    check_values(named, temperature, check_finite)
    m = query.shape[0]
    world = _dist_world(gather_distributed) if in_batch_negatives else None
    x, y = query, key
    keys_x = keys_y = None
    if labels is not None:
        keys_x = labels.to(query.device)
    if world is not None:
        check_same_rows(m, query.device, world[1], world[2], "M")
        y = gather_rows(key, *world)
        if symmetric:
            x = gather_rows(query, *world)
        if labels is not None:
            all_lab = gather_rows(keys_x, *world, autograd=False)
            keys_x = all_lab if symmetric else keys_x
            keys_y = all_lab
    elif labels is not None:
        keys_y = keys_x
    if keys_x is not None:  # labels of any range, no data-dependent relabelling
        keys_x, keys_y = keys_x.long(), keys_y.long()
    tau = temperature if isinstance(temperature, torch.Tensor) else None
    inv_tau = inv_tau_tensor(tau, None if tau is not None else float(temperature), query.device,
                             torch.float32 if triton else compute_dtype(query))
    rows = _loss(x, y, negatives, tau, inv_tau, keys_x, keys_y, m, symmetric,
                 in_batch_negatives, normalize, _block_d, triton=triton)
    if weights is not None and symmetric:
        weights = torch.cat([weights, weights])
    return reduce_rows(rows, reduction, weights, query.dtype)


class InfoNCELoss(nn.Module):
    """Module form of `info_nce`: `InfoNCELoss(temperature, symmetric=..., normalize=...,
    reduction=..., gather_distributed=..., in_batch_negatives=...)(query, key, negatives=None,
    weights=None, labels=None)`. A tensor temperature is kept as a buffer (an nn.Parameter as
    a learnable parameter, e.g. CLIP's)."""

    def __init__(self, temperature=0.2, *, symmetric=False, normalize=True, reduction="mean",
                 gather_distributed=False, in_batch_negatives=True):
        super().__init__()
        if isinstance(temperature, torch.Tensor) and not isinstance(temperature, nn.Parameter):
            self.register_buffer("temperature", temperature)
        else:
            self.temperature = temperature
        self.symmetric = symmetric
        self.normalize = normalize
        self.reduction = reduction
        self.gather_distributed = gather_distributed
        self.in_batch_negatives = in_batch_negatives

    def forward(self, query, key, negatives=None, weights=None, labels=None):
        return info_nce(query, key, self.temperature, negatives=negatives,
                        symmetric=self.symmetric, normalize=self.normalize,
                        reduction=self.reduction, weights=weights, labels=labels,
                        gather_distributed=self.gather_distributed,
                        in_batch_negatives=self.in_batch_negatives)


# ------------------------------------------------------------------ memory bank / MoCo
class MemoryBank(nn.Module):
    """A FIFO queue of past key embeddings (MoCo's queue, lightly's MemoryBankModule).

    Starts as ``size`` random L2-normalised rows of ``dim`` (as lightly initialises its bank).
    `negatives()` returns the bank detached, for ``info_nce(..., negatives=bank.negatives())``;
    `enqueue(keys)` then writes the (detached) new keys at the pointer with lightly's rule: a
    batch that reaches the end of the bank fills it up to the end, the rest of that batch is
    dropped and the pointer goes back to 0 (so after three batches of 3 keys into a bank of 5,
    ``bank[:3]`` holds the last batch and the pointer is 3). ``NTXentLoss(memory_bank_size=...)``
    uses the same rule. Unlike lightly's module, the rows and the write pointer are persistent
    buffers, so the bank is saved in state_dict (a resumed MoCo run keeps its queue) and moves
    with ``.to()``.

    Args:
        size: number of rows, an int >= 1.
        dim: embedding dimension, an int >= 1.
        dtype: dtype of the stored rows (float32 by default, as lightly's).
        device: where the bank lives.
        gather_distributed: `enqueue` adds the keys of all ranks (MoCo's concat_all_gather), so
            every rank keeps the same bank.
        generator: optional torch.Generator for the initial rows.

    Raises:
        ValueError: for a size or dim that is not a positive int; `enqueue` for keys that are
            not (B, dim).

    Examples:
        A MoCo step (momentum encoder ``f_k``, queue of 65,536 keys, tau = 0.2)::

            bank = MemoryBank(65536, 128).to(device)
            q = f_q(x1)
            with torch.no_grad():
                momentum_update_(f_k, f_q, 0.999)
                k = f_k(x2)
            loss = info_nce(q, k, 0.2, negatives=bank.negatives(), in_batch_negatives=False)
            loss.backward()
            bank.enqueue(k)       # this step's keys are negatives from the next step on

        The queue rule on a small bank:

        >>> import torch
        >>> bank = MemoryBank(5, 4)
        >>> for _ in range(3):
        ...     bank.enqueue(torch.randn(3, 4))
        >>> int(bank.ptr)
        3
    """

    def __init__(self, size, dim, *, dtype=torch.float32, device=None, gather_distributed=False,
                 generator=None):
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        bank = torch.randn(size, dim, generator=generator, dtype=torch.float32)
        self.register_buffer("bank", F.normalize(bank, dim=1).to(device=device, dtype=dtype))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64, device=device))
        self.gather_distributed = gather_distributed

    @property
    def size(self):
        return self.bank.shape[0]

    def negatives(self):
        """A detached copy of the bank: enqueue() may run before the loss's backward (as in
        MoCo's forward) without changing the negatives that backward sees."""
        return self.bank.detach().clone()

    @torch.no_grad()
    def enqueue(self, keys):
        """Write keys (B, dim) at the pointer (lightly's rule, see the class docstring)."""
        if not isinstance(keys, torch.Tensor) or keys.dim() != 2 or keys.shape[1] != self.bank.shape[1]:
            raise ValueError(f"keys must be a (B, {self.bank.shape[1]}) tensor, got "
                             f"{getattr(keys, 'shape', type(keys).__name__)}")
        enqueue_(self.bank, self.ptr, keys, self.gather_distributed)

    def extra_repr(self):
        return f"size={self.size}, dim={self.bank.shape[1]}, dtype={self.bank.dtype}"


@torch.no_grad()
def enqueue_(bank, ptr, keys, gather_distributed=False):
    """lightly's memory-bank update, in place: write the detached ``keys`` (B, D) into ``bank``
    (size, D) at ``ptr`` (an int64 tensor of one element); a batch that reaches the end fills the
    bank up to the end, drops its remaining rows and sets the pointer back to 0. With
    ``gather_distributed`` (under an initialised process group) the keys of all ranks are written,
    in rank order, so every rank keeps the same bank."""
    keys = keys.detach()
    world = _dist_world(gather_distributed)
    if world is not None:
        import torch.distributed as dist

        parts = [torch.empty_like(keys) for _ in range(world[1])]
        dist.all_gather(parts, keys.contiguous(), group=world[2])
        keys = torch.cat(parts)
    size, p, b = bank.shape[0], int(ptr), keys.shape[0]
    if p + b >= size:
        bank[p:] = keys[:size - p].to(bank)
        ptr.fill_(0)
    else:
        bank[p:p + b] = keys.to(bank)
        ptr.fill_(p + b)


def _unwrapped_name(name):
    # DDP ("module.") and torch.compile ("_orig_mod.") wrappers prefix every parameter name
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


@torch.no_grad()
def momentum_update_(target, online, momentum=0.999):
    """EMA of the online parameters into the target network, in place (MoCo / BYOL / MoCLR):
    p_t <- momentum p_t + (1 - momentum) p_o. Buffers (BN running statistics) are left to
    the target's own forwards, as in MoCo.

    The two models must have the same parameters: the same count, names (a DDP or
    torch.compile wrapper's prefix aside) and shapes, in the same order; otherwise a ValueError
    names the first mismatch and nothing is updated.

    Example::

        target = copy.deepcopy(online).requires_grad_(False)
        momentum_update_(target, online, 0.99)
    """
    pairs = list(itertools.zip_longest(target.named_parameters(), online.named_parameters()))
    for i, (t, o) in enumerate(pairs):
        if t is None or o is None:
            n_t, n_o = sum(x is not None for x, _ in pairs), sum(y is not None for _, y in pairs)
            extra = (o or t)[0]
            raise ValueError(f"target and online have different parameters: target has {n_t}, online has {n_o} "
                             f"(first unmatched: {'online' if t is None else 'target'} parameter {extra!r})")
        (nt, pt), (no, po) = t, o
        if _unwrapped_name(nt) != _unwrapped_name(no):
            raise ValueError(f"target and online differ at parameter {i}: target has {nt!r}, online has {no!r}")
        if pt.shape != po.shape:
            raise ValueError(f"target and online differ in the shape of parameter {nt!r}: target "
                             f"{tuple(pt.shape)}, online {tuple(po.shape)}")
    for (_, pt), (_, po) in pairs:
        pt.lerp_(po.to(pt.dtype), 1.0 - momentum)
