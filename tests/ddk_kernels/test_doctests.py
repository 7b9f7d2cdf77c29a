"""The docstring examples of every ``ddk_kernels`` module run as doctests (on CPU)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import ddk_kernels

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(ddk_kernels.__path__, "ddk_kernels.") if not m.name.endswith("._C")
)


@pytest.mark.parametrize("name", MODULES)
def test_ddk_kernels_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"


def test_ddk_kernels_has_docstring_examples() -> None:
    """The core modules each show their use (so the examples cannot silently disappear)."""
    for name in ("types", "reduce", "reference", "dispatch", "chunked", "fused_plan", "fused_chunked"):
        module = importlib.import_module(f"ddk_kernels.{name}")
        assert doctest.DocTestFinder().find(module) and any(t.examples for t in doctest.DocTestFinder().find(module)), (
            name
        )
