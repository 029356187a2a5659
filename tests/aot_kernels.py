"""Compile the working tree's nt_xent / info_nce kernels for sm_90 and sm_80 as their launches
specialise them, without a GPU (run as a script with TRITON_INTERPRET=0; the tests call it in
a child process).

    python tests/aot_kernels.py ROOT nt_xent|info_nce|broken

The kernels come from ROOT/kernels imported as the top-level package `kernels` (not an
installed copy). Each launch variant is compiled with the constexprs of the op's own `plan`
for a named workload (nt_xent at 2N = 4,096; info_nce's MoCo form M = 1,024, Q = 65,536)
through bench/kernel_report.py's `compile_launch`, i.e. Triton's own binder on the launch's
arguments (CPU tensors stand in for the pointers), so integers equal to 1 become constants
and multiples of 16 and pointers get divisibility 16 exactly as JITFunction.run specialises
them; every cubin must use no stack (no spills: `kernel_report.resources`). Prints "ok
<number compiled>". `broken` compiles a kernel that reads a non-constexpr global, which the
compiler must reject: the harness is seen to fail.
"""
import os
import sys

root, mode = sys.argv[1], sys.argv[2]
sys.path.insert(0, root)
sys.path.insert(0, os.path.join(root, "bench"))
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import kernel_report as kr  # noqa: E402

INT_PTRS = ("key_ptr", "cnt_ptr", "kx_ptr", "ky_ptr")
ROW_PTRS = ("z_ptr", "x_ptr", "y_ptr", "n_ptr")
GPUS = {90: kr.GPUS["sm_90"], 80: kr.GPUS["sm_80"]}


def _pointer(name, dtype):
    # what the op passes: rows in the input dtype, int32 keys / counts, fp32 statistics
    dt = dtype if name in ROW_PTRS else torch.int32 if name in INT_PTRS else torch.float32
    return torch.empty(16, dtype=dt)


def compile_like_launch(fn, consts, ints, dtype, arch, launch):
    """Compile fn for sm_<arch> as a launch with these constexprs, integer arguments and launch
    options would be; assert that the cubin uses no stack."""
    args = {a: consts[a] if a in consts else _pointer(a, dtype) if a.endswith("_ptr") else ints[a]
            for a in fn.arg_names}
    compiled, _, _ = kr.compile_launch(kr.Launch(fn, (), dict(args, **launch), (1,)), GPUS[arch])
    stack = kr.resources(compiled.asm["cubin"]).get("STACK", 0)
    assert stack == 0, (fn.__name__, arch, consts, "stack (spill) bytes", stack)
    return 1


# (dtype, D, TF32): bf16 in one tile, fp32 IEEE and TF32, bf16 D in chunks
CONFIGS = ((torch.bfloat16, 128, False), (torch.float32, 128, False), (torch.float32, 128, True),
           (torch.bfloat16, 300, False))


def nt_xent():
    from kernels import nt_xent as k

    M = R = 4096
    n = 0
    for dtype, d, tf32 in CONFIGS:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for paired, pos_lse in ((True, False), (False, False), (False, True)):
            p = k.plan(M, R, d, dtype, 132, paired)
            assert p["meta"]["PAIRED"] == paired
            ints = dict(R=R, M=M, H=M // 2, D=d, s_zm=d, s_zd=1, s_ds=M * d, s_dm=d, s_dd=1)
            for arch in (90, 80):
                for split in (True, False):
                    n += compile_like_launch(
                        k._nt_xent_fwd_kernel, dict(p["meta"], POS_LSE=pos_lse, SPLIT=split),
                        dict(ints, CHUNK=p["fwd_chunk"]), dtype, arch, p["launch"])
                n += compile_like_launch(k._nt_xent_bwd_kernel, dict(p["meta"], POS_LSE=pos_lse),
                                         dict(ints, CHUNK=p["bwd_chunk"]), dtype, arch,
                                         p["launch"])
    for arch in (90, 80):
        for pos_lse in (False, True):
            n += compile_like_launch(k._nt_xent_merge_kernel, dict(POS_LSE=pos_lse, BLOCK_M=128),
                                     dict(R=R, splits=4), torch.float32, arch, {})
    return n


def info_nce():
    from kernels import info_nce as k

    M, Q = 1024, 65536
    n = 0
    for dtype, d, tf32 in CONFIGS:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        ints = dict(M=M, C=M, Q=Q, D=d, s_xm=d, s_xd=1, s_ym=d, s_yd=1, s_nm=d, s_nd=1, R=M, RL=M,
                    CL=M, s_os=M * d, s_om=d, s_od=1)
        for arch in (90, 80):
            for diag_only in (False, True):
                meta, launch, _, chunk = k.plan(M, M, Q, d, dtype, 132, diag_only)
                # index keys (no labels: the positive on the diagonal) for the in-batch form
                for split, index in ((True, False), (False, False), (True, True))[:3 - diag_only]:
                    n += compile_like_launch(
                        k._info_nce_fwd_kernel, dict(meta, NORMALIZE=True, DIAG_ONLY=diag_only,
                                                     HAS_N=True, SPLIT=split, INDEX_KEYS=index,
                                                     EVEN_D=d % meta["BLOCK_D"] == 0),
                        dict(ints, CHUNK=chunk), dtype, arch, launch)
            # dx (bank columns), dy (symmetric, no bank), dn (bank rows against the queries)
            for xa, ya, paired, has_n, rows, rl, q in ((True, True, True, True, M, M, Q),
                                                        (True, True, True, False, M, M, 0),
                                                        (False, True, False, False, Q, 0, 0)):
                meta, launch, _, chunk = k.plan(rows, M, q, d, dtype, 132)
                for index in (False, True) if paired else (False,):
                    n += compile_like_launch(
                        k._info_nce_bwd_kernel,
                        dict(meta, NORMALIZE=True, X_ANCHOR=xa, Y_ANCHOR=ya, PAIRED=paired,
                             DIAG_ONLY=False, HAS_N=has_n, INDEX_KEYS=index),
                        dict(ints, R=rows, RL=rl, Q=q, CHUNK=chunk, s_os=rows * d), dtype, arch,
                        launch)
    for arch in (90, 80):
        n += compile_like_launch(k._info_nce_merge_kernel, dict(BLOCK_M=128),
                                 dict(M=M, splits=16), torch.float32, arch, {})
    return n


if mode == "broken":
    SCALE = 2.0  # not tl.constexpr: the interpreter accepts it, the compiler must not

    @triton.jit
    def _broken(x_ptr):
        tl.store(x_ptr, tl.load(x_ptr) * SCALE)

    kr.compile_launch(kr.Launch(_broken, (torch.empty(16),), {}, (1,)), GPUS[90])
    print("compiled")
    sys.exit(0)
print("ok", {"nt_xent": nt_xent, "info_nce": info_nce}[mode]())
