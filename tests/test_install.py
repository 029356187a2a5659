"""Installing sdclr-fast into another environment that already has torch: the documented
`pip install --no-build-isolation .` path, as a wheel built against this environment's torch
and installed into a fresh venv, then used from outside the source tree.

The fresh venv sees torch (and numpy, triton) through a .pth file pointing at this
environment's site-packages: on the development machine `pip install torch==2.13.0` into the
venv took 2.5 minutes of wall time on a loaded machine (34 s of CPU), the .pth a few ms. The
venv is created without --system-site-packages, so nothing else leaks in, and the test checks
that sdclr_fast is imported from the venv's own site-packages.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_USE = r"""
import sys
import torch
import torch.nn.functional as F
import sdclr_fast
from sdclr_fast import magnitude_masks, masked_conv2d, nt_xent
from sdclr_fast.ops.reference import magnitude_masks_reference, nt_xent_reference

assert sdclr_fast.__file__.startswith(sys.argv[1]), sdclr_fast.__file__
g = torch.Generator().manual_seed(0)
ws = [torch.randn(8, 4, 3, 3, generator=g), torch.randn(16, 8, 1, 1, generator=g)]
for ours, ref in zip(magnitude_masks(ws, 0.9), magnitude_masks_reference(ws, 0.9)):
    assert torch.equal(ours, ref)
x, w = torch.randn(2, 4, 6, 6, generator=g), ws[0].reshape(8, 4, 3, 3)
m = torch.rand(w.shape, generator=g) < 0.5
torch.testing.assert_close(masked_conv2d(x, w, m, padding=1), F.conv2d(x, w * m, padding=1))
z1, z2 = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
torch.testing.assert_close(nt_xent(z1, z2, 0.2), nt_xent_reference(z1, z2, 0.2))
print("ok", torch.__version__, sdclr_fast.__file__)
"""


def _copy_source(dst):
    keep = ["setup.py", "pyproject.toml", "README.md", "LICENSE", "csrc", "kernels", "sdclr_fast"]
    patterns = shutil.ignore_patterns("__pycache__", "*.so", "*.o", "*.egg-info")

    def ignore(d, names):  # and links (a clone's sdclr_fast/kernels -> ../kernels, see conftest.py)
        return set(patterns(d, names)) | {n for n in names if os.path.islink(os.path.join(d, n))}

    for name in keep:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=ignore)
        else:
            shutil.copy2(src, dst / name)


@pytest.mark.slow
def test_wheel_installs_into_a_venv_with_torch(tmp_path):
    src, wheels, venv = tmp_path / "src", tmp_path / "wheels", tmp_path / "venv"
    src.mkdir()
    _copy_source(src)
    env = dict(os.environ, MAX_JOBS=str(os.cpu_count() or 2), SDCLR_FAST_NO_CUDA="1")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--quiet",
         "-w", str(wheels), str(src)], capture_output=True, text=True, env=env, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = wheels.glob("sdclr_fast-*.whl")

    # the venv's commands without PYTHONPATH: a tree on it (a clone's tests) would be imported
    # instead of the installed wheel
    venv_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120, env=venv_env)
    site = next((venv / "lib").glob("python3*/site-packages"))
    # torch and the other dependencies from this environment, behind the venv's own packages
    (site / "_base_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    py = venv / "bin" / "python"
    install = subprocess.run(
        [str(py), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "--quiet",
         str(wheel)],
        capture_output=True, text=True, timeout=300, env=venv_env)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    assert (site / "sdclr_fast" / "kernels").is_dir()  # kernels/ lands as sdclr_fast.kernels

    use = subprocess.run([str(py), "-c", _USE, str(site)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300, env=venv_env)  # outside the source tree
    assert use.returncode == 0, use.stdout[-3000:] + use.stderr[-3000:]
    assert use.stdout.startswith("ok")


_MISMATCH = r"""
import importlib.abc
import importlib.util
import sys


class _Broken(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # stands in for an extension built against another torch
    def find_spec(self, name, path, target=None):
        if name == "sdclr_fast._C":
            return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        raise ImportError("_C.so: undefined symbol: _ZN3c1015SmallVectorBase")

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Broken())
try:
    import sdclr_fast.ops.prune  # noqa: F401
except ImportError as exc:
    print(exc)
"""


def test_extension_built_for_another_torch_says_how_to_fix():
    out = subprocess.run([sys.executable, "-c", _MISMATCH], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert "does not load with this torch" in out.stdout, out.stdout + out.stderr
    assert "undefined symbol" in out.stdout
    assert "pip install --no-build-isolation" in out.stdout


def test_build_without_torch_says_to_skip_isolation(tmp_path):
    """What a build-isolated `pip install .` runs: setup.py in an environment without torch."""
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    out = subprocess.run([str(venv / "bin" / "python"), str(ROOT / "setup.py"), "--version"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode != 0
    assert "pip install --no-build-isolation" in out.stderr, out.stderr
