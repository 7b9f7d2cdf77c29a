"""``ddk distill`` and ``ddk evaluate``: the engine's loop and evaluation, with the CLI's report.

Everything a run does (components, step, validation, checkpoints, the run folder) is the engine's
(``ddk.engine``); this module adds the table and the plots a person reads at the end.
"""

from __future__ import annotations

import os
from typing import Any

from ddk.distributed import is_distributed, rank_world
from ddk.engine import loop
from ddk.engine.evaluate import evaluate_run
from ddk.engine.preempt import Preempted, set_stage, stop_signals
from ddk.engine.runfolder import log
from ddk.recipes.config import RecipeConfig

__all__ = ["Preempted", "distill", "evaluate"]


def distill(cfg: RecipeConfig, *, prepared: Any = None) -> dict[str, Any]:
    """Distill one student with ``cfg.method`` (``ddk.engine.loop.distill``), then print the
    per-domain table and write the plots (rank 0). Returns ``summary.json``'s content.

    Args:
        cfg: the recipe config (``teacher``, ``student``, ``data``, ``method``, ``steps``, ...).
        prepared: ``(teacher, student, tokenizer, packed)`` already loaded (the demo), else loaded.
    """
    rank = rank_world()[0] if is_distributed() else int(os.environ.get("RANK", "0"))  # the group ends in distill
    with stop_signals("distill", "start-up"):  # SIGTERM/SIGINT until the end: Preempted (exit 75)
        summary = loop.distill(cfg, prepared=prepared)
        set_stage("writing the plots")
        if rank == 0:
            from ddk.recipes.report import format_table, plots

            summary["plots"] = plots(cfg.run_dir, cfg.method)
            print(format_table([summary]))
            for p in summary["plots"]:
                log(f"plot: {p}")
    return summary


def evaluate(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``ddk evaluate RUN``: ``ddk.engine.evaluate_run`` (writes ``eval.json``) and its table."""
    from ddk.recipes.report import format_table

    res = evaluate_run(run_dir)
    print(format_table([res]))
    return res
