"""AdamW and the learning-rate schedules.

Schedules (lr multiplier of step s, 0-based, over S total steps, W warm-up steps):
- `cosine`: linear warm-up, then cosine decay to `min_lr_ratio`.
- `wsd` (warmup-stable-decay), the shape of DeepSeek-V3's pretraining schedule (§4.2: linear
  warm-up, a long constant phase, then decay): constant after warm-up until the last
  `decay_frac` of the run, then cosine down to `min_lr_ratio`.
- `constant`: warm-up, then flat.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SCHEDULES = ("cosine", "wsd", "constant")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; leave norms, biases and embeddings undecayed (the usual choice)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or "embed_tokens" in name or name.endswith("norm.weight"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW as in DeepSeek-V3 §4.2 (β = 0.9, 0.95; weight decay 0.1); fused on GPU."""
    on_gpu = next(model.parameters()).is_cuda
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                             fused=on_gpu)


def lr_multiplier(step: int, total: int, warmup: int, schedule: str = "cosine",
                  min_lr_ratio: float = 0.1, decay_frac: float = 0.2) -> float:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        start, span = warmup, max(total - warmup, 1)
    else:  # wsd
        start = max(warmup, int(total * (1 - decay_frac)))
        span = max(total - start, 1)
        if step < start:
            return 1.0
    progress = min(max(step - start, 0) / span, 1.0)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
