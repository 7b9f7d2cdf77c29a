"""Tokenizing batches of texts, in this process or in worker processes (no public names).

``_TokenizeBatch`` turns a list of texts into ``(flat, lengths)``: every text's ids
(``tokenizer(texts, add_special_tokens=False)``, the one call the packing has always made)
concatenated into one int32 array, and each text's number of ids.

``_TokenizerPool`` runs it: with ``num_proc == 1`` in this process, else in ``num_proc`` worker
processes started when a second batch arrives (a corpus of one batch starts none). Results come
back in submission order, whatever the number of workers, and a batch's ids do not depend on which
batch it was tokenized with, so the packed result is the same for every ``num_proc``. Workers are
forked on Linux (nothing to pickle, no re-import of the caller's script) and spawned elsewhere;
each ignores SIGINT (the parent handles Ctrl-C and stops them), dies with its parent on Linux
(``PR_SET_PDEATHSIG``) and tokenizes single-threaded (``TOKENIZERS_PARALLELISM=false``: the
processes are the parallelism).
"""

from __future__ import annotations

import collections
import itertools
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__: list[str] = []

_DTYPE = np.dtype("<i4")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def resolve_num_proc(fn: str, num_proc: Any) -> int:
    """``num_proc`` checked: ``None`` or ``0`` is the CPU count, else an int >= 1."""
    if num_proc is None or (isinstance(num_proc, int) and not isinstance(num_proc, bool) and num_proc == 0):
        return available_cpus()
    if not isinstance(num_proc, (int, np.integer)) or isinstance(num_proc, bool) or num_proc < 1:
        raise ValueError(
            f"{fn}: num_proc must be an int >= 1, or 0/None for the CPU count ({available_cpus()}); got {num_proc!r}."
        )
    return int(num_proc)


class _TokenizeBatch:
    """``texts -> (flat int32 ids, int64 lengths)``: ``tokenizer(texts, add_special_tokens=False)``."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids: list[Sequence[int]] = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=_DTYPE, count=int(lengths.sum()))
        return flat, lengths


# ---------------------------------------------------------------------------- worker processes
_WORKER: _TokenizeBatch | None = None


def _init_worker(tokenizer: Any) -> None:
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler: terminate() stops us
    if sys.platform.startswith("linux"):  # a parent killed outright (SIGKILL) takes its workers with it
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = _TokenizeBatch(tokenizer)


def _work(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _WORKER is not None
    return _WORKER(texts)


class _Done:
    """A result computed in this process, with ``AsyncResult``'s ``get``."""

    def __init__(self, value: tuple[np.ndarray, np.ndarray]) -> None:
        self.value = value

    def get(self) -> tuple[np.ndarray, np.ndarray]:
        return self.value


class _TokenizerPool:
    """Tokenize batches of texts in order, in ``num_proc`` processes (see the module docstring).

    ``map(items, texts_of, consume)`` submits every item's texts (``texts_of(item)``, ``None`` for
    nothing to tokenize), keeps at most ``2 * num_proc + 1`` batches in flight, and calls
    ``consume(item, result)`` in the items' order. Use as a context manager: workers are stopped
    on leaving it (terminated when an exception is leaving).
    """

    def __init__(self, tokenizer: Any, num_proc: int) -> None:
        self.tokenizer = tokenizer
        self.num_proc = num_proc
        self.local = _TokenizeBatch(tokenizer)
        self.pool: Any = None
        self.started = False  # whether workers were started (one batch alone is tokenized here)

    def __enter__(self) -> _TokenizerPool:
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if self.pool is None:
            return
        if exc_type is None:
            self.pool.close()
        else:
            self.pool.terminate()
        self.pool.join()
        self.pool = None

    def _start(self) -> None:
        import multiprocessing as mp

        method = "fork" if sys.platform.startswith("linux") else "spawn"
        ctx = mp.get_context(method)
        key = "TOKENIZERS_PARALLELISM"
        before = os.environ.get(key)
        os.environ[key] = "false"  # before the fork: tokenizers then neither warns nor threads in the child
        try:
            self.pool = ctx.Pool(self.num_proc, initializer=_init_worker, initargs=(self.tokenizer,))
        finally:
            if before is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = before
        self.started = True

    def map(
        self,
        items: Any,
        texts_of: Callable[[Any], list[str] | None],
        consume: Callable[[Any, tuple[np.ndarray, np.ndarray] | None], None],
    ) -> None:
        pending: collections.deque[tuple[Any, Any]] = collections.deque()
        limit = 2 * self.num_proc + 1
        submitted = 0
        for item in items:
            texts = texts_of(item)
            if texts is None:
                handle: Any = None
            elif self.num_proc == 1 or submitted == 0:
                handle = _Done(self.local(texts))  # the first batch here: one batch needs no workers
                submitted += 1
            else:
                if self.pool is None:
                    self._start()
                handle = self.pool.apply_async(_work, (texts,))
                submitted += 1
            pending.append((item, handle))
            while len(pending) > limit or (pending and (pending[0][1] is None or isinstance(pending[0][1], _Done))):
                done, h = pending.popleft()
                consume(done, None if h is None else h.get())
        while pending:
            done, h = pending.popleft()
            consume(done, None if h is None else h.get())
