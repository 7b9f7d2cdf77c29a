"""``DiscrepancyEstimator``: per-domain student/teacher cross-entropy -> ``DomainDiscrepancy``.

The paper's discrepancy is the per-domain perplexity ratio ``ppl_S / ppl_T = exp(CE_S - CE_T)``
with token-weighted mean CEs over each domain's validation set. The teacher is frozen, so its CE
is computed once and cached. An online mode accumulates the student's per-domain CE from the
training batches' ``KDLossOutput`` instead of running validation passes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ddk.distributed import all_reduce_sum_, collective_device, is_fsdp, is_fsdp_root, rank_world, unsharded
from ddk.zero3 import is_zero3

LossFn = Callable[[nn.Module, Mapping[str, Any]], "tuple[torch.Tensor, torch.Tensor]"]


def _as_vector(fn: str, name: str, value: Any, dtype: torch.dtype, length: int | None = None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value.detach().to(device="cpu", dtype=dtype)
    else:
        try:
            t = torch.as_tensor(np.asarray(value, dtype=np.float64)).to(dtype)
        except (TypeError, ValueError):
            raise TypeError(
                f"{fn}: {name} must be a 1-D sequence or tensor of numbers; got {type(value).__name__}."
            ) from None
    if t.dim() != 1 or (length is not None and t.shape[0] != length):
        want = f"({length},)" if length is not None else "1-D"
        raise ValueError(f"{fn}: {name} must have shape {want}; got {tuple(t.shape)}.")
    return t.clone()


@dataclass(frozen=True, eq=False)
class DomainDiscrepancy:
    """Per-domain student and teacher CE, and their perplexity ratio.

    Attributes:
        student_ce: ``(D,)`` float64, token-weighted mean CE of the student (nats/token).
        teacher_ce: ``(D,)`` float64, same for the teacher.
        tokens: ``(D,)`` int64, number of tokens the student CE was averaged over.
        domain_names: the D domain names, in weight order.

    Lists and arrays are accepted and converted to CPU tensors of the dtypes above. Instances
    compare by identity (tensor fields have no single truth value); compare ``to_dict()``.
    """

    student_ce: torch.Tensor
    teacher_ce: torch.Tensor
    tokens: torch.Tensor
    domain_names: tuple[str, ...]

    def __post_init__(self) -> None:
        fn = "DomainDiscrepancy"
        names = tuple(self.domain_names)
        d = len(names)
        object.__setattr__(self, "domain_names", names)
        object.__setattr__(self, "student_ce", _as_vector(fn, "student_ce", self.student_ce, torch.float64, d))
        object.__setattr__(self, "teacher_ce", _as_vector(fn, "teacher_ce", self.teacher_ce, torch.float64, d))
        object.__setattr__(self, "tokens", _as_vector(fn, "tokens", self.tokens, torch.int64, d))

    @property
    def num_domains(self) -> int:
        """D."""
        return len(self.domain_names)

    @property
    def gap(self) -> torch.Tensor:
        """``(D,)`` float64 ``student_ce - teacher_ce`` (log of the perplexity ratio)."""
        return self.student_ce - self.teacher_ce

    @property
    def ratio(self) -> torch.Tensor:
        """``(D,)`` float64 ``ppl_S / ppl_T = exp(student_ce - teacher_ce)``: the input of Eq. 1/2."""
        return torch.exp(self.gap)

    @property
    def student_ppl(self) -> torch.Tensor:
        """``(D,)`` float64 ``exp(student_ce)``."""
        return torch.exp(self.student_ce)

    @property
    def teacher_ppl(self) -> torch.Tensor:
        """``(D,)`` float64 ``exp(teacher_ce)``."""
        return torch.exp(self.teacher_ce)

    def to_dict(self) -> dict[str, list[Any]]:
        """Plain lists (JSON-serialisable): names, CEs, tokens, gap and ratio."""
        return {
            "domain_names": list(self.domain_names),
            "student_ce": self.student_ce.tolist(),
            "teacher_ce": self.teacher_ce.tolist(),
            "tokens": self.tokens.tolist(),
            "gap": self.gap.tolist(),
            "ratio": self.ratio.tolist(),
        }


def causal_lm_ce_sum(model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token CE of a causal LM on one batch (the default ``loss_fn``).

    Calls ``model(input_ids=..., attention_mask=...)`` (``attention_mask`` only when the batch has
    one) and uses ``out.logits`` if present, else ``out`` itself (a tensor). Logits at position t
    predict the label at t + 1 (the shift is done here, as in Hugging Face models; labels are
    given unshifted).

    Args:
        model: returns logits ``(B, L, V)`` (any float dtype) or an object with ``.logits``.
        batch: dict with ``"input_ids"`` ``(B, L)`` int64, optional ``"attention_mask"``
            ``(B, L)`` (0 = padding) and optional ``"labels"`` ``(B, L)`` int64 with -100 for
            ignored positions (default: ``input_ids`` with padding set to -100).

    Returns:
        ``(ce_sum, tokens)``: float64 scalar sum of per-token CE (computed in float32) and int64
        scalar count of predicted tokens. Both stay on the model's device (no host sync).
    """
    fn = "causal_lm_ce_sum"
    if not isinstance(batch, Mapping) or not isinstance(batch.get("input_ids"), torch.Tensor):
        got = type(batch).__name__ if not isinstance(batch, Mapping) else f"keys {sorted(batch)}"
        raise TypeError(
            f"{fn}: batch must be a dict with an 'input_ids' tensor (B, L) (collate examples into batches); got {got}."
        )
    input_ids = batch["input_ids"]
    if input_ids.dim() != 2:
        raise ValueError(f"{fn}: batch['input_ids'] must have shape (B, L); got {tuple(input_ids.shape)}.")
    attention_mask = batch.get("attention_mask")
    labels = batch.get("labels")
    if labels is None:
        labels = input_ids.clone()
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask == 0, -100)
    elif labels.shape != input_ids.shape:
        raise ValueError(
            f"{fn}: batch['labels'] must have the shape of input_ids {tuple(input_ids.shape)}; got {tuple(labels.shape)}."
        )
    if attention_mask is not None:
        out = model(input_ids=input_ids, attention_mask=attention_mask)
    else:
        out = model(input_ids=input_ids)
    if isinstance(out, torch.Tensor):
        logits = out
    elif getattr(out, "logits", None) is not None:
        logits = out.logits
    elif isinstance(out, Mapping) and "logits" in out:
        logits = out["logits"]
    else:
        raise TypeError(f"{fn}: model output must be a logits tensor or have .logits; got {type(out).__name__}.")
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"{fn}: logits must have shape (B, L, V) with (B, L)={tuple(input_ids.shape)}; got {tuple(logits.shape)}."
        )
    shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1).to(device=shift_logits.device, dtype=torch.long)
    ce = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="none")
    return ce.double().sum(), (shift_labels != -100).sum()


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


