"""Examples -> domain names, and stable per-domain train/validation splits."""

from ddk.partition.partitioner import DomainPartitioner, DomainSplits, stable_unit_hash

__all__ = ["DomainPartitioner", "DomainSplits", "stable_unit_hash"]
