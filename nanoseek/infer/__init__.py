"""Inference: generation over the latent cache."""

from .generate import generate, sample_next

__all__ = ["generate", "sample_next"]
