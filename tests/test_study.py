"""`sdclr-fast study`: the grid of cells, resuming a killed study, the report with the balanced
baseline, on tiny synthetic data."""
import json

import numpy as np
import pytest
import torch

from helpers import STUDY_BASE as BASE, tiny_study_data as tiny_data
from sdclr_fast.eval import EvalResult
from sdclr_fast.train.study import cell_dir, relative_to_balanced, run_study

pytestmark = pytest.mark.usefixtures("one_thread")


def test_study_grid_report_and_resume(tmp_path, monkeypatch):
    import sdclr_fast.train.pretrain as loop

    kw = dict(methods=("simclr", "sdclr"), splits=(0, 1), seeds=(0,), balanced=True, probes=("knn",), knn_k=3,
              data=tiny_data)
    calls = []
    real = loop.pretrain

    def spy(cfg, **k):
        calls.append((cfg.method, cfg.split, cfg.pretrain_set))
        if len(calls) == 3:
            raise KeyboardInterrupt  # the study is killed inside its third cell
        return real(cfg, **k)

    monkeypatch.setattr(loop, "pretrain", spy)
    with pytest.raises(KeyboardInterrupt):
        run_study(BASE, tmp_path, **kw)
    assert (cell_dir(tmp_path, "simclr", 0, 0, True) / "eval.json").exists()
    monkeypatch.setattr(loop, "pretrain", real)
    first = json.loads((cell_dir(tmp_path, "simclr", 0, 0, False) / "eval.json").read_text())
    out = run_study(BASE, tmp_path, **kw)
    # finished cells are not evaluated again
    assert json.loads((cell_dir(tmp_path, "simclr", 0, 0, False) / "eval.json").read_text()) == first
    assert set(out["results"]) == {"SimCLR", "SimCLR (balanced D_b)", "SDCLR", "SDCLR (balanced D_b)"}
    assert all(len(v["knn"]) == 2 for v in out["results"].values())  # two splits each
    text = out["report"].read_text()
    assert "| SDCLR | knn | 2 |" in text and "long-tailed minus after balanced" in text
    assert all(p.exists() for p in out["plots"])
    # each split gives the ranks to another permutation; the balanced runs pretrain on D_b
    c0 = torch.load(cell_dir(tmp_path, "sdclr", 0, 0, False) / "checkpoint.pt", weights_only=True)
    assert c0["config"]["split"] == 0 and c0["config"]["pretrain_set"] == "long_tail"
    cb = torch.load(cell_dir(tmp_path, "sdclr", 1, 0, True) / "checkpoint.pt", weights_only=True)
    assert cb["config"]["pretrain_set"] == "balanced" and cb["config"]["split"] == 1


def test_relative_to_balanced_pairs_the_same_method_split_and_seed():
    def res(per_class):
        per_class = np.asarray(per_class, dtype=float)
        return EvalResult(overall=0, mean_class=0, major=0, moderate=0, minor=0, std=0, per_class=per_class,
                          class_counts=np.array([30, 10, 3]))

    cells = [dict(method="sdclr", balanced=False, split=0, seed=0, results={"knn": res([90, 70, 40])}),
             dict(method="sdclr", balanced=True, split=0, seed=0, results={"knn": res([85, 75, 60])}),
             dict(method="sdclr", balanced=False, split=1, seed=0, results={"knn": res([10, 10, 10])})]  # no twin
    rel = relative_to_balanced(cells, "knn")
    assert list(rel) == ["SDCLR"] and len(rel["SDCLR"]) == 1
    np.testing.assert_array_equal(rel["SDCLR"][0][1], [5, -5, -20])
