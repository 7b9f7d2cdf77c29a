"""What a ``ddk distill`` checkpoint must hold to be resumed: one validator of the whole state, run
before anything changes, and the restore that takes the learning rate from the config.

The manifest vouches for a checkpoint's bytes, not for its values: a checkpoint rewritten with
recomputed digests is intact and can still be absurd. :func:`check_resume_state` checks the
values of a state read by ``load_checkpoint`` against the run about to continue:

* ``step``: an int in ``[0, steps]``, the run's budget;
* the step agrees with every part that counts it: the sampler drew one global batch per step
  (``batches_yielded == step``), the weight schedule updated every ``interval`` steps
  (``num_updates == step // interval``, the last at the last multiple), the LR schedule stepped
  once per step (``last_epoch == step``), and the optimizer stepped once per step not skipped
  (its step counts at most that, the largest equal to it); the skipped steps are increasing ints
  in ``[1, step]``;
* every count within 2**53 (exact as a float64, far from an int64 overflow);
* every float finite: the student's weights, the optimizer's moments (second moments >= 0), the
  learning rates (>= 0), the controller's ratios and weights (each part's own ``check_state_dict``);
* the student's tensors have this student's names and shapes, the optimizer's groups this
  optimizer's sizes, the scheduler's state this scheduler's keys.

A sharded checkpoint (``ddk.engine.sharded``) is checked the same way on what each rank read:
its own pieces under FSDP2 (every rank then raises the first rank's error, or none does), the
whole tensors elsewhere; the shards' names, shapes and coverage were checked when they were read.

:func:`restore_state` then loads every part (none can fail after the check; a bad RNG state is
rolled back) and puts the hyperparameters of the optimizer's groups back to those the run was
built with: the learning rate of step ``s`` is ``lr * schedule(s)`` from the config, never a
number read from the file.

:func:`extension_refusal` words the refusal of a resume with a larger budget (``steps`` or
``tokens``): a run is never extended in place; the message gives the command that continues from
the run's ``student/``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ddk.engine import checkpoint as ckpt
from ddk.engine.parallel import load_train_state
from ddk.engine.sharded import LOADED, load_loaded_state

__all__ = [
    "MAX_COUNT",
    "check_resume_state",
    "extension_refusal",
    "keep_settings",
    "optimizer_settings",
    "restore_state",
]

MAX_COUNT = 2**53
_SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")  # Adam's: >= 0 (a square root is taken)


class _Field(ValueError):
    """One bad field: ``<field> must <expectation>; got <actual>.``"""


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 120 else text[:117] + "..."


def _bad(field: str, expect: str, got: Any) -> _Field:
    return _Field(f"{field} must {expect}; got {got if isinstance(got, str) else _short(got)}.")


def _int(field: str, x: Any, lo: int, hi: int, why: str = "") -> int:
    if not isinstance(x, int) or isinstance(x, bool) or not lo <= x <= hi:
        raise _bad(field, f"be an int in [{lo}, {hi}]{' ' + why if why else ''}", x)
    return x


def _rate(field: str, x: Any) -> None:
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = float(x)
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
        raise _bad(field, "be a finite learning rate >= 0", x)


def _finite(field: str, t: Any) -> None:
    if not isinstance(t, torch.Tensor):
        raise _bad(field, "be a tensor", type(t).__name__)
    if t.is_floating_point() or t.is_complex():
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise _bad(field, "hold finite numbers", f"{bad} of {t.numel()} values NaN or infinite")


def _check_like(where: str, got: Any, like: Any) -> None:
    """``got`` has the structure of ``like`` (same keys, list lengths and kinds of value; numbers interchange)."""

    def kind(x: Any) -> str:
        if isinstance(x, bool):
            return "bool"
        if isinstance(x, (int, float)):
            return "number"
        return "none" if x is None else type(x).__name__

    if isinstance(like, dict):
        if not isinstance(got, dict) or set(got) != set(like):
            raise _bad(
                where, f"have the keys {sorted(like)}", sorted(got) if isinstance(got, dict) else type(got).__name__
            )
        for k in like:
            _check_like(f"{where}.{k}", got[k], like[k])
    elif isinstance(like, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(like):
            raise _bad(where, f"be a list of {len(like)}", got)
        for i, (a, b) in enumerate(zip(got, like)):
            _check_like(f"{where}[{i}]", a, b)
    elif like is not None and kind(got) != kind(like):
        raise _bad(where, f"be a {kind(like)}", got)
    elif kind(got) == "number" and not math.isfinite(got):
        raise _bad(where, "be finite", got)


def _check_student(state: Any, student: torch.nn.Module, fsdp: bool) -> None:
    if not isinstance(state, dict):
        raise _bad("student", "be a dict of tensors", type(state).__name__)
    if not fsdp:  # FSDP2's full state names the parameters from the training step's root
        own = student.state_dict()
        if set(state) != set(own):
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise _bad("student", "name this student's tensors", f"missing {missing[:5]}, unknown {extra[:5]}")
        for k, v in own.items():
            if not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != tuple(v.shape):
                got = tuple(state[k].shape) if isinstance(state[k], torch.Tensor) else type(state[k]).__name__
                raise _bad(f"student[{k!r}]", f"have this student's shape {tuple(v.shape)}", got)
    for k, v in state.items():
        _finite(f"student[{k!r}]", v)


def _check_optimizer(state: Any, opt: torch.optim.Optimizer, done: int, fsdp: bool) -> None:
    """The optimizer's groups and per-parameter state; ``done`` the optimizer steps taken (steps not skipped)."""
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict):
        raise _bad("optimizer", "be an optimizer state_dict with 'state' and 'param_groups'", type(state).__name__)
    groups = state.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(opt.param_groups):
        raise _bad("optimizer.param_groups", f"be a list of {len(opt.param_groups)} groups", groups)
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, (g, own) in enumerate(zip(groups, opt.param_groups)):
        if not isinstance(g, dict) or not isinstance(g.get("params"), list):
            raise _bad(f"optimizer.param_groups[{i}]", "be a dict with 'params'", g)
        if len(g["params"]) != len(own["params"]):
            raise _bad(f"optimizer.param_groups[{i}].params", f"list {len(own['params'])} parameters", len(g["params"]))
        for key in ("lr", "initial_lr"):
            if key in g:
                _rate(f"optimizer.param_groups[{i}].{key}", g[key])
    largest = -1
    for key, per in state["state"].items():
        where = f"optimizer.state[{key!r}]"
        if not isinstance(per, dict):
            raise _bad(where, "be a dict of tensors", type(per).__name__)
        shape = None
        if not fsdp:
            _int(f"{where} (its key)", key, 0, len(params) - 1, "(a parameter's index)")
            shape = tuple(params[key].shape)
        for name, v in per.items():
            if name == "step":
                n = float(v) if isinstance(v, torch.Tensor) and v.numel() == 1 else v
                if isinstance(n, bool) or not isinstance(n, (int, float)) or not (0 <= n <= done and n == int(n)):
                    raise _bad(f"{where}.step", f"be a count in [0, {done}] (the optimizer steps taken)", n)
                largest = max(largest, int(n))
                continue
            _finite(f"{where}.{name}", v)
            if shape is not None and v.dim() and tuple(v.shape) != shape:
                raise _bad(f"{where}.{name}", f"have its parameter's shape {shape}", tuple(v.shape))
            if name in _SECOND_MOMENTS and bool((v < 0).any()):
                raise _bad(f"{where}.{name}", "be >= 0 (a second moment)", f"{int((v < 0).sum())} negative values")
    if largest >= 0 and largest != done:
        raise _bad("optimizer.state[*].step", f"reach {done} (the optimizer steps taken) for some parameter", largest)


