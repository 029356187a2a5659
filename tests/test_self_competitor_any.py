"""self_competitor() on models sdclr-fast did not build: plain-torch CNN and ViT, timm ResNet-50
and ViT-Tiny. What became what, statistics carried into both branches, the dense branch equal
to the unconverted model, and one SDCLR step against the official three-forward /
two-backward structure on plain copies; `--arch timm:` runs that resume bit-identically and
evaluate (on Fashion-MNIST-LT IDX files written here: the real 60k-image set is too large for a
test).

timm imports torchvision; where torchvision's C++ ops do not load beside the CPU torch
(PyPI's wheels are CUDA builds), `import_timm` declares the two op schemas torchvision
registers fakes for at import and imports again (see train/models.py).
"""
import copy

import torch
import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from sdclr_fast.nn import (DualBatchNorm2d, DualLayerNorm, DualNorm, MaskedConv2d,  # noqa: E402
                           MaskedLinear, SelfCompetitor, dual_norm, self_competitor)
from sdclr_fast.ops.reference import nt_xent_reference  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _timm():
    try:
        from sdclr_fast.train.models import import_timm

        return import_timm()
    except ImportError as exc:  # pragma: no cover - make setup installs timm
        pytest.skip(f"timm is not installed ({exc}); `make setup` installs it")


def _randomise_norms(model, gen):
    """Distinct affine parameters and running statistics in every norm, so that a test can tell
    which set a forward used and whether they were carried over."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


# ====================================================================== plain-torch models
class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)) + self.shortcut(x))


class TinyCNN(nn.Module):
    """Stem, two blocks with 1x1 shortcuts, global pool, and a classifier `fc`."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(_Block(8, 16, 2), _Block(16, 16, 1))
        self.num_features = 16
        self.fc = nn.Linear(16, num_classes)

    def features(self, x):
        x = self.blocks(F.relu(self.bn1(self.stem(x))))
        return x.mean(dim=(2, 3))

    def forward(self, x):
        return self.features(x)


