"""Shared test configuration: Hypothesis profiles, device markers and the ``e2e`` marker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# "fast" keeps `make test` quick; "ci" (HYPOTHESIS_PROFILE=ci, used by `make test-all`) digs deeper.
settings.register_profile(
    "fast",
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "ci",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))

# One thread: the test shapes are small, and OpenMP fan-out only costs time on a shared machine.
torch.set_num_threads(1)

# Without CUDA, Triton kernels run under its interpreter. The variable must be set before any
# module decorates a kernel with @triton.jit, so it is set here, before test modules are imported,
# rather than in each test module (import order would then decide which kernels are interpreted).
# Dispatch never auto-picks triton on CPU; tests ask for it explicitly.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# End-to-end tests (child processes, torchrun / gloo ranks, SIGKILL / SIGTERM and resume) in the
# files that carry no marker of their own: "file" marks the whole module, "file::test" one test
# (all its parametrizations). The other test files mark theirs with @pytest.mark.e2e or pytestmark.
E2E_TESTS = (
    "tests/ddk/integrations/test_transformers.py::test_ddktrainer_data_parallel_equals_one_process_on_uneven_tokens",
    "tests/ddk/recipes/test_distributed_distill.py",
    "tests/ddk/recipes/test_kill_resume.py",
    "tests/ddk/recipes/test_pipeline.py::test_demo_teacher_pretraining_preempted_then_resumed_is_bit_identical",
    "tests/ddk/recipes/test_teacher_cache_run.py::test_a_sigkilled_teacher_cache_build_resumes_to_the_same_cache",
    "tests/ddk/recipes/test_trust.py::test_second_writer_on_a_run_folder_is_refused_naming_the_holder",
    "tests/ddk/recipes/test_trust.py::test_sigterm_finishes_the_step_writes_a_checkpoint_and_resumes_bit_identically",
    "tests/ddk/recipes/test_trust.py::test_cli_distill_exits_75_on_sigterm_with_its_checkpoint",
)
ROOT = Path(__file__).resolve().parent.parent


@pytest.hookimpl(tryfirst=True)  # before -m deselects, so that -m "not e2e" sees the marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    e2e = pytest.mark.e2e
    for item in items:
        try:
            file = item.path.resolve().relative_to(ROOT).as_posix()
        except ValueError:
            continue
        if file in E2E_TESTS or f"{file}::{getattr(item, 'originalname', item.name)}" in E2E_TESTS:
            item.add_marker(e2e)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
