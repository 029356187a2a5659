"""Streamed shards (--dataset webdataset): `sdclr-fast shards` writes the images the in-memory
loaders hold, the stream decodes them bit for bit (same augmentation seed, same views), its
epochs are a function of the data-order state (a resumed epoch skips exactly the batches done),
ranks read disjoint shards, key lists keep a subset, and a pretraining run on a stream stopped
mid-epoch and resumed equals an uninterrupted one."""
import pytest
import torch

from sdclr_fast.cli import main
from sdclr_fast.data import ContrastiveData, TwoViewAugment, build_dataset
from sdclr_fast.data.webdataset import sample_key, write_shards
from sdclr_fast.train import PretrainConfig, load_checkpoint

from helpers import assert_same_state, separable_images, write_image_folder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fmnist_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("fmnist_shards")
    assert main(["shards", "--dataset", "fashion-mnist-lt", "--ratio", "100", "--out", str(out),
                 "--shard-size", "1500"]) == 0
    return out, build_dataset("fashion-mnist-lt", ratio=100)


def _first_batch(stream_data, batch, seed=0, workers=1, rank=0, world=1):
    gen = torch.Generator().manual_seed(seed)
    train = stream_data.train
    train.reader["num_workers"] = workers
    it = train.batches(batch, gen).for_rank(rank, world)
    return next(iter(it)), it


