"""Tests of ``ddk.sampling.mixture.MixtureSampler`` (DESIGN.md 3.5)."""

from __future__ import annotations

import doctest
import json
import logging
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ddk.sampling.mixture as mixture_module
from ddk.sampling.mixture import MixtureSampler

# ----------------------------------------------------------------------------- strategies


@st.composite
def weight_vectors(draw: st.DrawFn, num_domains: int, *, zeros: bool = False, tiny: bool = False) -> list[float]:
    """Non-negative weights with a positive sum; optionally with zeros and with tiny entries."""
    element = st.floats(0.05, 1.0)
    if tiny:
        element = st.one_of(element, st.floats(1e-6, 1e-2))
    if zeros:
        element = st.one_of(element, st.just(0.0))
    w = draw(st.lists(element, min_size=num_domains, max_size=num_domains))
    if sum(w) == 0:
        w[draw(st.integers(0, num_domains - 1))] = draw(st.floats(0.05, 1.0))
    return w


@st.composite
def configs(draw: st.DrawFn, *, max_domains: int = 6, max_size: int = 40, max_batch: int = 48) -> dict:
    num_domains = draw(st.integers(1, max_domains))
    return {
        "domain_sizes": draw(st.lists(st.integers(1, max_size), min_size=num_domains, max_size=num_domains)),
        "global_batch_size": draw(st.integers(1, max_batch)),
        "seed": draw(st.integers(0, 2**32)),
    }


@st.composite
def schedules(
    draw: st.DrawFn,
    num_domains: int,
    *,
    zeros: bool = False,
    tiny: bool = False,
    max_changes: int = 5,
    max_run: int = 15,
) -> list[tuple[int, list[float]]]:
    """``[(batches to draw, weights to set before them), ...]``."""
    return draw(
        st.lists(
            st.tuples(st.integers(0, max_run), weight_vectors(num_domains, zeros=zeros, tiny=tiny)),
            min_size=1,
            max_size=max_changes,
        )
    )


# ----------------------------------------------------------------------------- helpers


def _counts(sampler: MixtureSampler, batch: np.ndarray | list[int]) -> np.ndarray:
    return np.bincount(sampler.domain_of(np.asarray(batch, dtype=np.int64)), minlength=sampler.num_domains)


def _run(sampler: MixtureSampler, schedule: list[tuple[int, list[float]]]) -> list[np.ndarray]:
    out = []
    for n, w in schedule:
        sampler.set_weights(w)
        out.extend(sampler.next_global_batch() for _ in range(n))
    return out


def _reference_counts(target: np.ndarray, zero: np.ndarray, batch_size: int) -> list[int] | None:
    """Plain-Python largest remainder: floor/ceil of every target, none negative, ties to the lower
    index; ``None`` when no such counts sum to the batch size."""
    counts = [max(math.floor(t), 0) for t in target]
    rem = batch_size - sum(counts)
    eligible = [i for i, t in enumerate(target) if not zero[i] and t >= 0]
    if rem < 0 or rem > len(eligible):
        return None
    for i in sorted(eligible, key=lambda i: (-(target[i] - math.floor(target[i])), i))[:rem]:
        counts[i] += 1
    return counts


def _check_exact_run(config: dict, schedule: list[tuple[int, list[float]]]) -> tuple[bool, bool]:
    """Replay ``schedule`` against an independent model of the carry; return (every batch feasible,
    all weights positive with B * w_i >= 1)."""
    s = MixtureSampler(**config)
    B, D = s.global_batch_size, s.num_domains
    carry = np.zeros(D)
    cum = np.zeros(D, dtype=np.int64)
    all_feasible = True
    large = True
    for n, raw in schedule:
        s.set_weights(raw)
        w = np.asarray(s.weights)
        assert w.sum() == pytest.approx(1.0)
        zero = w == 0
        large &= not zero.any() and bool((B * w >= 1 + 1e-9).all())
        for _ in range(n):
            target = B * w + carry
            if zero.any():
                forgiven = float(carry[zero].sum())
                target[zero] = 0.0
                target[~zero] += forgiven / int((~zero).sum())
            c = _counts(s, s.next_global_batch())
            assert c.sum() == B and (c >= 0).all()
            assert (c[zero] == 0).all(), "a zero-weight domain was drawn"
            ref = _reference_counts(target, zero, B)
            if ref is None:
                all_feasible = False
            else:
                assert c.tolist() == ref  # floor or ceil of the adjusted target
                assert (np.abs(c - target) < 1).all()
            carry = target - c
            carry[zero] = 0.0
            cum += c
            assert (s.cumulative_counts() == cum).all()
    assert s.state_dict()["carry"] == carry.tolist()
    return all_feasible, large


# ----------------------------------------------------------------------------- determinism


