"""AdamW (with float32 or BF16 moments) and the learning-rate schedules.

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


MOMENTS = ("fp32", "bf16")


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                    moments: str = "fp32") -> torch.optim.Optimizer:
    """AdamW as in DeepSeek-V3 §4.2 (β = 0.9, 0.95; weight decay 0.1); fused on GPU. moments
    "bf16": its two moments stored in BF16 (V3 §3.3.3), `AdamWBF16Moments`."""
    if moments not in MOMENTS:
        raise ValueError(f"AdamW moments {moments!r}: choose one of {', '.join(MOMENTS)}")
    groups = param_groups(model, weight_decay)
    if moments == "bf16":
        return AdamWBF16Moments(groups, lr=lr, betas=betas, eps=eps)
    on_gpu = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=on_gpu)


class AdamWBF16Moments(torch.optim.Optimizer):
    """AdamW whose first and second moments are stored in BF16, half the bytes of float32
    (V3 §3.3.3: "without incurring observable performance degradation"). Parameters and
    gradients stay float32, and so does the arithmetic: each step reads the moments into
    float32, updates them, steps with the float32 values and stores them back rounded. BF16's
    rounding (2^-9 relative) does not swallow a moment's change (1 - β)·(g - m) while 1 - β
    is well above 2^-8, as V3's β = 0.9, 0.95 are. State keys are torch.optim.AdamW's."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        # load_state_dict casts state to each parameter's dtype (float32): back to BF16, exactly
        self.register_load_state_dict_post_hook(bf16_moments)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["step"] += 1
                step = float(state["step"])  # a CPU tensor, as torch's AdamW keeps it: no device sync
                g = p.grad.float()
                m = state["exp_avg"].float().lerp_(g, 1 - beta1)
                v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                p.mul_(1 - lr * wd)
                denom = (v / (1 - beta2 ** step)).sqrt_().add_(eps)
                p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** step))
        return loss


def bf16_moments(optimizer: torch.optim.Optimizer) -> None:
    for state in optimizer.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key] = state[key].to(torch.bfloat16)


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
