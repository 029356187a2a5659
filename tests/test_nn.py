"""sdclr_fast.nn: MaskedConv2d, dual BN, ResNets, heads and the SDCLR self-competitor.

The self-competitor is checked against two independent plain-PyTorch networks (nn.Conv2d,
nn.BatchNorm*d, nn.Linear only): a dense copy, and a pruned copy whose conv weights are
weight * mask and whose BN layers carry the pruned branch's parameters and statistics.
"""
import copy

import torch

CUDA = torch.cuda.is_available()

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

import sdclr_fast  # noqa: E402
from sdclr_fast.nn import (  # noqa: E402
    DualBatchNorm1d, DualBatchNorm2d, MaskedConv2d, ProjectionHead, SelfCompetitor, build_model,
    resnet18, resnet34, resnet50, sdclr_head, simclr_head, to_masked_convs)
from sdclr_fast.ops.prune import magnitude_masks, prune_model  # noqa: E402
from sdclr_fast.ops.reference import magnitude_masks_reference, nt_xent_reference  # noqa: E402

HYP = dict(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])


def _randomise_bn(model, gen):
    """Distinct affine parameters and running statistics in every BN (and branch), so that a
    test can tell which set a forward used."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen, dtype=m.weight.dtype) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen, dtype=m.bias.dtype) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen, dtype=m.running_mean.dtype) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=m.running_var.dtype) + 0.5)


# ====================================================================== plain-PyTorch copies
class _PlainBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class _PlainResNet18(nn.Module):
    """CIFAR-stem ResNet-18 from torch.nn layers only, parameter names as in sdclr_fast.nn."""

    def __init__(self, in_channels, width):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        cin = width
        for i in range(4):
            cout = width * 2 ** i
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(_PlainBlock(cin, cout, stride), _PlainBlock(cout, cout, 1)))
            cin = cout

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))


class _PlainNet(nn.Module):
    def __init__(self, in_channels, width, proj_dim, head_layers):
        super().__init__()
        self.backbone = _PlainResNet18(in_channels, width)
        d = 8 * width
        layers = []
        for _ in range(head_layers - 1):
            layers += [nn.Linear(d, d, bias=False), nn.BatchNorm1d(d), nn.ReLU()]
        layers += [nn.Linear(d, proj_dim, bias=False), nn.BatchNorm1d(proj_dim)]  # SDCLR's final BN
        self.head = nn.Module()
        self.head.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.head.net(self.backbone(x))


def plain_copy(model, branch):
    """A plain network holding `branch`'s view of a SelfCompetitor: conv weights times the mask
    for 'pruned', and that branch's BN parameters and running statistics."""
    head_layers = sum(isinstance(m, nn.Linear) for m in model.head.modules())
    width = model.backbone.width
    ref = next(model.parameters())
    plain = _PlainNet(model.backbone.in_channels, width, model.head.out_dim, head_layers).to(
        ref.device, ref.dtype)
    src = model.state_dict()
    state = {}
    for name in plain.state_dict():
        dual = name.rsplit(".", 1)
        key = f"{dual[0]}.{branch}.{dual[1]}"
        if key in src:  # a dual BN entry
            state[name] = src[key].clone()
        elif name.endswith(".weight") and name[:-len("weight")] + "mask" in src and branch == "pruned":
            state[name] = src[name] * src[name[:-len("weight")] + "mask"]
        else:
            state[name] = src[name].clone()
    plain.load_state_dict(state)
    return plain


def tiny_model(method="sdclr", width=4, in_channels=3, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = build_model(arch="resnet18", method=method, in_channels=in_channels, width=width,
                        cifar_stem=True, proj_dim=8).to(dtype)
    _randomise_bn(model, torch.Generator().manual_seed(seed + 1))
    return model


# ====================================================================== MaskedConv2d
@settings(**HYP)
@given(cin=st.integers(1, 6), cout_mult=st.integers(1, 3), k=st.sampled_from([1, 2, 3]),
       stride=st.integers(1, 2), padding=st.integers(0, 2), dilation=st.integers(1, 2),
       groups=st.sampled_from([1, 2]), bias=st.booleans(), p=st.sampled_from([0.0, 0.3, 0.9, 1.0]),
       seed=st.integers(0, 2 ** 16))
def test_masked_conv_equals_conv_with_masked_weight(cin, cout_mult, k, stride, padding, dilation, groups, bias,
                                                    p, seed):
    gen = torch.Generator().manual_seed(seed)
    cin *= groups
    cout = cout_mult * groups
    conv = MaskedConv2d(cin, cout, k, stride, padding, dilation, groups, bias, dtype=torch.float64)
    mask = torch.rand(conv.weight.shape, generator=gen) >= p
    conv.set_mask(mask)
    x = torch.randn(2, cin, 7, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    y = conv(x)
    ref = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias, dtype=torch.float64)
    ref.load_state_dict({n: v for n, v in conv.state_dict().items() if n != "mask"})
    xr = x.detach().clone().requires_grad_()
    yr = F.conv2d(xr, ref.weight * mask, ref.bias, stride, padding, dilation, groups)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    y.backward(gy)
    yr.backward(gy)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv.weight.grad, ref.weight.grad, rtol=1e-12, atol=1e-12)
    assert bool((conv.weight.grad[~mask] == 0).all())  # pruned weights: no gradient
    if bias:
        torch.testing.assert_close(conv.bias.grad, ref.bias.grad, rtol=1e-12, atol=1e-12)


