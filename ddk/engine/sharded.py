"""Sharded checkpoints of ``ddk distill`` under torch.distributed: every rank writes its own shard of
the student's and the optimizer's tensors through ``torch.distributed.checkpoint`` (DCP); no rank
gathers the state, and a run resumes at another number of ranks.

A sharded ``checkpoint-<step>/`` (manifest version 2, ``"layout": "sharded"``)::

    shards/shard-<r+1>-model-00001-of-00001.safetensors
                          rank r's pieces of the student's and the optimizer's tensors (safetensors,
                          with DCP's offsets of each piece in its header; nothing pickled)
    tensors.safetensors   rank 0's small tensors (the RNG states)
    state.json            the rest: config, step, LR schedule, controller, the optimizer's param
                          groups, and the names of the sharded tensors
    manifest.json         size and SHA-256 of every file above; written last, by rank 0

Writing (:func:`save_sharded_checkpoint`, every rank calls it): rank 0 makes the hidden
``.checkpoint-<step>.tmp-<pid>/`` folder; every rank writes its shard file there (``fsync``-ed)
and hashes it; the digests are gathered on rank 0 (which is also the barrier: every shard is on
the disk), which writes ``tensors.safetensors``, ``state.json``, the manifest last, and renames the
folder into place, then tells every rank it is done. Until that rename the previous checkpoint is
the newest one, so a kill at any moment leaves a valid checkpoint to resume from. A replicated
tensor (DDP's, or FSDP2's optimizer step counts) is written once, by one rank.

Reading (:func:`read_checkpoint`): every rank verifies the manifest and every file's digest, checks
the shards' headers against this run (the same tensor names, shapes and dtypes, every tensor
covered exactly once by the pieces), and reads only the slices its own shards of the parameters
need, into new tensors (the run's model is untouched until ``resume.restore_state``). One-file
checkpoints (one process) are read as before; with FSDP2 their names are translated to the
training step's.

Another world size. Resuming with R' ranks a checkpoint written by R (including one process and
a plain process without ``--fsdp``): the student and the optimizer are re-sliced by DCP from the
pieces, exactly (no arithmetic on them). Every other part is the same on all ranks and saved once:
the sampler draws the same global batches at any world size (rank r trains on ``batch[r::R']``),
the controller's online sums were all-reduced before the save and are restored on rank 0 only,
the LR schedule counts steps. The RNG states saved are rank 0's, and every rank restores them:
every rank seeds the same generators (``seed_everything(cfg.seed)``) and, with dropout off,
draws nothing from them, so they stay equal. With dropout on, each rank draws masks for its slice,
so a resume at another world size gives other masks than the run that saved (a different, equally
valid draw). The steps after a resume at another world size sum each gradient in another order
(each rank its slice, then the all-reduce), so they match the run that did not stop to float
rounding, not to the bit; at the same world size the resume is bit-identical.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ddk._io import FILE_MODE, file_sha256, fresh_dir, fsync_dir
from ddk.distributed import broadcast_object, is_distributed, rank_world
from ddk.engine import checkpoint as ckpt
from ddk.engine.tensorfile import write_tensors

__all__ = [
    "LOADED",
    "load_loaded_state",
    "read_checkpoint",
    "save_sharded_checkpoint",
    "sharded_checkpoints",
]

_STUDENT = "student/"
_OPTIM = "optimizer/"
_PREFIX = "student."  # the student's attribute in the training step (``DistillStep.student``)
#: the key of a checkpoint state read by :func:`read_checkpoint` under FSDP2 that holds the sharded
#: ``(model state, optimizer state)`` to load (``resume.restore_state``); the other keys hold this rank's pieces
LOADED = "_sharded_loaded"


def sharded_checkpoints(fsdp: bool, world: int) -> bool:
    """True when ``ddk distill`` writes sharded checkpoints: under FSDP2, or with more than one
    rank, when torch has DCP's Hugging Face storage (else the one-file checkpoint of before)."""
    return (fsdp or world > 1) and _hf_storage() is None


def _hf_storage() -> str | None:
    """None when this torch has what sharded checkpoints use (``HuggingFaceStorageWriter`` with
    ``save_distributed``, and its reader), else why not."""
    import inspect

    try:
        from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader, HuggingFaceStorageWriter
    except ImportError as exc:
        return f"torch {torch.__version__} has no torch.distributed.checkpoint.hf_storage ({exc})"
    if "save_distributed" not in inspect.signature(HuggingFaceStorageWriter.__init__).parameters:
        return f"torch {torch.__version__}'s HuggingFaceStorageWriter has no save_distributed"
    del HuggingFaceStorageReader
    return None


