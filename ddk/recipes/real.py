"""End to end on real text: corpus -> tokenizer -> cached teacher -> distilled student -> report.

Stages (each cached under ``data_dir``, keyed by the hash of what determines it):

1. ``prepare_data``: build the corpus (``ddk.data.build_corpus``), train the byte-level BPE
   tokenizer on its training split, and turn each domain into ``(n_i, seq_len + 1)`` int64 token
   windows (records joined with ``<|endoftext|>``, non-overlapping windows).
2. ``train_teacher``: a ``transformers`` ``LlamaForCausalLM`` initialised locally, pretrained on a
   uniform mixture of the domains and saved with ``save_pretrained``; its per-domain validation CE
   is cached next to it, so the teacher is trained and evaluated once.
3. ``distill``: one student per method, at an equal token budget (``steps * batch_size *
   seq_len``), same seeds, same AdamW + warm-up/cosine schedule:

   * ``cpt``: the student alone (``gamma = 0``; no teacher forward), uniform mixture;
   * ``kd``: ``CE + gamma * KL(p_T || p_S)``, uniform mixture;
   * ``ddk``: KD with DDK's mixture (Eq. 1, Eq. 2 every ``interval`` steps);
   * ``ddk-no-smoothing``: the weights are ``softmax(ratio)`` at each update;
   * ``ddk-online``: the discrepancy comes from the training batches' per-domain CE
     (``controller.observe``) instead of validation passes.

   Writes ``config.json``, ``metrics.jsonl``, ``controller.jsonl``, ``checkpoint-<step>.pt``
   (student, optimizer, scheduler, RNG states and ``controller.state_dict()``, atomically; the
   newest ``keep_checkpoints`` kept), the final ``student/``, ``summary.json``, plots, and prints
   a table. A run folder with a checkpoint resumes from its newest one. Under ``torchrun`` it
   trains with DDP (or FSDP2 with ``fsdp``) on slices of the same global batches; see ``distill``.
4. ``evaluate``: per-domain validation CE of a run's student and its teacher.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from ddk._io import atomic_write_text
from ddk.controller import DDKController
from ddk.discrepancy import DiscrepancyEstimator
from ddk.integrations.distributed import (
    all_reduce_sum_,
    broadcast_object,
    check_same_across_ranks,
    collective_device,
    global_token_normalizer,
    init_from_env,
    is_distributed,
    rank_world,
    rank_zero_first,
    tensor_checksum,
)
from ddk.losses import kd_loss
from ddk.recipes.config import METHODS, RecipeConfig
from ddk.reliability import NonFiniteGuard, grad_norm
from ddk.sampling import MixtureSampler
from ddk.schedule import FactorSmoother

__all__ = ["PreparedData", "check_teacher_tokenizer", "distill", "evaluate", "format_table", "llama_config", "prepare_data",
           "run_demo", "train_teacher"]

_SMOOTHER_MODE = {"cpt": "uniform", "kd": "uniform", "ddk": "ddk", "ddk-no-smoothing": "no_smoothing", "ddk-online": "ddk"}
_CORPUS_KEYS = ("domains", "user_folders", "user_jsonl", "max_chars", "validation_fraction")


def _log(msg: str) -> None:
    if rank_world()[0] == 0:  # under torchrun only rank 0 talks
        print(msg, file=sys.stderr, flush=True)


def _atomic_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))


# ---------------------------------------------------------------------------- data
@dataclass
class PreparedData:
    """Token windows of every domain and where they came from.

    Attributes:
        names: the D domain names (sorted; the order of weights everywhere).
        train: per domain a ``(n_i, seq_len + 1)`` int64 tensor of training windows.
        validation: per domain a ``(m_i, seq_len + 1)`` int64 tensor (``m_i <= val_seqs``).
        corpus_dir, tokenizer_dir: folders of the corpus and the tokenizer.
        vocab_size: the tokenizer's vocabulary size.
        key: hash of corpus + tokenizer + windowing (keys the teacher cache).
    """

    names: list[str]
    train: list[torch.Tensor]
    validation: list[torch.Tensor]
    corpus_dir: Path
    tokenizer_dir: Path
    vocab_size: int
    key: str

    @property
    def train_all(self) -> torch.Tensor:
        """``(sum n_i, seq_len + 1)``: the domains concatenated in order (sampler global indices)."""
        return torch.cat(self.train)

    def validation_batches(self, batch_size: int) -> dict[str, list[dict[str, torch.Tensor]]]:
        """``name -> [{"input_ids": (b, seq_len + 1)}]`` for ``DiscrepancyEstimator``."""
        return {n: [{"input_ids": v[i:i + batch_size]} for i in range(0, len(v), batch_size)]
                for n, v in zip(self.names, self.validation)}


def _windows(tokenizer: Any, texts: list[str], seq_len: int, limit: int | None = None) -> torch.Tensor:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    need = None if limit is None else limit * (seq_len + 1)
    for start in range(0, len(texts), 256):
        for seq in tokenizer(texts[start:start + 256], add_special_tokens=False)["input_ids"]:
            ids.extend(seq)
            ids.append(eos)
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // (seq_len + 1)
    if limit is not None:
        n = min(n, limit)
    return torch.tensor(ids[: n * (seq_len + 1)], dtype=torch.long).view(n, seq_len + 1)


def prepare_data(cfg: RecipeConfig, *, corpus_dir: str | os.PathLike[str] | None = None) -> PreparedData:
    """Build or reuse the corpus, the tokenizer and the token windows.

    Args:
        cfg: the recipe config (data fields).
        corpus_dir: use this corpus folder instead of ``data_dir/corpus/<hash>``.
    """
    from ddk.data import CorpusConfig, build_corpus, domain_texts, load_tokenizer, train_tokenizer
    from ddk.data.tokenizer import tokenizer_fingerprint

    root = cfg.data_path
    ccfg = CorpusConfig(domains=tuple(cfg.domains), user_folders=dict(cfg.user_folders), user_jsonl=tuple(cfg.user_jsonl),
                        max_chars=cfg.max_chars, validation_fraction=cfg.validation_fraction, seed=0,
                        cache_dir=str(root / "debs"), offline=cfg.offline, skip_bad_lines=cfg.skip_bad_lines)
    on_error = "skip" if cfg.skip_bad_lines else "raise"
    cdir = Path(corpus_dir) if corpus_dir is not None else root / "corpus" / ccfg.key()
    t0 = time.perf_counter()
    man = build_corpus(cdir, ccfg, progress=cfg.progress)
    names = sorted(man["domains"])
    tdir = cdir / f"tokenizer-v{cfg.vocab_size}"
    if (tdir / "tokenizer.json").is_file():
        tok = load_tokenizer(tdir)
    else:
        _log(f"tokenizer: training byte-level BPE (vocab {cfg.vocab_size}) on the training split")
        train_texts = domain_texts(cdir, "train", names, on_error=on_error)
        tok = train_tokenizer((t for d in names for t in train_texts[d]), tdir, vocab_size=cfg.vocab_size)
    fp = tokenizer_fingerprint(tdir)
    cache = cdir / f"tokens-{fp}-L{cfg.seq_len}-V{cfg.val_seqs}.pt"
    if cache.is_file():
        blob = torch.load(cache)
    else:
        train_texts = domain_texts(cdir, "train", names, on_error=on_error)
        val_texts = domain_texts(cdir, "validation", names, on_error=on_error)
        blob = {"names": names,
                "train": [_windows(tok, train_texts[d], cfg.seq_len) for d in names],
                "validation": [_windows(tok, val_texts[d], cfg.seq_len, cfg.val_seqs) for d in names]}
        tmp = cache.with_name(cache.name + ".tmp")
        torch.save(blob, tmp)
        os.replace(tmp, cache)
    empty = [d for d, tr, va in zip(blob["names"], blob["train"], blob["validation"]) if len(tr) == 0 or len(va) == 0]
    if empty:
        raise ValueError(f"prepare_data: every domain must yield at least one window of seq_len+1={cfg.seq_len + 1} tokens "
                         f"in train and validation; got none for {empty} (raise max_chars or lower seq_len).")
    if cfg.progress:
        _log(f"data: {len(names)} domains, train windows {[len(t) for t in blob['train']]}, "
             f"validation windows {[len(v) for v in blob['validation']]} ({time.perf_counter() - t0:.1f} s)")
    return PreparedData(names=list(blob["names"]), train=blob["train"], validation=blob["validation"],
                        corpus_dir=cdir, tokenizer_dir=tdir, vocab_size=len(tok), key=f"{man['key']}-{fp}-L{cfg.seq_len}")


# ---------------------------------------------------------------------------- models
def llama_config(cfg: RecipeConfig, who: str, vocab_size: int) -> Any:
    """A small ``LlamaConfig`` for ``who`` in ``{"teacher", "student"}`` (tied embeddings)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=getattr(cfg, f"{who}_hidden"),
        intermediate_size=getattr(cfg, f"{who}_intermediate"),
        num_hidden_layers=getattr(cfg, f"{who}_layers"),
        num_attention_heads=getattr(cfg, f"{who}_heads"),
        num_key_value_heads=getattr(cfg, f"{who}_heads"),
        max_position_embeddings=max(cfg.seq_len + 1, 64),
        tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )


def _new_model(config: Any, seed: int) -> Any:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float, warmup: int, total: int, min_ratio: float
               ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no decay on norms and biases) + linear warm-up to ``lr`` then cosine to ``lr * min_ratio``."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _set_threads(cfg: RecipeConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)


def _teacher_key(cfg: RecipeConfig, data: PreparedData) -> str:
    keys = ("teacher_hidden", "teacher_layers", "teacher_heads", "teacher_intermediate", "teacher_steps",
            "teacher_lr", "teacher_batch_size", "teacher_seed", "weight_decay", "grad_clip", "warmup_steps", "min_lr_ratio")
    return cfg.hash_of(keys, extra=data.key)


def train_teacher(cfg: RecipeConfig, data: PreparedData) -> tuple[Any, torch.Tensor, Path]:
    """Pretrain (or load the cached) teacher and its per-domain validation CE.

    Under ``torchrun`` (an initialised process group) rank 0 trains and caches the teacher while
    the others wait, then they load it (``data_dir`` must be shared by the ranks); the teacher CE
    is computed by all ranks together and written by rank 0.

    Returns:
        ``(teacher in eval mode without grads, teacher_ce (D,) float64, teacher folder)``.
    """
    _set_threads(cfg)
    tdir = cfg.data_path / "teachers" / _teacher_key(cfg, data)
    meta_path = tdir / "teacher_meta.json"
    from transformers import LlamaForCausalLM

    rank, world = rank_world()
    if world > 1 and rank != 0:
        dist.barrier()  # under torchrun rank 0 trains (or finds) the teacher first; the others then load it
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        teacher = LlamaForCausalLM.from_pretrained(str(tdir / "model"))
        if cfg.progress:
            _log(f"teacher: cached at {tdir} (trained in {meta['train_seconds']:.0f} s)")
    else:
        t0 = time.perf_counter()
        teacher = _new_model(llama_config(cfg, "teacher", data.vocab_size), cfg.teacher_seed)
        d = len(data.names)
        sizes = [len(t) for t in data.train]
        train = data.train_all
        sampler = MixtureSampler(sizes, cfg.teacher_batch_size, seed=cfg.teacher_seed + 1000, domain_names=data.names)
        opt, sched = _optimizer(teacher, cfg.teacher_lr, cfg.weight_decay, cfg.warmup_steps, cfg.teacher_steps, cfg.min_lr_ratio)
        losses: list[float] = []
        teacher.train()
        bar = tqdm(range(cfg.teacher_steps), desc="teacher", disable=not cfg.progress)
        for step in bar:
            batch = train[torch.as_tensor(sampler.next_global_batch())]
            logits = teacher(input_ids=batch[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(teacher.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if step % 10 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.close()
        tmp = tdir.with_name(tdir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        teacher.save_pretrained(str(tmp / "model"))
        meta = {"config": cfg.to_dict(), "data_key": data.key, "domains": data.names, "loss_curve": losses[::10],
                "final_loss": losses[-1] if losses else None, "train_seconds": time.perf_counter() - t0, "num_domains": d,
                "tokenizer": _tokenizer_id(data), "tokenizer_dir": str(data.tokenizer_dir), "vocab_size": data.vocab_size}
        (tmp / "teacher_meta.json").write_text(json.dumps(meta, indent=2))
        shutil.rmtree(tdir, ignore_errors=True)
        tdir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, tdir)
        if cfg.progress:
            _log(f"teacher: trained in {meta['train_seconds']:.0f} s, saved to {tdir}")
    if world > 1 and rank == 0:
        dist.barrier()
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    ce_path = tdir / f"teacher_ce-V{cfg.val_seqs}.json"
    if broadcast_object(ce_path.is_file()):  # rank 0 decides, so every rank takes the same branch
        teacher_ce = torch.tensor(json.loads(ce_path.read_text())["teacher_ce"], dtype=torch.float64)
    else:  # under torchrun every rank evaluates its shard of the validation batches (all-reduced)
        est = DiscrepancyEstimator(data.validation_batches(cfg.eval_batch_size), progress=False)
        teacher_ce = est.compute_teacher(teacher)
        if rank == 0:
            _atomic_json(ce_path, {"domains": data.names, "teacher_ce": teacher_ce.tolist()})
    return teacher, teacher_ce, tdir


# ---------------------------------------------------------------------------- distillation
def _tokenizer_id(data: PreparedData) -> str:
    from ddk.data.tokenizer import tokenizer_fingerprint

    return tokenizer_fingerprint(data.tokenizer_dir)


def check_teacher_tokenizer(teacher: Any, data: PreparedData, fn: str = "distill") -> None:
    """Raise unless ``teacher`` can be distilled into a student with ``data``'s tokenizer.

    A teacher vocabulary wider than the student's (padding rows) is allowed: the extra logits are
    sliced off. A narrower one is an error, and so is a teacher whose folder's
    ``teacher_meta.json`` (written by ``train_teacher``) names another tokenizer; both errors name
    the teacher's and the student's tokenizer. (A teacher without that file is judged by its
    vocabulary size alone.)
    """
    head = teacher.get_output_embeddings() if hasattr(teacher, "get_output_embeddings") else None
    vt = int(head.weight.shape[0]) if head is not None else int(teacher.config.vocab_size)
    source = str(getattr(teacher, "name_or_path", "") or "")
    meta_path = Path(source).parent / "teacher_meta.json" if source else None
    meta = json.loads(meta_path.read_text()) if meta_path is not None and meta_path.is_file() else {}
    mine = f"{_tokenizer_id(data)} ({data.tokenizer_dir}, {data.vocab_size} tokens)"
    if meta.get("tokenizer") not in (None, _tokenizer_id(data)):
        raise ValueError(
            f"{fn}: the teacher must be trained with the student's tokenizer {mine}; got tokenizer "
            f"{meta['tokenizer']} ({meta.get('tokenizer_dir')}, {meta.get('vocab_size')} tokens) for the teacher in "
            f"{meta_path.parent}. Train a teacher on this corpus (ddk teacher with the same data options)."  # type: ignore[union-attr]
        )
    if vt < data.vocab_size:
        raise ValueError(
            f"{fn}: the teacher's vocabulary must cover the student's tokenizer {mine} (a wider teacher, e.g. with "
            f"padding rows, is sliced); got a teacher lm_head of {vt} rows{' in ' + source if source else ''}. "
            "Teacher and student must share a tokenizer: train the teacher on this corpus (ddk teacher)."
        )


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _truncate_jsonl(path: Path, max_step: int) -> None:
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= max_step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


_RESUME_IGNORED = ("resume", "progress", "threads", "out", "log_every", "checkpoint_every", "data_dir", "offline",
                   "on_nonfinite", "skip_bad_lines", "keep_checkpoints", "dist_backend", "debug_checks", "device")
_CKPT_RE = re.compile(r"^checkpoint-(\d+)\.pt$")
_LEGACY_CKPT = "checkpoint.pt"  # the one checkpoint file of earlier versions; still resumed from


def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the run folder's ``checkpoint-<step>.pt`` files, oldest first (``.tmp`` files excluded)."""
    found = []
    if out.is_dir():
        for p in out.iterdir():
            m = _CKPT_RE.match(p.name)
            if m is not None and p.is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def _latest_checkpoint(out: Path) -> Path | None:
    """The newest ``checkpoint-<step>.pt`` of ``out`` (else a legacy ``checkpoint.pt``), or None."""
    found = _checkpoints(out)
    if found:
        return found[-1][1]
    legacy = out / _LEGACY_CKPT
    return legacy if legacy.is_file() else None


def _prune_checkpoints(out: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest ``checkpoint-<step>.pt`` files (and a legacy ``checkpoint.pt``)."""
    for _, p in _checkpoints(out)[:-keep]:
        p.unlink(missing_ok=True)
    (out / _LEGACY_CKPT).unlink(missing_ok=True)


def _device(cfg: RecipeConfig) -> torch.device:
    """Where this process distills: ``cuda:<LOCAL_RANK>`` under an NCCL process group, the CPU
    under a gloo one; one process follows ``cfg.device`` (``auto``: ``cuda:0`` when CUDA is
    available, else the CPU)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("distill: device must be 'cpu' or 'auto' without a CUDA device; got 'cuda' "
                         "(torch.cuda.is_available() is False).")
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", 0)
    return torch.device("cpu")


def _parallelize(student: torch.nn.Module, cfg: RecipeConfig, device: torch.device) -> torch.nn.Module:
    """Prepare the student for training under torch.distributed; return the module the training step calls.

    * no process group, or one rank without ``fsdp``: the student itself;
    * ``cfg.fsdp``: FSDP2 in place (``fully_shard`` on every decoder layer, then on the whole model,
      ``reshard_after_forward=True``); returns the student (now an ``FSDPModule``);
    * else DDP without buffer syncs in forward (the student's buffers are constants; and the
      estimator runs uneven numbers of forwards on the bare module, which must start no collective).

    DDP and FSDP2 both average the gradients over the ranks; ``distill`` scales each rank's loss
    to match.
    """
    _, world = rank_world()
    if cfg.fsdp:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError as exc:  # pragma: no cover - torch < 2.6
            raise ValueError(f"distill: fsdp needs torch.distributed.fsdp.fully_shard (FSDP2, torch >= 2.6); "
                             f"got torch {torch.__version__} without it ({exc}). Drop --fsdp to use DDP.") from None
        for layer in student.model.layers:
            fully_shard(layer, reshard_after_forward=True)
        fully_shard(student, reshard_after_forward=True)
        return student
    if world == 1:
        return student
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:  # newer torch
        return DistributedDataParallel(student, device_ids=ids, forward_sync_buffers=False)
    return DistributedDataParallel(student, device_ids=ids, broadcast_buffers=False)


def _train_state(student: torch.nn.Module, opt: torch.optim.Optimizer, fsdp: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(student state, optimizer state)`` to checkpoint; with FSDP2 the full (unsharded) ones, on rank 0 (a collective)."""
    if not fsdp:
        return student.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(student, options=options), get_optimizer_state_dict(student, opt, options=options)


def _load_train_state(student: torch.nn.Module, opt: torch.optim.Optimizer, ck: dict[str, Any], fsdp: bool) -> None:
    """Inverse of ``_train_state`` (with FSDP2 every rank reads the full state and keeps its shard)."""
    if not fsdp:
        student.load_state_dict(ck["student"])
        opt.load_state_dict(ck["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(student, ck["student"], options=options)
    set_optimizer_state_dict(student, opt, ck["optimizer"], options=options)


def _save_student(student: torch.nn.Module, cfg: RecipeConfig, vocab_size: int, out: Path) -> None:
    """``out/student`` (``save_pretrained`` through ``student.tmp`` + ``os.replace``), by rank 0.

    With FSDP2 every rank must call it (the full state dict is gathered), and rank 0 saves it from
    a plain copy of the model.
    """
    rank, _ = rank_world()
    if cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank != 0:
            return
        plain = _new_model(llama_config(cfg, "student", vocab_size), cfg.seed)
        missing, unexpected = plain.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is tied to the embedding
            raise RuntimeError(f"distill: the gathered FSDP state must fill the student; got missing {missing}, "
                               f"unexpected {unexpected}.")
        student = plain
    elif rank != 0:
        return
    tmp_student = out / "student.tmp"
    shutil.rmtree(tmp_student, ignore_errors=True)
    student.save_pretrained(str(tmp_student))
    shutil.rmtree(out / "student", ignore_errors=True)
    os.replace(tmp_student, out / "student")


def _global_sums(lo: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ce_sum, kd_sum, num_tokens, domain_tokens (D,))`` of a ``KDLossOutput``, summed over ranks (for the logs)."""
    if rank_world()[1] == 1:
        return lo.ce_sum, lo.kd_sum, lo.num_tokens, lo.domain_tokens
    v = torch.cat([torch.stack([lo.ce_sum.double(), lo.kd_sum.double(), lo.num_tokens.double()]),
                   lo.domain_tokens.double()])
    all_reduce_sum_(v)
    return v[0], v[1], v[2], v[3:].round().long()


def _debug_checks(cfg: RecipeConfig) -> bool:
    """``cfg.debug_checks``, or the environment variable ``DDK_DEBUG`` set to anything but ``""``/``"0"``."""
    return cfg.debug_checks or os.environ.get("DDK_DEBUG", "") not in ("", "0")



def distill(cfg: RecipeConfig, data: PreparedData | None = None, teacher: Any = None,
            teacher_ce: torch.Tensor | None = None) -> dict[str, Any]:
    """Distill one student with ``cfg.method``; write the run folder; return the summary.

    Run folder: ``config.json``, ``metrics.jsonl``, ``controller.jsonl``, ``checkpoint-<step>.pt``
    every ``checkpoint_every`` steps and at the last one (student, optimizer, LR schedule, RNG
    states, controller = sampler + smoother + estimator; written to a ``.tmp`` file then
    ``os.replace``d; only the newest ``keep_checkpoints`` are kept), ``student/``,
    ``summary.json`` and plots. With ``resume`` and a checkpoint in the folder it continues from
    the newest one (a legacy ``checkpoint.pt`` too); one that cannot be read, or one of another
    config, is an error naming the file and the mismatch, and nothing is overwritten.

    Many processes (``torchrun --nproc_per_node=R -m ddk.cli distill ...``): when ``WORLD_SIZE > 1``
    (or with ``fsdp``) it initialises the process group (``dist_backend``; ``auto``: NCCL with each
    rank on ``cuda:<LOCAL_RANK>`` when CUDA is available, else gloo on the CPU) and destroys it at
    the end. The student is wrapped in DDP, or sharded with FSDP2 with ``fsdp``; the teacher is
    replicated. ``batch_size`` is the global batch (a multiple of R): every rank draws the same
    global batch from the sampler and trains on its slice ``batch[rank::R]``. Each rank's loss is
    ``(its CE sum + gamma * its KL sum) / (N / R)``, ``N`` the all-reduced number of valid tokens
    of the global batch; DDP/FSDP average the R gradients, so the update follows the gradient of
    ``(sum over the global batch) / N``, the one-process loss, and R processes and one process
    with the same ``batch_size`` follow the same trajectory up to float summation order. The
    validation passes are sharded over the ranks and all-reduced (``DiscrepancyEstimator``). Only
    rank 0 writes files and prints; rank 0 picks the checkpoint to resume and every rank loads
    that one. With ``debug_checks`` (or ``DDK_DEBUG=1``) every DDK interval (and the last step)
    all-gathers checksums of the domain weights and the student parameters (DDP; with FSDP only
    the weights, as the shards differ by design) and raises, naming the ranks that differ.

    Args:
        cfg: the recipe config (``method``, ``steps``, ``batch_size``, ...).
        data, teacher, teacher_ce: reuse already prepared pieces (else built/loaded from cache;
            under torchrun rank 0 builds the caches while the others wait).

    Returns:
        ``summary.json``'s content: per-domain student/teacher CE, gaps, ratios, final weights,
        samples per domain, skipped batches, wall time (on every rank; rank 0 writes it).

    Raises:
        ValueError: a teacher with another tokenizer (``check_teacher_tokenizer``); with
            ``on_nonfinite="raise"``, a NaN/inf loss or gradient (``ddk.reliability.NonFiniteError``,
            naming the step and the domains). With ``on_nonfinite="skip"`` such a batch makes no
            update, is logged in ``metrics.jsonl`` (``"skipped": true``) and counted in
            ``skipped_batches`` / ``skipped_steps``.
    """
    created = init_from_env(cfg.process_group_backend, force=cfg.fsdp)
    try:
        return _distill(cfg, data, teacher, teacher_ce)
    finally:
        if created:
            dist.destroy_process_group()


def _distill(cfg: RecipeConfig, data: PreparedData | None, teacher: Any, teacher_ce: torch.Tensor | None) -> dict[str, Any]:
    """``distill`` inside the (optional) process group."""
    if cfg.method not in METHODS:
        raise ValueError(f"distill: method must be one of {METHODS}; got {cfg.method!r}.")
    rank, world = rank_world()
    if cfg.fsdp and not is_distributed():
        raise ValueError("distill: fsdp must run under torchrun (it needs a process group); got a plain process. "
                         "Launch with `torchrun --nproc_per_node=R -m ddk.cli distill --fsdp ...` or drop --fsdp.")
    if cfg.batch_size % world:
        raise ValueError(f"distill: batch_size (the global batch) must be a multiple of the number of ranks {world}; "
                         f"got {cfg.batch_size}. Pick a multiple of {world} or another --nproc_per_node.")
    device = _device(cfg)
    debug = _debug_checks(cfg)
    _set_threads(cfg)
    t_start = time.perf_counter()
    if data is None:
        with rank_zero_first():  # under torchrun rank 0 builds the corpus/tokenizer/token caches, the others read them
            data = prepare_data(cfg)
    if teacher is None or teacher_ce is None:
        teacher, teacher_ce, _ = train_teacher(cfg, data)
    check_teacher_tokenizer(teacher, data)
    teacher = teacher.to(device)
    out = cfg.run_dir
    out.mkdir(parents=True, exist_ok=True)
    # rank 0 picks the checkpoint and every rank loads that one
    ckpt_path = broadcast_object(_latest_checkpoint(out) if cfg.resume and rank == 0 else None)
    metrics_path, ctrl_path = out / "metrics.jsonl", out / "controller.jsonl"
    cfg_dict = cfg.to_dict()
    d = len(data.names)
    sizes = [len(t) for t in data.train]
    train = data.train_all

    student = _new_model(llama_config(cfg, "student", data.vocab_size), cfg.seed).to(device)
    model = _parallelize(student, cfg, device)  # what the training step calls; `student` stays the bare module
    opt, sched = _optimizer(student, cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    sampler = MixtureSampler(sizes, cfg.batch_size, seed=cfg.seed, domain_names=data.names, num_batches=cfg.steps,
                             rank=rank, world_size=world)
    estimator = DiscrepancyEstimator(data.validation_batches(cfg.eval_batch_size), teacher_ce=teacher_ce, progress=False)
    smoother = FactorSmoother(d, alpha=cfg.alpha, mode=_SMOOTHER_MODE[cfg.method], init=cfg.ddk_init)
    guard = NonFiniteGuard(cfg.on_nonfinite, domain_names=data.names, fn="distill",
                           hint="pass --on-nonfinite skip (config on_nonfinite: skip) to skip such batches; the run "
                                "resumes from its last checkpoint")
    controller = DDKController(estimator, smoother, sampler, interval=cfg.interval, log_path=ctrl_path,
                               online=cfg.method == "ddk-online")
    start_step = 0
    if ckpt_path is not None:
        try:
            ck = torch.load(ckpt_path, weights_only=False, map_location="cpu")
            ck_config = ck["config"]
        except Exception as exc:  # noqa: BLE001 - truncated, corrupted or foreign file: say which
            raise ValueError(
                f"distill: the checkpoint {ckpt_path} must be a complete checkpoint of this recipe to resume; "
                f"got an unreadable file ({type(exc).__name__}: {exc}). Nothing was overwritten: move it "
                "away, or pass --no-resume to start over."
            ) from exc
        defaults = RecipeConfig().to_dict()  # options added since the checkpoint was written: their defaults
        old = {k: v for k, v in {**defaults, **ck_config}.items() if k not in _RESUME_IGNORED}
        new = {k: v for k, v in cfg_dict.items() if k not in _RESUME_IGNORED}
        if old != new:
            diff = sorted(k for k in new if old.get(k) != new[k])
            raise ValueError(f"distill: the checkpoint {ckpt_path} must be of the same config to resume; "
                             f"got different {diff} (use another --out or --no-resume).")
        _load_train_state(student, opt, ck, cfg.fsdp)
        sched.load_state_dict(ck["scheduler"])
        controller.load_state_dict(ck["controller"])
        guard.load_state_dict(ck.get("nonfinite", {"skipped_steps": []}))
        _set_rng_state(ck["rng"])
        start_step = int(ck["step"])
        if rank == 0:
            _truncate_jsonl(metrics_path, start_step)
            _truncate_jsonl(ctrl_path, start_step)
        if cfg.progress:
            _log(f"distill: resumed {out} at step {start_step}")
    else:
        if rank == 0:
            old_ckpts = [p for _, p in _checkpoints(out)] + [out / _LEGACY_CKPT]
            for p in (metrics_path, ctrl_path, out / "summary.json", *old_ckpts):
                p.unlink(missing_ok=True)
            _atomic_json(out / "config.json", cfg_dict)
        controller.start(student)

    def save_checkpoint(step: int) -> None:
        """``checkpoint-<step>.pt`` through ``.tmp`` + ``os.replace`` (rank 0), then keep the newest ``keep_checkpoints``."""
        student_state, opt_state = _train_state(student, opt, cfg.fsdp)  # a collective under FSDP
        ctrl_state = controller.state_dict()
        if world > 1 and controller.online:  # every rank's online sums, restored on rank 0 at resume: none lost
            acc = ctrl_state["estimator"]["online"] or [[0.0] * 4 for _ in range(d)]
            acc = all_reduce_sum_(torch.tensor(acc, dtype=torch.float64, device=collective_device(device)))
            ctrl_state["estimator"]["online"] = acc.cpu().tolist()
        if rank != 0:
            return
        path = out / f"checkpoint-{step}.pt"
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"step": step, "config": cfg_dict, "student": student_state, "optimizer": opt_state,
                    "scheduler": sched.state_dict(), "rng": _rng_state(), "controller": ctrl_state,
                    "nonfinite": guard.state_dict()}, tmp)
        os.replace(tmp, path)
        _prune_checkpoints(out, cfg.keep_checkpoints)

    use_teacher = cfg.method != "cpt"
    gamma = cfg.gamma if use_teacher else 0.0
    student.train()
    bar = tqdm(range(start_step + 1, cfg.steps + 1), desc=f"distill {cfg.method}", disable=not cfg.progress or rank != 0,
               initial=start_step, total=cfg.steps)
    with metrics_path.open("a", encoding="utf-8") if rank == 0 else open(os.devnull, "w") as mf:
        for step in bar:
            idx = torch.as_tensor(sampler.next_global_batch())[rank::world].contiguous()  # this rank's slice
            batch = train[idx]
            inputs, labels = batch[:, :-1].to(device), batch[:, 1:].reshape(-1).to(device)
            dom = sampler.domain_of(idx).unsqueeze(1).expand(-1, inputs.shape[1]).reshape(-1).to(device)
            # R ranks: divide by (global valid tokens) / R, so DDP's/FSDP's mean of the R gradients is the
            # gradient of (sum over the global batch) / (global valid tokens), the one-process loss.
            norm = global_token_normalizer((labels != -100).sum())
            logits = model(input_ids=inputs).logits
            n, v = logits.shape[0] * logits.shape[1], logits.shape[-1]
            s_logits = logits.reshape(n, v)
            if use_teacher:
                with torch.no_grad():
                    t_logits = teacher(input_ids=inputs).logits.reshape(n, -1)
            else:
                t_logits = s_logits.detach()
            lo = kd_loss(s_logits, t_logits, labels, domain_ids=dom, num_domains=d, gamma=gamma,
                         temperature=cfg.temperature, backend=cfg.backend, normalizer=norm)
            opt.zero_grad(set_to_none=True)
            lo.loss.backward()
            gnorm = (torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip) if cfg.grad_clip
                     else grad_norm(student.parameters()))
            if hasattr(gnorm, "full_tensor"):  # FSDP2: a DTensor; the guard all-reduces plain tensors
                gnorm = gnorm.full_tensor()
            finite = guard.check(step, lo, grad_norm=gnorm, domain_ids=dom,
                                 tensors={"student_logits": s_logits, "teacher_logits": t_logits})
            if finite:
                opt.step()
            else:  # skipped (on_nonfinite="skip"): no update; the step, sampler and LR schedule still advance
                opt.zero_grad(set_to_none=True)
            sched.step()
            if controller.online and finite:
                with torch.no_grad():
                    t_ce = F.cross_entropy(t_logits[:, :v].float(), labels, reduction="none")
                    t_sum = torch.zeros(d, dtype=torch.float64, device=dom.device).index_add_(0, dom, t_ce.double())
                controller.observe(lo, teacher_ce_sum=t_sum)
            n_rec = len(controller.records)
            controller.step_end(step, student)
            rec: dict[str, Any] | None = None
            if not finite or step % cfg.log_every == 0 or step % cfg.interval == 0 or step == cfg.steps:
                ce_sum, kd_sum, num_tok, dom_tok = _global_sums(lo)  # over all ranks (as is in one process)
                tok = max(int(num_tok), 1)
                loss = float(lo.loss.detach()) if world == 1 else (float(ce_sum) + gamma * float(kd_sum)) / tok
                rec = {"step": step, "tokens_seen": step * cfg.batch_size * cfg.seq_len, "loss": loss,
                       "ce": float(ce_sum) / tok, "kd": float(kd_sum) / tok, "lr": sched.get_last_lr()[0],
                       "weights": list(sampler.weights), "batch_domain_tokens": dom_tok.tolist(),
                       "skipped_batches": guard.skipped_batches}
                if not finite:
                    rec.update(skipped=True, loss=None, ce=None, kd=None)
            if step % cfg.interval == 0 or step == cfg.steps:
                new = controller.records[n_rec:] if len(controller.records) > n_rec else []
                if new and not controller.online:
                    disc = new[-1]
                    val = {"student_ce": disc["student_ce"], "teacher_ce": disc["teacher_ce"], "ratio": disc["ratio"]}
                else:
                    e = estimator.estimate(student)
                    val = {"student_ce": e.student_ce.tolist(), "teacher_ce": e.teacher_ce.tolist(), "ratio": e.ratio.tolist()}
                    if new:
                        val["online_ratio"] = new[-1]["ratio"]
                assert rec is not None
                rec.update(val)
                bar.set_postfix(loss="skipped" if rec["loss"] is None else f"{rec['loss']:.3f}", gap=f"{np.mean(np.log(rec['ratio'])):.3f}")
            if rec is not None:
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
            if debug and (step % cfg.interval == 0 or step == cfg.steps):
                sums = {"domain weights": tensor_checksum([torch.tensor(sampler.weights, dtype=torch.float64)])}
                if not cfg.fsdp:  # FSDP shards differ by design
                    sums["student parameters"] = tensor_checksum(student.parameters())
                check_same_across_ranks(sums, where=f"distill step {step}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_checkpoint(step)
    bar.close()
    final = estimator.estimate(student)
    _save_student(student, cfg, data.vocab_size, out)
    summary = {
        "method": cfg.method, "seed": cfg.seed, "domains": data.names,
        "student_ce": final.student_ce.tolist(), "teacher_ce": final.teacher_ce.tolist(),
        "gap": final.gap.tolist(), "ratio": final.ratio.tolist(),
        "mean_gap": float(final.gap.mean()), "worst_gap": float(final.gap.max()),
        "mean_ratio": float(final.ratio.mean()),
        "final_weights": list(sampler.weights), "samples_per_domain": sampler.cumulative_counts().tolist(),
        "skipped_batches": guard.skipped_batches, "skipped_steps": list(guard.skipped_steps),
        "tokens": cfg.steps * cfg.batch_size * cfg.seq_len, "wall_seconds": time.perf_counter() - t_start,
        "student_params": sum(p.numel() for p in student.parameters()),
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
    }
    if rank != 0:
        return summary
    _atomic_json(out / "summary.json", summary)
    summary["plots"] = _plots(out, cfg.method)
    print(format_table([summary]))
    for p in summary["plots"]:
        print(f"plot: {p}")
    return summary


def _plots(out: Path, method: str) -> list[str]:
    try:
        from ddk.plotting import plot_gaps, plot_weights
    except ImportError:  # pragma: no cover
        return []
    paths = []
    try:
        paths.append(str(plot_weights(out / "controller.jsonl", out / "weights.png", title=f"{method}: domain weights")))
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "student_ce" in line]
        names = json.loads((out / "summary.json").read_text())["domains"]
        if recs:
            for r in recs:
                r["domain_names"] = names
            paths.append(str(plot_gaps(recs, out / "gaps.png", title=f"{method}: validation CE gap to the teacher")))
    except ImportError as e:  # pragma: no cover - matplotlib missing
        _log(f"plots skipped: {e}")
    return paths


def format_table(summaries: list[dict[str, Any]]) -> str:
    """Per-domain CE gap (student - teacher, nats/token) per run, with mean, worst and mean ppl ratio."""
    names = summaries[0]["domains"]
    w = max(10, max(len(n) for n in names) + 2)
    head = f"{'method':<18}" + "".join(f"{n[:w - 1]:>{w}}" for n in names) + f"{'mean':>9}{'worst':>9}{'ppl-ratio':>11}"
    rows = [head, "-" * len(head)]
    for s in summaries:
        label = s["method"] + (f" s{s['seed']}" if len(summaries) > 1 and "seed" in s else "")
        rows.append(f"{label:<18}" + "".join(f"{g:>{w}.4f}" for g in s["gap"])
                    + f"{s['mean_gap']:>9.4f}{s['worst_gap']:>9.4f}{s['mean_ratio']:>11.4f}")
    rows.append(f"{'teacher CE':<18}" + "".join(f"{c:>{w}.4f}" for c in summaries[0]["teacher_ce"]))
    rows.append(f"{'student CE':<18}" + "".join(f"{c:>{w}.4f}" for c in summaries[-1]["student_ce"]))
    return "\n".join(rows)


# ---------------------------------------------------------------------------- evaluate / demo
def evaluate(run_dir: str | os.PathLike[str], cfg: RecipeConfig | None = None) -> dict[str, Any]:
    """Per-domain validation CE of a finished run's student and of its teacher; writes ``eval.json``."""
    from transformers import LlamaForCausalLM

    from ddk.recipes.config import make_config

    run = Path(run_dir)
    if not (run / "student" / "config.json").is_file() or not (run / "config.json").is_file():
        raise ValueError(f"evaluate: run_dir must be a finished distill run (with config.json and student/); got {str(run)!r}.")
    if cfg is None:
        saved = json.loads((run / "config.json").read_text())
        cfg = make_config(**saved)
    data = prepare_data(cfg)
    teacher, teacher_ce, _ = train_teacher(cfg, data)
    student = LlamaForCausalLM.from_pretrained(str(run / "student"))
    est = DiscrepancyEstimator(data.validation_batches(cfg.eval_batch_size), teacher_ce=teacher_ce, progress=cfg.progress)
    disc = est.estimate(student)
    res = {"method": cfg.method, "seed": cfg.seed, "domains": data.names, "student_ce": disc.student_ce.tolist(),
           "teacher_ce": disc.teacher_ce.tolist(), "gap": disc.gap.tolist(), "ratio": disc.ratio.tolist(),
           "mean_gap": float(disc.gap.mean()), "worst_gap": float(disc.gap.max()), "mean_ratio": float(disc.ratio.mean())}
    _atomic_json(run / "eval.json", res)
    print(format_table([res]))
    return res


def run_demo(cfg: RecipeConfig) -> dict[str, Any]:
    """Corpus + tokenizer + teacher (cached) + one distillation + table + plots, timed.

    A finished demo run is redone from scratch; an interrupted one resumes from its checkpoint.
    Under ``torchrun`` it runs on every rank like ``distill`` (rank 0 builds the caches first).
    """
    created = init_from_env(cfg.process_group_backend, force=cfg.fsdp)
    try:
        return _run_demo(cfg)
    finally:
        if created:
            dist.destroy_process_group()


def _run_demo(cfg: RecipeConfig) -> dict[str, Any]:
    import dataclasses

    if broadcast_object((cfg.run_dir / "summary.json").is_file()):
        cfg = dataclasses.replace(cfg, resume=False)
    t0 = time.perf_counter()
    with rank_zero_first():
        data = prepare_data(cfg)
    t_data = time.perf_counter() - t0
    teacher, teacher_ce, _ = train_teacher(cfg, data)
    t_teacher = time.perf_counter() - t0 - t_data
    summary = distill(cfg, data, teacher, teacher_ce)
    total = time.perf_counter() - t0
    if rank_world()[0] == 0:
        print(f"\ntimes: data {t_data:.0f} s, teacher {t_teacher:.0f} s, distill {summary['wall_seconds']:.0f} s, total {total:.0f} s")
        print(f"run folder: {cfg.run_dir}")
    summary["demo_seconds"] = {"data": t_data, "teacher": t_teacher, "total": total}
    return summary
