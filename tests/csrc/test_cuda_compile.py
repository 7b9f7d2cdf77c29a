"""Compile-only checks of the CUDA sources: csrc/cuda/*.cu with nvcc for sm_90, and the CUDA
binding (csrc/cuda/binding_cuda.cpp with the checks header csrc/kd_checks.h) with the host compiler.

Nothing here runs CUDA code: it catches syntax, template and type errors in the kernels and the
binding on machines without a GPU. Skipped with a reason when nvcc (or the CUDA headers) are missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.is_file() else None


def test_cuda_sources_exist():
    assert CUDA_SOURCES, "csrc/cuda/*.cu: no CUDA sources found"


@pytest.mark.e2e
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[p.name for p in CUDA_SOURCES])
def test_cuda_source_compiles_for_sm90(source: Path, tmp_path: Path) -> None:
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (install the CUDA toolkit or set CUDA_HOME)")
    out = tmp_path / (source.stem + ".o")
    cmd = [nvcc, "-arch=sm_90", "-std=c++17", "-c", str(source), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    assert out.is_file() and out.stat().st_size > 0


@pytest.mark.e2e
@pytest.mark.slow  # 10 s of nvcc: make test-all (the kernel sources compile in make test)
def test_cuda_binding_compiles_against_the_shared_checks_header(tmp_path: Path) -> None:
    """csrc/cuda/binding_cuda.cpp (host code: torch and the CUDA runtime headers) with
    csrc/kd_checks.h, syntax-checked by the host compiler with DDK_WITH_CUDA set. A CPU build of
    torch ships the c10/cuda headers but not the generated ``cuda_cmake_macros.h``, so a stub of
    it is put on the include path when it is missing."""
    from torch.utils import cpp_extension

    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    cuda_home = cpp_extension.CUDA_HOME or os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    if cxx is None or not (Path(cuda_home) / "include" / "cuda_runtime.h").is_file():
        pytest.skip("needs a C++ compiler and the CUDA runtime headers")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    if not any(
        (Path(p) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file() for p in cpp_extension.include_paths()
    ):
        stub = tmp_path / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
        includes.insert(0, f"-I{tmp_path}")
    cmd = [
        cxx,
        "-std=c++17",
        "-fsyntax-only",
        "-w",
        "-DDDK_WITH_CUDA",
        *includes,
        f"-I{Path(cuda_home) / 'include'}",
        str(ROOT / "csrc" / "cuda" / "binding_cuda.cpp"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}"