@contextlib.contextmanager
def _dcp_quiet() -> Iterator[bool]:
    """``no_dist`` for DCP (True without a process group), its warning about it silenced."""
    no_dist = not is_distributed()
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield no_dist


def _local(t: Any) -> Any:
    """A DTensor's local piece; any other value itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _train_state(
    step_mod: torch.nn.Module, opt: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors by DCP key, what state.json keeps)`` of the student and the optimizer; sharded
    ``DTensor``s under FSDP2 (no copy, no gather). The optimizer's state is ``opt.state_dict()``
    keyed by FQN (not ``get_optimizer_state_dict``, which would step an optimizer without state)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    model: dict[str, Any] = dict(get_model_state_dict(step_mod))
    optim = _named_optimizer(opt.state_dict(), _param_names(step_mod, opt))
    flat: dict[str, torch.Tensor] = {_STUDENT + k: v for k, v in model.items()}
    values: dict[str, dict[str, Any]] = {}
    for fqn, per in optim["state"].items():
        for name, v in per.items():
            if isinstance(v, torch.Tensor):
                flat[f"{_OPTIM}{fqn}/{name}"] = v
            else:
                values.setdefault(fqn, {})[name] = v
    info = {
        "student": list(model),
        "optimizer": [k for k in flat if k.startswith(_OPTIM)],
        "values": values,
        "param_groups": optim["param_groups"],
    }
    return flat, info


def _shard_writer(folder: Path) -> Any:
    """DCP's Hugging Face storage writer (one safetensors file per rank, DCP's offsets of each
    piece in its header: what ``HuggingFaceStorageReader`` reads, no pickle), writing each piece
    straight from the rank's memory (``ddk.engine.tensorfile``) where torch's writer would copy a
    rank's whole shard twice (pieces cloned out of FSDP2's padded storage, then serialized to bytes)."""
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.storage import WriteResult
    from torch.futures import Future

    class ShardWriterDDK(HuggingFaceStorageWriter):
        def write_data(self, plan: Any, planner: Any) -> Future[list[WriteResult]]:
            name = f"shard-{plan.storage_data['shard_index']:05d}-model-00001-of-00001.safetensors"
            tensors, offsets, results = {}, {}, []
            for item in plan.items:  # tensors only: every non-tensor value is in state.json
                t = planner.resolve_data(item)
                tensors[item.index.fqn] = t
                offsets[item.index.fqn] = {"saved_offsets": list(item.tensor_data.chunk.offsets)}
                results.append(
                    WriteResult(index=item.index, size_in_bytes=t.numel() * t.element_size(), storage_data=name)
                )
            if tensors:
                # the header keys torch's Hugging Face writer and reader use (torch 2.8 - 2.13)
                meta = {"DCP_SHARDING_INFO": json.dumps(offsets), "DCP_VERSION": "1.0", "format": "pt"}
                write_tensors(folder / name, tensors, meta)
            fut: Future[list[WriteResult]] = Future()
            fut.set_result(results)
            return fut

    return ShardWriterDDK(str(folder), save_distributed=True)


def save_sharded_checkpoint(
    out: Path,
    step: int,
    state: dict[str, Any] | None,
    step_mod: torch.nn.Module,
    opt: torch.optim.Optimizer,
    keep: int,
    fn: str = "distill",
) -> Path:
    """Write ``out/checkpoint-<step>/`` sharded (see the module's docstring); every rank calls it.

    Args:
        out: the run folder.
        step: the optimizer steps done.
        state: on rank 0, every part but the student and the optimizer (config, scheduler, rng,
            controller, nonfinite); ignored on the other ranks.
        step_mod: the training step module (the student under ``student``; sharded or not).
        opt: its optimizer.
        keep: how many checkpoints to keep (the newest).
        fn: the function named in errors.

    Returns:
        The checkpoint folder.

    Raises:
        CheckpointError: a rank could not write its part (every rank raises; rank 0 its own error).
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    rank, world = rank_world()
    made: tuple[str, str] = ("", "")
    failure: Exception | None = None
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            tmp = fresh_dir(out / f".checkpoint-{step}.tmp-{os.getpid()}", fn)  # a link there is an error
            os.mkdir(tmp / ckpt.SHARDS)
            made = (str(tmp), "")
        except Exception as exc:  # every rank stops, none waits for the others
            failure, made = exc, ("", f"{type(exc).__name__}: {exc}")
    folder, error = broadcast_object(made)
    if failure is not None:
        raise failure
    if error:
        raise ckpt.CheckpointError(f"{fn}: rank 0 could not start checkpoint-{step}: {error}")
    tmp = Path(folder)
    flat, info = _train_state(step_mod, opt)
    with _dcp_quiet() as no_dist:
        dcp.save(flat, storage_writer=_shard_writer(tmp / ckpt.SHARDS), no_dist=no_dist)
    del flat
    mine = {}
    for f in sorted((tmp / ckpt.SHARDS).glob(f"shard-{rank + 1:05d}-*.safetensors")):  # DCP numbers its plans from 1
        os.chmod(f, FILE_MODE)
        mine[f"{ckpt.SHARDS}/{f.name}"] = {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
    written = [mine]
    if world > 1:
        written = [{} for _ in range(world)]
        dist.all_gather_object(written, mine)  # also the barrier: every rank's shard is on the disk
    if rank == 0:
        try:
            files = {k: v for per in written for k, v in per.items()}
            present = {f"{ckpt.SHARDS}/{p.name}" for p in (tmp / ckpt.SHARDS).iterdir()}
            if present != set(files):
                raise ckpt.CheckpointError(
                    f"{fn}: every rank must account for its shard files of checkpoint-{step}; got files "
                    f"{sorted(present - set(files))[:3]} nobody wrote and {sorted(set(files) - present)[:3]} missing."
                )
            fsync_dir(tmp / ckpt.SHARDS)
            assert state is not None, "rank 0 gives the state"
            ckpt.write_checkpoint_files(tmp, step, {**state, ckpt.SHARDED: {**info, "world_size": world}}, files)
            ckpt.publish_checkpoint(tmp, out, step, keep)
        except Exception as exc:
            failure = exc
    message = broadcast_object("" if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    if message:
        raise ckpt.CheckpointError(f"{fn}: rank 0 could not write checkpoint-{step}: {message}")
    return out / f"checkpoint-{step}"


# ---------------------------------------------------------------------------- reading
def _bad(path: Path, fn: str, why: str) -> ckpt.CheckpointError:
    return ckpt.CheckpointError(
        f"{fn}: the checkpoint {path} must hold the student and optimizer of this run to resume; got {why}. "
        "Nothing was overwritten: pass --no-resume to start over (the old run is moved aside), or use another --out."
    )


def _str_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(v, str) for v in x)


def _check_pieces(path: Path, fn: str, meta: Any, targets: dict[str, torch.Tensor]) -> None:
    """The shards' headers against this run: the same tensor names, global shapes and dtypes, and
    every tensor covered by its pieces exactly once (no gap, no overlap)."""
    md = meta.state_dict_metadata
    missing, unknown = sorted(set(targets) - set(md)), sorted(set(md) - set(targets))
    if missing or unknown:
        raise _bad(path, fn, f"shard files with tensors {unknown[:3]} unknown to it and without {missing[:3]}")
    for key, want in targets.items():
        m = md[key]
        shape, dtype = tuple(want.shape), want.dtype
        if not hasattr(m, "chunks") or tuple(m.size) != shape or m.properties.dtype != dtype:
            got = (tuple(m.size), m.properties.dtype) if hasattr(m, "chunks") else type(m).__name__
            raise _bad(path, fn, f"{key} of shape and dtype {got} where this run has {(shape, dtype)}")
        boxes = [(tuple(c.offsets), tuple(c.sizes)) for c in m.chunks]
        total = 1
        for n in shape:
            total *= n
        covered = 0
        for i, (off, size) in enumerate(boxes):
            if len(off) != len(shape) or any(o < 0 or o + s > n for o, s, n in zip(off, size, shape)):
                raise _bad(path, fn, f"a piece of {key} at {off} of size {size}, outside its shape {shape}")
            vol = 1
            for s in size:
                vol *= s
            covered += vol
            for off2, size2 in boxes[:i]:
                if vol and all(a < b + t and b < a + s for a, s, b, t in zip(off, size, off2, size2)):
                    raise _bad(path, fn, f"pieces of {key} that overlap ({off} and {off2})")
        if covered != total:
            raise _bad(path, fn, f"pieces of {key} that cover {covered} of its {total} values (a piece is missing)")


def _read_shards(
    ck: dict[str, Any], path: Path, step_mod: torch.nn.Module, opt: torch.optim.Optimizer, fn: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(model state, optimizer state)`` of a sharded checkpoint, FQN-keyed like
    ``get_model_state_dict`` / ``get_optimizer_state_dict`` of ``step_mod`` (sharded ``DTensor``s
    under FSDP2), read into new tensors."""
    lacking = _hf_storage()
    if lacking:
        raise _bad(path, fn, f"a sharded checkpoint, which needs a newer torch to read: {lacking}")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    info = ck[ckpt.SHARDED]
    if not (
        _str_list(info.get("student"))
        and _str_list(info.get("optimizer"))
        and isinstance(info.get("values"), dict)
        and isinstance(info.get("param_groups"), list)
        and all(isinstance(g, dict) and _str_list(g.get("params")) for g in info["param_groups"])
    ):
        raise _bad(path, fn, f"a '{ckpt.SHARDED}' entry of {ckpt.STATE} without the names of its sharded tensors")
    model: dict[str, Any] = dict(get_model_state_dict(step_mod))
    if set(info["student"]) != set(model):
        missing, unknown = sorted(set(model) - set(info["student"])), sorted(set(info["student"]) - set(model))
        raise _bad(path, fn, f"a student without {missing[:3]} and with unknown tensors {unknown[:3]}")
    live: dict[str, Any] = dict(get_optimizer_state_dict(step_mod, opt)["state"])  # type: ignore[arg-type]  # (fills a fresh optimizer's state: a step at lr 0)
    targets = {_STUDENT + k: torch.zeros_like(v) for k, v in model.items()}
    where: dict[str, tuple[str, str]] = {}
    for key in info["optimizer"]:
        fqn, _, name = key[len(_OPTIM) :].rpartition("/")
        like = live.get(fqn, {}).get(name) if key.startswith(_OPTIM) else None
        if not isinstance(like, torch.Tensor):
            raise _bad(path, fn, f"the optimizer state {key!r}, which this run's optimizer does not have")
        targets[key] = torch.zeros_like(like)
        where[key] = (fqn, name)
    del model, live
    reader = HuggingFaceStorageReader(str(path / ckpt.SHARDS))
    try:
        _check_pieces(path, fn, reader.read_metadata(), targets)
        with _dcp_quiet() as no_dist:
            dcp.load(targets, storage_reader=HuggingFaceStorageReader(str(path / ckpt.SHARDS)), no_dist=no_dist)
    except ckpt.CheckpointError:
        raise
    except Exception as exc:  # a header DCP cannot use, a read that fails: name the folder
        raise _bad(path, fn, f"shards DCP could not read ({type(exc).__name__}: {str(exc)[:300]})") from None
    state: dict[str, dict[str, Any]] = {fqn: dict(v) for fqn, v in info["values"].items() if isinstance(v, dict)}
    for key, (fqn, name) in where.items():
        state.setdefault(fqn, {})[name] = targets[key]
    model_sd = {k[len(_STUDENT) :]: v for k, v in targets.items() if k.startswith(_STUDENT)}
    return model_sd, {"state": state, "param_groups": info["param_groups"]}


def _param_names(step_mod: torch.nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The FQN (in ``step_mod``) of each parameter of ``opt``, in the order of its param groups
    (the index a plain ``opt.state_dict()`` gives it)."""
    names = {id(p): n for n, p in step_mod.named_parameters()}
    return [names.get(id(p), f"?{i}") for i, p in enumerate(p for g in opt.param_groups for p in g["params"])]


def _named_optimizer(osd: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """A plain ``opt.state_dict()`` (parameter indices) keyed by FQNs, as FSDP2's full state names them."""
    name = {i: n for i, n in enumerate(names)}
    return {
        "state": {name.get(k, k): v for k, v in osd["state"].items()},
        "param_groups": [{**g, "params": [name.get(i, i) for i in g["params"]]} for g in osd["param_groups"]],
    }


def _indexed_optimizer(osd: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Inverse of :func:`_named_optimizer`: FQN keys back to parameter indices."""
    index = {n: i for i, n in enumerate(names)}
    return {
        "state": {index.get(k, k): v for k, v in osd["state"].items()},
        "param_groups": [{**g, "params": [index.get(n, n) for n in g["params"]]} for g in osd["param_groups"]],
    }


def _run_format(
    ck: dict[str, Any], step_mod: torch.nn.Module, student: torch.nn.Module, opt: torch.optim.Optimizer, fsdp: bool
) -> None:
    """The one-file checkpoint's student and optimizer named as this run loads them, in place:
    FSDP2's full state names tensors from the training step (``student.``-prefixed FQNs) and keys
    the optimizer by FQN; one process by the student's own names and parameter indices."""
    sd, osd = ck.get("student"), ck.get("optimizer")
    if not isinstance(sd, dict) or not isinstance(osd, dict) or not isinstance(osd.get("state"), dict):
        return  # check_resume_state names what is wrong
    groups = osd.get("param_groups")
    if not isinstance(groups, list) or not all(
        isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups
    ):
        return
    own = set(student.state_dict())
    keys = [k for k in sd if isinstance(k, str)]
    prefixed = bool(keys) and all(k.startswith(_PREFIX) and k[len(_PREFIX) :] in own for k in keys)
    plain = bool(keys) and all(k in own for k in keys)
    if fsdp and plain:
        ck["student"] = {_PREFIX + k: v for k, v in sd.items()}
    elif not fsdp and prefixed:
        ck["student"] = {k[len(_PREFIX) :]: v for k, v in sd.items()}
    params = [p for g in groups for p in g["params"]]
    names = _param_names(step_mod, opt)
    if fsdp and params and all(isinstance(p, int) for p in params):
        ck["optimizer"] = _named_optimizer(osd, names)
    elif not fsdp and params and all(isinstance(p, str) for p in params):
        ck["optimizer"] = _indexed_optimizer(osd, names)


def read_checkpoint(
    path: Path,
    *,
    step_mod: torch.nn.Module,
    student: torch.nn.Module,
    opt: torch.optim.Optimizer,
    fsdp: bool,
    fn: str = "distill",
) -> dict[str, Any]:
    """``load_checkpoint(path)`` (every file verified) with the student and the optimizer as this run loads them.

    A sharded checkpoint is read at any world size: under FSDP2 ``ck["student"]`` and
    ``ck["optimizer"]`` hold this rank's pieces (plain tensors, FQN keys: what
    ``check_resume_state`` checks) and ``ck[LOADED]`` the sharded states that ``restore_state``
    loads; without FSDP2 they hold the whole tensors under the student's own names and parameter
    indices, like a one-file checkpoint. A one-file checkpoint written by FSDP2 (``student.``
    names) or by one process is renamed for the run that reads it. Every rank must call it
    together for a sharded checkpoint (DCP reads collectively).

    Raises:
        CheckpointError: a file is missing, torn or corrupted (named), or the shards do not hold
            this run's tensors.
    """
    ck = ckpt.load_checkpoint(path, fn)
    if not ckpt.is_sharded(ck):
        _run_format(ck, step_mod, student, opt, fsdp)
        return ck
    model_sd, optim_sd = _read_shards(ck, path, step_mod, opt, fn)
    if fsdp:
        ck["student"] = {k: _local(v) for k, v in model_sd.items()}
        ck["optimizer"] = {
            "state": {k: {n: _local(v) for n, v in per.items()} for k, per in optim_sd["state"].items()},
            "param_groups": optim_sd["param_groups"],
        }
        ck[LOADED] = (model_sd, optim_sd)
    else:
        ck["student"] = {k[len(_PREFIX) :] if k.startswith(_PREFIX) else k: v for k, v in model_sd.items()}
        ck["optimizer"] = _indexed_optimizer(optim_sd, _param_names(step_mod, opt))
    return ck


def load_loaded_state(step_mod: torch.nn.Module, opt: torch.optim.Optimizer, loaded: Any) -> None:
    """Load ``ck[LOADED]`` (sharded model and optimizer states from :func:`read_checkpoint`) into the run."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    model_sd, optim_sd = loaded
    set_model_state_dict(step_mod, model_sd)
    set_optimizer_state_dict(step_mod, opt, optim_sd)
