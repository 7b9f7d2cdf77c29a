"""Public ``fused_linear_kd_loss``: oracle agreement through the public API, per-domain sums,
normalizer, memory (no ``(N, V)`` buffer), backend resolution, bad input, the batch convention
(3-D inputs, shift) and autocast. The transformers helper built on it, ``causal_lm_kd_loss``, is
tested in ``test_causal_lm.py``."""

from __future__ import annotations

import pytest
import torch
from fused_cases import make_case
from kd_cases import max_err
from torch.profiler import ProfilerActivity, profile

from ddk.losses.fused import FusedLinearKDLoss, fused_linear_kd_loss
from ddk_kernels import fused_chunked, fused_plan
from ddk_kernels.reference import kd_loss_reference

STRATEGIES = ["recompute", "token_chunks"]
SMALL_WS = 8 * 4 * 16 * 32  # forces several chunks and (recompute) several vocab tiles here


def _public(case, *, strategy="auto", workspace_bytes=SMALL_WS, **opts):  # type: ignore[no-untyped-def]
    h = case.h.detach().clone().requires_grad_()
    w = case.w.detach().clone().requires_grad_()
    b = None if case.b is None else case.b.detach().clone().requires_grad_()
    out = fused_linear_kd_loss(
        h,
        w,
        case.labels,
        student_bias=b,
        strategy=strategy,
        workspace_bytes=workspace_bytes,
        **case.teacher_kwargs(),
        **opts,
    )
    out.loss.backward()
    return out, (h.grad, w.grad, None if b is None else b.grad)


def _oracle(case, **opts):  # type: ignore[no-untyped-def]
    h = case.h.detach().double().requires_grad_()
    w = case.w.detach().double().requires_grad_()
    b = None if case.b is None else case.b.detach().double().requires_grad_()
    zs = h @ w.T + (b if b is not None else 0.0)
    zt = case.tl.double() if case.tl is not None else case.th.double() @ case.tw.double().T
    out = kd_loss_reference(zs, zt, case.labels, compute_dtype=torch.float64, **opts)
    out.loss.backward()
    return out, (h.grad, w.grad, None if b is None else b.grad)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> bool:
    return max_err(a, b) <= tol * (1 + float(b.double().abs().max()))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("teacher_as_logits", [False, True])
def test_fused_linear_kd_loss_matches_oracle_with_domains(strategy: str, teacher_as_logits: bool) -> None:
    case = make_case(29, 12, 20, 67, 70, seed=21, bias=True, teacher_as_logits=teacher_as_logits, num_domains=4)
    opts = dict(
        domain_ids=case.domain_ids, num_domains=4, gamma=0.4, temperature=2.0, t2_scale=True, divergence="jsd", beta=0.3
    )
    out, grads = _public(case, strategy=strategy, **opts)
    ref, ref_grads = _oracle(case, **opts)
    for field in ("loss", "ce_sum", "kd_sum", "domain_ce_sum", "domain_kd_sum"):
        assert _close(getattr(out, field), getattr(ref, field)), field
    assert out.num_tokens == ref.num_tokens
    assert out.domain_tokens.tolist() == ref.domain_tokens.tolist()
    assert out.domain_tokens[3] == 0 and out.domain_ce_sum[3] == 0  # the empty domain
    assert not out.domain_ce_sum.requires_grad and not out.ce_sum.requires_grad
    for g, r in zip(grads, ref_grads):
        assert _close(g, r)


def test_fused_linear_kd_loss_reference_backend_agrees() -> None:
    case = make_case(17, 8, 8, 31, seed=22, bias=True)
    out, grads = _public(case, backend="reference", divergence="reverse_kl")
    ref, ref_grads = _oracle(case, divergence="reverse_kl")
    assert _close(out.loss, ref.loss)
    for g, r in zip(grads, ref_grads):
        assert _close(g, r)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fused_linear_kd_loss_normalizer_two_halves_equal_full_batch(strategy: str) -> None:
    case = make_case(30, 10, 14, 53, seed=23, bias=True)
    full, full_grads = _public(case, strategy=strategy)
    h = case.h.clone().requires_grad_()
    w = case.w.clone().requires_grad_()
    b = case.b.clone().requires_grad_()
    total = full.num_tokens
    loss = 0.0
    for sl in (slice(0, 15), slice(15, 30)):
        out = fused_linear_kd_loss(
            h[sl],
            w,
            case.labels[sl],
            teacher_hidden=case.th[sl],
            teacher_weight=case.tw,
            student_bias=b,
            normalizer=total,
            strategy=strategy,
            workspace_bytes=SMALL_WS,
        )
        out.loss.backward()
        loss = loss + out.loss.detach()
    assert _close(loss, full.loss)
    for g, r in zip((h.grad, w.grad, b.grad), full_grads):
        assert _close(g, r)