def test_masked_conv_off_is_plain_conv_and_string_padding():
    gen = torch.Generator().manual_seed(0)
    conv = MaskedConv2d(3, 5, 3, padding="same", dtype=torch.float64)
    conv.set_mask(torch.rand(conv.weight.shape, generator=gen) < 0.5)
    x = torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64)
    conv.mask_enabled = False
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding="same"), rtol=0, atol=0)
    conv.mask_enabled = True
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight * conv.mask, conv.bias, padding="same"),
                               rtol=1e-12, atol=1e-12)
    assert "mask_enabled=True" in repr(conv)


def test_masked_conv_defaults_and_gradcheck():
    conv = MaskedConv2d(2, 3, 3, padding=1, dtype=torch.float64)
    assert conv.mask.dtype == torch.bool and conv.mask.shape == conv.weight.shape and bool(conv.mask.all())
    assert conv.mask_enabled and conv.density() == 1.0
    gen = torch.Generator().manual_seed(1)
    conv.set_mask(torch.rand(conv.weight.shape, generator=gen) < 0.5)
    x = torch.randn(1, 2, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    # gradcheck perturbs the parameters in place, so conv(a) sees the perturbed w and b
    assert torch.autograd.gradcheck(lambda a, w, b: conv(a), (x, conv.weight, conv.bias))


def test_masked_conv_state_dict_round_trip():
    gen = torch.Generator().manual_seed(2)
    conv = MaskedConv2d(4, 6, 3, padding=1)
    conv.set_mask(torch.rand(conv.weight.shape, generator=gen) < 0.3)
    state = conv.state_dict()
    assert "mask" in state and torch.equal(state["mask"], conv.mask)
    other = MaskedConv2d(4, 6, 3, padding=1)
    other.load_state_dict(state)
    assert torch.equal(other.mask, conv.mask) and torch.equal(other.weight, conv.weight)
    x = torch.randn(2, 4, 5, 5, generator=gen)
    torch.testing.assert_close(other(x), conv(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="mask"):  # the mask is a required (persistent) entry
        MaskedConv2d(4, 6, 3, padding=1).load_state_dict({k: v for k, v in state.items() if k != "mask"})


def test_masked_conv_set_mask_checks_and_keeps_buffer():
    conv = MaskedConv2d(2, 3, 3)
    buf = conv.mask
    conv.set_mask(torch.zeros(conv.weight.shape))  # 0/1 float accepted, copied in place
    assert conv.mask is buf and not bool(buf.any()) and buf.dtype == torch.bool
    conv.set_mask(torch.ones(conv.weight.shape, dtype=torch.int8))
    assert bool(buf.all())
    with pytest.raises(ValueError, match="shape"):
        conv.set_mask(torch.ones(3, 2, 3, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="only 0 and 1"):
        conv.set_mask(torch.full(conv.weight.shape, 0.5))
    with pytest.raises(ValueError, match="dtype"):
        conv.set_mask(torch.ones(conv.weight.shape, dtype=torch.complex64))
    with pytest.raises(ValueError, match="device"):
        conv.set_mask(torch.ones(conv.weight.shape, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="torch.Tensor"):
        conv.set_mask([[1]])
    with pytest.raises(ValueError, match="padding_mode"):
        MaskedConv2d(2, 3, 3, padding_mode="reflect")


def test_masked_conv_from_conv_and_to_masked_convs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 2, 1, bias=False)))
    x = torch.randn(2, 3, 6, 6)
    want = net(x)
    net = to_masked_convs(net)
    assert isinstance(net[0], MaskedConv2d) and isinstance(net[2][0], MaskedConv2d)
    assert net[2][0].bias is None
    torch.testing.assert_close(net(x), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="nn.Conv2d"):
        MaskedConv2d.from_conv(nn.Linear(2, 2))


def test_masked_conv_mask_change_after_forward_keeps_that_forwards_gradient():
    """set_mask between forward and backward (in place on the buffer) does not reach that
    backward: its gradient is the one of the mask the forward used."""
    torch.manual_seed(2)
    conv = MaskedConv2d(2, 2, 1, bias=False)
    conv.set_mask(torch.tensor([[1, 0], [0, 1]], dtype=torch.bool)[:, :, None, None])
    y = conv(torch.ones(1, 2, 3, 3))
    conv.set_mask(torch.zeros(conv.weight.shape, dtype=torch.bool))
    y.sum().backward()
    assert torch.equal(conv.weight.grad[:, :, 0, 0], torch.tensor([[9.0, 0.0], [0.0, 9.0]]))


@pytest.mark.slow
@pytest.mark.parametrize("module_channels_last", [False, True])
def test_masked_conv_triton_path_channels_last(monkeypatch, module_channels_last):
    """The module through the Triton kernels (interpreter on CPU), channels-last input; with
    `module.to(memory_format=channels_last)` the weight and the mask buffer are channels-last too."""
    monkeypatch.setenv("SDCLR_FAST_FORCE_TRITON", "1")
    # fp32 on a GPU: the kernels follow cudnn.allow_tf32 (on by default); compare at full precision.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    gen = torch.Generator().manual_seed(3)
    dev = "cuda" if CUDA else "cpu"
    conv = MaskedConv2d(5, 6, 3, stride=2, padding=1, device=dev)
    if module_channels_last:
        conv.to(memory_format=torch.channels_last)
        assert not conv.mask.is_contiguous() and not conv.weight.is_contiguous()
    conv.set_mask((torch.rand(conv.weight.shape, generator=gen) < 0.5).to(dev))
    x = torch.randn(2, 5, 7, 7, generator=gen).to(dev).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = conv(x)
    x64, w64 = x.detach().double().requires_grad_(), conv.weight.detach().double().requires_grad_()
    ref = F.conv2d(x64, w64 * conv.mask, conv.bias.detach().double(), 2, 1)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(dev)
    y.backward(gy)
    ref.backward(gy.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.weight.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)


# ====================================================================== dual BN
@pytest.mark.parametrize("cls,shape", [(DualBatchNorm2d, (6, 3, 4, 4)), (DualBatchNorm1d, (6, 3))])
def test_dual_bn_branches_keep_their_own_statistics(cls, shape):
    gen = torch.Generator().manual_seed(0)
    bn = cls(3)
    assert isinstance(bn.dense, nn.modules.batchnorm._BatchNorm) and bn.dense is not bn.pruned
    with torch.no_grad():
        bn.pruned.weight.fill_(2.0)
    x = torch.randn(shape, generator=gen) * 3 + 1
    before = copy.deepcopy(bn.state_dict())
    bn.train()
    assert bn.branch == "dense"
    torch.testing.assert_close(bn(x), F.batch_norm(x, None, None, bn.dense.weight, bn.dense.bias, True),
                               rtol=1e-6, atol=1e-6)
    after_dense = bn.state_dict()
    for k in before:  # only the dense statistics moved
        moved = not torch.equal(before[k], after_dense[k])
        assert moved == (k.startswith("dense.") and ("running" in k or "num_batches" in k)), k
    bn.branch = "pruned"
    y = bn(x)
    torch.testing.assert_close(y, F.batch_norm(x, None, None, bn.pruned.weight, bn.pruned.bias, True),
                               rtol=1e-6, atol=1e-6)
    after_pruned = bn.state_dict()
    for k in before:
        if k.startswith("dense."):
            assert torch.equal(after_pruned[k], after_dense[k]), k
        elif "running" in k or "num_batches" in k:
            assert not torch.equal(after_pruned[k], before[k]), k
    # eval: each branch normalises with its own running statistics
    bn.eval()
    for b in ("dense", "pruned"):
        bn.branch = b
        m = getattr(bn, b)
        want = F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False)
        torch.testing.assert_close(bn(x), want)
    assert torch.equal(bn.dense.running_mean, after_pruned["dense.running_mean"])
    with pytest.raises(ValueError, match="branch"):
        bn.branch = "sparse"
    assert "branch=pruned" in repr(bn)


