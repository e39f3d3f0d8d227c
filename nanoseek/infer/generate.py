"""Batched generation over the static latent cache: prefill once, then one token per step.

Prompts of different lengths share one batch: each row's tokens sit at positions 0..len-1
and every new token goes to its own row's next position, so a row never reads another's
padding (see model/cache.py). This is the plain loop that evaluation uses; the serving
engine (engine.py: continuous batching, per-request sampling, stop strings, streaming)
builds on the same cache.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..model import StaticCache, Transformer
from .sampling import sample_next


def check_prompts(model: Transformer, prompts: list[list[int]], max_new_tokens: int):
    """Validate a batch of prompts; returns (batch size, lengths on the model's device, longest)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    lens = torch.tensor([len(p) for p in prompts], device=device)
    T = int(lens.max())
    limit = model.config.max_position_embeddings
    if T + max_new_tokens > limit:
        raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceed the "
                         f"model's context of {limit}")
    return len(prompts), lens, T


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None = None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             autocast: torch.dtype | None = None) -> list[list[int]]:
    """New tokens for each prompt (stopping after eos, which is kept)."""
    cfg = model.config
    device = next(model.parameters()).device
    B, lens, T = check_prompts(model, prompts, max_new_tokens)
    was_training = model.training
    model.eval()
    dtype = autocast or next(model.parameters()).dtype
    cache = StaticCache(cfg, B, T + max_new_tokens, dtype=dtype, device=device,
                        num_layers=cfg.num_hidden_layers)
    ids = torch.zeros(B, T, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p, device=device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    ctx = torch.autocast(device.type, dtype=autocast) if autocast else torch.autocast(device.type, enabled=False)
    out = [[] for _ in range(B)]
    done = [False] * B  # rows past their eos keep decoding; their tokens are dropped
    with ctx:
        logits = model(ids, positions=torch.arange(T, device=device).expand(B, T), cache=cache).logits
        last = logits[torch.arange(B, device=device), lens - 1]
        pos = lens.clone()
        for _ in range(max_new_tokens):
            nxt = sample_next(last, temperature, top_k, top_p, generator)
            for i, t in enumerate(nxt.tolist()):  # the step's one host read
                if not done[i]:
                    out[i].append(t)
                    done[i] = t == eos_id
            if all(done):
                break
            last = model(nxt[:, None], positions=pos[:, None], cache=cache).logits[:, -1]
            pos = pos + 1
    model.train(was_training)
    return out


@torch.no_grad()
def forced_decode(model: Transformer, seqs: torch.Tensor, start: int,
                  fused_launch: dict | None = None) -> Iterator[torch.Tensor]:
    """A cached greedy decode forced along seqs [B, T] (the same length every row): prefilled
    to `start`, then one token a step, so the decode-sized paths run (FP8 weights' kernels,
    the absorbed attention; with fused_launch, {} for the rule's, the fused Triton step).
    Yields the next-token logits [B, V] after each of positions start-1 .. T-2: what the
    model would choose where the sequence goes on as given."""
    B, T = seqs.shape
    cache = StaticCache(model.config, B, T, dtype=next(model.parameters()).dtype, device=seqs.device)
    pos = torch.arange(T, device=seqs.device).expand(B, T)
    logits = model(seqs[:, :start], positions=pos[:, :start], cache=cache, absorb=False).logits[:, -1]
    step = lambda ids, positions: model(ids, positions=positions, cache=cache).logits[:, -1]  # noqa: E731
    if fused_launch is not None:
        from .fused import FusedDecoder  # imports Triton
        fused = FusedDecoder(model, cache, B, fused_launch)
        step = lambda ids, positions: fused.forward(ids, positions).clone()  # noqa: E731 (its buffer's next step)
    for t in range(start, T):
        yield logits
        if t + 1 < T:
            logits = step(seqs[:, t:t + 1], pos[:, t:t + 1])
