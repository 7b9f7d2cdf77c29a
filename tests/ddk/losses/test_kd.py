"""Public ``kd_loss``: agreement with the oracle on every runnable backend, the batch convention
(``flatten_for_loss``: 3-D inputs, shift, per-sequence / per-token domain ids), and bad input."""

from __future__ import annotations

import pytest
import torch
from kd_cases import DIVERGENCE_CASES, realistic_logits, small_batch

import ddk
from ddk import KDLoss, kd_loss
from ddk.losses import flatten_for_loss
from ddk.losses.fused import fused_linear_kd_loss
from ddk.reliability import NonFiniteGuard
from ddk_kernels.dispatch import available_backends
from ddk_kernels.reference import kd_loss_reference

CPU_BACKENDS = [name for name, reason in available_backends("cpu").items() if not reason]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES)
def test_kd_loss_matches_oracle_with_domains(backend: str, divergence: str, beta: float) -> None:
    zs, zt, labels = realistic_logits(23, 57, seed=1, teacher_extra_cols=3)
    domain_ids = torch.randint(0, 4, (23,), generator=torch.Generator().manual_seed(2))
    domain_ids[domain_ids == 3] = 2  # domain 3 stays empty
    zs.requires_grad_(True)
    out = kd_loss(
        zs,
        zt,
        labels,
        domain_ids=domain_ids,
        num_domains=4,
        gamma=0.7,
        temperature=2.0,
        divergence=divergence,
        beta=beta,
        backend=backend,
    )
    zs64 = zs.detach().double().requires_grad_(True)
    ref = kd_loss_reference(
        zs64,
        zt.double(),
        labels,
        domain_ids=domain_ids,
        num_domains=4,
        gamma=0.7,
        temperature=2.0,
        divergence=divergence,
        beta=beta,
    )
    (3.0 * out.loss).backward()
    (3.0 * ref.loss).backward()
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.domain_ce_sum.double(), ref.domain_ce_sum, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.domain_kd_sum.double(), ref.domain_kd_sum, rtol=1e-4, atol=1e-4)
    assert out.domain_tokens.tolist() == ref.domain_tokens.tolist()
    assert out.domain_tokens[3] == 0 and float(out.domain_ce_sum[3]) == 0.0
    torch.testing.assert_close(zs.grad.double(), zs64.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kd_loss_normalizer_two_halves_equal_whole(backend: str) -> None:
    zs, zt, labels = realistic_logits(16, 33, seed=3)
    whole = kd_loss(zs, zt, labels, backend=backend)
    total = whole.num_tokens
    a = kd_loss(zs[:8], zt[:8], labels[:8], normalizer=total, backend=backend)
    b = kd_loss(zs[8:], zt[8:], labels[8:], normalizer=total, backend=backend)
    torch.testing.assert_close(a.loss + b.loss, whole.loss, rtol=1e-5, atol=1e-6)


def test_kd_loss_module_wrapper_matches_function() -> None:
    zs, zt, labels = realistic_logits(9, 13, seed=4)
    dom = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 1])
    mod = KDLoss(num_domains=2, gamma=0.4, divergence="jsd", beta=0.25)
    got = mod(zs, zt, labels, dom)
    want = kd_loss(zs, zt, labels, domain_ids=dom, num_domains=2, gamma=0.4, divergence="jsd", beta=0.25)
    torch.testing.assert_close(got.loss, want.loss)
    assert "jsd" in repr(mod)


def test_kd_loss_public_names_exported() -> None:
    assert ddk.KDLossOutput is type(kd_loss(*realistic_logits(2, 3)))
    for name in (
        "DomainPartitioner",
        "DiscrepancyEstimator",
        "FactorSmoother",
        "MixtureSampler",
        "DDKController",
        "kd_loss",
        "KDLossOutput",
    ):
        assert hasattr(ddk, name), name


def _inputs():  # type: ignore[no-untyped-def]
    return realistic_logits(4, 6, seed=5)


