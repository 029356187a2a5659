"""Runs on shared, preemptible clusters: the run-directory lock, failed writes (full disk,
read-only folder), SIGTERM / SIGUSR1 with a mid-epoch checkpoint, periodic mid-epoch
checkpoints, and the previous checkpoint kept beside the newest."""
import errno
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import (DNC_DATA, PRETRAIN_DATA as DATA, STUDY_BASE, assert_same_state, signal_at_steps, tiny_dnc_config,
                     tiny_dnc_options, tiny_pretrain_config as tiny_config, tiny_study_data, write_image_folder)
from sdclr_fast.cli import main
from sdclr_fast.files import DirectoryLockedError, WriteError, atomic_write, lock_directory
from sdclr_fast.train import load_checkpoint
from sdclr_fast.train.checkpoint import save_checkpoint
from sdclr_fast.train.pretrain import pretrain
from sdclr_fast.train.run import (EXIT_INTERRUPTED, EXIT_LOCKED, EXIT_PREEMPTED, EXIT_WRITE_FAILED, Preempted,
                                  read_metrics)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def stop_signal_handlers():
    """A command line stopped in-process (main()) leaves the stop signals ignored, as its process is
    meant to exit; put them back, or every later child of pytest would inherit SIGINT ignored."""
    import sdclr_fast.train.run as run

    saved = {s: signal.getsignal(s) for s in run.STOP_SIGNALS}
    yield
    for s, h in saved.items():
        signal.signal(s, h)
    run._stop.update(signal=None, previous={}, linger=False)

