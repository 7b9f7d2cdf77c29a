"""The distilled student written as ``save_pretrained`` does (``out/student/``), under FSDP2 one
tensor at a time: no rank holds the whole student.

:func:`save_final_student` is what ``ddk distill`` calls at the end of a run. Without FSDP2 it is
``save_student`` of the whole state (rank 0 holds it anyway). With FSDP2 every rank gathers one
parameter at a time (``DTensor.full_tensor()``, in the same order on every rank) and rank 0 writes
its bytes straight into ``model.safetensors`` after a header computed from the shapes and dtypes,
then frees it: rank 0's extra memory is the largest tensor, not the student. The folder is the
one ``save_pretrained`` writes (``config.json``, ``generation_config.json`` from
``save_pretrained`` itself, the tied copies left out as it leaves them out, one
``model.safetensors`` with ``{"format": "pt"}`` metadata), so ``from_pretrained`` loads it; a
student whose saved names differ from its state names (a transformers weight conversion) is
gathered whole and saved by ``save_pretrained`` instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ddk._io import fresh_dir, open_nofollow
from ddk.distributed import broadcast_object, full_tensor, rank_world
from ddk.engine.models import install_student, save_student
from ddk.engine.parallel import full_student_state
from ddk.engine.tensorfile import DTYPES, header, write_tensor

__all__ = ["save_final_student", "save_student_streamed"]


def save_final_student(
    step_mod: torch.nn.Module,
    student: Any,
    tokenizer: Any,
    out: Path,
    *,
    fsdp: bool,
    run_info: dict[str, Any] | None = None,
) -> Path | None:
    """``out/student`` (``save_pretrained`` format, the tokenizer, ``ddk_run.json``); every rank
    calls it; streamed tensor by tensor under FSDP2 (:func:`save_student_streamed`)."""
    names = broadcast_object(_saved_names(student) if rank_world()[0] == 0 else None) if fsdp else None
    if names is not None:
        return save_student_streamed(student, tokenizer, out, names, run_info=run_info)
    return save_student(full_student_state(step_mod, student, fsdp), student, tokenizer, out, run_info=run_info)


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _saved_names(student: Any) -> list[str] | None:
    """The names ``save_pretrained`` writes, in ``state_dict`` order (tied copies left out), or None
    when it would rename or convert tensors (then the student is gathered whole)."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = student.state_dict()
    for key in getattr(student, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    kept = remove_tied_weights_from_state_dict({k: _local(v) for k, v in state.items()}, student)
    meta = {k: torch.empty(tuple(state[k].shape), dtype=state[k].dtype, device="meta") for k in kept}
    if set(revert_weight_conversion(student, dict(meta))) != set(meta) or any(
        v.dtype not in DTYPES for v in meta.values()
    ):
        return None
    return [k for k in state if k in kept]


def save_student_streamed(
    student: Any, tokenizer: Any, out: Path, names: list[str], run_info: dict[str, Any] | None = None
) -> Path | None:
    """``out/student`` of an FSDP2-sharded student, one tensor gathered at a time; every rank calls
    it (with the same ``names``: the tensors ``save_pretrained`` writes, in order), rank 0 writes.
    The weights must be finite (each rank checks its pieces first; the error, the same on every
    rank, names the tensors and keeps the previous ``student/``).

    Returns:
        ``out/student`` on rank 0, None on the others.

    Raises:
        ValueError: NaN/inf in the weights, or rank 0 could not write (every rank raises).
    """
    import torch.distributed as dist

    rank, world = rank_world()
    state = student.state_dict()
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(_local(v)).all())]
    if world > 1:
        every: list[Any] = [None] * world
        dist.all_gather_object(every, bad)
        bad = [k for k in state if any(k in b for b in every)]
    if bad:
        raise ValueError(
            f"save_student: the student's weights must be finite to replace {out / 'student'}; got NaN/inf in "
            f"{bad[:5]}{' ...' if len(bad) > 5 else ''}. The previous student/ is kept; resume from an earlier "
            "checkpoint (delete the newer ones) or rerun with --on-nonfinite skip."
        )
    failure: Exception | None = None
    tmp = f = None
    if rank == 0:
        try:
            tmp = fresh_dir(out / f".student.tmp-{os.getpid()}", "save_student")
            student.save_pretrained(str(tmp), state_dict={})  # config.json, generation_config.json: no weights
            tokenizer.save_pretrained(str(tmp))
            if run_info is not None:
                (tmp / "ddk_run.json").write_text(json.dumps(run_info, indent=2), encoding="utf-8")
            f = open_nofollow(tmp / "model.safetensors", "wb", fn="save_student")
            f.write(header(((k, state[k].dtype, tuple(state[k].shape)) for k in names), {"format": "pt"}))
        except Exception as exc:
            failure = exc
    for k in names:  # every rank gathers every tensor, in the same order; rank 0 writes it
        whole = full_tensor(state[k]).detach()
        if f is not None and failure is None:
            try:
                write_tensor(f, whole)
            except Exception as exc:
                failure = exc
        del whole
    result = None
    if rank == 0:
        try:
            if f is not None:
                f.close()
            if failure is None:
                assert tmp is not None
                result = install_student(tmp, out)
        except Exception as exc:
            failure = failure or exc
    message = broadcast_object("" if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    if message:
        raise ValueError(f"save_student: rank 0 could not write {out / 'student'}: {message}")
    return result
