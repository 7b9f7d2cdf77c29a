"""Tests of ddk/schedule/smoother.py: Eq. 1, Eq. 2, the ablation modes and their properties."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ddk.discrepancy import DomainDiscrepancy
from ddk.sampling import MixtureSampler
from ddk.schedule import FactorSmoother

ratios = st.integers(1, 8).flatmap(lambda d: st.lists(st.floats(0.01, 60.0, allow_nan=False), min_size=d, max_size=d))
alphas = st.floats(0.01, 1.0)


def _closed_form_eq2(r_t: list[float], ratio: list[float], alpha: float) -> list[float]:
    psi = [a * math.exp(b) for a, b in zip(r_t, ratio)]
    s = sum(psi)
    return [alpha * p / s + (1 - alpha) / len(r_t) for p in psi]


def test_smoother_initialize_is_softmax_of_ratio() -> None:
    s = FactorSmoother(3)
    w = s.initialize([1.0, 2.0, 3.0])
    assert w.dtype == torch.float64 and w.shape == (3,)
    e = [math.exp(x) for x in (1.0, 2.0, 3.0)]
    torch.testing.assert_close(w, torch.tensor([x / sum(e) for x in e], dtype=torch.float64))


def test_smoother_update_matches_eq2_hand_example() -> None:
    # r_0 = softmax([1, 1]) = [0.5, 0.5]; psi = [0.5 e, 0.5 e^2]; psi/sum = [1/(1+e), e/(1+e)].
    s = FactorSmoother(2, alpha=0.5)
    s.initialize([1.0, 1.0])
    w = s.update([1.0, 2.0])
    p1 = 1.0 / (1.0 + math.e)
    expected = [0.5 * p1 + 0.25, 0.5 * (1 - p1) + 0.25]
    torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)
    # a second update carries the history r_1.
    w2 = s.update([1.5, 1.2])
    torch.testing.assert_close(
        w2, torch.tensor(_closed_form_eq2(expected, [1.5, 1.2], 0.5), dtype=torch.float64), rtol=0, atol=1e-15
    )


def test_smoother_update_huge_ratios_do_not_overflow() -> None:
    s = FactorSmoother(3, alpha=0.5)
    s.initialize([1.0, 1.0, 1.0])
    w = s.update([1e6, 1e6 + 1, 5.0])
    assert torch.isfinite(w).all()
    assert abs(float(w.sum()) - 1.0) < 1e-12
    assert float(w[2]) == pytest.approx(0.5 / 3)
    # a weight driven to exactly 0 by Eq. 1 stays at the floor, never NaN.
    s2 = FactorSmoother(2, alpha=0.5)
    w0 = s2.initialize([1.0, 1e4])
    assert float(w0[0]) == 0.0
    w1 = s2.update([1e4, 1.0])
    assert torch.isfinite(w1).all() and float(w1[0]) == pytest.approx(0.25)


@given(ratios, ratios, alphas)
def test_smoother_update_weights_on_simplex_and_in_bounds(r0: list[float], r1: list[float], alpha: float) -> None:
    d = len(r0)
    r1 = (r1 * d)[:d]
    s = FactorSmoother(d, alpha=alpha)
    w0 = s.initialize(r0)
    assert abs(float(w0.sum()) - 1.0) < 1e-12 and bool((w0 >= 0).all())
    w = s.update(r1)
    assert abs(float(w.sum()) - 1.0) < 1e-12
    lo, hi = (1 - alpha) / d, alpha + (1 - alpha) / d
    assert bool((w >= lo - 1e-12).all()) and bool((w <= hi + 1e-12).all())


@given(ratios, st.randoms(use_true_random=False), alphas)
def test_smoother_permutation_equivariant(r: list[float], rnd, alpha: float) -> None:
    d = len(r)
    perm = list(range(d))
    rnd.shuffle(perm)
    a, b = FactorSmoother(d, alpha=alpha), FactorSmoother(d, alpha=alpha)
    wa0 = a.initialize(r)
    wb0 = b.initialize([r[p] for p in perm])
    torch.testing.assert_close(wb0, wa0[perm], rtol=1e-12, atol=1e-15)
    r2 = list(reversed(r))
    wa = a.update(r2)
    wb = b.update([r2[p] for p in perm])
    torch.testing.assert_close(wb, wa[perm], rtol=1e-12, atol=1e-15)


@given(ratios, st.integers(0, 7), st.floats(0.0, 20.0), alphas)
def test_smoother_update_monotone_in_own_ratio(r: list[float], i: int, bump: float, alpha: float) -> None:
    d = len(r)
    i %= d
    a, b = FactorSmoother(d, alpha=alpha), FactorSmoother(d, alpha=alpha)
    a.initialize(r)
    b.initialize(r)
    r2 = list(r)
    r2[i] += bump
    assert float(b.update(r2)[i]) >= float(a.update(r)[i]) - 1e-12
    # Eq. 1 too.
    c, e = FactorSmoother(d), FactorSmoother(d)
    assert float(e.initialize(r2)[i]) >= float(c.initialize(r)[i]) - 1e-12


@given(st.integers(1, 10), st.floats(0.01, 50.0), alphas, st.integers(1, 4))
def test_smoother_equal_ratios_keep_uniform(d: int, value: float, alpha: float, n_updates: int) -> None:
    s = FactorSmoother(d, alpha=alpha)
    uniform = torch.full((d,), 1.0 / d, dtype=torch.float64)
    torch.testing.assert_close(s.initialize([value] * d), uniform, rtol=0, atol=1e-14)
    for _ in range(n_updates):
        torch.testing.assert_close(s.update([value] * d), uniform, rtol=0, atol=1e-14)


@given(ratios, ratios)
def test_smoother_no_smoothing_is_softmax(r0: list[float], r1: list[float]) -> None:
    d = len(r0)
    r1 = (r1 * d)[:d]
    s = FactorSmoother(d, mode="no_smoothing")
    s.initialize(r0)
    w = s.update(r1)
    torch.testing.assert_close(w, torch.softmax(torch.tensor(r1, dtype=torch.float64), 0), rtol=1e-12, atol=1e-15)


def test_smoother_uniform_mode_and_uniform_init() -> None:
    s = FactorSmoother(4, mode="uniform")
    assert s.initialize([1, 2, 3, 4]).tolist() == [0.25] * 4
    assert s.update([9, 1, 1, 1]).tolist() == [0.25] * 4
    s = FactorSmoother(4, init="uniform")
    assert s.initialize([1, 2, 3, 4]).tolist() == [0.25] * 4
    w = s.update([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(w, torch.tensor(_closed_form_eq2([0.25] * 4, [1, 2, 3, 4], 0.5), dtype=torch.float64))


def test_smoother_alpha_one_has_no_floor() -> None:
    s = FactorSmoother(2, alpha=1.0)
    s.initialize([1.0, 1.0])
    w = s.update([1.0, 40.0])
    assert float(w[0]) < 1e-15


def test_smoother_accepts_ndarray_tensor_and_discrepancy() -> None:
    s = FactorSmoother(2)
    a = s.initialize(np.array([1.0, 2.0]))
    b = FactorSmoother(2).initialize(torch.tensor([1.0, 2.0]))
    disc = DomainDiscrepancy([2.0, 2.0 + math.log(2.0)], [1.0, 1.0], [5, 5], ("x", "y"))
    c = FactorSmoother(2).initialize(disc)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(c, torch.softmax(torch.tensor([math.e, 2 * math.e], dtype=torch.float64), 0))


def test_smoother_weights_copy_and_history() -> None:
    s = FactorSmoother(2)
    s.initialize([1.0, 2.0])
    w = s.weights
    w[0] = 99.0
    assert float(s.weights[0]) != 99.0
    s.update([2.0, 1.0])
    h = s.history
    assert [x["kind"] for x in h] == ["init", "update"]
    assert h[1]["ratio"] == [2.0, 1.0] and h[1]["weights"] == s.weights.tolist()


def test_smoother_state_dict_roundtrip_json() -> None:
    s = FactorSmoother(3, alpha=0.3)
    s.initialize([1.0, 2.0, 3.0])
    s.update([3.0, 2.0, 1.0])
    state = json.loads(json.dumps(s.state_dict()))
    t = FactorSmoother(3, alpha=0.3)
    t.load_state_dict(state)
    torch.testing.assert_close(t.weights, s.weights, rtol=0, atol=0)
    assert t.history == s.history
    torch.testing.assert_close(t.update([1.0, 1.5, 2.0]), s.update([1.0, 1.5, 2.0]), rtol=0, atol=0)


def test_smoother_load_state_dict_wrong_domains_raises() -> None:
    state = FactorSmoother(3).state_dict()
    with pytest.raises(
        ValueError, match=r"FactorSmoother.load_state_dict: state\['num_domains'\] must equal .*num_domains=2; got 3\."
    ):
        FactorSmoother(2).load_state_dict(state)


def test_smoother_update_before_initialize_raises() -> None:
    with pytest.raises(
        RuntimeError,
        match=r"FactorSmoother.update: the scheduler must be initialised first; call initialize\(ratio\)",
    ):
        FactorSmoother(2).update([1.0, 1.0])
    with pytest.raises(RuntimeError, match=r"FactorSmoother.weights: .*call FactorSmoother.initialize\(ratio\)"):
        FactorSmoother(2).weights  # noqa: B018


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5, float("nan"), "0.5"])
def test_smoother_bad_alpha_raises(alpha) -> None:
    with pytest.raises(ValueError, match=r"FactorSmoother: alpha must be in \(0, 1\] \(paper default 0.5\); got "):
        FactorSmoother(2, alpha=alpha)


def test_smoother_bad_options_raise() -> None:
    with pytest.raises(ValueError, match=r"FactorSmoother: num_domains must be an int >= 1; got 0\."):
        FactorSmoother(0)
    with pytest.raises(
        ValueError, match=r"FactorSmoother: mode must be one of \('ddk', 'no_smoothing', 'uniform'\); got 'soft'\."
    ):
        FactorSmoother(2, mode="soft")
    with pytest.raises(
        ValueError, match=r"FactorSmoother: init must be one of \('discrepancy', 'uniform', 'floored'\); got 'random'\."
    ):
        FactorSmoother(2, init="random")


@pytest.mark.parametrize(
    ("ratio", "exc", "match"),
    [
        (
            [1.0, 2.0, 3.0],
            ValueError,
            r"FactorSmoother.initialize: ratio must have shape \(2,\) \(one value per domain\); got \(3,\)\.",
        ),
        ([1.0, float("nan")], ValueError, r"FactorSmoother.initialize: ratio must be finite; got \[1.0, nan\]\."),
        ([1.0, float("inf")], ValueError, r"FactorSmoother.initialize: ratio must be finite; got"),
        (
            [1.0, -2.0],
            ValueError,
            r"FactorSmoother.initialize: ratio must be > 0 \(ppl_S / ppl_T\); got \[1.0, -2.0\]\.",
        ),
        ([1.0, 0.0], ValueError, r"FactorSmoother.initialize: ratio must be > 0"),
        (
            "ab",
            TypeError,
            r"FactorSmoother.initialize: ratio must be a sequence, ndarray, tensor or DomainDiscrepancy of 2 floats; got str\.",
        ),
        ([[1.0, 2.0]], ValueError, r"ratio must have shape \(2,\)"),
    ],
)
def test_smoother_bad_ratio_raises(ratio, exc, match) -> None:
    with pytest.raises(exc, match=match):
        FactorSmoother(2).initialize(ratio)


def test_smoother_update_bad_ratio_raises() -> None:
    s = FactorSmoother(2)
    s.initialize([1.0, 1.0])
    with pytest.raises(ValueError, match=r"FactorSmoother.update: ratio must be > 0"):
        s.update(torch.tensor([1.0, -1.0]))


@pytest.mark.parametrize("mode,alpha", [("no_smoothing", 0.5), ("ddk", 1.0)])
def test_factor_smoother_underflowing_weights_become_exact_zeros(mode: str, alpha: float) -> None:
    s = FactorSmoother(3, mode=mode, alpha=alpha)
    w = s.initialize([1.0, 720.0, 740.0])  # softmax would give a denormal ~1e-321 for domain 0
    assert w[0].item() == 0.0 and float(w.sum()) == pytest.approx(1.0, abs=1e-15)
    assert bool(((w == 0) | (w >= torch.finfo(torch.float64).tiny)).all())
    w2 = s.update([800.0, 1.0, 1.5])
    if mode == "ddk":  # alpha = 1: psi is proportional to r_t, so a zero weight stays zero
        assert w2[0].item() == 0.0
    else:  # no smoothing: the domain comes back as soon as the ratios say so
        assert w2[0].item() == pytest.approx(1.0)
    sampler = MixtureSampler([5, 5, 5], 6, w.tolist())
    assert all(0 not in sampler.domain_of(sampler.next_global_batch()).tolist() for _ in range(20))


def test_factor_smoother_ddk_floor_keeps_every_weight_positive() -> None:
    s = FactorSmoother(3, alpha=0.5)
    s.initialize([1.0, 720.0, 740.0])
    w = s.update([1.0, 720.0, 740.0])
    assert float(w.min()) >= (1 - 0.5) / 3 - 1e-15


# ---------------------------------------------------------------------------- options beyond the paper
def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [x / sum(e) for x in e]


def _oracle(ratios: list[list[float]], alpha: float, init: str, signal: str, temperature: float) -> list[list[float]]:
    """The weights after Eq. 1 and each Eq. 2 update, in plain float math (the class doc's formulas)."""
    d = len(ratios[0])
    out: list[list[float]] = []
    prev: list[float] | None = None
    for t, r in enumerate(ratios):
        x = list(r) if signal == "ratio" else [math.log(v) for v in r]
        if signal == "gain" and prev is not None:
            rate = [max((math.log(p) - math.log(v)) / (d * w), 0.0) for p, v, w in zip(prev, r, out[-1])]
            if sum(rate) > 0:
                mean = sum(rate) / d
                x = [g * min(c / mean, 2.0) for g, c in zip(x, rate)]
        x = [v / temperature for v in x]
        if t == 0:
            w = [1.0 / d] * d if init == "uniform" else _softmax(x)
            if init == "floored":
                w = [alpha * v + (1 - alpha) / d for v in w]
        else:
            w = [alpha * p + (1 - alpha) / d for p in _softmax([math.log(a) + b for a, b in zip(out[-1], x)])]
        out.append(w)
        prev = list(r)
    return out


@given(
    st.integers(2, 6).flatmap(
        lambda d: st.lists(st.lists(st.floats(1.01, 40.0), min_size=d, max_size=d), min_size=1, max_size=5)
    ),
    st.floats(0.05, 1.0),
    st.sampled_from(["discrepancy", "uniform", "floored"]),
    st.sampled_from(["ratio", "log_ratio", "gain"]),
    st.floats(0.25, 8.0),
)
def test_smoother_options_match_the_float_oracle(
    ratios: list[list[float]], alpha: float, init: str, signal: str, temperature: float
) -> None:
    s = FactorSmoother(len(ratios[0]), alpha=alpha, init=init, signal=signal, temperature=temperature)
    got = [s.initialize(ratios[0]).tolist()] + [s.update(r).tolist() for r in ratios[1:]]
    want = _oracle(ratios, alpha, init, signal, temperature)
    for g, w in zip(got, want):
        assert abs(sum(g) - 1.0) < 1e-12
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12)


