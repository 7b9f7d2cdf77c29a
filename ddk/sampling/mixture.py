"""``MixtureSampler``: domain weights -> exact-count, resumable, rank-sliced batches of indices.

The sampler runs in the main process as a ``batch_sampler`` of a map-style dataset that
concatenates the per-domain datasets (global index = offset of the domain + index inside it).
Everything it yields is a pure function of ``(seed, domain_sizes, global_batch_size, mode,
weight log)``; all randomness comes from ``np.random.default_rng([seed, tag, a, b])`` keys:

* tag 0: ``rng([seed, 0, domain, pass]).permutation(size)`` is the order of one pass over a domain;
* tag 1: ``rng([seed, 1, batch]).permutation(B)`` shuffles a global batch;
* tag 2: ``rng([seed, 2, batch]).random(B)`` draws the slot domains in ``mode="iid"``.

The state is O(D + number of weight changes): per-domain ``(pass, position)``, the rounding carry
and the weight log. No per-sample state is kept (only a cache of the current pass's permutation
per domain, which is recomputed on demand).
"""

from __future__ import annotations

import bisect
import logging
import math
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal, TypeGuard, overload

import numpy as np
import torch

__all__ = ["MixtureSampler"]

_NAME = "MixtureSampler"
_MODES = ("exact", "iid")
_STATE_VERSION = 1
_SNAPSHOTS = 64  # batch boundaries kept for ``state_dict(at_batch=k)``
_TAG_PASS, _TAG_SHUFFLE, _TAG_IID = 0, 1, 2
_MAX_COUNT = 2**53  # counts read back (batches, samples, passes): exact as float64 and far from int64 overflow

logger = logging.getLogger(__name__)

WeightsLike = Sequence[float] | torch.Tensor | np.ndarray


def _is_int(x: object) -> TypeGuard[int | np.integer[Any]]:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _fmt_list(xs: Iterable[Any], limit: int = 8) -> str:
    xs = list(xs)
    body = ", ".join(repr(float(x)) if isinstance(x, (float, np.floating)) else repr(x) for x in xs[:limit])
    return f"[{body}{', ...' if len(xs) > limit else ''}]"


def _validate_weights(fn: str, weights: object, num_domains: int, names: Sequence[str]) -> np.ndarray:
    """Return ``weights`` as a float64 ``(D,)`` array normalized by its sum, or raise."""
    if isinstance(weights, torch.Tensor):
        arr = weights.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            arr = np.asarray(weights, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"{fn}: weights must be a sequence of {num_domains} numbers; got {weights!r}.") from None
    if arr.ndim != 1 or arr.shape[0] != num_domains:
        raise ValueError(
            f"{fn}: weights must have one entry per domain (length {num_domains}); got shape {tuple(arr.shape)}."
        )
    bad = ~np.isfinite(arr)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{fn}: weights must be finite; got {float(arr[i])!r} for domain {names[i]!r} (index {i}).")
    neg = arr < 0
    if neg.any():
        i = int(np.flatnonzero(neg)[0])
        raise ValueError(
            f"{fn}: weights must be non-negative; got {float(arr[i])!r} for domain {names[i]!r} (index {i})."
        )
    total = float(arr.sum())
    if not total > 0:
        raise ValueError(f"{fn}: weights must have a positive sum (at least one domain > 0); got all zeros.")
    if not math.isfinite(total):
        raise ValueError(f"{fn}: weights must have a finite sum; got {total!r}.")
    return arr / total


