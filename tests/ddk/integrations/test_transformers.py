"""DDKTrainer and DDKConfig: one-call construction, exact gradient accumulation, bit-identical resume,
the fused loss on the Trainer path, the README example and the errors (tiny models, a few steps)."""

from __future__ import annotations

import functools
import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
datasets = pytest.importorskip("datasets")

from hf_models import domain_text, make_model, make_tokenizer, write_jsonl  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from ddk import DDKController, DiscrepancyEstimator, FactorSmoother, MixtureSampler  # noqa: E402
from ddk.integrations.transformers import (  # noqa: E402
    DDK_RNG_STATE_NAME,
    DDK_STATE_NAME,
    DDKConfig,
    DDKTrainer,
)

VOCAB, SEQ, SIZES, BATCH = 100, 12, (20, 14, 9), 4
NAMES = ("a", "b", "c")
COMMON = dict(
    report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, logging_steps=100, save_strategy="no"
)


# ---------------------------------------------------------------------------- low-level form
def _data(ragged: bool = False) -> tuple[list[dict[str, torch.Tensor]], dict[str, list[dict[str, torch.Tensor]]]]:
    """Per domain its own token range; ``ragged``: labels end at a random position (uneven token counts)."""
    g = torch.Generator().manual_seed(0)
    train, val = [], {}
    for d, (name, n) in enumerate(zip(NAMES, SIZES)):
        lo = 30 * d
        rows = torch.randint(lo, lo + 30, (n + 4, SEQ), generator=g)
        for r in rows[:n]:
            item = {"input_ids": r, "domain_id": d}
            if ragged:
                labels = r.clone()
                labels[int(torch.randint(2, SEQ + 1, (1,), generator=g)) :] = -100
                item["labels"] = labels
            train.append(item)
        val[name] = [{"input_ids": rows[n:]}]
    return train, val


class _RecordingTrainer(DDKTrainer):
    def __init__(self, *a, **k):  # type: ignore[no-untyped-def]
        super().__init__(*a, **k)
        self.seen: list[list[int]] = []
        self.seen_domains: list[list[int]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        if model.training:
            self.seen.append(inputs["ddk_index"].tolist())
            self.seen_domains.append(inputs["domain_ids"].tolist())
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def _controller(batch: int = BATCH, online: bool = False, val=None) -> DDKController:  # type: ignore[no-untyped-def]
    if val is None:
        val = _data()[1]
    estimator = DiscrepancyEstimator(val, progress=False)
    sampler = MixtureSampler(list(SIZES), batch, seed=3, domain_names=NAMES)
    return DDKController(estimator, FactorSmoother(3), sampler, interval=2, online=online)


def _low_level(out_dir: str, max_steps: int, online: bool = False, **extra) -> _RecordingTrainer:  # type: ignore[no-untyped-def]
    train, val = _data()
    args = TrainingArguments(
        output_dir=out_dir,
        max_steps=max_steps,
        per_device_train_batch_size=BATCH,
        learning_rate=1e-2,
        seed=0,
        **{**COMMON, **extra},
    )
    return _RecordingTrainer(
        model=make_model("llama", VOCAB, seed=2),
        args=args,
        train_dataset=train,
        teacher=make_model("llama", VOCAB, hidden=48, layers=2, seed=1),
        controller=_controller(online=online, val=val),
    )


def test_ddktrainer_low_level_resume_continues_sampler_and_controller_exactly(tmp_path):
    full = _low_level(str(tmp_path / "full"), max_steps=6, save_strategy="steps", save_steps=3)
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-3"
    assert (ckpt / DDK_STATE_NAME).is_file() and (ckpt / DDK_RNG_STATE_NAME).is_file()
    assert len(full.seen) == 6 and all(len(b) == BATCH for b in full.seen)
    saved = json.loads((ckpt / DDK_STATE_NAME).read_text())
    assert saved["sampler"]["batches_yielded"] == 3
    assert saved["controller"]["num_updates"] == 1  # step 2; the step-4 update is after the save

    resumed = _low_level(str(tmp_path / "full"), max_steps=6, save_strategy="steps", save_steps=3)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.seen == full.seen[3:]  # same batches, no skipped or repeated data
    a, b = full.controller.state_dict(), resumed.controller.state_dict()
    assert b["sampler"] == a["sampler"]
    assert b["controller"] == a["controller"]
    assert b["smoother"]["weights"] == pytest.approx(a["smoother"]["weights"], rel=1e-5)


def test_ddktrainer_low_level_domain_ids_follow_the_sampler_layout(tmp_path):
    tr = _low_level(str(tmp_path), max_steps=2)
    tr.train()
    sampler = tr.controller.sampler
    for idx, dom in zip(tr.seen, tr.seen_domains):
        assert dom == sampler.domain_of(torch.tensor(idx)).tolist()


def test_ddktrainer_low_level_rejects_item_in_the_wrong_domain(tmp_path):
    train, val = _data()
    train = train[SIZES[0] : SIZES[0] + 1] + train[: SIZES[0]] + train[SIZES[0] + 1 :]  # one domain-b item first
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=BATCH, **COMMON)
    tr = DDKTrainer(
        model=make_model("llama", VOCAB),
        args=args,
        train_dataset=train,
        teacher=make_model("llama", VOCAB, seed=1),
        controller=_controller(val=val),
    )
    batch = [{**train[0], "ddk_index": 0}]
    with pytest.raises(ValueError, match="item 0 must belong to domain 'a'.*got domain_id 1"):
        tr.data_collator(batch)


def test_ddktrainer_online_observes_training_batches(tmp_path):
    tr = _low_level(str(tmp_path / "online"), max_steps=2, online=True)
    tr.train()
    assert tr.controller.num_updates == 1
    assert sum(tr.controller.records[-1]["tokens"]) == 2 * BATCH * (SEQ - 1)


def _rank_controller(val, args, per_device: int, smoother, interval: int) -> DDKController:  # type: ignore[no-untyped-def]
    """A controller whose sampler draws this rank's ``per_device`` of a global batch of ``per_device * world``."""
    world = args.world_size
    return DDKController(
        DiscrepancyEstimator(val, progress=False),
        smoother,
        MixtureSampler(
            list(SIZES), per_device * world, seed=3, domain_names=NAMES, rank=args.process_index, world_size=world
        ),
        interval=interval,
    )


def test_ddktrainer_rejects_mismatched_batch_size(tmp_path):
    train, val = _data()
    est = DiscrepancyEstimator(val, progress=False)
    ctrl = DDKController(est, FactorSmoother(3), MixtureSampler(list(SIZES), 8, domain_names=NAMES), interval=2)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=BATCH, **COMMON)
    with pytest.raises(ValueError, match="per_device_train_batch_size=4; got 8"):
        DDKTrainer(
            model=make_model("llama", VOCAB),
            args=args,
            train_dataset=train,
            teacher=make_model("llama", VOCAB, seed=1),
            controller=ctrl,
        )


