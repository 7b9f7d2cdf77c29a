"""Mixture sampling of DDK: domain weights -> batches of global indices."""

from ddk.sampling.mixture import MixtureSampler

__all__ = ["MixtureSampler"]
