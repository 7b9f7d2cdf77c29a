"""Non-finite losses and gradients: detect them in one host sync, name the step and the domains,
then raise or skip the batch.

``NonFiniteGuard`` works in any training loop (``ddk distill`` uses it with ``--on-nonfinite``)::

    guard = NonFiniteGuard("skip", domain_names=names)
    for step, (batch, domain_ids) in enumerate(loader, 1):
        out = ddk.kd_loss(zs, zt, labels, domain_ids=domain_ids, num_domains=len(names))
        optimizer.zero_grad()
        out.loss.backward()
        if guard.check(step, out, grad_norm=grad_norm(model.parameters()), domain_ids=domain_ids,
                       tensors={"student_logits": zs, "teacher_logits": zt}):
            optimizer.step()
    print(guard.skipped_batches, guard.skipped_steps)

What is judged: the *checked values* (the loss, the gradient norm, anything passed in
``values``). A value holding NaN, +inf or -inf makes the batch non-finite. On the good path the
check costs one small reduction and one host sync (under ``torch.distributed`` also one
all-reduce of one number, so every rank takes the same decision). Only after a failure are the
``tensors`` (e.g. the logits, rows aligned with ``domain_ids``) scanned to say which tokens, and
so which domains, carried NaN/inf; failing that the per-domain sums of a ``KDLossOutput`` name
the domains; failing that, every domain present in the batch is named.

Policies: ``"raise"`` (default) raises ``NonFiniteError`` (a ``ValueError`` and a
``FloatingPointError``) with the step, the domains and what was non-finite; ``"skip"`` returns
``False`` so the caller drops the batch (no optimizer step), counts it (``skipped_batches``,
``skipped_steps``) and logs one warning per skipped batch on the ``ddk.reliability`` logger.

-inf logits: a -inf *student* logit where the teacher puts mass makes the forward KL truly
infinite; a -inf *teacher* logit is mathematically harmless, but the compiled and Triton backends
(``cpp``, ``triton``) return -inf or NaN for it (``reference`` and ``chunked`` get it right). The guard judges
results, not inputs: it does not scan logits on the good path, so -inf logits that leave the loss
and gradients finite pass, and those that do not are handled like any NaN (raised or skipped),
with the -inf count in the report and the advice to mask with a large finite negative value
(e.g. ``-1e4``) instead. A NaN in the logits of an ignored token leaves the loss finite but can
make the gradient NaN: pass the gradient norm to catch it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ddk.distributed import all_reduce_sum_, collective_device, is_distributed

__all__ = ["NONFINITE_POLICIES", "NonFiniteError", "NonFiniteGuard", "NonFiniteReport", "grad_norm"]

NONFINITE_POLICIES: tuple[str, ...] = ("raise", "skip")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NonFiniteReport:
    """What a failed ``NonFiniteGuard.check`` found.

    Attributes:
        step: the training step given to ``check``.
        values: the checked values that were not finite, ``name -> value`` (first non-finite
            element); empty when only another rank saw one (under ``torch.distributed``).
        domains: names of the domains of the offending tokens (see ``located_by``).
        located_by: how ``domains`` was found: ``"tokens"`` (rows of ``tensors`` holding NaN/inf),
            ``"domain_sums"`` (non-finite per-domain sums of the loss output), ``"batch"`` (every
            domain in the batch: nothing narrower was found) or ``"none"`` (no domain information).
        tensors: ``name -> {"nan", "+inf", "-inf", "tokens"}`` counts for every scanned tensor
            with a non-finite entry (``tokens``: rows holding one).
    """

    step: int
    values: dict[str, float]
    domains: tuple[str, ...]
    located_by: str
    tensors: dict[str, dict[str, int]] = field(default_factory=dict)

    def describe(self) -> str:
        """One line: the values, the step, the domains and the scanned tensors' counts."""
        vals = ", ".join(f"{k}={v}" for k, v in self.values.items()) or "a non-finite value on another rank"
        where = {
            "tokens": "in the tokens of domain(s)",
            "domain_sums": "in the per-domain sums of domain(s)",
            "batch": "in a batch of domain(s)",
            "none": "(domains unknown)",
        }[self.located_by]
        text = f"{vals} at step {self.step} {where}" + (f" {list(self.domains)}" if self.domains else "")
        if self.tensors:
            parts = [
                f"{n}: "
                + ", ".join(f"{c[k]} {k}" for k in ("nan", "+inf", "-inf") if c[k])
                + f" in {c['tokens']} token(s)"
                for n, c in self.tensors.items()
            ]
            text += " (" + "; ".join(parts) + ")"
        return text

    @property
    def has_neginf(self) -> bool:
        """True when a scanned tensor held -inf (e.g. logits masked with -inf)."""
        return any(c["-inf"] for c in self.tensors.values())


class NonFiniteError(FloatingPointError, ValueError):
    """A non-finite loss or gradient under policy ``"raise"``; ``report`` says where."""

    def __init__(self, message: str, report: NonFiniteReport) -> None:
        super().__init__(message)
        self.report = report


