"""Command line: help of every command, `python -m sdclr_fast`, and pretrain -> kill -> resume -> eval
end to end on a tiny generated image folder."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import write_image_folder
from sdclr_fast.cli import bench_scripts, build_parser, config_from_args, main
from sdclr_fast.train import PretrainConfig, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def _help(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_help_of_every_command(capsys):
    top = _help(capsys)
    for cmd in ("pretrain", "eval", "bench", "demo"):
        assert cmd in top
    out = _help(capsys, "pretrain")
    for flag in ("--method", "--dataset", "--data-root", "--run-dir", "--epochs", "--batch-size", "--lr",
                 "--momentum", "--weight-decay", "--warmup-epochs", "--temperature", "--sparsity", "--prune-scope",
                 "--arch", "--width", "--image-size", "--seed", "--split", "--device", "--amp", "--no-amp",
                 "--channels-last", "--compile", "--resume", "--stop-at-epoch", "--init-checkpoint"):
        assert flag in out, flag
    # The paper's defaults are in the help text.
    for text in ("default 0.5", "default 0.9", "default 0.0001", "default 10", "default 0.2", "default 512",
                 "default 2000", "default resnet18"):
        assert text in " ".join(out.split()), text
    out = _help(capsys, "eval")
    for flag in ("--run-dir", "--probe", "--shots", "--knn-k", "--out"):
        assert flag in out
    out = _help(capsys, "bench")
    assert "--quick" in out
    out = _help(capsys, "demo")
    assert "--methods" in out and "--budget-minutes" in out


def test_every_pretrain_flag_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and len(action.help) > 10, (name, action.option_strings)


def test_python_dash_m_works():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for argv in (["--help"], ["pretrain", "--help"]):
        r = subprocess.run([sys.executable, "-m", "sdclr_fast", *argv], capture_output=True, text=True, cwd=ROOT,
                           env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "usage: sdclr-fast" in r.stdout


def test_config_from_args_uses_paper_defaults():
    args = build_parser().parse_args(["pretrain", "--run-dir", "x"])
    assert config_from_args(args) == PretrainConfig()
    args = build_parser().parse_args(["pretrain", "--run-dir", "x", "--dataset", "imagefolder", "--lr", "0.3",
                                      "--no-amp", "--ratio", "none"])
    cfg = config_from_args(args)
    assert cfg.dataset == "imagefolder" and cfg.lr == 0.3 and cfg.amp is False and cfg.ratio is None
    args = build_parser().parse_args(["pretrain", "--run-dir", "x", "--dataset", "imagefolder"])
    assert config_from_args(args).ratio is None  # an image folder is kept as it is by default
    assert config_from_args(args, method="simclr").method == "simclr"


def test_bad_flag_values_exit_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--run-dir", str(tmp_path), "--lr", "-1"])
    assert e.value.code == 2
    assert "lr must be" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["pretrain", "--run-dir", str(tmp_path), "--method", "byol"])


def test_bench_lists_scripts():
    names = [p.name for p in bench_scripts()]
    assert "bench_step.py" in names
    assert [p.name for p in bench_scripts(["step"])] == ["bench_step.py"]
    assert [p.name for p in bench_scripts(["bench_step.py"])] == ["bench_step.py"]
    with pytest.raises(ValueError, match="unknown benchmark"):  # the command line: one line, exit 2
        bench_scripts(["nope"])


def test_pretrain_kill_resume_eval_end_to_end(tmp_path, capsys):
    data_root = tmp_path / "images"
    write_image_folder(data_root)
    run = tmp_path / "run"
    common = ["pretrain", "--method", "sdclr", "--dataset", "imagefolder", "--data-root", str(data_root),
              "--image-size", "8", "--width", "4", "--epochs", "2", "--batch-size", "8", "--lr", "0.1",
              "--warmup-epochs", "1", "--device", "cpu", "--no-progress", "--no-tensorboard", "--seed", "1"]
    assert main(common + ["--run-dir", str(run), "--stop-at-epoch", "1"]) == 0
    assert load_checkpoint(run)["epoch"] == 1
    # Continuing needs --resume ...
    with pytest.raises(SystemExit) as e:
        main(common + ["--run-dir", str(run)])
    assert e.value.code == 2 and "--resume" in capsys.readouterr().err
    # ... which may be given alone: the stored configuration is used.
    assert main(["pretrain", "--run-dir", str(run), "--resume"]) == 0
    st = load_checkpoint(run)
    assert st["epoch"] == 2 and st["finished"] and st["config"]["width"] == 4
    capsys.readouterr()
    assert main(["pretrain", "--run-dir", str(run), "--resume"]) == 0
    assert "already finished" in capsys.readouterr().out
    # A flag that changes the result is refused on resume.
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--run-dir", str(run), "--resume", "--temperature", "0.5"])
    assert "temperature" in capsys.readouterr().err
    # The same run uninterrupted ends with the same weights.
    full = tmp_path / "full"
    assert main(common + ["--run-dir", str(full)]) == 0
    a, b = load_checkpoint(full)["model"], load_checkpoint(run)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    out = tmp_path / "report"
    capsys.readouterr()
    assert main(["eval", "--run-dir", str(run), "--run-dir", str(full), "--probe", "all", "--shots", "2",
                 "--probe-epochs", "2", "--knn-k", "3", "--device", "cpu", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "linear" in text and "knn" in text and "fewshot-2" in text and "minor" in text
    assert (out / "report.md").exists() and (out / "report.json").exists()
    assert len(list(out.glob("per_class_*.png"))) == 3


def test_eval_of_a_bad_checkpoint_names_the_file(tmp_path, capsys):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(SystemExit) as e:
        main(["eval", "--run-dir", str(tmp_path), "--device", "cpu"])
    assert e.value.code == 2 and str(bad) in capsys.readouterr().err


def test_recipe_and_protocol_flags():
    args = build_parser().parse_args(["pretrain", "--run-dir", "x", "--recipe", "imagenet100-lt", "--epochs", "3"])
    cfg = config_from_args(args)
    assert (cfg.arch, cfg.cifar_stem, cfg.image_size, cfg.crop_scale, cfg.blur_prob) == \
        ("resnet50", False, 224, (0.08, 1.0), 0.5)
    assert (cfg.batch_size, cfg.lr, cfg.sparsity, cfg.epochs) == (256, 0.5, 0.3, 3)  # flag wins
    # The official ImageNet-100-LT runs: SDCLR (the default method) at tau 0.3, SimCLR at 0.2; a flag still wins.
    assert cfg.method == "sdclr" and cfg.temperature == 0.3
    recipe = ["pretrain", "--run-dir", "x", "--recipe", "imagenet100-lt"]
    assert config_from_args(build_parser().parse_args(recipe + ["--method", "simclr"])).temperature == 0.2
    assert config_from_args(build_parser().parse_args(recipe + ["--temperature", "0.5"])).temperature == 0.5
    assert config_from_args(build_parser().parse_args(recipe), method="sdclr").temperature == 0.3
    assert "tau 0.3 for sdclr" in " ".join(build_parser()._subparsers._group_actions[0].choices["pretrain"]
                                           .format_help().split())
    # Inputs are normalised with ImageNet's statistics (the official models'); a config written before the
    # option existed used the data set's.
    assert cfg.input_norm == "imagenet"
    assert config_from_args(build_parser().parse_args(recipe + ["--input-norm", "dataset"])).input_norm == "dataset"
    old = {k: v for k, v in cfg.to_dict().items() if k != "input_norm"}
    assert PretrainConfig.from_dict(old).input_norm == "dataset"
    args = build_parser().parse_args(["pretrain", "--run-dir", "x", "--crop-scale", "0.3", "0.9", "--blur-prob", "0.2",
                                      "--random-prune", "0.1", "--no-permute-classes"])
    cfg = config_from_args(args)
    assert (cfg.crop_scale, cfg.blur_prob, cfg.random_prune, cfg.permute_classes) == ((0.3, 0.9), 0.2, 0.1, False)
    assert PretrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # JSON round trip
    assert config_from_args(build_parser().parse_args(["pretrain", "--run-dir", "x"])).permute_classes is True
    for bad, match in ((dict(crop_scale=(0.5, 0.2)), "crop_scale"), (dict(random_prune=0.95), "random_prune"),
                       (dict(blur_prob=1.5), "blur_prob"), (dict(permute_classes=1), "permute_classes")):
        with pytest.raises(ValueError, match=match):
            PretrainConfig(**bad)
