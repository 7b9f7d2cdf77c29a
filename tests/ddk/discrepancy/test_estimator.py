"""Tests of ddk/discrepancy/estimator.py: validation passes, online mode, distributed reduction."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from gloo_workers import run_workers
from torch import nn

from ddk.discrepancy import DiscrepancyEstimator, DomainDiscrepancy, causal_lm_ce_sum
from ddk_kernels.types import KDLossOutput

VOCAB = 13


class TinyLM(nn.Module):
    """Embedding + Linear; returns logits (B, L, V), or an object with .logits."""

    def __init__(self, seed: int = 0, wrap: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, 6)
        self.head = nn.Linear(6, VOCAB)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.wrap = wrap
        self.calls = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        self.calls += 1
        logits = self.head(self.emb(input_ids))
        return SimpleNamespace(logits=logits) if self.wrap else logits


def make_batches(seed: int, n_batches: int, pad: bool = True) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n_batches):
        bsz, length = 1 + b % 3, 3 + (b * 2) % 5
        ids = torch.randint(0, VOCAB, (bsz, length), generator=g)
        mask = torch.ones(bsz, length, dtype=torch.long)
        if pad and length > 3:
            mask[0, -2:] = 0  # right padding on the first row
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def reference_ce(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """Token-weighted mean CE in float64, one token at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            out = model(input_ids=batch["input_ids"])
            logits = (out.logits if hasattr(out, "logits") else out).double()
            labels = batch.get("labels")
            if labels is None:
                labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            for i in range(labels.shape[0]):
                for t in range(labels.shape[1] - 1):
                    y = int(labels[i, t + 1])
                    if y == -100:
                        continue
                    total -= float(torch.log_softmax(logits[i, t], -1)[y])
                    count += 1
    return total / count, count


def test_causal_lm_ce_sum_matches_reference_with_padding_and_labels() -> None:
    model = TinyLM()
    batch = make_batches(1, 5)[4]
    with torch.no_grad():
        ce, tok = causal_lm_ce_sum(model, batch)
    assert ce.dtype == torch.float64 and tok.dtype == torch.int64
    ref, n = reference_ce(model, [batch])
    assert int(tok) == n
    assert float(ce) / n == pytest.approx(ref, rel=1e-5)
    labels = batch["input_ids"].clone()
    labels[:, 2] = -100
    b2 = dict(batch, labels=labels)
    with torch.no_grad():
        ce2, tok2 = causal_lm_ce_sum(TinyLM(wrap=True), b2)
    ref2, n2 = reference_ce(model, [b2])
    assert int(tok2) == n2 and float(ce2) / n2 == pytest.approx(ref2, rel=1e-5)


def test_causal_lm_ce_sum_bad_batch_raises() -> None:
    with pytest.raises(TypeError, match=r"causal_lm_ce_sum: batch must be a dict with an 'input_ids' tensor \(B, L\)"):
        causal_lm_ce_sum(TinyLM(), {"text": "hello"})
    with pytest.raises(
        ValueError, match=r"causal_lm_ce_sum: batch\['input_ids'\] must have shape \(B, L\); got \(4,\)\."
    ):
        causal_lm_ce_sum(TinyLM(), {"input_ids": torch.arange(4)})
    with pytest.raises(
        ValueError,
        match=r"causal_lm_ce_sum: batch\['labels'\] must have the shape of input_ids \(1, 4\); got \(1, 3\)\.",
    ):
        causal_lm_ce_sum(
            TinyLM(), {"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": torch.zeros(1, 3, dtype=torch.long)}
        )


def test_estimator_estimate_token_weighted_per_domain() -> None:
    val = {"a": make_batches(1, 4), "b": make_batches(2, 3), "c": make_batches(3, 1)}
    teacher, student = TinyLM(seed=10), TinyLM(seed=20)
    est = DiscrepancyEstimator(val, progress=False)
    t_ce = est.compute_teacher(teacher)
    disc = est.estimate(student)
    assert disc.domain_names == ("a", "b", "c")
    for i, name in enumerate(("a", "b", "c")):
        ref_s, n = reference_ce(student, val[name])
        ref_t, _ = reference_ce(teacher, val[name])
        assert float(disc.student_ce[i]) == pytest.approx(ref_s, rel=1e-5)
        assert float(t_ce[i]) == pytest.approx(ref_t, rel=1e-5)
        assert int(disc.tokens[i]) == n
    assert disc.student_ce.dtype == torch.float64 and disc.tokens.dtype == torch.int64
    torch.testing.assert_close(disc.ratio, torch.exp(disc.student_ce - disc.teacher_ce))
    torch.testing.assert_close(disc.ratio, disc.student_ppl / disc.teacher_ppl)
    torch.testing.assert_close(disc.gap, disc.student_ce - disc.teacher_ce)