def test_sync_batchnorm_conversion_keeps_dual_behaviour():
    model = tiny_model(dtype=torch.float32)
    model.update_masks(0.5)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    model.eval()
    want = {b: model(x, branch=b) for b in ("dense", "pruned")}
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    bns = [m for m in synced.modules() if isinstance(m, (DualBatchNorm1d, DualBatchNorm2d))]
    assert bns and all(isinstance(m.dense, nn.SyncBatchNorm) and isinstance(m.pruned, nn.SyncBatchNorm)
                       for m in bns)
    synced.eval()
    for b in ("dense", "pruned"):
        torch.testing.assert_close(synced(x, branch=b), want[b])
    # train mode without a process group: SyncBatchNorm acts as BatchNorm, per branch
    synced.train()
    before = {k: v.clone() for k, v in synced.state_dict().items() if "running_mean" in k}
    synced(x, branch="pruned")
    after = synced.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v) == (".dense." in k), k
    assert synced.state_dict().keys() == model.state_dict().keys()


# ====================================================================== the self-competitor
@pytest.mark.parametrize("sparsity,scope,method,in_channels,size", [
    (0.9, "global", "sdclr", 3, 12), (0.5, "layer", "sdclr", 1, 7), (0.0, "global", "sdclr", 3, 9),
    (0.9, "global", "simclr", 3, 8)])