def grad_norm(parameters: Iterable[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Total 2-norm of the gradients of ``parameters`` (float32 scalar; NaN/inf propagate).

    Changes no gradient and does not sync with the host. Parameters without ``.grad`` are
    skipped; with none at all the result is a zero on the CPU.
    """
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    dev = grads[0].device
    norms = [torch.linalg.vector_norm(g, dtype=torch.float32).to(dev) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms))


def _counts(t: torch.Tensor) -> tuple[dict[str, int], torch.Tensor | None]:
    """NaN/+inf/-inf counts of ``t`` and its rows (dim 0) holding any of them (None for 0-d)."""
    t = t.detach()
    if not t.is_floating_point():
        return {"nan": 0, "+inf": 0, "-inf": 0, "tokens": 0}, None
    nan, pos, neg = torch.isnan(t), torch.isposinf(t), torch.isneginf(t)
    c = {"nan": int(nan.sum()), "+inf": int(pos.sum()), "-inf": int(neg.sum())}
    rows = None if t.dim() == 0 else (nan | pos | neg).reshape(t.shape[0], -1).any(dim=1)
    c["tokens"] = 0 if rows is None else int(rows.sum())
    return c, rows


class NonFiniteGuard:
    """Checks that a training step's loss and gradients are finite; raises or skips by policy.

    Args:
        policy: ``"raise"`` (default: ``NonFiniteError`` naming the step and the domains) or
            ``"skip"`` (``check`` returns ``False``; the batch is counted in ``skipped_batches``).
        domain_names: ``(D,)`` names used in reports; default ``"domain0"``, ...
        fn: the name that starts error messages (e.g. ``"distill"``).
        hint: the advice that ends error messages.

    Examples:
        >>> import torch
        >>> guard = NonFiniteGuard("skip", domain_names=["web", "code"])
        >>> guard.check(1, loss=torch.tensor(2.0))
        True
        >>> zs = torch.tensor([[0.0, 1.0], [float("nan"), 0.0]])
        >>> guard.check(2, loss=torch.tensor(float("nan")), domain_ids=torch.tensor([0, 1]),
        ...             tensors={"student_logits": zs})
        False
        >>> guard.skipped_batches, guard.skipped_steps, guard.reports[-1].domains
        (1, [2], ('code',))
    """

    def __init__(
        self,
        policy: str = "raise",
        *,
        domain_names: Sequence[str] | None = None,
        fn: str = "NonFiniteGuard.check",
        hint: str = "construct NonFiniteGuard('skip') to skip such batches instead",
    ) -> None:
        if policy not in NONFINITE_POLICIES:
            raise ValueError(f"NonFiniteGuard: policy must be one of {NONFINITE_POLICIES}; got {policy!r}.")
        if domain_names is not None and (
            isinstance(domain_names, str) or not all(isinstance(n, str) for n in domain_names)
        ):
            raise TypeError(f"NonFiniteGuard: domain_names must be a sequence of str or None; got {domain_names!r}.")
        self.policy = policy
        self.domain_names: tuple[str, ...] | None = None if domain_names is None else tuple(domain_names)
        self.fn = fn
        self.hint = hint
        self.skipped_steps: list[int] = []
        self.reports: list[NonFiniteReport] = []  # the last 100 failures

    @property
    def skipped_batches(self) -> int:
        """Batches ``check`` told the caller to skip (policy ``"skip"``), including before a resume."""
        return len(self.skipped_steps)

    def _name(self, i: int) -> str:
        if self.domain_names is not None and 0 <= i < len(self.domain_names):
            return self.domain_names[i]
        return f"domain{i}"

    def check(
        self,
        step: int,
        output: Any = None,
        *,
        loss: torch.Tensor | None = None,
        grad_norm: torch.Tensor | float | None = None,
        values: Mapping[str, torch.Tensor | float] | None = None,
        domain_ids: torch.Tensor | None = None,
        tensors: Mapping[str, torch.Tensor] | None = None,
    ) -> bool:
        """Return ``True`` when every checked value is finite; else raise or return ``False``.

        Args:
            step: the training step (reported).
            output: a ``KDLossOutput`` (its ``loss`` is checked; its per-domain sums locate the
                domains when ``tensors`` cannot), or None.
            loss: the scalar loss, when ``output`` is not given.
            grad_norm: the total gradient norm (e.g. from ``clip_grad_norm_`` or ``grad_norm``).
            values: further named tensors or numbers that must be finite.
            domain_ids: ``(N,)`` domain id of each row of ``tensors`` (e.g. of each token).
            tensors: ``name -> (N, ...)`` tensors scanned only after a failure (e.g. the logits).

        Returns:
            ``True``: finite, go on. ``False`` (policy ``"skip"``): drop this batch.

        Raises:
            NonFiniteError: policy ``"raise"`` and a checked value is NaN or infinite.
        """
        checked: dict[str, torch.Tensor | float] = {}
        if output is not None:
            if not hasattr(output, "loss"):
                raise TypeError(f"{self.fn}: output must be a KDLossOutput or None; got {type(output).__name__}.")
            checked["loss"] = output.loss
        if loss is not None:
            checked["loss"] = loss
        if grad_norm is not None:
            checked["grad_norm"] = grad_norm
        checked.update(values or {})
        if not checked:
            raise ValueError(f"{self.fn}: at least one of output, loss, grad_norm or values must be given; got none.")
        tens = [v.detach() for v in checked.values() if isinstance(v, torch.Tensor)]
        host_bad = any(not math.isfinite(float(v)) for v in checked.values() if not isinstance(v, torch.Tensor))
        dev = tens[0].device if tens else torch.device("cpu")
        if tens:
            bad_t = torch.stack([(~torch.isfinite(t)).any().to(dev) for t in tens]).any()
        else:
            bad_t = torch.zeros((), dtype=torch.bool)
        flag = (bad_t | host_bad).to(torch.float64).reshape(1)
        if is_distributed():  # every rank must take the same decision
            flag = all_reduce_sum_(flag.to(collective_device(dev)))
        if not bool(flag.item()):  # the one host sync of the good path
            return True
        report = self._report(step, checked, output, domain_ids, tensors or {})
        self.reports = (self.reports + [report])[-100:]
        if self.policy == "raise":
            raise NonFiniteError(self._message(report), report)
        self.skipped_steps.append(int(step))
        logger.warning(
            "%s: skipped the batch of step %d: %s (%d skipped so far).",
            self.fn,
            step,
            report.describe(),
            self.skipped_batches,
        )
        return False

    def _report(
        self,
        step: int,
        checked: Mapping[str, Any],
        output: Any,
        domain_ids: torch.Tensor | None,
        tensors: Mapping[str, torch.Tensor],
    ) -> NonFiniteReport:
        vals: dict[str, float] = {}
        for k, v in checked.items():
            x = v.detach().float().reshape(-1).cpu() if isinstance(v, torch.Tensor) else torch.tensor([float(v)])
            bad = x[~torch.isfinite(x)]
            if bad.numel():
                vals[k] = float(bad[0])
        counts: dict[str, dict[str, int]] = {}
        rows_bad: torch.Tensor | None = None
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{self.fn}: tensors[{name!r}] must be a torch.Tensor; got {type(t).__name__}.")
            c, rows = _counts(t)
            if c["nan"] or c["+inf"] or c["-inf"]:
                counts[name] = c
                if rows is not None and domain_ids is not None and rows.shape[0] == domain_ids.shape[0]:
                    rows = rows.to(domain_ids.device)
                    rows_bad = rows if rows_bad is None else rows_bad | rows
        ids: list[int] = []
        located = "none"
        if rows_bad is not None and domain_ids is not None and bool(rows_bad.any()):  # rows_bad needs domain_ids
            ids, located = sorted(set(domain_ids[rows_bad].tolist())), "tokens"
        elif output is not None and hasattr(output, "domain_ce_sum"):
            sums = torch.stack([output.domain_ce_sum.detach().double(), output.domain_kd_sum.detach().double()])
            bad_d = (~torch.isfinite(sums)).any(dim=0)
            if bool(bad_d.any()):
                ids, located = torch.nonzero(bad_d).flatten().tolist(), "domain_sums"
        if located == "none" and domain_ids is not None and domain_ids.numel():
            ids, located = sorted(set(domain_ids.unique().tolist())), "batch"
        if located == "none" and not counts and self.domain_names is not None and len(self.domain_names) == 1:
            ids, located = [0], "batch"
        return NonFiniteReport(
            step=int(step), values=vals, domains=tuple(self._name(i) for i in ids), located_by=located, tensors=counts
        )

    def _message(self, report: NonFiniteReport) -> str:
        advice = self.hint
        if report.has_neginf:
            advice = (
                "-inf logits (e.g. masked vocabulary entries) are not supported by the fast backends: mask with a "
                f"large finite negative value such as -1e4 instead; or {self.hint}"
            )
        return f"{self.fn}: the loss and gradients must be finite; got {report.describe()}. {advice[0].upper()}{advice[1:]}."

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: ``{"policy", "skipped_steps"}``."""
        return {"policy": self.policy, "skipped_steps": list(self.skipped_steps)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the skipped-step count of a ``state_dict()`` (the policy stays the constructor's)."""
        steps = state.get("skipped_steps") if isinstance(state, Mapping) else None
        if not isinstance(steps, list) or not all(isinstance(s, int) for s in steps):
            raise ValueError(
                f"NonFiniteGuard.load_state_dict: state must be a dict from state_dict() with a "
                f"'skipped_steps' list of ints; got {state!r}."
            )
        self.skipped_steps = list(steps)

    def __repr__(self) -> str:
        return f"NonFiniteGuard(policy={self.policy!r}, skipped_batches={self.skipped_batches})"
