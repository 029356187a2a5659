"""``sdclr-fast study``: a grid of pretraining + evaluation runs and one report that says whether
a method helps the tail.

Cells are methods x splits x seeds, optionally each also pretrained on the class-balanced
subset D_b of the long-tailed split's size (SDCLR's balanced baseline). Every cell is a normal
run directory ``cells/<method>[-balanced]/split<k>-seed<s>/`` plus its ``eval.json``; a finished
cell is skipped, an interrupted one resumed, so a killed study continues where it stopped.

The report (``report.md`` + ``report.json`` + plots) gives, per method and probe, the mean ± std
over cells of overall / major / moderate / minor accuracy and the balancedness std. Since every
split gives the head and tail ranks to another class permutation, a class's difficulty is
averaged out over splits; the balanced-baseline comparison removes it per run: for each class,
accuracy after long-tailed pretraining minus accuracy after balanced pretraining of the same
method, split and seed, against the class's long-tailed training count.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..files import lock_directory, write_json
from .config import PretrainConfig

LABELS = {"simclr": "SimCLR", "sdclr": "SDCLR", "moclr": "MoCLR"}


def cell_dir(out_dir, method: str, split: int, seed: int, balanced: bool) -> Path:
    return Path(out_dir) / "cells" / (method + ("-balanced" if balanced else "")) / f"split{split}-seed{seed}"


def _label(method, balanced):
    return LABELS.get(method, method) + (" (balanced D_b)" if balanced else "")


def run_study(base: PretrainConfig, out_dir, *, methods=("simclr", "sdclr"), splits=(0, 1, 2), seeds=(0,),
              balanced: bool = False, probes=("linear", "fewshot-0.01", "knn"), probe_epochs=None, knn_k: int = 200,
              device=None, title: str = "Study", data=None, probe_per_class: int | None = None) -> dict:
    """Run (or continue) the grid and write the report; returns the report's paths and numbers.

    data: None (each cell builds its data set from its configuration) or a function
          ``(config) -> ContrastiveData`` (tests, data held in memory).
    probe_per_class: train the full-shot probe and kNN on a balanced subset of that many images
          per class of the probe pool (cheaper on a CPU); None: the whole pool (the protocol)."""
    from .run import run_data
    from ..eval import EvalResult
    from .evaluate import evaluate_checkpoint
    from .pretrain import pretrain

    if not isinstance(base, PretrainConfig):
        raise ValueError(f"base must be a PretrainConfig, got {type(base).__name__}")
    methods, splits, seeds = list(methods), [int(s) for s in splits], [int(s) for s in seeds]
    if not methods or not splits or not seeds:
        raise ValueError("methods, splits and seeds must each name at least one value")
    out_dir = Path(out_dir)
    results, cells = {}, []
    with lock_directory(out_dir, what="study directory"):
        for split in splits:
            for seed in seeds:
                for method in methods:
                    for bal in ([False, True] if balanced else [False]):
                        run = cell_dir(out_dir, method, split, seed, bal)
                        cfg = base.replace(method=method, split=split, seed=seed,
                                           pretrain_set="balanced" if bal else "long_tail",
                                           extra={**base.extra, "label": _label(method, bal)})
                        print(f"study: {_label(method, bal)}, split {split}, seed {seed} -> {run}", flush=True)
                        cell_data = run_data(cfg, run) if data is None else data(cfg)
                        pretrain(cfg, run_dir=run, resume=True, data=cell_data)
                        scores = run / "eval.json"
                        if scores.exists():
                            res = {p: EvalResult.from_dict(d) for p, d in json.loads(scores.read_text()).items()}
                        else:
                            opts = {"epochs": probe_epochs} if probe_epochs is not None else None
                            _, res = evaluate_checkpoint(run, probes=probes, device=device, probe_options=opts,
                                                         knn_k=knn_k, seed=seed, data=cell_data,
                                                         probe_per_class=probe_per_class)
                            write_json(scores, {p: r.to_dict() for p, r in res.items()}, what="the cell's scores")
                        cells.append(dict(method=method, balanced=bal, split=split, seed=seed, results=res))
                        for p, r in res.items():
                            results.setdefault(_label(method, bal), {}).setdefault(p, []).append(r)
        return write_study_report(out_dir, results, cells, title=title, base=base, methods=methods, splits=splits,
                                  seeds=seeds, balanced=balanced)


# ---------------------------------------------------------------- report
def _by_rank(runs):
    """Per-class accuracy averaged over runs by rank of the training count (rank 0 = most frequent):
    (mean count per rank, mean accuracy per rank)."""
    counts, accs = [], []
    for r in runs:
        order = np.lexsort((np.arange(len(r.class_counts)), -r.class_counts))
        counts.append(r.class_counts[order])
        accs.append(r.per_class[order])
    return np.mean(counts, axis=0), np.nanmean(accs, axis=0)


def relative_to_balanced(cells, probe: str) -> dict:
    """{method label: [(class_counts, per-class accuracy long-tailed minus balanced), ...]} over the
    cells that have a balanced twin (same method, split, seed)."""
    twins = {(c["method"], c["split"], c["seed"]): c for c in cells if c["balanced"]}
    out = {}
    for c in cells:
        twin = twins.get((c["method"], c["split"], c["seed"]))
        if c["balanced"] or twin is None or probe not in c["results"] or probe not in twin["results"]:
            continue
        lt, bal = c["results"][probe], twin["results"][probe]
        out.setdefault(LABELS.get(c["method"], c["method"]), []).append((lt.class_counts, lt.per_class - bal.per_class))
    return out


def _plot_study(path, results, cells, probe):
    from matplotlib.figure import Figure

    from ..eval.metrics import group_classes
    from ..files import atomic_write

    rel = relative_to_balanced(cells, probe)
    fig = Figure(figsize=(10 if rel else 5.2, 3.9))
    axes = fig.subplots(1, 2 if rel else 1, squeeze=False)[0]
    ax = axes[0]
    for label, per in results.items():
        if probe in per:
            x, y = _by_rank(per[probe])
            ax.plot(np.maximum(x, 1), y, marker="o", ms=3, label=f"{label} (n={len(per[probe])})")
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (mean per rank)")
    ax.set_ylabel("test accuracy (%), mean over cells")
    ax.set_title(f"per-class accuracy by training count ({probe})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    group_rows = []
    if rel:
        ax = axes[1]
        for label, pairs in rel.items():
            xs = np.concatenate([np.maximum(c, 1) for c, _ in pairs])
            ds = np.concatenate([d for _, d in pairs])
            ax.scatter(xs, ds, s=10, alpha=0.5, label=label)
            groups = {g: np.nanmean(np.concatenate([d[group_classes(c)[g]] for c, d in pairs]))
                      for g in ("major", "moderate", "minor")}
            group_rows.append((label, groups, len(pairs)))
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("training images of the class")
        ax.set_ylabel("accuracy: long-tailed minus balanced pretraining")
        ax.set_title(f"relative to the balanced run of the same class ({probe})", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), what="the study plot")
    return group_rows


def write_study_report(out_dir, results, cells, *, title, base, methods, splits, seeds, balanced) -> dict:
    from ..eval import write_report

    out_dir = Path(out_dir)
    probes = list(dict.fromkeys(p for per in results.values() for p in per))
    plots, relative = [], {}
    for p in probes:
        path = out_dir / f"study_{p.replace('.', '_')}.png"
        relative[p] = _plot_study(path, results, cells, p)
        plots.append(path)
    notes = [f"{len(cells)} cells: methods {', '.join(methods)} x splits {splits} x seeds {seeds}"
             + (" x {long-tailed, balanced D_b} pretraining" if balanced else "")
             + f"; {base.dataset}, {base.arch} width {base.width}, {base.epochs} epochs, batch {base.batch_size}. "
             "Each split gives the head/tail ranks to another class permutation."]
    for p, rows in relative.items():
        if rows:
            notes += ["", f"Accuracy after long-tailed minus after balanced pretraining, by group ({p}; mean over "
                          "classes and cells; the difficulty of each class cancels):", "",
                      "| method | cells | major | moderate | minor |", "| --- | ---: | ---: | ---: | ---: |"]
            notes += [f"| {label} | {n} | {g['major']:+.2f} | {g['moderate']:+.2f} | {g['minor']:+.2f} |"
                      for label, g, n in rows]
    report = write_report(out_dir / "report.md", results, title=title, plots=plots, notes="\n".join(notes))
    return {"report": report, "plots": plots, "results": results, "relative": relative}