def test_self_competitor_gradient_equals_two_plain_models(sparsity, scope, method, in_channels, size):
    """L = NT-Xent(z_dense(v1), z_pruned(v2)) with one backward through the shared weights gives
    the sum of the dense copy's gradient and the masked pruned copy's gradient (times the mask),
    BN parameters and statistics per branch, and the same loss. (SimCLR models have plain BN,
    shared by both branches: its gradient is the sum too.)"""
    model = tiny_model(method=method, in_channels=in_channels)
    kept = model.update_masks(sparsity=sparsity, scope=scope)
    assert 0 < kept <= 1
    model.train()
    dense, pruned = plain_copy(model, "dense"), plain_copy(model, "pruned")
    dense.train()
    pruned.train()
    gen = torch.Generator().manual_seed(7)
    v1 = torch.randn(5, in_channels, size, size, generator=gen, dtype=torch.float64)
    v2 = torch.randn(5, in_channels, size, size, generator=gen, dtype=torch.float64)

    loss = nt_xent_reference(model(v1, branch="dense"), model(v2, branch="pruned"), 0.2)
    loss.backward()
    ref = nt_xent_reference(dense(v1), pruned(v2), 0.2)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)

    dp, pp = dict(dense.named_parameters()), dict(pruned.named_parameters())
    state = model.state_dict()
    used = {"dense": set(), "pruned": set()}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if "dense" in parts or "pruned" in parts:  # a BN parameter of one branch
            b = "dense" if "dense" in parts else "pruned"
            plain_name = ".".join(x for x in parts if x != b)
            want = (dp if b == "dense" else pp)[plain_name].grad
            used[b].add(plain_name)
        elif p.dim() == 4:  # shared conv weight: dense grad + mask * (pruned copy's grad)
            mask = state[name[:-len("weight")] + "mask"]
            want = dp[name].grad + pp[name].grad * mask
            used["dense"].add(name)
            used["pruned"].add(name)
            # pruned weights get gradient only from the dense branch
            torch.testing.assert_close(p.grad[~mask], dp[name].grad[~mask], rtol=1e-10, atol=1e-14)
        else:  # shared head Linear
            want = dp[name].grad + pp[name].grad
            used["dense"].add(name)
            used["pruned"].add(name)
        torch.testing.assert_close(p.grad, want, rtol=1e-9, atol=1e-12, msg=name)
    assert used["dense"] == set(dp) and used["pruned"] == set(pp)  # every plain parameter compared
    # running statistics follow the branch that produced them
    for name, buf in model.named_buffers():
        parts = name.split(".")
        if "dense" in parts or "pruned" in parts:
            b = "dense" if "dense" in parts else "pruned"
            plain_buf = dict((dense if b == "dense" else pruned).named_buffers())[".".join(x for x in parts if x != b)]
            torch.testing.assert_close(buf, plain_buf, rtol=1e-10, atol=1e-12, msg=name)


