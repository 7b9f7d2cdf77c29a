"""What ``ddk distill`` and ``DDKTrainer`` must do alike, now that both are clients of one engine:
the paths a new user hits first (evaluate on a cache run, ``cpt`` without a teacher, soft-capped
and biased-head models on the fused loss as on ``--loss logits``), one validation split, one validation CE, one
options dataclass, one state format, and the same run through both clients."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from recipe_cases import own_cfg, own_models

from ddk.engine import DistillOptions, RunConfig
from ddk.engine.components import VALIDATION_SPLIT_SEED
from ddk.recipes.cli import main
from ddk.recipes.distill import distill, evaluate

SMALL = ["--seq-len", "16", "--val-samples", "4", "--eval-batch-size", "4", "--no-progress", "--device", "cpu"]


def _cache(tmp_path: Path, k: int = 8) -> Path:
    teacher, _, corpus = own_models(tmp_path, "llama")
    argv = ["teacher-cache", "--teacher", str(teacher), "--data", str(corpus), "--out", str(tmp_path / "tcache")]
    assert main([*argv, "--top-k", str(k), "--data-dir", str(tmp_path / "cache"), *SMALL]) == 0
    return tmp_path / "tcache"


def test_evaluate_on_a_teacher_cache_run_takes_the_manifest_teacher_ce(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    cfg = own_cfg(tmp_path, method="ddk", teacher="", data=(), teacher_cache=str(cache), out=str(tmp_path / "c"))
    summary = distill(cfg)
    res = evaluate(tmp_path / "c")
    from ddk.data import TeacherCache

    manifest_ce = TeacherCache(cache).teacher_ce.tolist()
    assert res["teacher_ce"] == pytest.approx(manifest_ce, rel=1e-12)
    assert res["student_ce"] == pytest.approx(summary["student_ce"], rel=1e-6)
    assert json.loads((tmp_path / "c" / "eval.json").read_text())["gap"] == pytest.approx(res["gap"])


def test_cpt_runs_without_a_teacher_or_cache_and_evaluates(tmp_path: Path) -> None:
    cfg = own_cfg(tmp_path, method="cpt", teacher="", out=str(tmp_path / "cpt"))
    summary = distill(cfg)
    assert summary["teacher_params"] == 0 and summary["teacher_identity"] is None
    # the reference of a run without a teacher: its student's CE at the start
    first = json.loads((tmp_path / "cpt" / "controller.jsonl").read_text().splitlines()[0])
    assert summary["teacher_ce"] == pytest.approx(first["teacher_ce"])
    res = evaluate(tmp_path / "cpt")
    assert res["teacher_ce"] == pytest.approx(summary["teacher_ce"])
    assert res["student_ce"] == pytest.approx(summary["student_ce"], rel=1e-6)
    assert all(g < 0 for g in res["gap"])  # trained: below its own start


@pytest.mark.parametrize("family", ["gemma2", "phi"])
def test_softcapped_and_biased_head_models_distill_on_the_fused_loss_as_on_the_logits(
    tmp_path: Path, family: str
) -> None:
    """Gemma2 (final logit soft-capping) and Phi (an lm_head bias) distill end to end on the fused
    loss, with the trajectory of ``--loss logits`` (float32: the same validation CE to 1e-4)."""
    fused = distill(own_cfg(tmp_path, family, method="ddk", out=str(tmp_path / "fused")))
    logits = distill(own_cfg(tmp_path, family, method="ddk", loss="logits", out=str(tmp_path / "logits")))
    assert fused["student_ce"] == pytest.approx(logits["student_ce"], rel=1e-4)
    assert fused["teacher_ce"] == pytest.approx(logits["teacher_ce"], rel=1e-4)
    res = evaluate(tmp_path / "fused")
    assert res["student_ce"] == pytest.approx(fused["student_ce"], rel=1e-6)
    assert res["teacher_ce"] == pytest.approx(fused["teacher_ce"], rel=1e-6)


def test_evaluate_refuses_a_teacher_changed_since_the_run(tmp_path: Path) -> None:
    from hf_models import make_model

    cfg = own_cfg(tmp_path, method="kd", out=str(tmp_path / "run"))
    distill(cfg)
    teacher_dir = Path(cfg.teacher)
    vocab = json.loads((teacher_dir / "config.json").read_text())["vocab_size"]
    make_model("llama", vocab, hidden=48, layers=2, seed=9).save_pretrained(teacher_dir)  # "retrained"
    with pytest.raises(ValueError, match=r"the teacher must be the one .* distilled from"):
        evaluate(tmp_path / "run")


def test_distill_options_are_one_dataclass_for_both_clients() -> None:
    from ddk.integrations.transformers import DDKConfig
    from ddk.recipes.config import RecipeConfig

    shared = {f.name for f in dataclasses.fields(DistillOptions)}
    for cls in (RunConfig, RecipeConfig, DDKConfig):
        assert issubclass(cls, DistillOptions)
        assert shared <= {f.name for f in dataclasses.fields(cls)}
    # one validator: the same bad value gives the same message from both clients
    from ddk.recipes.config import make_config

    for bad in (dict(divergence="kl"), dict(beta=2.0), dict(backend=""), dict(domain_field="")):
        with pytest.raises(ValueError) as cli:
            make_config(**bad)
        with pytest.raises(ValueError) as trainer:
            DDKConfig(output_dir="x", max_steps=1, report_to="none", **bad)
        assert str(cli.value).split(": ", 1)[1] == str(trainer.value).split(": ", 1)[1]


def test_validation_split_does_not_follow_the_training_seed(tmp_path: Path) -> None:
    from ddk.engine.components import load_run_data
    from ddk.engine.models import load_pretrained

    _, student, _ = own_models(tmp_path, "llama")
    tok = load_pretrained("tokenizer", str(student))
    a = load_run_data(own_cfg(tmp_path, seed=0), tok).validation_batches(64)
    b = load_run_data(own_cfg(tmp_path, seed=7), tok).validation_batches(64)
    assert VALIDATION_SPLIT_SEED == 0
    for name in a:
        assert torch.equal(a[name][0]["input_ids"], b[name][0]["input_ids"])


# ---------------------------------------------------------------------------- DDKTrainer
TRAINER = dict(report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, logging_steps=100)


def _trainer(tmp_path: Path, out: str, *, teacher: bool = True, **kw):  # type: ignore[no-untyped-def]
    """A ``DDKTrainer`` on the tiny Llama pair and 3-domain corpus of the CLI tests (``own_models``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ddk.data import load_records
    from ddk.integrations.transformers import DDKConfig, DDKTrainer

    t_dir, s_dir, corpus = own_models(tmp_path, "llama")
    tok = AutoTokenizer.from_pretrained(str(s_dir))
    student = AutoModelForCausalLM.from_pretrained(str(s_dir), dtype=torch.float32)
    cache = kw.pop("teacher_cache", None)
    optimizers = kw.pop("optimizers", None)
    args = dict(
        output_dir=str(tmp_path / out),
        max_steps=4,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-3,
        seq_len=16,
        val_samples=4,
        interval=2,
        seed=0,
        save_strategy="no",
        **TRAINER,
    )
    args.update(kw)
    sources: dict = (
        dict(teacher_cache=cache)
        if cache is not None
        else dict(
            teacher=AutoModelForCausalLM.from_pretrained(str(t_dir), dtype=torch.float32) if teacher else None,
            train_dataset=load_records([str(corpus)], progress=False),
        )
    )
    if optimizers is not None:
        optimizers = optimizers(student)
    return DDKTrainer(
        model=student, args=DDKConfig(**args), processing_class=tok, optimizers=optimizers or (None, None), **sources
    )


def test_trainer_evaluate_reports_the_validation_ce_with_a_teacher_as_with_a_cache(tmp_path: Path) -> None:
    tr = _trainer(tmp_path, "t", max_steps=2)
    tr.train()
    metrics = tr.evaluate()
    ce = tr.parts.estimator.estimate(tr.model).student_ce.tolist()
    got = [metrics[f"eval_{n}_loss"] for n in tr.parts.names]
    assert got == pytest.approx(ce, rel=1e-5)  # the student's CE, no KD term


def test_evaluate_from_another_folder_with_relative_paths(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    teacher, student, corpus = own_models(tmp_path, "llama")
    monkeypatch.chdir(tmp_path)
    rel = {k: str(Path(v).relative_to(tmp_path)) for k, v in dict(teacher=teacher, student=student).items()}
    cfg = own_cfg(tmp_path, **rel, data=(corpus.name,), data_dir="cache", out="runs/rel")
    assert cfg.teacher == str(teacher) and cfg.out == str(tmp_path / "runs" / "rel")  # stored absolute
    summary = distill(cfg)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    res = evaluate(tmp_path / "runs" / "rel")
    assert res["student_ce"] == pytest.approx(summary["student_ce"], rel=1e-6)


def test_a_logits_backend_with_the_fused_loss_is_refused_naming_the_flag() -> None:
    from ddk.integrations.transformers import DDKConfig
    from ddk.recipes.config import make_config

    with pytest.raises(ValueError, match=r"with loss='fused'; got 'cpp'.*add --loss logits"):
        make_config(backend="cpp")
    with pytest.raises(ValueError, match=r"with loss='fused'; got 'triton'"):
        DDKConfig(output_dir="x", max_steps=1, report_to="none", backend="triton")
    assert make_config(backend="cpp", loss="logits").backend == "cpp"


def test_trainer_evaluate_and_eval_steps_with_a_teacher_cache(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    tr = _trainer(tmp_path, "t", teacher_cache=cache, eval_strategy="steps", eval_steps=2)
    tr.train()
    metrics = tr.evaluate()
    names = list(tr.parts.names)
    assert all(torch.isfinite(torch.tensor(metrics[f"eval_{n}_loss"])) for n in names)
    evals = [h for h in tr.state.log_history if any(k.startswith("eval_") and k.endswith("_loss") for k in h)]
    assert len(evals) >= 2 + 1  # two evaluations during training (steps 2, 4), one after


def test_trainer_resuming_a_finished_run_trains_nothing(tmp_path: Path) -> None:
    first = _trainer(tmp_path, "t", save_strategy="steps", save_steps=2)
    first.train()
    again = _trainer(tmp_path, "t", save_strategy="steps", save_steps=2)
    out = again.train(resume_from_checkpoint=True)
    assert out.global_step == 4 and again.state.global_step == 4
    from safetensors.torch import load_file

    final = load_file(str(tmp_path / "t" / "checkpoint-4" / "model.safetensors"))
    got = again.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in final.items())  # the finished run's student, not the start
    assert sorted(p.name for p in (tmp_path / "t").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_trainer_and_cli_share_one_rng_state_format(tmp_path: Path) -> None:
    import random

    import numpy as np

    from ddk.engine import checkpoint as ckpt

    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    path = ckpt.save_rng_file(tmp_path / "rng.safetensors")
    want = (torch.rand(3), np.random.rand(), random.random())
    ckpt.load_rng_file(path)
    got = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(want[0], got[0]) and want[1:] == got[1:]
    tree, tensors = ckpt.encode_state(ckpt.rng_state())  # the checkpoint's rng entry: the same state
    ckpt.set_rng_state(ckpt.decode_state(tree, tensors))
    with pytest.raises(ckpt.CheckpointError, match="must be a random-number-generator state"):
        ckpt.load_rng_file(tmp_path / "nope.safetensors")


def test_the_same_run_through_both_clients(tmp_path: Path) -> None:
    """One process, one corpus, seed, batch, schedule and optimiser, no dropout: ``ddk distill`` and
    ``DDKTrainer`` hold out the same validation sequences, log the same DDK weights at every
    interval and end with the same per-domain validation CE (1e-4 relative)."""
    from ddk.engine import make_optimizer

    steps, interval = 6, 3
    cfg = own_cfg(tmp_path, method="ddk", steps=steps, interval=interval, out=str(tmp_path / "cli"))
    cli = distill(cfg)
    tr = _trainer(
        tmp_path,
        "trainer",
        max_steps=steps,
        interval=interval,
        per_device_eval_batch_size=cfg.eval_batch_size,
        max_grad_norm=cfg.grad_clip,
        optimizers=lambda m: make_optimizer(m, cfg.lr, cfg.weight_decay, cfg.warmup_steps, steps, cfg.min_lr_ratio),
    )
    tr.train()
    # the same validation sequences
    from ddk.engine.components import load_run_data

    cli_val = load_run_data(cfg, tr.processing_class).validation_batches(64)
    tr_val = tr.packed.validation_batches(64)
    assert list(cli_val) == list(tr_val)
    for name in cli_val:
        assert torch.equal(cli_val[name][0]["input_ids"], tr_val[name][0]["input_ids"])
    # the same DDK weights at every interval
    cli_log = [json.loads(x) for x in (tmp_path / "cli" / "controller.jsonl").read_text().splitlines()]
    tr_log = tr.controller.records
    assert [r["event"] for r in cli_log] == [r["event"] for r in tr_log] == ["init", "update", "update"]
    for a, b in zip(cli_log, tr_log):
        assert b["weights"] == pytest.approx(a["weights"], rel=1e-6)
    # the same per-domain validation CE at the end
    final = tr.parts.estimator.estimate(tr.model)
    assert final.student_ce.tolist() == pytest.approx(cli["student_ce"], rel=1e-4)
    assert final.teacher_ce.tolist() == pytest.approx(cli["teacher_ce"], rel=1e-9)


_ONLINE_WORKER = """
import os
import sys
from pathlib import Path

root, rank, port, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
os.environ.update(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                  OMP_NUM_THREADS="1")
sys.path.insert(0, sys.argv[5])

import json
import torch
from safetensors.torch import save_file
from transformers import TrainerCallback
from test_clients import _trainer

class StopAt2(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 2:
            control.should_training_stop = True

opts = dict(method="ddk-online", per_device_train_batch_size=2, interval=4, save_strategy="steps", save_steps=2)
tr = _trainer(root, mode, **opts)
if mode == "cut":
    tr.add_callback(StopAt2())
    tr.train()
    tr = _trainer(root, mode, **opts)
    tr.train(resume_from_checkpoint=True)
else:
    tr.train()
if rank == "0":
    save_file({k: v.contiguous() for k, v in tr.model.state_dict().items()}, str(root / f"{mode}.safetensors"))
    (root / f"{mode}.json").write_text(json.dumps(tr.controller.records[-1]))
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


@pytest.mark.e2e
@pytest.mark.slow
def test_trainer_ddk_online_on_two_ranks_resumes_bit_identically(tmp_path: Path) -> None:
    """2 gloo ranks, ``ddk-online`` with K = 4, stopped at step 2 (checkpoint-2, mid-interval) and
    resumed: the step-4 update sees every rank's batches of steps 1-2 (the saved online sums are
    all-reduced), so the mixture and the weights equal the uninterrupted run's."""
    from gloo_workers import run_workers
    from safetensors.torch import load_file

    own_models(tmp_path, "llama")  # built once, before the workers read it
    script = tmp_path / "worker.py"
    script.write_text(_ONLINE_WORKER)
    here = Path(__file__).resolve().parent
    for mode in ("full", "cut"):
        run_workers(script, lambda r, port, m=mode: [tmp_path, r, port, m, here], timeout=240)
    full, cut = (json.loads((tmp_path / f"{m}.json").read_text()) for m in ("full", "cut"))
    assert full["event"] == cut["event"] == "update" and full["step"] == 4
    assert cut["ratio"] == full["ratio"] and cut["weights"] == full["weights"]
    a, b = load_file(str(tmp_path / "full.safetensors")), load_file(str(tmp_path / "cut.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_cache_batch_without_the_tail_still_distills(tmp_path: Path) -> None:
    """The cached teacher is its top-k ids and log-probabilities; the tail mass is optional (as in
    ``causal_lm_kd_loss``): a batch without it keeps the divergence term."""
    from hf_models import make_model

    from ddk.engine import StepLoss

    student = make_model("llama", 50, seed=2)
    ids = torch.randint(0, 50, (2, 9))
    top = torch.log_softmax(torch.randn(2, 9, 50), -1).topk(4, -1)
    loss = StepLoss("fused", 0.5, 1.0, "forward_kl", 0.5, "auto", 1)
    batch = {"input_ids": ids, "labels": ids, "teacher_topk_ids": top.indices, "teacher_topk_logprobs": top.values}
    assert float(loss(student, None, batch).kd_sum) > 0


def test_a_logits_backend_with_a_teacher_cache_is_refused_before_the_run() -> None:
    from ddk.engine.config import check_cache_backend

    with pytest.raises(ValueError, match=r"with a teacher cache \(the sparse losses\); got 'cpp'"):
        check_cache_backend("cpp", "distill")
    check_cache_backend("chunked", "distill")
