"""Sampling: the parameters of a request and the choice of the next token.

Every request of an engine batch has its own temperature, top-k, top-p and seed, so the
filter works per row (tensors [B]) and the randomness comes from the request, not from
the batch: each request owns a generator (Python's `random.Random`, sequence.py) that gives
one uniform number per sampled token, and the token is the inverse CDF of that row's
filtered distribution at that number. A request therefore draws the same numbers alone or
in any batch, on any device, and the only host work per step is one float per sampled row
(the same tokens wherever its logits are the same: a batch of another size can run other
kernels, whose last bits differ in BF16).

`sample_next` is the one-generator, one-setting form that `generate()` uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """What to generate for one request (the names of vLLM's / OpenAI's parameters).

    temperature 0 is greedy. max_tokens None: up to the engine's context. A stop string
    ends the output before it (finish_reason "stop"); so does a token of stop_token_ids or
    EOS (unless ignore_eos), which is kept in the token ids but not in the text; reaching
    max_tokens gives finish_reason "length"."""
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_sorted(logits_BV: torch.Tensor, temperature_B: torch.Tensor, top_k_B: torch.Tensor,
                  top_p_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: logits / T sorted descending, outside the top-k and the top-p nucleus -inf.

    Returns (sorted logits [B, V], their token ids [B, V]). top_k 0 is off; top-p keeps the
    smallest prefix whose probability reaches top_p (always at least the first token)."""
    V = logits_BV.shape[-1]
    logits = logits_BV.float() / temperature_B[:, None]
    sorted_BV, order_BV = logits.sort(-1, descending=True)
    k_B = torch.where(top_k_B > 0, top_k_B.clamp(max=V), V)
    kth = sorted_BV.gather(-1, (k_B - 1)[:, None])
    sorted_BV = sorted_BV.masked_fill(sorted_BV < kth, float("-inf"))
    p = sorted_BV.softmax(-1)
    drop = p.cumsum(-1) - p > top_p_B[:, None]
    return sorted_BV.masked_fill(drop, float("-inf")), order_BV


def row_settings(params: list[SamplingParams], device) -> tuple[torch.Tensor, ...]:
    """Per-row tensors of a batch's settings: greedy [B] bool, temperature [B] (1.0 for
    greedy rows), top_k [B], top_p [B]."""
    return (torch.tensor([p.greedy for p in params], device=device),
            torch.tensor([p.temperature or 1.0 for p in params], device=device),
            torch.tensor([p.top_k for p in params], device=device),
            torch.tensor([p.top_p for p in params], device=device))


def sample_tensors(logits_BV: torch.Tensor, greedy_B: torch.Tensor, temperature_B: torch.Tensor,
                   top_k_B: torch.Tensor, top_p_B: torch.Tensor, uniform_B: torch.Tensor) -> torch.Tensor:
    """sample_rows on tensors only (no host sync, fixed shapes: a CUDA graph captures it):
    argmax where greedy_B, else the inverse CDF of the row's filtered distribution at uniform_B."""
    sorted_BV, order_BV = filter_sorted(logits_BV, temperature_B, top_k_B, top_p_B)
    cdf_BV = sorted_BV.softmax(-1).cumsum(-1)
    target_B1 = uniform_B.to(cdf_BV.dtype)[:, None] * cdf_BV[:, -1:]
    # the first index with cdf >= target has positive probability (index 0 for target 0)
    idx_B1 = torch.searchsorted(cdf_BV, target_B1).clamp(max=cdf_BV.shape[-1] - 1)
    sampled = order_BV.gather(-1, idx_B1).squeeze(-1)
    return torch.where(greedy_B, logits_BV.argmax(-1), sampled)


def sample_rows(logits_BV: torch.Tensor, params: list[SamplingParams],
                uniforms: list[float]) -> torch.Tensor:
    """One token per row: argmax for greedy rows, else the inverse CDF at uniforms[b]."""
    if all(p.greedy for p in params):
        return logits_BV.argmax(-1)
    dev = logits_BV.device
    return sample_tensors(logits_BV, *row_settings(params, dev), torch.tensor(uniforms, device=dev))


def sample_next(logits_BV: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy when temperature == 0, else softmax(logits / T) restricted to top-k / top-p."""
    if temperature <= 0:
        return logits_BV.argmax(-1)
    B, dev = logits_BV.shape[0], logits_BV.device
    sorted_BV, order_BV = filter_sorted(logits_BV, torch.full((B,), float(temperature), device=dev),
                                        torch.full((B,), top_k, device=dev),
                                        torch.full((B,), float(top_p), device=dev))
    idx = torch.multinomial(sorted_BV.softmax(-1), 1, generator=generator)
    return order_BV.gather(-1, idx).squeeze(-1)