@given(config=configs(), mode=st.sampled_from(["exact", "iid"]), data=st.data())
def test_mixture_sampler_deterministic_fresh_samplers_equal(config: dict, mode: str, data: st.DataObject) -> None:
    schedule = data.draw(schedules(len(config["domain_sizes"]), zeros=True))
    a = _run(MixtureSampler(**config, mode=mode), schedule)
    b = _run(MixtureSampler(**config, mode=mode), schedule)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == np.int64 and x.shape == (config["global_batch_size"],)
        np.testing.assert_array_equal(x, y)


@pytest.mark.e2e
def test_mixture_sampler_deterministic_across_processes() -> None:
    code = (
        "import json\n"
        "from ddk.sampling.mixture import MixtureSampler\n"
        "out = []\n"
        "for mode in ('exact', 'iid'):\n"
        "    s = MixtureSampler([5, 17, 3, 40], 12, [0.2, 0.5, 0.3, 0.1], seed=7, mode=mode)\n"
        "    for b in range(40):\n"
        "        if b == 10: s.set_weights([0.0, 1.0, 2.0, 0.5])\n"
        "        out.append(s.next_global_batch().tolist())\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=True
    )
    namespace: dict = {}
    exec(code.replace("print(json.dumps(out))\n", ""), namespace)  # same program, this process
    assert json.loads(proc.stdout) == namespace["out"]


# ----------------------------------------------------------------------------- exact counts


@given(config=configs(), data=st.data())
def test_mixture_sampler_exact_counts_floor_or_ceil_and_drift_below_one(config: dict, data: st.DataObject) -> None:
    D = len(config["domain_sizes"])
    schedule = data.draw(schedules(D, tiny=True))
    s = MixtureSampler(**config)
    B = s.global_batch_size
    expected = np.zeros(D)
    feasible_so_far = True
    carry = np.zeros(D)
    for n, raw in schedule:
        s.set_weights(raw)
        w = np.asarray(s.weights)
        for _ in range(n):
            target = B * w + carry
            c = _counts(s, s.next_global_batch())
            ref = _reference_counts(target, np.zeros(D, dtype=bool), B)
            feasible_so_far &= ref is not None
            if ref is not None:
                assert c.tolist() == ref  # floor or ceil of the target, largest remainders
            carry = target - c
            expected += B * w
            if feasible_so_far:
                drift = s.cumulative_counts() - expected
                assert np.abs(drift).max() < 1 + 1e-9
    # Always feasible (hence drift < 1 throughout) when every B * w_i >= 1.
    large = all((B * np.asarray(raw) / sum(raw) >= 1 + 1e-9).all() for n, raw in schedule)
    assert feasible_so_far or not large


@given(config=configs(), data=st.data())
def test_mixture_sampler_exact_counts_match_reference_model(config: dict, data: st.DataObject) -> None:
    schedule = data.draw(schedules(len(config["domain_sizes"]), zeros=True, tiny=True))
    all_feasible, large = _check_exact_run(config, schedule)
    assert all_feasible or not large


def test_mixture_sampler_exact_counts_drift_below_one_long_run() -> None:
    rng = np.random.default_rng(3)
    s = MixtureSampler([50, 7, 300, 13, 1000], 37, seed=1)
    expected = np.zeros(5)
    for b in range(3000):
        if b % 97 == 0:
            s.set_weights(rng.random(5) + 0.2)
        w = np.asarray(s.weights)
        s.next_global_batch()
        expected += 37 * w
        assert np.abs(s.cumulative_counts() - expected).max() < 1


def test_mixture_sampler_exact_counts_infeasible_rounding_stays_non_negative() -> None:
    # Domains 0 and 1 were rounded up (carry -0.9) and their weights drop to ~0: floor/ceil of
    # the targets (-0.9, -0.9, 101.1, 100.7) cannot sum to B = 200 without a negative count.
    s = MixtureSampler([50, 50, 500, 500], 200, [1e-12, 1e-12, 0.501, 0.499 - 2e-12])
    state = s.state_dict()
    state["carry"] = [-0.9, -0.9, 0.9, 0.9]
    s.load_state_dict(state)
    assert _counts(s, s.next_global_batch()).tolist() == [0, 0, 100, 100]  # excess from smallest remainder
    carry = s.state_dict()["carry"]
    assert carry[2] == pytest.approx(1.1) and carry[0] == pytest.approx(-0.9, abs=1e-6)
    for _ in range(20):  # the debt of domains 0 and 1 stays; the others' carries stay bounded
        c = _counts(s, s.next_global_batch())
        assert c[:2].tolist() == [0, 0] and c.sum() == 200
        assert max(abs(x) for x in s.state_dict()["carry"]) < 2


@given(config=configs(), data=st.data())
def test_mixture_sampler_zero_weight_domains_never_drawn(config: dict, data: st.DataObject) -> None:
    D = len(config["domain_sizes"])
    schedule = data.draw(schedules(D, zeros=True))
    for mode in ("exact", "iid"):
        s = MixtureSampler(**config, mode=mode)
        for n, raw in schedule:
            s.set_weights(raw)
            zero = np.asarray(s.weights) == 0
            for _ in range(n):
                c = _counts(s, s.next_global_batch())
                assert (c[zero] == 0).all()
                assert c.sum() == s.global_batch_size