def test_fused_linear_kd_loss_fully_masked_batch() -> None:
    case = make_case(6, 5, 5, 11, seed=24, masked_fraction=1.0)
    out, (dh, dw, _) = _public(case)
    assert float(out.loss) == 0.0 and int(out.num_tokens) == 0
    assert float(dh.abs().max()) == 0.0 and float(dw.abs().max()) == 0.0


def test_fused_linear_kd_loss_never_allocates_n_by_v() -> None:
    """Memory: no buffer of (N, V) size is allocated, for either strategy.

    Method: (1) ``torch.profiler`` with ``profile_memory=True`` attributes every CPU allocation to
    the op that made it; the largest single op allocation (``cpu_memory_usage``, net bytes of one
    op event) must stay below ``N * V * 4 / 4``. The same detector run on the materialising
    ``backend="reference"`` must see at least ``N * V * 4`` bytes, proving it can fail.
    (2) The tiling plan the chunked path runs (``ddk_kernels.fused_plan.plan_fused``, recorded by
    a spy) bounds every logits tile it builds (tests/ddk_kernels/test_fused_chunked.py checks the
    tiles against the plan): ``token_chunk * vocab_tile`` must be far below N * V.
    N=512 and V=1024 dwarf the (V, H) and (N, H) gradients (H=16), so only a logits-sized buffer
    can break the bound; the 512 KiB workspace forces 32 token chunks.
    """
    n, v, hid = 512, 1024, 16
    g = torch.Generator().manual_seed(25)
    h = torch.randn(n, hid, generator=g, requires_grad=True)
    w = torch.randn(v, hid, generator=g, requires_grad=True)
    th, tw = torch.randn(n, hid, generator=g), torch.randn(v + 3, hid, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    nv_bytes = n * v * 4

    def peak_op_bytes(**kw) -> tuple[int, list[tuple[int, int]]]:  # type: ignore[no-untyped-def]
        tiles: list[tuple[int, int]] = []
        real = fused_plan.plan_fused

        def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
            plan = real(*args, **kwargs)
            tiles.append((plan.token_chunk, plan.vocab_tile))
            return plan

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fused_chunked, "plan_fused", spy)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                out = fused_linear_kd_loss(
                    h, w, labels, teacher_hidden=th, teacher_weight=tw, workspace_bytes=512 << 10, **kw
                )
                out.loss.backward()
        return max(e.cpu_memory_usage for e in prof.events()), tiles

    naive_peak, _ = peak_op_bytes(backend="reference")
    assert naive_peak >= nv_bytes  # the detector sees a materialised (N, V) buffer
    for strategy in STRATEGIES:
        peak, tiles = peak_op_bytes(backend="chunked", strategy=strategy)
        assert peak < nv_bytes // 4, (strategy, peak)
        assert tiles and max(a * b for a, b in tiles) <= n * v // 8, (strategy, max(tiles))


def test_fused_linear_kd_loss_module_wrapper() -> None:
    case = make_case(12, 6, 6, 23, seed=26, num_domains=2)
    mod = FusedLinearKDLoss(num_domains=2, gamma=0.5, divergence="reverse_kl", strategy="recompute")
    assert "reverse_kl" in repr(mod)
    out = mod(case.h, case.w, case.labels, teacher_hidden=case.th, teacher_weight=case.tw, domain_ids=case.domain_ids)
    ref = fused_linear_kd_loss(
        case.h,
        case.w,
        case.labels,
        teacher_hidden=case.th,
        teacher_weight=case.tw,
        domain_ids=case.domain_ids,
        num_domains=2,
        gamma=0.5,
        divergence="reverse_kl",
    )
    assert _close(out.loss, ref.loss) and out.domain_tokens.tolist() == ref.domain_tokens.tolist()