def test_smoother_floored_init_is_eq2_floor_on_eq1() -> None:
    # One domain far behind: Eq. 1 puts ~all of r_0 on it; the floored start keeps (1 - alpha) / D.
    r = [17.2, 2.6, 3.0, 4.9, 2.8]
    paper = FactorSmoother(5).initialize(r)
    floored = FactorSmoother(5, init="floored").initialize(r)
    assert float(paper[0]) > 0.9999
    assert float(floored.min()) >= 0.1 - 1e-12 and float(floored[0]) == pytest.approx(0.5 * float(paper[0]) + 0.1)


def test_smoother_log_ratio_eq2_multiplies_by_the_ratio() -> None:
    # exp(log ratio) = ratio: psi_i = r_t[i] * ratio_i
    s = FactorSmoother(3, signal="log_ratio")
    r0 = s.initialize([2.0, 4.0, 2.0])
    torch.testing.assert_close(r0, torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64))
    w = s.update([3.0, 1.0, 1.0])
    psi = [0.25 * 3.0, 0.5 * 1.0, 0.25 * 1.0]
    torch.testing.assert_close(w, torch.tensor([0.5 * p / sum(psi) + 0.5 / 3 for p in psi], dtype=torch.float64))


def test_smoother_gain_signal_hand_example() -> None:
    # r_0 = softmax(log r) over ratios e^2, e^1: [e/(1+e), 1/(1+e)].
    s = FactorSmoother(2, signal="gain")
    w0 = s.initialize([math.exp(2.0), math.exp(1.0)])
    # gaps 2 -> 1.5 (closed 0.5 on share 2*w0[0]) and 1 -> 0.5 (closed 0.5 on share 2*w0[1])
    w = s.update([math.exp(1.5), math.exp(0.5)])
    rate = [0.5 / (2 * float(w0[0])), 0.5 / (2 * float(w0[1]))]
    mean = sum(rate) / 2
    x = [1.5 * min(rate[0] / mean, 2.0), 0.5 * min(rate[1] / mean, 2.0)]
    psi = [float(w0[0]) * math.exp(x[0]), float(w0[1]) * math.exp(x[1])]
    torch.testing.assert_close(w, torch.tensor([0.5 * p / sum(psi) + 0.25 for p in psi], dtype=torch.float64))
    # the domain that closed less per sample (the one that had more samples) gets less than under log_ratio
    lr = FactorSmoother(2, signal="log_ratio")
    lr.initialize([math.exp(2.0), math.exp(1.0)])
    assert float(w[0]) < float(lr.update([math.exp(1.5), math.exp(0.5)])[0])