class _Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class _ViTBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding (a conv), class token, position embedding, blocks, final norm, head."""

    def __init__(self, dim=16, depth=2, patch=4, size=8, in_chans=1):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (size // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*[_ViTBlock(dim, 2) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.num_features = dim
        self.head = nn.Identity()

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def _kinds(model):
    return {n: type(m).__name__ for n, m in model.named_modules()}


def test_cnn_conversion_what_became_what_and_dense_branch_equal():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = TinyCNN()
    _randomise_norms(net, gen)
    x = torch.randn(4, 3, 8, 8, generator=gen)
    for train in (False, True):
        net.train(train)
        ref = copy.deepcopy(net)
        model = self_competitor(copy.deepcopy(net))
        kinds = _kinds(model.backbone)
        # every conv (stem and shortcuts included) pruned; the classifier never
        assert all(kinds[n] == "MaskedConv2d" for n in ("stem", "blocks.0.conv", "blocks.0.shortcut.0",
                                                        "blocks.1.shortcut.0"))
        assert kinds["fc"] == "Linear" and model.excluded == ("fc",)
        assert all(kinds[n] == "DualBatchNorm2d" for n in ("bn1", "blocks.0.bn", "blocks.1.shortcut.1"))
        assert list(model.masked_layers()) == [f"backbone.{n}.weight" for n in (
            "stem", "blocks.0.conv", "blocks.0.shortcut.0", "blocks.1.conv", "blocks.1.shortcut.0")]
        # statistics and affine parameters carried into both branches
        for branch in ("dense", "pruned"):
            torch.testing.assert_close(getattr(model.backbone.bn1, branch).running_var, ref.bn1.running_var,
                                       rtol=0, atol=0)
            torch.testing.assert_close(getattr(model.backbone.bn1, branch).weight, ref.bn1.weight, rtol=0, atol=0)
        assert model.backbone.bn1.training == train
        model.update_masks(0.8)
        torch.testing.assert_close(model.features(x, branch="dense"), ref(x), rtol=0, atol=0)
        assert not torch.allclose(model.features(x, branch="pruned"), ref(x))


def test_vit_conversion_prunes_attention_and_mlp_only():
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    net = TinyViT()
    _randomise_norms(net, gen)
    ref = copy.deepcopy(net).eval()
    model = self_competitor(net).eval()
    kinds = _kinds(model.backbone)
    assert kinds["patch_embed.proj"] == "Conv2d" and model.excluded == ("patch_embed.proj",)
    for i in range(2):
        for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            assert kinds[f"blocks.{i}.{n}"] == "MaskedLinear"
        assert kinds[f"blocks.{i}.norm1"] == "DualLayerNorm"
    assert kinds["norm"] == "DualLayerNorm" and kinds["head"] == "Identity"
    assert "backbone.pos_embed" in dict(model.named_parameters())  # a parameter, never masked
    assert len(model.masked_layers()) == 8
    x = torch.randn(3, 1, 8, 8, generator=gen)
    model.update_masks(0.9)
    torch.testing.assert_close(model.features(x, branch="dense"), ref(x), rtol=0, atol=0)
    # exclusions are an argument: prune the patch embedding too, keep the MLPs dense
    net2 = TinyViT()
    model2 = self_competitor(net2, exclude=("head*", "blocks.*.mlp"))
    kinds2 = _kinds(model2.backbone)
    assert kinds2["patch_embed.proj"] == "MaskedConv2d" and kinds2["blocks.0.mlp.fc1"] == "Linear"
    assert set(model2.excluded) == {f"blocks.{i}.mlp.{f}" for i in range(2) for f in ("fc1", "fc2")}
    # prune=("conv",): linear layers stay dense, so a ViT has nothing but its excluded stem
    with pytest.raises(ValueError, match="has no MaskedConv2d or MaskedLinear"):
        self_competitor(TinyViT(), prune=("conv",))


def test_self_competitor_argument_errors():
    with pytest.raises(ValueError, match="prune must name kinds"):
        self_competitor(TinyCNN(), prune=("bn",))
    with pytest.raises(ValueError, match="exclude must be fnmatch patterns"):
        self_competitor(TinyCNN(), exclude=(3,))
    net = TinyCNN()
    del net.num_features
    with pytest.raises(ValueError, match="head: the model has no int num_features"):
        self_competitor(net)
    model = self_competitor(TinyCNN())
    with pytest.raises(ValueError, match="not yet a SelfCompetitor"):
        self_competitor(model)
    with pytest.raises(ValueError, match="norm must be a BatchNorm or LayerNorm"):
        dual_norm(nn.ReLU())


def test_dual_layer_norm_branches_keep_their_own_affine():
    ln = nn.LayerNorm(6)
    d = dual_norm(ln)
    assert isinstance(d, DualLayerNorm) and d.normalized_shape == (6,)
    with torch.no_grad():
        d.pruned.weight.mul_(2)
    x = torch.randn(3, 6)
    torch.testing.assert_close(d(x), ln(x))
    d.branch = "pruned"
    torch.testing.assert_close(d(x), F.layer_norm(x, (6,), 2 * ln.weight, ln.bias))
    assert isinstance(dual_norm(nn.BatchNorm2d(3)), DualBatchNorm2d)

    class FusedBN(nn.BatchNorm2d):  # a subclass with its own forward (e.g. timm's BatchNormAct2d)
        def forward(self, x):
            return F.relu(super().forward(x))
    fused = dual_norm(FusedBN(3))
    assert type(fused) is DualNorm and isinstance(fused.pruned, FusedBN)


def test_masked_linear_module():
    lin = nn.Linear(8, 4)
    m = MaskedLinear.from_linear(lin)
    mask = torch.rand(4, 8, generator=torch.Generator().manual_seed(2)) > 0.5
    m.set_mask(mask)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(m(x), F.linear(x, lin.weight * mask, lin.bias))
    m.mask_enabled = False
    torch.testing.assert_close(m(x), lin(x))
    assert m.density() == pytest.approx(float(mask.float().mean()))
    with pytest.raises(ValueError, match="mask must have the weight's shape"):
        m.set_mask(torch.ones(8, 4, dtype=torch.bool))
    assert "mask" in m.state_dict()


# ====================================================================== one SDCLR step
def _plain_copy(model, original, branch):
    """`original` (the unconverted architecture, plain layers) holding `branch`'s view of the
    converted `model`: pruned weights times their masks, and that branch's norm parameters and
    statistics."""
    plain = copy.deepcopy(original)
    src = {k[len("backbone."):]: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    state = {}
    for name in plain.state_dict():
        prefix, _, leaf = name.rpartition(".")
        dual = f"{prefix}.{branch}.{leaf}"
        if dual in src:
            state[name] = src[dual].clone()
        elif leaf == "weight" and f"{prefix}.mask" in src and branch == "pruned":
            state[name] = src[name] * src[f"{prefix}.mask"]
        else:
            state[name] = src[name].clone()
    plain.load_state_dict(state)
    return plain


def check_sdclr_step(original, x1, x2, sparsity=0.7):
    """One step of the converted model (two forwards, one backward of the joint NT-Xent) equals
    the official code's three forwards / two backwards on plain copies: loss, every backbone
    and head gradient (shared weights: dense + mask * pruned), and running statistics."""
    original = original.double().train()
    model = self_competitor(copy.deepcopy(original), proj_dim=8).double().train()
    model.update_masks(sparsity)
    head_d = copy.deepcopy(model.head)
    dense, pruned = _plain_copy(model, original, "dense"), _plain_copy(model, original, "pruned")
    head_p = copy.deepcopy(model.head)
    for h, b in ((head_d, "dense"), (head_p, "pruned")):
        for m in h.modules():
            if isinstance(m, DualNorm):
                m._branch = b

    loss = nt_xent_reference(model(x1, branch="dense"), model(x2, branch="pruned"), 0.2)
    loss.backward()

    # official: pruned forward without gradient (on a throwaway copy: its BN statistics are not
    # the step's), dense forward + backward, pruned forward + backward
    with torch.no_grad():
        z2_fixed = copy.deepcopy(head_p)(copy.deepcopy(pruned)(x2))
    z1 = head_d(dense(x1))
    nt_xent_reference(z1, z2_fixed, 0.2).backward()
    z2 = head_p(pruned(x2))
    ref = nt_xent_reference(z1.detach(), z2, 0.2)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)

    dp, pp = dict(dense.named_parameters()), dict(pruned.named_parameters())
    masks = {n: m.mask for n, m in model.masked_layers().items()}
    for name, p in model.backbone.named_parameters():
        full = f"backbone.{name}"
        parts = name.split(".")
        if "dense" in parts or "pruned" in parts:
            b = "dense" if "dense" in parts else "pruned"
            want = (dp if b == "dense" else pp)[".".join(x for x in parts if x != b)].grad
        elif full in masks:
            want = dp[name].grad + pp[name].grad * masks[full]
            assert not (p.grad - dp[name].grad)[~masks[full]].any()  # pruned: dense gradient only
        else:  # excluded layers and embeddings: both branches, unmasked
            if dp[name].grad is None:  # e.g. a classifier the features do not use
                assert p.grad is None and pp[name].grad is None, name
                continue
            want = dp[name].grad + pp[name].grad
        torch.testing.assert_close(p.grad, want, rtol=1e-9, atol=1e-12, msg=name)
    hd, hp = dict(head_d.named_parameters()), dict(head_p.named_parameters())
    for name, p in model.head.named_parameters():
        parts = name.split(".")
        if "dense" in parts:
            want = hd[name].grad
        elif "pruned" in parts:
            want = hp[name].grad
        else:
            want = hd[name].grad + hp[name].grad
        torch.testing.assert_close(p.grad, want, rtol=1e-9, atol=1e-12, msg=name)
    for name, buf in model.backbone.named_buffers():
        parts = name.split(".")
        if buf.is_floating_point() and ("dense" in parts or "pruned" in parts):
            b = "dense" if "dense" in parts else "pruned"
            plain = dict((dense if b == "dense" else pruned).named_buffers())
            torch.testing.assert_close(buf, plain[".".join(x for x in parts if x != b)], msg=name)
    return model


def test_sdclr_step_plain_cnn_and_vit():
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    cnn = TinyCNN()
    _randomise_norms(cnn, gen)
    check_sdclr_step(cnn, torch.randn(5, 3, 8, 8, generator=gen, dtype=torch.float64),
                     torch.randn(5, 3, 8, 8, generator=gen, dtype=torch.float64))
    vit = TinyViT()
    _randomise_norms(vit, gen)
    check_sdclr_step(vit, torch.randn(5, 1, 8, 8, generator=gen, dtype=torch.float64),
                     torch.randn(5, 1, 8, 8, generator=gen, dtype=torch.float64))


# ====================================================================== timm models
def _timm_model(name, **kw):
    timm = _timm()
    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False, num_classes=0, **kw)
    _randomise_norms(net, torch.Generator().manual_seed(4))
    return net


@pytest.mark.slow
def test_timm_resnet50_conversion_and_step():
    """timm's ResNet-50 (pooled features, no classifier): all 53 convs pruned (stem and the 4
    downsample shortcuts included), all 53 BatchNorms dual with the statistics carried over,
    the dense branch equal to the model; one SDCLR step as the official structure."""
    net = _timm_model("resnet50")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    for train in (False, True):
        ref = copy.deepcopy(net).train(train)
        model = self_competitor(copy.deepcopy(net).train(train))
        convs = [n for n, m in ref.named_modules() if isinstance(m, nn.Conv2d)]
        kinds = _kinds(model.backbone)
        assert len(convs) == 53 and all(kinds[n] == "MaskedConv2d" for n in convs)
        assert kinds["conv1"] == "MaskedConv2d" and kinds["layer1.0.downsample.0"] == "MaskedConv2d"
        bns = [n for n, m in ref.named_modules() if isinstance(m, nn.BatchNorm2d)]
        assert len(bns) == 53 and all(kinds[n] == "DualBatchNorm2d" for n in bns)
        assert model.excluded == ()  # fc is an Identity with num_classes=0
        for b in ("dense", "pruned"):
            assert torch.equal(getattr(model.backbone.layer3[2].bn2, b).running_mean,
                               ref.layer3[2].bn2.running_mean)
        model.update_masks(0.9)
        torch.testing.assert_close(model.features(x, branch="dense"), ref(x), rtol=0, atol=0)
    gen = torch.Generator().manual_seed(6)
    check_sdclr_step(net, torch.randn(3, 3, 32, 32, generator=gen, dtype=torch.float64),
                     torch.randn(3, 3, 32, 32, generator=gen, dtype=torch.float64), sparsity=0.9)


def test_timm_vit_tiny_conversion_and_step():
    """timm's ViT-Tiny at 32x32 with 8x8 patches (16 tokens): the 4 Linear layers of every one
    of the 12 blocks pruned (qkv, proj, fc1, fc2), the patch embedding kept dense and listed,
    every LayerNorm dual, the dense branch equal to the model; one SDCLR step as the official
    structure."""
    net = _timm_model("vit_tiny_patch16_224", img_size=32, patch_size=8)
    ref = copy.deepcopy(net).eval()
    model = self_competitor(copy.deepcopy(net)).eval()
    kinds = _kinds(model.backbone)
    lins = [n for n, m in ref.named_modules() if isinstance(m, nn.Linear)]
    assert len(lins) == 48 and all(kinds[n] == "MaskedLinear" for n in lins)
    assert {n.rsplit(".", 1)[-1] for n in lins} == {"qkv", "proj", "fc1", "fc2"}
    assert model.excluded == ("patch_embed.proj",) and kinds["patch_embed.proj"] == "Conv2d"
    norms = [n for n, m in ref.named_modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 25 and all(isinstance(dict(model.backbone.named_modules())[n], DualNorm)
                                    for n in norms)
    assert isinstance(model.backbone.blocks[0].norm1.pruned, type(ref.blocks[0].norm1))
    model.update_masks(0.9)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(model.features(x, branch="dense"), ref(x), rtol=0, atol=0)
    assert not torch.allclose(model.features(x, branch="pruned"), ref(x))
    gen = torch.Generator().manual_seed(8)
    small = _timm_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=2)
    check_sdclr_step(small, torch.randn(4, 3, 16, 16, generator=gen, dtype=torch.float64),
                     torch.randn(4, 3, 16, 16, generator=gen, dtype=torch.float64), sparsity=0.9)


def test_sync_batchnorm_keeps_timm_norm_act_activations():
    """SyncBN for a DDP run keeps what timm's BatchNorm + activation layers compute: torch's
    converter turns a BatchNormAct2d (a BatchNorm2d subclass) into a plain SyncBatchNorm and
    drops its activation; convert_sync_batchnorm takes timm's converter for such a model, in
    both branches of the dual layers self_competitor made. Compared in eval mode (running
    statistics; a training-mode SyncBatchNorm needs a process group on CUDA)."""
    from sdclr_fast.train.models import convert_sync_batchnorm

    timm = _timm()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), timm.layers.BatchNormAct2d(8, act_layer=nn.ReLU),
                        nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.Flatten())
    _randomise_norms(net, torch.Generator().manual_seed(5))
    model = self_competitor(net, nn.Linear(8 * 16, 4)).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        synced = convert_sync_batchnorm(copy.deepcopy(model)).eval()
        plain = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
        assert {type(m).__name__ for m in synced.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)} == {"SyncBatchNorm", "SyncBatchNormAct"}
        for branch in ("dense", "pruned"):
            torch.testing.assert_close(synced(x, branch=branch), model(x, branch=branch))
        assert not torch.allclose(plain(x), model(x))  # the control: torch's converter drops the ReLU


def test_parse_timm_arch_and_errors():
    from sdclr_fast.train.models import build_model_from_args, parse_timm_arch

    assert parse_timm_arch("timm:vit_tiny_patch16_224:patch_size=4,depth=2,qkv_bias=False,mlp_ratio=2.5") == (
        "vit_tiny_patch16_224", dict(patch_size=4, depth=2, qkv_bias=False, mlp_ratio=2.5))
    assert parse_timm_arch("timm:resnet50") == ("resnet50", {})
    with pytest.raises(ValueError, match="set by sdclr-fast"):
        parse_timm_arch("timm:resnet50:pretrained=True")
    with pytest.raises(ValueError, match="key=value pairs"):
        parse_timm_arch("timm:resnet50:depth")
    _timm()
    with pytest.raises(ValueError, match="timm has no model 'no_such_net'"):
        build_model_from_args(dict(arch="timm:no_such_net", method="sdclr", in_channels=1, image_size=8))


@pytest.mark.parametrize("method", ["simclr", "sdclr", "moclr"])
def test_build_timm_model_per_method(method):
    from sdclr_fast.train.models import build_model_from_args

    _timm()
    model = build_model_from_args(dict(arch="timm:vit_tiny_patch16_224:patch_size=4,depth=1", method=method,
                                       in_channels=1, image_size=8, proj_dim=16, width=64, cifar_stem=True))
    assert isinstance(model, SelfCompetitor) and model.method == method
    duals = sum(isinstance(m, DualNorm) for m in model.modules())
    assert (duals > 0) == (method == "sdclr")
    assert (model.predictor is not None) == (method == "moclr")
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 16)


# ====================================================================== runs
TIMM_VIT = "timm:vit_tiny_patch16_224:patch_size=7,depth=2"


@pytest.mark.slow
def test_timm_vit_sdclr_fashion_mnist_lt_resume_and_eval(tmp_path, capsys):
    """`sdclr-fast pretrain --method sdclr --arch timm:vit_tiny... --dataset fashion-mnist-lt`
    stopped after epoch 1 and resumed ends bit-identical to the uninterrupted run; `eval`
    probes it."""
    from sdclr_fast.cli import main
    from sdclr_fast.train import load_checkpoint
    from helpers import write_fmnist

    _timm()
    write_fmnist(tmp_path / "fm", per_class=8, test_per_class=2)
    common = ["pretrain", "--method", "sdclr", "--arch", TIMM_VIT, "--dataset", "fashion-mnist-lt",
              "--data-root", str(tmp_path / "fm"), "--ratio", "4", "--epochs", "2", "--batch-size", "8",
              "--lr", "0.05", "--warmup-epochs", "1", "--device", "cpu", "--no-progress",
              "--no-tensorboard", "--seed", "2"]
    run, full = tmp_path / "run", tmp_path / "full"
    assert main(common + ["--run-dir", str(run), "--stop-at-epoch", "1"]) == 0
    assert load_checkpoint(run)["epoch"] == 1
    assert main(["pretrain", "--run-dir", str(run), "--resume"]) == 0
    assert main(common + ["--run-dir", str(full)]) == 0
    a, b = load_checkpoint(full), load_checkpoint(run)
    assert b["epoch"] == 2 and b["model_args"]["image_size"] == 28 and b["model_args"]["arch"] == TIMM_VIT
    masks = [k for k in a["model"] if k.endswith(".mask")]
    assert len(masks) == 8 and all(not bool(a["model"][k].all()) for k in masks)  # pruned
    for key in ("model", "optimizer"):
        flat_a, flat_b = a[key], b[key]
        if key == "optimizer":
            flat_a, flat_b = a[key]["state"], b[key]["state"]
            flat_a = {(i, k): v for i, s in flat_a.items() for k, v in s.items()}
            flat_b = {(i, k): v for i, s in flat_b.items() for k, v in s.items()}
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            assert torch.equal(flat_a[k], flat_b[k]), (key, k)
    capsys.readouterr()
    out = tmp_path / "report"
    assert main(["eval", "--run-dir", str(run), "--probe", "all", "--shots", "2", "--probe-epochs", "2",
                 "--knn-k", "3", "--device", "cpu", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "linear" in text and "knn" in text and (out / "report.json").exists()


def test_timm_vit_dnc_base_experts_and_student(tmp_path):
    """DnC on a timm ViT: MoCLR base, experts and the distilled student all rebuild the model
    from the checkpoint's arch string and image size."""
    from sdclr_fast.train import load_checkpoint, load_model
    from sdclr_fast.train.dnc import dnc
    from helpers import DNC_DATA, tiny_dnc_config, tiny_dnc_options

    _timm()
    arch = "timm:vit_tiny_patch16_224:patch_size=4,depth=1"
    student = dnc(tiny_dnc_config(method="moclr", arch=arch), tiny_dnc_options(), run_dir=tmp_path, data=DNC_DATA)
    state = load_checkpoint(student)
    assert state["model_args"]["arch"] == arch and state["model_args"]["image_size"] == 8
    model = load_model(student)
    assert model.features(DNC_DATA.test.images[:3].float() / 255, branch="dense").shape == (3, 192)


def test_timm_vit_sdclr_step_compiles_without_graph_breaks():
    """Both branches of a converted timm ViT (MaskedLinear, dual LayerNorm) trace as one graph
    (fullgraph=True raises on a break); loss and gradients match eager."""
    import torch._dynamo.testing

    net = _timm_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1)
    model = self_competitor(net, proj_dim=8).train()
    model.update_masks(0.9)
    gen = torch.Generator().manual_seed(9)
    v1, v2 = torch.randn(4, 3, 16, 16, generator=gen), torch.randn(4, 3, 16, 16, generator=gen)

    def step(a, b):
        return nt_xent_reference(model(a, branch="dense"), model(b, branch="pruned"), 0.2)

    torch._dynamo.reset()
    cnt = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    loss = torch.compile(step, backend=cnt, fullgraph=True)(v1, v2)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    ref = step(v1, v2)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    assert cnt.frame_count == 1
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r)
