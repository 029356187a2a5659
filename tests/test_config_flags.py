"""The command line generated from the config classes: every field's flag round-trips to the
same value, ``--help`` shows each field's help once, the metadata gives the runtime fields, and a
resumed run reads its checkpoint once."""
import dataclasses

import pytest
import torch

from sdclr_fast.cli import build_parser, config_from_args, dnc_configs_from_args, main
from sdclr_fast.data import ContrastiveData
from sdclr_fast.train.config import RUNTIME_FIELDS, DnCConfig, PretrainConfig, config_flags, runtime_fields

from helpers import separable_images  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# Values whose flag text is not str(value).
SPELLED = {"prune_block": ("32x32", (32, 32)), "crop_scale": (["0.3", "0.9"], (0.3, 0.9))}


def _other_value(flag, cls):
    """(argv after the flag's name, the value the field then holds): a valid non-default value."""
    if flag.field in SPELLED:
        text, value = SPELLED[flag.field]
        return (text if isinstance(text, list) else [text]), value
    if flag.key is not None:  # a key of data_options
        hint = {f.name: f.type for f in dataclasses.fields(cls.__dataclass_fields__[flag.field].metadata[
            "sdclr_fast"]["options"])}[flag.key]
        value = 3 if "int" in hint else "keys.txt"
        return [str(value)], {flag.key: value}
    default = cls.__dataclass_fields__[flag.field].default
    if flag.kind in ("off", "on"):
        return [], not default
    if flag.kind == "toggle":  # None (auto) by default; --no-x is checked below
        return [], True
    if flag.kind == "const":
        return [], flag.const
    if flag.choices:
        value = next(c for c in flag.choices if c != default)
    elif flag.type is int:
        value = default + 1 if default else 3
    elif flag.type is str:
        value = "somewhere"
    else:  # float (ratio's parser too): half the default stays inside every range here
        value = default / 2 if default else 0.05
    return [str(value)], value


PRETRAIN_FLAGS = config_flags(PretrainConfig)
DNC_FLAGS = config_flags(DnCConfig, prefix="dnc")


@pytest.mark.parametrize("flag", PRETRAIN_FLAGS, ids=lambda f: f.name)
def test_every_pretrain_flag_round_trips(flag):
    rest, value = _other_value(flag, PretrainConfig)
    assert value != getattr(PretrainConfig(), flag.field)
    args = build_parser().parse_args(["pretrain", "--run-dir", "x", flag.name, *rest])
    config = config_from_args(args)
    assert getattr(config, flag.field) == value
    # only that field changed, and the stored form reads back the same
    changed = {k for k, v in config.to_dict().items() if v != getattr(PretrainConfig(), k)}
    assert changed == {flag.field}, changed
    assert PretrainConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("flag", DNC_FLAGS, ids=lambda f: f.name)
def test_every_dnc_flag_round_trips(flag):
    rest, value = _other_value(flag, DnCConfig)
    assert value != getattr(DnCConfig(), flag.field)
    args = build_parser().parse_args(["pretrain", "--method", "dnc", "--run-dir", "x", flag.name, *rest])
    base, options = dnc_configs_from_args(args)
    assert getattr(options, flag.field) == value
    assert DnCConfig.from_dict(options.to_dict()) == options
    assert base.method == options.base_method


def test_toggles_and_optional_values():
    parse = build_parser().parse_args
    for argv, field, value in ((["--amp"], "amp", True), (["--no-amp"], "amp", False),
                               (["--channels-last"], "channels_last", True),
                               (["--no-channels-last"], "channels_last", False),
                               (["--compile"], "compile", "default"),
                               (["--compile", "reduce-overhead"], "compile", "reduce-overhead"),
                               (["--ratio", "none"], "ratio", None)):
        assert getattr(config_from_args(parse(["pretrain", "--run-dir", "x", *argv])), field) == value, argv
    # the data options gather into one dict
    config = config_from_args(parse(["pretrain", "--run-dir", "x", "--data-workers", "0", "--shuffle-buffer", "8"]))
    assert config.data_options == {"num_workers": 0, "shuffle_buffer": 8}


def test_every_field_but_the_notes_has_a_flag():
    flagged = {f.field for f in PRETRAIN_FLAGS}
    assert flagged == {f.name for f in dataclasses.fields(PretrainConfig)} - {"extra"}
    assert {f.field for f in DNC_FLAGS} == {f.name for f in dataclasses.fields(DnCConfig)}
    names = [f.name for f in PRETRAIN_FLAGS + DNC_FLAGS]
    assert len(names) == len(set(names))