BAD_CASES = [
    (
        lambda zs, zt, y: kd_loss(zs[0], zt, y),
        ValueError,
        r"kd_loss: student_logits must be a 2-D \(N, V\) or 3-D \(B, L, V\) float tensor",
    ),
    (
        lambda zs, zt, y: kd_loss(zs.long(), zt, y),
        ValueError,
        r"student_logits must be a 2-D \(N, V\) or 3-D \(B, L, V\) float tensor; .* dtype torch.int64",
    ),
    (
        lambda zs, zt, y: kd_loss(zs.tolist(), zt, y),
        TypeError,
        r"kd_loss: student_logits must be a torch.Tensor; got list",
    ),
    (lambda zs, zt, y: kd_loss(zs, zt[:3], y), ValueError, r"teacher_logits must have N=4 rows"),
    (lambda zs, zt, y: kd_loss(zs, zt[:, :5], y), ValueError, r"at least the student's V=6 columns .* got 5"),
    (
        lambda zs, zt, y: kd_loss(zs, zt, y[:3]),
        ValueError,
        r"labels must be \(N,\), or \(B, L\) with 3-D inputs; got \(3,\) with N=4\.",
    ),
    (lambda zs, zt, y: kd_loss(zs, zt, y.float()), TypeError, r"labels must be int64 or int32; got torch.float32"),
    (
        lambda zs, zt, y: kd_loss(zs, zt, torch.tensor([0, 1, 6, 2])),
        ValueError,
        r"labels must be in \[0, 6\) or equal ignore_index=-100; got 6",
    ),
    (
        lambda zs, zt, y: kd_loss(zs, zt, y, domain_ids=torch.tensor([0, 1, 2, 0]), num_domains=2),
        ValueError,
        r"domain_ids must be in \[0, 2\); got 2",
    ),
    (
        lambda zs, zt, y: kd_loss(zs, zt, y, domain_ids=torch.tensor([0, 1, -1, 0]), num_domains=2),
        ValueError,
        r"domain_ids must be in \[0, 2\); got -1",
    ),
    (
        lambda zs, zt, y: kd_loss(zs, zt, y, domain_ids=torch.tensor([0, 1]), num_domains=2),
        ValueError,
        r"domain_ids must be \(N,\), or \(B,\) / \(B, L\) with 3-D inputs; got \(2,\) with N=4\.",
    ),
    (
        lambda zs, zt, y: kd_loss(zs, zt, y, domain_ids=torch.zeros(4), num_domains=2),
        TypeError,
        r"domain_ids must be int64 or int32",
    ),
    (
        lambda zs, zt, y: kd_loss(zs, zt, y, domain_ids=torch.zeros(4, dtype=torch.long)),
        ValueError,
        r"num_domains must be given with domain_ids",
    ),
    (lambda zs, zt, y: kd_loss(zs, zt, y, num_domains=3), ValueError, r"num_domains=3 needs domain_ids"),
    (
        lambda zs, zt, y: kd_loss(zs, zt, y, domain_ids=torch.zeros(4, dtype=torch.long), num_domains=0),
        ValueError,
        r"num_domains must be an int >= 1; got 0",
    ),
    (
        lambda zs, zt, y: kd_loss(zs, zt, y, divergence="kl"),
        ValueError,
        r"divergence must be one of \('forward_kl', 'reverse_kl', 'jsd'\); got 'kl'",
    ),
    (lambda zs, zt, y: kd_loss(zs, zt, y, gamma=-1.0), ValueError, r"gamma must be a finite number >= 0; got -1.0"),
    (
        lambda zs, zt, y: kd_loss(zs, zt, y, temperature=0.0),
        ValueError,
        r"temperature must be a finite number > 0; got 0.0",
    ),
    (lambda zs, zt, y: kd_loss(zs, zt, y, beta=1.5), ValueError, r"beta must be in \[0, 1\]; got 1.5"),
    (lambda zs, zt, y: kd_loss(zs, zt, y, normalizer=0), ValueError, r"normalizer must be > 0"),
    (lambda zs, zt, y: kd_loss(zs, zt, y, backend="cuda-magic"), ValueError, r"backend must be one of"),
]


@pytest.mark.parametrize("call,exc,match", BAD_CASES)
def test_kd_loss_rejects_bad_input(call, exc, match) -> None:  # type: ignore[no-untyped-def]
    zs, zt, y = _inputs()
    with pytest.raises(exc, match=match):
        call(zs, zt, y)


def test_kd_loss_unavailable_backend_names_available_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reasons = available_backends("cpu")
    unavailable = [n for n, r in reasons.items() if r]
    if not unavailable:
        pytest.skip("every backend runs here")
    zs, zt, y = _inputs()
    with pytest.raises(RuntimeError, match=rf"backend '{unavailable[0]}' cannot run on cpu: .* Available there: \["):
        kd_loss(zs, zt, y, backend=unavailable[0])