def _check_scheduler(state: Any, sched: Any, step: int) -> None:
    _check_like("scheduler", state, sched.state_dict())
    if state["last_epoch"] != step:
        raise _bad(
            "scheduler.last_epoch", f"equal the step {step} (one schedule step per optimizer step)", state["last_epoch"]
        )
    for key in ("base_lrs", "_last_lr"):
        for i, x in enumerate(state.get(key) or []):
            _rate(f"scheduler.{key}[{i}]", x)


def _check_counts(step: int, ctrl: Any, interval: int) -> None:
    """The controller's counts against the step: one global batch per step, one update per ``interval``."""
    drawn = ctrl["sampler"].get("batches_yielded") if isinstance(ctrl.get("sampler"), dict) else None
    if drawn != step:
        raise _bad("controller.sampler.batches_yielded", f"equal the step {step} (one global batch per step)", drawn)
    c = ctrl["controller"]
    updates, last = c.get("num_updates"), c.get("last_update_step")
    if updates != step // interval:
        raise _bad(
            "controller.controller.num_updates",
            f"equal step // interval = {step} // {interval} (one weight update per interval)",
            updates,
        )
    if last != (step // interval) * interval:
        raise _bad("controller.controller.last_update_step", f"be {(step // interval) * interval}", last)


def check_resume_state(
    ck: dict[str, Any],
    path: Path,
    *,
    steps: int,
    student: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    controller: Any,
    fsdp: bool = False,
    fn: str = "distill",
) -> dict[str, Any]:
    """Validate the whole state ``ck`` of the checkpoint ``path`` for this run, changing nothing.

    Args:
        ck: what ``load_checkpoint(path)`` returned (bytes verified, config compared).
        path: the checkpoint folder (named in errors).
        steps: the run's budget of optimizer steps.
        student, opt, sched, controller: the run's parts, as built from the config.
        fsdp: the student is sharded with FSDP2 (its state names differ; shapes are not compared).
        fn: the function named in errors.

    Returns:
        The controller's state parsed (what :func:`restore_state` commits).

    Raises:
        CheckpointError: the first bad field: the message names the file and the field.
    """
    where = path / ckpt.STATE
    try:
        step = _int("step", ck.get("step"), 0, min(steps, MAX_COUNT), f"(the run's steps={steps})")
        skipped = (ck.get("nonfinite") or {"skipped_steps": []}).get("skipped_steps")
        if not isinstance(skipped, list) or any(
            not isinstance(s, int) or isinstance(s, bool) or not 1 <= s <= step for s in skipped
        ):
            raise _bad("nonfinite.skipped_steps", f"be ints in [1, {step}]", skipped)
        if skipped != sorted(set(skipped)):
            raise _bad("nonfinite.skipped_steps", "be increasing", skipped)
        ctrl = ck.get("controller")
        if not isinstance(ctrl, dict):
            raise _bad("controller", "be a controller state_dict", type(ctrl).__name__)
        try:
            parsed = controller.check_state_dict(ctrl, fn="controller")
        except (TypeError, ValueError) as exc:
            raise _Field(str(exc)) from None
        _check_counts(step, ctrl, int(controller.interval))
        _check_scheduler(ck.get("scheduler"), sched, step)
        _check_optimizer(ck.get("optimizer"), opt, step - len(skipped), fsdp)
        if not isinstance(ck.get("rng"), dict):
            raise _bad("rng", "be the generator states of rng_state()", type(ck.get("rng")).__name__)
        _check_student(ck.get("student"), student, fsdp)  # last: one pass over every weight
    except _Field as exc:
        tensors = str(exc).startswith(("student", "optimizer.state"))
        file = ckpt.SHARDS if tensors and ckpt.is_sharded(ck) else ckpt.TENSORS if tensors else ckpt.STATE
        error = (
            f"{fn}: the checkpoint {path} must hold values this run can resume from; got a bad field of "
            f"{where.with_name(file)}: {exc} Nothing was overwritten: pass --no-resume to start over (the old run is "
            "moved aside), or use another --out."
        )
    else:
        error = ""
    if LOADED in ck:  # each rank checked its own pieces: every rank raises the first rank's error, or none does
        error = _first_error(error)
    if error:
        raise ckpt.CheckpointError(error)
    return parsed


def _first_error(error: str) -> str:
    """The first non-empty ``error`` over the ranks (an all-gather; every rank calls it)."""
    from ddk.distributed import rank_world

    if rank_world()[1] == 1:
        return error
    import torch.distributed as dist

    errors: list[Any] = [None] * rank_world()[1]
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), "")


