"""The docstring examples of every library module of ``ddk`` run as doctests (on CPU); the
application (``ddk.recipes``) is left out, its examples are command lines."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import ddk

MODULES = sorted(m.name for m in pkgutil.walk_packages(ddk.__path__, "ddk.") if not m.name.startswith("ddk.recipes"))


@pytest.mark.parametrize("name", MODULES)
def test_ddk_docstring_examples_run(name: str) -> None:
    if name == "ddk.integrations.transformers":
        pytest.importorskip("transformers")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"


def test_ddk_core_modules_have_docstring_examples() -> None:
    """The components each show their use (so the examples cannot silently disappear)."""
    core = (
        "ddk.losses.kd",
        "ddk.losses.fused",
        "ddk.losses.causal_lm",
        "ddk.sampling.mixture",
        "ddk.data.packing",
        "ddk.data.packed",
    )
    for name in core:
        found = doctest.DocTestFinder().find(importlib.import_module(name))
        assert any(t.examples for t in found), name
