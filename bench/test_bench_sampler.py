"""Throughput of ``MixtureSampler`` against a naive per-sample Python sampler.

Workload: 10 domains of 10k .. 1M examples, global batch 1024, new random weights every 1000
batches (the paper's K), one rank; indices are consumed as the ``list[int]`` a DataLoader's
``batch_sampler`` yields. The naive baseline draws each slot's domain with ``random.choices`` and
pops from per-domain shuffled Python lists (refilled with a fresh shuffle when exhausted).

Run: ``python -m pytest bench/test_bench_sampler.py --benchmark-only -q``
"""

from __future__ import annotations

import random
import time
import tracemalloc
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from ddk.sampling.mixture import MixtureSampler

SIZES = [int(x) for x in np.geomspace(10_000, 1_000_000, 10)]
BATCH = 1024
INTERVAL = 1000  # batches between weight changes
FAST_BATCHES = 3000  # per timed round
NAIVE_BATCHES = 1000


def _weights(rng: np.random.Generator) -> list[float]:
    return (rng.random(len(SIZES)) + 0.05).tolist()


class _NaiveSampler:
    """Per-sample Python loops: ``random.choices`` domain draws + per-domain list pops."""

    def __init__(self, sizes: list[int], batch_size: int, weights: list[float], seed: int) -> None:
        self.rng = random.Random(seed)
        self.sizes = sizes
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.batch_size = batch_size
        self.weights = weights
        self.pools: list[list[int]] = [[] for _ in sizes]
        self.batches = 0

    def set_weights(self, weights: list[float]) -> None:
        self.weights = weights

    def __iter__(self) -> Iterator[list[int]]:
        domains = range(len(self.sizes))
        while True:
            out = []
            for d in self.rng.choices(domains, weights=self.weights, k=self.batch_size):
                pool = self.pools[d]
                if not pool:  # new pass: fresh shuffled copy of the domain
                    pool.extend(range(self.offsets[d], self.offsets[d] + self.sizes[d]))
                    self.rng.shuffle(pool)
                out.append(pool.pop())
            self.rng.shuffle(out)
            self.batches += 1
            yield out


def _drive(
    sampler: MixtureSampler | _NaiveSampler,
    it: Iterator[list[int]],
    rng: np.random.Generator,
    n: int,
    counter: Callable[[], int],
) -> int:
    total = 0
    for _ in range(n):
        if counter() % INTERVAL == 0:
            sampler.set_weights(_weights(rng))
        total += len(next(it))
    return total


def _naive_indices_per_s(rounds: int = 2) -> float:
    rng = np.random.default_rng(1)
    naive = _NaiveSampler(SIZES, BATCH, _weights(rng), seed=0)
    it = iter(naive)
    _drive(naive, it, rng, 200, lambda: naive.batches)  # warm-up: fills the first passes
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        n = _drive(naive, it, rng, NAIVE_BATCHES, lambda: naive.batches)
        best = min(best, (time.perf_counter() - t0) / n)
    return 1.0 / best


def _peak_memory_mb(mode: str) -> float:
    rng = np.random.default_rng(2)
    tracemalloc.start()
    try:
        s = MixtureSampler(SIZES, BATCH, _weights(rng), seed=0, mode=mode)  # type: ignore[arg-type]
        _drive(s, iter(s), rng, INTERVAL, lambda: s.batches_yielded)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / 2**20


@pytest.mark.benchmark(group="sampler")
@pytest.mark.parametrize("mode", ["exact", "iid"])
def test_bench_mixture_sampler_vs_naive(benchmark, mode: str) -> None:
    rng = np.random.default_rng(0)
    sampler = MixtureSampler(SIZES, BATCH, _weights(rng), seed=0, mode=mode)  # type: ignore[arg-type]
    it = iter(sampler)
    _drive(sampler, it, rng, 200, lambda: sampler.batches_yielded)  # warm-up: first pass permutations
    times: list[float] = []

    def run() -> int:
        t0 = time.perf_counter()
        n = _drive(sampler, it, rng, FAST_BATCHES, lambda: sampler.batches_yielded)
        times.append((time.perf_counter() - t0) / n)
        return n

    benchmark.pedantic(run, rounds=5, iterations=1)
    fast = 1.0 / float(np.median(times))
    naive = _naive_indices_per_s()
    benchmark.extra_info.update(
        {
            "indices_per_s": fast,
            "naive_indices_per_s": naive,
            "speedup": fast / naive,
            "batches_per_round": FAST_BATCHES,
            "global_batch_size": BATCH,
            "num_domains": len(SIZES),
            "peak_mem_mb": _peak_memory_mb(mode),
        }
    )
    assert sampler.batches_yielded == 200 + 5 * FAST_BATCHES
