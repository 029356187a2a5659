"""The tuned-configuration table of the masked-conv Triton kernels (kernels/masked_conv_tuned.json).

bench/tune_masked_conv.py times candidate configs on a GPU and writes, per GPU name, dtype,
layer shape (batch excluded) and sparsity bucket, the winning weight tile, the BLOCK_M /
num_warps / num_stages of each kernel (forward, grad_input, grad_weight + its split count) and
the Triton and cuDNN (F.conv2d(x, w * mask)) times of forward + both backward. `masked_conv2d`
takes the Triton path on CUDA only where such an entry exists and Triton won; everywhere else
it runs cuDNN. The file is in the repository, so machines without a GPU keep the tuned configs.

SDCLR_FAST_MASKED_CONV_TUNED names another table file (the sweep's --out, tests).
"""
import functools
import json
import os

import torch

FORMAT = 1
# tile density (fraction of default-tile weight tiles the mask occupies) -> bucket; the sweep
# tunes block masks at 90 / 75 / 50 % sparsity, whose 32x32 tile densities are ~0.1 / 0.25 / 0.5.
BUCKETS = (("s90", 0.1), ("s75", 0.25), ("s50", 0.5))
MAX_DENSITY = 0.625  # above it no bucket: too little to skip, cuDNN


def default_path():
    from sdclr_fast import kernels

    return os.path.join(os.path.dirname(os.path.abspath(kernels.__file__)), "masked_conv_tuned.json")


def table_path():
    return os.environ.get("SDCLR_FAST_MASKED_CONV_TUNED") or default_path()


def bucket(density):
    """Sparsity bucket of a mask from its tile density, None above MAX_DENSITY."""
    if density > MAX_DENSITY:
        return None
    return min(BUCKETS, key=lambda b: abs(b[1] - density))[0]


def shape_key(gpu, dtype, x_shape, w_shape, stride, padding, dilation, groups, bkt):
    """Key of one entry: GPU name | dtype | layer shape without the batch | bucket."""
    _, c, h, w = x_shape
    o, _, kh, kw = w_shape
    return (f"{gpu}|{str(dtype).replace('torch.', '')}|C{c}-O{o}-H{h}-W{w}-k{kh}x{kw}"
            f"-s{stride[0]}x{stride[1]}-p{padding[0]}x{padding[1]}-d{dilation[0]}x{dilation[1]}"
            f"-g{groups}|{bkt}")


@functools.lru_cache(maxsize=8)
def _load(path, mtime):
    with open(path) as f:
        data = json.load(f)
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: format must be {FORMAT}, got {data.get('format')!r}")
    return data.get("entries", {})


def entries(path=None):
    """{key: entry} of the table (re-read when the file changes; {} when it is missing)."""
    path = path or table_path()
    try:
        mtime = os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return {}
    return _load(path, mtime)


@functools.lru_cache(maxsize=None)
def gpu_name(index):
    return torch.cuda.get_device_name(index)


def lookup(x, weight, stride, padding, dilation, groups, density):
    """The tuned entry for this call on x's GPU, or None (no bucket, no entry, or a batch below
    a quarter of the tuned one, where host time rather than the kernels decides)."""
    bkt = bucket(density)
    if bkt is None:
        return None
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    key = shape_key(gpu_name(index), x.dtype, x.shape, weight.shape, stride, padding, dilation,
                    groups, bkt)
    entry = entries().get(key)
    if entry is None or x.shape[0] * 4 < entry.get("batch", 0):
        return None
    return entry


def triton_wins(entry):
    return entry is not None and entry["triton_ms"] < entry["cudnn_ms"]