def test_kd_loss_ddk_backend_env_steers_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    from ddk_kernels.dispatch import resolve_backend

    monkeypatch.setenv("DDK_BACKEND", "reference")
    assert resolve_backend("auto", "cpu") == "reference"
    monkeypatch.setenv("DDK_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("auto", "cpu")


# -- batch convention: 3-D inputs, shift, domain ids per sequence / per token ---------------------


def _batch3d(b: int = 3, seq: int = 6, v: int = 19, seed: int = 7):  # type: ignore[no-untyped-def]
    zs, zt, labels = realistic_logits(b * seq, v, seed=seed, teacher_extra_cols=2)
    return zs.reshape(b, seq, v), zt.reshape(b, seq, v + 2), labels.reshape(b, seq)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("per_token", [False, True])
def test_kd_loss_3d_shift_matches_oracle_on_shifted_rows(backend: str, per_token: bool) -> None:
    zs, zt, labels = _batch3d()
    b, seq, v = zs.shape
    g = torch.Generator().manual_seed(8)
    dom = torch.randint(0, 3, (b, seq) if per_token else (b,), generator=g)
    zs = zs.requires_grad_(True)
    out = kd_loss(
        zs, zt, labels, domain_ids=dom, num_domains=4, gamma=0.6, temperature=1.5, shift=True, backend=backend
    )
    (2.0 * out.loss).backward()
    # the oracle on hand-shifted rows: logits of positions 0..L-2, labels (and domains) of 1..L-1
    zs64 = zs.detach().double().requires_grad_(True)
    rows_dom = dom[:, 1:] if per_token else dom[:, None].expand(b, seq - 1)
    ref = kd_loss_reference(
        zs64[:, :-1].reshape(-1, v),
        zt[:, :-1].reshape(-1, v + 2).double(),
        labels[:, 1:].reshape(-1),
        domain_ids=rows_dom.reshape(-1),
        num_domains=4,
        gamma=0.6,
        temperature=1.5,
    )
    (2.0 * ref.loss).backward()
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.domain_ce_sum.double(), ref.domain_ce_sum, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.domain_kd_sum.double(), ref.domain_kd_sum, rtol=1e-4, atol=1e-4)
    assert out.domain_tokens.tolist() == ref.domain_tokens.tolist()
    assert int(out.num_tokens) == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(zs.grad.double(), zs64.grad, rtol=1e-4, atol=1e-5)
    assert float(zs.grad[:, -1].abs().max()) == 0.0  # the last position predicts nothing


def test_kd_loss_3d_without_shift_equals_flattened_rows() -> None:
    zs, zt, labels = _batch3d(seed=9)
    b, seq, v = zs.shape
    dom = torch.tensor([1, 0, 2])
    got = kd_loss(zs, zt, labels, domain_ids=dom, num_domains=3)
    want = kd_loss(
        zs.reshape(-1, v),
        zt.reshape(b * seq, -1),
        labels.reshape(-1),
        domain_ids=dom.repeat_interleave(seq),
        num_domains=3,
    )
    for field in ("loss", "ce_sum", "kd_sum", "num_tokens", "domain_ce_sum", "domain_kd_sum", "domain_tokens"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=0, atol=0)


def test_kd_loss_module_wrapper_shift() -> None:
    zs, zt, labels = _batch3d(seed=10)
    dom = torch.tensor([0, 1, 1])
    got = KDLoss(num_domains=2, gamma=0.3)(zs, zt, labels, dom, shift=True)
    want = kd_loss(zs, zt, labels, domain_ids=dom, num_domains=2, gamma=0.3, shift=True)
    torch.testing.assert_close(got.loss, want.loss)


def test_flatten_for_loss_shift_per_token_domains_and_views() -> None:
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    labels = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.int32)
    dom = torch.tensor([[0, 1, 2], [3, 4, 5]])
    (rows, none), y, d = flatten_for_loss([x, None], labels, dom, shift=True, ignore_index=-1)
    assert rows.data_ptr() == x.data_ptr() and tuple(rows.shape) == (6, 4) and none is None  # a view
    assert y.dtype == torch.int32 and y.tolist() == [2, 3, -1, 5, 6, -1]
    assert d.tolist()[:2] + d.tolist()[3:5] == [1, 2, 4, 5]  # the domain of the label token
    (rows,), y, d = flatten_for_loss([x], labels, torch.tensor([7, 8]))
    assert y.tolist() == [1, 2, 3, 4, 5, 6] and d.tolist() == [7, 7, 7, 8, 8, 8]
    (rows,), y, d = flatten_for_loss([x[:, :1]], labels[:, :1], None, shift=True)  # L = 1: nothing to predict
    assert y.tolist() == [-100, -100] and d is None
    two_d = torch.zeros(4, 5)
    assert flatten_for_loss([two_d], labels.reshape(-1)[:4])[0][0] is two_d  # 2-D passes through