def test_estimator_estimate_restores_mode_and_no_grad() -> None:
    val = [make_batches(1, 2)]
    est = DiscrepancyEstimator(val, teacher_ce=[1.0], progress=False)
    model = TinyLM()
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append((m.training, torch.is_grad_enabled())))
    model.train()
    est.estimate(model)
    assert model.training and seen and all(s == (False, False) for s in seen)
    model.eval()
    est.estimate(model)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


def test_estimator_teacher_computed_once_and_cached() -> None:
    est = DiscrepancyEstimator({"x": make_batches(1, 3)}, progress=False)
    teacher = TinyLM()
    first = est.compute_teacher(teacher)
    calls = teacher.calls
    assert calls == 3
    torch.testing.assert_close(est.compute_teacher(teacher), first)
    assert teacher.calls == calls
    est.compute_teacher(teacher, force=True)
    assert teacher.calls == 2 * calls
    assert json.loads(json.dumps(est.state_dict()))["teacher_ce"] == first.tolist()


def test_estimator_dataloader_and_sequence_domains() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    ids = torch.randint(0, VOCAB, (7, 5), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(
        TensorDataset(ids), batch_size=3, collate_fn=lambda rows: {"input_ids": torch.stack([r[0] for r in rows])}
    )
    est = DiscrepancyEstimator([loader, make_batches(4, 2)], progress=False)
    assert est.domain_names == ("domain0", "domain1")
    model = TinyLM()
    ce = est.compute_teacher(model)
    ref, _ = reference_ce(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    assert float(ce[0]) == pytest.approx(ref, rel=1e-5)


def test_estimator_domain_names_reorder_mapping() -> None:
    val = {"a": make_batches(1, 1), "b": make_batches(2, 1)}
    est = DiscrepancyEstimator(val, domain_names=["b", "a"], progress=False)
    assert est.domain_names == ("b", "a")
    ce = est.compute_teacher(TinyLM())
    ref_b, _ = reference_ce(TinyLM(), val["b"])
    assert float(ce[0]) == pytest.approx(ref_b, rel=1e-5)


def test_estimator_custom_loss_fn() -> None:
    def loss_fn(model, batch):
        return torch.tensor(6.0, dtype=torch.float64), torch.tensor(3)

    est = DiscrepancyEstimator([[{"x": 1}], [{"x": 2}, {"x": 3}]], loss_fn=loss_fn, progress=False)
    assert est.compute_teacher(TinyLM()).tolist() == [2.0, 2.0]


def test_estimator_errors() -> None:
    fn = "DiscrepancyEstimator"
    with pytest.raises(
        ValueError, match=rf"{fn}: validation\['b'\] must hold at least one batch; got an empty domain 'b'\."
    ):
        DiscrepancyEstimator({"a": make_batches(1, 1), "b": []})
    with pytest.raises(
        TypeError,
        match=rf"{fn}: validation must be a mapping name -> batches or a sequence of per-domain batches; got int\.",
    ):
        DiscrepancyEstimator(3)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=rf"{fn}: validation\['domain0'\] must be a re-iterable of batches .*; got dict\."
    ):
        DiscrepancyEstimator(make_batches(1, 2))
    with pytest.raises(
        TypeError,
        match=rf"{fn}: validation\['a'\] must be re-iterable \(a list or DataLoader\), not a one-shot iterator; got generator\.",
    ):
        DiscrepancyEstimator({"a": (b for b in make_batches(1, 2))})
    with pytest.raises(
        ValueError,
        match=rf"{fn}: validation must have exactly the domains in domain_names; got missing \['c'\], unknown \['b'\]\.",
    ):
        DiscrepancyEstimator({"a": make_batches(1, 1), "b": make_batches(1, 1)}, domain_names=["a", "c"])
    with pytest.raises(ValueError, match=rf"{fn}: domain_names must have one name per validation set \(2\); got 1\."):
        DiscrepancyEstimator([make_batches(1, 1), make_batches(1, 1)], domain_names=["a"])
    with pytest.raises(ValueError, match=rf"{fn}: domain_names must be unique; got \['a', 'a'\]\."):
        DiscrepancyEstimator([make_batches(1, 1), make_batches(1, 1)], domain_names=["a", "a"])
    with pytest.raises(ValueError, match=rf"{fn}: validation must hold at least one domain; got 0\."):
        DiscrepancyEstimator({})
    with pytest.raises(ValueError, match=rf"{fn}.teacher_ce: teacher_ce must have shape \(2,\); got \(3,\)\."):
        DiscrepancyEstimator([make_batches(1, 1)] * 2, teacher_ce=[1.0, 2.0, 3.0])
    with pytest.raises(
        ValueError, match=rf"{fn}.teacher_ce: teacher_ce must be finite and >= 0 \(nats per token\); got \[1.0, nan\]\."
    ):
        DiscrepancyEstimator([make_batches(1, 1)] * 2, teacher_ce=[1.0, float("nan")])


def test_estimator_missing_teacher_raises() -> None:
    est = DiscrepancyEstimator([make_batches(1, 1)], progress=False)
    with pytest.raises(
        RuntimeError,
        match=r"DiscrepancyEstimator.teacher_ce: the teacher CE must be computed first; call estimator.compute_teacher\(teacher\)",
    ):
        est.teacher_ce  # noqa: B018
    with pytest.raises(RuntimeError, match=r"DiscrepancyEstimator.estimate: the teacher CE must be computed first"):
        est.estimate(TinyLM())


def test_estimator_domain_without_tokens_raises() -> None:
    ids = torch.zeros(1, 4, dtype=torch.long)
    val = {"ok": make_batches(1, 1), "masked": [{"input_ids": ids, "labels": torch.full_like(ids, -100)}]}
    est = DiscrepancyEstimator(val, progress=False)
    with pytest.raises(
        ValueError,
        match=r"DiscrepancyEstimator.compute_teacher: every validation domain must have at least one predicted \(non-ignored\) token; got none in \['masked'\]\.",
    ):
        est.compute_teacher(TinyLM())
    with pytest.raises(
        TypeError, match=r"DiscrepancyEstimator.compute_teacher: model must be a torch.nn.Module; got str\."
    ):
        est.compute_teacher("teacher")  # type: ignore[arg-type]


def _output(ce: list[float], tok: list[int]) -> KDLossOutput:
    z = torch.zeros(())
    return KDLossOutput(
        loss=z,
        ce_sum=z,
        kd_sum=z,
        num_tokens=torch.tensor(sum(tok)),
        domain_ce_sum=torch.tensor(ce, dtype=torch.float32),
        domain_kd_sum=torch.zeros(len(ce)),
        domain_tokens=torch.tensor(tok, dtype=torch.int64),
    )


def test_estimator_online_accumulates_and_resets() -> None:
    est = DiscrepancyEstimator([make_batches(1, 1)] * 3, teacher_ce=[1.0, 2.0, 0.5], progress=False)
    est.observe(_output([4.0, 0.0, 3.0], [2, 0, 3]))
    est.observe(_output([2.0, 0.0, 0.0], [1, 0, 0]))
    disc = est.estimate_online()
    assert disc.tokens.tolist() == [3, 0, 3]
    torch.testing.assert_close(disc.student_ce, torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64))
    assert disc.teacher_ce.tolist() == [1.0, 2.0, 0.5]
    assert float(disc.ratio[1]) == 1.0  # unobserved, no previous estimate -> teacher CE
    # after reset nothing is observed: every domain keeps its previous estimate.
    again = est.estimate_online()
    assert again.tokens.tolist() == [0, 0, 0]
    torch.testing.assert_close(again.student_ce, disc.student_ce)
    # teacher sums override the cached teacher CE where given.
    est.observe(_output([6.0, 3.0, 1.0], [3, 1, 1]), teacher_ce_sum=torch.tensor([3.0, 1.0, 2.0]))
    d3 = est.estimate_online(reset=False)
    torch.testing.assert_close(d3.teacher_ce, torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64))
    assert est.estimate_online().tokens.tolist() == [3, 1, 1]  # not reset by reset=False


