"""DDK inside ``transformers.Trainer``: ``DDKTrainer`` and its ``DDKCallback``.

* ``compute_loss`` runs the frozen teacher under ``torch.no_grad`` and returns
  ``kd_loss(student, teacher, labels, domain_ids=...)`` (``CE + gamma * KL(p_T || p_S)``) with the
  domain of every token taken from the sampler's global index of its example.
* ``get_train_dataloader`` draws batches with the controller's ``MixtureSampler`` (as the
  ``batch_sampler``, in the main process; it already slices ranks, so the loader is not sharded
  again by accelerate).
* ``DDKCallback`` starts the controller at ``on_train_begin`` (Eq. 1), calls
  ``controller.step_end(global_step, model)`` at ``on_step_end`` (Eq. 2 every ``interval``
  steps) and, at ``on_save``, writes ``ddk_state.json`` (``controller.state_dict()`` at the first
  global batch not yet consumed) into the checkpoint folder.
* ``train(resume_from_checkpoint=...)`` loads ``ddk_state.json`` back, so the sampler and the
  controller continue exactly; the Trainer's own data skipping is switched off
  (``ignore_data_skip``), since the sampler's state already says where the data stream is.

The ``train_dataset`` is a map-style dataset whose index ``i`` is the sampler's global index
(the domains concatenated in the sampler's order); its items are dicts the ``data_collator``
batches into ``input_ids`` ``(B, L)`` (and optionally ``attention_mask``, ``labels``).
``transformers`` is imported only when this module is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer, TrainerCallback
from transformers.data.data_collator import default_data_collator
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ddk._io import atomic_write_text
from ddk.controller import DDKController
from ddk.losses import kd_loss

__all__ = ["DDK_STATE_NAME", "DDKCallback", "DDKTrainer"]

DDK_STATE_NAME = "ddk_state.json"
_INDEX_KEY = "ddk_index"


class _IndexedDataset(Dataset):  # type: ignore[type-arg]
    """Adds the global index to each item so ``compute_loss`` can look up its domain."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.base[i]
        if not isinstance(item, Mapping):
            raise TypeError(f"DDKTrainer: train_dataset items must be dicts (e.g. {{'input_ids': ...}}); got {type(item).__name__}.")
        return {**item, _INDEX_KEY: i}