class DiscrepancyEstimator:
    """Per-domain student/teacher CE over held-out data, and the ratios DDK samples by.

    Under ``torch.distributed`` (an initialised default group), every rank must call
    ``compute_teacher``/``estimate``/``estimate_online`` together: rank r evaluates the batches
    with ``index % world_size == r`` of every domain, then the fixed-shape ``(D, 2)`` float64
    ``(ce_sum, tokens)`` tensor is all-reduced, so uneven shards cannot deadlock. A model sharded
    with FSDP2 (``fully_shard``) is unsharded for the whole pass (``ddk.distributed.
    unsharded``), so its forwards need no collective either; a frozen one (every parameter with
    ``requires_grad=False``: a sharded teacher) stays sharded, and every rank runs as many
    forwards as rank 0 (the missing ones on a spare batch of the domain, their result dropped), so
    the per-forward gathers pair up. Do not pass a DDP wrapper (its
    forward may broadcast buffers): pass the module it wraps (``ddp.module``).

    Online mode: ``observe(KDLossOutput)`` after each training step accumulates the per-domain CE
    sums and token counts on the device (no host sync); ``estimate_online()`` turns them into a
    ``DomainDiscrepancy``. A domain with zero observed tokens keeps its previous student CE
    estimate (from the last ``estimate`` or ``estimate_online``), or else gets the teacher CE
    (ratio 1), so it neither jumps up nor down in weight for lack of data.

    Args:
        validation: per domain a re-iterable of batches (a list of dicts or a ``DataLoader``):
            a mapping ``name -> batches`` or a sequence of them. See ``causal_lm_ce_sum`` for
            the batch format.
        domain_names: names of the domains (default: the mapping's keys, else
            ``"domain0", "domain1", ...`` like ``MixtureSampler``). With a mapping, orders its keys (same set required).
        teacher_ce: ``(D,)`` cached teacher CE (nats/token), e.g. from a previous run.
        loss_fn: ``(model, batch) -> (ce_sum float64 scalar, tokens int64 scalar)``; default
            ``causal_lm_ce_sum``.
        device: where batches are moved (default: the device of the model's first parameter).
        progress: show a tqdm progress bar (rank 0 only).

    Examples:
        >>> import torch
        >>> class TinyLM(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.emb = torch.nn.Embedding(7, 7)
        ...     def forward(self, input_ids):
        ...         return self.emb(input_ids)
        >>> model = TinyLM()
        >>> batches = [{"input_ids": torch.tensor([[1, 2, 3, 4]])}]
        >>> est = DiscrepancyEstimator({"a": batches, "b": batches}, progress=False)
        >>> teacher_ce = est.compute_teacher(model)
        >>> est.estimate(model).ratio.tolist()
        [1.0, 1.0]
    """

    def __init__(
        self,
        validation: Mapping[str, Iterable[Any]] | Sequence[Iterable[Any]],
        *,
        domain_names: Sequence[str] | None = None,
        teacher_ce: Any = None,
        loss_fn: LossFn | None = None,
        device: torch.device | str | None = None,
        progress: bool = True,
    ) -> None:
        fn = "DiscrepancyEstimator"
        if domain_names is not None:
            if isinstance(domain_names, str) or not all(isinstance(n, str) for n in domain_names):
                raise TypeError(f"{fn}: domain_names must be a sequence of str; got {domain_names!r}.")
            domain_names = list(domain_names)
            if len(set(domain_names)) != len(domain_names):
                raise ValueError(f"{fn}: domain_names must be unique; got {domain_names!r}.")
        if isinstance(validation, Mapping):
            keys = list(validation.keys())
            if not all(isinstance(k, str) for k in keys):
                raise TypeError(f"{fn}: validation keys must be domain names (str); got {keys!r}.")
            if domain_names is not None and set(domain_names) != set(keys):
                missing = sorted(set(domain_names) - set(keys))
                extra = sorted(set(keys) - set(domain_names))
                raise ValueError(
                    f"{fn}: validation must have exactly the domains in domain_names; got missing {missing}, unknown {extra}."
                )
            names = domain_names if domain_names is not None else keys
            sets = [validation[n] for n in names]
        elif isinstance(validation, Sequence) and not isinstance(validation, (str, bytes)):
            sets = list(validation)
            if domain_names is not None and len(domain_names) != len(sets):
                raise ValueError(
                    f"{fn}: domain_names must have one name per validation set ({len(sets)}); got {len(domain_names)}."
                )
            names = domain_names if domain_names is not None else [f"domain{i}" for i in range(len(sets))]
        else:
            raise TypeError(
                f"{fn}: validation must be a mapping name -> batches or a sequence of per-domain batches; "
                f"got {type(validation).__name__}."
            )
        if not sets:
            raise ValueError(f"{fn}: validation must hold at least one domain; got 0.")
        for name, s in zip(names, sets):
            if isinstance(s, (Mapping, torch.Tensor, str, bytes)) or not isinstance(s, Iterable):
                raise TypeError(
                    f"{fn}: validation[{name!r}] must be a re-iterable of batches (a list of dicts or a DataLoader); "
                    f"got {type(s).__name__}."
                )
            if iter(s) is s:
                raise TypeError(
                    f"{fn}: validation[{name!r}] must be re-iterable (a list or DataLoader), not a one-shot iterator; "
                    f"got {type(s).__name__}."
                )
            if isinstance(s, Sized) and len(s) == 0:
                raise ValueError(
                    f"{fn}: validation[{name!r}] must hold at least one batch; got an empty domain {name!r}."
                )
        self._names: tuple[str, ...] = tuple(names)
        self._sets: list[Iterable[Any]] = sets
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else causal_lm_ce_sum
        self.device = torch.device(device) if device is not None else None
        self.progress = progress
        self._teacher_ce: torch.Tensor | None = None
        if teacher_ce is not None:
            self.teacher_ce = teacher_ce
        self._last_student_ce: torch.Tensor | None = None
        self._acc: torch.Tensor | None = None  # (D, 4) float64: ce_sum, tokens, teacher_sum, teacher_tokens

    # ------------------------------------------------------------------ properties
    @property
    def domain_names(self) -> tuple[str, ...]:
        """The D domain names, in weight order."""
        return self._names

    @property
    def num_domains(self) -> int:
        """D."""
        return len(self._names)

    @property
    def has_teacher_ce(self) -> bool:
        """True once the teacher CE is computed, given or loaded."""
        return self._teacher_ce is not None

    @property
    def teacher_ce(self) -> torch.Tensor:
        """``(D,)`` float64 cached teacher CE; error if ``compute_teacher`` has not run."""
        if self._teacher_ce is None:
            raise RuntimeError(
                "DiscrepancyEstimator.teacher_ce: the teacher CE must be computed first; "
                "call estimator.compute_teacher(teacher) or pass teacher_ce=."
            )
        return self._teacher_ce.clone()

    @teacher_ce.setter
    def teacher_ce(self, value: Any) -> None:
        fn = "DiscrepancyEstimator.teacher_ce"
        t = _as_vector(fn, "teacher_ce", value, torch.float64, self.num_domains)
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise ValueError(f"{fn}: teacher_ce must be finite and >= 0 (nats per token); got {t.tolist()}.")
        self._teacher_ce = t

    # ------------------------------------------------------------------ validation passes
    def _evaluate(self, model: nn.Module, fn: str, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{fn}: model must be a torch.nn.Module; got {type(model).__name__}.")
        device = self.device if self.device is not None else _model_device(model)
        rank, world = rank_world()
        acc = torch.zeros(self.num_domains, 2, dtype=torch.float64, device=collective_device(device))
        sized = [s for s in self._sets if isinstance(s, Sized)]
        total = sum(len(s) for s in sized) if len(sized) == len(self._sets) else None
        was_training = model.training
        model.eval()
        bar = tqdm(total=total, desc=desc, disable=not self.progress or rank != 0, leave=False)
        # FSDP2: a trained model is gathered whole once, so uneven shards run no per-forward
        # collective; a frozen one (a sharded teacher, too large to gather) stays sharded and every
        # rank runs as many forwards as rank 0, the missing ones on a spare batch, result dropped.
        # ZeRO-3 (DeepSpeed): every model stays sharded, balanced so.
        frozen = not any(p.requires_grad for p in model.parameters())
        balanced = world > 1 and ((is_fsdp(model) and frozen) or is_zero3(model))
        try:
            with torch.no_grad(), contextlib.nullcontext(model) if balanced else unsharded(model):
                for d, (name, batches) in enumerate(zip(self._names, self._sets)):
                    bar.set_postfix_str(name, refresh=False)
                    seen = mine = 0
                    spare = None
                    for i, batch in enumerate(batches):
                        bar.update(1)
                        seen, spare = i + 1, batch if spare is None else spare
                        if i % world != rank:
                            continue
                        mine += 1
                        ce_sum, tokens = self.loss_fn(model, _to_device(batch, device))
                        acc[d, 0] += torch.as_tensor(ce_sum, dtype=torch.float64).to(acc.device)
                        acc[d, 1] += torch.as_tensor(tokens).to(device=acc.device, dtype=torch.float64)
                    for _ in range(-(-seen // world) - mine if balanced else 0):
                        self.loss_fn(model, _to_device(spare, device))
                # a sharded teacher keeps its root group gathered after its forward: freed, whatever loss_fn does
                if balanced and is_fsdp_root(model):
                    model.reshard()  # type: ignore[operator]
        finally:
            bar.close()
            model.train(was_training)
        all_reduce_sum_(acc)
        acc = acc.cpu()
        empty = [n for n, c in zip(self._names, acc[:, 1].tolist()) if c <= 0]
        if empty:
            raise ValueError(
                f"{fn}: every validation domain must have at least one predicted (non-ignored) token; "
                f"got none in {empty}."
            )
        return acc[:, 0] / acc[:, 1], acc[:, 1].round().to(torch.int64)

    def compute_teacher(self, teacher: nn.Module, *, force: bool = False) -> torch.Tensor:
        """Run the teacher over the validation sets once and cache its per-domain CE.

        Args:
            teacher: the frozen teacher model.
            force: recompute even if a teacher CE is already cached.

        Returns:
            ``(D,)`` float64 token-weighted mean CE per domain.
        """
        if self._teacher_ce is None or force:
            ce, _ = self._evaluate(teacher, "DiscrepancyEstimator.compute_teacher", "teacher CE")
            self._teacher_ce = ce
        return self._teacher_ce.clone()

    def estimate(self, student: nn.Module) -> DomainDiscrepancy:
        """Run the student over every domain's validation set (no grad, eval mode).

        The model's training mode is restored afterwards.

        Args:
            student: the student model.

        Returns:
            ``DomainDiscrepancy`` with the student's and the cached teacher's per-domain CE.
        """
        if self._teacher_ce is None:
            raise RuntimeError(
                "DiscrepancyEstimator.estimate: the teacher CE must be computed first; "
                "call estimator.compute_teacher(teacher) or pass teacher_ce=."
            )
        teacher = self._teacher_ce.clone()
        ce, tokens = self._evaluate(student, "DiscrepancyEstimator.estimate", "student CE")
        self._last_student_ce = ce.clone()
        return DomainDiscrepancy(ce, teacher, tokens, self._names)

    # ------------------------------------------------------------------ online mode
    def _check_domain_vector(self, fn: str, name: str, t: Any) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"{fn}: {name} must be a torch.Tensor of shape ({self.num_domains},); got {type(t).__name__}."
            )
        if t.shape != (self.num_domains,):
            raise ValueError(
                f"{fn}: {name} must have shape ({self.num_domains},) (pass num_domains={self.num_domains} "
                f"to the loss); got {tuple(t.shape)}."
            )
        return t

    def observe(self, output: Any, teacher_ce_sum: torch.Tensor | None = None) -> None:
        """Accumulate one training batch's per-domain CE (no host sync).

        Args:
            output: a ``KDLossOutput`` with ``domain_ce_sum`` ``(D,)`` float and
                ``domain_tokens`` ``(D,)`` int64.
            teacher_ce_sum: optional ``(D,)`` per-domain sums of the teacher's CE on the same
                tokens; without it the cached validation teacher CE is used.
        """
        fn = "DiscrepancyEstimator.observe"
        if not hasattr(output, "domain_ce_sum") or not hasattr(output, "domain_tokens"):
            raise TypeError(f"{fn}: output must be a KDLossOutput; got {type(output).__name__}.")
        ce = self._check_domain_vector(fn, "output.domain_ce_sum", output.domain_ce_sum)
        tok = self._check_domain_vector(fn, "output.domain_tokens", output.domain_tokens)
        if self._acc is None:
            self._acc = torch.zeros(self.num_domains, 4, dtype=torch.float64, device=ce.device)
        elif self._acc.device != ce.device:
            # e.g. sums restored on the CPU by load_state_dict: follow the loss once, instead of a
            # device-to-host copy (a sync, or a race with non_blocking) at every step.
            self._acc = self._acc.to(ce.device)
        acc = self._acc
        tok64 = tok.detach().to(device=acc.device, dtype=torch.float64)
        acc[:, 0] += ce.detach().to(dtype=torch.float64)
        acc[:, 1] += tok64
        if teacher_ce_sum is not None:
            t = self._check_domain_vector(fn, "teacher_ce_sum", teacher_ce_sum)
            acc[:, 2] += t.detach().to(device=acc.device, dtype=torch.float64)
            acc[:, 3] += tok64

    def estimate_online(self, reset: bool = True) -> DomainDiscrepancy:
        """Per-domain discrepancy from the batches observed since the last reset.

        All-reduced over ranks when distributed (every rank must call it). Teacher CE per domain:
        the observed teacher sums where given, else the cached validation teacher CE. A domain
        with zero observed tokens keeps its previous student CE estimate, else the teacher CE
        (ratio 1).

        Args:
            reset: zero the accumulators afterwards.

        Returns:
            ``DomainDiscrepancy``; ``tokens`` are the observed (all-rank) token counts.
        """
        fn = "DiscrepancyEstimator.estimate_online"
        device = self._acc.device if self._acc is not None else self.device
        red = torch.zeros(self.num_domains, 4, dtype=torch.float64, device=collective_device(device))
        if self._acc is not None:
            red += self._acc.to(red.device)
        all_reduce_sum_(red)
        red = red.cpu()
        ce_sum, tok, t_sum, t_tok = red.unbind(1)
        cached = self._teacher_ce
        if cached is None:
            missing = [n for n, c in zip(self._names, t_tok.tolist()) if c <= 0]
            if missing:
                raise RuntimeError(
                    f"{fn}: the teacher CE must be known for every domain; got none for {missing}. "
                    "Call estimator.compute_teacher(teacher) or pass teacher_ce_sum= to observe()."
                )
            cached = torch.zeros(self.num_domains, dtype=torch.float64)
        teacher = torch.where(t_tok > 0, t_sum / t_tok.clamp(min=1), cached)
        fallback = self._last_student_ce if self._last_student_ce is not None else teacher
        student = torch.where(tok > 0, ce_sum / tok.clamp(min=1), fallback)
        self._last_student_ce = student.clone()
        if reset and self._acc is not None:
            self._acc.zero_()
        return DomainDiscrepancy(student, teacher, tok.round().to(torch.int64), self._names)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: names, cached teacher CE, last student CE, online sums.

        The online sums are those of the calling rank (one host sync).
        """
        return {
            "domain_names": list(self._names),
            "teacher_ce": None if self._teacher_ce is None else self._teacher_ce.tolist(),
            "last_student_ce": None if self._last_student_ce is None else self._last_student_ce.tolist(),
            "online": None if self._acc is None else self._acc.cpu().tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict``; the domain names must match.

        Under torch.distributed with several ranks, the saved online sums (one rank's) are
        restored on rank 0 only, so they are not counted once per rank. The state is validated
        whole first (:meth:`check_state_dict`); a rejected state changes nothing.
        """
        self._commit_state(self.check_state_dict(state))

    def _commit_state(self, parsed: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]) -> None:
        """Apply a state parsed by :meth:`check_state_dict` (cannot fail)."""
        teacher, last, online = parsed
        self._teacher_ce = teacher
        self._last_student_ce = last
        if online is None:
            self._acc = None
        else:
            if rank_world()[0] != 0:
                online.zero_()
            self._acc = online.to(self.device) if self.device is not None else online

    def check_state_dict(
        self, state: dict[str, Any], fn: str = "DiscrepancyEstimator.load_state_dict"
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Validate a ``state_dict()`` without changing anything; return ``(teacher_ce, last_student_ce, online)``.

        ``teacher_ce``: ``None`` or D finite CEs >= 0; ``last_student_ce``: ``None`` or D finite
        numbers; ``online``: ``None`` or ``(D, 4)`` finite sums with token counts (columns 1 and 3) >= 0.

        Raises:
            TypeError: not a dict from ``state_dict()``.
            ValueError: the first invalid field, named.
        """
        if not isinstance(state, dict) or "domain_names" not in state:
            raise TypeError(
                f"{fn}: state must be a dict from DiscrepancyEstimator.state_dict(); got {type(state).__name__}."
            )
        names = state["domain_names"]
        if not isinstance(names, (list, tuple)) or list(names) != list(self._names):
            raise ValueError(f"{fn}: state['domain_names'] must equal {list(self._names)}; got {names!r}.")
        d = self.num_domains

        def table(key: str, shape: tuple[int, ...], nonneg_cols: tuple[int, ...] | None) -> torch.Tensor | None:
            value = state.get(key)
            if value is None:
                return None
            rows = value if len(shape) == 2 else [value]
            ok = (
                isinstance(value, (list, tuple))
                and len(value) == shape[0]
                and all(
                    isinstance(r, (list, tuple))
                    and len(r) == shape[-1]
                    and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in r)
                    for r in rows
                )
            )
            if ok and nonneg_cols is not None:
                ok = all(r[c] >= 0 for r in rows for c in (nonneg_cols or range(shape[-1])))
            if not ok:
                kind = "finite numbers" + (" >= 0" if nonneg_cols == () else "")
                raise ValueError(
                    f"{fn}: state[{key!r}] must be {'x'.join(map(str, shape))} {kind}"
                    f"{' with token counts >= 0' if nonneg_cols else ''}; got {str(value)[:200]}."
                )
            return torch.tensor(value, dtype=torch.float64)

        teacher = table("teacher_ce", (d,), ())
        last = table("last_student_ce", (d,), None)
        online = table("online", (d, 4), (1, 3))
        return teacher, last, online

    def __repr__(self) -> str:
        return f"DiscrepancyEstimator(domains={list(self._names)}, teacher_ce={'cached' if self.has_teacher_ce else 'missing'})"