def test_estimator_online_falls_back_to_validation_estimate() -> None:
    val = [make_batches(1, 2), make_batches(2, 2)]
    est = DiscrepancyEstimator(val, progress=False)
    est.compute_teacher(TinyLM(seed=1))
    prev = est.estimate(TinyLM(seed=2))
    est.observe(_output([5.0, 0.0], [2, 0]))
    disc = est.estimate_online()
    assert float(disc.student_ce[0]) == 2.5
    assert float(disc.student_ce[1]) == pytest.approx(float(prev.student_ce[1]))


def test_estimator_online_state_dict_roundtrip() -> None:
    est = DiscrepancyEstimator([make_batches(1, 1)] * 2, teacher_ce=[1.0, 1.0], progress=False)
    est.observe(_output([4.0, 1.0], [2, 1]))
    state = json.loads(json.dumps(est.state_dict()))
    other = DiscrepancyEstimator([make_batches(1, 1)] * 2, progress=False)
    other.load_state_dict(state)
    torch.testing.assert_close(other.estimate_online().student_ce, est.estimate_online().student_ce)
    bad = dict(state, domain_names=["x", "y"])
    with pytest.raises(
        ValueError,
        match=r"DiscrepancyEstimator.load_state_dict: state\['domain_names'\] must equal \['domain0', 'domain1'\]; got \['x', 'y'\]\.",
    ):
        other.load_state_dict(bad)


