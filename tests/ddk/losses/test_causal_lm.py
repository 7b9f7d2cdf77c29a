"""``causal_lm_kd_loss`` on tiny Llama / Qwen2 / GPT-2 models: both loss paths against a plain
float64 reference built from ``model(...).logits`` (padded teacher vocabulary, tied embeddings),
domain ids per sequence / per token, the fused path against ``kd_loss`` on full logits, continued
pretraining without a teacher, autocast, memory (no ``(B * (L - 1), V)`` buffer on the fused path)
and bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from kd_cases import max_err
from torch.profiler import ProfilerActivity, profile

from ddk.losses.causal_lm import causal_lm_kd_loss
from ddk.losses.kd import kd_loss

transformers = pytest.importorskip("transformers")
from hf_models import CASES, make_model  # noqa: E402

V = 97
SMALL_WS = 8 * 4 * 16 * 32  # several token chunks (and vocabulary tiles with recompute)


def _pair(family: str, dtype: torch.dtype = torch.float64, vocab: int = V, teacher_vocab: int | None = None):  # type: ignore[no-untyped-def]
    """Student (hidden 32, 1 layer) and teacher (hidden 48, 2 layers; Qwen2: 8 padding rows more),
    output embeddings scaled for a realistic logit spread."""
    tv = (vocab + 8 if family == "qwen2" else vocab) if teacher_vocab is None else teacher_vocab
    student = make_model(family, vocab, hidden=32, layers=1, seed=2).to(dtype)
    teacher = make_model(family, tv, hidden=48, layers=2, seed=1).to(dtype)
    with torch.no_grad():
        for m in (student, teacher):
            m.get_output_embeddings().weight.mul_(15.0)
    return student, teacher


def _batch(b: int = 3, seq: int = 10, vocab: int = V, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, vocab, (b, seq), generator=g)
    attention_mask = torch.ones(b, seq, dtype=torch.long)
    attention_mask[-1, seq - 3 :] = 0  # right padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[0, 4] = -100  # an ignored token inside a sequence
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _reference(student, teacher, batch, domain_ids, num_domains, *, gamma, temperature, amp=None):  # type: ignore[no-untyped-def]
    """Plain PyTorch: full logits, ``F.cross_entropy`` and an explicit forward KL(p_T || p_S) on the
    shifted tokens; per-token ``domain_ids`` ``(B, L)`` name the domain of the label token. With
    ``amp`` (a device type) the models run under bfloat16 autocast and the math on their logits
    in float32."""
    ids, mask = batch["input_ids"], batch["attention_mask"]

    def logits(model: torch.nn.Module) -> torch.Tensor:
        if amp is None:
            return model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        with torch.autocast(amp, dtype=torch.bfloat16):
            return model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()

    zs = logits(student)
    vocab = zs.shape[-1]
    labels = batch["labels"][:, 1:]
    dom = domain_ids[:, 1:]
    valid = labels != -100
    ce = F.cross_entropy(zs.reshape(-1, vocab), labels.reshape(-1), ignore_index=-100, reduction="none")
    if teacher is not None:
        with torch.no_grad():
            zt = logits(teacher)[..., :vocab]
        log_p = torch.log_softmax(zt / temperature, -1)
        log_q = torch.log_softmax(zs / temperature, -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1).reshape(-1) * valid.reshape(-1)
    else:
        kl = torch.zeros_like(ce)
    n = valid.sum()
    loss = (ce.sum() + gamma * kl.sum()) / n
    d = dom.reshape(-1)
    per = lambda x: torch.zeros(num_domains, dtype=x.dtype, device=x.device).index_add_(0, d, x.detach())  # noqa: E731
    return dict(
        loss=loss,
        ce_sum=ce.sum().detach(),
        kd_sum=kl.sum().detach(),
        num_tokens=n,
        domain_ce_sum=per(ce),
        domain_kd_sum=per(kl),
        domain_tokens=per(valid.reshape(-1).long()),
    )


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return max_err(a, b) <= tol * (1 + float(b.detach().double().abs().max()))


@pytest.mark.parametrize(("family", "loss"), CASES)
def test_causal_lm_kd_loss_matches_float64_reference(family: str, loss: str) -> None:
    student, teacher = _pair(family)
    batch = _batch()
    dom = torch.tensor([[0, 0, 0, 2, 2, 2, 0, 0, 0, 0], [2] * 10, [0, 2, 0, 2, 0, 2, 0, 2, 0, 2]])
    opts = dict(gamma=0.5, temperature=2.0)
    extra = dict(strategy="recompute", workspace_bytes=SMALL_WS) if loss == "fused" else {}
    out = causal_lm_kd_loss(student, teacher, batch, domain_ids=dom, num_domains=3, loss=loss, **opts, **extra)
    out.loss.backward()
    got = _grads(student)
    ref = _reference(student, teacher, batch, dom, 3, **opts)
    ref["loss"].backward()
    want = _grads(student)
    assert all(p.grad is None for p in teacher.parameters())
    assert out.loss.dtype == torch.float64
    for field in ("loss", "ce_sum", "kd_sum", "domain_ce_sum", "domain_kd_sum"):
        assert _close(getattr(out, field), ref[field], 1e-9), field
    assert int(out.num_tokens) == int(ref["num_tokens"]) == 3 * 9 - 1 - 3
    assert out.domain_tokens.tolist() == ref["domain_tokens"].tolist()
    assert out.domain_tokens[1] == 0  # an empty domain
    assert got.keys() == want.keys() and len(got) == len(list(student.parameters()))
    for name in want:
        assert _close(got[name], want[name], 1e-9), name
    if family == "gpt2":  # tied: one shared parameter, one gradient (lm_head + embedding lookups)
        assert student.get_output_embeddings().weight is student.get_input_embeddings().weight


@pytest.mark.parametrize("loss", ["fused", "logits"])
def test_causal_lm_kd_loss_domain_ids_per_sequence_and_per_token_agree(loss: str) -> None:
    student, teacher = _pair("llama")
    batch = _batch(seed=1)
    per_seq = torch.tensor([1, 0, 1])
    a = causal_lm_kd_loss(student, teacher, batch, domain_ids=per_seq, num_domains=2, loss=loss)
    c = causal_lm_kd_loss(student, teacher, batch, domain_ids=per_seq[:, None].expand(3, 10), num_domains=2, loss=loss)
    for field in ("loss", "domain_ce_sum", "domain_kd_sum", "domain_tokens"):
        torch.testing.assert_close(getattr(c, field), getattr(a, field), rtol=0, atol=0)
    assert a.domain_tokens.tolist() == [9, 14]


def test_causal_lm_kd_loss_fused_matches_kd_loss_on_full_logits() -> None:
    """The fused path (several vocabulary tiles, a larger teacher vocabulary, right padding) equals
    ``kd_loss`` on the models' full shifted logits, gradients inside the decoder included."""
    student, teacher = _pair("llama", vocab=101, teacher_vocab=105)
    g = torch.Generator().manual_seed(27)
    input_ids = torch.randint(0, 101, (3, 9), generator=g)
    attention_mask = torch.ones(3, 9, dtype=torch.long)
    attention_mask[2, 6:] = 0  # right padding
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    per_seq = torch.tensor([0, 2, 0])
    opts = dict(num_domains=3, gamma=0.5, temperature=2.0, divergence="forward_kl")
    out = causal_lm_kd_loss(
        student, teacher, batch, domain_ids=per_seq, strategy="recompute", workspace_bytes=SMALL_WS, **opts
    )
    out.loss.backward()
    params = (student.lm_head.weight, student.model.layers[0].mlp.up_proj.weight)
    fused_grads = [p.grad.clone() for p in params]
    student.zero_grad()

    zs = student(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].reshape(-1, 101)
    with torch.no_grad():
        zt = teacher(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].reshape(-1, 105)
    labels = input_ids.masked_fill(attention_mask == 0, -100)[:, 1:].reshape(-1)
    domain_ids = per_seq.repeat_interleave(8)
    ref = kd_loss(zs, zt, labels, domain_ids=domain_ids, backend="reference", **opts)
    ref.loss.backward()
    assert int(out.num_tokens) == 3 * 8 - 3
    assert _close(out.loss, ref.loss, 1e-9)
    assert _close(out.domain_kd_sum, ref.domain_kd_sum, 1e-9)
    assert out.domain_tokens.tolist() == ref.domain_tokens.tolist() == [13, 0, 8]
    for gf, p in zip(fused_grads, params):
        assert _close(gf, p.grad, 1e-9)