def _shape_cases():  # type: ignore[no-untyped-def]
    b, seq, v = 2, 5, 7
    zs, zt, y = torch.randn(b, seq, v), torch.randn(b, seq, v), torch.randint(0, v, (b, seq))
    zs2, zt2, y2 = zs.reshape(-1, v)[:4], zt.reshape(-1, v)[:4], y.reshape(-1)[:4]
    K = "kd_loss: "
    return [
        (
            lambda: kd_loss(zs, zt, y, domain_ids=torch.zeros(b * seq, dtype=torch.long), num_domains=2),
            ValueError,
            K + "domain_ids must be (N,), or (B,) / (B, L) with 3-D inputs; got (10,) with (B, L)=(2, 5).",
        ),
        (
            lambda: kd_loss(zs, zt, y, domain_ids=torch.zeros(b, seq + 1, dtype=torch.long), num_domains=2),
            ValueError,
            K + "domain_ids must be (N,), or (B,) / (B, L) with 3-D inputs; got (2, 6) with (B, L)=(2, 5).",
        ),
        (
            lambda: kd_loss(zs, zt, y, domain_ids=[0, 1], num_domains=2),
            ValueError,
            K + "domain_ids must be (N,), or (B,) / (B, L) with 3-D inputs; got list with (B, L)=(2, 5).",
        ),
        (
            lambda: kd_loss(zs2, zt2, y2, domain_ids=torch.zeros(2, 2, dtype=torch.long), num_domains=2),
            ValueError,
            K + "domain_ids must be (N,), or (B,) / (B, L) with 3-D inputs; got (2, 2) with N=4.",
        ),
        (
            lambda: kd_loss(zs, zt, y.reshape(-1)),
            ValueError,
            K + "labels must be (N,), or (B, L) with 3-D inputs; got (10,) with (B, L)=(2, 5).",
        ),
        (
            lambda: kd_loss(zs, zt, y[:, 1:], shift=True),
            ValueError,
            K + "labels must be (N,), or (B, L) with 3-D inputs; got (2, 4) with (B, L)=(2, 5).",
        ),
        (
            lambda: kd_loss(zs, zt.reshape(-1, v), y),
            ValueError,
            K
            + "teacher_logits must be a 3-D float tensor like student_logits; got shape (10, 7) and dtype torch.float32.",
        ),
        (
            lambda: kd_loss(zs, zt[:, 1:], y),
            ValueError,
            K + "teacher_logits must be 3-D (B, L, ...) like student_logits; got (2, 4, 7) with (B, L)=(2, 5).",
        ),
        (
            lambda: kd_loss(zs[None], zt[None], y),
            ValueError,
            K
            + "student_logits must be a 2-D (N, V) or 3-D (B, L, V) float tensor; got shape (1, 2, 5, 7) and dtype torch.float32.",
        ),
        (
            lambda: kd_loss(zs2, zt2, y2, shift=True),
            ValueError,
            K + "shift=True needs 3-D inputs (student_logits (B, L, ...) and labels (B, L)) to shift within each "
            "sequence; got student_logits of shape (4, 7). Pass (B, L, ...) inputs, or shift the labels yourself "
            "and keep shift=False.",
        ),
        (lambda: kd_loss(zs, zt, y.float()), TypeError, K + "labels must be int64 or int32; got torch.float32."),
        (
            lambda: kd_loss(zs, zt, y, domain_ids=torch.tensor([0, 2]), num_domains=2),
            ValueError,
            K + "domain_ids must be in [0, 2); got 2.",
        ),
    ]


_SHAPE_CASES = _shape_cases()