def test_estimator_observe_bad_shapes_raise() -> None:
    est = DiscrepancyEstimator([make_batches(1, 1)] * 2, teacher_ce=[1.0, 1.0], progress=False)
    with pytest.raises(
        ValueError,
        match=r"DiscrepancyEstimator.observe: output.domain_ce_sum must have shape \(2,\) \(pass num_domains=2 to the loss\); got \(3,\)\.",
    ):
        est.observe(_output([1.0, 1.0, 1.0], [1, 1, 1]))
    with pytest.raises(TypeError, match=r"DiscrepancyEstimator.observe: output must be a KDLossOutput; got float\."):
        est.observe(1.0)
    with pytest.raises(ValueError, match=r"DiscrepancyEstimator.observe: teacher_ce_sum must have shape \(2,\)"):
        est.observe(_output([1.0, 1.0], [1, 1]), teacher_ce_sum=torch.ones(1))


def test_estimator_online_without_teacher_raises() -> None:
    est = DiscrepancyEstimator([make_batches(1, 1)] * 2, domain_names=["p", "q"], progress=False)
    est.observe(_output([1.0, 1.0], [1, 1]), teacher_ce_sum=torch.tensor([1.0, 0.0]))
    est.observe(_output([1.0, 1.0], [0, 1]))
    est.observe(_output([1.0, 1.0], [1, 0]))
    with pytest.raises(
        RuntimeError, match=r"DiscrepancyEstimator.estimate_online: the teacher CE must be known for every domain"
    ):
        DiscrepancyEstimator([make_batches(1, 1)] * 2, domain_names=["p", "q"]).estimate_online()
    d = est.estimate_online()
    assert d.teacher_ce.tolist() == [1.0, 0.0]


def test_domain_discrepancy_to_dict_and_validation() -> None:
    d = DomainDiscrepancy([2.0, 1.0], [1.0, 1.0], [3, 4], ("a", "b"))
    out = json.loads(json.dumps(d.to_dict()))
    assert out["domain_names"] == ["a", "b"] and out["tokens"] == [3, 4]
    assert out["ratio"] == pytest.approx([math.e, 1.0])
    with pytest.raises(ValueError, match=r"DomainDiscrepancy: teacher_ce must have shape \(2,\); got \(3,\)\."):
        DomainDiscrepancy([2.0, 1.0], [1.0, 1.0, 1.0], [3, 4], ("a", "b"))


# ---------------------------------------------------------------------- torch.distributed (gloo)
_WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    sys.path.insert(0, sys.argv[4])
    from test_estimator import TinyLM, make_batches, _output
    from ddk.discrepancy import DiscrepancyEstimator

    rank, world, port, _, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    # uneven shards: 5 and 3 batches (odd) and a single batch (rank 1 gets none of it).
    val = {"a": make_batches(1, 5), "b": make_batches(2, 3), "c": make_batches(3, 1)}
    est = DiscrepancyEstimator(val, progress=False)
    teacher_ce = est.compute_teacher(TinyLM(seed=10))
    disc = est.estimate(TinyLM(seed=20))
    # online: each rank observes its own batches; rank 1 sees nothing of domain "c".
    est.observe(_output([1.0 + rank, 2.0, 3.0 * (1 - rank)], [1, 2, 3 * (1 - rank)]))
    online = est.estimate_online()
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"teacher_ce": teacher_ce.tolist(), "disc": disc.to_dict(), "online": online.to_dict()}, f)
    dist.barrier()
    dist.destroy_process_group()
    """
)


@pytest.mark.e2e
def test_estimator_distributed_gloo_matches_single_process(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    out = tmp_path / "out.json"
    run_workers(script, lambda r, port: [r, 2, port, Path(__file__).parent, out])
    got = json.loads(out.read_text())

    val = {"a": make_batches(1, 5), "b": make_batches(2, 3), "c": make_batches(3, 1)}
    est = DiscrepancyEstimator(val, progress=False)
    teacher_ce = est.compute_teacher(TinyLM(seed=10))
    disc = est.estimate(TinyLM(seed=20)).to_dict()
    assert got["teacher_ce"] == pytest.approx(teacher_ce.tolist(), rel=1e-10)
    assert got["disc"]["tokens"] == disc["tokens"]
    assert got["disc"]["student_ce"] == pytest.approx(disc["student_ce"], rel=1e-10)
    assert got["disc"]["ratio"] == pytest.approx(disc["ratio"], rel=1e-10)
    assert got["online"]["tokens"] == [2, 4, 3]
    assert got["online"]["student_ce"] == pytest.approx([3.0 / 2, 4.0 / 4, 3.0 / 3])
