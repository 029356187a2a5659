"""Every bench script takes the shared arguments (`sdclr-fast bench --quick --device ...` passes
them to each one)."""
import os
import subprocess
import sys

import pytest

from sdclr_fast.cli import bench_scripts

SHARED = ("--device", "--quick", "--threads", "--out")


@pytest.mark.parametrize("script", bench_scripts(), ids=lambda p: p.name)
def test_bench_script_takes_shared_arguments(script):
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in SHARED:
        assert flag in out.stdout, f"{script.name} lacks {flag}"
    bad = subprocess.run([sys.executable, str(script), "--threads", "x"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "--threads" in bad.stderr


def test_bench_parser_applies_threads():
    sys.path.insert(0, str(bench_scripts()[0].parent.parent))
    import torch

    from bench._common import bench_parser, parse_bench_args

    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    try:
        args = parse_bench_args(bench_parser("doc", "q", "x.json"),
                                ["--quick", "--device", "cpu", "--threads", "1", "--out", "o.json"])
        assert (args.quick, args.device, args.threads, args.out) == (True, "cpu", 1, "o.json")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
        if env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env
