"""Tests of ddk/controller.py: the DDK schedule over estimator, smoother and MixtureSampler."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ddk.controller import DDKController
from ddk.discrepancy import DiscrepancyEstimator
from ddk.sampling import MixtureSampler
from ddk.schedule import FactorSmoother
from ddk_kernels.types import KDLossOutput

VOCAB = 11
NAMES = ("code", "law", "web")


class TinyLM(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, 5)
        self.head = nn.Linear(5, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.emb(input_ids))


def _val() -> dict[str, list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    return {
        n: [{"input_ids": torch.randint(0, VOCAB, (2, 6), generator=g)} for _ in range(1 + i)]
        for i, n in enumerate(NAMES)
    }


def _make(
    tmp_path: Path | None = None, *, online: bool = False, interval: int = 5, teacher: bool = True, seed: int = 0
):
    est = DiscrepancyEstimator(_val(), progress=False)
    if teacher:
        est.compute_teacher(TinyLM(100))
    sampler = MixtureSampler([30, 40, 50], 8, seed=seed, domain_names=NAMES)
    ctl = DDKController(
        est,
        FactorSmoother(3, alpha=0.5),
        sampler,
        interval=interval,
        log_path=None if tmp_path is None else tmp_path / "logs" / "ddk.jsonl",
        online=online,
    )
    return ctl, est, sampler


def _perturb(model: nn.Module, k: int) -> None:
    g = torch.Generator().manual_seed(k)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def test_controller_start_sets_eq1_weights_on_sampler(tmp_path: Path) -> None:
    ctl, est, sampler = _make(tmp_path)
    student = TinyLM(1)
    w = ctl.start(student)
    disc = est.estimate(student)
    torch.testing.assert_close(w, torch.softmax(disc.ratio, 0))
    assert sampler.weights == pytest.approx(w.tolist(), abs=1e-15)
    rec = ctl.records[0]
    assert rec["event"] == "init" and rec["step"] == 0 and rec["batch"] == 0
    assert rec["domain_names"] == list(NAMES)
    assert rec["ratio"] == pytest.approx(disc.ratio.tolist())
    assert rec["teacher_ce"] == pytest.approx(est.teacher_ce.tolist())


def test_controller_step_end_updates_every_interval(tmp_path: Path) -> None:
    ctl, est, sampler = _make(tmp_path, interval=3)
    student = TinyLM(1)
    w0 = ctl.start(student)
    updates = {}
    for step in range(0, 10):
        if step:
            sampler.next_global_batch()
        _perturb(student, step)
        out = ctl.step_end(step, student)
        if out is not None:
            updates[step] = out
    assert sorted(updates) == [3, 6, 9]
    assert ctl.step_end(9, student) is None  # same step again (e.g. after resume): no update
    # Eq. 2 against the smoother's history.
    hist = ctl.smoother.history
    prev = w0
    for h, step in zip(hist[1:], (3, 6, 9)):
        psi = [a * math.exp(b) for a, b in zip(prev.tolist(), h["ratio"])]
        expect = [0.5 * p / sum(psi) + 0.5 / 3 for p in psi]
        assert updates[step].tolist() == pytest.approx(expect, rel=1e-12)
        prev = updates[step]
    assert sampler.weights == pytest.approx(updates[9].tolist(), abs=1e-15)
    assert ctl.num_updates == 3
    lines = (tmp_path / "logs" / "ddk.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert [r["event"] for r in recs] == ["init", "update", "update", "update"]
    assert [r["step"] for r in recs] == [0, 3, 6, 9]
    assert [r["batch"] for r in recs] == [0, 3, 6, 9]
    assert set(recs[1]) == {
        "event",
        "step",
        "batch",
        "domain_names",
        "weights",
        "ratio",
        "student_ce",
        "teacher_ce",
        "tokens",
        "time",
    }
    assert recs == json.loads(json.dumps(ctl.records))


def test_controller_online_mode_uses_observed_batches() -> None:
    ctl, est, sampler = _make(online=True, interval=2)
    ctl.start(TinyLM(1))
    teacher_ce = est.teacher_ce
    z = torch.zeros(())
    for _ in range(2):
        ctl.observe(
            KDLossOutput(
                loss=z,
                ce_sum=z,
                kd_sum=z,
                num_tokens=torch.tensor(6),
                domain_ce_sum=torch.tensor([6.0, 2.0, 0.0]),
                domain_kd_sum=torch.zeros(3),
                domain_tokens=torch.tensor([2, 2, 0]),
            )
        )
    assert ctl.step_end(1) is None
    ctl.step_end(2)
    rec = ctl.records[-1]
    assert rec["tokens"] == [4, 4, 0]
    assert rec["student_ce"][:2] == pytest.approx([3.0, 1.0])
    assert rec["teacher_ce"] == pytest.approx(teacher_ce.tolist())
    assert rec["student_ce"][2] == pytest.approx(
        ctl.records[0]["student_ce"][2]
    )  # unobserved: keeps the start estimate


def test_controller_state_dict_resume_continues_identically(tmp_path: Path) -> None:
    a, _, sa = _make(interval=2)
    student = TinyLM(1)
    a.start(student)
    for step in range(1, 5):
        sa.next_global_batch()
        _perturb(student, step)
        a.step_end(step, student)
    state = json.loads(json.dumps(a.state_dict()))
    b, _, sb = _make(interval=2, teacher=False)
    b.load_state_dict(state)
    assert b.started and b.num_updates == a.num_updates == 2
    torch.testing.assert_close(b.weights, a.weights, rtol=0, atol=0)
    twin = TinyLM(1)
    twin.load_state_dict(student.state_dict())
    for step in range(5, 9):
        assert sa.next_global_batch().tolist() == sb.next_global_batch().tolist()
        _perturb(student, step)
        _perturb(twin, step)
        wa, wb = a.step_end(step, student), b.step_end(step, twin)
        assert (wa is None) == (wb is None)
        if wa is not None:
            torch.testing.assert_close(wa, wb, rtol=0, atol=0)
    assert b.step_end(4, twin) is None


def test_controller_state_dict_at_batch() -> None:
    ctl, _, sampler = _make()
    ctl.start(TinyLM(1))
    for _ in range(3):
        sampler.next_global_batch()
    assert ctl.state_dict(at_batch=1)["sampler"] == sampler.state_dict(at_batch=1)


def test_controller_start_without_teacher_raises() -> None:
    ctl, _, _ = _make(teacher=False)
    with pytest.raises(
        RuntimeError,
        match=r"DDKController.start: the estimator must have the teacher CE; call estimator.compute_teacher\(teacher\) first",
    ):
        ctl.start(TinyLM(1))


def test_controller_step_end_errors() -> None:
    ctl, _, _ = _make()
    with pytest.raises(
        RuntimeError,
        match=r"DDKController.step_end: the controller must be started first; call controller.start\(student\)\.",
    ):
        ctl.step_end(5, TinyLM(1))
    ctl.start(TinyLM(1))
    with pytest.raises(ValueError, match=r"DDKController.step_end: global_step must be an int >= 0; got -1\."):
        ctl.step_end(-1, TinyLM(1))
    with pytest.raises(
        ValueError, match=r"DDKController.step_end: student must be given unless online=True; got None\."
    ):
        ctl.step_end(5)


@pytest.mark.parametrize("interval", [0, -3, 2.5, "10", True])
def test_controller_bad_interval_raises(interval) -> None:
    est = DiscrepancyEstimator(_val(), progress=False)
    with pytest.raises(
        ValueError,
        match=r"DDKController: interval must be an int >= 1 \(optimizer steps between updates; paper: 1000\); got ",
    ):
        DDKController(est, FactorSmoother(3), MixtureSampler([3, 3, 3], 4), interval=interval)


def test_controller_mismatched_parts_raise() -> None:
    est = DiscrepancyEstimator(_val(), progress=False)
    with pytest.raises(
        ValueError, match=r"DDKController: smoother.num_domains must equal the estimator's 3 domains; got 2\."
    ):
        DDKController(est, FactorSmoother(2), MixtureSampler([3, 3, 3], 4))
    with pytest.raises(
        ValueError, match=r"DDKController: sampler.num_domains must equal the estimator's 3 domains; got 4\."
    ):
        DDKController(est, FactorSmoother(3), MixtureSampler([3, 3, 3, 3], 4))
    with pytest.raises(
        ValueError,
        match=r"DDKController: sampler.domain_names must equal the estimator's \['code', 'law', 'web'\] \(same order\); got \['web', 'law', 'code'\]\.",
    ):
        DDKController(est, FactorSmoother(3), MixtureSampler([3, 3, 3], 4, domain_names=["web", "law", "code"]))
    with pytest.raises(TypeError, match=r"DDKController: estimator must be a DiscrepancyEstimator; got dict\."):
        DDKController({}, FactorSmoother(3), MixtureSampler([3, 3, 3], 4))  # type: ignore[arg-type]
    with pytest.raises(
        TypeError,
        match=r"DDKController: sampler must be a MixtureSampler \(with \['set_weights', 'state_dict', 'load_state_dict'\]\); got list\.",
    ):
        DDKController(est, FactorSmoother(3), [])
    DDKController(est, FactorSmoother(3), MixtureSampler([3, 3, 3], 4))  # default sampler names are accepted


def test_controller_load_state_dict_bad_state_raises() -> None:
    ctl, _, _ = _make()
    with pytest.raises(
        TypeError,
        match=r"DDKController.load_state_dict: state must be a dict from DDKController.state_dict\(\) with keys controller, estimator, smoother, sampler; got \['weights'\]\.",
    ):
        ctl.load_state_dict({"weights": []})


def test_controller_log_written_on_rank_zero_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ddk.controller as controller_module

    monkeypatch.setattr(controller_module, "rank_world", lambda: (1, 2))
    ctl, _, _ = _make(tmp_path)
    ctl.start(TinyLM(1))
    assert len(ctl.records) == 1
    assert not (tmp_path / "logs" / "ddk.jsonl").exists()


def test_controller_runs_the_doremi_schedule_through_the_same_interface(tmp_path: Path) -> None:
    from ddk.schedule import DoReMiScheduler

    est = DiscrepancyEstimator(_val(), progress=False)
    est.compute_teacher(TinyLM(100))
    sampler = MixtureSampler([30, 40, 50], 8, seed=0, domain_names=NAMES)
    ctl = DDKController(est, DoReMiScheduler(3), sampler, interval=2, log_path=tmp_path / "c.jsonl")
    student = TinyLM(1)
    assert ctl.start(student).tolist() == [1 / 3] * 3  # DoReMi starts uniform
    gap = est.estimate(student).gap.numpy()
    for _ in range(2):
        sampler.next_global_batch()
    new = ctl.step_end(2, student)
    a = np.exp(np.maximum(gap, 0.0)) / np.exp(np.maximum(gap, 0.0)).sum()
    np.testing.assert_allclose(new.numpy(), 0.999 * a + 1e-3 / 3, rtol=1e-12)
    assert sampler.weights == pytest.approx(new.tolist(), rel=1e-12)
    # resume through the controller's state
    ctl2 = DDKController(
        est, DoReMiScheduler(3), MixtureSampler([30, 40, 50], 8, seed=0, domain_names=NAMES), interval=2
    )
    ctl2.load_state_dict(ctl.state_dict())
    assert torch.equal(ctl2.weights, ctl.weights)


def test_controller_warns_when_eq1_collapses_onto_one_domain() -> None:
    est = DiscrepancyEstimator(_val(), progress=False, teacher_ce=[0.5, 3.0, 3.0])
    sampler = MixtureSampler([30, 40, 50], 8, seed=0, domain_names=NAMES)
    ctl = DDKController(est, FactorSmoother(3), sampler, interval=2)
    student = TinyLM(1)  # CE ~ log(11) ~ 2.4 on every domain: ratio e^1.9 on code, below 1 elsewhere
    with pytest.warns(
        UserWarning, match=r"Eq. 1 puts 9\d\.\d% of the mixture on domain 'code' \(ratios ppl_S/ppl_T: code="
    ) as rec:
        ctl.start(student)
    assert "--ddk-init floored" in str(rec[0].message) and "docs/results.md" in str(rec[0].message)
    # a uniform start, or a spread-out r_0, does not warn
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DDKController(est, FactorSmoother(3, init="uniform"), sampler, interval=2).start(student)
        est2 = DiscrepancyEstimator(_val(), progress=False, teacher_ce=[2.0, 2.0, 2.0])
        DDKController(est2, FactorSmoother(3), sampler, interval=2).start(student)


def test_states_are_validated_whole_before_anything_changes():
    from ddk import DDKController, DiscrepancyEstimator, FactorSmoother, MixtureSampler

    sampler = MixtureSampler([10, 10, 10], 6, seed=0)
    for _ in range(4):
        sampler.next_global_batch()
    good = sampler.state_dict()
    for field, value, message in [
        ("carry", [1e6, -1e6, 0.0], r"carry must be in \[-6, 6\] per domain"),
        ("carry", ["0", "0", "0"], r"carry must hold numbers"),
        ("passes", [2**62, 0, 0], r"passes must be ints in \[0, 2\*\*53\]; got \[4611686018427387904, 0, 0\]\."),
        ("passes", [2**40, 0, 0], r"passes and positions must account for batches_yielded \* global_batch_size = 24"),
    ]:
        with pytest.raises(ValueError, match=rf"MixtureSampler.load_state_dict: {message}"):
            MixtureSampler([10, 10, 10], 6, seed=0).load_state_dict({**good, field: value})

    def controller() -> DDKController:
        batch = [{"input_ids": torch.zeros(1, 4, dtype=torch.long)}]
        est = DiscrepancyEstimator(
            {n: batch for n in ("domain0", "domain1", "domain2")}, progress=False, teacher_ce=[1.0, 2.0, 3.0]
        )
        return DDKController(est, FactorSmoother(3), MixtureSampler([10, 10, 10], 6, seed=0), interval=2)

    src = controller()
    src.sampler.set_weights([0.2, 0.3, 0.5])
    src.smoother.load_state_dict(
        {
            "num_domains": 3,
            "alpha": 0.5,
            "mode": "ddk",
            "init": "discrepancy",
            "weights": [0.2, 0.3, 0.5],
            "history": [{"kind": "init", "ratio": [1.0] * 3, "weights": [0.2, 0.3, 0.5]}],
        }
    )
    src._started = True
    for _ in range(4):
        src.sampler.next_global_batch()
    state = src.state_dict()
    state["controller"].update(last_update_step=4, num_updates=2)
    controller().load_state_dict(state)  # the genuine state loads
    bad_sampler = {
        **state,
        "estimator": {**state["estimator"], "teacher_ce": [9.0, 9.0, 9.0]},
        "sampler": {**state["sampler"], "carry": [1e6, -1e6, 0.0]},
    }
    dst = controller()
    before = (dst.estimator.teacher_ce.tolist(), dst.smoother.initialized, dst.sampler.state_dict())
    with pytest.raises(ValueError, match=r"DDKController.load_state_dict \(sampler\): carry must be in"):
        dst.load_state_dict(bad_sampler)
    assert (dst.estimator.teacher_ce.tolist(), dst.smoother.initialized, dst.sampler.state_dict()) == before
    for part, patch, message in [
        ("controller", {"last_update_step": 10**9}, r"last_update_step'\] must be an int in \[0, 4\]"),
        ("controller", {"num_updates": -1}, r"num_updates'\] must be an int in \[0, last_update_step=4\]"),
        (
            "smoother",
            {"weights": [0.0, 0.0, 0.0]},
            r"\(smoother\): state\['weights'\] must be 3 finite weights >= 0 summing to 1",
        ),
        ("estimator", {"online": [[1.0, -5.0, 0.0, 0.0]] * 3}, r"\(estimator\): state\['online'\] must be 3x4"),
    ]:
        with pytest.raises(ValueError, match=rf"DDKController.load_state_dict.*{message}"):
            controller().load_state_dict({**state, part: {**state[part], **patch}})