def restore_state(
    ck: dict[str, Any],
    parsed: dict[str, Any],
    *,
    step_mod: torch.nn.Module,
    student: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    controller: Any,
    guard: Any,
    fsdp: bool = False,
) -> int:
    """Load a state passed by :func:`check_resume_state` into the run's parts; return its step.

    The optimizer's group hyperparameters (learning rate, betas, weight decay, ...) stay those
    the run was built with, and each group's learning rate is set to its base rate times the
    schedule at the step, as the scheduler's own step computes it (a resume stays bit-identical).
    """
    before = ckpt.rng_state()
    try:
        ckpt.set_rng_state(ck["rng"])
    except ckpt.CheckpointError:
        ckpt.set_rng_state(before)  # a part may have been set: nothing changes
        raise
    own = optimizer_settings(opt)
    if LOADED in ck:  # a sharded checkpoint read under FSDP2: its sharded states
        load_loaded_state(step_mod, opt, ck[LOADED])
    else:
        load_train_state(step_mod, student, opt, ck, fsdp)
    sched.load_state_dict(ck["scheduler"])
    keep_settings(opt, sched, own)
    controller._commit_state(parsed)
    guard.load_state_dict(ck.get("nonfinite", {"skipped_steps": []}))
    return int(ck["step"])


def optimizer_settings(opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each param group's hyperparameters (learning rate, betas, weight decay, ...) as built from
    the run's configuration: take them before loading a checkpoint, give them to :func:`keep_settings`."""
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def keep_settings(opt: torch.optim.Optimizer, sched: Any, own: list[dict[str, Any]]) -> None:
    """After an optimizer and a scheduler state were loaded: the groups' hyperparameters back to
    ``own`` (from :func:`optimizer_settings`), the scheduler's base rates to the groups' initial
    rates, and each group's rate to its base rate times the schedule at the loaded step, as a
    ``LambdaLR``'s step computes it (bit-identical to a run that never stopped). A checkpoint thus
    contributes moments and step counts, never a learning rate. Another scheduler keeps the rates it
    loaded, which must be finite and >= 0 (``ValueError`` naming the group)."""
    for group, hyper in zip(opt.param_groups, own):
        group.update(hyper)
    if hasattr(sched, "base_lrs"):
        sched.base_lrs = [g.get("initial_lr", g["lr"]) for g in opt.param_groups]
    lambdas = getattr(sched, "lr_lambdas", None)
    if lambdas is not None:  # LambdaLR (make_optimizer's, transformers'): lr = base * schedule(step)
        for group, base, lam in zip(opt.param_groups, sched.base_lrs, lambdas):
            group["lr"] = base * lam(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in opt.param_groups]
    for i, group in enumerate(opt.param_groups):
        lr = group["lr"]
        lr = float(lr) if isinstance(lr, torch.Tensor) and lr.numel() == 1 else lr
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"resume: the learning rate of param group {i} must be finite and >= 0; got {lr!r}.")


