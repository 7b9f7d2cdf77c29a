"""Per-domain student/teacher cross-entropy and their perplexity ratios."""

from ddk.discrepancy.estimator import DiscrepancyEstimator, DomainDiscrepancy, causal_lm_ce_sum

__all__ = ["DiscrepancyEstimator", "DomainDiscrepancy", "causal_lm_ce_sum"]
