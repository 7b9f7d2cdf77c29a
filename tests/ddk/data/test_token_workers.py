"""Tests of ``ddk.data.token_workers``: batches tokenized in worker processes come back in order and
equal to this process's, one batch starts no worker, a worker's error reaches the caller, and the
``num_proc`` argument."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

from ddk.data.token_workers import _TokenizeBatch, _TokenizerPool, available_cpus, resolve_num_proc


class Words:
    """A toy tokenizer: one id per word (its length), and an error on a text holding ``boom``."""

    eos_token_id = 0

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, Any]:
        if any("boom" in t for t in texts):
            raise RuntimeError("the tokenizer failed on a text")
        return {"input_ids": [[len(w) for w in t.split()] for t in texts]}


def _batches(n: int) -> list[list[str]]:
    rng = np.random.default_rng(0)
    return [
        [" ".join("x" * int(k) for k in rng.integers(1, 9, rng.integers(0, 20))) for _ in range(50)] for _ in range(n)
    ]


@pytest.mark.parametrize("num_proc", [1, 2, 3])
def test_tokenizer_pool_results_come_back_in_order(num_proc):
    batches = _batches(25)
    got: list[tuple[int, np.ndarray, np.ndarray]] = []
    with _TokenizerPool(Words(), num_proc) as pool:
        pool.map(
            enumerate(batches),
            lambda item: item[1] if item[0] % 7 else None,  # some items have nothing to tokenize
            lambda item, res: got.append((item[0], *(res if res is not None else (None, None)))),
        )
        assert pool.started == (num_proc > 1)
    assert [i for i, _, _ in got] == list(range(25))
    local = _TokenizeBatch(Words())
    for i, flat, lengths in got:
        if i % 7 == 0:
            assert flat is None
            continue
        want_flat, want_lengths = local(batches[i])
        np.testing.assert_array_equal(flat, want_flat)
        np.testing.assert_array_equal(lengths, want_lengths)
        assert flat.dtype == np.dtype("<i4") and lengths.dtype == np.int64


def test_tokenizer_pool_one_batch_starts_no_worker():
    out: list[Any] = []
    with _TokenizerPool(Words(), 4) as pool:
        pool.map([["a bb ccc"]], lambda t: t, lambda t, r: out.append(r))
        assert not pool.started and pool.pool is None
    np.testing.assert_array_equal(out[0][0], [1, 2, 3])


def test_tokenizer_pool_error_in_a_worker_reaches_the_caller():
    batches = _batches(6)
    batches[4] = ["this one goes boom"]
    with pytest.raises(RuntimeError, match="the tokenizer failed on a text"):
        with _TokenizerPool(Words(), 2) as pool:
            pool.map(batches, lambda t: t, lambda t, r: None)
    assert pool.pool is None  # terminated and joined


def test_resolve_num_proc():
    assert resolve_num_proc("f", None) == resolve_num_proc("f", 0) == available_cpus() >= 1
    assert resolve_num_proc("f", 3) == 3 and resolve_num_proc("f", np.int64(2)) == 2
    for bad in (-1, 1.0, False, "2"):
        with pytest.raises(
            ValueError,
            match=rf"^f: num_proc must be an int >= 1, or 0/None for the CPU count \(\d+\); got {re.escape(repr(bad))}\.$",
        ):
            resolve_num_proc("f", bad)
