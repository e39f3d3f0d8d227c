"""Claim 2: auxiliary-loss-free balancing keeps experts balanced without hurting the loss.

Wang et al. 2024 (arXiv 2408.15664) Table 2: with the bias update instead of an auxiliary
loss, a 1B MoE reaches perplexity 9.50 against 9.56 with global MaxVio 0.04 against 0.72
(3B: 7.92 vs 7.97, 0.04 vs 0.52). DeepSeek-V3 §4.5.3: balancing over the batch rather than
each sequence is what helps; validation loss 2.253 for the auxiliary-loss-free and for a
batch-wise auxiliary loss against 2.258 for a sequence-wise one (1B; 3B: 2.080, 2.080, 2.085).

Arms share V3's MoE (sigmoid router, group-limited top-K, one shared expert) and differ in
balancing only: the bias update (γ = 0.001, no loss), a sequence-wise auxiliary loss of
α = 0.01 or 0.001 (V3 eq. 17-20), a batch-wise one of α = 0.001 (the same formula over all
the batch's tokens), and none at all. MaxVio_batch is the trainer's per-step figure
(metrics.jsonl), averaged over the second half of training; global MaxVio is over the whole
held-out set (routing.py).
"""

from __future__ import annotations

from ..config import ModelConfig
from .routing import expert_counts, global_maxvio
from .runner import Arm, Compare, Experiment

BALANCING = {  # arm: (bias speed γ, auxiliary loss α, sequence-wise)
    "loss-free": (0.001, 0.0, True),
    "aux-seq-0.01": (0.0, 0.01, True),
    "aux-seq-0.001": (0.0, 0.001, True),
    "aux-batch-0.001": (0.0, 0.001, False),
    "none": (0.0, 0.0, True),
}


def balanced(scale, name: str) -> ModelConfig:
    gamma, alpha, per_sequence = BALANCING[name]
    return ModelConfig(**{**scale.trunk, **scale.moe}).replace(bias_update_speed=gamma, aux_loss_alpha=alpha,
                                                              seq_aux=per_sequence)


def arms(scale) -> list[Arm]:
    notes = {"loss-free": "bias update γ=0.001", "aux-seq-0.01": "seq-wise aux loss α=0.01",
             "aux-seq-0.001": "seq-wise aux loss α=0.001", "aux-batch-0.001": "batch-wise aux loss α=0.001",
             "none": "no balancing"}
    return [Arm(name, balanced(scale, name), notes[name]) for name in BALANCING]


def measure(model, data, scale) -> dict:
    return {"maxvio_global": global_maxvio(expert_counts(model, data.heldout))}


EXPERIMENT = Experiment(
    name="balancing", claim=2, title="auxiliary-loss-free balancing",
    paper="arXiv 2408.15664 Table 2 (1B): loss-free perplexity 9.50 vs 9.56 with an auxiliary loss, global "
          "MaxVio 0.04 vs 0.72. DeepSeek-V3 §4.5.3 (1B): validation loss 2.253 loss-free and batch-wise "
          "auxiliary loss, 2.258 sequence-wise.",
    arms=arms,
    checks=[Compare("loss-free: lower global MaxVio than aux loss α=0.001", "maxvio_global", "loss-free",
                    "aux-seq-0.001", "0.04 vs 0.72"),
            Compare("loss-free: lower held-out loss than aux loss α=0.001", "val_loss", "loss-free",
                    "aux-seq-0.001", "ppl 9.50 vs 9.56"),
            Compare("loss-free: lower held-out loss than aux loss α=0.01", "val_loss", "loss-free",
                    "aux-seq-0.01", "a larger α hurts perplexity more (ibid.)"),
            Compare("loss-free: lower global MaxVio than no balancing", "maxvio_global", "loss-free", "none",
                    "no figure (balancing's purpose)"),
            Compare("batch-wise aux loss: lower held-out loss than sequence-wise", "val_loss", "aux-batch-0.001",
                    "aux-seq-0.001", "2.253 vs 2.258")],
    metrics=[("val_loss", "held-out loss", "{:.4f}"), ("maxvio_global", "global MaxVio (held-out)", "{:.3f}"),
             ("maxvio_batch", "MaxVio_batch (2nd half of training)", "{:.3f}")],
    measure=measure,
    notes={"cpu": "CPU scale: a run of a few hundred steps lets the bias update (γ = 0.001 a step) move each "
                  "bias by a few tenths at most, so loss-free balancing has only begun; V3's runs take "
                  "thousands of steps."})