def test_ddktrainer_resume_without_ddk_state_raises(tmp_path):
    (tmp_path / "checkpoint-1").mkdir()
    tr = _low_level(str(tmp_path), max_steps=1)
    with pytest.raises(ValueError, match="must hold ddk_state.json"):
        tr.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


def test_ddktrainer_resume_refuses_a_deep_or_inconsistent_ddk_state(tmp_path):
    import json

    ck = tmp_path / "checkpoint-2"
    ck.mkdir()
    tr = _low_level(str(tmp_path), max_steps=4)
    (ck / "ddk_state.json").write_text("[" * 900 + "]" * 900)
    with pytest.raises(ValueError, match=r"ddk_state\.json must be JSON nested at most \d+ deep; got 900 levels"):
        tr.train(resume_from_checkpoint=str(ck))
    state = tr.controller.state_dict()  # batches_yielded 0, where 2 steps drew 2 batches
    (ck / "ddk_state.json").write_text(json.dumps(state))
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    with pytest.raises(
        ValueError,
        match=r"ddk_state\.json field sampler\.batches_yielded must equal global_step x gradient_accumulation_steps = "
        r"2 x 1 \(trainer_state\.json\); got 0\.",
    ):
        tr.train(resume_from_checkpoint=str(ck))


def test_ddktrainer_resume_takes_the_learning_rate_from_the_arguments_not_the_checkpoint(tmp_path):
    import shutil

    full = _low_level(str(tmp_path / "full"), max_steps=6, save_strategy="steps", save_steps=3)
    full.train()
    crafted = tmp_path / "crafted" / "checkpoint-3"
    shutil.copytree(tmp_path / "full" / "checkpoint-3", crafted)
    opt = torch.load(crafted / "optimizer.pt", weights_only=True)
    for g in opt["param_groups"]:
        g["lr"], g["initial_lr"], g["weight_decay"] = -1.0, -1.0, 5.0
    torch.save(opt, crafted / "optimizer.pt")
    sched = torch.load(crafted / "scheduler.pt", weights_only=True)
    sched["base_lrs"] = [-1.0 for _ in sched["base_lrs"]]
    sched["_last_lr"] = [-1.0 for _ in sched["_last_lr"]]
    torch.save(sched, crafted / "scheduler.pt")
    resumed = _low_level(str(tmp_path / "crafted"), max_steps=6, save_strategy="steps", save_steps=3)
    resumed.train(resume_from_checkpoint=str(crafted))
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [g["lr"] for g in full.optimizer.param_groups]
    assert [g["weight_decay"] for g in resumed.optimizer.param_groups] == [
        g["weight_decay"] for g in full.optimizer.param_groups
    ]
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []  # as if the files held the run's own rates


def test_ddktrainer_evaluate_runs_on_eval_batches_without_sampler_index(tmp_path):
    tr = _low_level(str(tmp_path / "eval"), max_steps=1)
    tr.compute_loss = functools.partial(DDKTrainer.compute_loss, tr)
    train, _ = _data()
    metrics = tr.evaluate(eval_dataset=[{"input_ids": x["input_ids"], "labels": x["input_ids"]} for x in train[:BATCH]])
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))


# ---------------------------------------------------------------------------- gradient accumulation
def _final_weights(
    tmp: Path, per_device: int, accumulation: int, steps: int = 3, loss: str = "fused"
) -> dict[str, torch.Tensor]:
    train, val = _data(ragged=True)
    student = make_model("llama", VOCAB, seed=2).double()
    teacher = make_model("llama", VOCAB, hidden=48, layers=2, seed=1).double()
    args = DDKConfig(
        output_dir=str(tmp),
        max_steps=steps,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        learning_rate=0.5,
        optim="sgd",
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        seed=0,
        method="kd",
        loss=loss,
        **COMMON,
    )
    controller = _rank_controller(val, args, per_device, FactorSmoother(3, mode="uniform"), interval=1000)
    # Two domains of weight 1/2: a global batch of 4 = the union of two consecutive batches of 2.
    controller.sampler.set_weights([0.5, 0.5, 0.0])
    tr = DDKTrainer(model=student, args=args, train_dataset=train, teacher=teacher, controller=controller)
    tr.train()
    return {k: v.detach().clone() for k, v in student.state_dict().items()}


def test_ddktrainer_gradient_accumulation_equals_the_larger_batch_on_uneven_tokens(tmp_path):
    one = _final_weights(tmp_path / "one", per_device=4, accumulation=1)
    two = _final_weights(tmp_path / "two", per_device=2, accumulation=2)
    init = make_model("llama", VOCAB, seed=2).double().state_dict()
    assert any(not torch.equal(one[k], init[k]) for k in one)  # it trained
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-12, rtol=1e-10, msg=k)