def test_self_competitor_eval_branches_match_plain_models_and_masks_only_in_pruned():
    model = tiny_model()
    model.update_masks(0.7)
    model.eval()
    x = torch.randn(3, 3, 10, 10, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    for b in ("dense", "pruned"):
        plain = plain_copy(model, b).eval()
        torch.testing.assert_close(model(x, branch=b), plain(x), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(model.features(x, branch=b), plain.backbone(x), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(model(x, branch="dense"), model(x, branch="pruned"))


def test_branch_context_manager_and_defaults():
    model = tiny_model()
    model.update_masks(0.8)
    model.eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    zd, zp = model(x, branch="dense"), model(x, branch="pruned")
    assert model.active_branch == "dense"
    torch.testing.assert_close(model(x), zd, rtol=0, atol=0)
    with model.branch("pruned") as m:
        assert m is model and model.active_branch == "pruned"
        torch.testing.assert_close(model(x), zp, rtol=0, atol=0)
        torch.testing.assert_close(model.head(model.backbone(x)), zp, rtol=0, atol=0)
        torch.testing.assert_close(model(x, branch="dense"), zd, rtol=0, atol=0)  # explicit wins
        assert model.active_branch == "pruned"  # ... and is restored
        with model.branch("dense"):
            torch.testing.assert_close(model.features(x), model.features(x, branch="dense"))
        assert model.active_branch == "pruned"
    assert model.active_branch == "dense"
    with pytest.raises(KeyError):
        with model.branch("pruned"):
            raise KeyError("boom")
    assert model.active_branch == "dense"  # restored after an exception
    assert all(not m.mask_enabled for m in model.backbone.modules() if isinstance(m, MaskedConv2d))
    with pytest.raises(ValueError, match="branch"):
        model(x, branch="sparse")
    with pytest.raises(ValueError, match="branch"):
        with model.branch(None):
            pass
    assert "active_branch=dense" in repr(model)


def test_update_masks_follows_the_global_rule_and_leaves_the_head_alone():
    model = tiny_model(dtype=torch.float32, width=8)
    head_before = copy.deepcopy(model.head.state_dict())
    convs = [(n, p) for n, p in model.named_parameters() if p.dim() == 4]
    assert len(convs) == 20  # 17 3x3 convs + 3 1x1 shortcuts
    weights_before = [p.detach().clone() for _, p in convs]
    for sparsity in (0.9, 0.5, 0.0, 0.999):
        kept = model.update_masks(sparsity=sparsity)
        want = magnitude_masks_reference([p for _, p in convs], sparsity)
        masks = model.masks()
        assert list(masks) == [n for n, _ in convs]
        for (name, _), w in zip(convs, want):
            assert torch.equal(masks[name], w), name
        n = sum(w.numel() for w in want)
        assert kept == pytest.approx(sum(int(w.sum()) for w in want) / n, abs=0)
        assert kept == pytest.approx(model.density(), abs=0)
        same = prune_model(model.backbone, sparsity)
        assert all(torch.equal(masks["backbone." + k], v) for k, v in same.items())
    for (_, p), w in zip(convs, weights_before):
        assert torch.equal(p, w)  # weights untouched
    for k, v in model.head.state_dict().items():
        assert torch.equal(v, head_before[k]), k
    assert not any("head" in k and k.endswith("mask") for k in model.state_dict())
    # layer scope and block masks go through the same op
    model.update_masks(0.75, scope="layer")
    for (name, p), m in zip(convs, magnitude_masks([p for _, p in convs], 0.75, scope="layer")):
        assert torch.equal(model.masks()[name], m)
    model.update_masks(0.5, block=(2, 2))
    for (name, p), m in zip(convs, magnitude_masks([p for _, p in convs], 0.5, block=(2, 2))):
        assert torch.equal(model.masks()[name], m)
    with pytest.raises(ValueError, match="sparsity"):
        model.update_masks(1.0)
    with pytest.raises(ValueError, match="scope"):
        model.update_masks(0.5, scope="net")


def test_update_masks_exact_global_fraction():
    """Fraction pruned = ceil(p * n) / n for distinct magnitudes."""
    model = tiny_model(dtype=torch.float32, width=4)
    convs = [p for p in model.parameters() if p.dim() == 4]
    n = sum(p.numel() for p in convs)
    with torch.no_grad():  # distinct magnitudes, shuffled over all layers
        vals = (torch.randperm(n, generator=torch.Generator().manual_seed(0)).float() + 1) / n
        signs = torch.where(torch.rand(n, generator=torch.Generator().manual_seed(1)) < 0.5, -1.0, 1.0)
        flat = vals * signs
        i = 0
        for p in convs:
            p.copy_(flat[i:i + p.numel()].reshape(p.shape))
            i += p.numel()
    import math
    for sparsity in (0.9, 0.33, 0.5):
        kept = model.update_masks(sparsity)
        assert round((1 - kept) * n) == math.ceil(sparsity * n)


def test_masks_in_state_dict_round_trip_and_set_masks():
    model = tiny_model()
    model.update_masks(0.8)
    state = model.state_dict()
    mask_keys = [k for k in state if k.endswith(".mask")]
    assert len(mask_keys) == 20 and all(k.startswith("backbone.") for k in mask_keys)
    fresh = build_model(arch="resnet18", method="sdclr", in_channels=3, width=4, proj_dim=8).double()
    assert fresh.density() == 1.0
    fresh.load_state_dict(state)
    assert fresh.density() == pytest.approx(model.density())
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    model.eval()
    fresh.eval()
    for b in ("dense", "pruned"):
        torch.testing.assert_close(fresh(x, branch=b), model(x, branch=b), rtol=0, atol=0)
    # set_masks takes prune_model's output (keys with or without "backbone.")
    masks = prune_model(fresh.backbone, 0.3)
    fresh.set_masks(masks)
    assert all(torch.equal(fresh.masks()["backbone." + k], v) for k, v in masks.items())
    fresh.set_masks(model.masks())
    assert all(torch.equal(fresh.masks()[k], v) for k, v in model.masks().items())
    with pytest.raises(ValueError, match="missing"):
        fresh.set_masks({"conv1.weight": masks["conv1.weight"]})
    with pytest.raises(ValueError, match="dict"):
        fresh.set_masks([1])


def test_masks_stay_fixed_until_update():
    model = tiny_model(dtype=torch.float32, width=2)
    model.update_masks(0.9)
    masks = {k: v.clone() for k, v in model.masks().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(11))
    for _ in range(2):
        opt.zero_grad()
        nt_xent_reference(model(x, branch="dense"), model(x.flip(3), branch="pruned")).backward()
        opt.step()
    assert all(torch.equal(model.masks()[k], v) for k, v in masks.items())
    model.update_masks(0.9)
    assert any(not torch.equal(model.masks()[k], v) for k, v in masks.items())


def test_self_competitor_rejects_plain_convs():
    head = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="MaskedConv2d"):
        SelfCompetitor(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), head)
    with pytest.raises(ValueError, match="no MaskedConv2d"):
        SelfCompetitor(nn.Flatten(), head)
    with pytest.raises(ValueError, match="nn.Modules"):
        SelfCompetitor(lambda x: x, head)
    # a converted third-party backbone works
    bb = to_masked_convs(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    model = SelfCompetitor(bb, head)
    assert 0 < model.update_masks(0.5) <= 0.55
    assert model(torch.randn(2, 3, 5, 5), branch="pruned").shape == (2, 2)


def test_simclr_model_uses_plain_bn_and_two_layer_head():
    model = build_model(arch="resnet18", method="simclr", in_channels=1, width=4, proj_dim=16)
    assert isinstance(model, SelfCompetitor) and model.method == "simclr"
    assert not any(isinstance(m, (DualBatchNorm1d, DualBatchNorm2d)) for m in model.modules())
    assert sum(isinstance(m, nn.Linear) for m in model.head.modules()) == 2
    assert [m.out_features for m in model.head.modules() if isinstance(m, nn.Linear)] == [32, 16]
    sd = build_model(arch="resnet18", method="sdclr", in_channels=1, width=4, proj_dim=16)
    assert [m.out_features for m in sd.head.modules() if isinstance(m, nn.Linear)] == [32, 32, 16]
    assert sum(isinstance(m, DualBatchNorm1d) for m in sd.head.modules()) == 3  # the last one after the output
    assert isinstance(sd.head.net[-1], DualBatchNorm1d) and isinstance(model.head.net[-1], nn.BatchNorm1d)
    assert sum(isinstance(m, DualBatchNorm2d) for m in sd.backbone.modules()) == 20
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    assert model(x).shape == (4, 16)
    dense = plain_copy(model.double(), "dense").eval()
    torch.testing.assert_close(model(x.double()), dense(x.double()), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kwargs,match", [
    (dict(arch="vgg"), "arch"), (dict(method="byol"), "method"), (dict(width=0), "width"),
    (dict(in_channels=True), "in_channels"), (dict(cifar_stem="yes"), "cifar_stem"),
    (dict(proj_dim=0), "out_dim"), (dict(hidden_dim=-1), "hidden_dim")])
def test_build_model_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model(**kwargs)


def test_lazy_exports():
    assert sdclr_fast.SelfCompetitor is SelfCompetitor
    assert sdclr_fast.MaskedConv2d is MaskedConv2d
    assert sdclr_fast.DualBatchNorm2d is DualBatchNorm2d


# ====================================================================== backbones and heads
@pytest.mark.parametrize("fn,mult", [(resnet18, 8), (resnet34, 8), (resnet50, 32)])
@pytest.mark.parametrize("cifar_stem,size", [(True, 16), (False, 32)])
@pytest.mark.parametrize("in_channels,width", [(3, 8), (1, 4)])
def test_backbone_shapes(fn, mult, cifar_stem, size, in_channels, width):
    net = fn(in_channels=in_channels, width=width, cifar_stem=cifar_stem, dual_bn=False)
    assert net.feature_dim == mult * width
    net.eval()
    f = net(torch.randn(2, in_channels, size, size))
    assert f.shape == (2, mult * width) and bool(torch.isfinite(f).all())
    assert all(isinstance(m, MaskedConv2d) for m in net.modules() if isinstance(m, nn.Conv2d))


def test_stems():
    cifar, imnet = resnet18(width=4, cifar_stem=True), resnet18(width=4, cifar_stem=False)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity)
    assert imnet.conv1.kernel_size == (7, 7) and imnet.conv1.stride == (2, 2) and imnet.conv1.padding == (3, 3)
    assert isinstance(imnet.maxpool, nn.MaxPool2d)
    # spatial size entering layer1: 16 (cifar) vs 16 / 4 = 4 (imagenet)
    seen = {}
    for name, net in (("cifar", cifar), ("imnet", imnet)):
        net.layer1.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.shape[-1]))
        net.eval()(torch.randn(1, 3, 16, 16))
    assert seen == {"cifar": 16, "imnet": 4}