_HOLDER = r"""
import sys, time
sys.path.insert(0, sys.argv[2])
from sdclr_fast.files import lock_directory
with lock_directory(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def _hold_lock(folder):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder), str(ROOT)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _listing(folder):
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).iterdir())


# ---------------------------------------------------------------- the lock
def test_second_process_is_refused_and_the_lock_dies_with_its_holder(tmp_path, capsys):
    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        before = _listing(run)
        with pytest.raises(DirectoryLockedError, match=f"pid {holder.pid} on host"):
            pretrain(tiny_config("simclr", epochs=1), run_dir=run, data=DATA)
        # the command line: one line naming the directory and the holder, its own exit status
        with pytest.raises(SystemExit) as e:
            main(["pretrain", "--run-dir", str(run), "--dataset", "fashion-mnist-lt", "--device", "cpu"])
        assert e.value.code == EXIT_LOCKED
        err = capsys.readouterr().err
        assert str(run) in err and f"pid {holder.pid}" in err and len(err.strip().splitlines()) == 1
        with pytest.raises(SystemExit) as e:  # an eval writing its report there is refused too
            main(["eval", "--run-dir", str(run), "--device", "cpu"])
        assert e.value.code == EXIT_LOCKED
        assert _listing(run) == before  # nothing was touched
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs in the holder
        holder.wait()
    path = pretrain(tiny_config("simclr", epochs=1), run_dir=run, data=DATA)
    assert load_checkpoint(path)["finished"]


def test_lock_is_reentrant_within_a_process_and_released(tmp_path):
    with lock_directory(tmp_path):
        with lock_directory(tmp_path):
            pass
        holder = subprocess.run([sys.executable, "-c", _HOLDER.replace("time.sleep(600)", "pass"), str(tmp_path),
                                 str(ROOT)], capture_output=True, text=True, timeout=120)
        assert holder.returncode != 0 and "DirectoryLockedError" in holder.stderr  # still held
    holder = _hold_lock(tmp_path)  # released at the outer exit
    holder.kill()
    holder.wait()


# ---------------------------------------------------------------- failed writes
def test_full_disk_keeps_the_previous_version_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"config": {}, "model": {"w": torch.ones(3)}, "epoch": 1}, path)
    before = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("sdclr_fast.files.os.fsync", full)
    with pytest.raises(WriteError, match="could not write the checkpoint to .*no space left on the device"):
        save_checkpoint({"config": {}, "model": {"w": torch.zeros(3)}, "epoch": 2}, path, keep_previous=False)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    with pytest.raises(WriteError, match="split"):
        atomic_write(tmp_path / "split.json", "{}", what="the data split")
    assert not (tmp_path / "split.json").exists()


def test_read_only_folder_is_one_clear_line(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    run = tmp_path / "ro"
    run.mkdir()
    run.chmod(0o500)
    try:
        with pytest.raises(SystemExit) as e:
            main(["pretrain", "--run-dir", str(run), "--dataset", "fashion-mnist-lt", "--device", "cpu"])
        assert e.value.code == EXIT_WRITE_FAILED and "permission denied" in capsys.readouterr().err
    finally:
        run.chmod(0o700)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 300 KiB tmpfs (needs root, as on the CI machine; skipped elsewhere)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_pretrain_on_a_full_tmpfs_exits_with_one_line(small_tmpfs, capsys):
    data_root = small_tmpfs.parent / "images"
    write_image_folder(data_root)
    run = small_tmpfs / "run"
    argv = ["pretrain", "--method", "simclr", "--dataset", "imagefolder", "--data-root", str(data_root),
            "--image-size", "8", "--width", "16", "--epochs", "2", "--batch-size", "8", "--device", "cpu",
            "--no-progress", "--no-tensorboard", "--run-dir", str(run)]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == EXIT_WRITE_FAILED
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no space left on the device" in err and str(run) in err
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]  # no debris


# ---------------------------------------------------------------- stop signals
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, one_thread):
    out = {}
    for method in ("sdclr", "simclr"):
        run = tmp_path_factory.mktemp(f"full_{method}")
        out[method] = load_checkpoint(pretrain(tiny_config(method, epochs=3), run_dir=run, data=DATA))
    return out


# 48 training images / batch 16 = 3 steps per epoch, 9 steps in all
@pytest.mark.parametrize("method, step, signum", [
    ("sdclr", 1, signal.SIGTERM), ("sdclr", 5, signal.SIGUSR1), ("sdclr", 6, signal.SIGTERM),
    ("sdclr", 4, signal.SIGINT),
    ("simclr", 2, signal.SIGTERM), ("simclr", 8, signal.SIGTERM)])
def test_signal_mid_run_then_resume_equals_uninterrupted(tmp_path, monkeypatch, uninterrupted, method, step, signum):
    calls = signal_at_steps(monkeypatch, {step}, signum)
    with pytest.raises(Preempted, match=signal.Signals(signum).name) as e:
        pretrain(tiny_config(method, epochs=3), run_dir=tmp_path, data=DATA)
    assert calls[0] == step  # the step that was running when the signal came was finished
    st = load_checkpoint(tmp_path)
    assert st["step"] == step and st["epoch"] * 3 + st["position"] == step and not st["finished"]
    where = "after epoch" if step % 3 == 0 else f"after step {step % 3}/3"
    assert where in str(e.value)
    monkeypatch.undo()
    pretrain(tiny_config(method, epochs=3), run_dir=tmp_path, data=DATA, resume=True)
    final = load_checkpoint(tmp_path)
    full = uninterrupted[method]
    for key in ("model", "optimizer", "scheduler"):
        assert_same_state(final[key], full[key], key)
    assert final["last_epoch_metrics"]["loss"] == full["last_epoch_metrics"]["loss"]
    steps = [r["step"] for r in read_metrics(tmp_path) if r["kind"] == "step"]
    assert steps == list(range(1, 10))  # the metrics log has each step once


def test_second_signal_while_saving_corrupts_nothing(tmp_path, monkeypatch, uninterrupted):
    calls = signal_at_steps(monkeypatch, {4, 5}, during_save=True)
    with pytest.raises(Preempted):
        pretrain(tiny_config("sdclr", epochs=3), run_dir=tmp_path, data=DATA)
    assert calls[1] == 1  # the second signal did arrive during the save
    assert load_checkpoint(tmp_path)["step"] == 4
    monkeypatch.undo()
    pretrain(tiny_config("sdclr", epochs=3), run_dir=tmp_path, data=DATA, resume=True)
    assert_same_state(load_checkpoint(tmp_path)["model"], uninterrupted["sdclr"]["model"], "model")


def test_checkpoint_every_steps_then_kill_resumes_mid_epoch(tmp_path, monkeypatch, uninterrupted):
    import sdclr_fast.ops.nt_xent as ntx

    real, calls = ntx.nt_xent, [0]

    def dies_at_step_6(*a, **k):  # like kill -9 during step 6: nothing after step 5's checkpoint
        calls[0] += 1
        if calls[0] == 6:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ntx, "nt_xent", dies_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_config("simclr", epochs=3, checkpoint_every_steps=5), run_dir=tmp_path, data=DATA)
    st = load_checkpoint(tmp_path)
    assert (st["epoch"], st["position"], st["step"]) == (1, 2, 5)
    monkeypatch.undo()
    # checkpoint_every_steps only changes how the run executes: resuming without it is allowed
    pretrain(tiny_config("simclr", epochs=3), run_dir=tmp_path, data=DATA, resume=True)
    assert_same_state(load_checkpoint(tmp_path)["model"], uninterrupted["simclr"]["model"], "model")


def test_corrupt_newest_checkpoint_resumes_from_the_previous(tmp_path, capsys, uninterrupted):
    pretrain(tiny_config("sdclr", epochs=3), run_dir=tmp_path, data=DATA, stop_at_epoch=2)
    assert load_checkpoint(tmp_path / "checkpoint.prev.pt")["epoch"] == 1
    newest = tmp_path / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    capsys.readouterr()
    pretrain(tiny_config("sdclr", epochs=3), run_dir=tmp_path, data=DATA, resume=True)
    out = capsys.readouterr().out
    assert "truncated" in out and "checkpoint.prev.pt" in out
    assert_same_state(load_checkpoint(tmp_path)["model"], uninterrupted["sdclr"]["model"], "model")


@pytest.mark.slow
def test_sigterm_to_the_command_line_exits_75_and_resumes(tmp_path):
    data_root = tmp_path / "images"
    write_image_folder(data_root)
    common = ["--method", "sdclr", "--dataset", "imagefolder", "--data-root", str(data_root), "--image-size", "8",
              "--width", "4", "--epochs", "6", "--batch-size", "8", "--lr", "0.1", "--warmup-epochs", "1",
              "--device", "cpu", "--no-progress", "--no-tensorboard", "--seed", "1", "--threads", "1",
              "--log-every", "1"]
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "sdclr_fast", "pretrain", "--run-dir", str(run), *common],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.05)
    while time.time() < deadline and (run / "metrics.jsonl").stat().st_size == 0:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert "stopped by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    assert not load_checkpoint(run)["finished"]
    r = subprocess.run([sys.executable, "-m", "sdclr_fast", "pretrain", "--run-dir", str(run), "--resume"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    full = tmp_path / "full"
    r = subprocess.run([sys.executable, "-m", "sdclr_fast", "pretrain", "--run-dir", str(full), *common], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert_same_state(load_checkpoint(run)["model"], load_checkpoint(full)["model"], "model")


# ---------------------------------------------------------------- a damaged newest checkpoint, through the CLI
def _tiny_cli(data_root, run, *extra, method="sdclr"):
    return ["pretrain", "--method", method, "--dataset", "imagefolder", "--data-root", str(data_root),
            "--image-size", "8", "--width", "4", "--epochs", "3", "--batch-size", "8", "--lr", "0.1",
            "--warmup-epochs", "1", "--device", "cpu", "--no-progress", "--no-tensorboard", "--seed", "1",
            "--run-dir", str(run), *extra]


_DAMAGE = {"truncated": lambda b: b[:len(b) // 2], "empty": lambda b: b"",
           "random": lambda b: bytes(torch.randint(0, 256, (len(b),), generator=torch.Generator().manual_seed(0),
                                                   dtype=torch.uint8).tolist())}


@pytest.fixture(scope="module")
def stopped_cli_run(tmp_path_factory, one_thread):
    """A CLI run stopped after 2 of 3 epochs, and the same run uninterrupted."""
    root = tmp_path_factory.mktemp("damaged")
    write_image_folder(root / "images")
    assert main(_tiny_cli(root / "images", root / "stopped", "--stop-at-epoch", "2")) == 0
    assert main(_tiny_cli(root / "images", root / "full")) == 0
    return root


def _damaged_copy(stopped_cli_run, tmp_path, damage):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(stopped_cli_run / "stopped", run)
    newest = run / "checkpoint.pt"
    newest.write_bytes(_DAMAGE[damage](newest.read_bytes()))
    return run


@pytest.mark.parametrize("damage", sorted(_DAMAGE))
def test_damaged_newest_checkpoint_resumes_from_the_previous_through_the_cli(stopped_cli_run, tmp_path, capsys,
                                                                              damage):
    run = _damaged_copy(stopped_cli_run, tmp_path, damage)
    capsys.readouterr()
    assert main(["pretrain", "--run-dir", str(run), "--resume"]) == 0
    out = capsys.readouterr().out
    said = [ln for ln in out.splitlines() if "checkpoint.prev.pt" in ln]
    assert len(said) == 1 and str(run / "checkpoint.pt") in said[0], out  # one line, both files named
    final = load_checkpoint(run)
    assert final["finished"] and final["epoch"] == 3
    assert_same_state(final["model"], load_checkpoint(stopped_cli_run / "full")["model"], "model")
    assert not list(run.glob(".*.tmp"))  # no temporary copy of the previous checkpoint is left


def test_eval_of_a_damaged_run_uses_the_previous_and_marks_it_unfinished(stopped_cli_run, tmp_path, capsys):
    run = _damaged_copy(stopped_cli_run, tmp_path, "truncated")
    capsys.readouterr()
    assert main(["eval", "--run-dir", str(run), "--probe", "knn", "--knn-k", "5", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert len([ln for ln in out.splitlines() if "checkpoint.prev.pt" in ln]) == 1, out
    table = [ln for ln in out.splitlines() if "knn" in ln and "|" in ln]
    assert len(table) == 1 and "unfinished: 1/3 epochs" in table[0], out  # the previous holds epoch 1
    assert "unfinished: 1/3 epochs" in (run / "report.md").read_text()


def test_eval_of_a_finished_run_has_no_mark(stopped_cli_run, tmp_path, capsys):
    assert main(["eval", "--run-dir", str(stopped_cli_run / "full"), "--probe", "knn", "--knn-k", "5",
                 "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert "unfinished" not in capsys.readouterr().out + (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("stage", ["base", "expert_1", "student"])
def test_damaged_checkpoint_of_a_finished_dnc_stage_is_redone_from_the_previous(tmp_path, capsys, stage):
    from sdclr_fast.train.dnc import dnc

    student = dnc(tiny_dnc_config(), tiny_dnc_options(), run_dir=tmp_path, data=DNC_DATA)
    # the run's final checkpoint.pt is a hard link to the student's; damage a copy of the stage's file
    damaged = tmp_path / stage / "checkpoint.pt"
    good = damaged.read_bytes()
    damaged.unlink()
    damaged.write_bytes(good[:len(good) // 3])
    capsys.readouterr()
    assert dnc(tiny_dnc_config(), tiny_dnc_options(), run_dir=tmp_path, data=DNC_DATA, resume=True) == student
    out = capsys.readouterr().out
    said = [ln for ln in out.splitlines() if "checkpoint.prev.pt" in ln]
    assert len(said) == 1 and str(damaged) in said[0], out
    assert load_checkpoint(damaged)["finished"]
    assert_same_state(load_checkpoint(damaged)["model"], torch.load(io.BytesIO(good))["model"], stage)


# ---------------------------------------------------------------- signals to the whole job, with DataLoader workers
@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_shards")
    write_image_folder(root / "images")
    assert main(["shards", "--dataset", "imagefolder", "--data-root", str(root / "images"), "--out",
                 str(root / "shards"), "--shard-size", "10"]) == 0
    return root / "shards"


def _stream_cli(shards, run, epochs=40):
    return [sys.executable, "-m", "sdclr_fast", "pretrain", "--method", "sdclr", "--dataset", "webdataset",
            "--data-root", str(shards), "--data-workers", "2", "--shuffle-buffer", "8", "--image-size", "8",
            "--width", "4", "--epochs", str(epochs), "--batch-size", "8", "--lr", "0.1", "--warmup-epochs", "1",
            "--device", "cpu", "--no-progress", "--no-tensorboard", "--threads", "1", "--log-every", "1",
            "--run-dir", str(run)]


def _start_job(argv, run, min_steps=2):
    """The command in a process group of its own (a scheduler's job), once it has logged steps."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count('"kind": "step"') >= min_steps:
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the job did not start training: {proc.communicate()}")


def _workers_of(proc):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _wait_for_workers(proc, timeout=120):
    """The DataLoader workers' pids, once the job has some. Workers live for one epoch
    (persistent_workers=False), so a job just past an epoch's end has none for a moment."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if workers := _workers_of(proc):
            return workers
        time.sleep(0.005)
    return []


_SLOW_WORKER_START = r"""
import signal, sys, time
import torch
from sdclr_fast.data.loader import ignore_stop_signals, iter_workers

stops = []
signal.signal(signal.SIGTERM, lambda *a: stops.append("SIGTERM"))


def slow_init(worker_id):  # the window between fork and the worker's own handling, made wide
    time.sleep(1.5)
    ignore_stop_signals(worker_id)


loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2, num_workers=2, worker_init_fn=slow_init)
it = (iter_workers if sys.argv[1] == "held" else iter)(loader)
print("forked", flush=True)
print(sum(int(b.sum()) for b in it), stops, flush=True)
"""


@pytest.mark.parametrize("start", ["held", "plain"])
def test_a_stop_signal_while_workers_start_does_not_kill_them(start):
    """A signal to the whole job that lands after a worker was forked but before its
    worker_init_fn ran: with iter_workers it waits for the worker's handling and is ignored
    there; with a plain iter() (the control) torch's SIGTERM handler kills the worker."""
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WORKER_START, start], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "forked"
    assert len(_workers_of(proc)) == 2
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    if start == "held":
        assert proc.returncode == 0 and out.strip() == "28 ['SIGTERM']", err
    else:
        assert proc.returncode != 0 and "killed by signal: Terminated" in err


