"""Build script: the pure-Python packages, plus the optional compiled extension ddk_kernels._C.

The extension is built from csrc/ when torch (and a C++ compiler) is importable at build time:
the CPU (OpenMP) sources always, the CUDA sources only where torch has CUDA. Install with
``pip install --no-build-isolation -e .`` after torch so the build sees the installed torch. If
the extension cannot be built, the install goes on without it and ``import ddk`` still works (the
``cpp`` backend then reports itself unavailable).
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():  # type: ignore[no-untyped-def]
    if os.environ.get("DDK_NO_EXTENSION") == "1":
        print("ddk setup: DDK_NO_EXTENSION=1, skipping ddk_kernels._C", file=sys.stderr)
        return [], {}
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp_sources:
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # noqa: BLE001 - any failure means "no extension"
        print(f"ddk setup: torch not importable ({exc}); skipping ddk_kernels._C", file=sys.stderr)
        return [], {}
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    with_cuda = bool(cu_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    cxx_flags = ["-O3", "-fopenmp", "-march=native" if os.environ.get("DDK_NATIVE", "0") == "1" else "-mavx2", "-mfma", "-std=c++17"]
    extra = {"cxx": cxx_flags}
    if with_cuda:
        extra["nvcc"] = ["-O3", "--use_fast_math", "-std=c++17"]
        ext = cpp_extension.CUDAExtension(
            "ddk_kernels._C", cpp_sources + cu_sources, extra_compile_args=extra,
            extra_link_args=["-fopenmp"], define_macros=[("DDK_WITH_CUDA", "1")],
        )
    else:
        ext = cpp_extension.CppExtension(
            "ddk_kernels._C", cpp_sources, extra_compile_args=extra, extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
