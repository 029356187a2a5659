"""The session's ``sdclr_fast`` and ``sdclr_fast.kernels`` come from one source tree: conftest.py
refuses to run a clone's tests against another tree's kernels (a clone on PYTHONPATH in front of
an editable install used to mix the two and fail dozens of Triton tests for no fault of either)."""
import importlib.util
from pathlib import Path

import sdclr_fast

from helpers import package_tree_mismatch


def test_the_repository_and_wheel_layouts_are_one_tree(tmp_path):
    package = tmp_path / "repo" / "sdclr_fast"
    assert package_tree_mismatch(package, tmp_path / "repo" / "kernels") is None  # the repository
    assert package_tree_mismatch(package, package / "kernels") is None             # an installed wheel


def test_a_clone_in_front_of_another_install_is_two_trees(tmp_path):
    msg = package_tree_mismatch(tmp_path / "clone" / "sdclr_fast", tmp_path / "main" / "kernels")
    assert msg is not None and "two source trees" in msg
    assert str(tmp_path / "main" / "kernels") in msg and "ln -s ../kernels" in msg


def test_this_session_is_one_tree():
    kernels = importlib.util.find_spec("sdclr_fast.kernels")
    assert package_tree_mismatch(Path(sdclr_fast.__file__).parent, Path(kernels.origin).parent) is None
