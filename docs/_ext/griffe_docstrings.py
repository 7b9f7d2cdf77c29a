"""Griffe extension of the documentation build: reads the project's docstrings as written.

The docstrings are Google style with two habits Griffe's Google parser reads differently:

* a singular ``Example:`` header, which Griffe takes for an admonition, so the ``>>>`` lines
  would render as nested quotes; it is read as the ``Examples:`` section (doctests rendered as
  Python console code);
* reST roles (``:class:`X```, ``:func:`X```, ``:mod:`X```, ``:meth:`X```), which Markdown
  would print verbatim; they are read as inline code.

The docstrings themselves are not changed.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_HEADER = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:class|func|mod|meth|attr|data|obj|exc):`~?([^`]+)`")


def normalise(text: str) -> str:
    """``text`` with ``Example:`` headers read as ``Examples:`` and reST roles as inline code."""
    return _ROLE.sub(r"`\1`", _EXAMPLE_HEADER.sub(r"\1Examples:", text))


class DocstringHabits(griffe.Extension):
    """Applies :func:`normalise` to every docstring Griffe loads."""

    def on_instance(self, *, node: Any, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = normalise(obj.docstring.value)