def test_shards_hold_the_in_memory_images_and_give_the_same_first_batch(fmnist_shards):
    out, mem = fmnist_shards
    stream = build_dataset("webdataset", str(out) + "/train-{000000..%06d}.tar" % ((len(mem.train) - 1) // 1500))
    assert len(stream.train) == len(mem.train)
    assert stream.train.keys == [sample_key(i) for i in mem.train.indices.tolist()]
    assert stream.in_channels == 1 and stream.image_size == 28 and stream.mean == pytest.approx(mem.mean)
    batch, _ = _first_batch(stream, 64, workers=2)
    # the same images, by key, from the in-memory split
    pos_in_mem = batch.index.cpu()  # positions into the kept keys = positions into mem.train here
    assert torch.equal(batch.images, mem.train.images[pos_in_mem])
    assert torch.equal(batch.labels, mem.train.labels[pos_in_mem])
    # same augmentation seed -> same views
    aug = TwoViewAugment(28, 1, mem.mean, mem.std)
    torch.manual_seed(5)
    a = aug(batch.images)
    torch.manual_seed(5)
    b = aug(mem.train.images[pos_in_mem])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_stream_epochs_resume_and_rank_split(fmnist_shards):
    out, mem = fmnist_shards
    stream = build_dataset("webdataset", str(out), shuffle_buffer=64, num_workers=1)
    gen = torch.Generator().manual_seed(1)
    state = gen.get_state()
    it = stream.train.batches(256, gen)
    whole = [b.index.clone() for b in it.epoch(0)]
    assert len(whole) == len(mem.train) // 256
    assert len(torch.cat(whole).unique()) == len(torch.cat(whole))  # an epoch draws without repetition
    gen.set_state(state)
    again = [b.index.clone() for b in it.epoch(3)]
    assert len(again) == len(whole) - 3 and all(torch.equal(x, y) for x, y in zip(again, whole[3:]))
    nxt = next(iter(it.epoch(0)))  # the next epoch is another order
    assert not torch.equal(nxt.index, whole[0])
    # two ranks: half the batch each, from disjoint shards
    parts = []
    for rank in range(2):
        g = torch.Generator().manual_seed(1)
        parts.append(torch.cat([b.index for b in stream.train.batches(256, g).for_rank(rank, 2).epoch(0)]))
        assert len(parts[-1]) == len(whole) * 128
    shard_of = {}
    for j in range(len(stream.train.urls)):
        for p in range(j * 1500, min((j + 1) * 1500, len(mem.train))):
            shard_of[p] = j
    s0 = {shard_of[int(p)] for p in parts[0]}
    s1 = {shard_of[int(p)] for p in parts[1]}
    assert s0 and s1 and not s0 & s1


def test_train_list_and_subset_filter_the_stream(tmp_path):
    images = separable_images([10, 6, 4, 4], seed=1)
    write_shards(images, tmp_path / "s", shard_size=7)
    keys = [sample_key(i) for i in (0, 3, 5, 11, 12, 20, 21, 23)]
    (tmp_path / "keys.txt").write_text("\n".join(keys) + "\n")
    data = build_dataset("webdataset", str(tmp_path / "s"), train_list=str(tmp_path / "keys.txt"), num_workers=0)
    assert len(data.train) == 8
    seen = torch.cat([b.index for b in data.train.batches(4, torch.Generator().manual_seed(0)).epoch(0)])
    assert sorted(data.train.keys[int(data.train.kept[i])] for i in seen) == keys
    sub = data.subset([1, 2, 6, 7])  # a DnC cluster: positions into the kept samples
    seen = torch.cat([b.index for b in sub.batches(2, torch.Generator().manual_seed(0)).epoch(0)])
    assert sorted(sub.keys[int(sub.kept[i])] for i in seen) == [keys[1], keys[2], keys[6], keys[7]]
    with pytest.raises(ValueError, match="train_list"):
        (tmp_path / "bad.txt").write_text("nope\n")
        build_dataset("webdataset", str(tmp_path / "s"), train_list=str(tmp_path / "bad.txt"))
    with pytest.raises(ValueError, match="ratio"):
        build_dataset("webdataset", str(tmp_path / "s"), ratio=100)
    with pytest.raises(ValueError, match="data-root"):
        build_dataset("webdataset", str(tmp_path / "s" / "missing-{000000..000001}.tar"))


@pytest.mark.slow
def test_pretraining_on_a_stream_stopped_mid_epoch_resumes_bit_identical(tmp_path, monkeypatch):
    from sdclr_fast.train import run
    from sdclr_fast.train.pretrain import pretrain
    from sdclr_fast.train.run import Preempted

    write_shards(separable_images([24, 12, 8, 4], seed=1), tmp_path / "s", shard_size=10)
    cfg = PretrainConfig(method="sdclr", dataset="webdataset", data_root=str(tmp_path / "s"), ratio=None,
                         data_options={"num_workers": 1, "shuffle_buffer": 8}, arch="resnet18", width=4,
                         proj_dim=16, epochs=2, batch_size=8, lr=0.1, warmup_epochs=1, seed=3, device="cpu",
                         progress=False, tensorboard=False, log_every=1)
    full = pretrain(cfg, run_dir=tmp_path / "full")
    real = run.StopCheck.__call__

    def stop_at_3(self, steps_done, force=False):
        if steps_done == 3 and not force:
            run.request_stop("SIGTERM")
        return real(self, steps_done, force)

    monkeypatch.setattr(run.StopCheck, "__call__", stop_at_3)
    with pytest.raises(Preempted):
        pretrain(cfg, run_dir=tmp_path / "part")
    monkeypatch.setattr(run.StopCheck, "__call__", real)
    assert load_checkpoint(tmp_path / "part" / "checkpoint.pt")["position"] == 3
    part = pretrain(cfg, run_dir=tmp_path / "part", resume=True)
    a, b = load_checkpoint(full), load_checkpoint(part)
    for key in ("model", "optimizer", "rng"):
        assert_same_state(a[key], b[key], key)


@pytest.mark.slow
def test_dnc_on_a_stream_clusters_by_key_and_experts_filter_the_stream(tmp_path):
    from sdclr_fast.train.clustering import read_clusters
    from sdclr_fast.train.config import DnCConfig
    from sdclr_fast.train.dnc import dnc, dnc_state

    images = separable_images([24, 16, 12, 8], seed=1)
    write_shards(images, tmp_path / "s", shard_size=16)
    cfg = PretrainConfig(method="simclr", dataset="webdataset", data_root=str(tmp_path / "s"), ratio=None,
                         data_options={"num_workers": 0, "shuffle_buffer": 8}, arch="resnet18", width=4,
                         proj_dim=16, epochs=1, batch_size=8, lr=0.1, warmup_epochs=1, seed=3, device="cpu",
                         progress=False, tensorboard=False, log_every=1)
    opts = DnCConfig(k=2, base_epochs=1, expert_epochs=1, student_epochs=1, kmeans_backend="torch")
    dnc(cfg, opts, run_dir=tmp_path / "run")
    assert dnc_state(tmp_path / "run")["stages"]["student"]["done"]
    rec = read_clusters(tmp_path / "run")
    assert rec["keys"] == [sample_key(i) for i in range(len(images))]
    # the stream's features equal the in-memory ones (same images, eval mode), so the clusters do
    from sdclr_fast.train import load_model
    from sdclr_fast.train.clustering import canonical_order, embed_images
    from sdclr_fast.train.kmeans import kmeans

    from sdclr_fast.data.augment import input_stats

    mean, std = input_stats(cfg.input_norm, build_dataset("webdataset", str(tmp_path / "s")))  # the run's statistics
    mem = ContrastiveData(name="synthetic", num_classes=4, in_channels=1, image_size=8, class_names=list("abcd"),
                          train=images, probe_train=images, val=None, test=images, class_order=torch.arange(4),
                          mean=mean, std=std)
    emb = embed_images(load_model(tmp_path / "run" / "base" / "checkpoint.pt"), images, mem, batch_size=8)
    ref = kmeans(emb, 2, iters=opts.kmeans_iters, seed=3, backend="torch")
    assert torch.equal(canonical_order(ref.assignments, 2)[0], rec["assignments"])
    for k in range(2):  # each expert was trained on its cluster's keys only
        st = load_checkpoint(tmp_path / "run" / f"expert_{k}" / "checkpoint.pt")
        assert st["train_indices"] == (rec["assignments"] == k).nonzero().flatten().tolist()


def test_a_stream_run_is_evaluated_on_its_eval_dataset(tmp_path):
    from sdclr_fast.train.evaluate import data_for_run

    cfg = PretrainConfig(method="simclr", dataset="webdataset", data_root=str(tmp_path / "s"), ratio=None,
                         eval_dataset="fashion-mnist-lt", device="cpu")
    data = data_for_run({"config": cfg.to_dict()}, tmp_path)
    assert data.name == build_dataset("fashion-mnist-lt").name and len(data.test) == 10000
    with pytest.raises(ValueError, match="--eval-dataset"):
        data_for_run({"config": cfg.replace(eval_dataset=None).to_dict()}, tmp_path)
    # evaluation data is a runtime field: it may differ on resume
    assert cfg.differences(cfg.replace(eval_dataset=None)) == {}
    from sdclr_fast.cli import build_parser

    args = build_parser().parse_args(["eval", "--run-dir", "r", "--eval-dataset", "cifar10-lt",
                                      "--eval-data-root", "/data/cifar"])
    assert (args.eval_dataset, args.eval_data_root) == ("cifar10-lt", "/data/cifar")


# ---------------------------------------------------------------- damaged shards
@pytest.fixture
def small_shards(tmp_path):
    write_image_folder(tmp_path / "images")  # 30 training images
    assert main(["shards", "--dataset", "imagefolder", "--data-root", str(tmp_path / "images"), "--out",
                 str(tmp_path / "shards"), "--shard-size", "10"]) == 0
    return tmp_path / "shards"


def _sample_ends(shard):
    """Byte offsets where each sample's last member ends (tar members are 512-byte aligned)."""
    import tarfile

    ends = {}
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            ends[m.name.split(".")[0]] = m.offset_data + -(-m.size // 512) * 512
    return sorted(ends.values())


def _pretrain_on(shards, run, workers):
    return ["pretrain", "--method", "simclr", "--dataset", "webdataset", "--data-root", str(shards),
            "--data-workers", str(workers), "--shuffle-buffer", "4", "--image-size", "8", "--width", "4",
            "--epochs", "2", "--batch-size", "6", "--device", "cpu", "--no-progress", "--no-tensorboard",
            "--run-dir", str(run)]


def test_manifest_carries_each_shards_count_and_checksum(small_shards):
    import hashlib
    import json

    man = json.loads((small_shards / "shards.json").read_text())
    assert [s["count"] for s in man["shards"]] == [10, 10, 10]
    for s in man["shards"]:
        assert s["sha256"] == hashlib.sha256((small_shards / s["url"]).read_bytes()).hexdigest()


@pytest.mark.parametrize("damage, says", [
    ("member boundary", "holds 2 samples, the index says 10"),
    ("mid-member", "is damaged or truncated"),  # found at start-up: the labels are read from every shard
    ("same size, other bytes", "does not match its checksum"),
])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_damaged_shard_stops_the_run_with_one_line_naming_it(small_shards, tmp_path, capsys, damage, says,
                                                              workers):
    shard = small_shards / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    cut = _sample_ends(shard)[1]  # after the second sample
    if damage == "member boundary":
        data = data[:cut]
    elif damage == "mid-member":
        data = data[:cut + 700]
    else:
        data[cut + 600] ^= 0xFF  # a byte of the third sample's image data
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(_pretrain_on(small_shards, tmp_path / "run", workers))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(shard) in err and says in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("damage, says", [
    (lambda p: p.write_bytes(p.read_bytes()[:40]), "is not a readable shards manifest"),  # cut short
    (lambda p: p.write_text("[1, 2]"), "is not a shards manifest of format"),                 # other JSON
    (lambda p: p.write_bytes(b"\xff\xfe\x00"), "is not a readable shards manifest"),           # not text
])
def test_a_damaged_manifest_is_named_in_one_error(small_shards, damage, says):
    from sdclr_fast.data.webdataset import build_webdataset

    damage(small_shards / "shards.json")
    with pytest.raises(ValueError, match=says) as e:
        build_webdataset(small_shards, image_size=8)
    assert "shards.json" in str(e.value)


@pytest.mark.parametrize("text, says", [("{\"format\": 1, \"stages\"", "is not a readable DnC state file"),
                                        ("{\"format\": 99}", "is not a DnC state file of format")])
def test_a_damaged_dnc_state_file_is_named_in_one_error(tmp_path, text, says):
    from sdclr_fast.train.dnc import STATE_NAME, dnc_state

    (tmp_path / STATE_NAME).write_text(text)
    with pytest.raises(ValueError, match=says):
        dnc_state(tmp_path)
