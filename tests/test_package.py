"""The public surface: every lazily exported name resolves to a real object."""
import importlib

import pytest

import sdclr_fast


@pytest.mark.parametrize("name", sdclr_fast.__all__)
def test_export_resolves(name):
    obj = getattr(sdclr_fast, name)
    assert callable(obj)
    module = importlib.import_module(sdclr_fast._EXPORTS[name])
    assert getattr(module, name) is obj


def test_unknown_attribute_raises():
    with pytest.raises(AttributeError, match="no_such_op"):
        sdclr_fast.no_such_op
