"""Multi-head and grouped-query attention: the baselines MLA is compared with.

MHA caches 2·H·d_h values per token and layer, GQA 2·G·d_h, MLA C + R (see `nanoseek info`).
RoPE covers the whole head, in the same interleaved layout as MLA's RoPE part.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .cache import cache_mask
from .rope import apply_rope


class GQA(nn.Module):
    """Grouped-query attention; with as many key/value heads as query heads it is MHA."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.kv_heads, c.attn_head_dim
        self.scale = c.softmax_scale
        D = c.hidden_size
        self.q_proj = nn.Linear(D, self.n_heads * self.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(D, self.n_kv * self.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(D, self.n_kv * self.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, D, bias=c.attention_bias)

    def forward(self, x_BTD, cos, sin, positions=None, cache=None, absorb=None):
        q = apply_rope(self.q_proj(x_BTD).unflatten(-1, (self.n_heads, -1)), cos, sin)
        k = apply_rope(self.k_proj(x_BTD).unflatten(-1, (self.n_kv, -1)), cos, sin)
        v = self.v_proj(x_BTD).unflatten(-1, (self.n_kv, -1))
        mask = None
        if cache is not None:
            k, v = cache.update(self.layer_idx, positions, k, v)
            mask = cache_mask(positions, k.shape[1])
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            is_causal=mask is None, scale=self.scale, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(o.transpose(1, 2).flatten(-2))
