"""Build script: the pure-Python packages, plus the optional compiled extension ddk_kernels._C.

The extension is built from csrc/ when torch (and a working C++ compiler) is importable at build
time: the CPU sources csrc/*.cpp always, and csrc/cuda/*.cpp + csrc/cuda/*.cu (compiled with
``-DDDK_WITH_CUDA``) only where torch has CUDA and nvcc is found. Install with
``pip install --no-build-isolation -e .`` after torch so the build sees the installed torch.

The extension is optional: if torch is missing, no compiler works, or the build fails, a clear
message is printed and the install goes on with the pure-Python packages (``import ddk`` works;
the ``cpp`` backend then reports itself unavailable). ``DDK_NO_EXTENSION=1`` skips the build;
``DDK_REQUIRE_EXTENSION=1`` makes a failed build an error (CI).

CPU flags: ``-O3 -ffp-contract=fast -fno-trapping-math -fno-math-errno`` (``-fno-trapping-math``
lets GCC if-convert the selects of the branch-free exp/log in csrc/kd_vec_math.h, without it the
vocabulary loops stay scalar; results are unchanged, no -ffast-math), ``-fopenmp`` when available
(``#pragma omp simd`` reductions), plus ``-march=native`` when the compiler accepts it. The
extension is built on the machine that runs it (editable install, no wheels are shipped), so
``-march=native`` lets the vocabulary loops use AVX2/FMA (or AVX-512 / NEON) where the CPU has
them and stays safe on older CPUs. Set ``DDK_CPU_ARCH`` to override it, e.g.
``DDK_CPU_ARCH="-mavx2 -mfma"`` or ``DDK_CPU_ARCH=""`` for a portable build (building a wheel for
other machines).
"""

from __future__ import annotations

import glob
import os
import shlex
import subprocess
import sys
import tempfile

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg: str) -> None:
    print(f"ddk setup: {msg}", file=sys.stderr, flush=True)


def _compiler_accepts(flags: list[str]) -> bool:
    """True if the C++ compiler compiles a trivial OpenMP-simd file with ``flags``."""
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("int main(){float s=0;\n#pragma omp simd reduction(+:s)\nfor(int i=0;i<8;++i)s+=i;return (int)s-28;}\n")
        try:
            res = subprocess.run(
                [cxx, *flags, src, "-o", os.path.join(tmp, "probe")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
            )
        except (OSError, subprocess.SubprocessError):
            return False
        return res.returncode == 0


def _cpu_flags() -> list[str] | None:
    """Compiler flags of the CPU sources, or None when no working C++ compiler is found."""
    base = ["-O3", "-std=c++17", "-ffp-contract=fast", "-fno-trapping-math", "-fno-math-errno"]
    if not _compiler_accepts(base):
        return None
    omp = ["-fopenmp"] if _compiler_accepts(base + ["-fopenmp"]) else []
    if "DDK_CPU_ARCH" in os.environ:
        arch = shlex.split(os.environ["DDK_CPU_ARCH"])
    else:
        arch = ["-march=native"] if _compiler_accepts(base + ["-march=native"]) else []
    _say(f"CPU flags {' '.join(base + omp + arch)}")
    return base + omp + arch


def _extensions():  # type: ignore[no-untyped-def]
    if os.environ.get("DDK_NO_EXTENSION") == "1":
        _say("DDK_NO_EXTENSION=1, skipping ddk_kernels._C")
        return [], {}
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp_sources:
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # noqa: BLE001 - any failure means "no extension"
        _say(f"torch not importable ({exc}); skipping ddk_kernels._C (the cpp backend will be unavailable)")
        return [], {}
    cxx_flags = _cpu_flags()
    if cxx_flags is None:
        _say("no working C++ compiler (set CXX); skipping ddk_kernels._C (the cpp backend will be unavailable)")
        return [], {}
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")) + glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    with_cuda = bool(cuda_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    link = ["-fopenmp"] if "-fopenmp" in cxx_flags else []
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "ddk_kernels._C", cpp_sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=link, define_macros=[("DDK_WITH_CUDA", "1")],
        )
    else:
        if cuda_sources:
            _say("torch has no CUDA or CUDA_HOME is unset; building the CPU kernels only")
        ext = cpp_extension.CppExtension(
            "ddk_kernels._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link,
        )

    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class OptionalBuildExtension(base):  # type: ignore[misc, valid-type]
        """BuildExtension that reports a failed build and goes on without ddk_kernels._C."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - compiler errors come as several types
                self._give_up(exc)

        def build_extension(self, ext) -> None:  # type: ignore[no-untyped-def]
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001
                self._give_up(exc)

        _failed = False

        def _give_up(self, exc: BaseException) -> None:
            if os.environ.get("DDK_REQUIRE_EXTENSION") == "1":
                raise exc
            if OptionalBuildExtension._failed:  # the copy step after a failed compile fails too
                return
            OptionalBuildExtension._failed = True
            bar = "=" * 78
            print(
                f"\n{bar}\nddk setup: building the optional extension ddk_kernels._C FAILED:\n  {exc}\n"
                "Installing the pure-Python packages without it: the 'cpp' backend will be unavailable\n"
                "and backend='auto' uses 'chunked' on CPU. Fix the compiler/toolchain and reinstall\n"
                "(DDK_REQUIRE_EXTENSION=1 makes this an error).\n" + bar,
                file=sys.stderr, flush=True,
            )

    return [ext], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
