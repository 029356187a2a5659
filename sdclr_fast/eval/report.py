"""Per-class accuracy plot (PNG) and a markdown report of the group metrics."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..files import atomic_write, write_json as write_json_file, write_text
from .metrics import GROUPS, METRICS, EvalResult, group_classes, mean_std

_GROUP_COLOURS = {"major": "tab:blue", "moderate": "tab:orange", "minor": "tab:red"}


def _check_results(results, name):
    if not isinstance(results, dict) or not results:
        raise ValueError(f"{name} must be a non-empty dict")
    return results


def _as_list(r):
    if isinstance(r, EvalResult):
        return [r]
    r = list(r)
    if not r or not all(isinstance(x, EvalResult) for x in r):
        raise ValueError("each entry must be an EvalResult or a non-empty list of them")
    return r


def plot_per_class_accuracy(results: dict, path, *, title: str | None = None) -> Path:
    """Per-class test accuracy against the class's training-split count (log x), one panel per
    method side by side (e.g. {"SimCLR": r1, "SDCLR": r2, "DnC": r3}); each value an EvalResult
    or a list of them (splits: the points of every split are drawn). Points are coloured by
    group, dashed lines mark the group means. Writes a PNG and returns its path."""
    # A bare Figure renders with Agg and leaves pyplot's global backend and figure list alone.
    from matplotlib.figure import Figure

    results = _check_results(results, "results")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(results)
    fig = Figure(figsize=(4.2 * n, 3.8))
    axes = fig.subplots(1, n, sharey=True, squeeze=False)
    for ax, (method, res) in zip(axes[0], results.items()):
        runs = _as_list(res)
        for g in GROUPS:
            xs, ys = [], []
            for r in runs:
                idx = group_classes(r.class_counts, r.groups)[g]
                xs.append(np.maximum(r.class_counts[idx], 1))
                ys.append(r.per_class[idx])
            ax.scatter(np.concatenate(xs), np.concatenate(ys), s=14, alpha=0.75, color=_GROUP_COLOURS[g],
                       label=f"{g} ({np.mean([getattr(r, g) for r in runs]):.1f}%)")
            ax.axhline(np.mean([getattr(r, g) for r in runs]), color=_GROUP_COLOURS[g], ls="--", lw=1)
        stats = mean_std(runs)
        ax.set_xscale("log")
        splits = f", mean of {len(runs)} splits" if len(runs) > 1 else ""
        ax.set_title(f"{method}: {stats['overall'][0]:.1f}% (std {stats['std'][0]:.1f}{splits})", fontsize=10)
        ax.set_xlabel("training images of the class")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="best", framealpha=0.8)
    axes[0][0].set_ylabel("test accuracy of the class (%)")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), what="the per-class plot")
    return path


def _fmt(stats, m, multi):
    mean, std = stats[m]
    return f"{mean:.2f} ± {std:.2f}" if multi else f"{mean:.2f}"


def write_report(path, results: dict, *, title: str = "Linear evaluation", plots=(), notes: str | None = None,
                 write_json: bool = True) -> Path:
    """Write a markdown report: one table row per (method, probe).

    results: {method: {probe: EvalResult or list of EvalResults (one per split)}}, e.g.
             {"SDCLR": {"linear": [...], "fewshot-100": [...], "knn": [...]}}. Lists are reported
             as mean ± std (population std) over the splits.
    plots:   image paths to embed (linked relative to the report's folder).
    notes:   free markdown placed under the title (data set, epochs, ...).
    write_json: also write the raw numbers beside the report (same name, .json).
    """
    results = _check_results(results, "results")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""]
    if notes:
        lines += [notes.strip(), ""]
    rules = {r.groups for probes in results.values() for res in probes.values() for r in _as_list(res)}
    cut = ("cut into thirds" if rules == {"thirds"} else "cut at > 100 / 20-100 / < 20 images (the official "
           "ImageNet-100-LT rule)" if rules == {"imagenet-lt"} else "cut by each run's rule")
    lines += ["Accuracies in % on the test set. Groups: classes ranked by their count in the long-tailed "
              f"training split, {cut} (major / moderate / minor); std = population std of the three "
              "group accuracies (lower = more balanced).", "",
              "| method | probe | splits | overall | major | moderate | minor | std |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    raw = {}
    for method, probes in results.items():
        if not isinstance(probes, dict) or not probes:
            raise ValueError(f"results[{method!r}] must be a non-empty dict probe -> result(s)")
        raw[method] = {}
        for probe, res in probes.items():
            runs = _as_list(res)
            stats = mean_std(runs)
            multi = len(runs) > 1
            cells = [_fmt(stats, m, multi) for m in ("overall", "major", "moderate", "minor", "std")]
            lines.append(f"| {method} | {probe} | {len(runs)} | " + " | ".join(cells) + " |")
            raw[method][probe] = {"mean_std": {m: list(stats[m]) for m in METRICS},
                                  "runs": [r.to_dict() for r in runs]}
    lines.append("")
    for plot in plots:
        rel = os.path.relpath(Path(plot).resolve(), path.parent.resolve()).replace(os.sep, "/")
        lines += [f"![{Path(plot).stem}]({rel})", ""]
    write_text(path, "\n".join(lines), what="the report")
    if write_json:
        write_json_file(path.with_suffix(".json"), raw, what="the report data")
    return path
