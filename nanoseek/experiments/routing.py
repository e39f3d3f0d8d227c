"""Routing statistics of a trained model on held-out tokens: expert loads, global MaxVio,
and how much the choice of expert depends on the domain.

Loads are read from the routers' outputs through forward hooks, in eval mode, so nothing
the training loop counts (`Router.load`) or updates (the bias) is touched.

- Global MaxVio (Wang et al. 2024, arXiv 2408.15664 §4.1): (max_i load_i − mean load) /
  mean load over a whole held-out set rather than one batch, averaged over MoE layers.
- Domain specialization: the mutual information I(domain; expert) in bits between a
  routed slot's domain (domains weighted equally) and its expert, averaged over MoE layers.
  0 when every domain spreads its tokens over the experts alike; log2(domains) at most.
"""

from __future__ import annotations

import math

import torch

from ..model.moe import max_violation


@torch.no_grad()
def expert_counts(model, batches: list[dict]) -> dict[int, torch.Tensor]:
    """{MoE layer: routed slots per expert [E]} over `batches`."""
    device = next(model.parameters()).device
    counts: dict[int, torch.Tensor] = {}

    def counter(layer: int):
        def hook(router, args, output):
            idx_NK = output[1]
            counts[layer] = counts.get(layer, 0) + torch.bincount(idx_NK.flatten(), minlength=router.n_experts)
        return hook

    hooks = [router.register_forward_hook(counter(i)) for i, router in model.routers().items()]
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            for batch in batches:
                model(batch["input_ids"].to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {layer: c.cpu() for layer, c in sorted(counts.items())}


def global_maxvio(counts: dict[int, torch.Tensor]) -> float:
    return sum(float(max_violation(c)) for c in counts.values()) / len(counts)


def domain_shares(counts_by_domain: dict[str, dict[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """{MoE layer: [domains, E] share of each domain's routed slots that go to each expert}."""
    layers = next(iter(counts_by_domain.values())).keys()
    return {layer: torch.stack([c[layer].double() / c[layer].sum() for c in counts_by_domain.values()])
            for layer in layers}


def specialization_bits(shares_DE: torch.Tensor) -> float:
    """I(domain; expert) in bits of one layer's [domains, E] shares, domains equally likely."""
    marginal_E = shares_DE.mean(0)
    ratio = torch.where(shares_DE > 0, shares_DE / marginal_E, torch.ones_like(shares_DE))
    return float((shares_DE * ratio.log()).sum(1).mean()) / math.log(2)
