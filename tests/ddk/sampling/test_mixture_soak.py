"""Soak test of ``MixtureSampler`` (issue 6, item 4): 1,000,000 global batches, new weights every 100.

Counts stay exact (every domain's cumulative count within one sample of ``sum_b B * w_i^(b)`` at
every batch boundary) and memory stays flat: the state grows only through the weight log, and the
peak RSS after the first 10,000 batches does not grow by more than the weight log can explain.
"""

from __future__ import annotations

import json
import resource
import sys

import numpy as np
import pytest

from ddk.sampling.mixture import MixtureSampler

BATCHES = 1_000_000
B = 8
SIZES = [7, 13, 50, 101, 3]  # small domains: many passes (cyclic reuse) over the run
CHANGE_EVERY = 100
WARMUP = 10_000


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _state_sizes(s: MixtureSampler) -> tuple[int, int]:
    """(JSON length of the state without the weight log, number of weight-log entries)."""
    st = s.state_dict()
    log = st.pop("weight_log")
    return len(json.dumps(st)), len(log)


@pytest.mark.slow
def test_soak_one_million_batches_exact_counts_flat_memory():
    d = len(SIZES)
    s = MixtureSampler(SIZES, B, seed=123)
    rng = np.random.default_rng(2026)
    expected = np.zeros(d, dtype=np.float64)
    worst = 0.0
    bw = None
    changes = 0
    base_state = base_rss = None
    for b in range(BATCHES):
        if b % CHANGE_EVERY == 0:
            # all weights positive with B * w_i >= 1: the regime where the class guarantees |drift| < 1
            w = 1.0 / B + (1.0 - d / B) * rng.dirichlet(np.ones(d))
            s.set_weights(w)
            changes += 1
            bw = B * np.asarray(s.weights, dtype=np.float64)
        batch = s.next_global_batch()
        assert len(batch) == B
        expected += bw
        drift = np.abs(s.cumulative_counts() - expected).max()
        if drift >= 1.0:
            pytest.fail(
                f"batch {b}: cumulative counts {s.cumulative_counts().tolist()} drift {drift} from "
                f"sum B*w = {expected.tolist()}"
            )
        worst = max(worst, drift)
        if b + 1 == WARMUP:
            base_state, base_rss = _state_sizes(s), _maxrss_bytes()
    assert s.batches_yielded == BATCHES
    assert int(s.cumulative_counts().sum()) == BATCHES * B
    assert base_state is not None and base_rss is not None
    end_state = _state_sizes(s)
    # state without the weight log: O(D), same size up to the digits of the counters
    assert end_state[0] <= base_state[0] + 64, (base_state, end_state)
    assert end_state[1] == changes  # one entry per weight change (the initial uniform entry is replaced)
    # RSS: the 9,900 further log entries (a (5,) float64 array + list slots each, < 200 B) and nothing else
    growth = _maxrss_bytes() - base_rss
    assert growth < 8 * 2**20, f"peak RSS grew by {growth / 2**20:.1f} MiB after the first {WARMUP} batches"
    print(f"soak: worst drift {worst:.6f}, RSS growth {growth / 2**20:.2f} MiB, weight log {end_state[1]} entries")
