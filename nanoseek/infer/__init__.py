"""Inference: the engine (continuous batching over the latent cache) and plain batched generation."""

from .engine import Engine
from .generate import generate, sample_next
from .sampling import SamplingParams
from .sequence import RequestOutput, StreamEvent

__all__ = ["Engine", "RequestOutput", "SamplingParams", "StreamEvent", "generate", "sample_next"]
