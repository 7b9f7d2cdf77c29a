"""The library stays apart from the application: ``import ddk`` loads components, losses and
integrations only; nothing outside ``ddk/recipes`` imports ``ddk.recipes``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_import_ddk_loads_no_application_module_and_no_optional_dependency() -> None:
    code = (
        "import sys, ddk; print(sorted(m for m in sys.modules if m.startswith('ddk.recipes') or "
        "m.split('.')[0] in ('transformers', 'datasets', 'triton', 'matplotlib', 'yaml')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_library_module_imports_the_application() -> None:
    offenders = []
    for package in ("ddk", "ddk_kernels"):
        for path in (ROOT / package).rglob("*.py"):
            if "recipes" in path.relative_to(ROOT).parts:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                )
                offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.startswith("ddk.recipes")]
    assert offenders == []


def test_core_components_do_not_import_the_integrations() -> None:
    offenders = []
    for path in (ROOT / "ddk").rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[1] in ("integrations", "recipes"):
            continue
        text = path.read_text()
        if "ddk.integrations" in text.replace("``ddk.integrations", "").replace(":mod:`ddk.integrations", ""):
            offenders.append(str(rel))
    assert offenders == []