def _bad_inputs():  # type: ignore[no-untyped-def]
    n, v, hs, ht = 4, 7, 3, 5
    h, w = torch.randn(n, hs), torch.randn(v, hs)
    th, tw, tl = torch.randn(n, ht), torch.randn(v + 2, ht), torch.randn(n, v + 1)
    labels = torch.tensor([0, 1, -100, 6])
    base = dict(student_hidden=h, student_weight=w, labels=labels, teacher_hidden=th, teacher_weight=tw)
    F = "fused_linear_kd_loss: "
    return [
        (dict(student_hidden=[1.0]), TypeError, F + "student_hidden must be a torch.Tensor; got list."),
        (
            dict(student_hidden=torch.randn(n)),
            ValueError,
            F
            + "student_hidden must be a 2-D (N, Hs) or 3-D (B, L, Hs) float tensor; got shape (4,) and dtype torch.float32.",
        ),
        (
            dict(teacher_hidden=torch.randn(1, n, ht)),
            ValueError,
            F + "teacher_hidden must be a 2-D float tensor; got shape (1, 4, 5) and dtype torch.float32.",
        ),
        (
            dict(shift=True),
            ValueError,
            F
            + "shift=True needs 3-D inputs (student_hidden (B, L, ...) and labels (B, L)) to shift within each sequence; got student_hidden of shape (4, 3). Pass (B, L, ...) inputs, or shift the labels yourself and keep shift=False.",
        ),
        (
            dict(domain_ids=torch.zeros(2, 2, dtype=torch.long), num_domains=2),
            ValueError,
            F + "domain_ids must be (N,), or (B,) / (B, L) with 3-D inputs; got (2, 2) with N=4.",
        ),
        (
            dict(labels=labels[None]),
            ValueError,
            F + "labels must be (N,), or (B, L) with 3-D inputs; got (1, 4) with N=4.",
        ),
        (
            dict(student_weight=torch.randn(v, hs + 1)),
            ValueError,
            F + "student_weight must have shape (V, Hs) with Hs=3 like student_hidden; got (7, 4).",
        ),
        (
            dict(student_weight=w.double()),
            TypeError,
            F + "student_weight must have the dtype of student_hidden (torch.float32); got torch.float64.",
        ),
        (
            dict(student_bias=torch.randn(v + 1)),
            ValueError,
            F + "student_bias must be a 1-D tensor of length V=7 or None; got (8,).",
        ),
        (
            dict(teacher_logits=tl),
            ValueError,
            F
            + "teacher must be given exactly one way, teacher_hidden + teacher_weight or teacher_logits; got teacher_hidden=set, teacher_weight=set, teacher_logits=set.",
        ),
        (
            dict(teacher_hidden=None, teacher_weight=None),
            ValueError,
            F
            + "teacher must be given exactly one way, teacher_hidden + teacher_weight or teacher_logits; got teacher_hidden=None, teacher_weight=None, teacher_logits=None.",
        ),
        (
            dict(teacher_weight=None),
            ValueError,
            F + "teacher_weight must be given together with the other teacher tensor; got None.",
        ),
        (
            dict(teacher_hidden=torch.randn(n + 1, ht)),
            ValueError,
            F + "teacher_hidden must have N=4 rows like student_hidden; got (5, 5).",
        ),
        (
            dict(teacher_weight=torch.randn(v, ht + 1)),
            ValueError,
            F + "teacher_weight must have shape (Vt, Ht) with Ht=5 like teacher_hidden; got (7, 6).",
        ),
        (
            dict(teacher_weight=torch.randn(v - 1, ht)),
            ValueError,
            F
            + "teacher_weight must have at least the student's V=7 rows (a larger teacher vocabulary is sliced); got 6. Teacher and student must share a tokenizer.",
        ),
        (
            dict(teacher_hidden=None, teacher_weight=None, teacher_logits=torch.randn(n, v - 1)),
            ValueError,
            F
            + "teacher_logits must have at least the student's V=7 columns (a larger teacher vocabulary is sliced); got 6. Teacher and student must share a tokenizer.",
        ),
        (
            dict(teacher_hidden=None, teacher_weight=None, teacher_logits=torch.randn(n + 1, v)),
            ValueError,
            F + "teacher_logits must have N=4 rows like student_hidden; got (5, 7).",
        ),
        (
            dict(labels=torch.tensor([0, 1, 7, 2])),
            ValueError,
            F + "labels must be in [0, 7) or equal ignore_index=-100; got 7. "
            "Labels come from the student's tokenizer: check that teacher, student and data share it.",
        ),
        (dict(labels=labels.float()), TypeError, F + "labels must be int64 or int32; got torch.float32."),
        (
            dict(domain_ids=torch.tensor([0, 1, 2, 3]), num_domains=3),
            ValueError,
            F + "domain_ids must be in [0, 3); got 3.",
        ),
        (
            dict(divergence="kl"),
            ValueError,
            F + "divergence must be one of ('forward_kl', 'reverse_kl', 'jsd'); got 'kl'.",
        ),
        (dict(temperature=0.0), ValueError, F + "temperature must be a finite number > 0; got 0.0."),
        (
            dict(normalizer=0),
            ValueError,
            F + "normalizer must be > 0 (e.g. the token count of the whole accumulated batch); got 0.",
        ),
        (
            dict(strategy="fast"),
            ValueError,
            F + "strategy must be one of ('auto', 'recompute', 'token_chunks', 'gemm'); got 'fast'.",
        ),
        (dict(workspace_bytes=0), ValueError, F + "workspace_bytes must be a positive int or None; got 0."),
        (
            dict(student_softcap=0.0),
            ValueError,
            F + "student_softcap must be a finite number > 0 (logits c * tanh(z / c)) or None; got 0.0.",
        ),
        (
            dict(teacher_softcap=float("inf")),
            ValueError,
            F + "teacher_softcap must be a finite number > 0 (logits c * tanh(z / c)) or None; got inf.",
        ),
        (
            dict(teacher_bias=torch.zeros(v)),
            ValueError,
            F + "teacher_bias must be a 1-D tensor of length Vt=9 like the rows of teacher_weight, or None; got (7,).",
        ),
        (
            dict(teacher_hidden=None, teacher_weight=None, teacher_logits=torch.randn(n, v), teacher_softcap=30.0),
            ValueError,
            F + "teacher_softcap applies to teacher_hidden + teacher_weight (given teacher_logits are final); "
            "got teacher_softcap=30.0 with teacher_logits.",
        ),
        (dict(backend="cuda"), ValueError, F + "backend must be one of ('auto', 'reference', 'chunked'); got 'cuda'."),
        (
            dict(backend="triton"),
            ValueError,
            F + "backend must be one of ('auto', 'reference', 'chunked'); got 'triton' (a backend of kd_loss only).",
        ),
    ], base


