"""Claim 6: without an auxiliary loss, expert loads become domain-specialized.

DeepSeek-V3 §4.5.3, Figure 9: on Pile domains, the auxiliary-loss-free model's experts
show greater specialization patterns than those of a model balanced by an auxiliary loss,
whose loss pushes every sequence (so every domain) towards the same uniform load.

Arms: V3's MoE balanced by the bias update and by a sequence-wise auxiliary loss of
α = 0.001 (claim 2's arms of those names). Each trained model routes the held-out
documents of every domain (scale.DOMAINS); the heatmaps show each domain's relative load
per expert (its share of the domain's routed slots × E: 1 is an even share), layer by layer,
for the first seed. The figure compared is I(domain; expert) in bits (routing.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .balancing import balanced
from .routing import domain_shares, expert_counts, specialization_bits
from .runner import Arm, Compare, Experiment

ARMS = {"loss-free": "bias update γ=0.001", "aux-seq-0.001": "seq-wise aux loss α=0.001"}


def arms(scale) -> list[Arm]:
    return [Arm(name, balanced(scale, name), note) for name, note in ARMS.items()]


def measure(model, data, scale) -> dict:
    shares = domain_shares({name: expert_counts(model, batches) for name, batches in data.domains.items()})
    bits = [specialization_bits(s) for s in shares.values()]
    return {"specialization": sum(bits) / len(bits),
            "domain_shares": {str(layer): s.tolist() for layer, s in shares.items()}}


def heatmaps(result: dict, out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = result["scale"]["seeds"][0]
    runs = [r for r in result["runs"] if r["seed"] == seed]
    layers = list(runs[0]["domain_shares"])
    domains = list(result["domains"])
    fig, axes = plt.subplots(len(runs), len(layers), figsize=(1.6 + 3.4 * len(layers), 0.6 + 2.2 * len(runs)),
                             squeeze=False, constrained_layout=True)
    relative = {(r["arm"], layer): [[x * len(row) for x in row] for row in r["domain_shares"][layer]]
                for r in runs for layer in layers}
    top = max(max(max(row) for row in v) for v in relative.values())
    for i, run in enumerate(runs):
        for j, layer in enumerate(layers):
            ax = axes[i, j]
            image = ax.imshow(relative[(run["arm"], layer)], cmap="magma", vmin=0, vmax=top, aspect="auto")
            ax.set_yticks(range(len(domains)), domains if j == 0 else [""] * len(domains), fontsize=7)
            ax.set_xlabel("expert", fontsize=7)
            ax.tick_params(axis="x", labelsize=6)
            bits = specialization_bits(torch.tensor(run["domain_shares"][layer], dtype=torch.float64))
            ax.set_title(f"{run['arm']}, layer {layer}: I = {bits:.3f} bits", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8, label="relative load (1 = even share)")
    fig.suptitle(f"per-domain expert load ({result['scale']['name']} scale, seed {seed})", fontsize=9)
    path = out_dir / "specialization_heatmap.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


EXPERIMENT = Experiment(
    name="specialization", claim=6, title="expert specialization without the auxiliary loss",
    paper="DeepSeek-V3 Figure 9: the auxiliary-loss-free model's expert loads are more domain-specialized "
          "than an auxiliary-loss-based model's (Pile domains).",
    arms=arms,
    checks=[Compare("loss-free: more domain-specialized expert loads than with an aux loss", "specialization",
                    "loss-free", "aux-seq-0.001", "greater specialization (Figure 9)", lower_is_better=False)],
    metrics=[("val_loss", "held-out loss", "{:.4f}"), ("specialization", "I(domain; expert), bits", "{:.4f}"),
             ("maxvio_batch", "MaxVio_batch (2nd half of training)", "{:.3f}")],
    measure=measure, figures=heatmaps)
