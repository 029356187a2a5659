"""Helpers shared by the kernel files: the tile loader, the dot precision and the tile / launch
configuration (the kernels of nt_xent and info_nce use the same ones)."""
import functools
import os

import torch
import triton
import triton.language as tl

MAX_BLOCK_D = 256


def interpreting():
    """Whether Triton runs in its interpreter (TRITON_INTERPRET=1, read at call time)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cdiv(a, b):
    """Integer ceil-division. triton.cdiv is a constexpr function and costs ~6 us per host
    call, which adds up over the launches of a step."""
    return -(-a // b)


@triton.jit
def load_tile(u_ptr, offs_r, r_ok, offs_d, D, s_um, s_ud, UPCAST: tl.constexpr):
    """(rows, BLOCK_D) tile of u, zero outside the rows and past D, fp32 when UPCAST."""
    t = tl.load(u_ptr + offs_r.to(tl.int64)[:, None] * s_um + offs_d[None, :] * s_ud,
                mask=r_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


def dot_precision(dtype):
    """fp32 follows torch.matmul's setting (IEEE unless allow_tf32); the interpreter is exact;
    16-bit inputs ignore it."""
    if dtype == torch.float32 and (interpreting() or not torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


def config(dtype, D, block_d=None, interp_block=32):
    """Tile sizes (meta) and launch options of a score-tile kernel. block_d overrides the D
    chunk (a power of two >= 16; tests use it to exercise the chunked path at small D);
    interp_block is the row / column tile in the interpreter (small, so that the tests' small
    shapes span several tiles). Cached: it runs on every launch."""
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return _config_cached(dtype, D, block_d, interpreting(), tf32, interp_block)


@functools.lru_cache(maxsize=256)
def _config_cached(dtype, D, block_d, interp, tf32, interp_block):
    if block_d is None:
        block_d = min(max(16, 1 << max(D - 1, 0).bit_length()), MAX_BLOCK_D)
    d_chunks = cdiv(D, block_d)
    if interp:
        block_m = block_n = interp_block
        launch = {}
    else:
        # 16-bit tiles at D <= 128 fit 128 x 64 with 8 warps; fp32 / wide tiles use 64 x 64.
        small = dtype != torch.float32 and block_d <= 128
        block_m, block_n = (128, 64) if small else (64, 64)
        launch = {"num_warps": 8 if small or block_d > 64 else 4, "num_stages": 2}
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, D_CHUNKS=d_chunks,
                UPCAST=interp, PRECISION=dot_precision(dtype))
    return meta, launch
