"""Fixtures shared by the test modules, and the one place that decides how Triton runs.

Triton reads TRITON_INTERPRET when a kernel is decorated, that is when a kernel module is first
imported, so the choice is made here, before pytest imports any test module: compiled kernels
where a CUDA device is present (the CUDA tests then run for real), the interpreter on CPU
tensors elsewhere. An explicit TRITON_INTERPRET in the environment wins (e.g. TRITON_INTERPRET=1
runs the interpreter tests on a GPU machine too). The choice is shown in pytest's header.
"""
import getpass
import os
import tempfile

import pytest
import torch
from hypothesis import settings

# Inductor's on-disk cache did not tell CPU kernels compiled under one forced ISA from another:
# after runs on this AVX-512 machine, a run with ATEN_CPU_CAPABILITY=avx2 loaded cached compiled
# steps that crashed or computed wrong values, and passed with an empty cache. One cache per
# forced ISA keeps `ATEN_CPU_CAPABILITY=... make test` meaningful.
_CAP = os.environ.get("ATEN_CPU_CAPABILITY")
if _CAP and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tempfile.gettempdir(),
                                                         f"torchinductor_{getpass.getuser()}_{_CAP}")

# Hypothesis draws the same examples on every run (derandomize), so a green `make test` stays
# green on the next run and CI cannot go red on a draw no one saw; tests that pass their own
# settings keep this. HYPOTHESIS_PROFILE=explore draws new examples each run, to look for more.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

_TRITON_ENV = os.environ.get("TRITON_INTERPRET")
if _TRITON_ENV is None:
    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"


def pytest_configure(config):
    """Refuse to run the tests of one tree against another tree's kernels (``package_tree_mismatch``)."""
    import importlib.util
    from pathlib import Path

    from helpers import package_tree_mismatch

    kernels = importlib.util.find_spec("sdclr_fast.kernels")
    if kernels is not None and kernels.origin:
        problem = package_tree_mismatch(Path(importlib.util.find_spec("sdclr_fast").origin).parent,
                                        Path(kernels.origin).parent)
        if problem:
            raise pytest.UsageError(problem)


def pytest_report_header(config):
    mode = "interpreted on CPU tensors" if os.environ["TRITON_INTERPRET"] == "1" else "compiled for the GPU"
    why = "set in the environment" if _TRITON_ENV is not None else \
        ("a CUDA device is present" if torch.cuda.is_available() else "no CUDA device")
    return [f"Triton kernels: {mode} (TRITON_INTERPRET={os.environ['TRITON_INTERPRET']}, {why})",
            f"hypothesis profile: {settings.get_current_profile_name()} (HYPOTHESIS_PROFILE=explore draws new examples)"]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and tensors run faster with one intra-op thread on a small shared machine,
    and identically from run to run (the resume tests compare weights bit for bit)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