# ---------------------------------------------------------------------------- resume with dropout
class _StopAt(transformers.TrainerCallback):
    """Ends training after ``step`` (after its checkpoint), like a run killed there."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == self.step:
            control.should_training_stop = True


def test_ddktrainer_resume_is_bit_identical_with_dropout(tmp_path):
    def run(out: Path, resume: bool | None, stop_at: int | None = None) -> dict[str, torch.Tensor]:
        train, val = _data()
        student = make_model("gpt2", VOCAB, dropout=0.1, seed=2)
        args = DDKConfig(
            output_dir=str(out),
            max_steps=4,
            per_device_train_batch_size=BATCH,
            learning_rate=1e-2,
            seed=0,
            interval=2,
            **{**COMMON, "save_strategy": "steps"},
            save_steps=2,
        )
        tr = DDKTrainer(
            model=student,
            args=args,
            train_dataset=train,
            teacher=make_model("gpt2", VOCAB, hidden=48, layers=2, seed=1),
            controller=_controller(val=val),
            callbacks=[_StopAt(stop_at)] if stop_at else None,
        )
        tr.train(resume_from_checkpoint=resume)
        return {k: v.detach().clone() for k, v in student.state_dict().items()}

    full = run(tmp_path / "full", None)
    run(tmp_path / "killed", None, stop_at=2)
    assert not (tmp_path / "killed" / "checkpoint-4").exists()
    resumed = run(tmp_path / "killed", True)
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


# ---------------------------------------------------------------------------- one-call form
@pytest.fixture(scope="module")
def tok(tmp_path_factory):  # type: ignore[no-untyped-def]
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def _records(
    n: int = 24, words: int = 30, shuffle: bool = True, domain_field: str = "domain", text_field: str = "text"
) -> datasets.Dataset:
    rng = random.Random(0)
    rows = [
        {domain_field: d, text_field: domain_text(d, rng, words)} for d in ("code", "prose", "math") for _ in range(n)
    ]
    ds = datasets.Dataset.from_list(rows)
    return ds.shuffle(seed=1) if shuffle else ds


def _config(tmp: Path, **kw) -> DDKConfig:  # type: ignore[no-untyped-def]
    base = dict(
        output_dir=str(tmp),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        seq_len=16,
        val_samples=4,
        interval=1,
        seed=0,
        **COMMON,
    )
    return DDKConfig(**{**base, **kw})


class _SeenTrainer(DDKTrainer):
    def __init__(self, *a, **k):  # type: ignore[no-untyped-def]
        super().__init__(*a, **k)
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        if model.training:
            self.batches.append((inputs["input_ids"].cpu(), inputs["domain_ids"].cpu()))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def test_ddktrainer_one_call_takes_each_sequence_domain_from_the_column(tmp_path, tok):
    from hf_models import _WORDS

    records = _records(domain_field="source", text_field="body")  # shuffled, string domains, other names
    args = _config(tmp_path, domain_field="source", text_field="body", max_steps=6)
    tr = _SeenTrainer(
        model=make_model("llama", len(tok), seed=2),
        teacher=make_model("llama", len(tok), hidden=48, seed=1),
        args=args,
        train_dataset=records,
        processing_class=tok,
    )
    assert tr.controller.estimator.domain_names == ("code", "math", "prose")  # sorted
    tr.train()
    assert tr.controller.num_updates == 6
    seen = 0
    for ids, doms in tr.batches:
        for row, d in zip(ids, doms.tolist()):
            words = tok.decode(row.tolist(), skip_special_tokens=True).split()
            votes = {name: sum(w in _WORDS[name] for w in words) for name in _WORDS}
            assert max(votes, key=votes.get) == tr.controller.estimator.domain_names[d], (words, d)
            seen += 1
    assert seen == 6 * 4


def test_ddktrainer_one_call_evaluates_per_domain_and_accepts_eval_dataset(tmp_path, tok):
    records = _records()
    held_out = {
        d: _records(n=6).filter(lambda r, d=d: r["domain"] == d).remove_columns("domain")
        for d in ("code", "math", "prose")
    }
    tr = DDKTrainer(
        model=make_model("llama", len(tok), seed=2),
        teacher=make_model("llama", len(tok), seed=1),
        args=_config(tmp_path),
        train_dataset=records,
        eval_dataset=held_out,
        processing_class=tok,
    )
    metrics = tr.evaluate()
    assert {"eval_code_loss", "eval_math_loss", "eval_prose_loss"} <= set(metrics)


@pytest.mark.parametrize("method", ["kd", "ddk-no-smoothing", "ddk-online", "kd-doremi"])
def test_ddktrainer_one_call_methods_train(tmp_path, tok, method):
    tr = DDKTrainer(
        model=make_model("llama", len(tok), seed=2),
        teacher=make_model("llama", len(tok), seed=1),
        args=_config(tmp_path, method=method),
        train_dataset=_records(),
        processing_class=tok,
    )
    tr.train()
    assert not tr.teacher.training and all(not p.requires_grad and p.grad is None for p in tr.teacher.parameters())
    assert tr.controller.num_updates == 2  # every method logs its interval, as ddk distill does
    if method == "kd":
        w = tr.controller.sampler.weights
        assert w == pytest.approx([1 / len(w)] * len(w))  # the uniform mixture throughout
    if method == "kd-doremi":
        from ddk.schedule import DoReMiScheduler

        assert isinstance(tr.controller.smoother, DoReMiScheduler)
        assert tr.controller.records[0]["weights"] == pytest.approx([1 / 3] * 3)
        assert tr.controller.records[-1]["weights"] != pytest.approx([1 / 3] * 3)
    else:
        assert (
            tr.controller.smoother.mode
            == {"kd": "uniform", "ddk-no-smoothing": "no_smoothing", "ddk-online": "ddk"}[method]
        )
    assert tr.controller.online == (method == "ddk-online")


def test_ddktrainer_cpt_trains_without_teacher(tmp_path, tok):
    student = make_model("llama", len(tok), seed=2)
    before = student.model.embed_tokens.weight.detach().clone()
    tr = DDKTrainer(
        model=student,
        teacher=None,
        args=_config(tmp_path, method="cpt"),
        train_dataset=_records(),
        processing_class=tok,
    )
    out = tr.train()
    assert tr.teacher is None and torch.isfinite(torch.tensor(out.training_loss))
    assert not torch.equal(before, student.model.embed_tokens.weight)


def test_ddktrainer_one_call_pretokenized_input_ids(tmp_path, tok):
    """Pre-tokenized rows are packed like texts (EOS after each); the text, if kept, is the split key."""
    records = _records().map(lambda r: {"input_ids": tok(r["text"], add_special_tokens=False)["input_ids"]})

    def packed(ds: datasets.Dataset):  # type: ignore[no-untyped-def]
        return DDKTrainer(
            model=make_model("llama", len(tok), seed=2),
            teacher=make_model("llama", len(tok), seed=1),
            args=_config(tmp_path),
            train_dataset=ds,
            processing_class=tok,
        ).packed

    ref, ids = packed(_records()), packed(records)
    assert ids.sizes == ref.sizes
    assert all((a == b).all() for a, b in zip(ids.train, ref.train))
    no_text = packed(records.remove_columns("text"))  # split by the ids' digest instead
    assert no_text.names == ref.names and abs(sum(no_text.sizes) - sum(ref.sizes)) <= 3 * len(ref.names)


# ---------------------------------------------------------------------------- no (B * L, V) tensor
def test_ddktrainer_fused_loss_never_allocates_tokens_by_vocab(tmp_path, monkeypatch):
    """Largest single CPU allocation of one Trainer step (profiler, ``profile_memory=True``): below
    ``N * V * 4 / 4`` bytes with the fused loss; at least ``N * V * 4`` with ``loss="logits"``
    (the detector can fail). V = 8192 >> H = 32, and a 4 MiB workspace forces token chunks."""
    from torch.profiler import ProfilerActivity, profile

    from ddk_kernels import fused_chunked, fused_plan

    monkeypatch.setattr(fused_plan, "default_workspace_bytes", lambda device: 4 << 20)
    real_plan = fused_plan.plan_fused
    vocab, seq, b = 8192, 64, 4
    g = torch.Generator().manual_seed(0)
    train = [{"input_ids": torch.randint(0, vocab, (seq,), generator=g), "domain_id": i % 2} for i in range(16)]
    train.sort(key=lambda x: x["domain_id"])
    val = {"a": [{"input_ids": train[0]["input_ids"][None]}], "b": [{"input_ids": train[-1]["input_ids"][None]}]}
    nv_bytes = b * (seq - 1) * vocab * 4

    def peak(loss: str) -> tuple[int, list[tuple[int, int]]]:
        ctrl = DDKController(
            DiscrepancyEstimator(val, progress=False),
            FactorSmoother(2, mode="uniform"),
            MixtureSampler([8, 8], b, seed=0, domain_names=("a", "b")),
            interval=1000,
        )
        args = DDKConfig(
            output_dir=str(tmp_path / loss),
            max_steps=1,
            per_device_train_batch_size=b,
            optim="sgd",
            method="kd",
            loss=loss,
            **COMMON,
        )
        tr = DDKTrainer(
            model=make_model("llama", vocab, seed=2),
            teacher=make_model("llama", vocab, seed=1),
            args=args,
            train_dataset=train,
            controller=ctrl,
        )
        tiles: list[tuple[int, int]] = []  # the largest logits tile of each fused call's plan

        def spy(*a, **kw):  # type: ignore[no-untyped-def]
            plan = real_plan(*a, **kw)
            tiles.append((plan.token_chunk, plan.vocab_tile))
            return plan

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fused_chunked, "plan_fused", spy)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                tr.train()
        return max(e.cpu_memory_usage for e in prof.events()), tiles

    naive, _ = peak("logits")
    assert naive >= nv_bytes
    fused, tiles = peak("fused")
    assert fused < nv_bytes // 4, fused
    assert tiles and max(x * y for x, y in tiles) <= b * (seq - 1) * vocab // 8


# ---------------------------------------------------------------------------- errors
def test_ddktrainer_missing_domain_column_names_it_and_lists_columns(tmp_path, tok):
    records = _records().remove_columns("domain")
    with pytest.raises(
        ValueError, match=r"train_dataset must have the domain column 'domain' .*got columns \['text'\]"
    ):
        DDKTrainer(
            model=make_model("llama", len(tok)),
            teacher=make_model("llama", len(tok)),
            args=_config(tmp_path),
            train_dataset=records,
            processing_class=tok,
        )


def test_ddktrainer_missing_text_column_and_missing_pieces(tmp_path, tok):
    s, t = make_model("llama", len(tok)), make_model("llama", len(tok))
    with pytest.raises(
        ValueError,
        match=r"text column 'body' .* or a pre-tokenized 'input_ids' column; got columns \['domain', 'text'\]",
    ):
        DDKTrainer(
            model=s,
            teacher=t,
            args=_config(tmp_path, text_field="body"),
            train_dataset=_records(shuffle=False),
            processing_class=tok,
        )
    with pytest.raises(ValueError, match="args.seq_len must be set"):
        DDKTrainer(
            model=s, teacher=t, args=_config(tmp_path, seq_len=None), train_dataset=_records(), processing_class=tok
        )
    with pytest.raises(ValueError, match="processing_class must be the tokenizer"):
        DDKTrainer(model=s, teacher=t, args=_config(tmp_path), train_dataset=_records(), processing_class=None)
    with pytest.raises(ValueError, match=r"args.max_steps must be set > 0"):
        DDKTrainer(
            model=s, teacher=t, args=_config(tmp_path, max_steps=-1), train_dataset=_records(), processing_class=tok
        )
    with pytest.raises(TypeError, match="args must be a DDKConfig when no controller is given"):
        DDKTrainer(
            model=s,
            teacher=t,
            args=TrainingArguments(output_dir=str(tmp_path), **COMMON),
            train_dataset=_records(),
            processing_class=tok,
        )


def test_ddktrainer_vocabulary_mismatches(tmp_path, tok):
    n = len(tok)
    with pytest.raises(
        ValueError,
        match=rf"the teacher's vocabulary must cover the student's {n} rows .* got {n - 50} rows in the teacher",
    ):
        DDKTrainer(
            model=make_model("llama", n),
            teacher=make_model("llama", n - 50),
            args=_config(tmp_path),
            train_dataset=_records(),
            processing_class=tok,
        )
    with pytest.raises(
        ValueError,
        match=rf"DDKTrainer: the student's vocabulary must cover the tokenizer's {n} tokens; got an lm_head of {n - 50} rows",
    ):
        DDKTrainer(
            model=make_model("llama", n - 50),
            teacher=make_model("llama", n - 50),
            args=_config(tmp_path),
            train_dataset=_records(),
            processing_class=tok,
        )
    # a teacher vocabulary padded larger is fine (with its tokenizer: checked; without: a warning)
    DDKTrainer(
        model=make_model("llama", n),
        teacher=make_model("llama", n + 8),
        args=_config(tmp_path),
        train_dataset=_records(),
        processing_class=tok,
        teacher_tokenizer=tok,
    )


def test_ddktrainer_refuses_a_teacher_whose_tokenizer_is_another_larger_one(tmp_path, tok):
    """1500 vs 1024 rows is not padding when the teacher's tokenizer has 1500 entries: the teacher's
    saved folder (``name_or_path``) or ``teacher_tokenizer=`` carries it, and the one rule refuses."""
    from transformers import AutoModelForCausalLM

    big = make_tokenizer(tmp_path / "big", vocab_size=400)
    folder = tmp_path / "teacher"
    make_model("llama", len(big)).save_pretrained(str(folder))
    big.save_pretrained(str(folder))
    teacher = AutoModelForCausalLM.from_pretrained(str(folder))
    want = rf"^DDKTrainer: teacher and student must tokenize identically .* got different vocabulary sizes \(teacher 400, student {len(tok)}\)"
    for kw in ({}, {"teacher_tokenizer": big}):
        with pytest.raises(ValueError, match=want):
            DDKTrainer(model=make_model("llama", len(tok)), teacher=teacher, args=_config(tmp_path),
                       train_dataset=_records(), processing_class=tok, **kw)  # fmt: skip
    with pytest.warns(UserWarning, match=r"^DDKTrainer: the teacher's 400 output rows exceed the student's"):
        DDKTrainer(model=make_model("llama", len(tok)), teacher=make_model("llama", 400), args=_config(tmp_path),
                   train_dataset=_records(n=8), processing_class=tok)  # fmt: skip


def test_ddktrainer_seq_len_above_a_position_limit_is_an_error_naming_both(tmp_path, tok):
    n = len(tok)
    with pytest.raises(
        ValueError,
        match=r"^DDKTrainer: args.seq_len must be at most the models' position limits .*; got 512, with the "
        r"student 'GPT2LMHeadModel' 256, the teacher 'GPT2LMHeadModel' 256\. Pass args.seq_len 256 or less\.",
    ):
        DDKTrainer(model=make_model("gpt2", n), teacher=make_model("gpt2", n), args=_config(tmp_path, seq_len=512),
                   train_dataset=_records(), processing_class=tok)  # fmt: skip


@pytest.mark.parametrize("method", ["kd", "ddk", "ddk-no-smoothing", "ddk-online", "kd-doremi"])
def test_ddktrainer_methods_other_than_cpt_need_a_teacher(tmp_path, tok, method):
    with pytest.raises(
        ValueError, match=rf"teacher \(or teacher_cache\) must be given for method='{method}'.*got None"
    ):
        DDKTrainer(
            model=make_model("llama", len(tok)),
            teacher=None,
            args=_config(tmp_path, method=method),
            train_dataset=_records(),
            processing_class=tok,
        )


def test_ddktrainer_cpt_with_a_teacher_measures_the_gap_but_never_distills(tmp_path, tok):
    """As ``ddk distill --method cpt --teacher T``: the teacher gives the reference CE, the loss is CE alone."""
    teacher = make_model("llama", len(tok), seed=1)
    tr = DDKTrainer(
        model=make_model("llama", len(tok)),
        teacher=teacher,
        args=_config(tmp_path, method="cpt"),
        train_dataset=_records(),
        processing_class=tok,
    )
    assert tr.step_loss.gamma == 0.0
    tr.train()
    want = tr.parts.estimator.compute_teacher(teacher, force=True).tolist()
    assert tr.controller.records[0]["teacher_ce"] == pytest.approx(want, rel=1e-9)


def test_ddktrainer_fused_loss_goes_through_a_data_parallel_wrapper(tmp_path, tok):
    tr = DDKTrainer(
        model=make_model("llama", len(tok)),
        teacher=make_model("llama", len(tok)),
        args=_config(tmp_path),
        train_dataset=_records(),
        processing_class=tok,
    )
    wrapped = torch.nn.DataParallel(tr.model)
    assert tr._loss_student(wrapped) is wrapped  # causal_lm_kd_loss calls the wrapper's forward (hidden states only)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("gamma", -0.1, "gamma must be a finite number >= 0"),
        ("gamma", float("nan"), "gamma must be a finite number >= 0"),
        ("temperature", 0.0, "temperature must be a finite number > 0"),
        ("divergence", "kl", "divergence must be one of"),
        ("beta", 1.5, r"beta must be a number in \[0, 1\]"),
        ("alpha", 0.0, r"alpha must be a number in \(0, 1\]"),
        ("interval", 0, "interval must be an int >= 1"),
        ("interval", 2.0, "interval must be an int >= 1"),
        ("val_samples", 0, "val_samples must be an int >= 1"),
        ("domain_field", "", "domain_field must be a non-empty field"),
        ("text_field", None, "text_field must be a non-empty field"),
        ("seq_len", 1, "seq_len must be an int >= 2"),
        ("method", "doremi", "method must be one of"),
        ("ddk_init", "random", "ddk_init must be one of"),
        ("ddk_signal", "loss", "ddk_signal must be one of"),
        ("ddk_temperature", 0.0, "ddk_temperature must be a finite number > 0"),
        ("loss", "naive", "loss must be one of"),
        ("backend", "", "backend must be a backend name"),
    ],
)
def test_ddkconfig_rejects_bad_values(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=f"DDKConfig: {message}.*got"):
        DDKConfig(output_dir=str(tmp_path), **{field: value})


def test_ddkconfig_defaults_are_the_papers_and_fields_are_documented(tmp_path):
    cfg = DDKConfig(output_dir=str(tmp_path))
    assert (cfg.gamma, cfg.temperature, cfg.divergence, cfg.alpha, cfg.interval, cfg.val_samples) == (
        0.2,
        1.0,
        "forward_kl",
        0.5,
        1000,
        500,
    )
    assert (cfg.method, cfg.ddk_init, cfg.loss, cfg.seq_len) == ("ddk", "discrepancy", "fused", None)
    assert (cfg.ddk_signal, cfg.ddk_temperature) == ("ratio", 1.0)
    own = set(DDKConfig.__dataclass_fields__) - set(TrainingArguments.__dataclass_fields__)
    assert own and all(DDKConfig.__dataclass_fields__[f].metadata.get("help") for f in own)
    (parsed,) = transformers.HfArgumentParser(DDKConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--gamma", "0.3", "--method", "kd", "--seq_len", "64"]
    )
    assert (parsed.gamma, parsed.method, parsed.seq_len) == (0.3, "kd", 64)


# ---------------------------------------------------------------------------- README example
README_EXAMPLE = """
from transformers import AutoModelForCausalLM, AutoTokenizer

