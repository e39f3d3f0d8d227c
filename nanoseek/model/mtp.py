"""Multi-Token Prediction modules (DeepSeek-V3 §2.2).

Module k (k = 1..D) predicts token i+k+1 at position i. It combines the previous depth's
representation h^{k-1}_i (the main model's output for k = 1) with the embedding of token
i+k, projects the pair from 2d to d, and runs one transformer block (V3 eq. 21-22):
    h'^k_i = M_k [RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))],   h^k = TRM_k(h'^k)
then scores it with the main model's output head (eq. 23). The embedding and the head are
shared with the main model; the module's own norm before the head is `shared_head.norm`.
The loss is λ/D · Σ_k CE_k (eq. 24-25).

Checkpoint layout. Module k is `model.layers.{num_hidden_layers + k - 1}` with keys `enorm`,
`hnorm`, `eh_proj`, `shared_head.norm` beside an ordinary decoder layer's. The official
weights (and vLLM/SGLang) concatenate [enorm(embedding); hnorm(hidden)] in that order —
the paper writes the pair the other way round; the checkpoint order is what we follow —
and feed the main model's final-normed hidden states as h^0.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .norm import RMSNorm


class SharedHead(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def make_mtp_layer(block_cls: type[nn.Module]) -> type[nn.Module]:
    """An MTP module is a decoder block with an input projection in front."""

    class MTPLayer(block_cls):
        def __init__(self, config: ModelConfig, layer_idx: int):
            super().__init__(config, layer_idx)
            D = config.hidden_size
            self.enorm = RMSNorm(D, config.rms_norm_eps)
            self.hnorm = RMSNorm(D, config.rms_norm_eps)
            self.eh_proj = nn.Linear(2 * D, D, bias=False)
            self.shared_head = SharedHead(config)

        def forward(self, h_prev_BTD, emb_next_BTD, cos, sin, positions=None, cache=None, absorb=None):
            x = self.eh_proj(torch.cat([self.enorm(emb_next_BTD), self.hnorm(h_prev_BTD)], dim=-1))
            return super().forward(x, cos, sin, positions, cache, absorb)

    return MTPLayer
