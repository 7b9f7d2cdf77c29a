"""Tests of ddk/schedule/doremi.py: DoReMi's exponentiated-gradient step behind the controller."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ddk.schedule import DoReMiScheduler, FactorSmoother, WeightScheduler


def _oracle(prev: np.ndarray, gap: np.ndarray, eta: float, c: float) -> np.ndarray:
    """DoReMi's step written out in float64 NumPy: multiply, normalise, mix in uniform."""
    a = prev * np.exp(eta * np.maximum(gap, 0.0))
    a = a / a.sum()
    return (1.0 - c) * a + c / len(prev)


gaps = st.lists(st.floats(-3.0, 6.0, allow_nan=False), min_size=1, max_size=9)


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(gaps, min_size=1, max_size=6),
    eta=st.floats(0.05, 4.0),
    c=st.sampled_from([0.0, 1e-3, 0.1, 1.0]),
)
def test_doremi_matches_the_float64_oracle(steps: list[list[float]], eta: float, c: float) -> None:
    d = len(steps[0])
    s = DoReMiScheduler(d, step_size=eta, smoothing=c)
    w = s.initialize([1.0] * d).numpy()
    assert np.allclose(w, 1.0 / d, rtol=0, atol=1e-15)
    for g in steps:
        g = (g * d)[:d]
        want = _oracle(w, np.array(g), eta, c)
        w = s.update(np.exp(np.array(g))).numpy()
        np.testing.assert_allclose(w, want, rtol=1e-12, atol=1e-300)
        assert abs(w.sum() - 1.0) < 1e-12
        assert (w >= c / d * (1 - 1e-12)).all()


def test_doremi_gives_no_push_to_a_matched_domain() -> None:
    s = DoReMiScheduler(3, smoothing=0.0)
    s.initialize([1.0, 1.0, 1.0])
    w = s.update([math.exp(0.5), math.exp(-0.4), 1.0]).tolist()  # gaps 0.5, -0.4 (clipped to 0), 0
    assert w[1] == pytest.approx(w[2], rel=1e-15)
    assert w[0] / w[2] == pytest.approx(math.exp(0.5), rel=1e-12)


def test_doremi_history_state_and_resume_are_exact() -> None:
    a, b = DoReMiScheduler(4, step_size=0.7), DoReMiScheduler(4, step_size=0.7)
    a.initialize([2.0, 1.0, 3.0, 1.5])
    a.update([2.0, 1.0, 3.0, 1.5])
    state = a.state_dict()
    assert state["step_size"] == 0.7 and state["smoothing"] == 1e-3 and len(state["history"]) == 2
    b.load_state_dict(state)
    assert torch.equal(a.update([1.2, 4.0, 1.0, 1.0]), b.update([1.2, 4.0, 1.0, 1.0]))
    assert a.history == b.history


def test_doremi_is_a_weight_scheduler_with_its_own_errors() -> None:
    assert isinstance(DoReMiScheduler(2), WeightScheduler) and isinstance(FactorSmoother(2), WeightScheduler)
    with pytest.raises(ValueError, match=r"DoReMiScheduler: step_size must be a number in \(0, inf\)"):
        DoReMiScheduler(2, step_size=0.0)
    with pytest.raises(ValueError, match=r"DoReMiScheduler: smoothing must be a number in \[0, 1\]"):
        DoReMiScheduler(2, smoothing=1.5)
    with pytest.raises(ValueError, match=r"DoReMiScheduler: num_domains must be an int >= 1"):
        DoReMiScheduler(0)
    s = DoReMiScheduler(2)
    with pytest.raises(RuntimeError, match=r"DoReMiScheduler.update: the scheduler must be initialised first"):
        s.update([1.0, 1.0])
    s.initialize([1.0, 1.0])
    with pytest.raises(ValueError, match=r"DoReMiScheduler.update: ratio must be > 0"):
        s.update([1.0, 0.0])
    with pytest.raises(ValueError, match=r"DoReMiScheduler.load_state_dict: state\['num_domains'\] must equal"):
        s.load_state_dict(DoReMiScheduler(3).state_dict())