# ----------------------------------------------------------------------------- passes


@given(config=configs(max_size=15), mode=st.sampled_from(["exact", "iid"]), data=st.data())
def test_mixture_sampler_without_replacement_within_pass(config: dict, mode: str, data: st.DataObject) -> None:
    schedule = data.draw(schedules(len(config["domain_sizes"]), zeros=True, max_run=25))
    s = MixtureSampler(**config, mode=mode)
    seen = [np.zeros(n, dtype=np.int64) for n in s.domain_sizes]
    for n, raw in schedule:
        s.set_weights(raw)
        for _ in range(n):
            batch = s.next_global_batch()
            dom = s.domain_of(batch)
            for i, size in enumerate(s.domain_sizes):
                local = batch[dom == i] - s.offsets[i]
                seen[i] += np.bincount(local, minlength=size)
                drawn = int(seen[i].sum())
                q, r = divmod(drawn, size)
                # Split into pass-sized blocks: every full block holds each example once, the open
                # block holds distinct examples.
                assert set(np.unique(seen[i]).tolist()) <= {q, q + 1}
                assert int((seen[i] == q + 1).sum()) == r
            np.testing.assert_array_equal(s.passes(), [int(x.sum()) // len(x) for x in seen])
            np.testing.assert_array_equal(s.cumulative_counts(), [int(x.sum()) for x in seen])


@given(config=configs(max_size=15), data=st.data())
def test_mixture_sampler_pass_order_follows_seeded_permutations(config: dict, data: st.DataObject) -> None:
    schedule = data.draw(schedules(len(config["domain_sizes"]), zeros=True, max_run=25))
    s = MixtureSampler(**config)
    streams = [np.zeros(0, dtype=np.int64) for _ in s.domain_sizes]
    taken = [0] * s.num_domains
    for n, raw in schedule:
        s.set_weights(raw)
        for _ in range(n):
            batch = s.next_global_batch()
            dom = s.domain_of(batch)
            for i in range(s.num_domains):
                local = np.sort(batch[dom == i] - s.offsets[i])
                while len(streams[i]) < taken[i] + len(local):  # the concatenated passes, k = 0, 1, ...
                    k = len(streams[i]) // s.domain_sizes[i]
                    perm = np.random.default_rng([config["seed"], 0, i, k]).permutation(s.domain_sizes[i])
                    streams[i] = np.concatenate([streams[i], perm])
                expected = np.sort(streams[i][taken[i] : taken[i] + len(local)])
                np.testing.assert_array_equal(local, expected)
                taken[i] += len(local)


def test_mixture_sampler_small_domain_wraps_inside_one_batch() -> None:
    s = MixtureSampler([2, 3], 20, [0.5, 0.5])
    c = _counts(s, s.next_global_batch())
    assert c.tolist() == [10, 10]
    np.testing.assert_array_equal(s.passes(), [5, 3])
    np.testing.assert_array_equal(s.cumulative_counts(), [10, 10])


# ----------------------------------------------------------------------------- set_weights


@given(config=configs(), data=st.data())
def test_mixture_sampler_set_weights_never_changes_produced_batches(config: dict, data: st.DataObject) -> None:
    D = len(config["domain_sizes"])
    schedule = data.draw(schedules(D, zeros=True))
    new = data.draw(weight_vectors(D, zeros=True))
    extra = data.draw(st.integers(0, 10))
    changed = MixtureSampler(**config)
    reference = MixtureSampler(**config)
    before = _run(changed, schedule)
    changed.set_weights(new)
    after = [changed.next_global_batch() for _ in range(extra)]
    unchanged = _run(reference, schedule)
    for x, y in zip(before, unchanged, strict=True):
        np.testing.assert_array_equal(x, y)
    assert changed.batches_yielded == len(before) + extra
    assert len(after) == extra
    # The log records the change at the first batch not yet produced (unless merged).
    log = changed.weight_log
    assert log[0][0] == 0
    assert log[-1][1] == changed.weights
    assert all(a[0] < b[0] and a[1] != b[1] for a, b in zip(log, log[1:]))
    if log[-1][0] != 0:
        assert log[-1][0] <= len(before)


def test_mixture_sampler_weight_log_is_compact() -> None:
    s = MixtureSampler([4, 4, 4], 6)
    s.set_weights([1, 1, 1])  # same as the default uniform weights: nothing logged
    assert s.weight_log == [(0, (1 / 3, 1 / 3, 1 / 3))]
    s.set_weights([1, 0, 0])
    s.set_weights([0, 2, 0])  # supersedes the previous one before any batch was drawn
    assert s.weight_log == [(0, (0.0, 1.0, 0.0))]
    s.next_global_batch()
    s.set_weights([0, 1, 0])
    s.next_global_batch()
    s.set_weights([1, 0, 1])
    s.set_weights([0, 3, 0])  # back to the weights in effect: merged away
    s.next_global_batch()
    s.set_weights([1, 1, 2])
    s.next_global_batch()
    assert s.weight_log == [(0, (0.0, 1.0, 0.0)), (3, (0.25, 0.25, 0.5))]
    assert s.weights == (0.25, 0.25, 0.5)


def test_mixture_sampler_set_weights_accepts_arrays_and_tensors() -> None:
    a = MixtureSampler([5, 6], 4, torch.tensor([1.0, 3.0]))
    b = MixtureSampler([5, 6], 4, np.array([0.25, 0.75], dtype=np.float32))
    c = MixtureSampler([5, 6], 4, (1, 3))
    assert a.weights == b.weights == c.weights == (0.25, 0.75)
    a.set_weights(torch.tensor([2.0, 2.0], dtype=torch.float64))
    assert a.weights == (0.5, 0.5)
    assert MixtureSampler([5, 6, 7], 3).weights == (1 / 3, 1 / 3, 1 / 3)


# ----------------------------------------------------------------------------- resume


def _divisors(n: int, limit: int = 4) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


@given(config=configs(), mode=st.sampled_from(["exact", "iid"]), data=st.data())
def test_mixture_sampler_resume_reproduces_continuation(config: dict, mode: str, data: st.DataObject) -> None:
    D = len(config["domain_sizes"])
    B = config["global_batch_size"]
    schedule = data.draw(schedules(D, zeros=True, tiny=True))
    total = sum(n for n, _ in schedule)
    cut = data.draw(st.integers(0, total))
    set_at_cut = data.draw(st.booleans())  # save right after a set_weights
    ws1, ws2 = data.draw(st.sampled_from(_divisors(B))), data.draw(st.sampled_from(_divisors(B)))
    reference = _run(MixtureSampler(**config, mode=mode), schedule)

    # Where each weight change happens, as global batch indices.
    changes, start = [], 0
    for n, w in schedule:
        changes.append((start, w))
        start += n
    first = MixtureSampler(**config, mode=mode, rank=ws1 - 1, world_size=ws1, num_batches=total)
    for _ in range(cut):
        for at, w in changes:
            if at == first.batches_yielded:
                first.set_weights(w)
        first.next_global_batch()
    if set_at_cut:
        for at, w in changes:
            if at == cut:
                first.set_weights(w)
    state = json.loads(json.dumps(first.state_dict()))
    assert state == first.state_dict()

    # Every rank of the new world size resumes and iterates; interleaving gives the global batches.
    ranks = [MixtureSampler.from_state_dict(state, rank=r, world_size=ws2) for r in range(ws2)]
    iters = [iter(s) for s in ranks]
    for g in range(cut, total):
        for s in ranks:
            for at, w in changes:
                if at == g and not (set_at_cut and at == cut):
                    s.set_weights(w)
        parts = [next(it) for it in iters]
        glob = np.empty(B, dtype=np.int64)
        for r, part in enumerate(parts):
            assert len(part) == B // ws2
            glob[r::ws2] = part
        np.testing.assert_array_equal(glob, reference[g])
    for it in iters:
        assert next(it, None) is None
    # load_state_dict into an existing sampler does the same.
    other = MixtureSampler(**config, mode=mode, weights=data.draw(weight_vectors(D)))
    other.load_state_dict(state)
    assert other.weight_log == first.weight_log and other.batches_yielded == cut
    pending = [at for at, _ in changes if at > cut or (at == cut and not set_at_cut)]
    if cut < total and not pending:
        np.testing.assert_array_equal(other.next_global_batch(), reference[cut])


def test_mixture_sampler_resume_mid_pass_exact_floats() -> None:
    s = MixtureSampler([7, 11, 1000], 10, [1.0, 1.0, 1.0], seed=5)
    for _ in range(13):
        s.next_global_batch()
    s.set_weights([0.1, 0.7, 0.2])
    state = json.loads(json.dumps(s.state_dict()))
    assert any(0 < p for p in state["positions"])  # mid-pass
    assert any(c not in (0.0,) and c != round(c, 3) for c in state["carry"])  # non-trivial floats
    resumed = MixtureSampler.from_state_dict(state)
    for _ in range(50):
        np.testing.assert_array_equal(resumed.next_global_batch(), s.next_global_batch())
    assert resumed.state_dict() == s.state_dict()


def test_mixture_sampler_state_dict_size_independent_of_batches_drawn() -> None:
    def sizes_after(n: int) -> tuple[str, int]:
        s = MixtureSampler([1000, 300, 70_000, 500], 64, [0.4, 0.1, 0.3, 0.2], seed=9)
        for _ in range(n):
            s.next_global_batch()
        text = json.dumps(s.state_dict())
        return re.sub(r"-?\d+(\.\d+)?(e-?\d+)?", "0", text), len(text)

    shape_10, len_10 = sizes_after(10)
    shape_10k, len_10k = sizes_after(10_000)
    assert shape_10 == shape_10k  # same fields, same list lengths
    # Only the digits of a few O(D) numbers may differ.
    assert abs(len_10k - len_10) <= 25 * 4 + 10
    assert len_10k < 1000


def test_mixture_sampler_state_dict_at_batch_for_prefetching_loop() -> None:
    s = MixtureSampler([9, 23, 400], 8, [0.2, 0.3, 0.5], seed=2)
    produced = [s.next_global_batch() for _ in range(100)]
    s.set_weights([0.6, 0.0, 0.4])  # the controller changes weights while the loader is ahead
    produced += [s.next_global_batch() for _ in range(10)]
    states = {k: json.loads(json.dumps(s.state_dict(at_batch=k))) for k in (110 - 64, 70, 99, 100, 105, 110)}
    produced += [s.next_global_batch() for _ in range(20)]
    for k, state in states.items():
        assert state["batches_yielded"] == k
        resumed = MixtureSampler.from_state_dict(state, world_size=2)
        for j in range(k, 130):
            np.testing.assert_array_equal(resumed.next_global_batch(), produced[j])
        assert resumed.weight_log == s.weight_log
        assert resumed.state_dict() == s.state_dict()
    # A scheduled entry at or after the resume point is superseded by a new set_weights.
    resumed = MixtureSampler.from_state_dict(s.state_dict(at_batch=100))
    resumed.set_weights([1, 1, 1])
    assert resumed.weight_log == [(0, (0.2, 0.3, 0.5)), (100, (1 / 3, 1 / 3, 1 / 3))]
    with pytest.raises(ValueError, match=r"MixtureSampler\.state_dict: at_batch must be an int in \[66, 130\]"):
        s.state_dict(at_batch=65)
    with pytest.raises(ValueError, match=r"at_batch must be an int in \[66, 130\].*; got 131\."):
        s.state_dict(at_batch=131)


# ----------------------------------------------------------------------------- ranks


@given(config=configs(), mode=st.sampled_from(["exact", "iid"]), data=st.data())
def test_mixture_sampler_rank_slices_disjoint_and_covering(config: dict, mode: str, data: st.DataObject) -> None:
    B = config["global_batch_size"]
    ws = data.draw(st.sampled_from(_divisors(B)))
    n = data.draw(st.integers(1, 5))
    glob = MixtureSampler(**config, mode=mode)
    ranks = [MixtureSampler(**config, mode=mode, rank=r, world_size=ws, num_batches=n) for r in range(ws)]
    per_rank = [list(s) for s in ranks]
    for r, s in enumerate(ranks):
        assert len(per_rank[r]) == n and len(s) == 0 and s.batches_yielded == n
    for b in range(n):
        full = glob.next_global_batch()
        slots = np.full(B, -1, dtype=np.int64)
        for r in range(ws):
            part = per_rank[r][b]
            assert isinstance(part, list) and all(type(x) is int for x in part)
            assert len(part) == B // ws
            positions = np.arange(r, B, ws)
            assert (slots[positions] == -1).all()  # disjoint
            slots[positions] = part
        np.testing.assert_array_equal(slots, full)  # covering, in order


def test_mixture_sampler_iter_is_stateful_and_len_counts_down() -> None:
    s = MixtureSampler([10, 20], 4, num_batches=5)
    assert len(s) == 5
    it = iter(s)
    first = [next(it), next(it)]
    assert len(s) == 3 and s.batches_yielded == 2
    rest = list(s)  # a new iterator continues the stream
    assert len(rest) == 3 and len(s) == 0 and list(s) == []
    ref = MixtureSampler([10, 20], 4)
    assert first + rest == [ref.next_global_batch().tolist() for _ in range(5)]


def test_mixture_sampler_works_as_dataloader_batch_sampler() -> None:
    sizes = [13, 7, 29]
    data = torch.utils.data.TensorDataset(torch.arange(sum(sizes)))
    s = MixtureSampler(sizes, 6, [0.5, 0.2, 0.3], rank=1, world_size=2, num_batches=4, seed=4)
    ref = MixtureSampler(sizes, 6, [0.5, 0.2, 0.3], seed=4)
    loader = torch.utils.data.DataLoader(data, batch_sampler=s)
    assert len(loader) == 4
    got = [b[0] for b in loader]
    for batch in got:
        assert batch.tolist() == ref.next_global_batch()[1::2].tolist()
        assert s.domain_of(batch).dtype == torch.long


# ----------------------------------------------------------------------------- iid mode


@given(config=configs(), data=st.data())
def test_mixture_sampler_iid_deterministic_and_differs_by_seed(config: dict, data: st.DataObject) -> None:
    schedule = data.draw(schedules(len(config["domain_sizes"]), zeros=True))
    a = _run(MixtureSampler(**config, mode="iid"), schedule)
    b = _run(MixtureSampler(**config, mode="iid"), schedule)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_mixture_sampler_iid_proportions_roughly_right() -> None:
    w = np.array([0.5, 0.3, 0.15, 0.05, 0.0])
    s = MixtureSampler([1000, 50, 2000, 10, 300], 256, w, mode="iid", seed=11)
    counts = np.zeros(5, dtype=np.int64)
    per_batch = []
    for _ in range(400):
        c = _counts(s, s.next_global_batch())
        counts += c
        per_batch.append(c)
    freq = counts / counts.sum()
    np.testing.assert_allclose(freq, w, atol=0.01)
    assert counts[4] == 0
    assert len({tuple(c) for c in per_batch}) > 1  # counts vary per batch, unlike exact mode


# ----------------------------------------------------------------------------- queries


def test_mixture_sampler_domain_of_types_and_offsets() -> None:
    s = MixtureSampler([3, 5, 2], 4, domain_names=["a", "b", "c"])
    assert s.offsets == (0, 3, 8)
    assert s.domain_sizes == (3, 5, 2) and s.num_domains == 3 and s.domain_names == ("a", "b", "c")
    idx = [0, 2, 3, 7, 8, 9]
    out = s.domain_of(idx)
    assert isinstance(out, np.ndarray) and out.dtype == np.int64 and out.tolist() == [0, 0, 1, 1, 2, 2]
    out2 = s.domain_of(np.array([[0, 9], [3, 8]], dtype=np.int32))
    assert out2.dtype == np.int64 and out2.tolist() == [[0, 2], [1, 2]]
    t = s.domain_of(torch.tensor(idx, dtype=torch.int32))
    assert t.dtype == torch.long and t.tolist() == [0, 0, 1, 1, 2, 2]
    assert s.domain_of(5) == 1 and isinstance(s.domain_of(5), int)
    assert s.domain_of([]).tolist() == []
    assert MixtureSampler([4], 2).domain_names == ("domain0",)


def test_mixture_sampler_docstring_example_runs() -> None:
    result = doctest.testmod(mixture_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------------------------------- errors

_BAD_INIT = [
    (
        dict(weights=[1.0, -0.5, 1.0]),
        ValueError,
        r"^MixtureSampler: weights must be non-negative; got -0\.5 for domain 'domain1' \(index 1\)\.$",
    ),
    (dict(weights=torch.tensor([1.0, -2.0, 1.0])), ValueError, r"weights must be non-negative; got -2\.0"),
    (
        dict(weights=[1.0, float("nan"), 1.0]),
        ValueError,
        r"^MixtureSampler: weights must be finite; got nan for domain 'domain1' \(index 1\)\.$",
    ),
    (dict(weights=[1.0, 1.0, float("inf")]), ValueError, r"weights must be finite; got inf for domain 'domain2'"),
    (
        dict(weights=[0.0, 0.0, 0.0]),
        ValueError,
        r"^MixtureSampler: weights must have a positive sum \(at least one domain > 0\); got all zeros\.$",
    ),
    (
        dict(weights=[0.5, 0.5]),
        ValueError,
        r"^MixtureSampler: weights must have one entry per domain \(length 3\); got shape \(2,\)\.$",
    ),
    (
        dict(weights=[[0.5, 0.5, 1.0]]),
        ValueError,
        r"weights must have one entry per domain \(length 3\); got shape \(1, 3\)",
    ),
    (dict(weights=["a", "b", "c"]), TypeError, r"^MixtureSampler: weights must be a sequence of 3 numbers; got"),
    (
        dict(domain_sizes=[4, 0, 2], domain_names=["web", "code", "math"]),
        ValueError,
        r"^MixtureSampler: domain_sizes must be >= 1 for every domain; got 0 for domain 'code' \(index 1\); "
        r"drop the empty domain or give it data\.$",
    ),
    (dict(domain_sizes=[]), ValueError, r"^MixtureSampler: domain_sizes must name at least one domain; got \[\]\.$"),
    (dict(domain_sizes=[4, 2.5, 2]), TypeError, r"^MixtureSampler: domain_sizes must be ints; got 2\.5 at index 1\.$"),
    (dict(global_batch_size=0), ValueError, r"^MixtureSampler: global_batch_size must be a positive int; got 0\.$"),
    (dict(global_batch_size=-4), ValueError, r"global_batch_size must be a positive int; got -4\."),
    (dict(global_batch_size=8.0), ValueError, r"global_batch_size must be a positive int; got 8\.0\."),
    (dict(world_size=0), ValueError, r"^MixtureSampler: world_size must be a positive int; got 0\.$"),
    (dict(rank=2, world_size=2), ValueError, r"^MixtureSampler: rank must be an int in \[0, world_size=2\); got 2\.$"),
    (dict(rank=-1), ValueError, r"rank must be an int in \[0, world_size=1\); got -1\."),
    (
        dict(global_batch_size=10, world_size=4),
        ValueError,
        r"^MixtureSampler: global_batch_size must be divisible by world_size=4; got 10; pick a multiple of 4\.$",
    ),
    (dict(mode="uniform"), ValueError, r"^MixtureSampler: mode must be one of \('exact', 'iid'\); got 'uniform'\.$"),
    (dict(seed=-1), ValueError, r"^MixtureSampler: seed must be a non-negative int; got -1\.$"),
    (dict(num_batches=-1), ValueError, r"^MixtureSampler: num_batches must be None or an int >= 0; got -1\.$"),
    (dict(domain_names=["a", "b"]), ValueError, r"^MixtureSampler: domain_names must be 3 strings \(one per domain\)"),
    (dict(domain_names=["a", "b", "a"]), ValueError, r"^MixtureSampler: domain_names must be unique; got"),
]


@pytest.mark.parametrize(("kwargs", "error", "pattern"), _BAD_INIT)
def test_mixture_sampler_init_rejects_bad_input(kwargs: dict, error: type, pattern: str) -> None:
    args = {"domain_sizes": [4, 5, 6], "global_batch_size": 8, **kwargs}
    with pytest.raises(error, match=pattern):
        MixtureSampler(**args)


@pytest.mark.parametrize(
    ("weights", "pattern"),
    [
        (
            [1.0, -1.0],
            r"^MixtureSampler\.set_weights: weights must be non-negative; got -1\.0 for domain 'domain1' \(index 1\)\.$",
        ),
        ([float("nan"), 1.0], r"^MixtureSampler\.set_weights: weights must be finite; got nan"),
        ([0, 0], r"^MixtureSampler\.set_weights: weights must have a positive sum"),
        (
            [1.0, 2.0, 3.0],
            r"^MixtureSampler\.set_weights: weights must have one entry per domain \(length 2\); got shape \(3,\)\.$",
        ),
    ],
)
def test_mixture_sampler_set_weights_rejects_bad_input(weights: list[float], pattern: str) -> None:
    s = MixtureSampler([3, 4], 2, [1, 3])
    s.next_global_batch()
    with pytest.raises(ValueError, match=pattern):
        s.set_weights(weights)
    assert s.weights == (0.25, 0.75) and s.weight_log == [(0, (0.25, 0.75))]


def test_mixture_sampler_len_infinite_raises_type_error() -> None:
    with pytest.raises(
        TypeError, match=r"^MixtureSampler: num_batches must be set to take len\(\) of the sampler; got None"
    ):
        len(MixtureSampler([3], 1))


def test_mixture_sampler_domain_of_rejects_out_of_range() -> None:
    s = MixtureSampler([3, 4], 2)
    with pytest.raises(ValueError, match=r"^MixtureSampler\.domain_of: indices must be in \[0, 7\); got 7\.$"):
        s.domain_of([0, 7])
    with pytest.raises(ValueError, match=r"got -1\."):
        s.domain_of(-1)
    with pytest.raises(TypeError, match=r"^MixtureSampler\.domain_of: indices must be integers; got dtype float64\.$"):
        s.domain_of([0.5])


def _state() -> dict:
    s = MixtureSampler([3, 4], 2, [1, 3], seed=1, domain_names=["x", "y"])
    for _ in range(5):
        s.next_global_batch()
    return json.loads(json.dumps(s.state_dict()))


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda st: st.pop("carry"), r"^MixtureSampler\.load_state_dict: state must contain 'carry'; got keys"),
        (
            lambda st: st["config"].update(domain_sizes=[3, 5]),
            r"^MixtureSampler\.load_state_dict: config\.domain_sizes must match this sampler's \[3, 4\]; got \[3, 5\]\.$",
        ),
        (
            lambda st: st["config"].update(global_batch_size=4),
            r"config\.global_batch_size must match this sampler's 2; got 4\.",
        ),
        (lambda st: st["config"].update(seed=2), r"config\.seed must match"),
        (lambda st: st["config"].update(mode="iid"), r"config\.mode must match"),
        (lambda st: st["config"].update(domain_names=["x", "z"]), r"config\.domain_names must match"),
        (lambda st: st["config"].pop("seed"), r"config must contain 'seed'"),
        (
            lambda st: st.update(carry=[0.0]),
            r"^MixtureSampler\.load_state_dict: carry must be a list of 2 numbers \(one per domain\)",
        ),
        (lambda st: st.update(carry=[float("nan"), 0.0]), r"carry must be finite"),
        (lambda st: st.update(positions=[0, 4]), r"positions must be in \[0, domain size\) per domain; got \[0, 4\]"),
        (lambda st: st.update(passes=[-1, 0]), r"passes must be ints in \[0, 2\*\*53\]; got \[-1, 0\]\."),
        (lambda st: st.update(passes=[2**63 + 1, 0]), r"passes must be ints in \[0, 2\*\*53\]"),
        (  # 4e18 passes over domain x (3 samples each), batches_yielded raised to match: counts past 2**53
            lambda st: st.update(
                passes=[st["passes"][0] + 4 * 10**18, st["passes"][1]],
                batches_yielded=st["batches_yielded"] + 6 * 10**18,
            ),
            r"batches_yielded \* global_batch_size \(the samples drawn\) must be at most 2\*\*53 .*; "
            r"got 6000000000000000005 \* 2\.",
        ),
        (  # the same above 2**63 (an int64 overflows)
            lambda st: st.update(passes=[st["passes"][0] + 2**64, st["passes"][1]], batches_yielded=5 + 3 * 2**63),
            r"the samples drawn\) must be at most 2\*\*53",
        ),
        (lambda st: st.update(passes=[0.5, 0]), r"passes must hold ints"),
        (lambda st: st.update(batches_yielded=-3), r"batches_yielded must be an int >= 0; got -3\."),
        (lambda st: st.update(version=99), r"version must be 1; got 99\."),
        (lambda st: st.update(weight_log=[]), r"weight_log must be a non-empty list"),
        (lambda st: st.update(weight_log=[[1, [0.5, 0.5]]]), r"weight_log indices must start at 0 and increase"),
        (
            lambda st: st.update(weight_log=[[0, [0.5, 0.6]]]),
            r"weight_log weights must be 2 normalized non-negative numbers",
        ),
        (lambda st: st.update(weights=[0.5, 0.5]), r"weights must equal the last weight_log entry"),
    ],
)
def test_mixture_sampler_load_state_dict_rejects_bad_state(mutate, pattern: str) -> None:
    state = _state()
    mutate(state)
    s = MixtureSampler([3, 4], 2, seed=1, domain_names=["x", "y"])
    before = s.state_dict()
    with pytest.raises(ValueError, match=pattern):
        s.load_state_dict(state)
    assert s.state_dict() == before  # unchanged