@pytest.mark.slow
@pytest.mark.parametrize("signals, status", [
    ((signal.SIGTERM,), EXIT_PREEMPTED),
    ((signal.SIGTERM, signal.SIGTERM), EXIT_PREEMPTED),     # a scheduler's second SIGTERM changes nothing
    ((signal.SIGUSR1, signal.SIGTERM), EXIT_PREEMPTED),
    ((signal.SIGTERM,) * 6, EXIT_PREEMPTED),                 # more, over 2 s: through the save and the exit
    ((signal.SIGINT,), EXIT_INTERRUPTED),                   # Ctrl-C reaches the whole foreground group
])
def test_signals_to_the_whole_process_group_stop_cleanly(tiny_shards, tmp_path, signals, status):
    run = tmp_path / "run"
    proc = _start_job(_stream_cli(tiny_shards, run), run)
    assert _wait_for_workers(proc), "the run has no DataLoader workers to signal"
    pgid = os.getpgid(proc.pid)
    for i, signum in enumerate(signals):
        if i:
            time.sleep(0.05 + 0.1 * i)
        os.killpg(pgid, signum)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"stopped by {signal.Signals(signals[0]).name}" in lines[0], err
    assert "--resume" in lines[0] and str(run / "checkpoint.pt") in lines[0]
    st = load_checkpoint(run)
    assert not st["finished"] and st["step"] >= 2
    r = subprocess.run(_stream_cli(tiny_shards, run, epochs=40)[:-2] + ["--run-dir", str(run), "--resume",
                                                                       "--stop-at-epoch", str(st["epoch"] + 1)],
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(run)["epoch"] == st["epoch"] + 1


def test_ctrl_c_in_training_through_the_cli_saves_and_exits_130(stopped_cli_run, tmp_path, monkeypatch, capsys):
    signal_at_steps(monkeypatch, {2}, signal.SIGINT)
    with pytest.raises(SystemExit) as e:
        main(_tiny_cli(stopped_cli_run / "images", tmp_path / "run"))
    assert e.value.code == EXIT_INTERRUPTED
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "stopped by SIGINT in epoch 1 after step 2/" in err, err
    assert load_checkpoint(tmp_path / "run")["step"] == 2


def _as_from_a_shell():
    """The signal state a shell starts a command with (pytest's own may differ after the tests above)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_DFL)


@pytest.mark.slow
def test_ctrl_c_in_eval_is_one_line(stopped_cli_run, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "sdclr_fast", "eval", "--run-dir", str(stopped_cli_run / "full"),
                             "--probe", "full", "--probe-epochs", "100000", "--device", "cpu", "--out", str(out)],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=_as_from_a_shell)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / ".lock").exists():  # the command is running
        time.sleep(0.05)
    time.sleep(2.0)
    os.killpg(os.getpgid(proc.pid), signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # no stray evaluation should the test fail
    assert proc.returncode == EXIT_INTERRUPTED and err.strip().splitlines() == [
        "sdclr-fast eval: interrupted (SIGINT); nothing was saved"], err


# ---------------------------------------------------------------- expected failures: one line, exit 2, flag names
INTERNAL_NAMES = ("official_split", "root=", "batch_size", "data=", "stopped: stopped", "prune_block", "Traceback")


@pytest.fixture(scope="module")
def odd_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    (root / "a_file").write_text("not a folder")
    (root / "empty").mkdir()
    (root / "cifar" / "cifar-10-batches-py").mkdir(parents=True)
    return root


BAD_INPUT = {
    "cifar without --data-root": (["pretrain", "--dataset", "cifar10-lt"], "needs --data-root"),
    "cifar, missing --data-root": (["pretrain", "--dataset", "cifar10-lt", "--data-root", "{odd}/missing"],
                                   "no CIFAR-10"),
    "cifar, empty --data-root": (["pretrain", "--dataset", "cifar10-lt", "--data-root", "{odd}/empty"], "no CIFAR-10"),
    "cifar, --data-root a file": (["pretrain", "--dataset", "cifar10-lt", "--data-root", "{odd}/a_file"],
                                  "no CIFAR-10"),
    "--split-file a file": (["pretrain", "--dataset", "cifar10-lt", "--data-root", "{odd}/cifar", "--split", "1",
                             "--split-file", "{odd}/a_file"], "--split-file"),
    "--split-file an empty folder": (["pretrain", "--dataset", "cifar10-lt", "--data-root", "{odd}/cifar",
                                      "--split", "1", "--split-file", "{odd}/empty"], "--split-file"),
    "--batch-size 1": (["pretrain", "--dataset", "imagefolder", "--data-root", "{images}", "--batch-size", "1"],
                       "--batch-size=1 gives 1 image(s) per process"),
    "--ratio 1e9": (["pretrain", "--dataset", "imagefolder", "--data-root", "{images}", "--ratio", "1e9",
                     "--image-size", "8", "--width", "4", "--batch-size", "2"],
                    "ratio=1e+09 leaves 3 of 4 classes without a training image"),
    "--run-dir a file": (["pretrain", "--dataset", "imagefolder", "--data-root", "{images}", "--run-dir",
                          "{odd}/a_file"], "'{odd}/a_file' is a file, not a directory"),
    "--prune-block larger than every layer": (
        ["pretrain", "--dataset", "imagefolder", "--data-root", "{images}", "--image-size", "8", "--width", "4",
         "--batch-size", "8", "--prune-block", "33x32"], "block 33x32 is larger than"),
    "bench, unknown name": (["bench", "no_such_benchmark"], "unknown benchmark 'no_such_benchmark'"),
    "demo --epochs 0": (["demo", "--epochs", "0", "--run-dir", "{run}"], "(--epochs) must be an int >= 1, got 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_line_and_exit_2(case, odd_paths, stopped_cli_run, tmp_path, capsys):
    argv, says = BAD_INPUT[case]
    fill = {"odd": str(odd_paths), "images": str(stopped_cli_run / "images"), "run": str(tmp_path / "run")}
    argv = [a.format(**fill) for a in argv]
    if argv[0] == "pretrain":  # one short epoch should a check ever let it through
        argv += ["--epochs", "1", "--device", "cpu", "--no-progress", "--no-tensorboard"]
        argv += [] if "--run-dir" in argv else ["--run-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert says.format(**fill) in err, err
    assert not any(name in err for name in INTERNAL_NAMES), err
    if case in ("--batch-size 1", "--ratio 1e9"):  # refused before anything is written
        assert not (tmp_path / "run" / "config.json").exists() and not (tmp_path / "run" / "split.json").exists()


def test_empty_run_dir_is_refused(capsys):
    for argv in (["pretrain", "--run-dir", ""], ["eval", "--run-dir", ""], ["demo", "--run-dir", ""]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert "argument --run-dir: must name a directory, got an empty string" in capsys.readouterr().err


def test_init_checkpoint_of_another_width_names_the_differing_arguments(stopped_cli_run, tmp_path, capsys):
    argv = _tiny_cli(stopped_cli_run / "images", tmp_path / "run", "--width", "8", "--init-checkpoint",
                     str(stopped_cli_run / "full" / "checkpoint.pt"))  # the last --width wins: 8
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert "--init-checkpoint" in err and "(width: 4 there, 8 here)" in err, err


def test_resume_with_the_data_moved_elsewhere_compares_the_data_not_its_folder(stopped_cli_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(stopped_cli_run / "stopped", run)
    moved = tmp_path / "staged"
    shutil.copytree(stopped_cli_run / "images", moved)  # node-local staging after a requeue
    assert main(["pretrain", "--run-dir", str(run), "--resume", "--data-root", str(moved)]) == 0
    assert_same_state(load_checkpoint(run)["model"], load_checkpoint(stopped_cli_run / "full")["model"], "model")
    # other images under the same names are refused, naming what differs
    run2 = tmp_path / "run2"
    shutil.copytree(stopped_cli_run / "stopped", run2)
    from PIL import Image

    first = sorted((moved / "train" / "class0").iterdir())[0]
    Image.new("RGB", (8, 8), (9, 9, 9)).save(first)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--run-dir", str(run2), "--resume", "--data-root", str(moved)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "the training data differs" in err and "sha256" in err, err


def test_files_honour_the_umask(tmp_path, stopped_cli_run):
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "a.json", "{}")
        save_checkpoint({"config": {}, "model": {}, "epoch": 0}, tmp_path / "checkpoint.pt")
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
        assert (tmp_path / "checkpoint.pt").stat().st_mode & 0o777 == 0o640
        os.umask(0o002)
        atomic_write(tmp_path / "a.json", "{}")
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o664
    finally:
        os.umask(old)
    for name in ("checkpoint.pt", "checkpoint.prev.pt", "config.json", "split.json", "metrics.jsonl"):
        assert (stopped_cli_run / "stopped" / name).stat().st_mode & 0o777 == 0o666 & ~old, name


def test_debris_of_a_failed_write_is_removed_by_the_next_run(stopped_cli_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(stopped_cli_run / "stopped", run)
    for name in (".checkpoint.prev.pt.tmp", ".checkpoint.pt.k2j3h4.tmp"):  # link_or_copy's, atomic_write's
        (run / name).write_bytes(b"half")
    assert main(["pretrain", "--run-dir", str(run), "--resume", "--stop-at-epoch", "3"]) == 0
    assert not list(run.glob(".*.tmp"))


def test_a_study_cell_with_a_damaged_checkpoint_continues_from_the_previous(tmp_path, capsys):
    from sdclr_fast.train.study import cell_dir, run_study

    kw = dict(methods=("simclr",), splits=(0,), seeds=(0,), probes=("knn",), knn_k=3, data=tiny_study_data)
    base = STUDY_BASE.replace(epochs=2)
    run_study(base, tmp_path, **kw)
    cell = cell_dir(tmp_path, "simclr", 0, 0, False)
    full = load_checkpoint(cell)
    (cell / "eval.json").unlink()
    newest = cell / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[:5000])
    capsys.readouterr()
    run_study(base, tmp_path, **kw)
    out = capsys.readouterr().out
    said = [ln for ln in out.splitlines() if "checkpoint.prev.pt" in ln]
    assert len(said) == 1 and str(newest) in said[0], out
    assert_same_state(load_checkpoint(cell)["model"], full["model"], "model")  # the last epoch again, exactly
    assert (cell / "eval.json").exists()


def test_resume_with_another_method_is_one_line_and_exit_2(stopped_cli_run, capsys):
    before = _listing(stopped_cli_run / "stopped")
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--run-dir", str(stopped_cli_run / "stopped"), "--resume", "--method", "simclr"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "is a sdclr run, not simclr" in err, err
    assert _listing(stopped_cli_run / "stopped") == before


def test_a_library_caller_gets_its_signal_handlers_back_after_a_stop(tmp_path, monkeypatch):
    import sdclr_fast.train.run as run

    monkeypatch.setitem(run._stop, "linger", False)  # as in a notebook: not the command line
    before = {s: signal.getsignal(s) for s in run.STOP_SIGNALS}
    signal_at_steps(monkeypatch, {1}, signal.SIGINT)
    with pytest.raises(Preempted, match="SIGINT"):
        pretrain(tiny_config("simclr", epochs=1), run_dir=tmp_path, data=DATA)
    assert {s: signal.getsignal(s) for s in run.STOP_SIGNALS} == before  # Ctrl-C interrupts again
