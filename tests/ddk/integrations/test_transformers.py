"""DDKTrainer: a few steps with tiny Llama models, save, resume, and the DDK state continues exactly."""

from __future__ import annotations

import functools
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

from ddk import DDKController, DiscrepancyEstimator, FactorSmoother, MixtureSampler  # noqa: E402
from ddk.integrations.transformers import DDK_STATE_NAME, DDKTrainer  # noqa: E402

VOCAB, SEQ, SIZES, BATCH = 100, 12, (20, 14, 9), 4
NAMES = ("a", "b", "c")


def _tiny(seed: int, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def _data() -> tuple[list[dict[str, torch.Tensor]], dict[str, list[dict[str, torch.Tensor]]]]:
    g = torch.Generator().manual_seed(0)
    train, val = [], {}
    for d, (name, n) in enumerate(zip(NAMES, SIZES)):
        lo = 30 * d  # each domain uses its own token range
        rows = torch.randint(lo, lo + 30, (n + 4, SEQ), generator=g)
        train += [{"input_ids": r} for r in rows[:n]]
        val[name] = [{"input_ids": rows[n:]}]
    return train, val


class _RecordingTrainer(DDKTrainer):
    def __init__(self, *a, **k):  # type: ignore[no-untyped-def]
        super().__init__(*a, **k)
        self.seen: list[list[int]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        self.seen.append(inputs["ddk_index"].tolist())
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def _trainer(out_dir: str, max_steps: int, online: bool = False) -> _RecordingTrainer:
    train, val = _data()
    teacher = _tiny(1, hidden=48)
    student = _tiny(2)
    estimator = DiscrepancyEstimator(val, progress=False)
    sampler = MixtureSampler(list(SIZES), BATCH, seed=3, domain_names=NAMES)
    controller = DDKController(estimator, FactorSmoother(3), sampler, interval=2, online=online)
    args = TrainingArguments(
        output_dir=out_dir, max_steps=max_steps, per_device_train_batch_size=BATCH, learning_rate=1e-2,
        save_strategy="steps", save_steps=3, logging_steps=100, report_to=[], use_cpu=True,
        disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    return _RecordingTrainer(model=student, args=args, train_dataset=train, teacher=teacher, controller=controller)


def _weights(controller: DDKController) -> list[list[float]]:
    return [r["weights"] for r in controller.records]


def test_ddktrainer_resume_continues_sampler_and_controller_exactly(tmp_path):
    full = _trainer(str(tmp_path / "full"), max_steps=6)
    full.train()
    assert (tmp_path / "full" / "checkpoint-3" / DDK_STATE_NAME).is_file()
    assert len(full.seen) == 6 and all(len(b) == BATCH for b in full.seen)
    saved = json.loads((tmp_path / "full" / "checkpoint-3" / DDK_STATE_NAME).read_text())
    assert saved["sampler"]["batches_yielded"] == 3
    assert saved["controller"]["num_updates"] == 1  # step 2; the step-4 update is after the save

    resumed = _trainer(str(tmp_path / "full"), max_steps=6)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert resumed.seen == full.seen[3:]  # same batches, no skipped or repeated data
    a, b = full.controller.state_dict(), resumed.controller.state_dict()
    assert b["sampler"] == a["sampler"]
    assert b["controller"] == a["controller"]
    assert b["smoother"]["weights"] == pytest.approx(a["smoother"]["weights"], rel=1e-5)
    assert _weights(resumed.controller)[-1] == pytest.approx(_weights(full.controller)[-1], rel=1e-5)


def test_ddktrainer_online_observes_training_batches(tmp_path):
    tr = _trainer(str(tmp_path / "online"), max_steps=2, online=True)
    tr.train()
    assert tr.controller.num_updates == 1
    assert sum(tr.controller.records[-1]["tokens"]) == 2 * BATCH * (SEQ - 1)


def test_ddktrainer_rejects_mismatched_batch_size(tmp_path):
    train, val = _data()
    est = DiscrepancyEstimator(val, progress=False)
    ctrl = DDKController(est, FactorSmoother(3), MixtureSampler(list(SIZES), 8, domain_names=NAMES), interval=2)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=BATCH, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="per_device_train_batch_size=4; got 8"):
        DDKTrainer(model=_tiny(0), args=args, train_dataset=train, teacher=_tiny(1), controller=ctrl)


def test_ddktrainer_resume_without_ddk_state_raises(tmp_path):
    (tmp_path / "checkpoint-1").mkdir()
    tr = _trainer(str(tmp_path), max_steps=1)
    with pytest.raises(ValueError, match="must hold ddk_state.json"):
        tr.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


def test_ddktrainer_evaluate_runs_on_eval_batches_without_sampler_index(tmp_path):
    tr = _trainer(str(tmp_path / "eval"), max_steps=1)
    tr.compute_loss = functools.partial(DDKTrainer.compute_loss, tr)  # the recorder reads ddk_index
    train, _ = _data()
    metrics = tr.evaluate(eval_dataset=[{**x, "labels": x["input_ids"]} for x in train[:BATCH]])
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
