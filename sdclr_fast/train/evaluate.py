"""Evaluate pretraining runs: rebuild each run's data split, load its checkpoint, run the probes."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CHECKPOINT_NAME, load_newest_checkpoint
from .config import PretrainConfig
from .models import DenseEncoder, build_model_from_args, load_weights
from .run import resolve_device, run_data

PROBE_CHOICES = ("full", "fewshot", "knn", "all")


def probe_names(probe: str, shots=0.01) -> tuple:
    """CLI probe choice -> the probe names of ``sdclr_fast.eval.evaluate_backbone``."""
    table = {"full": ("linear",), "fewshot": (f"fewshot-{shots}",), "knn": ("knn",)}
    if probe == "all":
        return table["full"] + table["fewshot"] + table["knn"]
    if probe not in table:
        raise ValueError(f"probe must be one of {PROBE_CHOICES}, got {probe!r}")
    return table[probe]


def resolve_checkpoint(path) -> Path:
    """A run directory or a checkpoint file -> the checkpoint file."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def run_label(checkpoint_state: dict, path: Path) -> str:
    """The run's name in tables and reports, marked when its training did not finish."""
    cfg = checkpoint_state["config"]
    name = {"simclr": "SimCLR", "sdclr": "SDCLR", "moclr": "MoCLR"}.get(cfg.get("method"), str(cfg.get("method")))
    stage = cfg.get("extra", {}).get("label")
    label = stage or f"{name} ({path.parent.name})"
    progress = unfinished(checkpoint_state)
    return label if progress is None else f"{label} [unfinished: {progress}]"


def unfinished(checkpoint_state: dict) -> str | None:
    """None for a checkpoint of a finished run, else how far it got ("1/3 epochs + 41 steps")."""
    if checkpoint_state.get("finished", True):
        return None
    epochs = checkpoint_state["config"].get("epochs")
    position = int(checkpoint_state.get("position", 0))
    return f"{checkpoint_state['epoch']}/{epochs} epochs" + (f" + {position} steps" if position else "")


def data_for_run(checkpoint_state: dict, run_dir: Path):
    """The run's data set, with the exact split it was trained on when split.json is there. A run
    on a stream (webdataset) has no probe / test sets: its ``eval_dataset`` is built instead."""
    config = PretrainConfig.from_dict(checkpoint_state["config"])
    if config.dataset == "webdataset":
        if config.eval_dataset is None:
            raise ValueError(f"{str(run_dir)!r} was trained on a stream (--dataset webdataset), which has no probe "
                             f"or test sets; evaluate it on a labelled data set (--eval-dataset and "
                             f"--eval-data-root)")
        from ..data import build_dataset

        from ..data.augment import with_input_norm

        return with_input_norm(build_dataset(config.eval_dataset, config.eval_data_root, seed=config.seed,
                                             split=config.split), config.input_norm)
    return run_data(config, run_dir)


def evaluate_checkpoint(path, *, probes=("linear", "knn"), data=None, device=None, batch_size: int = 512,
                        probe_options: dict | None = None, knn_k: int = 200, seed: int = 0,
                        probe_per_class: int | None = None, deterministic: bool = True):
    """(label, {probe: EvalResult}) for the checkpoint at ``path`` (file or run directory).

    data: the ``ContrastiveData`` to evaluate on (default: rebuilt from the run's config and
    split.json). Probes and ``deterministic`` (one CPU thread: the same numbers under any thread
    count) as in ``sdclr_fast.eval.evaluate_backbone``.
    """
    from ..eval import evaluate_backbone

    ckpt = resolve_checkpoint(path)
    state, note = load_newest_checkpoint(ckpt)
    if note:
        print(note, flush=True)
    # The checkpoint's own input statistics, also for a data set given by the caller.
    data = data_for_run(state, ckpt.parent) if data is None else run_data(
        PretrainConfig.from_dict(state["config"]), ckpt.parent, data)
    device = resolve_device(device)
    model = load_weights(build_model_from_args(state["model_args"]), state).to(device).eval()
    amp = torch.bfloat16 if device.type == "cuda" else None
    results = evaluate_backbone(DenseEncoder(model), data, probes=tuple(probes), device=device,
                                batch_size=batch_size, probe_options=probe_options, knn_k=knn_k, seed=seed,
                                autocast_dtype=amp, probe_per_class=probe_per_class, deterministic=deterministic,
                                groups=PretrainConfig.from_dict(state["config"]).eval_groups)
    return run_label(state, ckpt), results


def parse_shots(value: float):
    """The CLI's --shots: an int >= 1 of images per class, else a fraction."""
    return int(value) if float(value).is_integer() and value >= 1 else float(value)


def evaluate_runs(run_dirs, *, probe="all", shots=0.01, probe_epochs=None, knn_k=200, batch_size=512,
                  device=None, data=None, probe_per_class=None, deterministic=True) -> dict:
    """{label: {probe: EvalResult}} for each run (labels made unique)."""
    probes = probe_names(probe, parse_shots(shots))
    opts = {"epochs": probe_epochs} if probe_epochs is not None else None
    results = {}
    for rd in run_dirs:
        label, res = evaluate_checkpoint(rd, probes=probes, data=data, device=device, batch_size=batch_size,
                                         probe_options=opts, knn_k=knn_k, probe_per_class=probe_per_class,
                                         deterministic=deterministic)
        base, i = label, 2
        while label in results:
            label, i = f"{base} #{i}", i + 1
        results[label] = res
    return results


def format_table(results: dict) -> str:
    """Plain-text table: one row per (method, probe) with overall / group accuracies and std."""
    rows = [("method", "probe", "overall", "major", "moderate", "minor", "std")]
    for label, probes in results.items():
        for probe, r in probes.items():
            rows.append((label, probe, *(f"{getattr(r, m):.2f}" for m in ("overall", "major", "moderate",
                                                                           "minor", "std"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def write_outputs(results: dict, out_dir, *, title: str, notes: str | None = None) -> dict:
    """report.md (+ .json) and one per-class plot per probe in ``out_dir``; returns the paths."""
    from ..eval import plot_per_class_accuracy, write_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    probes = []
    for per in results.values():
        for p in per:
            if p not in probes:
                probes.append(p)
    plots = []
    for p in probes:
        per_method = {label: per[p] for label, per in results.items() if p in per}
        safe = p.replace(".", "_")
        plots.append(plot_per_class_accuracy(per_method, out_dir / f"per_class_{safe}.png",
                                             title=f"per-class accuracy ({p})"))
    report = write_report(out_dir / "report.md", results, title=title, plots=plots, notes=notes)
    return {"report": report, "plots": plots}