@pytest.mark.parametrize("loss", ["fused", "logits"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_causal_lm_kd_loss_without_teacher_is_cross_entropy(family: str, loss: str) -> None:
    student, _ = _pair(family)
    batch = _batch(seed=2)
    dom = torch.tensor([0, 1, 1])
    out = causal_lm_kd_loss(student, None, batch, domain_ids=dom, num_domains=2, loss=loss)
    out.loss.backward()
    got = _grads(student)
    ref = _reference(student, None, batch, dom[:, None].expand(3, 10), 2, gamma=0.0, temperature=1.0)
    ref["loss"].backward()
    want = _grads(student)
    assert float(out.kd_sum) == 0.0 and out.domain_kd_sum.tolist() == [0.0, 0.0]
    for field in ("loss", "ce_sum", "domain_ce_sum"):
        assert _close(getattr(out, field), ref[field], 1e-9), field
    for name in want:
        assert _close(got[name], want[name], 1e-9), name
    same = causal_lm_kd_loss(student, None, batch, domain_ids=dom, num_domains=2, loss=loss, gamma=0)
    torch.testing.assert_close(same.loss, out.loss, rtol=0, atol=0)


def _autocast_case(family: str, loss: str, device: str):  # type: ignore[no-untyped-def]
    """(ddk under bf16 autocast, the plain reference under bf16 autocast, the float32 reference):
    loss and student gradients of each."""
    student, teacher = _pair(family, torch.float32)
    student, teacher = student.to(device), teacher.to(device)
    batch = {k: v.to(device) for k, v in _batch(seed=3).items()}
    dom = torch.tensor([[0] * 10, [1] * 10, [0, 1] * 5], device=device)
    opts = dict(gamma=0.5, temperature=2.0)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = causal_lm_kd_loss(student, teacher, batch, domain_ids=dom, num_domains=2, loss=loss, **opts)
    out.loss.backward()
    fast = (out.loss.detach(), _grads(student))
    ref_amp = _reference(student, teacher, batch, dom, 2, **opts, amp=device)
    ref_amp["loss"].backward()
    naive = (ref_amp["loss"].detach(), _grads(student))
    ref32 = _reference(student, teacher, batch, dom, 2, **opts)
    ref32["loss"].backward()
    return fast, naive, (ref32["loss"].detach(), _grads(student))


def _assert_autocast_close(fast, naive, ref32) -> None:  # type: ignore[no-untyped-def]
    """Error-relative (CONVENTIONS.md 4): ddk under autocast is at most k times as far from the
    float32 result as the plain reference under the same autocast (k = 2 values, 3 gradients)."""
    (loss, grads), (loss_n, grads_n), (loss_32, grads_32) = fast, naive, ref32
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert max_err(loss, loss_32) <= 2 * max_err(loss_n, loss_32) + 5e-4 * float(loss_32.abs())
    assert grads.keys() == grads_32.keys()
    for name, g32 in grads_32.items():
        scale = float(g32.abs().max())
        assert grads[name].dtype == g32.dtype
        assert max_err(grads[name], g32) <= 3 * max_err(grads_n[name], g32) + 1e-3 * scale, name


@pytest.mark.parametrize("loss", ["fused", "logits"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_causal_lm_kd_loss_under_cpu_autocast_close_to_float32(family: str, loss: str) -> None:
    _assert_autocast_close(*_autocast_case(family, loss, "cpu"))


@pytest.mark.parametrize("strategy", ["token_chunks", "recompute", "gemm"])
@pytest.mark.parametrize("family", ["gemma2", "phi"])
def test_fused_softcaps_and_head_biases_match_the_float64_logits_oracle(family: str, strategy: str) -> None:
    """Gemma2 (``final_logit_softcapping``, set small so tanh bends: logits of std ~2 against caps
    of 2 and 3) and Phi (``lm_head`` biases, made non-zero on both models) on the fused loss
    against the float64 reference built from ``model(...).logits``: loss, per-domain sums and
    every student gradient."""
    student, teacher = _pair(family)
    with torch.no_grad():
        if family == "gemma2":
            student.config.final_logit_softcapping, teacher.config.final_logit_softcapping = 2.0, 3.0
        else:
            g = torch.Generator().manual_seed(5)
            for m in (student, teacher):
                bias = m.get_output_embeddings().bias
                bias.copy_(2 * torch.randn(bias.shape, generator=g, dtype=bias.dtype))
    batch = _batch()
    dom = torch.tensor([[0, 1, 0, 1, 0, 1, 0, 1, 0, 1], [1] * 10, [0] * 10])
    opts = dict(gamma=0.7, temperature=1.5)
    out = causal_lm_kd_loss(
        student, teacher, batch, domain_ids=dom, num_domains=2, strategy=strategy, workspace_bytes=SMALL_WS, **opts
    )
    out.loss.backward()
    got = _grads(student)
    ref = _reference(student, teacher, batch, dom, 2, **opts)
    ref["loss"].backward()
    want = _grads(student)
    for field in ("loss", "ce_sum", "kd_sum", "domain_ce_sum", "domain_kd_sum"):
        assert _close(getattr(out, field), ref[field], 1e-9), field
    assert got.keys() == want.keys()
    for name, g in want.items():
        assert _close(got[name], g, 1e-9), name
    # the caps and biases are in the oracle: without them the reference differs by far more
    if family == "gemma2":
        student.config.final_logit_softcapping = teacher.config.final_logit_softcapping = None
    else:
        with torch.no_grad():
            for m in (student, teacher):
                m.get_output_embeddings().bias.zero_()
    plain = _reference(student, teacher, batch, dom, 2, **opts)
    assert not _close(plain["loss"], ref["loss"], 1e-3)


def test_a_softcapped_student_against_a_cached_teacher_fused_equals_logits() -> None:
    """A Gemma2 student (cap 2) against a cached top-k teacher: the fused sparse loss, capped per
    chunk, gives the loss and gradients of the sparse loss on ``model(...).logits`` (float64)."""
    student, teacher = _pair("gemma2")
    student.config.final_logit_softcapping = 2.0
    batch = _batch()
    with torch.no_grad():
        top = torch.log_softmax(teacher(input_ids=batch["input_ids"]).logits, -1).topk(5, dim=-1)
    cached = dict(batch, teacher_topk_ids=top.indices, teacher_topk_logprobs=top.values)
    dom = torch.tensor([0, 1, 1])
    outs, grads = [], []
    for loss in ("fused", "logits"):
        out = causal_lm_kd_loss(student, None, cached, domain_ids=dom, num_domains=2, loss=loss, gamma=0.5)
        out.loss.backward()
        outs.append(out)
        grads.append(_grads(student))
    for field in ("loss", "ce_sum", "kd_sum", "domain_ce_sum", "domain_kd_sum"):
        assert _close(getattr(outs[0], field), getattr(outs[1], field), 1e-9), field
    for name, g in grads[1].items():
        assert _close(grads[0][name], g, 1e-9), name


def test_fused_refuses_a_logit_scale_naming_the_attribute_and_the_flag() -> None:
    """Cohere's ``config.logit_scale`` multiplies the logits outside ``softcap(lm_head(hidden))``:
    the fused loss names the attribute, ``loss='logits'`` and the CLI flag; ``loss='logits'`` runs."""
    cfg = transformers.CohereConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        logit_scale=0.25,
    )
    torch.manual_seed(0)
    student, teacher = transformers.CohereForCausalLM(cfg), transformers.CohereForCausalLM(cfg)
    with pytest.raises(ValueError, match=r"config\.logit_scale=0\.25.*ddk distill --loss logits"):
        causal_lm_kd_loss(student, teacher, _batch(), loss="fused")
    assert torch.isfinite(causal_lm_kd_loss(student, teacher, _batch(), loss="logits").loss)


@pytest.mark.gpu
@pytest.mark.parametrize(("family", "loss"), CASES)
def test_causal_lm_kd_loss_under_cuda_autocast_close_to_float32(family: str, loss: str) -> None:
    _assert_autocast_close(*_autocast_case(family, loss, "cuda"))


def test_causal_lm_kd_loss_fused_never_allocates_tokens_by_vocab() -> None:
    """Memory: the fused path allocates nothing of ``(B * (L - 1), V)`` size (the method of
    ``test_fused_linear_kd_loss_never_allocates_n_by_v``: the largest single op allocation seen by
    ``torch.profiler`` stays below a quarter of it). The same detector on ``loss="logits"``, which
    calls the ``lm_head``, sees at least one such buffer. V=1024 with hidden 16 and L=65 keep the
    models' own buffers (attention scores, ``(V, H)`` gradients) far below the bound."""
    b, seq, vocab = 8, 65, 1024
    student = make_model("llama", vocab, hidden=16, layers=1, seed=4)
    teacher = make_model("llama", vocab, hidden=16, layers=1, seed=5)
    input_ids = torch.randint(0, vocab, (b, seq), generator=torch.Generator().manual_seed(6))
    nv_bytes = b * (seq - 1) * vocab * 4

    def peak_op_bytes(**kw) -> int:  # type: ignore[no-untyped-def]
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = causal_lm_kd_loss(
                student, teacher, {"input_ids": input_ids}, domain_ids=torch.arange(b) % 2, num_domains=2, **kw
            )
            out.loss.backward()
        student.zero_grad(set_to_none=True)
        return max(e.cpu_memory_usage for e in prof.events())

    assert peak_op_bytes(loss="logits") >= nv_bytes  # the detector sees the lm_head's logits
    for strategy in ("recompute", "token_chunks"):
        peak = peak_op_bytes(strategy=strategy, workspace_bytes=512 << 10)
        assert peak < nv_bytes // 4, (strategy, peak)


def _bad_cases():  # type: ignore[no-untyped-def]
    student, teacher = _pair("llama", torch.float32)
    small_teacher = make_model("llama", V - 3, hidden=16, seed=7)
    batch = _batch(b=2, seq=6)
    C = "causal_lm_kd_loss: "
    bare = student.model  # LlamaModel: no lm_head, no .logits
    dom = torch.tensor([0, 1])
    return [
        (
            dict(student_model=bare),
            TypeError,
            C + "student_model must have an output embedding (lm_head, from "
            "get_output_embeddings()); got LlamaModel without one. Pass the ...ForCausalLM model, not its bare decoder.",
        ),
        (
            dict(teacher_model=torch.nn.Linear(3, 3)),
            TypeError,
            C + "teacher_model must have an output embedding "
            "(lm_head, from get_output_embeddings()); got Linear without one. Pass the ...ForCausalLM model, not its bare decoder.",
        ),
        (
            dict(student_model=bare, loss="logits"),
            TypeError,
            C + "student_model must return .logits of shape (B, L, V) "
            "with (B, L)=(2, 6); got LlamaModel returning BaseModelOutputWithPast.",
        ),
        (
            dict(batch={**batch, "labels": batch["labels"][:, 1:]}),
            ValueError,
            C + "batch['labels'] must have the shape "
            "of input_ids (2, 6) (unshifted: the shift happens inside); got (2, 5).",
        ),
        (
            dict(teacher_model=small_teacher),
            ValueError,
            C + "teacher_model must have a vocabulary of at least the "
            "student's V=97 (a larger teacher vocabulary is sliced); got 94. Teacher and student must share a tokenizer.",
        ),
        (
            dict(teacher_model=small_teacher, loss="logits"),
            ValueError,
            C + "teacher_model must have a vocabulary of at "
            "least the student's V=97 (a larger teacher vocabulary is sliced); got 94. Teacher and student must share a tokenizer.",
        ),
        (
            dict(batch={**batch, "domain_ids": dom}, num_domains=2),
            ValueError,
            C + "batch must not carry 'domain_ids'; pass domain_ids= (with num_domains=) as keywords, e.g. "
            "domain_ids=batch.pop('domain_ids'); got batch keys ['attention_mask', 'domain_ids', 'input_ids', 'labels'].",
        ),
        (
            dict(domain_ids=torch.tensor([0, 1, 1]), num_domains=2),
            ValueError,
            C + "domain_ids must be (N,), or (B,) / (B, L) with 3-D inputs; got (3,) with (B, L)=(2, 6).",
        ),
        (
            dict(domain_ids=torch.zeros(2, 5, dtype=torch.long), num_domains=2),
            ValueError,
            C + "domain_ids must be (N,), or (B,) / (B, L) with 3-D inputs; got (2, 5) with (B, L)=(2, 6).",
        ),
        (dict(domain_ids=torch.tensor([0, 2]), num_domains=2), ValueError, C + "domain_ids must be in [0, 2); got 2."),
        (
            dict(domain_ids=dom),
            ValueError,
            C + "num_domains must be given with domain_ids (the length of the per-domain sums); got None.",
        ),
        (
            dict(teacher_model=None),
            ValueError,
            C + "gamma must be 0 or not given when teacher_model is None (continued pretraining: CE only); got 0.2.",
        ),
        (
            dict(teacher_model=None, gamma=0.1),
            ValueError,
            C + "gamma must be 0 or not given when teacher_model is None (continued pretraining: CE only); got 0.1.",
        ),
        (dict(loss="naive"), ValueError, C + "loss must be one of ('fused', 'logits'); got 'naive'."),
        (
            dict(loss="logits", strategy="recompute"),
            TypeError,
            C + "options must be among ('gamma', 'temperature', "
            "'divergence', 'beta', 'ignore_index', 't2_scale', 'backend', 'check_inputs') with loss='logits'; got 'strategy'.",
        ),
        (
            dict(shift=True),
            TypeError,
            C + "options must be among ('gamma', 'temperature', 'divergence', 'beta', "
            "'ignore_index', 't2_scale', 'backend', 'strategy', 'workspace_bytes', 'check_inputs') with loss='fused'; got 'shift'.",
        ),
        (
            dict(batch={"labels": batch["labels"]}),
            ValueError,
            C + "batch must hold 'input_ids' (B, L); got keys ['labels'].",
        ),
        (
            dict(batch={"input_ids": batch["input_ids"].reshape(-1)}),
            ValueError,
            C + "batch['input_ids'] must be a (B, L) integer tensor; got (12,) torch.int64.",
        ),
        (dict(temperature=0.0), ValueError, C + "temperature must be a finite number > 0; got 0.0."),
    ], dict(student_model=student, teacher_model=teacher, batch=batch)


_CASES, _BASE = _bad_cases()


@pytest.mark.parametrize("change,exc,message", _CASES, ids=[m[19:70] for _, _, m in _CASES])
def test_causal_lm_kd_loss_bad_input_message(change, exc, message) -> None:  # type: ignore[no-untyped-def]
    kw = {**_BASE, **change}
    if kw["teacher_model"] is None and "gamma" not in change:
        kw["gamma"] = 0.2
    args = (kw.pop("student_model"), kw.pop("teacher_model"), kw.pop("batch"))
    with pytest.raises(exc) as info:
        causal_lm_kd_loss(*args, **kw)
    assert str(info.value) == message


def test_causal_lm_kd_loss_output_is_a_kd_loss_output() -> None:
    student, teacher = _pair("qwen2", torch.float32)
    out = causal_lm_kd_loss(student, teacher, _batch(seed=4))
    assert dataclasses.is_dataclass(out) and out.domain_tokens.shape == (1,)
    assert int(out.num_tokens) == 3 * 9 - 1 - 3


class _Wrapper(torch.nn.Module):
    """A data-parallel-like wrapper: the causal LM as ``.module``, called through its forward."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module
        self.calls: list[dict[str, object]] = []

    def forward(self, **kwargs: object) -> object:
        self.calls.append(kwargs)
        return self.module(**kwargs)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gemma2", "phi"])
def test_fused_through_a_wrapper_equals_the_bare_models_and_keeps_no_layer_outputs(family: str) -> None:
    """Wrapped models (DDP, accelerate, DeepSpeed hold the model as ``.module``; FSDP2 roots take
    the same path) run their own forward with no logits and no per-layer hidden states: the
    decoder's output is taken by a hook. Same loss and gradients as the bare models, bit for bit."""
    student, teacher = _pair(family)
    batch = _batch()
    dom = torch.tensor([0, 2, 1])
    bare = causal_lm_kd_loss(student, teacher, batch, domain_ids=dom, num_domains=3, gamma=0.5)
    bare.loss.backward()
    want = _grads(student)
    student.zero_grad(set_to_none=True)
    ws, wt = _Wrapper(student), _Wrapper(teacher)
    out = causal_lm_kd_loss(ws, wt, batch, domain_ids=dom, num_domains=3, gamma=0.5)
    out.loss.backward()
    got = _grads(student)
    for w in (ws, wt):
        assert len(w.calls) == 1 and w.calls[0]["output_hidden_states"] is False
        assert w.calls[0]["logits_to_keep"].numel() == 0  # type: ignore[union-attr]
    for field in ("loss", "ce_sum", "kd_sum", "domain_ce_sum", "domain_kd_sum"):
        assert torch.equal(getattr(out, field), getattr(bare, field)), field
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not student.get_decoder()._forward_hooks and not teacher.get_decoder()._forward_hooks  # removed