from ddk.data import load_records
from ddk.integrations.transformers import DDKConfig, DDKTrainer

tokenizer = AutoTokenizer.from_pretrained("models/student")
student = AutoModelForCausalLM.from_pretrained("models/student")
teacher = AutoModelForCausalLM.from_pretrained("models/teacher")
records = load_records("corpus.jsonl")  # columns: text, domain

args = DDKConfig(output_dir="run", max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                 seq_len=32, val_samples=8, interval=2, report_to="none", use_cpu=True)
trainer = DDKTrainer(model=student, teacher=teacher, args=args,
                     train_dataset=records, processing_class=tokenizer)
trainer.train()
trainer.save_model("run/final")
"""


def test_readme_example_runs_as_printed(tmp_path, monkeypatch):
    from hf_models import make_pair

    monkeypatch.chdir(tmp_path)
    make_pair(tmp_path / "models")
    write_jsonl(tmp_path / "corpus.jsonl", docs_per_domain=30)
    exec(compile(README_EXAMPLE, "README.md", "exec"), {})
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    log = [json.loads(line) for line in (tmp_path / "run" / "ddk_log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log] == ["init", "update", "update"]


# ---------------------------------------------------------------------------- data parallel
_DDP_WORKER = """
import os
import sys
from pathlib import Path