_CASES, _BASE = _bad_inputs()


@pytest.mark.parametrize("change,exc,message", _CASES, ids=[m.split(": ")[1][:40] for _, _, m in _CASES])
def test_fused_linear_kd_loss_bad_input_message(change, exc, message) -> None:  # type: ignore[no-untyped-def]
    kw = {**_BASE, **change}
    args = (kw.pop("student_hidden"), kw.pop("student_weight"), kw.pop("labels"))
    with pytest.raises(exc) as info:
        fused_linear_kd_loss(*args, **kw)
    assert str(info.value) == message


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_fused_linear_kd_loss_never_differentiates_teacher(backend: str) -> None:
    case = make_case(8, 6, 7, 19, 21, seed=28)
    th = case.th.clone().requires_grad_()
    tw = case.tw.clone().requires_grad_()
    h = case.h.clone().requires_grad_()
    out = fused_linear_kd_loss(h, case.w, case.labels, teacher_hidden=th, teacher_weight=tw, backend=backend)
    out.loss.backward()
    assert th.grad is None and tw.grad is None and h.grad is not None


# -- batch convention: 3-D inputs, shift, domain ids per sequence / per token ---------------------


@pytest.mark.parametrize("teacher_as_logits", [False, True])
@pytest.mark.parametrize("per_token", [False, True])
def test_fused_linear_kd_loss_3d_shift_matches_oracle_on_shifted_rows(teacher_as_logits: bool, per_token: bool) -> None:
    b, seq = 3, 7
    case = make_case(b * seq, 10, 12, 41, 44, seed=31, bias=True, teacher_as_logits=teacher_as_logits)
    g = torch.Generator().manual_seed(32)
    dom = torch.randint(0, 3, (b, seq) if per_token else (b,), generator=g)
    h = case.h.detach().clone().reshape(b, seq, -1).requires_grad_()
    w = case.w.detach().clone().requires_grad_()
    bias = case.b.detach().clone().requires_grad_()
    teacher = {k: (v.reshape(b, seq, -1) if k != "teacher_weight" else v) for k, v in case.teacher_kwargs().items()}
    opts = dict(num_domains=3, gamma=0.4, temperature=2.0, divergence="reverse_kl")
    out = fused_linear_kd_loss(
        h,
        w,
        case.labels.reshape(b, seq),
        student_bias=bias,
        domain_ids=dom,
        shift=True,
        workspace_bytes=SMALL_WS,
        **teacher,
        **opts,
    )
    out.loss.backward()
    # the oracle on hand-shifted rows: positions 0..L-2 with the labels (and domains) of 1..L-1
    keep = torch.arange(b * seq).reshape(b, seq)[:, :-1].reshape(-1)
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (case.h, case.w, case.b))
    zt = case.tl.double() if case.tl is not None else case.th.double() @ case.tw.double().T
    rows_dom = (dom[:, 1:] if per_token else dom[:, None].expand(b, seq - 1)).reshape(-1)
    ref = kd_loss_reference(
        (h64 @ w64.T + b64)[keep],
        zt[keep],
        case.labels.reshape(b, seq)[:, 1:].reshape(-1),
        domain_ids=rows_dom,
        compute_dtype=torch.float64,
        **opts,
    )
    ref.loss.backward()
    for field in ("loss", "ce_sum", "kd_sum", "domain_ce_sum", "domain_kd_sum"):
        assert _close(getattr(out, field), getattr(ref, field)), field
    assert out.domain_tokens.tolist() == ref.domain_tokens.tolist()
    for got, want in ((h.grad.reshape(b * seq, -1), h64.grad), (w.grad, w64.grad), (bias.grad, b64.grad)):
        assert _close(got, want)