def _budget(cfg: dict[str, Any]) -> int | None:
    """The optimizer steps of a config dict (``steps``, or ``tokens`` over ``batch_size * seq_len``), or None."""
    values = [cfg.get(k) for k in ("steps", "tokens", "batch_size", "seq_len")]
    ints = [x for x in values if isinstance(x, int) and not isinstance(x, bool) and x >= 0]
    if len(ints) != len(values):
        return None
    steps, tokens, batch, seq = ints
    return -(-tokens // max(1, batch * seq)) if tokens > 0 else steps


def extension_refusal(old: dict[str, Any], new: dict[str, Any], path: Path, step: Any) -> str | None:
    """The refusal of a resume with a larger budget (``steps`` or ``tokens``) than the checkpoint's
    run, naming the command that continues from the run's ``student/``; None if the budget is not larger.

    The rule: a run is never extended in place. Its learning rate followed a warm-up and a cosine
    decay laid out over its own budget; a run with a larger budget follows another schedule from
    its first step on, so no resume of the checkpoint could be that run. Training further is a new
    run started from ``student/``: a new optimizer, a warm-up (the run's, at most a tenth of the
    extra steps: ``config.json``'s could outlast them) and a cosine decay over the extra steps, domain weights from the student's gaps at its start, and another seed (another data
    order than the first run's).

    Args:
        old, new: the checkpoint's and the resuming run's ``result_options`` (same keys), which
            differ only in ``steps``/``tokens``.
        path: the checkpoint folder; its parent is the run folder.
        step: the checkpoint's step.
    """
    import shlex

    before, after = _budget(old), _budget(new)
    if before is None or after is None or after <= before or not isinstance(step, int):
        return None
    run, extra = path.parent, after - before
    per_step = new["batch_size"] * new["seq_len"]
    if new["tokens"] > 0:
        budget = f"--tokens {new['tokens'] - before * per_step}"
    else:
        budget = f"--steps {extra}" + (" --tokens 0" if old["tokens"] > 0 else "")
    seed = int(old["seed"]) if isinstance(old.get("seed"), int) else 0
    # config.json's warm-up was laid out for the old budget: over the extra steps it could last the
    # whole run (the learning rate would never decay), so the command sets one of at most a tenth of them
    old_warmup = old.get("warmup_steps")
    warmup = extra // 10
    if isinstance(old_warmup, int) and not isinstance(old_warmup, bool) and old_warmup >= 0:
        warmup = min(old_warmup, warmup)
    command = (
        f"ddk distill --config {shlex.quote(str(run / 'config.json'))} --student {shlex.quote(str(run / 'student'))} "
        f"{budget} --warmup-steps {warmup} --seed {seed + 1} --out {shlex.quote(str(run) + '-continued')}"
    )
    own = f"--tokens {old['tokens']}" if old["tokens"] > 0 else f"--steps {old['steps']}"
    first = (
        ""
        if step >= before
        else f"It stopped at step {step} of {before}: first finish it with its own budget (its command with {own}); then "
    )
    return (
        f"distill: the run in {str(run)!r} must keep its budget of {before} steps to resume; got {after} steps. Its "
        f"learning rate follows a warm-up and a cosine decay laid out over {before} steps; a run of {after} steps "
        "follows another schedule from its first step on, so no resume of it is that run and ddk does not extend a "
        f"run in place. {first}To train its student {extra} more steps, start a new run from it: `{command}` (a new "
        f"optimizer with a warm-up of {warmup} steps and a cosine decay over the {extra} steps, domain weights from the student's gaps at "
        f"its start, seed {seed + 1}: another data order than this run's). To run {after} steps from the start "
        "instead, pass --no-resume (this run's files are moved aside) or another --out."
    )
