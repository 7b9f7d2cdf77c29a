"""``ddk.reliability``: ``NonFiniteGuard`` (raise naming the step and the domains, or skip and
count) and ``grad_norm``. The rest of the bad-input matrix is in ``tests/test_bad_inputs.py``."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from kd_cases import small_batch

import ddk
from ddk.recipes.config import make_config
from ddk.reliability import NonFiniteError, NonFiniteGuard, grad_norm

NAMES = ["web", "code", "math"]


# ---------------------------------------------------------------------------- a. NaN / inf
# ddk.reliability.NonFiniteGuard: raise (default) naming step + domains, or skip and count.


def test_nonfinite_guard_raises_with_step_and_domain_of_offending_tokens() -> None:
    zs, zt, labels, dom = small_batch()
    zt = zt.clone()
    zt[1, 3] = float("nan")  # a token of domain 1 ('code')
    out = ddk.kd_loss(zs, zt, labels, domain_ids=dom, num_domains=3)
    out.loss.backward()
    guard = NonFiniteGuard(domain_names=NAMES)
    with pytest.raises(NonFiniteError) as info:
        guard.check(
            5, out, grad_norm=grad_norm([zs]), domain_ids=dom, tensors={"student_logits": zs, "teacher_logits": zt}
        )
    msg = str(info.value)
    assert msg.startswith("NonFiniteGuard.check: the loss and gradients must be finite; got loss=nan")
    assert "at step 5 in the tokens of domain(s) ['code'] (teacher_logits: 1 nan in 1 token(s))" in msg
    assert msg.endswith("Construct NonFiniteGuard('skip') to skip such batches instead.")
    assert isinstance(info.value, ValueError) and isinstance(info.value, FloatingPointError)
    assert info.value.report.domains == ("code",) and info.value.report.located_by == "tokens"


def test_nonfinite_guard_skip_counts_logs_and_resumes(caplog: pytest.LogCaptureFixture) -> None:
    guard = NonFiniteGuard("skip", domain_names=NAMES)
    assert guard.check(1, loss=torch.tensor(1.5), grad_norm=torch.tensor(0.3))
    with caplog.at_level(logging.WARNING, logger="ddk.reliability"):
        assert not guard.check(2, loss=torch.tensor(float("inf")), domain_ids=torch.tensor([2, 2]))
        assert not guard.check(4, loss=torch.tensor(1.0), grad_norm=torch.tensor(float("nan")))
    assert guard.skipped_batches == 2 and guard.skipped_steps == [2, 4]
    assert [r.getMessage().split(":")[1].strip() for r in caplog.records] == [
        "skipped the batch of step 2",
        "skipped the batch of step 4",
    ]
    assert "loss=inf at step 2 in a batch of domain(s) ['math']" in caplog.records[0].getMessage()
    resumed = NonFiniteGuard("skip")
    resumed.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert resumed.skipped_batches == 2 and resumed.skipped_steps == [2, 4]


def test_nonfinite_guard_nan_logit_of_ignored_token_is_caught_by_grad_norm() -> None:
    # The loss stays finite (the token is ignored) but the reference backward makes its gradient NaN.
    zs, zt, labels, dom = small_batch()
    with torch.no_grad():
        zs[4, 0] = float("nan")
    labels = labels.clone()
    labels[4] = -100
    out = ddk.kd_loss(zs, zt, labels, domain_ids=dom, num_domains=3, backend="reference")
    out.loss.backward()
    assert math.isfinite(float(out.loss.detach())) and not bool(torch.isfinite(zs.grad).all())
    guard = NonFiniteGuard(domain_names=NAMES)
    assert guard.check(1, out)  # the loss alone looks fine
    with pytest.raises(NonFiniteError, match=r"got grad_norm=nan at step 1 in the tokens of domain\(s\) \['code'\]"):
        guard.check(1, out, grad_norm=grad_norm([zs]), domain_ids=dom, tensors={"student_logits": zs})


@pytest.mark.parametrize("backend", ["cpp"])
def test_nonfinite_guard_neginf_teacher_logits_on_fast_backends(backend: str) -> None:
    # Policy: -inf logits are judged by their result. The reference and chunked backends handle a
    # -inf teacher logit (p_T = 0 there: the reference's value); the compiled backend returns
    # -inf/NaN, which the guard raises (or skips) with the advice to mask with a finite value.
    zs, zt, labels, dom = small_batch()
    zt = zt.clone()
    zt[0, 2] = float("-inf")
    ref = ddk.kd_loss(zs, zt, labels, domain_ids=dom, num_domains=3, backend="reference")
    assert math.isfinite(float(ref.loss.detach())) and NonFiniteGuard().check(1, ref)
    chunked = ddk.kd_loss(zs, zt, labels, domain_ids=dom, num_domains=3, backend="chunked")
    assert torch.isclose(chunked.loss.detach().double(), ref.loss.detach().double(), rtol=1e-5)
    out = ddk.kd_loss(zs, zt, labels, domain_ids=dom, num_domains=3, backend=backend)
    with pytest.raises(NonFiniteError) as info:
        NonFiniteGuard(domain_names=NAMES, fn="train").check(3, out, domain_ids=dom, tensors={"teacher_logits": zt})
    msg = str(info.value)
    assert "at step 3 in the tokens of domain(s) ['web'] (teacher_logits: 1 -inf in 1 token(s))" in msg
    assert "mask with a large finite negative value such as -1e4 instead" in msg


def test_nonfinite_guard_locates_domains_by_per_domain_sums_without_tensors() -> None:
    zs, zt, labels, dom = small_batch()
    with torch.no_grad():
        zs[2, 1] = float("inf")  # domain 2 ('math')
    out = ddk.kd_loss(zs, zt, labels, domain_ids=dom, num_domains=3)
    with pytest.raises(NonFiniteError, match=r"in the per-domain sums of domain\(s\) \['math'\]\."):
        NonFiniteGuard(domain_names=NAMES).check(9, out)


def test_nonfinite_guard_rejects_bad_arguments() -> None:
    with pytest.raises(
        ValueError, match=r"^NonFiniteGuard: policy must be one of \('raise', 'skip'\); got 'ignore'\.$"
    ):
        NonFiniteGuard("ignore")
    with pytest.raises(
        ValueError,
        match=r"^NonFiniteGuard.check: at least one of output, loss, grad_norm or values must be given; got none\.$",
    ):
        NonFiniteGuard().check(1)
    with pytest.raises(
        ValueError, match=r"^RecipeConfig: on_nonfinite must be one of \('raise', 'skip'\); got 'ignore'\.$"
    ):
        make_config(on_nonfinite="ignore")
