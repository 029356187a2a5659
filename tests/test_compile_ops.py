"""nt_xent and info_nce as compile-visible custom ops: torch.library.opcheck, torch.compile
(fullgraph, Inductor on CPU) with no graph break and no recompile when only values change,
eager values and gradients; check_finite=False reads no device value."""
import os


import pytest  # noqa: E402
import torch  # noqa: E402
import torch._dynamo.testing  # noqa: E402

from sdclr_fast.ops import info_nce as inf  # noqa: E402
from sdclr_fast.ops import nt_xent as nt  # noqa: E402


def _rows(m, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, generator=g, dtype=dtype)


@pytest.mark.parametrize("triton", [False, True])
def test_opcheck_nt_xent(triton):
    if triton and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton ops run on CPU tensors in the interpreter only")
    u = _rows(6, 8, 0).requires_grad_()
    tau = torch.tensor([0.3], requires_grad=True)
    inv_tau = (1 / tau.detach()).float()
    keys = torch.arange(6, dtype=torch.int32).remainder(3)
    for args in [(u, tau, inv_tau, keys, 6, True, None, False, True),
                 (u, None, inv_tau, torch.tensor([0, 0, 1, 2, 2, 2]), 6, True, None, True, False)]:
        torch.library.opcheck(nt._ops[triton], args)


def test_opcheck_info_nce():
    q, k, n = _rows(5, 4, 0).requires_grad_(), _rows(5, 4, 1).requires_grad_(), _rows(3, 4, 2)
    inv_tau = torch.tensor([5.0])
    torch.library.opcheck(inf._ops[False], (q, k, n, None, inv_tau, None, None, 5, True, True,
                                            True, None))


def _compile_counted(fn):
    cnt = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    return torch.compile(fn, backend=cnt, fullgraph=True), cnt


@pytest.mark.parametrize("loss", ["nt_xent", "nt_xent_labels", "info_nce"])
def test_compile_fullgraph_no_recompile(loss):
    """fullgraph=True (a graph break raises), one frame compiled once over three calls with a
    new temperature tensor value, an in-place weight change and a new batch of the same shape;
    values and gradients match eager."""
    torch._dynamo.reset()
    lin = torch.nn.Linear(8, 6)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3])

    def step(a, b, tau):
        z1, z2 = lin(a), lin(b)
        if loss == "nt_xent":
            return nt.nt_xent(z1, z2, tau)
        if loss == "nt_xent_labels":
            return nt.nt_xent(torch.cat([z1, z2]), temperature=tau, labels=labels,
                              multi_positive="in")
        return inf.info_nce(z1, z2, tau, symmetric=True)

    compiled, cnt = _compile_counted(step)
    tau = torch.tensor(0.2)
    for i in range(3):
        a, b = _rows(4, 8, 2 * i), _rows(4, 8, 2 * i + 1)
        tau.fill_(0.2 + 0.1 * i)
        with torch.no_grad():
            lin.weight.mul_(0.9)
        out = compiled(a, b, tau)
        g = torch.autograd.grad(out, list(lin.parameters()))
        ref = step(a, b, tau)
        gr = torch.autograd.grad(ref, list(lin.parameters()))
        torch.testing.assert_close(out, ref)
        for x, y in zip(g, gr):
            torch.testing.assert_close(x, y)
    assert cnt.frame_count == 1


