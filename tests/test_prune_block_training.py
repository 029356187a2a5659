"""SDCLR with block pruning (`pretrain --prune-block OUTxIN`): flag and config parsing, masks
made of whole blocks at the global scope, updated every epoch, and a killed run that resumes
bit-identical to an uninterrupted one (as tests/test_runs_on_clusters.py checks unstructured)."""
import signal

import pytest

from helpers import PRETRAIN_DATA as DATA, assert_same_state, signal_at_steps, tiny_pretrain_config as tiny_config
from sdclr_fast.cli import build_parser, config_from_args
from sdclr_fast.train import load_checkpoint
from sdclr_fast.train.config import PretrainConfig, parse_prune_block
from sdclr_fast.train.pretrain import pretrain
from sdclr_fast.train.run import Preempted

pytestmark = pytest.mark.usefixtures("one_thread")
BLOCK = (4, 4)  # tiny_config's ResNet-18 has width 4: 4 to 32 channels


def test_parse_prune_block():
    assert parse_prune_block("32x32") == (32, 32)
    assert parse_prune_block("16X64") == (16, 64)
    assert parse_prune_block([8, 4]) == (8, 4)
    for bad in ("32", "32x", "ax4", "32x32x1", "-1x4"):
        with pytest.raises(ValueError, match="prune_block must look like OUTxIN"):
            parse_prune_block(bad)
    with pytest.raises(ValueError, match="prune_block must be positive ints"):
        parse_prune_block("0x4")


def test_config_field_round_trip_and_checks():
    cfg = tiny_config(prune_block=(32, 32))
    assert PretrainConfig.from_dict(cfg.to_dict()).prune_block == (32, 32)
    assert tiny_config(prune_block=[8, 8]).prune_block == (8, 8)  # as read back from JSON
    assert tiny_config().prune_block is None
    with pytest.raises(ValueError, match="prune_block"):
        tiny_config(prune_block=(0, 4))


@pytest.mark.parametrize("command", ["pretrain", "study"])
def test_flag_reaches_the_config(command, capsys):
    parser = build_parser()
    args = parser.parse_args([command, "--run-dir", "x", "--prune-block", "32x32"])
    assert config_from_args(args).prune_block == (32, 32)
    assert config_from_args(parser.parse_args([command, "--run-dir", "x"])).prune_block is None
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--run-dir", "x", "--prune-block", "32by32"])
    assert "argument --prune-block: must look like OUTxIN, e.g. 32x32, got '32by32'" in capsys.readouterr().err


def _assert_block_masks(model_state, block):
    bo, bi = block
    masks = {k: v for k, v in model_state.items() if k.endswith(".mask")}
    assert masks
    kept = total = 0
    for name, m in masks.items():
        o, i = m.shape[:2]
        for ob in range(0, o, bo):
            for ib in range(0, i, bi):
                blk = m[ob:ob + bo, ib:ib + bi]
                assert blk.all() or not blk.any(), name  # whole blocks, every tap together
        kept += int(m.sum())
        total += m.numel()
    assert 0 < kept < total


@pytest.fixture(scope="module")
def uninterrupted_block(tmp_path_factory, one_thread):
    run = tmp_path_factory.mktemp("full_block")
    return load_checkpoint(pretrain(tiny_config("sdclr", epochs=3, prune_block=BLOCK),
                                    run_dir=run, data=DATA))


def test_block_masks_updated_every_epoch(uninterrupted_block, monkeypatch, tmp_path):
    _assert_block_masks(uninterrupted_block["model"], BLOCK)
    from sdclr_fast.nn.self_competitor import SelfCompetitor

    calls = []
    real = SelfCompetitor.update_masks
    monkeypatch.setattr(SelfCompetitor, "update_masks",
                        lambda self, *a, **k: calls.append(k.get("block")) or real(self, *a, **k))
    pretrain(tiny_config("sdclr", epochs=2, prune_block=BLOCK), run_dir=tmp_path, data=DATA)
    assert calls == [BLOCK, BLOCK]


@pytest.mark.slow
@pytest.mark.parametrize("step", [2, 4])
def test_kill_then_resume_equals_uninterrupted(tmp_path, monkeypatch, uninterrupted_block, step):
    calls = signal_at_steps(monkeypatch, {step}, signal.SIGTERM)
    with pytest.raises(Preempted):
        pretrain(tiny_config("sdclr", epochs=3, prune_block=BLOCK), run_dir=tmp_path, data=DATA)
    assert calls[0] == step
    monkeypatch.undo()
    pretrain(tiny_config("sdclr", epochs=3, prune_block=BLOCK), run_dir=tmp_path, data=DATA,
             resume=True)
    final = load_checkpoint(tmp_path)
    for key in ("model", "optimizer", "scheduler"):
        assert_same_state(final[key], uninterrupted_block[key], key)
    assert tuple(final["config"]["prune_block"]) == BLOCK


def test_kept_fraction_in_the_metrics_counts_weights(uninterrupted_block):
    """--sparsity counts weights with --prune-block too: each epoch's kept_fraction (metrics.jsonl)
    is the masks' share of kept weights, at least 1 - sparsity and above it by less than a block."""
    from pathlib import Path

    from sdclr_fast.train.run import read_metrics

    masks = {k: v for k, v in uninterrupted_block["model"].items() if k.endswith(".mask")}
    n = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values()) / n
    largest_block = max(BLOCK[0] * BLOCK[1] * m.shape[2] * m.shape[3] for m in masks.values() if m.dim() == 4)
    sparsity = uninterrupted_block["config"]["sparsity"]
    rows = [r for r in read_metrics(Path(uninterrupted_block["path"]).parent) if r["kind"] == "epoch"]
    assert len(rows) == 3 and rows[-1]["kept_fraction"] == pytest.approx(kept, abs=1e-12)
    for r in rows:
        assert 1 - sparsity <= r["kept_fraction"] < 1 - sparsity + largest_block / n, r
