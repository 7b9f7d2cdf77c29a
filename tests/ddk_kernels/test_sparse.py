"""The sparse KD op against a cached top-k teacher (ddk_kernels/sparse.py): every backend of
``sparse_kd`` and ``fused_linear_sparse_kd`` against the float64 oracle, its edge cases, and the
relation to the full-vocabulary loss."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kd_cases import DIVERGENCE_CASES, runnable_backends

from ddk import fused_linear_sparse_kd_loss, kd_loss, sparse_kd_loss

SPARSE = runnable_backends("sparse_kd")
FUSED = runnable_backends("fused_linear_sparse_kd")
F64 = torch.float64


def _teacher(n: int, v: int, k: int, t: float, seed: int, dtype: torch.dtype = F64) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    zt = torch.randn(n, v, generator=g, dtype=F64) * 3
    top = torch.log_softmax(zt / t, -1).topk(k, dim=-1)
    tail = 1.0 - top.values.exp().sum(-1)
    return top.indices, top.values.to(dtype), tail, zt


def _labels(n: int, v: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 7)
    y = torch.randint(0, v, (n,), generator=g)
    y[::3] = -100
    return y


def _grads(out, *xs):  # type: ignore[no-untyped-def]
    out.loss.backward()
    return [x.grad.clone() for x in xs]


def test_the_sparse_ops_have_an_oracle_and_a_chunked_backend() -> None:
    assert {"reference", "chunked"} <= set(SPARSE) and {"reference", "chunked"} <= set(FUSED)


@pytest.mark.parametrize("backend", SPARSE)
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCE_CASES)
@pytest.mark.parametrize(("n", "v", "k", "t"), [(7, 13, 4, 1.0), (1, 5, 1, 2.0), (10, 17, 16, 0.7), (6, 9, 9, 1.0)])
def test_sparse_kd_matches_the_oracle(
    backend: str, divergence: str, beta: float, n: int, v: int, k: int, t: float
) -> None:
    ids, logp, tail, zt = _teacher(n, v, k, t, seed=n + v + k)
    labels = _labels(n, v, n)
    dom = torch.arange(n) % 3
    z = torch.randn(n, v, dtype=F64, requires_grad=True)
    zr = z.detach().clone().requires_grad_()
    kw = dict(domain_ids=dom, num_domains=3, gamma=0.7, temperature=t, divergence=divergence, beta=beta)
    fast = sparse_kd_loss(z, ids, logp, labels, teacher_tail=tail, backend=backend, **kw)
    if divergence == "reverse_kl" and k == v:  # empty student tail: the oracle's autograd is 0 * inf there;
        ref = kd_loss(zr, zt, labels, **kw)  # with every token cached the buckets are the full distributions
    else:
        ref = sparse_kd_loss(zr, ids, logp, labels, teacher_tail=tail, backend="reference", **kw)
    for name in ("loss", "ce_sum", "kd_sum", "domain_ce_sum", "domain_kd_sum"):
        torch.testing.assert_close(getattr(fast, name), getattr(ref, name), rtol=1e-10, atol=1e-12, msg=name)
    assert torch.equal(fast.domain_tokens, ref.domain_tokens)
    (g,), (gr,) = _grads(fast, z), _grads(ref, zr)
    torch.testing.assert_close(g, gr, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize(("divergence", "beta"), [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("workspace", [1, None])  # one token per chunk; one chunk
@pytest.mark.parametrize("softcap", [None, 2.5])  # a Gemma2-style student: logits cap * tanh(z / cap)
def test_fused_linear_sparse_kd_matches_the_oracle(
    backend: str, divergence: str, beta: float, workspace: int | None, softcap: float | None
) -> None:
    n, v, h, k = 11, 19, 6, 5
    ids, logp, tail, _ = _teacher(n, v, k, 1.5, seed=3)
    labels = _labels(n, v, 1)
    hs = torch.randn(n, h, dtype=F64, requires_grad=True)
    w = torch.randn(v, h, dtype=F64, requires_grad=True)
    b = torch.randn(v, dtype=F64, requires_grad=True)
    ref_in = [x.detach().clone().requires_grad_() for x in (hs, w, b)]
    kw = dict(gamma=0.5, temperature=1.5, divergence=divergence, beta=beta, t2_scale=True, normalizer=9.0)
    fast = fused_linear_sparse_kd_loss(
        hs,
        w,
        ids,
        logp,
        labels,
        student_bias=b,
        student_softcap=softcap,
        backend=backend,
        workspace_bytes=workspace,
        **kw,
    )
    z = ref_in[0] @ ref_in[1].T + ref_in[2]
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    ref = sparse_kd_loss(z, ids, logp, labels, backend="reference", **kw)  # teacher tail from the logprobs
    torch.testing.assert_close(fast.loss, ref.loss, rtol=1e-10, atol=1e-12)
    for g, gr in zip(_grads(fast, hs, w, b), _grads(ref, *ref_in)):
        torch.testing.assert_close(g, gr, rtol=1e-9, atol=1e-12)


def test_with_every_token_cached_forward_kl_is_the_full_kd_loss() -> None:
    n, v = 8, 12
    _, _, _, zt = _teacher(n, v, v, 1.0, seed=5)
    logp = torch.log_softmax(zt, -1)
    ids = torch.arange(v).repeat(n, 1)
    labels = _labels(n, v, 2)
    z = torch.randn(n, v, dtype=F64)
    sparse = sparse_kd_loss(z, ids, logp, labels, teacher_tail=torch.zeros(n, dtype=F64))
    full = kd_loss(z, zt, labels)
    torch.testing.assert_close(sparse.loss, full.loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sparse.kd_sum, full.kd_sum, rtol=1e-12, atol=1e-14)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), v=st.integers(2, 20), data=st.data())
def test_bucketed_forward_kl_never_exceeds_the_full_kl(n: int, v: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(1, v))
    seed = data.draw(st.integers(0, 10_000))
    ids, logp, tail, zt = _teacher(n, v, k, 1.0, seed=seed)
    z = torch.randn(n, v, dtype=F64, generator=torch.Generator().manual_seed(seed + 1)) * 2
    labels = torch.zeros(n, dtype=torch.long)
    sparse = sparse_kd_loss(z, ids, logp, labels, teacher_tail=tail)
    full = kd_loss(z, zt, labels)
    assert float(sparse.kd_sum) <= float(full.kd_sum) + 1e-9  # data-processing inequality
    assert float(sparse.kd_sum) >= -1e-12


def test_float32_and_fp16_cached_logprobs_stay_close_to_the_float64_oracle() -> None:
    n, v, k = 16, 50, 8
    ids, logp, tail, _ = _teacher(n, v, k, 1.0, seed=9)
    labels = _labels(n, v, 3)
    z = torch.randn(n, v, dtype=F64)
    ref = sparse_kd_loss(z, ids, logp, labels, teacher_tail=tail, backend="reference")
    z32 = z.float().requires_grad_()
    fast = sparse_kd_loss(z32, ids.int(), logp.half(), labels, teacher_tail=tail.float())
    assert fast.loss.dtype == torch.float32
    torch.testing.assert_close(fast.loss.double(), ref.loss, rtol=2e-3, atol=1e-4)  # fp16 log-probabilities


def test_no_grad_and_shifted_batches() -> None:
    b, seq, v, h, k = 2, 5, 11, 4, 3
    ids, logp, tail, _ = _teacher(b * seq, v, k, 1.0, seed=1)
    hs, w = torch.randn(b, seq, h), torch.randn(v, h)
    labels = torch.randint(0, v, (b, seq))
    out = fused_linear_sparse_kd_loss(
        hs, w, ids.view(b, seq, k), logp.view(b, seq, k).float(), labels, teacher_tail=tail.view(b, seq).float(),
        domain_ids=torch.tensor([0, 1]), num_domains=2, shift=True,
    )  # fmt: skip
    assert int(out.num_tokens) == b * (seq - 1) and out.domain_tokens.tolist() == [seq - 1, seq - 1]
    with torch.no_grad():
        again = fused_linear_sparse_kd_loss(
            hs, w, ids.view(b, seq, k), logp.view(b, seq, k).float(), labels, teacher_tail=tail.view(b, seq).float(),
            domain_ids=torch.tensor([0, 1]), num_domains=2, shift=True,
        )  # fmt: skip
    torch.testing.assert_close(again.loss, out.loss)


def test_bad_cached_teachers_are_errors_naming_the_problem() -> None:
    z = torch.randn(3, 6)
    y = torch.tensor([0, 1, 2])
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]])
    lp = torch.full((3, 2), -1.0)
    with pytest.raises(ValueError, match=r"teacher_topk_ids must be in \[0, 6\)"):
        sparse_kd_loss(z, ids + 1, lp, y)
    with pytest.raises(ValueError, match="teacher_topk_ids must be distinct within each row"):
        sparse_kd_loss(z, torch.tensor([[0, 0], [2, 3], [4, 5]]), lp, y)
    with pytest.raises(ValueError, match=r"teacher_topk_ids must have shape \(3,\) \+ \(k,\)"):
        sparse_kd_loss(z, ids[:2], lp, y)
    with pytest.raises(ValueError, match=r"teacher_topk_logprobs must be a float tensor of the shape"):
        sparse_kd_loss(z, ids, lp[:, :1], y)
    with pytest.raises(TypeError, match="teacher_topk_ids must be int32 or int64"):
        sparse_kd_loss(z, ids.float(), lp, y)
    with pytest.raises(ValueError, match=r"teacher_tail must have shape \(3,\)"):
        sparse_kd_loss(z, ids, lp, y, teacher_tail=torch.zeros(2))
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'reference', 'chunked'\)"):
        sparse_kd_loss(z, ids, lp, y, backend="cpp")