def test_compiled_graph_calls_the_custom_op():
    """The loss is one custom-op node of the graph (not an opaque graph break)."""
    torch._dynamo.reset()
    explain = torch._dynamo.explain(lambda a, b: nt.nt_xent(a, b, 0.2))(_rows(3, 4, 0),
                                                                        _rows(3, 4, 1))
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    assert "sdclr_fast.nt_xent_fwd" in str(explain.graphs[0].code)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the interpreter")
@pytest.mark.parametrize("fn", ["nt_xent", "nt_xent_labels", "info_nce"])
def test_check_finite_false_reads_no_value(monkeypatch, fn):
    """The kernel path with check_finite=False (what a CUDA step runs) never reads a tensor's
    value on the host: .item(), bool() and .tolist() raise here."""
    z1, z2 = _rows(4, 8, 0).requires_grad_(), _rows(4, 8, 1).requires_grad_()
    tau = torch.tensor(0.3)
    labels = torch.tensor([5, 9, 5, 7, 9, 9, 1, 7])

    def run():
        if fn == "nt_xent":
            out = nt.nt_xent(z1, z2, tau, check_finite=False, _backend="triton")
        elif fn == "nt_xent_labels":
            out = nt.nt_xent(torch.cat([z1, z2]), temperature=tau, labels=labels,
                             multi_positive="in", check_finite=False, _backend="triton")
        else:
            out = inf.info_nce(z1, z2, tau, symmetric=True, labels=labels[:4],
                               check_finite=False, _backend="triton")
        out.backward()

    run()  # warm caches

    def boom(*a, **k):
        raise AssertionError("host read of a tensor value")

    for name in ("item", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    run()
    monkeypatch.undo()
    with pytest.raises(AssertionError, match="host read"):  # the patch does catch a check
        for name in ("item", "__bool__", "tolist"):
            monkeypatch.setattr(torch.Tensor, name, boom)
        nt.nt_xent(z1, z2, tau, check_finite=True, _backend="triton")


@pytest.mark.parametrize("fn", ["nt_xent", "info_nce"])
def test_check_finite_modes(fn):
    """None checks CPU tensors, True always, False never; the error names the argument."""
    a, b = _rows(3, 4, 0), _rows(3, 4, 1)
    b[1, 2] = float("nan")
    call = nt.nt_xent if fn == "nt_xent" else inf.info_nce
    name = "z2" if fn == "nt_xent" else "key"
    for mode in (None, True):
        with pytest.raises(ValueError, match=f"{name} holds NaN or inf"):
            call(a, b, 0.2, check_finite=mode)
    assert torch.isnan(call(a, b, 0.2, check_finite=False))
    with pytest.raises(ValueError, match="temperature must be finite"):
        call(a, a, torch.tensor(-1.0))
    with pytest.raises(ValueError, match="check_finite must be"):
        call(a, a, 0.2, check_finite="yes")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs CUDA and TRITON_INTERPRET=0")
@pytest.mark.parametrize("fn", ["nt_xent", "nt_xent_labels", "info_nce"])
def test_cuda_default_path_does_not_sync(fn):
    """The eager CUDA default (check_finite=None) issues no synchronisation, forward and
    backward (after a warm-up call that compiles the kernels)."""
    z1 = torch.randn(64, 32, device="cuda", requires_grad=True)
    z2 = torch.randn(64, 32, device="cuda", requires_grad=True)
    tau = torch.tensor(0.2, device="cuda")
    labels = torch.arange(128, device="cuda") % 40

    def run():
        if fn == "nt_xent":
            out = nt.nt_xent(z1, z2, tau)
        elif fn == "nt_xent_labels":
            out = nt.nt_xent(torch.cat([z1, z2]), temperature=tau, labels=labels)
        else:
            out = inf.info_nce(z1, z2, tau, symmetric=True, labels=labels[:64])
        out.backward()

    run()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_pretrain_compiled_step_compiles_once(tmp_path):
    """`pretrain --compile`: the step (both forwards, loss, backward) is one fullgraph frame
    compiled once; mask updates at three epoch starts and the per-step learning-rate schedule
    (a tensor updated in place) recompile nothing; the loss stays finite."""
    import json

    from tests.test_train import DATA, tiny_config

    from sdclr_fast.train.pretrain import pretrain

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cfg = tiny_config(epochs=3, compile="default", batch_size=16)
    pretrain(cfg, run_dir=tmp_path, data=DATA)
    c = torch._dynamo.utils.counters
    assert c["stats"]["unique_graphs"] == 1 and c["aot_autograd"]["total"] == 1, dict(c["stats"])
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert len(epochs) == 3 and all(r["loss"] == r["loss"] for r in epochs)
    assert len({r["lr"] for r in rows if r["kind"] == "step"}) > 3  # the schedule moved


def test_compile_config_modes():
    from tests.test_train import tiny_config

    assert tiny_config(compile=True).compile == "default"  # configs written before the modes
    assert tiny_config(compile=False).compile is None
    assert tiny_config(compile="reduce-overhead").compile == "reduce-overhead"
    with pytest.raises(ValueError, match="compile must be"):
        tiny_config(compile="fast")


# ------------------------------------------------------------------ masked_conv2d
def _conv_args(seed, n=2, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 5, 5, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 2, 3, 3, generator=g)
    m = torch.rand(6, 2, 3, 3, generator=g) > 0.5
    return x, w, m, torch.randn(6, generator=g)


@pytest.mark.parametrize("triton", [False, True])
def test_opcheck_masked_conv(triton):
    """The forward op (its autograd formula calls the backward op): schema, fake tensors,
    autograd registration, AOT dispatch; groups, stride, channels-last, with / without bias."""
    if triton and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton ops run on CPU tensors in the interpreter only")
    from sdclr_fast.ops import masked_conv as mc

    x, w, m, b = _conv_args(0, channels_last=triton)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    torch.library.opcheck(mc._ops["fwd"], (x, w, m, b, [2, 1], [1, 0], [1, 1], 2, None, triton))
    torch.library.opcheck(mc._ops["fwd"], (x, w, m, None, [1, 1], [1, 1], [1, 1], 2, None,
                                           triton))


def test_masked_conv_fake_checks_match_eager():
    """The fake implementation raises the eager call's errors (a compiled trace or a direct op
    call on fake tensors fails like eager)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sdclr_fast.ops import masked_conv as mc

    x, w, m, b = _conv_args(0)
    cases = [((x, w, m[:3], b), "mask must have the weight's shape"),
             ((x, w, m, b[:2]), r"bias must be None or a tensor of shape \(6,\)"),
             ((x[:, :3], w, m, b), "x has 3 channels but weight expects"),
             ((x.double(), w.double(), m, b), "bias must have the dtype of x")]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            mc.masked_conv2d(*args, groups=2)
        with FakeTensorMode() as mode, pytest.raises(ValueError, match=match):
            fargs = [mode.from_tensor(a) for a in args]
            mc._ops["fwd"](*fargs, [1, 1], [0, 0], [1, 1], 2, None, False)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with FakeTensorMode() as mode:  # shape / strides of the output
        y = mc._ops["fwd"](mode.from_tensor(x_cl),
                           mode.from_tensor(w), mode.from_tensor(m), None, [2, 2], [1, 1],
                           [1, 1], 2, None, True)
    assert y.shape == (2, 6, 3, 3) and y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("path", ["auto", "triton"])
def test_compile_masked_conv_fullgraph_no_recompile(path):
    """fullgraph=True (a graph break raises) over masked_conv2d: one frame compiled once over
    three calls with a new batch of the same shape, an in-place mask update (mask.copy_, new
    tile map from the version-keyed cache) and an in-place weight change; values and
    gradients of x, weight and bias match eager. path: the default dispatch (CPU: traced
    F.conv2d) or the forced Triton path (the custom ops, kernels in the interpreter)."""
    if path == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton ops run on CPU tensors in the interpreter only")
    from sdclr_fast.ops.masked_conv import masked_conv2d

    torch._dynamo.reset()
    _, w, mask, b = _conv_args(0)
    w.requires_grad_(), b.requires_grad_()

    def step(x):
        return masked_conv2d(x, w, mask, b, stride=1, padding=1, groups=2, _backend=path).tanh()

    compiled, cnt = _compile_counted(step)
    before = None
    for i in range(3):
        x = _conv_args(10 + i)[0].requires_grad_()
        if i == 1:
            mask.copy_(_conv_args(20)[2])
        if i == 2:
            with torch.no_grad():
                w.mul_(0.5)
        out = compiled(x)
        g = torch.autograd.grad(out.square().sum(), [x, w, b])
        ref = step(x)
        gr = torch.autograd.grad(ref.square().sum(), [x, w, b])
        torch.testing.assert_close(out, ref)
        for a, e in zip(g, gr):
            torch.testing.assert_close(a, e)
        assert g[1][~mask].abs().max() == 0  # pruned weights get no gradient
        if i == 1:  # the mask update reached the compiled call
            assert not torch.allclose(out, before)
        before = out
    assert cnt.frame_count == 1 and cnt.op_count > 0


@pytest.mark.parametrize("path", ["auto", "triton"])
def test_compiled_masked_conv_graph(path):
    """No graph break; the forced Triton path is one custom-op node, the CPU default a traced
    convolution (no custom op)."""
    from sdclr_fast.ops.masked_conv import masked_conv2d

    torch._dynamo.reset()
    x, w, m, b = _conv_args(0)
    explain = torch._dynamo.explain(
        lambda x, w, m, b: masked_conv2d(x, w, m, b, padding=1, groups=2, _backend=path))(
            x, w, m, b)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    code = str(explain.graphs[0].code)
    assert ("sdclr_fast.masked_conv2d_fwd" in code) == (path == "triton")
    assert path == "triton" or "conv2d" in code


def test_compiled_masked_conv_bad_arguments():
    """A compiled call raises the eager call's ValueError."""
    from sdclr_fast.ops.masked_conv import masked_conv2d

    x, w, m, b = _conv_args(0)
    for kwargs, match in [(dict(_backend="fast", groups=2), "_backend must be"),
                          (dict(groups=4), "groups=4 must divide"),
                          (dict(_backend="triton", block=(16, 24), groups=2),
                           "block must be a pair")]:
        torch._dynamo.reset()
        with pytest.raises(ValueError, match=match):
            masked_conv2d(x, w, m, b, **kwargs)
        with pytest.raises(Exception, match=match):  # Dynamo may wrap the user error
            torch.compile(lambda x: masked_conv2d(x, w, m, b, **kwargs), fullgraph=True)(x)