@pytest.mark.parametrize("call,exc,message", _SHAPE_CASES, ids=[m[9:60] for _, _, m in _SHAPE_CASES])
def test_kd_loss_batch_convention_bad_shape_message(call, exc, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(exc) as info:
        call()
    assert str(info.value) == message


def test_kd_loss_under_cpu_autocast_matches_float32() -> None:
    zs, zt, labels = _batch3d(seed=11)
    zs16 = zs.bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kd_loss(zs16, zt.bfloat16(), labels, shift=True)
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    zs32 = zs16.detach().float().requires_grad_(True)
    ref = kd_loss(zs32, zt.bfloat16().float(), labels, shift=True)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zs16.grad.float(), zs32.grad, rtol=2e-2, atol=1e-4)


# -- bad input: teacher padding, labels, empty batches, normalizer --------------------------------


def test_kd_loss_teacher_padding_rows_are_sliced() -> None:
    zs, zt, labels, dom = small_batch()
    padded = torch.cat([zt, torch.full((zt.shape[0], 5), 40.0)], dim=1)  # huge padding logits: must be ignored
    a = ddk.kd_loss(zs, zt, labels, domain_ids=dom, num_domains=3)
    b = ddk.kd_loss(zs, padded, labels, domain_ids=dom, num_domains=3)
    assert float(a.loss.detach()) == float(b.loss.detach())
    h, w = torch.randn(6, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    th, tw = torch.randn(6, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    f1 = fused_linear_kd_loss(h, w, labels, teacher_hidden=th, teacher_weight=tw)
    f2 = fused_linear_kd_loss(
        h, w, labels, teacher_hidden=th, teacher_weight=torch.cat([tw, 9 * torch.ones(3, 5, dtype=torch.float64)])
    )
    assert float(f1.loss) == float(f2.loss)


@pytest.mark.parametrize("which", ["kd_loss", "fused_linear_kd_loss"])
def test_labels_negative_and_not_ignore_index_is_an_error(which: str) -> None:
    zs, zt, labels, dom = small_batch()
    bad = labels.clone()
    bad[3] = -1
    h, w = torch.randn(6, 4), torch.randn(7, 4)

    def call(lab: torch.Tensor, **kw):  # type: ignore[no-untyped-def]
        if which == "kd_loss":
            return ddk.kd_loss(zs, zt, lab, **kw)
        return fused_linear_kd_loss(h, w, lab, teacher_logits=zt, **kw)

    with pytest.raises(
        ValueError,
        match=rf"^{which}: labels must be in \[0, 7\) or equal ignore_index=-100; got -1\. "
        r"Labels come from the student's tokenizer",
    ):
        call(bad)
    ok = labels.clone()
    ok[3] = 7  # the ignore_index may lie outside [0, V) ...
    assert (
        int(call(ok.int(), ignore_index=7, domain_ids=dom.int(), num_domains=3).num_tokens) == 5
    )  # ... and int32 works
    with pytest.raises(ValueError, match=rf"^{which}: labels must be in \[0, 7\) or equal ignore_index=7; got -100\."):
        call(torch.full((6,), -100), ignore_index=7)


@pytest.mark.parametrize("backend", ["reference", "chunked", "cpp"])
@pytest.mark.parametrize("n", [0, 4])
def test_kd_loss_empty_or_fully_ignored_batch_is_zero_loss_zero_grad(backend: str, n: int) -> None:
    zs = torch.randn(n, 7, requires_grad=True)
    labels = torch.full((n,), -100)
    out = ddk.kd_loss(
        zs, torch.randn(n, 9), labels, domain_ids=torch.zeros(n, dtype=torch.long), num_domains=2, backend=backend
    )
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0 and int(out.num_tokens) == 0 and out.domain_tokens.tolist() == [0, 0]
    assert zs.grad is not None and float(zs.grad.abs().sum()) == 0.0
    assert NonFiniteGuard().check(1, out)  # finite: a training loop goes on


def test_loss_normalizer_must_be_a_positive_finite_scalar():
    from ddk import kd_loss

    zs, zt, y = torch.randn(3, 7), torch.randn(3, 7), torch.tensor([1, 2, 3])
    for value, message in [
        (torch.tensor(0.0), r"must be > 0 .*; got 0\.0\."),
        (torch.tensor(-4.0), r"must be > 0 .*; got -4\.0\."),
        (torch.tensor([1.0, 2.0]), r"must be a scalar .*; got a tensor of shape \(2,\)\."),
        (float("inf"), r"must be finite .*; got inf\."),
        (torch.tensor(float("nan")), r"must be finite .*; got nan\."),
    ]:
        with pytest.raises(ValueError, match=r"kd_loss: normalizer " + message):
            kd_loss(zs, zt, y, normalizer=value)