def test_parameter_counts_match_torchvision():
    """Backbone parameters (conv + BN affine) equal torchvision's resnet18 / resnet50 without fc
    (11,689,512 - 513,000 and 25,557,032 - 2,049,000); conv weights of the CIFAR ResNet-18 are
    11,159,232 (~11.2M)."""
    def count(net):
        return sum(p.numel() for p in net.parameters())

    assert count(resnet18(cifar_stem=False, dual_bn=False)) == 11_689_512 - 513_000
    assert count(resnet50(cifar_stem=False, dual_bn=False)) == 25_557_032 - 2_049_000
    cifar = resnet18(cifar_stem=True)
    conv = sum(p.numel() for p in cifar.parameters() if p.dim() == 4)
    assert conv == 11_159_232 and abs(conv - 11.2e6) / 11.2e6 < 0.005
    # dual BN doubles only the BN parameters
    bn = sum(p.numel() for n, p in cifar.named_parameters() if p.dim() == 1)
    assert bn == 2 * sum(p.numel() for p in resnet18(dual_bn=False).parameters() if p.dim() == 1)


@pytest.mark.parametrize("branch", ["dense", "pruned"])
def test_channels_last_input_matches_contiguous(branch):
    model = tiny_model(width=4)
    model.update_masks(0.6)
    x = torch.randn(3, 3, 9, 9, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    xc = x.contiguous(memory_format=torch.channels_last)
    assert not xc.is_contiguous()
    model.train()
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    z = model(x, branch=branch)
    w = torch.randn(z.shape, generator=torch.Generator().manual_seed(13), dtype=z.dtype)
    (z * w).sum().backward()
    zc = cl(xc, branch=branch)
    (zc * w).sum().backward()
    torch.testing.assert_close(zc, z, rtol=1e-10, atol=1e-12)
    other = "pruned" if branch == "dense" else "dense"
    for (n, p), (nc, pc) in zip(model.named_parameters(), cl.named_parameters()):
        assert n == nc
        if f".{other}." in n:  # the other branch's BN took no part
            assert p.grad is None and pc.grad is None, n
        else:
            torch.testing.assert_close(pc.grad, p.grad, rtol=1e-9, atol=1e-12, msg=n)


def test_backbone_input_checks():
    net = resnet18(width=4, in_channels=1)
    with pytest.raises(ValueError, match="channels"):
        net(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="4-d"):
        net(torch.randn(2, 8, 8))
    with pytest.raises(ValueError, match="layers"):
        resnet18.__globals__["ResNet"](resnet18.__globals__["BasicBlock"], [2, 2])


def test_projection_head():
    for num_layers, dual, last_bn in ((1, False, True), (2, False, True), (3, True, True), (4, True, False),
                                      (2, False, False)):
        head = ProjectionHead(6, 5, 3, num_layers=num_layers, dual_bn=dual, last_bn=last_bn)
        lin = [m for m in head.modules() if isinstance(m, nn.Linear)]
        assert len(lin) == num_layers and (lin[-1].bias is None) == last_bn
        assert all(m.bias is None for m in lin[:-1])  # BN follows: its shift replaces the bias
        bns = [m for m in head.net if isinstance(m, (nn.BatchNorm1d, DualBatchNorm1d))]
        assert len(bns) == num_layers - 1 + last_bn and all(isinstance(b, DualBatchNorm1d) == dual for b in bns)
        assert isinstance(head.net[-1], (nn.BatchNorm1d, DualBatchNorm1d)) == last_bn
        head.train()
        z = head(torch.randn(8, 6))
        assert z.shape == (8, 3)
        if last_bn:  # training-mode BN output: zero mean, unit variance per feature
            torch.testing.assert_close(z.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    assert simclr_head(512).in_dim == 512 and simclr_head(512).num_layers == 2 and not simclr_head(512).dual_bn
    h = sdclr_head(512)
    assert (h.num_layers, h.hidden_dim, h.out_dim, h.dual_bn) == (3, 512, 128, True)
    with pytest.raises(ValueError, match=r"\(B, 6\)"):
        ProjectionHead(6, 5, 3)(torch.randn(4, 7))
    with pytest.raises(ValueError, match="num_layers"):
        ProjectionHead(6, 5, 3, num_layers=0)
    with pytest.raises(ValueError, match="dual_bn"):
        ProjectionHead(6, 5, 3, dual_bn=1)


@pytest.mark.slow
def test_pruned_branch_through_triton_kernels(monkeypatch):
    """The whole pruned branch with the Triton kernels (interpreter on CPU) against the plain
    pruned copy in float64; tiny sizes because the interpreter is slow."""
    model = tiny_model(dtype=torch.float32, width=2)
    model.update_masks(0.7)
    model.eval()
    dev = "cuda" if CUDA else "cpu"
    model.to(dev)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(13)).to(dev)
    want = plain_copy(model.double(), "pruned").eval()(x.double())
    model.float()
    monkeypatch.setenv("SDCLR_FAST_FORCE_TRITON", "1")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.testing.assert_close(model(x, branch="pruned").double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_traces_both_branches_without_graph_breaks():
    """Under torch.compile the pruned convs trace through masked_conv2d (on the CPU its PyTorch
    path: a convolution); values and gradients equal eager, the branch flags are restored."""
    torch.manual_seed(0)
    backbone = nn.Sequential(MaskedConv2d(3, 8, 3, padding=1, bias=False), DualBatchNorm2d(8), nn.ReLU(),
                             MaskedConv2d(8, 8, 1, stride=2, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = SelfCompetitor(backbone, ProjectionHead(8, 8, 4, num_layers=2, dual_bn=True))
    model.update_masks(0.6)
    gen = torch.Generator().manual_seed(14)
    v1, v2 = torch.randn(4, 3, 6, 6, generator=gen), torch.randn(4, 3, 6, 6, generator=gen)

    def step(m, a, b):
        return nt_xent_reference(m(a, branch="dense"), m(b, branch="pruned"))

    twin = copy.deepcopy(model)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(step)(copy.deepcopy(model), v1, v2)
    assert explain.graph_break_count == 0
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss_c = compiled(twin, v1, v2)
    loss_c.backward()
    loss = step(model, v1, v2)
    loss.backward()
    torch.testing.assert_close(loss_c, loss)
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=lambda m, n=n: f"{n}: {m}")
    for (n, b), (_, c) in zip(model.named_buffers(), twin.named_buffers()):
        torch.testing.assert_close(c, b, msg=n)
    assert twin.active_branch == "dense" and not twin.backbone[0].mask_enabled
    assert twin.head.net[1].branch == "dense"


def test_compiled_sdclr_step_calls_the_masked_conv_op(monkeypatch):
    """Where masked_conv2d takes its kernel path (CUDA; here forced, in the interpreter), a compiled
    SDCLR step holds the op's custom op for every pruned conv: MaskedConv2d no longer swaps it for a
    masked copy of the weight under torch.compile."""
    monkeypatch.setenv("SDCLR_FAST_FORCE_TRITON", "1")
    torch.manual_seed(0)
    backbone = nn.Sequential(MaskedConv2d(3, 8, 3, padding=1, bias=False), DualBatchNorm2d(8), nn.ReLU(),
                             MaskedConv2d(8, 8, 1, stride=2, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = SelfCompetitor(backbone, ProjectionHead(8, 8, 4, num_layers=2, dual_bn=True))
    model.update_masks(0.6)
    v1, v2 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(lambda a, b: nt_xent_reference(model(a, branch="dense"),
                                                                   model(b, branch="pruned")))(v1, v2)
    assert explain.graph_break_count == 0
    code = str(explain.graphs[0].code)
    assert code.count("sdclr_fast.masked_conv2d_fwd") == 2, code  # the pruned branch's two convs


def test_modules_replaced_after_construction_follow_the_branch():
    model = tiny_model(width=2)
    new_bn = DualBatchNorm1d(model.head.hidden_dim).double()
    model.head.net[1] = new_bn
    seen = []
    new_bn.register_forward_pre_hook(lambda m, i: seen.append(m.branch))
    model.eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    model(x, branch="pruned")
    model(x, branch="dense")
    assert seen == ["pruned", "dense"] and new_bn.branch == "dense"


def test_random_prune_follows_the_official_rule():
    """The official Mask.magnitudePruning(p - r, r): magnitude threshold at ceil((p - r) n), then
    every weight dropped with probability ceil(r n) / (n - ceil((p - r) n))."""
    import math

    from sdclr_fast.ops.reference import magnitude_masks_reference

    model = build_model(arch="resnet18", method="sdclr", in_channels=1, width=4, proj_dim=8)
    weights = [m.weight for m in model.masked_convs().values()]
    n = sum(w.numel() for w in weights)
    p, r = 0.9, 0.3
    kept = model.update_masks(p, random_fraction=r, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    q = math.ceil(r * n) / (n - math.ceil((p - r) * n))
    want = [m & (torch.rand(m.shape, generator=g) >= q) for m in magnitude_masks_reference(weights, p - r)]
    for got, ref in zip(model.masks().values(), want):
        assert torch.equal(got, ref)
    assert kept == pytest.approx(sum(int(m.sum()) for m in want) / n)
    assert abs(kept - (1 - p)) < 0.02  # about `sparsity` pruned in all
    assert model.update_masks(p, random_fraction=0.0) == pytest.approx(1 - p, abs=1e-3)
    with pytest.raises(ValueError, match="random_fraction"):
        model.update_masks(0.5, random_fraction=0.6)
