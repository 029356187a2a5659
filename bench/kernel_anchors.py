"""Anchor kernels for bench/kernel_report.py: what fast Triton-generated code looks like.

Written for this project in the structure and with the configurations of Triton's own
tutorials (06 fused attention, 03 / 09 matmul), which run near FlashAttention-2 and cuBLAS
speed on an H100. The report compiles them beside the project's kernels, in the same run and
the same way, so their instruction counts, registers and loop shapes are the yardstick.
Bench-only: nothing in the package imports this file.

  attention_fwd(q, k, v, tma)   non-causal attention forward, (Z, H, N_CTX, HEAD_DIM) bf16;
                                tma=True: host tensor descriptors, 128 x 128 tiles, 8 warps,
                                3 stages; tma=False: pointer loads, 128 x 64, 8 warps, 2 stages
  matmul(a, b, tma)             C = A @ B, 128 x 256 x 64 tiles, 8 warps, 3 stages, grouped
                                program order; tma=False pointer loads (tutorial 03),
                                tma=True tensor descriptors (tutorial 09)
"""
import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors (Triton >= 3.2)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None

LOG2E = tl.constexpr(1.4426950408889634)

ATTN_TMA = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)
ATTN_PTR = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)
MATMUL = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


# ------------------------------------------------------------------ fused attention forward
@triton.jit
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, q_desc, k_desc, v_desc, o_desc, sm_scale,
                     N_CTX, H, s_qz, s_qh, s_qm,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     USE_TMA: tl.constexpr):
    # One program per (BLOCK_M query rows, head): online softmax over BLOCK_N key tiles,
    # scores in base 2 so each element costs one exp2. q, k, v, o share strides (contiguous).
    start_m = tl.program_id(0)
    zh = tl.program_id(1)
    z = zh // H
    h = zh % H
    base = z.to(tl.int64) * s_qz + h.to(tl.int64) * s_qh
    row0 = zh * N_CTX  # first row of this head in the (Z * H * N_CTX, HEAD_DIM) descriptor view
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    qk_scale = sm_scale * LOG2E
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if USE_TMA:
        q = q_desc.load([row0 + start_m * BLOCK_M, 0])
    else:
        q = tl.load(q_ptr + base + offs_m[:, None] * s_qm + offs_d[None, :])
    for start_n in range(0, N_CTX, BLOCK_N):
        if USE_TMA:
            k = k_desc.load([row0 + start_n, 0]).T
        else:
            k = tl.load(k_ptr + base + (start_n + offs_n)[None, :] * s_qm + offs_d[:, None])
        qk = tl.dot(q, k)
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        qk = qk * qk_scale - m_ij[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_ij)
        l_ij = tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if USE_TMA:
            v = v_desc.load([row0 + start_n, 0])
        else:
            v = tl.load(v_ptr + base + (start_n + offs_n)[:, None] * s_qm + offs_d[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc)
        l_i = l_i * alpha + l_ij
        m_i = m_ij
    acc = acc / l_i[:, None]
    if USE_TMA:
        o_desc.store([row0 + start_m * BLOCK_M, 0], acc.to(o_desc.dtype))
    else:
        tl.store(o_ptr + base + offs_m[:, None] * s_qm + offs_d[None, :], acc.to(o_ptr.dtype.element_ty))


def attention_fwd(q, k, v, tma, sm_scale=None):
    """Non-causal softmax(q k^T * sm_scale) v for contiguous (Z, H, N_CTX, HEAD_DIM) tensors,
    N_CTX a multiple of the tile; returns o like q. tma selects the tutorial's TMA config
    (needs a Triton with tensor descriptors) or its pointer-load config."""
    Z, H, n_ctx, d = q.shape
    cfg = dict(ATTN_TMA if tma else ATTN_PTR)
    if n_ctx % cfg["BLOCK_M"] or n_ctx % cfg["BLOCK_N"]:
        raise ValueError(f"N_CTX must be a multiple of {cfg['BLOCK_M']} and {cfg['BLOCK_N']}, got {n_ctx}")
    if tma and TensorDescriptor is None:
        raise RuntimeError("the TMA anchor needs triton.tools.tensor_descriptor (Triton >= 3.2)")
    o = torch.empty_like(q)
    sm_scale = d ** -0.5 if sm_scale is None else sm_scale
    if tma:
        def desc(t, rows):
            return TensorDescriptor.from_tensor(t.view(-1, d), [rows, d])
        descs = (desc(q, cfg["BLOCK_M"]), desc(k, cfg["BLOCK_N"]), desc(v, cfg["BLOCK_N"]),
                 desc(o, cfg["BLOCK_M"]))
    else:
        descs = (q, k, v, o)
    grid = (n_ctx // cfg["BLOCK_M"], Z * H)
    _attn_fwd_kernel[grid](q, k, v, o, *descs, sm_scale, n_ctx, H, q.stride(0), q.stride(1),
                           q.stride(2), HEAD_DIM=d, USE_TMA=tma, **cfg)
    return o


# ------------------------------------------------------------------ matmul
@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, a_desc, b_desc, c_desc, M, N, K,
                   s_am, s_ak, s_bk, s_bn, s_cm, s_cn,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr, USE_TMA: tl.constexpr):
    # Grouped program order: GROUP_M row tiles share their column tiles while they are in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % in_group) % group_m)
    pid_n = (pid % in_group) // group_m
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if USE_TMA:
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
            b = b_desc.load([k * BLOCK_K, pid_n * BLOCK_N])
            acc = tl.dot(a, b, acc)
        c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(c_desc.dtype))
    else:
        offs_am = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
        offs_bn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_am[:, None] * s_am + offs_k[None, :] * s_ak
        b_ptrs = b_ptr + offs_k[:, None] * s_bk + offs_bn[None, :] * s_bn
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k * BLOCK_K, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k * BLOCK_K, other=0.0)
            acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K * s_ak
            b_ptrs += BLOCK_K * s_bk
        offs_cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(c_ptr + offs_cm[:, None] * s_cm + offs_cn[None, :] * s_cn,
                 acc.to(c_ptr.dtype.element_ty), mask=(offs_cm[:, None] < M) & (offs_cn[None, :] < N))


def matmul(a, b, tma):
    """a (M, K) @ b (K, N) -> (M, N) in a's dtype, fp32 accumulation, with the tutorial's
    128 x 256 x 64 / 8 warps / 3 stages config; tma selects tensor-descriptor loads."""
    M, K = a.shape
    N = b.shape[1]
    cfg = MATMUL
    c = torch.empty((M, N), device=a.device, dtype=a.dtype)
    if tma:
        if TensorDescriptor is None:
            raise RuntimeError("the TMA anchor needs triton.tools.tensor_descriptor (Triton >= 3.2)")
        descs = (TensorDescriptor.from_tensor(a, [cfg["BLOCK_M"], cfg["BLOCK_K"]]),
                 TensorDescriptor.from_tensor(b, [cfg["BLOCK_K"], cfg["BLOCK_N"]]),
                 TensorDescriptor.from_tensor(c, [cfg["BLOCK_M"], cfg["BLOCK_N"]]))
    else:
        descs = (a, b, c)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _matmul_kernel[grid](a, b, c, *descs, M, N, K, a.stride(0), a.stride(1), b.stride(0),
                         b.stride(1), c.stride(0), c.stride(1), USE_TMA=tma, **cfg)
    return c
