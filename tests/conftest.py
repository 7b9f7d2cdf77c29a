"""Shared test configuration: Hypothesis profiles, device markers, the ``e2e`` marker and the
``recipe`` fixture (a small run config on the tiny models of ``recipe_cases``)."""

from __future__ import annotations

import os

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
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """``(root, cfg)``: a 4-step run config on the tiny models and corpus of ``recipe_cases`` under
    ``root``, built once per test module; skips without transformers and tokenizers."""
    from recipe_cases import HAS_HF

    if not HAS_HF:
        pytest.skip("needs transformers and tokenizers")
    from recipe_cases import own_cfg

    root = tmp_path_factory.mktemp("recipe")
    return root, own_cfg(root, steps=4, interval=2, log_every=1, checkpoint_every=2)