out, rank, port, loss = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
os.environ.update(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                  OMP_NUM_THREADS="1")
sys.path.insert(0, sys.argv[5])

import torch
from safetensors.torch import save_file
from test_transformers import _final_weights

weights = _final_weights(out / "run", per_device=2, accumulation=1, loss=loss)
save_file(weights, str(out / f"rank{rank}.safetensors"))
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


@pytest.mark.parametrize("loss", ["fused", "logits"])
@pytest.mark.e2e
def test_ddktrainer_data_parallel_equals_one_process_on_uneven_tokens(tmp_path, loss):
    """2 gloo ranks x 2 sequences (uneven valid tokens per rank) = 1 process x 4 sequences: the
    normalizer is the global token count / R, and DDP averages the gradients over the R ranks."""
    from gloo_workers import run_workers
    from safetensors.torch import load_file

    script = tmp_path / "worker.py"
    script.write_text(_DDP_WORKER)
    run_workers(script, lambda r, port: [tmp_path, r, port, loss, Path(__file__).resolve().parent])
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    one = _final_weights(tmp_path / "one", per_device=4, accumulation=1, loss=loss)
    for k in one:
        assert torch.equal(ranks[0][k], ranks[1][k]), k  # the ranks stayed in sync
        torch.testing.assert_close(ranks[0][k], one[k], atol=1e-12, rtol=1e-10, msg=k)


# ---------------------------------------------------------------------------- FSDP2 (accelerate)
FSDP2 = dict(fsdp=True, fsdp_config={"fsdp_version": 2})  # accelerate's FSDP2, its default layout