class MixtureSampler:
    """Batch sampler over a mixture of domains with exact per-batch domain counts.

    Each global batch of ``B = global_batch_size`` indices takes ``count_i`` samples from domain
    ``i``. In ``mode="exact"``, ``target_i = B * w_i + carry_i`` (float64) and the counts are the
    largest-remainder apportionment of the targets (floor everything, give the remaining units to
    the largest fractional parts, ties to the lower domain index), so every batch holds ``floor``
    or ``ceil`` of the target and ``carry_i = target_i - count_i`` lies in ``(-1, 1)``: the
    cumulative count of every domain stays within one sample of ``sum_b B * w_i^(b)``.
    Zero-weight domains are never drawn; their carry is forgiven and spread evenly over the targets
    of the positive-weight domains. (A count is never negative: a target in ``(-1, 0)`` gets its
    ceil, 0. In the rare case where weights drop to nearly zero right after their domains were
    rounded up, or zero weights forgive a large carry, and no floor/ceil choice of non-negative
    counts sums to ``B``, the excess is taken from the domains with the smallest fractional parts
    and the carry briefly leaves ``(-1, 1)``; this cannot happen while all weights are positive
    with ``B * w_i >= 1``.) In ``mode="iid"`` each slot draws its domain i.i.d. from the weights.

    Inside a domain, samples follow pass ``k``'s permutation
    ``np.random.default_rng([seed, 0, i, k]).permutation(size_i)`` without replacement; an
    exhausted domain starts the next pass (cyclic reuse with a fresh permutation), logged at INFO
    level on the ``ddk.sampling.mixture`` logger by rank 0, once per wrap (once per global batch
    for a domain smaller than its share of a batch, which wraps several times in it). Each global
    batch is shuffled with ``default_rng([seed, 1, batch_index])`` and rank ``r`` gets
    ``batch[r::world_size]``. Global batches do not depend on ``rank`` or ``world_size``.

    Args:
        domain_sizes: ``(D,)`` number of examples of each domain, all ``>= 1``.
        global_batch_size: ``B``, indices per global batch (all ranks together), ``>= 1``.
        weights: ``(D,)`` non-negative domain weights (any sequence, ``np.ndarray`` or tensor);
            normalized by their sum in float64. ``None`` means uniform.
        seed: non-negative seed of every random choice.
        rank: this process's rank, ``0 <= rank < world_size``.
        world_size: number of ranks; must divide ``global_batch_size``.
        mode: ``"exact"`` (apportioned counts with carry) or ``"iid"`` (i.i.d. slot domains).
        num_batches: total number of global batches iteration stops after (counted from the
            start of the stream, so a resumed sampler yields only the rest); ``None`` = infinite.
            It bounds ``__iter__`` and ``len()`` only, not ``next_global_batch``.
        domain_names: ``(D,)`` unique names used in messages; default ``"domain0"``, ...

    Raises:
        ValueError: on any invalid argument, before anything is sampled.
        TypeError: on arguments of the wrong type.

    Examples:
        >>> import numpy as np
        >>> from ddk.sampling import MixtureSampler
        >>> s = MixtureSampler([3, 5], global_batch_size=4, weights=[0.25, 0.75], seed=0)
        >>> s.offsets
        (0, 3)
        >>> batch = s.next_global_batch()
        >>> batch.shape, batch.dtype
        ((4,), dtype('int64'))
        >>> np.bincount(s.domain_of(batch), minlength=2).tolist()
        [1, 3]
        >>> s.set_weights([1.0, 0.0])
        >>> [sorted(s.domain_of(b).tolist()) for b in (s.next_global_batch(), s.next_global_batch())]
        [[0, 0, 0, 0], [0, 0, 0, 0]]
        >>> s.cumulative_counts().tolist(), s.passes().tolist()
        ([9, 3], [3, 0])
        >>> s.weight_log
        [(0, (0.25, 0.75)), (1, (1.0, 0.0))]
        >>> resumed = MixtureSampler.from_state_dict(s.state_dict(), rank=1, world_size=2)
        >>> np.array_equal(resumed.next_global_batch(), s.next_global_batch())
        True
    """

    def __init__(
        self,
        domain_sizes: Sequence[int],
        global_batch_size: int,
        weights: WeightsLike | None = None,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        mode: Literal["exact", "iid"] = "exact",
        num_batches: int | None = None,
        domain_names: Sequence[str] | None = None,
    ) -> None:
        sizes = self._check_sizes(domain_sizes, domain_names)
        num_domains = len(sizes)
        names = self._check_names(domain_names, num_domains)
        self._check_positive_int("global_batch_size", global_batch_size)
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"{_NAME}: seed must be a non-negative int; got {seed!r}.")
        if mode not in _MODES:
            raise ValueError(f"{_NAME}: mode must be one of {_MODES}; got {mode!r}.")
        if num_batches is not None and (not _is_int(num_batches) or num_batches < 0):
            raise ValueError(f"{_NAME}: num_batches must be None or an int >= 0; got {num_batches!r}.")
        self._check_rank(_NAME, rank, world_size, int(global_batch_size))
        w = (
            np.full(num_domains, 1.0 / num_domains)
            if weights is None
            else _validate_weights(_NAME, weights, num_domains, names)
        )

        self._sizes = np.asarray(sizes, dtype=np.int64)
        self._size_list: tuple[int, ...] = tuple(sizes)
        self._offsets = np.concatenate(([0], np.cumsum(self._sizes)[:-1])).astype(np.int64)
        self._offset_list: tuple[int, ...] = tuple(int(o) for o in self._offsets)
        self._bounds = np.cumsum(self._sizes)  # end (exclusive) of each domain
        self._total = int(self._bounds[-1])
        self._names: tuple[str, ...] = names
        self._B = int(global_batch_size)
        self._seed = int(seed)
        self._mode: str = mode
        self._num_batches: int | None = None if num_batches is None else int(num_batches)
        self._rank = int(rank)
        self._world_size = int(world_size)

        # Stream state (O(D + weight changes)).
        self._batches = 0
        self._carry = np.zeros(num_domains, dtype=np.float64)
        self._pass: list[int] = [0] * num_domains  # current pass per domain (= completed passes)
        self._pos: list[int] = [0] * num_domains  # position inside the current pass, < size
        self._log_idx: list[int] = [0]
        self._log_w: list[np.ndarray] = [w]
        # Caches (not state): current pass permutation per domain (already offset), snapshots.
        self._perm_cache: list[tuple[int, np.ndarray] | None] = [None] * num_domains
        self._snapshots: deque[tuple[int, np.ndarray, list[int], list[int]]] = deque(maxlen=_SNAPSHOTS)
        self._cur_entry = -1
        self._cur_meta: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None
        self._bounds_on: dict[torch.device, torch.Tensor] = {}  # ``_bounds`` per device, for domain_of

    # ------------------------------------------------------------------ validation helpers
    @staticmethod
    def _check_positive_int(arg: str, value: object) -> None:
        if not _is_int(value) or value < 1:
            raise ValueError(f"{_NAME}: {arg} must be a positive int; got {value!r}.")

    @staticmethod
    def _check_sizes(domain_sizes: Sequence[int], domain_names: Sequence[str] | None) -> list[int]:
        if isinstance(domain_sizes, (str, bytes)) or not hasattr(domain_sizes, "__len__"):
            raise TypeError(f"{_NAME}: domain_sizes must be a sequence of ints; got {domain_sizes!r}.")
        sizes = list(domain_sizes.tolist() if isinstance(domain_sizes, (np.ndarray, torch.Tensor)) else domain_sizes)
        if len(sizes) == 0:
            raise ValueError(f"{_NAME}: domain_sizes must name at least one domain; got [].")
        for i, s in enumerate(sizes):
            if not _is_int(s):
                raise TypeError(f"{_NAME}: domain_sizes must be ints; got {s!r} at index {i}.")
            if s < 1:
                name = domain_names[i] if domain_names is not None and i < len(domain_names) else f"domain{i}"
                raise ValueError(
                    f"{_NAME}: domain_sizes must be >= 1 for every domain; got {s!r} for domain "
                    f"{name!r} (index {i}); drop the empty domain or give it data."
                )
        return [int(s) for s in sizes]

    @staticmethod
    def _check_names(domain_names: Sequence[str] | None, num_domains: int) -> tuple[str, ...]:
        if domain_names is None:
            return tuple(f"domain{i}" for i in range(num_domains))
        names = list(domain_names)
        if len(names) != num_domains or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{_NAME}: domain_names must be {num_domains} strings (one per domain); got {names!r}.")
        if len(set(names)) != len(names):
            raise ValueError(f"{_NAME}: domain_names must be unique; got {names!r}.")
        return tuple(names)

    @staticmethod
    def _check_rank(fn: str, rank: object, world_size: object, batch_size: int) -> None:
        if not _is_int(world_size) or world_size < 1:
            raise ValueError(f"{fn}: world_size must be a positive int; got {world_size!r}.")
        if not _is_int(rank) or not 0 <= rank < world_size:
            raise ValueError(f"{fn}: rank must be an int in [0, world_size={world_size}); got {rank!r}.")
        if batch_size % world_size != 0:
            raise ValueError(
                f"{fn}: global_batch_size must be divisible by world_size={world_size}; "
                f"got {batch_size}; pick a multiple of {world_size}."
            )

    # ------------------------------------------------------------------ properties
    @property
    def num_domains(self) -> int:
        """Number of domains ``D``."""
        return len(self._size_list)

    @property
    def domain_sizes(self) -> tuple[int, ...]:
        """``(D,)`` examples per domain."""
        return self._size_list

    @property
    def domain_names(self) -> tuple[str, ...]:
        """``(D,)`` domain names."""
        return self._names

    @property
    def offsets(self) -> tuple[int, ...]:
        """``(D,)`` global index of each domain's first example (exclusive cumulative sizes)."""
        return self._offset_list

    @property
    def global_batch_size(self) -> int:
        """``B``, indices per global batch over all ranks."""
        return self._B

    @property
    def seed(self) -> int:
        """Seed of every random choice."""
        return self._seed

    @property
    def mode(self) -> str:
        """``"exact"`` or ``"iid"``."""
        return self._mode

    @property
    def num_batches(self) -> int | None:
        """Total global batches iteration stops after, or ``None`` (infinite)."""
        return self._num_batches

    @property
    def rank(self) -> int:
        """This process's rank."""
        return self._rank

    @property
    def world_size(self) -> int:
        """Number of ranks sharing each global batch."""
        return self._world_size

    @property
    def batches_yielded(self) -> int:
        """Global batches produced so far (including any produced before a resume)."""
        return self._batches

    @property
    def weights(self) -> tuple[float, ...]:
        """``(D,)`` latest normalized weights (those of the next new batch)."""
        return tuple(float(x) for x in self._log_w[-1])

    @property
    def weight_log(self) -> list[tuple[int, tuple[float, ...]]]:
        """Compact log ``[(first global batch index, weights), ...]``; the first index is 0."""
        return [(i, tuple(float(x) for x in w)) for i, w in zip(self._log_idx, self._log_w)]

    # ------------------------------------------------------------------ weights
    def set_weights(self, weights: WeightsLike) -> None:
        """Use ``weights`` from the first global batch not yet produced.

        Already produced batches never change. Log entries scheduled at or after that batch
        (possible after resuming with ``state_dict(at_batch=k)``) are superseded; an entry equal to
        the one before it is merged into it.

        Args:
            weights: ``(D,)`` non-negative, finite, not all zero; normalized by their sum (float64).

        Raises:
            ValueError: on invalid weights (the sampler is left unchanged).
        """
        w = _validate_weights(f"{_NAME}.set_weights", weights, self.num_domains, self._names)
        start = self._batches
        cut = bisect.bisect_left(self._log_idx, start)
        del self._log_idx[cut:], self._log_w[cut:]
        if not self._log_w or not np.array_equal(self._log_w[-1], w):
            self._log_idx.append(start)
            self._log_w.append(w)
        self._cur_meta = None

    def _weights_for(self, batch_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(normalized cumsum of w, B * w, zero-weight mask or None)`` of a global batch."""
        entry = bisect.bisect_right(self._log_idx, batch_index) - 1
        if entry != self._cur_entry or self._cur_meta is None:
            w = self._log_w[entry]
            zero = w == 0
            cdf = np.cumsum(w)
            cdf /= cdf[-1]
            self._cur_entry = entry
            self._cur_meta = (cdf, self._B * w, zero if zero.any() else None)
        return self._cur_meta

    # ------------------------------------------------------------------ sampling
    def _perm(self, domain: int, k: int) -> np.ndarray:
        cached = self._perm_cache[domain]
        if cached is not None and cached[0] == k:
            return cached[1]
        rng = np.random.default_rng([self._seed, _TAG_PASS, domain, k])
        perm = rng.permutation(self._size_list[domain])
        perm += self._offset_list[domain]
        self._perm_cache[domain] = (k, perm)
        return perm

    def _apportion(self, bw: np.ndarray, zero: np.ndarray | None) -> np.ndarray:
        """Exact-mode counts ``(D,)`` int64 from ``bw = B * w`` (float64); updates the carry."""
        target = bw + self._carry
        if zero is not None:
            positive = ~zero
            forgiven = float(self._carry[zero].sum())
            target[zero] = 0.0
            target[positive] += forgiven / int(positive.sum())
        floor = np.floor(target)
        counts = floor.astype(np.int64)
        negative = counts < 0
        any_negative = bool(negative.any())
        if any_negative:
            counts[negative] = 0  # a target in (-1, 0) gets its ceil, 0
        rem = self._B - int(counts.sum())
        if rem > 0:
            # Largest remainders first, ties to the lower index, among domains still at their floor.
            key = target - floor
            if any_negative:
                key[negative] = -np.inf
            if zero is not None:
                key[zero] = -np.inf
            order = np.argsort(-key, kind="stable")
            n_ok = len(key) if not (any_negative or zero is not None) else int(np.count_nonzero(key > -np.inf))
            counts[order[: min(rem, n_ok)]] += 1
            if rem > n_ok:  # only from float round-off; never reached in practice
                self._spread(counts, order[: max(n_ok, 1)], rem - n_ok, +1)
        elif rem < 0:
            # No floor/ceil choice of non-negative counts sums to B: take the excess from the
            # domains with the smallest fractional parts (see the class docstring).
            key = np.where(counts > 0, target - floor, np.inf)
            self._spread(counts, np.argsort(key, kind="stable"), -rem, -1)
        carry = target - counts
        if zero is not None:
            carry[zero] = 0.0
        self._carry = carry
        return counts

    @staticmethod
    def _spread(counts: np.ndarray, order: np.ndarray, units: int, sign: int) -> None:
        while units > 0:
            for i in order:
                if units == 0:
                    break
                if sign < 0 and counts[i] == 0:
                    continue
                counts[i] += sign
                units -= 1

    def _iid_counts(self, cdf: np.ndarray, batch_index: int) -> np.ndarray:
        u = np.random.default_rng([self._seed, _TAG_IID, batch_index]).random(self._B)
        slots = np.searchsorted(cdf, u, side="right")
        return np.bincount(slots, minlength=self.num_domains)

    def next_global_batch(self) -> np.ndarray:
        """Produce the next global batch (all ranks) and advance the stream.

        Returns:
            ``(B,)`` int64 global indices, shuffled; rank ``r``'s part is ``batch[r::world_size]``.
        """
        j = self._batches
        passes, positions = self._pass, self._pos
        self._snapshots.append((j, self._carry, passes.copy(), positions.copy()))  # carry is never mutated
        cdf, bw, zero = self._weights_for(j)
        if self._mode == "exact":
            counts = self._apportion(bw, zero)
        else:
            counts = self._iid_counts(cdf, j)
        out = np.empty(self._B, dtype=np.int64)
        cursor = 0
        sizes = self._size_list
        for i, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            k = passes[i]
            pos = positions[i]
            size = sizes[i]
            while n > 0:
                m = min(n, size - pos)
                out[cursor : cursor + m] = self._perm(i, k)[pos : pos + m]
                cursor += m
                n -= m
                pos += m
                if pos == size:
                    k += 1
                    pos = 0
            if k != passes[i]:
                self._log_wrap(i, passes[i], k, j)
            passes[i] = k
            positions[i] = pos
        shuffle = np.random.default_rng([self._seed, _TAG_SHUFFLE, j]).permutation(self._B)
        self._batches = j + 1
        return out[shuffle]

    def _log_wrap(self, domain: int, old_pass: int, new_pass: int, batch: int) -> None:
        """One INFO record per domain per global batch in which the domain was exhausted (rank 0 only)."""
        if self._rank == 0 and logger.isEnabledFor(logging.INFO):
            wraps = new_pass - old_pass
            logger.info(
                "%s: domain %r (%d examples) exhausted in global batch %d; reusing it cyclically from pass %d "
                "with a fresh permutation%s.",
                _NAME,
                self._names[domain],
                self._size_list[domain],
                batch,
                new_pass,
                "" if wraps == 1 else f" ({wraps} passes completed in this batch)",
            )

    def __iter__(self) -> Iterator[list[int]]:
        """Yield this rank's ``list[int]`` of global indices per global batch.

        Continues from the current position; stops once ``batches_yielded == num_batches`` (never
        when ``num_batches`` is ``None``).
        """
        while self._num_batches is None or self._batches < self._num_batches:
            yield self.next_global_batch()[self._rank :: self._world_size].tolist()

    def __len__(self) -> int:
        """Remaining global batches (``num_batches - batches_yielded``).

        Raises:
            TypeError: when ``num_batches`` is ``None`` (the stream is infinite).
        """
        if self._num_batches is None:
            raise TypeError(
                f"{_NAME}: num_batches must be set to take len() of the sampler; got None "
                "(the stream is infinite); pass num_batches=... to make it finite."
            )
        return max(self._num_batches - self._batches, 0)

    # ------------------------------------------------------------------ queries
    @overload
    def domain_of(self, indices: torch.Tensor) -> torch.Tensor: ...
    @overload
    def domain_of(self, indices: int) -> int: ...
    @overload
    def domain_of(self, indices: Sequence[int] | np.ndarray) -> np.ndarray: ...

    def domain_of(self, indices: Any) -> Any:
        """Domain id of global indices.

        Args:
            indices: global indices: an int, a sequence or ``np.ndarray`` of ints (any shape), or
                an integer ``torch.Tensor`` on any device.

        Returns:
            Same shape as ``indices``: an ``int`` for an int, ``np.ndarray`` int64 for sequences
            and arrays, ``torch.long`` tensor on the input's device for tensors.

        Raises:
            ValueError: an int/array index outside ``[0, sum(domain_sizes))`` (tensors are not
                range-checked, to avoid a host sync).
        """
        if isinstance(indices, torch.Tensor):
            # Cached per device: building it per call would be a blocking host-to-device copy
            # in every training step.
            bounds = self._bounds_on.get(indices.device)
            if bounds is None:
                bounds = torch.as_tensor(self._bounds, dtype=torch.long).to(indices.device)
                self._bounds_on[indices.device] = bounds
            return torch.searchsorted(bounds, indices.to(torch.long), right=True)
        scalar = _is_int(indices)
        arr = np.asarray(indices)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"{_NAME}.domain_of: indices must be integers; got dtype {arr.dtype}.")
        arr = arr.astype(np.int64, copy=False)
        if arr.size and (arr.min() < 0 or arr.max() >= self._total):
            bad = arr[(arr < 0) | (arr >= self._total)].flat[0]
            raise ValueError(f"{_NAME}.domain_of: indices must be in [0, {self._total}); got {int(bad)}.")
        dom = np.searchsorted(self._bounds, arr, side="right").astype(np.int64)
        return int(dom) if scalar else dom

    def cumulative_counts(self) -> np.ndarray:
        """``(D,)`` int64 samples drawn from each domain so far, over all ranks."""
        return np.asarray(self._pass, dtype=np.int64) * self._sizes + np.asarray(self._pos, dtype=np.int64)

    def passes(self) -> np.ndarray:
        """``(D,)`` int64 completed passes over each domain."""
        return np.asarray(self._pass, dtype=np.int64)

    # ------------------------------------------------------------------ state
    def state_dict(self, at_batch: int | None = None) -> dict[str, Any]:
        """JSON-serialisable state, O(D + number of weight changes).

        Args:
            at_batch: produce the state as it was right before global batch ``at_batch``
                (``batches_yielded - 64 <= at_batch <= batches_yielded``), e.g. the first batch a
                training loop has not consumed yet while its DataLoader prefetches ahead. The whole
                weight log is kept, so a resumed sampler reproduces the batches already produced
                after ``at_batch`` and then applies later weight changes where they were set.
                ``None`` means ``batches_yielded``.

        Returns:
            A dict of plain ints, floats (exact through JSON), strings, lists and ``None``:
            ``version``; ``config`` (``domain_sizes``, ``global_batch_size``, ``seed``, ``mode``,
            ``domain_names``, ``num_batches``); ``batches_yielded``; ``carry`` ``(D,)`` floats;
            ``passes`` and ``positions`` ``(D,)`` ints (current pass and position inside it);
            ``weights`` ``(D,)`` (latest); ``weight_log`` ``[[first batch index, (D,) weights], ...]``.

        Raises:
            ValueError: ``at_batch`` is outside the kept window.
        """
        if at_batch is None or at_batch == self._batches:
            j, carry, passes, pos = self._batches, self._carry, self._pass, self._pos
        else:
            first = self._snapshots[0][0] if self._snapshots else self._batches
            if not _is_int(at_batch) or not first <= at_batch <= self._batches:
                raise ValueError(
                    f"{_NAME}.state_dict: at_batch must be an int in [{first}, {self._batches}] "
                    f"(the last {_SNAPSHOTS} batch boundaries kept); got {at_batch!r}."
                )
            j, carry, passes, pos = self._snapshots[int(at_batch) - first]
            assert j == at_batch  # internal invariant of the snapshot ring
        return {
            "version": _STATE_VERSION,
            "config": {
                "domain_sizes": list(self._size_list),
                "global_batch_size": self._B,
                "seed": self._seed,
                "mode": self._mode,
                "domain_names": list(self._names),
                "num_batches": self._num_batches,
            },
            "batches_yielded": int(j),
            "carry": [float(x) for x in carry],
            "passes": [int(x) for x in passes],
            "positions": [int(x) for x in pos],
            "weights": list(self.weights),
            "weight_log": [[i, [float(x) for x in w]] for i, w in zip(self._log_idx, self._log_w)],
        }

    def load_state_dict(self, state: dict[str, Any], *, rank: int | None = None, world_size: int | None = None) -> None:
        """Restore a ``state_dict()``; the continuation is then exactly the saved sampler's.

        The config (sizes, batch size, seed, mode, names) must match this sampler's; this
        sampler's ``num_batches`` is kept. ``rank``/``world_size`` may change (the global batches
        do not depend on them).

        Args:
            state: a dict from ``state_dict()`` (possibly after a JSON round trip).
            rank: new rank, default: keep.
            world_size: new world size, default: keep.

        Raises:
            ValueError: a missing key or a field that does not match or is invalid (named); the
                sampler is left unchanged.
        """
        self._commit_state(self.check_state_dict(state, rank=rank, world_size=world_size))

    def check_state_dict(
        self, state: dict[str, Any], *, rank: int | None = None, world_size: int | None = None, fn: str | None = None
    ) -> dict[str, Any]:
        """Validate a ``state_dict()`` for this sampler without changing anything; return it parsed.

        Every field is checked for type and range: ``carry`` numbers in ``[-B, B]``, ``passes`` and
        ``positions`` ints consistent with ``batches_yielded`` (``sum(passes * sizes + positions)
        == batches_yielded * B``, which also bounds the counts), normalised weights. The result is
        what ``load_state_dict`` commits; ``DDKController.load_state_dict`` checks every part
        first, so a rejected state changes nothing.

        Raises:
            ValueError: the first invalid field, named.
        """
        fn = fn or f"{_NAME}.load_state_dict"
        if not isinstance(state, dict):
            raise TypeError(f"{fn}: state must be a dict from state_dict(); got {type(state).__name__}.")
        new_rank = self._rank if rank is None else rank
        new_ws = self._world_size if world_size is None else world_size
        self._check_rank(fn, new_rank, new_ws, self._B)
        required = ("version", "config", "batches_yielded", "carry", "passes", "positions", "weights", "weight_log")
        for key in required:
            if key not in state:
                raise ValueError(f"{fn}: state must contain {key!r}; got keys {sorted(state)!r}.")
        if state["version"] != _STATE_VERSION:
            raise ValueError(f"{fn}: version must be {_STATE_VERSION}; got {state['version']!r}.")
        config = state["config"]
        if not isinstance(config, dict):
            raise ValueError(f"{fn}: config must be a dict; got {config!r}.")
        mine = {
            "domain_sizes": list(self._size_list),
            "global_batch_size": self._B,
            "seed": self._seed,
            "mode": self._mode,
            "domain_names": list(self._names),
        }
        for key, value in mine.items():
            if key not in config:
                raise ValueError(f"{fn}: config must contain {key!r}; got keys {sorted(config)!r}.")
            got = list(config[key]) if isinstance(config[key], (list, tuple)) else config[key]
            if got != value:
                raise ValueError(f"{fn}: config.{key} must match this sampler's {value!r}; got {config[key]!r}.")
        D = self.num_domains
        batches = state["batches_yielded"]
        if not _is_int(batches) or batches < 0:
            raise ValueError(f"{fn}: batches_yielded must be an int >= 0; got {batches!r}.")
        if int(batches) * self._B > _MAX_COUNT:
            raise ValueError(
                f"{fn}: batches_yielded * global_batch_size (the samples drawn) must be at most 2**53 (exact as "
                f"a float64 and an int64); got {batches!r} * {self._B}."
            )

        def vector(key: str, kind: type) -> list[Any]:
            value = state[key]
            if not isinstance(value, (list, tuple)) or len(value) != D:
                raise ValueError(f"{fn}: {key} must be a list of {D} numbers (one per domain); got {value!r}.")
            if kind is int and not all(_is_int(x) for x in value):
                raise ValueError(f"{fn}: {key} must hold ints; got {value!r}.")
            if not all(_is_number(x) for x in value):
                raise ValueError(f"{fn}: {key} must hold numbers; got {value!r}.")
            if kind is float and not np.isfinite(np.asarray(value, dtype=np.float64)).all():
                raise ValueError(f"{fn}: {key} must be finite; got {value!r}.")
            return [int(x) for x in value] if kind is int else [float(x) for x in value]

        carry = np.asarray(vector("carry", float), dtype=np.float64)
        if (np.abs(carry) > self._B).any():
            raise ValueError(
                f"{fn}: carry must be in [-{self._B}, {self._B}] per domain (the rounding carry of the "
                f"apportionment, normally in (-1, 1)); got {state['carry']!r}."
            )
        passes = vector("passes", int)
        positions = vector("positions", int)
        if any(not 0 <= x <= _MAX_COUNT for x in passes):
            raise ValueError(f"{fn}: passes must be ints in [0, 2**53]; got {state['passes']!r}.")
        if any(not 0 <= x < n for x, n in zip(positions, self._size_list)):
            raise ValueError(
                f"{fn}: positions must be in [0, domain size) per domain; got {state['positions']!r} "
                f"for domain_sizes {list(self._size_list)!r}."
            )
        drawn = sum(k * n + x for k, n, x in zip(passes, self._size_list, positions))  # Python ints: no overflow
        if drawn != int(batches) * self._B:
            raise ValueError(
                f"{fn}: passes and positions must account for batches_yielded * global_batch_size = "
                f"{int(batches) * self._B} samples (sum of passes * domain_size + positions); got {drawn} from passes "
                f"{state['passes']!r} and positions {state['positions']!r}."
            )
        log = state["weight_log"]
        if not isinstance(log, (list, tuple)) or not log:
            raise ValueError(f"{fn}: weight_log must be a non-empty list of [batch_index, weights]; got {log!r}.")
        log_idx: list[int] = []
        log_w: list[np.ndarray] = []
        for entry in log:
            if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not _is_int(entry[0]):
                raise ValueError(f"{fn}: weight_log entries must be [batch_index, weights]; got {entry!r}.")
            idx, w_raw = int(entry[0]), entry[1]
            if (not log_idx and idx != 0) or (log_idx and idx <= log_idx[-1]):
                raise ValueError(f"{fn}: weight_log indices must start at 0 and increase; got {[e[0] for e in log]!r}.")
            try:
                if not isinstance(w_raw, (list, tuple)) or not all(_is_number(x) for x in w_raw):
                    raise TypeError
                w = np.asarray(w_raw, dtype=np.float64)
            except (TypeError, ValueError):
                raise ValueError(f"{fn}: weight_log weights must be lists of numbers; got {w_raw!r}.") from None
            if w.shape != (D,) or not np.isfinite(w).all() or (w < 0).any() or abs(float(w.sum()) - 1.0) > 1e-9:
                raise ValueError(
                    f"{fn}: weight_log weights must be {D} normalized non-negative numbers; got {w_raw!r}."
                )
            log_idx.append(idx)
            log_w.append(w)
        if list(state["weights"]) != [float(x) for x in log_w[-1]]:
            raise ValueError(
                f"{fn}: weights must equal the last weight_log entry {_fmt_list(log_w[-1])}; "
                f"got {_fmt_list(state['weights'])}."
            )

        return {
            "rank": int(new_rank),
            "world_size": int(new_ws),
            "batches": int(batches),
            "carry": carry,
            "passes": passes,
            "positions": positions,
            "log_idx": log_idx,
            "log_w": log_w,
        }

    def _commit_state(self, parsed: dict[str, Any]) -> None:
        """Apply a state parsed by :meth:`check_state_dict` (cannot fail)."""
        self._rank, self._world_size = parsed["rank"], parsed["world_size"]
        self._batches = parsed["batches"]
        self._carry = parsed["carry"]
        self._pass = list(parsed["passes"])
        self._pos = list(parsed["positions"])
        self._log_idx, self._log_w = parsed["log_idx"], parsed["log_w"]
        self._cur_meta = None
        self._snapshots.clear()

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], *, rank: int = 0, world_size: int = 1) -> MixtureSampler:
        """Build a sampler from a ``state_dict()`` (config and ``num_batches`` included).

        Args:
            state: a dict from ``state_dict()``.
            rank: this process's rank.
            world_size: number of ranks.

        Returns:
            A sampler whose continuation equals the saved sampler's.

        Raises:
            ValueError: a missing or invalid field (named).
        """
        fn = f"{_NAME}.from_state_dict"
        if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
            raise ValueError(f"{fn}: state must be a dict from state_dict() with a 'config' dict; got {state!r}.")
        config = state["config"]
        for key in ("domain_sizes", "global_batch_size", "seed", "mode", "domain_names", "num_batches"):
            if key not in config:
                raise ValueError(f"{fn}: config must contain {key!r}; got keys {sorted(config)!r}.")
        sampler = cls(
            config["domain_sizes"],
            config["global_batch_size"],
            seed=config["seed"],
            rank=rank,
            world_size=world_size,
            mode=config["mode"],
            num_batches=config["num_batches"],
            domain_names=config["domain_names"],
        )
        sampler.load_state_dict(state)
        return sampler

    def __repr__(self) -> str:
        return (
            f"{_NAME}(domain_sizes={list(self._size_list)}, global_batch_size={self._B}, "
            f"weights={_fmt_list(self.weights)}, seed={self._seed}, rank={self._rank}, "
            f"world_size={self._world_size}, mode={self._mode!r}, num_batches={self._num_batches}, "
            f"batches_yielded={self._batches})"
        )
