"""The distillation engine: written once, used by every client.

``ddk distill`` runs the engine's loop (``ddk.engine.loop.distill``); ``DDKTrainer`` keeps
transformers' loop and takes from here its components, its step loss, its saved state and its
evaluation. One module per concern:

* ``config``: ``DistillOptions`` (the options every client shares) and ``RunConfig`` (the loop's);
* ``methods``: what each method means (``MethodSpec``) and its weight schedule (``make_scheduler``);
* ``components``: data -> sampler, estimator, schedule, controller, the teacher-CE source;
* ``step``: the loss of training and validation (``StepLoss``), micro-batches, the optimiser;
* ``checkpoint``: every stateful part under a fixed key (safetensors + JSON + SHA-256), RNG files;
* ``sharded``, ``tensorfile``: checkpoints written by every rank (torch.distributed.checkpoint),
  read at any number of ranks; ``export``: the student out of FSDP2 one tensor at a time;
* ``loop``, ``runfolder``, ``preempt``, ``parallel``, ``models``: the loop ``ddk distill`` runs;
* ``evaluate``: per-domain CE of a student and its teacher, checked against the run.
* ``tracking``: the scalars a run reports (per-domain weights and gaps, CE/KD) to TensorBoard or W&B;
* ``sizing``: per-GPU memory and FLOPs of a step from model configs alone (no weights).
"""

from ddk.engine.components import VALIDATION_SPLIT_SEED, Components, build_components, load_run_data
from ddk.engine.config import DistillOptions, RunConfig
from ddk.engine.evaluate import discrepancy_report, evaluate_run
from ddk.engine.methods import ADAPTIVE_METHODS, METHODS, MethodSpec, make_scheduler, method_spec
from ddk.engine.step import DistillStep, StepLoss, forward_backward, make_optimizer

__all__ = [
    "ADAPTIVE_METHODS",
    "METHODS",
    "VALIDATION_SPLIT_SEED",
    "Components",
    "DistillOptions",
    "DistillStep",
    "MethodSpec",
    "RunConfig",
    "StepLoss",
    "build_components",
    "discrepancy_report",
    "evaluate_run",
    "forward_backward",
    "load_run_data",
    "make_optimizer",
    "make_scheduler",
    "method_spec",
]
