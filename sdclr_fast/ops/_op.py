"""The wiring every op in ops/ shares: backend choice, custom-op definition, and for the fused
losses (nt_xent, info_nce) the eager autograd Function, the router and the reduction tail.

How a fused loss fills it in (ops/nt_xent.py is the model):

1. Its per-row forward as two plain functions with annotated signatures, one per backend:
   ``fwd[False]`` (PyTorch) and ``fwd[True]`` (Triton kernels, launched through
   torch.library.wrap_triton), both ``fwd(*inputs) -> (rows, *stats)``. The first ``n_grads``
   inputs are the differentiable ones (a None there is an absent optional input); the rest
   are tensors the backward needs and plain configuration values. Only ``rows`` is
   differentiable; ``stats`` (per-row log-sum-exps, counts, ...) go to the backward.
2. Its backward per backend, ``bwd(grad_rows, *inputs, *stats, *needs) -> grads``: one
   boolean per differentiable input, one gradient per differentiable input (an empty tensor
   where not needed: a custom op's outputs must not be None or alias each other).
3. Fake implementations ``fwd_fake(*inputs, triton)`` and ``bwd_fake`` (shapes and dtypes).
4. ``dense(*inputs) -> rows``: the same per-row losses in differentiable PyTorch ops over the
   materialised score matrix. It is the route of torch.func transforms and forward-mode AD,
   and the backward under create_graph=True is autograd over it, so higher derivatives are
   exact without a hand-derived second formula.

`FusedLoss(name, fwd, bwd, fwd_fake, bwd_fake, dense, n_grads)` then defines the custom ops
``sdclr_fast::<name>_fwd`` / ``_bwd`` (and ``_triton`` variants as triton_op) with the
registered autograd, plus an eager autograd.Function over the same implementations, and
``loss(*inputs, triton=...)`` routes a call: torch.compile -> the custom op, a torch.func
transform -> ``dense``, else the eager Function (no dispatcher round-trip, whose host time a
small loss on a GPU waits for). The op's public function keeps its argument checks and
preparation, calls ``loss``, and ends with `reduce_rows`.

Ops whose eager path is plain autograd (masked_conv2d, masked_linear) use `backend_choice`,
`define_op` and `TRITON_DTYPES` from here: one backend flag convention (the string
``_backend``: "auto", "triton" or "torch") and one reading of the SDCLR_FAST_FORCE_TRITON
switch for every op.
"""
import importlib
import inspect
import os

import torch
from torch._library.triton import set_wrap_triton_enabled

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("auto", "triton", "torch")


def kernels(name):
    """The Triton module ``sdclr_fast.kernels.<name>``, imported on first use so that CPU-only
    callers never load Triton (kernels/ is installed as sdclr_fast.kernels)."""
    return importlib.import_module(f"sdclr_fast.kernels.{name}")