def test_smoother_gain_without_progress_falls_back_to_the_gap() -> None:
    s, ref = FactorSmoother(3, signal="gain"), FactorSmoother(3, signal="log_ratio")
    for sm in (s, ref):
        sm.initialize([3.0, 2.0, 1.5])
    torch.testing.assert_close(s.update([3.5, 2.5, 2.0]), ref.update([3.5, 2.5, 2.0]))  # every gap grew


def test_smoother_gain_resumes_from_its_state() -> None:
    a = FactorSmoother(3, signal="gain", init="floored")
    a.initialize([6.0, 2.0, 3.0])
    a.update([4.0, 1.9, 2.5])
    b = FactorSmoother(3, signal="gain", init="floored")
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    torch.testing.assert_close(a.update([3.0, 1.8, 2.4]), b.update([3.0, 1.8, 2.4]), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"signal": "loss"}, r"signal must be one of \('ratio', 'log_ratio', 'gain'\); got 'loss'"),
        ({"temperature": 0.0}, r"temperature must be a finite number > 0 \(paper: 1\); got 0\.0"),
        ({"temperature": float("nan")}, r"temperature must be a finite number > 0"),
        ({"temperature": True}, r"temperature must be a finite number > 0"),
    ],
)
def test_smoother_bad_signal_and_temperature_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match="FactorSmoother: " + match):
        FactorSmoother(2, **kwargs)


def test_smoother_defaults_are_the_papers_form() -> None:
    s = FactorSmoother(3)
    assert (s.init, s.signal, s.temperature) == ("discrepancy", "ratio", 1.0)
    assert repr(s) == "FactorSmoother(num_domains=3, alpha=0.5, mode='ddk', init='discrepancy')"
    assert "signal='gain'" in repr(FactorSmoother(3, signal="gain"))