def accelerate_fsdp_on_cpu() -> None:
    """Let accelerate run FSDP on the CPU with gloo, for the test workers.

    accelerate 1.16 takes its FSDP branch only on an accelerator device: on the CPU
    (``use_cpu=True``, several processes) its state is ``MULTI_CPU`` and the FSDP plugin is dropped
    without a word, so a Trainer given ``fsdp`` runs DDP. Here gloo on the CPU stands in for the
    device: ``AcceleratorState`` takes the branch it takes on GPUs (distributed type FSDP, the
    plugin kept, its mixed precision set). From there on everything (``fsdp2_prepare_model``, the
    Trainer's FSDP paths, ``DDKTrainer``'s) is accelerate's, transformers' and ddk's own code.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):  # type: ignore[no-untyped-def]
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type  # as its __init__ ends

    AcceleratorState.__init__ = fsdp_on_cpu  # type: ignore[method-assign]


class _CountingTrainer(DDKTrainer):
    """Counts the teacher's forwards and the gathers of its root group (embeddings, final norm,
    output layer); records, for each training micro-step, the root group's gathers, the sharded
    tensors the loss gathered besides, and whether the whole teacher was sharded again afterwards."""

    def __init__(self, *a, **k):  # type: ignore[no-untyped-def]
        super().__init__(*a, **k)
        self.teacher_forwards = self.root_gathers = self.full_tensors = 0
        self.steps: list[tuple[int, int, bool]] = []

    def count(self) -> None:
        import ddk.losses.causal_lm as causal_lm

        root = self.teacher._get_fsdp_state()._fsdp_param_groups[0]  # FSDP2's group of the root's own parameters
        unshard, full_tensor = root.unshard, causal_lm.full_tensor

        def counting_unshard(*a, **k):  # type: ignore[no-untyped-def]
            self.root_gathers += not root.is_unsharded
            return unshard(*a, **k)

        def counting_full_tensor(t):  # type: ignore[no-untyped-def]
            self.full_tensors += callable(getattr(t, "full_tensor", None))
            return full_tensor(t)

        def forward(*_):  # type: ignore[no-untyped-def]
            self.teacher_forwards += 1

        root.unshard, causal_lm.full_tensor = counting_unshard, counting_full_tensor
        self.teacher.register_forward_pre_hook(forward)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        from torch.distributed.tensor import DTensor

        before = (self.root_gathers, self.full_tensors)
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            sharded = all(isinstance(p, DTensor) for p in self.teacher.parameters())
            self.steps.append((self.root_gathers - before[0], self.full_tensors - before[1], sharded))
        return out


def fsdp_run(out: Path, per_device: int, family: str, loss: str, fsdp: bool, offload: str = "none") -> dict:  # type: ignore[type-arg]
    """``DDKTrainer.train()`` of a float64 tiny pair of ``family`` (teacher: 4 blocks; ``qwen2``: tied
    output layers, the teacher's vocabulary padded by 8 rows) for 4 steps of a
    global batch of 4 (``method="ddk"``, interval 2: two updates of the weights; ragged labels:
    uneven tokens per rank; one validation batch per domain: uneven shards over 2 ranks), then
    ``evaluate()`` on 4 sequences per domain. Under ``fsdp`` accelerate's FSDP2 shards the student
    and ``DDKTrainer`` the teacher. Returns the logs, the controller's records, the evaluation,
    the student's full parameters and what this rank held and gathered of the teacher."""
    from ddk.distributed import local_bytes

    train, val = _data(ragged=True)
    args = DDKConfig(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        seed=0,
        method="ddk",
        loss=loss,
        **{**COMMON, "logging_steps": 1},
        **(dict(FSDP2, teacher_offload=offload) if fsdp else {}),
    )
    controller = _rank_controller(val, args, per_device, FactorSmoother(3), interval=2)
    evals = {n: [{"input_ids": r, "domain_id": d} for r in val[n][0]["input_ids"]] for d, n in enumerate(NAMES)}
    teacher = make_model(family, VOCAB + (8 if family == "qwen2" else 0), hidden=48, layers=4, seed=1).double()
    whole = local_bytes(teacher)
    tr = _CountingTrainer(
        model=make_model(family, VOCAB, seed=2).double(),
        args=args,
        train_dataset=train,
        eval_dataset=evals,
        teacher=teacher,
        controller=controller,
    )
    if fsdp:
        tr.count()
    tr.train()
    # (before evaluate(): accelerate keeps the student's output-layer group gathered after a forward)
    student_sharded = all(type(p).__name__ == "DTensor" for p in tr.model.parameters())
    evaluation = tr.evaluate()
    logs = [h for h in tr.state.log_history if "loss" in h]
    from torch.distributed.fsdp import FSDPModule

    policies = [  # FSDP2's offload policy of each of the teacher's groups
        type(m._get_fsdp_state()._fsdp_param_group.offload_policy).__name__
        for m in tr.teacher.modules()  # type: ignore[union-attr]
        if isinstance(m, FSDPModule) and m._get_fsdp_state()._fsdp_param_group is not None
    ]
    params = {n: getattr(p, "full_tensor", p.detach)().detach().clone() for n, p in tr.model.named_parameters()}
    return {
        "fsdp2": bool(tr.accelerator.is_fsdp2),
        "student_sharded": student_sharded,
        "logs": {k: [h[k] for h in logs] for k in ("loss", "ce", "kd", "grad_norm")},
        "weights": [r["weights"] for r in controller.records],
        "validation_ce": [r["student_ce"] + r["teacher_ce"] for r in controller.records],
        "eval": {k: v for k, v in evaluation.items() if k.endswith("_loss")},
        "params": params,
        "teacher_whole": whole,
        "teacher_local": local_bytes(tr.teacher),  # type: ignore[arg-type]
        "teacher_devices": sorted(
            {str(p.to_local().device) for p in tr.teacher.parameters() if hasattr(p, "to_local")}
        ),  # type: ignore[union-attr]
        "teacher_policies": policies,
        "steps": tr.steps,
        "root_gathers": tr.root_gathers,
        "teacher_forwards": tr.teacher_forwards,
    }


_FSDP_WORKER = """
import json
import os
import sys
from pathlib import Path

out, rank, port, family, loss, offload = (Path(sys.argv[1]), *sys.argv[2:6], sys.argv[7])
os.environ.update(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=port, OMP_NUM_THREADS="1")
sys.path.insert(0, sys.argv[6])

import torch
from safetensors.torch import save_file
from test_transformers import accelerate_fsdp_on_cpu, fsdp_run

accelerate_fsdp_on_cpu()
result = fsdp_run(out / "run", per_device=2, family=family, loss=loss, fsdp=True, offload=offload)
save_file(result.pop("params"), str(out / f"rank{rank}.safetensors"))
(out / f"rank{rank}.json").write_text(json.dumps(result))
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


@pytest.mark.parametrize(
    "family,loss,offload",
    [  # make test runs the tied, padded Qwen2 and the offloaded Llama; make test-all the other two
        pytest.param("llama", "fused", "none", marks=pytest.mark.slow),
        pytest.param("llama", "logits", "none", marks=pytest.mark.slow),
        ("qwen2", "fused", "none"),
        ("llama", "fused", "cpu"),
    ],
)
@pytest.mark.e2e
def test_ddktrainer_fsdp2_equals_one_process_with_half_the_teacher_per_rank(tmp_path, family, loss, offload):
    """A real ``DDKTrainer.train()`` under accelerate's FSDP2 on 2 gloo ranks x 2 sequences = 1 process
    x 4 sequences: per-step losses, the controller's weights and validation CEs, the evaluation and
    the final student parameters agree to float64 rounding: FSDP2 reduce-scatters the halves' sums
    where one process sums the whole batch (measured: parameters within 2.8e-17, ce, kd and the
    gradient norm within 3.5e-15 relative, weights and validation CEs equal, evaluation within
    2.1e-16). Each rank holds half of the teacher's bytes; every micro-step gathers its root group
    once (its output layer read as gathered, nothing else gathered for the loss) and frees it; both
    ranks run as many teacher forwards (the teacher CE over uneven validation shards padded, none in
    ``evaluate()``)."""
    from gloo_workers import run_workers
    from safetensors.torch import load_file

    script = tmp_path / "worker.py"
    script.write_text(_FSDP_WORKER)
    here = Path(__file__).resolve().parent
    run_workers(script, lambda r, port: [tmp_path, r, port, family, loss, here, offload], timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    params = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    one = fsdp_run(tmp_path / "one", per_device=4, family=family, loss=loss, fsdp=False)
    init = make_model(family, VOCAB, seed=2).double().state_dict()
    assert not one["fsdp2"] and any(not torch.equal(one["params"][k], init[k]) for k in one["params"])  # it trained
    for got in ranks:
        assert got["fsdp2"] and got["student_sharded"]
        assert got["teacher_local"] / got["teacher_whole"] == pytest.approx(0.5, abs=0.01)
        # teacher_offload="cpu": FSDP2's CPUOffloadPolicy on every group of the teacher, its shards CPU tensors
        # (on this CPU-only machine the device is the CPU too: the policy is what tells the two apart)
        want_policy = "CPUOffloadPolicy" if offload == "cpu" else "OffloadPolicy"
        assert len(got["teacher_policies"]) == 4 + 1 and set(got["teacher_policies"]) == {want_policy}
        assert got["teacher_devices"] == ["cpu"]
        assert got["steps"] == [[1, 0, True]] * 4  # one gather of the root group per micro-step, freed after it
        # the teacher CE: one batch per domain, on rank 0; rank 1 runs a spare one per domain (dropped)
        assert got["teacher_forwards"] == len(NAMES) + 4
        assert got["root_gathers"] == 1 + 4  # the root group held through the teacher-CE pass, freed at its end
        assert got["logs"] == ranks[0]["logs"]  # logged over both ranks
        assert got["logs"]["loss"] == pytest.approx(one["logs"]["loss"], rel=1e-6)  # the Trainer sums it in float32
        for key in ("ce", "kd", "grad_norm"):
            assert got["logs"][key] == pytest.approx(one["logs"][key], rel=1e-10), key
        for key in ("weights", "validation_ce"):
            torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(one[key]), rtol=1e-12, atol=0, msg=key)
        assert got["eval"] == pytest.approx(one["eval"], rel=1e-12)
    for k, want in one["params"].items():
        assert torch.equal(params[0][k], params[1][k]), k
        torch.testing.assert_close(params[0][k], want, atol=1e-12, rtol=1e-10, msg=k)


def test_ddktrainer_teacher_offload_needs_fsdp2_and_a_teacher(tmp_path):
    """``teacher_offload="cpu"`` outside accelerate's FSDP2 (one process here) is refused at once,
    naming the FSDP2 settings; another value is refused by ``DDKConfig``."""
    train, val = _data()
    with pytest.raises(ValueError, match="teacher_offload must be 'none' or 'cpu'; got 'gpu'"):
        DDKConfig(output_dir=str(tmp_path), max_steps=1, teacher_offload="gpu", **COMMON)
    args = DDKConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=BATCH, teacher_offload="cpu", **COMMON
    )
    est = DiscrepancyEstimator(val, progress=False)
    ctrl = DDKController(est, FactorSmoother(3), MixtureSampler(list(SIZES), BATCH, domain_names=NAMES), interval=2)
    with pytest.raises(ValueError, match=r"not FSDP2\). Set DDKConfig\(fsdp=True, fsdp_config=\{'fsdp_version': 2\}\)"):
        DDKTrainer(
            model=make_model("llama", VOCAB),
            args=args,
            train_dataset=train,
            teacher=make_model("llama", VOCAB, seed=1),
            controller=ctrl,
        )
    # fsdp asked for, but accelerate left it out (the CPU: MULTI_CPU under torchrun): the error says so
    # instead of asking for what was set
    from ddk.integrations.transformers import _offload_refusal

    said = _offload_refusal(True, "DistributedType.MULTI_CPU", fsdp_requested=True)
    assert "accelerate runs FSDP only on an accelerator device" in said and "Set DDKConfig" not in said


# ---------------------------------------------------------------------------- from a teacher cache
def test_ddktrainer_distills_from_a_teacher_cache_without_a_teacher(tmp_path, tok):
    from torch.utils.data import DataLoader

    from ddk import causal_lm_kd_loss
    from ddk.data import TeacherCacheCollator, build_teacher_cache, pack_domains, tokenizer_hash

    teacher = make_model("llama", len(tok), seed=1).eval()
    packed = pack_domains(_records(), tok, seq_len=16, val_samples=4, seed=0, progress=False)
    cache = build_teacher_cache(
        teacher, packed, tmp_path / "cache", top_k=len(tok), vocab_size=len(tok), tokenizer_hash=tokenizer_hash(tok),
        progress=False,
    )  # fmt: skip

    def run(**kw):  # type: ignore[no-untyped-def]
        tr = DDKTrainer(
            model=make_model("llama", len(tok), seed=2),
            args=_config(tmp_path / "o", max_steps=2),
            processing_class=tok,
            **kw,
        )
        tr.train()
        return tr

    online = run(teacher=teacher, train_dataset=_records())
    cached = run(teacher_cache=tmp_path / "cache")
    assert cached.teacher is None and cached.controller.num_updates == 2
    assert cached.controller.records[0]["teacher_ce"] == pytest.approx(
        online.controller.records[0]["teacher_ce"], rel=1e-5
    )
    # every token cached: the full loss, up to the fp16 log-probabilities (Adam's first steps amplify
    # sign flips of tiny gradient entries, so the weights themselves are not compared)
    loss = [h["train_loss"] for h in (online.state.log_history[-1], cached.state.log_history[-1])]
    assert loss[1] == pytest.approx(loss[0], rel=1e-3)
    for a, b in zip(online.controller.records, cached.controller.records):
        assert b["student_ce"] == pytest.approx(a["student_ce"], rel=1e-3)
    batch = next(iter(DataLoader(cached.train_dataset, batch_size=4, collate_fn=TeacherCacheCollator())))
    student = make_model("llama", len(tok), seed=3)
    with torch.no_grad():
        domain_ids = batch.pop("domain_ids")
        via_cache = causal_lm_kd_loss(student, None, batch, domain_ids=domain_ids, num_domains=3)
        direct = causal_lm_kd_loss(
            student,
            teacher,
            {k: batch[k] for k in ("input_ids", "labels")},
            domain_ids=domain_ids,
            num_domains=3,
        )
    assert float(direct.kd_sum) > 0 and float(via_cache.kd_sum) == pytest.approx(float(direct.kd_sum), rel=2e-3)
    with pytest.raises(ValueError, match="teacher_cache replaces teacher, train_dataset and controller"):
        DDKTrainer(model=make_model("llama", len(tok), seed=2), args=_config(tmp_path / "x"), teacher=teacher,
                   teacher_cache=cache, processing_class=tok)  # fmt: skip
    with pytest.raises(ValueError, match=r"must match the run; got seq_len: the cache has 16, the run 8"):
        DDKTrainer(model=make_model("llama", len(tok), seed=2), args=_config(tmp_path / "x", seq_len=8),
                   teacher_cache=cache, processing_class=tok)  # fmt: skip


# ---------------------------------------------------------------------------- checkpoint rotation
def test_ddktrainer_newest_checkpoint_holds_the_ddk_state_before_rotation(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    from hf_models import make_model
    from transformers import TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from ddk import DDKController, DiscrepancyEstimator, FactorSmoother, MixtureSampler
    from ddk.integrations.transformers import DDK_STATE_NAME, DDKCallback, DDKTrainer

    g = torch.Generator().manual_seed(0)
    train = [
        {"input_ids": torch.randint(30 * d, 30 * d + 30, (12,), generator=g), "domain_id": d}
        for d, n in enumerate((8, 6))
        for _ in range(n)
    ]
    val = {name: [{"input_ids": torch.randint(0, 60, (2, 12), generator=g)}] for name in ("a", "b")}

    def trainer(max_steps: int) -> DDKTrainer:
        ctrl = DDKController(
            DiscrepancyEstimator(val, progress=False),
            FactorSmoother(2),
            MixtureSampler([8, 6], 4, seed=3, domain_names=("a", "b")),
            interval=2,
        )
        args = TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=max_steps,
            per_device_train_batch_size=4,
            save_strategy="steps",
            save_steps=1,
            save_total_limit=1,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            dataloader_num_workers=0,
            logging_steps=100,
        )
        return DDKTrainer(
            model=make_model("llama", 100, seed=2),
            args=args,
            train_dataset=train,
            teacher=make_model("llama", 100, hidden=48, layers=2, seed=1),
            controller=ctrl,
        )

    calls = {"n": 0}
    orig = DDKCallback.on_save

    def crash_after_rotation(self, *a, **k):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:  # checkpoint-2 saved and checkpoint-1 rotated away
            raise KeyboardInterrupt("killed between the rotation and on_save")
        return orig(self, *a, **k)

    monkeypatch.setattr(DDKCallback, "on_save", crash_after_rotation)
    with pytest.raises(KeyboardInterrupt):
        trainer(3).train()
    monkeypatch.undo()
    last = get_last_checkpoint(str(tmp_path))
    assert Path(last).name == "checkpoint-2" and (Path(last) / DDK_STATE_NAME).is_file()
    trainer(3).train(resume_from_checkpoint=True)  # resumable
    assert (tmp_path / "checkpoint-3" / DDK_STATE_NAME).is_file()


# ---------------------------------------------------------------------------- tracking
@pytest.mark.skipif(not importlib.util.find_spec("tensorboard"), reason="needs tensorboard (requirements-dev.txt)")
def test_ddktrainer_report_to_tensorboard_logs_weights_per_domain_and_loss_terms(tmp_path, tok):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tr = DDKTrainer(
        model=make_model("llama", len(tok), seed=2),
        teacher=make_model("llama", len(tok), hidden=48, seed=1),
        args=_config(tmp_path, max_steps=3, interval=2, report_to=["tensorboard"], logging_steps=1),
        train_dataset=_records(),
        processing_class=tok,
    )
    tr.train()
    names, records = tr.controller.estimator.domain_names, tr.controller.records
    (events,) = {p.parent for p in tmp_path.rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    for i, name in enumerate(names):  # the Trainer's TensorBoard writer prefixes train/
        got = [(e.step, e.value) for e in acc.Scalars(f"train/weight/{name}")]
        assert [s for s, _ in got] == [r["step"] for r in records] == [0, 2]
        assert [v for _, v in got] == pytest.approx([r["weights"][i] for r in records], rel=1e-6)
        for key in ("student_ce", "teacher_ce", "gap", "ratio"):
            assert [e.step for e in acc.Scalars(f"train/{key}/{name}")] == [0, 2]
        assert [e.step for e in acc.Scalars(f"train/tokens/{name}")] == [1, 2, 3]
    history = [h for h in tr.state.log_history if "loss" in h]
    for key in ("ce", "kd"):
        assert [e.value for e in acc.Scalars(f"train/{key}")] == pytest.approx([h[key] for h in history], rel=1e-6)
    gamma = tr.args.gamma
    for h in history:  # one step per log, no accumulation: the Trainer's loss is ce + gamma * kd
        assert h["loss"] == pytest.approx(h["ce"] + gamma * h["kd"], rel=1e-4)
        assert sum(h[f"tokens/{n}"] for n in names) == 4 * 15  # 4 sequences of 16 tokens, 15 targets each


def test_ddktrainer_report_to_wandb_offline_logs_weights_per_domain_and_loss_terms(tmp_path, tok):
    from wandb_offline import offline_env, offline_runs

    with offline_env(tmp_path):
        import wandb

        tr = DDKTrainer(
            model=make_model("llama", len(tok), seed=2),
            teacher=make_model("llama", len(tok), hidden=48, seed=1),
            args=_config(tmp_path / "out", max_steps=3, interval=2, report_to=["wandb"], logging_steps=1),
            train_dataset=_records(),
            processing_class=tok,
        )
        try:
            tr.train()
        finally:
            wandb.finish()  # transformers' callback leaves the run open for the caller
    (run,) = offline_runs(tmp_path / "wandb-home" / "dir" / "wandb")  # under WANDB_DIR: the Trainer passes no dir
    names, records = tr.controller.estimator.domain_names, tr.controller.records
    for i, name in enumerate(names):  # the Trainer's callback prefixes train/ and logs train/global_step
        got = run.series(f"train/weight/{name}", step="train/global_step")
        assert [s for s, _ in got] == [r["step"] for r in records] == [0, 2]
        assert [v for _, v in got] == pytest.approx([r["weights"][i] for r in records], rel=1e-6)
        for key in ("student_ce", "teacher_ce", "gap", "ratio"):
            assert [s for s, _ in run.series(f"train/{key}/{name}", step="train/global_step")] == [0, 2]
        assert [s for s, _ in run.series(f"train/tokens/{name}", step="train/global_step")] == [1, 2, 3]
    history = [h for h in tr.state.log_history if "loss" in h]
    for key in ("ce", "kd"):
        got = run.series(f"train/{key}", step="train/global_step")
        assert got == [(h["step"], pytest.approx(h[key], rel=1e-6)) for h in history]