def backend_choice(t, backend, what):
    """The backend flag of every op: "triton" where ``_backend="triton"`` or
    SDCLR_FAST_FORCE_TRITON=1 (read at call time; tests send CPU tensors through the kernels in
    the interpreter) force the kernels, "torch" where ``_backend="torch"`` forbids them, else
    "auto" (the op's own policy decides). A forced call checks that ``t`` (named by `what`)
    has a dtype the kernels take."""
    if backend == "torch":
        return "torch"
    if backend == "triton" or os.environ.get("SDCLR_FAST_FORCE_TRITON", "0") == "1":
        if t.dtype not in TRITON_DTYPES:
            raise ValueError(f"the Triton kernels take {what} of dtype float32/float16/bfloat16, "
                             f"got {t.dtype}")
        return "triton"
    if backend != "auto":
        raise ValueError(f"_backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    return "auto"


def use_triton(z, backend, what):
    """Whether a fused loss runs its Triton kernels: `backend_choice`, and under "auto" CUDA
    tensors of float32 / float16 / bfloat16."""
    choice = backend_choice(z, backend, what)
    if choice == "auto":
        return z.is_cuda and z.dtype in TRITON_DTYPES
    return choice == "triton"


def compute_dtype(t):
    """The dtype the PyTorch paths compute in: float64 for float64 input, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def transformed(*ts):
    """Whether a torch.func transform (grad, vmap, jvp, jacrev, ...) or forward-mode AD sees any
    of these tensors; the custom ops' registered autograd does not run there, so the losses
    take their dense formulation. torch.compile traces the custom ops."""
    if torch.compiler.is_compiling():
        return False
    if torch.autograd.forward_ad._current_level >= 0:
        return True
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(isinstance(t, torch.Tensor) and wrapped(t) for t in ts)


def interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_HAS_TAGS = "tags" in inspect.signature(torch.library.custom_op).parameters


def define_op(name, fn, fake, *, triton=False, cudagraph_unsafe=False):
    """A custom op ``sdclr_fast::<name>`` that torch.compile traces without a graph break.

    triton=True (fn launches Triton kernels through torch.library.wrap_triton):
    torch.library.triton_op, so that Inductor sees the launches; fn itself is the fake
    implementation. In Triton's interpreter (TRITON_INTERPRET=1) kernels are plain Python
    functions that cannot run on fake tensors, so there, and for the PyTorch paths, the op is
    an opaque torch.library.custom_op with `fake` as its fake implementation.
    cudagraph_unsafe: tag the op so (where torch has the tag) CUDA graphs leave it out, for ops
    whose host-side work (a cache, a dispatch) must run every call."""
    qualname = f"sdclr_fast::{name}"
    if triton and not interpreting():
        return torch.library.triton_op(qualname, fn, mutates_args=())
    kw = {}
    tag = getattr(torch.Tag, "cudagraph_unsafe", None)
    if cudagraph_unsafe and tag is not None and _HAS_TAGS:
        kw["tags"] = (tag,)
    op = torch.library.custom_op(qualname, fn, mutates_args=(), **kw)
    op.register_fake(fake)
    return op


def reduce_rows(rows, reduction, weights, dtype):
    """The reduction tail of the losses: per-row ``weights`` (already laid out like ``rows``,
    or None), then "none" / "sum" / "mean", in ``dtype``."""
    if weights is not None:
        rows = rows * weights.to(rows.dtype)
    if reduction == "sum":
        rows = rows.sum()
    elif reduction == "mean":
        rows = rows.mean()
    return rows.to(dtype)


class FusedLoss:
    """The custom ops, eager Function and router of one fused loss (see the module docstring
    for what the op provides). Defined at import: an op cannot be defined while torch.compile
    traces, and neither definition imports Triton.

    ``ops[triton]``: the forward custom op of each path (what torch.compile sees and
    torch.library.opcheck checks); ``Function``: the eager autograd.Function, whose forward
    takes the op's inputs and then the ``triton`` flag."""

    def __init__(self, name, fwd, bwd, fwd_fake, bwd_fake, dense, n_grads):
        self.dense = dense
        self.n_grads = n_grads
        self.ops = {}
        for triton in (False, True):
            sfx = "_triton" if triton else ""

            def fake(*inputs, _triton=triton):
                return fwd_fake(*inputs, triton=_triton)
            op = define_op(f"{name}_fwd{sfx}", fwd[triton], fake, triton=triton)
            bwd_op = define_op(f"{name}_bwd{sfx}", bwd[triton], bwd_fake, triton=triton)
            op.register_autograd(self._backward_over(bwd_op), setup_context=self._setup_context)
            op.register_vmap(_vmap_over(op))
            self.ops[triton] = op
        self.Function = _eager_function(self, fwd, bwd)
        # Function.apply binds the arguments with inspect.signature when setup_context is
        # defined (~100 us a call on a CPU); outside functorch transforms the C-level apply runs
        self._apply = super(torch.autograd.Function, self.Function).apply

    def __call__(self, *inputs, triton):
        """The per-row losses (the first output of the forward) by the route of this call."""
        if torch.compiler.is_compiling():
            return self.ops[triton](*inputs)[0]
        if transformed(*inputs):
            return self.dense(*inputs)
        if torch._C._are_functorch_transforms_active():  # e.g. a captured plain tensor
            return self.Function.apply(*inputs, triton)[0]
        return self._apply(*inputs, triton)[0]

    @staticmethod
    def _setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[1:])
        where = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor)]
        ctx.save_for_backward(*(inputs[i] for i in where), *output[1:])
        ctx.layout = (where, [None if isinstance(a, torch.Tensor) else a for a in inputs])

    def _backward_over(self, bwd):
        def backward(ctx, grad_rows, *_):
            return self.backward(ctx, grad_rows, bwd)
        return backward

    def backward(self, ctx, grad_rows, bwd):
        """The gradients of the inputs: the fused backward ``bwd``, or under create_graph=True
        (grad mode, outside torch.compile) autograd over the dense formulation, so that they
        are differentiable again."""
        where, inputs = ctx.layout
        saved = ctx.saved_tensors
        inputs = list(inputs)
        for i, t in zip(where, saved):
            inputs[i] = t
        needs = [bool(ctx.needs_input_grad[i]) and inputs[i] is not None
                 for i in range(self.n_grads)]
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            grads = self._dense_grads(grad_rows, inputs, needs)
        else:
            grads = bwd(grad_rows, *inputs, *saved[len(where):], *needs)
        return (*(g if need else None for g, need in zip(grads, needs)),
                *([None] * (len(inputs) - self.n_grads)))

    def _dense_grads(self, grad_rows, inputs, needs):
        rows = self.dense(*inputs)
        want = [t for t, need in zip(inputs, needs) if need]
        got = iter(torch.autograd.grad(rows, want, grad_rows.to(rows.dtype), create_graph=True,
                                       allow_unused=True))
        grads = []
        for t, need in zip(inputs, needs):
            g = next(got) if need else None
            if need:  # an input the rows do not depend on (e.g. an unused temperature)
                g = torch.zeros_like(t) if g is None else g.to(t.dtype)
            grads.append(g)
        return grads


def _vmap_over(op):
    """The custom op's vmap rule (a compiled function under torch.func.vmap): one call per batch
    element, the kernels having no batch dimension."""
    def vmap(info, in_dims, *inputs):
        outs = [op(*(a.select(d, b) if d is not None else a for a, d in zip(inputs, in_dims)))
                for b in range(info.batch_size)]
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
    return vmap


def _eager_function(loss, fwd, bwd):
    """The eager autograd.Function of `loss`: its implementations called directly, their
    wrap_triton launches plain kernel launches (outside a triton_op, wrap_triton would route
    each launch through the tracing machinery)."""

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(*args):
            with set_wrap_triton_enabled(False):
                return fwd[args[-1]](*args[:-1])

        @staticmethod
        def setup_context(ctx, inputs, output):
            FusedLoss._setup_context(ctx, inputs[:-1], output)
            ctx.triton = inputs[-1]

        @staticmethod
        def backward(ctx, grad_rows, *_):
            with set_wrap_triton_enabled(False):
                return *loss.backward(ctx, grad_rows, bwd[ctx.triton]), None

    return Eager
