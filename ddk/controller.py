"""``DDKController``: ties the estimator, the smoother and the sampler to the interval K."""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, TypeGuard

import torch
from torch import nn

from ddk._io import append_line, printable
from ddk.discrepancy.estimator import DiscrepancyEstimator, DomainDiscrepancy
from ddk.distributed import rank_world
from ddk.schedule.base import WeightScheduler

COLLAPSE_SHARE = 0.9  # start() warns when r_0 puts more than this on one domain


def _is_int(x: object) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool)


class DDKController:
    """Runs DDK's schedule: ``r_0`` at ``start``, a smoothed update every ``interval`` steps.

    Call ``start(student)`` once before training, ``step_end(global_step, student)`` after every
    optimizer step (with the number of optimizer steps done so far), and, in online mode,
    ``observe(loss_output)`` after every forward pass. Under ``torch.distributed`` every rank
    must make these calls (the estimates are all-reduced); only rank 0 writes the log.

    Each initialisation/update is a record ``{"event": "init"|"update", "step", "batch"
    (sampler.batches_yielded), "domain_names", "weights", "ratio", "student_ce", "teacher_ce",
    "tokens", "time"}`` kept in ``records`` and appended as one JSON line to ``log_path``.

    Args:
        estimator: a ``DiscrepancyEstimator`` (its teacher CE must be computed before ``start``).
        smoother: the weight schedule, a ``WeightScheduler`` with the same number of domains:
            ``FactorSmoother`` (DDK's Eq. 1/2) or ``DoReMiScheduler`` (DoReMi's step, inside KD).
        sampler: a ``MixtureSampler`` (anything with ``set_weights``, ``batches_yielded``,
            ``num_domains``, ``state_dict`` and ``load_state_dict``) over the same domains, in
            the same order; its ``domain_names`` must equal the estimator's unless they are the
            sampler's defaults ``"domain0", ...``.
        interval: K, optimizer steps between updates (paper: 1000).
        log_path: JSON-lines file, or None. ``start`` begins it afresh; records after a
            ``load_state_dict`` are appended. Parent folders are created.
        online: estimate from the training batches passed to ``observe`` instead of validation
            passes at each update (``start`` still runs one validation pass for ``r_0``).

    Examples:
        >>> # controller = DDKController(estimator, FactorSmoother(D), sampler, interval=1000)
        >>> # controller.start(student)
        >>> # for step, batch in enumerate(loader, 1): ...; controller.step_end(step, student)
    """

    def __init__(
        self,
        estimator: DiscrepancyEstimator,
        smoother: WeightScheduler,
        sampler: Any,
        *,
        interval: int = 1000,
        log_path: str | os.PathLike[str] | None = None,
        online: bool = False,
    ) -> None:
        fn = "DDKController"
        if not isinstance(estimator, DiscrepancyEstimator):
            raise TypeError(f"{fn}: estimator must be a DiscrepancyEstimator; got {type(estimator).__name__}.")
        if not isinstance(smoother, WeightScheduler):
            raise TypeError(
                f"{fn}: smoother must be a WeightScheduler (FactorSmoother or DoReMiScheduler); "
                f"got {type(smoother).__name__}."
            )
        missing = [m for m in ("set_weights", "state_dict", "load_state_dict") if not hasattr(sampler, m)]
        if missing:
            raise TypeError(f"{fn}: sampler must be a MixtureSampler (with {missing}); got {type(sampler).__name__}.")
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            raise ValueError(
                f"{fn}: interval must be an int >= 1 (optimizer steps between updates; paper: 1000); got {interval!r}."
            )
        d = estimator.num_domains
        if smoother.num_domains != d:
            raise ValueError(
                f"{fn}: smoother.num_domains must equal the estimator's {d} domains; got {smoother.num_domains}."
            )
        sampler_d = getattr(sampler, "num_domains", d)
        if sampler_d != d:
            raise ValueError(f"{fn}: sampler.num_domains must equal the estimator's {d} domains; got {sampler_d}.")
        sampler_names = getattr(sampler, "domain_names", None)
        default_names = tuple(f"domain{i}" for i in range(d))  # MixtureSampler's default
        if (
            sampler_names is not None
            and tuple(sampler_names) != default_names
            and tuple(sampler_names) != estimator.domain_names
        ):
            raise ValueError(
                f"{fn}: sampler.domain_names must equal the estimator's {list(estimator.domain_names)} (same order); "
                f"got {list(sampler_names)}."
            )
        self.estimator = estimator
        self.smoother = smoother
        self.sampler = sampler
        self.interval = interval
        self.online = bool(online)
        self.log_path = Path(log_path) if log_path is not None else None
        self.records: list[dict[str, Any]] = []
        self._started = False
        self._last_update_step = 0
        self._num_updates = 0

    # ------------------------------------------------------------------ schedule
    @property
    def started(self) -> bool:
        """True after ``start`` (or loading a started state)."""
        return self._started

    @property
    def num_updates(self) -> int:
        """Number of Eq. 2 updates done so far."""
        return self._num_updates

    @property
    def weights(self) -> torch.Tensor:
        """Current ``(D,)`` float64 domain weights."""
        return self.smoother.weights

    def start(self, student: nn.Module) -> torch.Tensor:
        """Eq. 1: estimate the discrepancy, set ``r_0`` on the sampler and log it.

        When Eq. 1 puts more than ``COLLAPSE_SHARE`` (90%) of the mixture on one domain (one
        domain far behind the others, or a weak or randomly initialised student: the softmax
        saturates), a ``UserWarning`` names the domain and the ratios and points at
        ``init="floored"`` (``--ddk-init floored``: Eq. 2's floor applied to Eq. 1), with what it
        measured in that regime (``docs/results.md``, start ``extreme``). Without it Eq. 2's
        floor brings the other domains back at the first update, but the first interval trains
        almost on that domain alone.

        Args:
            student: the student model (evaluated on the validation sets).

        Returns:
            ``(D,)`` float64 initial weights.
        """
        if not self.estimator.has_teacher_ce:
            raise RuntimeError(
                "DDKController.start: the estimator must have the teacher CE; call "
                "estimator.compute_teacher(teacher) first (or pass teacher_ce= to the estimator)."
            )
        disc = self.estimator.estimate(student)
        weights = self.smoother.initialize(disc)
        self._warn_collapse(disc, weights)
        self.sampler.set_weights(weights.tolist())
        self._started = True
        self._last_update_step = 0
        if self.log_path is not None and rank_world()[0] == 0 and self.log_path.exists():
            self.log_path.unlink()  # a fresh start begins a fresh log; a resumed run appends
        self._log("init", 0, disc, weights)
        return weights

    def step_end(self, global_step: int, student: nn.Module | None = None) -> torch.Tensor | None:
        """Call after every optimizer step; updates the weights when ``global_step % interval == 0``.

        Args:
            global_step: optimizer steps done so far (>= 0).
            student: the student (needed unless ``online``).

        Returns:
            The new ``(D,)`` float64 weights at an update step, else None. A step at or before
            the last update (a repeated call, or steps replayed after resuming) does nothing.
        """
        fn = "DDKController.step_end"
        if not isinstance(global_step, int) or isinstance(global_step, bool) or global_step < 0:
            raise ValueError(f"{fn}: global_step must be an int >= 0; got {global_step!r}.")
        if not self._started:
            raise RuntimeError(f"{fn}: the controller must be started first; call controller.start(student).")
        if global_step % self.interval != 0 or global_step <= self._last_update_step:
            return None
        if self.online:
            disc = self.estimator.estimate_online()
        else:
            if student is None:
                raise ValueError(f"{fn}: student must be given unless online=True; got None.")
            disc = self.estimator.estimate(student)
        weights = self.smoother.update(disc)
        self.sampler.set_weights(weights.tolist())
        self._last_update_step = global_step
        self._num_updates += 1
        self._log("update", global_step, disc, weights)
        return weights

    def observe(self, output: Any, teacher_ce_sum: torch.Tensor | None = None) -> None:
        """Forward a training step's ``KDLossOutput`` to ``estimator.observe`` (online mode)."""
        self.estimator.observe(output, teacher_ce_sum)

    def _warn_collapse(self, disc: DomainDiscrepancy, weights: torch.Tensor) -> None:
        top = int(torch.argmax(weights))
        share = float(weights[top])
        if share <= COLLAPSE_SHARE or self.num_domains < 2 or rank_world()[0] != 0:
            return
        ratios = ", ".join(f"{printable(n)}={r:.3g}" for n, r in zip(disc.domain_names, disc.ratio.tolist()))
        warnings.warn(
            f"DDKController.start: Eq. 1 puts {share:.1%} of the mixture on domain {disc.domain_names[top]!r} "
            f"(ratios ppl_S/ppl_T: {ratios}); the first interval trains almost on it alone and the other "
            "domains fall behind. Floor it as Eq. 2 floors every update: FactorSmoother(init='floored') "
            "(ddk distill --ddk-init floored). Measured where one domain was nearly unseen (docs/results.md, "
            "start 'extreme', 5 seeds, held-out test gaps): -0.020 nats/token on the mean and -0.042 on the "
            "worst domain against this form, -0.018 and -0.377 against kd.",
            UserWarning,
            stacklevel=3,
        )

    @property
    def num_domains(self) -> int:
        """D, the number of domains."""
        return self.smoother.num_domains

    # ------------------------------------------------------------------ logging
    def _log(self, event: str, step: int, disc: DomainDiscrepancy, weights: torch.Tensor) -> None:
        rec = {
            "event": event,
            "step": step,
            "batch": int(getattr(self.sampler, "batches_yielded", 0)),
            "domain_names": list(disc.domain_names),
            "weights": weights.tolist(),
            "ratio": disc.ratio.tolist(),
            "student_ce": disc.student_ce.tolist(),
            "teacher_ce": disc.teacher_ce.tolist(),
            "tokens": disc.tokens.tolist(),
            "time": time.time(),
        }
        self.records.append(rec)
        if self.log_path is not None and rank_world()[0] == 0:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            append_line(self.log_path, json.dumps(rec), fn="DDKController")  # never through a link

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, at_batch: int | None = None) -> dict[str, Any]:
        """JSON-serialisable state of the controller, the estimator, the smoother and the sampler.

        Args:
            at_batch: forwarded to ``MixtureSampler.state_dict(at_batch=...)`` when given (the
                first global batch the training loop has not consumed, if a DataLoader
                prefetches ahead of it).
        """
        sampler_state = self.sampler.state_dict() if at_batch is None else self.sampler.state_dict(at_batch=at_batch)
        return {
            "controller": {
                "interval": self.interval,
                "online": self.online,
                "started": self._started,
                "last_update_step": self._last_update_step,
                "num_updates": self._num_updates,
            },
            "estimator": self.estimator.state_dict(),
            "smoother": self.smoother.state_dict(),
            "sampler": sampler_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict`` (the interval and online flag stay the constructor's).

        Every part (controller, estimator, smoother, sampler) is validated before anything is
        changed, so a rejected state leaves the controller and its components as they were.
        ``last_update_step`` must be an int in ``[0, sampler batches_yielded]`` (every optimizer
        step draws at least one batch) and ``num_updates`` an int in ``[0, last_update_step]``.

        Raises:
            TypeError: not a dict from ``DDKController.state_dict()``.
            ValueError: the first invalid field, named.
        """
        self._commit_state(self.check_state_dict(state))

    def check_state_dict(self, state: dict[str, Any], fn: str = "DDKController.load_state_dict") -> dict[str, Any]:
        """Validate a ``state_dict()`` whole (controller, estimator, smoother, sampler: each part's
        own ``check_state_dict``) without changing anything; return it parsed, which
        :meth:`load_state_dict` then commits. ``fn`` starts every message.

        Raises:
            TypeError: not a dict from ``DDKController.state_dict()``.
            ValueError: the first invalid field, named.
        """
        if not isinstance(state, dict) or not {"controller", "estimator", "smoother", "sampler"} <= set(state):
            raise TypeError(
                f"{fn}: state must be a dict from DDKController.state_dict() with keys controller, estimator, "
                f"smoother, sampler; got {sorted(state) if isinstance(state, dict) else type(state).__name__}."
            )
        c = state["controller"]
        if not isinstance(c, dict):
            raise ValueError(f"{fn}: state['controller'] must be a dict; got {type(c).__name__}.")
        started, last, updates = c.get("started"), c.get("last_update_step"), c.get("num_updates")
        if not isinstance(started, bool):
            raise ValueError(f"{fn}: state['controller']['started'] must be a bool; got {started!r}.")
        sampler_state = state["sampler"]
        drawn = sampler_state.get("batches_yielded") if isinstance(sampler_state, dict) else None
        bound = drawn if isinstance(drawn, int) and not isinstance(drawn, bool) and drawn >= 0 else None
        if not _is_int(last) or last < 0 or (bound is not None and last > bound) or (not started and last):
            raise ValueError(
                f"{fn}: state['controller']['last_update_step'] must be an int in [0, {bound}] (the "
                f"sampler's batches_yielded; 0 before start); got {last!r}."
            )
        if not _is_int(updates) or not 0 <= updates <= last:
            raise ValueError(
                f"{fn}: state['controller']['num_updates'] must be an int in [0, last_update_step="
                f"{last}]; got {updates!r}."
            )
        estimator = self.estimator.check_state_dict(state["estimator"], fn=f"{fn} (estimator)")
        smoother = self.smoother.check_state_dict(state["smoother"], fn=f"{fn} (smoother)")
        if started and smoother[0] is None:
            raise ValueError(f"{fn}: state['smoother']['weights'] must be set for a started controller; got None.")
        check = getattr(self.sampler, "check_state_dict", None)
        sampler = check(sampler_state, fn=f"{fn} (sampler)") if check is not None else None
        return {
            "estimator": estimator,
            "smoother": smoother,
            "sampler": sampler,
            "sampler_state": sampler_state,
            "started": started,
            "last_update_step": int(last),
            "num_updates": int(updates),
        }

    def _commit_state(self, parsed: dict[str, Any]) -> None:
        """Apply a state parsed by :meth:`check_state_dict` (cannot fail, but for a duck-typed sampler)."""
        self.estimator._commit_state(parsed["estimator"])
        self.smoother._commit_state(parsed["smoother"])
        if parsed["sampler"] is not None:
            self.sampler._commit_state(parsed["sampler"])
        else:  # a duck-typed sampler validates itself
            self.sampler.load_state_dict(parsed["sampler_state"])
        self._started = parsed["started"]
        self._last_update_step = parsed["last_update_step"]
        self._num_updates = parsed["num_updates"]

    def __repr__(self) -> str:
        return (
            f"DDKController(interval={self.interval}, online={self.online}, started={self._started}, "
            f"updates={self._num_updates})"
        )
