"""Users can say what they run: ``sdclr_fast.__version__``, ``sdclr-fast --version``, one source."""
import pathlib
import re
import subprocess
import sys

import pytest

import sdclr_fast
from sdclr_fast.cli import main

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_version_is_pep440():
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?", sdclr_fast.__version__)


def test_cli_prints_the_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"sdclr-fast {sdclr_fast.__version__}"


def test_python_m_prints_the_version():
    out = subprocess.run([sys.executable, "-m", "sdclr_fast", "--version"], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert out.strip() == f"sdclr-fast {sdclr_fast.__version__}"


def test_version_has_one_source_and_a_changelog_entry():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"], "pyproject.toml must read the version, not repeat it"
    assert "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "sdclr_fast.__version__"}
    changelog = (ROOT / "CHANGELOG.md").read_text()
    release = re.sub(r"\.dev\d+$", "", sdclr_fast.__version__)
    if release != sdclr_fast.__version__:  # unreleased work after the last release
        assert "## [Unreleased]" in changelog
    else:
        assert f"## [{release}]" in changelog