def test_help_shows_each_fields_help_once(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100000")  # no wrapping: the help texts appear verbatim
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = capsys.readouterr().out
    for flag in PRETRAIN_FLAGS + DNC_FLAGS:
        assert "{default}" not in flag.help, flag.name
        assert out.count(flag.help) == 1, flag.name
        assert out.count(f"  {flag.name} ") + out.count(f"  {flag.name}\n") + out.count(f"  {flag.name},") == 1, \
            flag.name
    for title in ("run:", "data:", "model:", "optimisation:", "execution:", "DnC (--method dnc):"):
        assert f"\n{title}\n" in out, title


def test_runtime_fields_come_from_the_metadata():
    assert RUNTIME_FIELDS == {"device", "compile", "log_every", "tensorboard", "progress", "num_threads",
                              "checkpoint_every_steps", "eval_dataset", "eval_data_root"}
    assert runtime_fields(DnCConfig) == {"kmeans_backend"}
    assert DnCConfig().differences(DnCConfig(kmeans_backend="torch")) == {}
    assert DnCConfig().differences(DnCConfig(k=3)) == {"k": (5, 3)}


def test_choices_are_checked_by_the_config_and_the_flag(capsys):
    with pytest.raises(ValueError, match=r"prune_scope must be one of \('global', 'layer'\)"):
        PretrainConfig(prune_scope="block")
    with pytest.raises(ValueError, match="compile must be None or one of"):
        PretrainConfig(compile="fast")
    with pytest.raises(ValueError, match="sync_bn must be a bool"):
        PretrainConfig(sync_bn="yes")
    with pytest.raises(ValueError, match="kmeans_metric must be one of"):
        DnCConfig(kmeans_metric="l1")
    assert PretrainConfig(dataset="my-own").dataset == "my-own"  # data passed in-process may carry any name
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--run-dir", "x", "--prune-scope", "block"])
    assert e.value.code == 2 and "invalid choice: 'block'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--run-dir", "x", "--prune-block", "3x"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --prune-block: must look like OUTxIN" in err
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--run-dir", "x", "--ratio", "many"])
    assert e.value.code == 2 and "argument --ratio: expected a number >= 1 or 'none'" in capsys.readouterr().err
    # a DnC option's message names its --dnc-* flag
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--run-dir", "x", "--method", "dnc", "--dnc-base-weight", "0", "--dnc-expert-weight", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--dnc-base-weight and --dnc-expert-weight cannot both be 0" in err, err


def test_old_flat_configs_keep_loading():
    old = PretrainConfig().to_dict()
    del old["input_norm"]
    old["compile"] = True  # written before the compile modes
    config = PretrainConfig.from_dict(old)
    assert config.input_norm == "dataset" and config.compile == "default"


def _finished_run(run_dir):
    from sdclr_fast.train.pretrain import pretrain

    def images(counts, seed):
        return separable_images(counts, seed=seed)

    data = ContrastiveData(name="synthetic", num_classes=2, in_channels=1, image_size=8, class_names=["a", "b"],
                           train=images([8, 4], 1), probe_train=images([4, 4], 2), val=None, test=images([2, 2], 3),
                           class_order=torch.arange(2), mean=(0.3,), std=(0.25,), config={"seed": 0, "split": 0})
    config = PretrainConfig(method="simclr", dataset="synthetic", width=4, proj_dim=8, epochs=1, batch_size=4,
                            lr=0.1, warmup_epochs=0, device="cpu", progress=False, tensorboard=False)
    return pretrain(config, run_dir=run_dir, data=data)


def test_resume_reads_the_checkpoint_once(tmp_path, monkeypatch, capsys):
    import sdclr_fast.train.checkpoint as checkpoint

    _finished_run(tmp_path)
    reads = []
    real = checkpoint.load_checkpoint
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda path, **kw: reads.append(path) or real(path, **kw))
    capsys.readouterr()
    assert main(["pretrain", "--run-dir", str(tmp_path), "--resume"]) == 0
    assert "already finished" in capsys.readouterr().out
    assert len(reads) == 1, reads
    # a flag that changes the result is still refused, from the same single read
    reads.clear()
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--run-dir", str(tmp_path), "--resume", "--temperature", "0.5"])
    assert e.value.code == 2 and "temperature" in capsys.readouterr().err
    assert len(reads) == 1, reads


def test_a_read_is_handed_over_once_and_only_while_the_file_is_unchanged(tmp_path):
    from sdclr_fast.train.run import read_again, read_for_run

    path = tmp_path / "state.json"
    path.write_text("1")
    reads = []

    def reader(p):
        reads.append(p)
        return p.read_text()

    assert read_for_run(path, reader) == "1"
    assert read_again(path, reader) == "1" and len(reads) == 1  # taken over
    assert read_again(path, reader) == "1" and len(reads) == 2  # once only
    read_for_run(path, reader)
    path.write_text("22")  # changed in between: read again
    assert read_again(path, reader) == "22" and len(reads) == 4


def test_eval_and_study_share_the_probe_flags():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    probe_args = ["--probe", "fewshot", "--shots", "2", "--probe-epochs", "3", "--knn-k", "5", "--probe-per-class", "4"]
    ev = parser.parse_args(["eval", "--run-dir", "r", *probe_args])
    st = parser.parse_args(["study", "--run-dir", "s", *probe_args])
    names = ("probe", "shots", "probe_epochs", "knn_k", "probe_per_class")
    assert [getattr(ev, n) for n in names] == [getattr(st, n) for n in names] == ["fewshot", 2.0, 3, 5, 4]

    def helps(command):
        return {a.dest: (a.help, a.choices, a.default) for a in sub[command]._actions if a.dest in names}

    assert helps("eval") == helps("study") and len(helps("eval")) == len(names)
