"""One training step and one validation CE, written once for every client.

* ``StepLoss``: the loss of a method, chosen once (``fused`` or ``logits``, the divergence, gamma,
  temperature, the backend) and used for training (``StepLoss.__call__``) **and** validation
  (``StepLoss.validation_ce``, the estimator's ``loss_fn``), so a model that needs the logits
  path (a logit scale) takes it everywhere.
* ``DistillStep``: the step as a module for the engine's loop (the student its submodule, so DDP
  and FSDP2 reduce every gradient; the teacher held outside its parameters).
* ``forward_backward``: micro-batches under the global token normaliser.
* ``make_optimizer``: AdamW + warm-up and cosine (the CLI's; ``DDKTrainer(optimizers=...)`` takes it
  for the same trajectory).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ddk.engine.config import DistillOptions
from ddk.engine.methods import method_spec
from ddk.losses import causal_lm_kd_loss
from ddk_kernels.types import KDLossOutput

__all__ = [
    "CACHED_KEYS",
    "MODEL_KEYS",
    "check_loss_models",
    "DistillStep",
    "StepLoss",
    "forward_backward",
    "make_optimizer",
    "seed_everything",
    "sum_outputs",
]

MODEL_KEYS: tuple[str, ...] = ("input_ids", "attention_mask", "labels")  # what the models read
CACHED_KEYS: tuple[str, ...] = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail")  # a teacher cache's batch


@dataclass(frozen=True)
class StepLoss:
    """The loss of a distillation method on a batch of a transformers causal-LM pair.

    Attributes:
        loss: ``"fused"`` (with the ``lm_head``, no ``(B * L, V)`` logits) or ``"logits"``.
        gamma: divergence weight (0 for a method without a teacher).
        temperature, divergence, beta, backend: as ``ddk.kd_loss``.
        num_domains: D, the length of the per-domain sums.
        autocast: the autocast dtype of the forward passes, or None (float32).
    """

    loss: str
    gamma: float
    temperature: float
    divergence: str
    beta: float
    backend: str
    num_domains: int
    autocast: torch.dtype | None = None

    @classmethod
    def of(cls, options: DistillOptions, num_domains: int, autocast: torch.dtype | None = None) -> StepLoss:
        """The loss of ``options.method`` (gamma 0 for ``cpt``)."""
        spec = method_spec(options.method)
        return cls(
            loss=options.loss,
            gamma=float(options.gamma) if spec.teacher else 0.0,
            temperature=float(options.temperature),
            divergence=options.divergence,
            beta=float(options.beta),
            backend=options.backend,
            num_domains=num_domains,
            autocast=autocast,
        )

    @classmethod
    def cross_entropy(cls, loss: str = "fused", backend: str = "auto", autocast: torch.dtype | None = None) -> StepLoss:
        """The CE alone (no teacher, one domain): the loss of continued pretraining and of validation."""
        return cls(loss, 0.0, 1.0, "forward_kl", 0.5, backend, 1, autocast)

    def check_models(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """``check_loss_models(self.loss, student, teacher)``."""
        check_loss_models(self.loss, student, teacher)

    def ce_only(self) -> StepLoss:
        """This loss without the divergence: the student's CE alone (validation passes)."""
        return dataclasses.replace(self, gamma=0.0, num_domains=1)

    def _autocast(self, device: torch.device) -> Any:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)

    def __call__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        batch: Mapping[str, torch.Tensor],
        *,
        domain_ids: torch.Tensor | None = None,
        normalizer: torch.Tensor | float | None = None,
    ) -> KDLossOutput:
        """``CE + gamma * D(p_T, p_S)`` on ``batch`` (``input_ids``/``labels`` ``(B, L)``, optional
        ``attention_mask`` and a cached teacher's ``CACHED_KEYS``); ``domain_ids`` ``(B,)`` int64."""
        cached = all(batch.get(k) is not None for k in CACHED_KEYS[:2])  # ids and log-probabilities; the tail optional
        kd_on = self.gamma > 0 and (teacher is not None or cached)
        keys = MODEL_KEYS + (CACHED_KEYS if kd_on else ())
        inputs = {k: batch[k] for k in keys if batch.get(k) is not None}
        opts: dict[str, Any] = dict(
            gamma=self.gamma if kd_on else 0.0,
            temperature=self.temperature,
            divergence=self.divergence,
            beta=self.beta,
            backend=self.backend,
            loss=self.loss,
            normalizer=normalizer,
        )
        if domain_ids is not None:
            opts.update(domain_ids=domain_ids, num_domains=self.num_domains)
        with self._autocast(batch["input_ids"].device):
            return causal_lm_kd_loss(student, teacher if kd_on else None, inputs, **opts)

    def validation_ce(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(CE sum float64, valid tokens int64)`` of ``model`` on one validation batch, by the same
        loss path as training (the ``DiscrepancyEstimator``'s ``loss_fn``). A ``DistillStep`` is
        entered through its ``forward`` (FSDP2 gathers the student's parameters there)."""
        ids = batch["input_ids"]
        labels = batch.get("labels", ids)
        if isinstance(model, DistillStep):
            out = model(ids, labels, distill=False)[1]
        else:
            out = self.ce_only()(model, None, {"input_ids": ids, "labels": labels})
        return out.ce_sum.double(), out.num_tokens


class DistillStep(nn.Module):
    """The training step as a module: the student is its submodule, the teacher is held outside
    its parameters (never trained, never sharded with the student).

    ``forward(input_ids (B, L), labels (B, L), domain_ids (B,), normalizer, distill=True, cached=None)``
    returns ``(loss, KDLossOutput)`` (``cached``: the batch's ``CACHED_KEYS`` tensors from a teacher
    cache). One forward touches every student parameter (``lm_head`` included), so DDP and FSDP2
    reduce its gradients. ``distill=False`` gives the student's CE alone (the validation passes;
    under FSDP2 they too must enter through the root module).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, loss: StepLoss) -> None:
        super().__init__()
        self.student = student
        self._teacher = [teacher]  # a list: not a submodule
        self.loss = loss

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0]

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        domain_ids: torch.Tensor | None = None,
        normalizer: torch.Tensor | None = None,
        distill: bool = True,
        cached: tuple[torch.Tensor | None, ...] | None = None,
    ) -> tuple[torch.Tensor, KDLossOutput]:
        batch = {"input_ids": input_ids, "labels": labels}
        if not distill:
            out = self.loss.ce_only()(self.student, None, batch)
            return out.loss, out
        if cached is not None:
            batch.update((k, v) for k, v in zip(CACHED_KEYS, cached) if v is not None)
        out = self.loss(self.student, self.teacher, batch, domain_ids=domain_ids, normalizer=normalizer)
        return out.loss, out


def check_loss_models(loss: str, student: nn.Module, teacher: nn.Module | None) -> None:
    """Refuse now, before data is packed or anything is written, models the ``loss`` path cannot take
    (``"fused"``: scaled logits, ``config.logit_scale`` / ``logits_scaling``; soft-capping and
    ``lm_head`` biases are computed in the fused tiles); the message names the model, the
    attribute and ``--loss logits``. The teacher is checked whenever given (its validation CE uses this loss)."""
    if loss == "fused":
        from ddk.losses.causal_lm import check_fused_models

        check_fused_models(student, teacher)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), NumPy and Python's ``random``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def sum_outputs(outs: list[KDLossOutput]) -> KDLossOutput:
    """One ``KDLossOutput`` of a step's micro-batches (losses are already over the global normaliser)."""
    if len(outs) == 1:
        return outs[0]
    return KDLossOutput(
        *(
            sum(getattr(o, f) for o in outs)
            for f in ("loss", "ce_sum", "kd_sum", "num_tokens", "domain_ce_sum", "domain_kd_sum", "domain_tokens")
        )
    )


def forward_backward(
    model: nn.Module, batch: dict[str, torch.Tensor], norm: torch.Tensor | None, accum: int
) -> KDLossOutput:
    """Forward and backward of one rank's slice in ``accum`` micro-batches; returns their summed output.

    ``model``: a ``DistillStep`` (or its DDP/FSDP2 wrapper). ``norm`` (the global valid-token count
    over the ranks) divides every micro-batch's sums, so the accumulated gradient is that of the
    whole global batch's mean, whatever its split. Under DDP only the last micro-batch all-reduces
    the gradients."""
    if norm is None:  # one process: the valid tokens of the whole batch (not of each micro-batch)
        norm = (batch["labels"][:, 1:] != -100).sum().clamp(min=1)
    outs = []
    for i, rows in enumerate(torch.arange(batch["input_ids"].shape[0]).chunk(accum)):
        last = i == accum - 1
        no_sync = getattr(model, "no_sync", None)  # DDP's: skip the all-reduce of all but the last micro-batch
        sync = no_sync() if callable(no_sync) and not last else contextlib.nullcontext()
        cached = tuple(batch[k][rows] if k in batch else None for k in CACHED_KEYS) if CACHED_KEYS[0] in batch else None
        with sync:
            loss, out = model(
                batch["input_ids"][rows], batch["labels"][rows], batch["domain_ids"][rows], norm, cached=cached
            )
            loss.backward()
        outs.append(out)
    return sum_outputs(outs)


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, warmup: int, total: int, min_ratio: float
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (betas (0.9, 0.95); no decay on norms and biases) + linear warm-up to ``lr`` then
    cosine to ``lr * min_ratio`` at step ``total``."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