def test_mixture_sampler_load_state_dict_rejects_bad_world_size() -> None:
    state = _state()
    with pytest.raises(
        ValueError, match=r"^MixtureSampler\.load_state_dict: global_batch_size must be divisible by world_size=4"
    ):
        MixtureSampler([3, 4], 2, seed=1, domain_names=["x", "y"]).load_state_dict(state, world_size=4)
    with pytest.raises(ValueError, match=r"^MixtureSampler\.from_state_dict: state must be a dict from state_dict\(\)"):
        MixtureSampler.from_state_dict({"carry": []})


# ----------------------------------------------------------------------------- exhausted domains, underflowing weights


def test_mixture_sampler_exhausted_domain_is_reused_cyclically_and_logged_once_per_wrap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = MixtureSampler([3, 50], 4, [0.5, 0.5], seed=1, domain_names=["tiny", "big"])
    with caplog.at_level(logging.INFO, logger="ddk.sampling.mixture"):
        batches = [s.next_global_batch() for _ in range(6)]  # 'tiny' gives 2 per batch: 12 draws = 4 passes
    tiny = np.concatenate([b[b < 3] for b in batches])
    assert np.bincount(tiny).tolist() == [4, 4, 4]  # 4 full passes, every example once per pass
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 4 and all("domain 'tiny' (3 examples) exhausted" in m for m in msgs)  # one per wrap
    assert "reusing it cyclically from pass 1 with a fresh permutation." in msgs[0]
    assert s.passes().tolist() == [4, 0]


def test_mixture_sampler_many_wraps_in_one_batch_log_one_line_and_only_on_rank0(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="ddk.sampling.mixture"):
        MixtureSampler([1, 20], 8, [0.5, 0.5], domain_names=["one", "big"]).next_global_batch()
        MixtureSampler([1, 20], 8, [0.5, 0.5], domain_names=["one", "big"], rank=1, world_size=2).next_global_batch()
    assert len(caplog.records) == 1
    assert "from pass 4 with a fresh permutation (4 passes completed in this batch)." in caplog.records[0].getMessage()


def test_mixture_sampler_denormal_weights_are_renormalised() -> None:
    s = MixtureSampler([4, 4], 4, [5e-324, 5e-324])
    assert s.weights == (0.5, 0.5)
    t = MixtureSampler([4, 4], 4, [1e-320, 1.0])  # effectively zero: never drawn, exact counts kept
    assert all(0 not in t.domain_of(t.next_global_batch()).tolist() for _ in range(50))
    with pytest.raises(
        ValueError,
        match=r"^MixtureSampler: weights must have a positive sum \(at least one domain > 0\); got all zeros\.$",
    ):
        MixtureSampler([4, 4], 4, [0.0, 0.0])