def test_fused_linear_kd_loss_3d_bad_shape_messages() -> None:
    b, seq, v = 2, 5, 7
    h, w, y = torch.randn(b, seq, 3), torch.randn(v, 3), torch.randint(0, v, (b, seq))
    th, tw = torch.randn(b, seq, 4), torch.randn(v, 4)
    F = "fused_linear_kd_loss: "
    cases = [
        (
            dict(teacher_hidden=th[:, 1:]),
            F + "teacher_hidden must be 3-D (B, L, ...) like student_hidden; got (2, 4, 4) with (B, L)=(2, 5).",
        ),
        (
            dict(teacher_hidden=th.reshape(b * seq, 4)),
            F + "teacher_hidden must be 3-D (B, L, ...) like student_hidden; got (10, 4) with (B, L)=(2, 5).",
        ),
        (
            dict(labels=y.reshape(-1)),
            F + "labels must be (N,), or (B, L) with 3-D inputs; got (10,) with (B, L)=(2, 5).",
        ),
        (
            dict(domain_ids=torch.zeros(b * seq, dtype=torch.long), num_domains=2),
            F + "domain_ids must be (N,), or (B,) / (B, L) with 3-D inputs; got (10,) with (B, L)=(2, 5).",
        ),
        (
            dict(domain_ids=torch.zeros(b + 1, dtype=torch.long), num_domains=2),
            F + "domain_ids must be (N,), or (B,) / (B, L) with 3-D inputs; got (3,) with (B, L)=(2, 5).",
        ),
    ]
    for change, message in cases:
        kw = {**dict(labels=y, teacher_hidden=th, teacher_weight=tw, shift=True), **change}
        with pytest.raises(ValueError) as info:
            fused_linear_kd_loss(h, w, kw.pop("labels"), **kw)
        assert str(info.value) == message


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fused_linear_kd_loss_under_cpu_autocast_runs_in_bf16(strategy: str) -> None:
    """Under autocast, float32 hidden states and weights are used in bfloat16 (as ``F.linear`` would):
    the result equals the loss of the bfloat16-rounded inputs, not that of the float32 ones."""
    b, seq = 2, 9
    case = make_case(b * seq, 8, 8, 37, seed=33, bias=True).to(torch.float32)
    h = case.h.reshape(b, seq, -1).clone().requires_grad_()
    w = case.w.clone().requires_grad_()
    th = case.th.reshape(b, seq, -1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_linear_kd_loss(
            h,
            w,
            case.labels.reshape(b, seq),
            teacher_hidden=th,
            teacher_weight=case.tw,
            student_bias=case.b,
            shift=True,
            strategy=strategy,
            workspace_bytes=SMALL_WS,
        )
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    r = lambda t: t.detach().bfloat16().double()  # noqa: E731
    h64, w64 = r(h).requires_grad_(), r(w).requires_grad_()
    want = fused_linear_kd_loss(
        h64,
        w64,
        case.labels.reshape(b, seq),
        teacher_hidden=r(th),
        teacher_weight=r(case.tw),
        student_bias=r(case.b),
        shift=True,
    )
    want.loss.backward()
    assert _close(out.loss, want.loss, 1e-5)
    assert _close(h.grad, h64.grad, 1e-2) and _close(w.grad, w64.grad, 1e-2)  # gradients rounded to bf16


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_fused_loss_zero_tokens_is_zero_loss_zero_grad(backend: str) -> None:
    h, w = torch.randn(0, 4, requires_grad=True), torch.randn(7, 4, requires_grad=True)
    out = fused_linear_kd_loss(
        h, w, torch.zeros(0, dtype=torch.long), teacher_logits=torch.randn(0, 7), backend=backend
    )
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0 and int(out.num_tokens) == 0
    assert w.grad is None or float(w.grad.abs().sum()) == 0.0