class DDKCallback(TrainerCallback):
    """Starts, steps and checkpoints a ``DDKController`` alongside a ``Trainer``."""

    def __init__(self, trainer: DDKTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        tr = self.trainer
        if not tr.controller.estimator.has_teacher_ce:
            tr.controller.estimator.compute_teacher(tr.teacher)
        if not tr.controller.started:
            tr.controller.start(tr.model)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.controller.step_end(int(state.global_step), self.trainer.model)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = Path(self.trainer._get_output_dir(None)) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir() or not self.trainer.is_world_process_zero():
            return
        consumed = int(state.global_step) * int(args.gradient_accumulation_steps)
        state_dict = self.trainer.controller.state_dict(at_batch=consumed)
        atomic_write_text(folder / DDK_STATE_NAME, json.dumps(state_dict))


class DDKTrainer(Trainer):
    """A ``transformers.Trainer`` that distills with DDK.

    Args:
        *args, **kwargs: those of ``Trainer`` (``model`` is the student; ``train_dataset`` is
            indexed by the sampler's global indices; ``args.max_steps`` must be set when the
            sampler is infinite).
        teacher: the frozen teacher (same tokenizer; a larger padded vocabulary is sliced).
        controller: a ``DDKController`` whose sampler is a ``MixtureSampler`` with
            ``global_batch_size == per_device_train_batch_size * world_size``.
        gamma: weight of the divergence (paper: 0.2).
        temperature: T of the divergence (paper: 1.0).
        divergence: ``"forward_kl"`` (KL(p_T || p_S), default), ``"reverse_kl"`` or ``"jsd"``.
        kd_backend: ``kd_loss`` backend.

    Example:
        >>> # trainer = DDKTrainer(model=student, args=TrainingArguments(..., max_steps=1000),
        >>> #                      train_dataset=concatenated, teacher=teacher, controller=controller)
        >>> # trainer.train()                        # later: trainer.train(resume_from_checkpoint=True)
    """

    def __init__(self, *args: Any, teacher: torch.nn.Module, controller: DDKController, gamma: float = 0.2,
                 temperature: float = 1.0, divergence: str = "forward_kl", kd_backend: str = "auto",
                 **kwargs: Any) -> None:
        fn = "DDKTrainer"
        if not isinstance(controller, DDKController):
            raise TypeError(f"{fn}: controller must be a DDKController; got {type(controller).__name__}.")
        if not isinstance(teacher, torch.nn.Module):
            raise TypeError(f"{fn}: teacher must be a torch.nn.Module; got {type(teacher).__name__}.")
        super().__init__(*args, **kwargs)
        sampler = controller.sampler
        per_rank = sampler.global_batch_size // sampler.world_size
        if per_rank != self.args.per_device_train_batch_size:
            raise ValueError(
                f"{fn}: controller.sampler.global_batch_size / world_size must equal "
                f"per_device_train_batch_size={self.args.per_device_train_batch_size}; got {per_rank}."
            )
        if self.train_dataset is not None and hasattr(self.train_dataset, "__len__"):
            total = sum(sampler.domain_sizes)
            if len(self.train_dataset) != total:
                raise ValueError(f"{fn}: train_dataset must hold sum(sampler.domain_sizes)={total} examples; "
                                 f"got {len(self.train_dataset)}.")
        self.teacher = teacher.to(self.args.device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.controller = controller
        self.gamma = gamma
        self.temperature = temperature
        self.divergence = divergence
        self.kd_backend = kd_backend
        self.args.ignore_data_skip = True  # the sampler state says where the stream is
        self.model_accepts_loss_kwargs = False  # mean loss per micro-batch; Trainer scales accumulation
        self.add_callback(DDKCallback(self))

    # ------------------------------------------------------------------ data
    def _collate(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        index = torch.tensor([f[_INDEX_KEY] for f in features], dtype=torch.long)
        collator = self.data_collator or default_data_collator
        batch = collator([{k: v for k, v in f.items() if k != _INDEX_KEY} for f in features])
        batch[_INDEX_KEY] = index
        return dict(batch)

    def get_train_dataloader(self) -> DataLoader:  # type: ignore[type-arg]
        """A ``DataLoader`` whose ``batch_sampler`` is the controller's ``MixtureSampler``."""
        if self.train_dataset is None:
            raise ValueError("DDKTrainer.get_train_dataloader: train_dataset must be given; got None.")
        return DataLoader(
            _IndexedDataset(self.train_dataset), batch_sampler=self.controller.sampler, collate_fn=self._collate,
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory,
        )

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """``kd_loss`` of the student against the teacher on one micro-batch (mean over valid tokens).

        Shapes: ``input_ids`` ``(B, L)``; logits ``(B, L, V)`` are shifted and flattened to
        ``(B * (L - 1), V)``; labels default to ``input_ids`` with padding set to -100.
        """
        inputs = dict(inputs)
        index = inputs.pop(_INDEX_KEY, None)  # absent in eval batches (not drawn by the sampler)
        labels = inputs.pop("labels", None)
        input_ids = inputs["input_ids"]
        if labels is None:
            labels = input_ids.clone()
            if inputs.get("attention_mask") is not None:
                labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
        outputs = model(**inputs)
        logits = outputs.logits[:, :-1, :]
        b, l, v = logits.shape
        with torch.no_grad():
            t_logits = self.teacher(**inputs).logits[:, :-1, :]
        dom, num_domains = None, None
        if index is not None:
            domains = self.controller.sampler.domain_of(index.to(logits.device))
            dom = domains.unsqueeze(1).expand(b, l).reshape(-1)
            num_domains = self.controller.estimator.num_domains
        out = kd_loss(
            logits.reshape(b * l, v), t_logits.reshape(b * l, -1), labels[:, 1:].reshape(-1).to(logits.device),
            domain_ids=dom, num_domains=num_domains, gamma=self.gamma,
            temperature=self.temperature, divergence=self.divergence, backend=self.kd_backend,
        )
        if self.controller.online and model.training and index is not None:
            self.controller.observe(out)
        return (out.loss, outputs) if return_outputs else out.loss

    # ------------------------------------------------------------------ resume
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; when resuming, first restores the DDK state saved with the checkpoint."""
        path: str | None = None
        if resume_from_checkpoint is True:
            path = get_last_checkpoint(self.args.output_dir)
            if path is None:
                raise ValueError(f"DDKTrainer.train: resume_from_checkpoint=True needs a checkpoint in "
                                 f"{self.args.output_dir}; got none.")
        elif isinstance(resume_from_checkpoint, (str, os.PathLike)):
            path = str(resume_from_checkpoint)
        if path is not None:
            state_file = Path(path) / DDK_STATE_NAME
            if not state_file.is_file():
                raise ValueError(f"DDKTrainer.train: the checkpoint must hold {DDK_STATE_NAME} (saved by DDKTrainer); "
                                 f"got none in {path}.")
            self.controller.load_state_dict(json.loads(state_file.read_text()))
        return super().train(resume_from_checkpoint, *args, **kwargs)
