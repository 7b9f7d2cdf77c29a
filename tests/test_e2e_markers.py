"""The ``e2e`` list of tests/conftest.py names tests that exist: a renamed or moved test would
otherwise lose its marker silently and slow down ``pytest -m "not e2e"``."""

from __future__ import annotations

import pytest
from conftest import E2E_TESTS, ROOT


@pytest.mark.parametrize("entry", E2E_TESTS)
def test_every_listed_e2e_test_exists(entry: str) -> None:
    file, _, name = entry.partition("::")
    path = ROOT / file
    assert path.is_file(), f"tests/conftest.py E2E_TESTS: {file} does not exist (moved? update the list)"
    if name:
        assert f"def {name}(" in path.read_text(), f"tests/conftest.py E2E_TESTS: {file} has no test {name}"
