"""Multi-head Latent Attention (DeepSeek-V2 §2.1, V3 §2.1.1).

Legend: B batch, T query tokens, S key tokens, H heads, C kv_lora_rank (the latent),
Q q_lora_rank, N qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim, D hidden_size.

Keys and values come from one low-rank latent per token (V2 eq. 9-11):
    c_kv = RMSNorm(W_DKV x)                    [C]      kv_a_proj_with_mqa → kv_a_layernorm
    k_nope_h = W_UK_h c_kv,  v_h = W_UV_h c_kv  [N], [V]  kv_b_proj
and position enters through one extra RoPE key shared by all heads (decoupled RoPE, eq. 14):
    k_pe = RoPE(W_KR x)                        [R]      the last R outputs of kv_a_proj_with_mqa
The query is low-rank too when q_lora_rank is set (q_a_proj → q_a_layernorm → q_b_proj).

Two ways to compute the same attention:
- `expanded` (training and prefill): materialise k_nope, v for every head and call SDPA.
- `absorbed` (decode): since q_nope·k_nope = q_nope·(W_UK c_kv) = (W_UK^T q_nope)·c_kv, fold
  W_UK into the query and W_UV into the output, so attention reads only c_kv and k_pe —
  C + R numbers per token and layer, which is all the cache holds (V2 §2.1.2, "absorb").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .cache import cache_mask
from .norm import RMSNorm
from .rope import apply_rope


class MLA(nn.Module):
    # set from outside (Transformer.set_decode_attention, an engine's forwards): a callable
    # (attn, q_nope, q_pe, c_kv, k_pe, positions) -> o [B, 1, H, V] taking the absorbed
    # attention's place for one new token a row, e.g. kernels that read each row's own positions
    decode_attention = None

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.n_heads = c.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = c.q_lora_rank, c.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.scale = c.softmax_scale
        H, D = self.n_heads, c.hidden_size
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * c.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = nn.Linear(c.q_lora_rank, H * c.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, c.kv_lora_rank + c.qk_rope_head_dim, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, H * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * c.v_head_dim, D, bias=c.attention_bias)

    def query(self, x_BTD, cos, sin):
        if self.q_lora_rank is None:
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        q_BTHK = q.unflatten(-1, (self.n_heads, -1))
        q_nope, q_pe = q_BTHK.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def latent(self, x_BTD, cos, sin):
        """What the cache holds: c_kv [B, T, C] and the rotated shared key k_pe [B, T, R]."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(c_kv), apply_rope(k_pe, cos, sin)

    def forward(self, x_BTD, cos, sin, positions=None, cache=None, absorb: bool | None = None):
        q_nope, q_pe = self.query(x_BTD, cos, sin)
        c_kv, k_pe = self.latent(x_BTD, cos, sin)
        if cache is not None:
            c_kv, k_pe = cache.update(self.layer_idx, positions, c_kv, k_pe)
        if absorb is None:
            absorb = cache is not None
        if absorb and cache is not None and self.decode_attention is not None and q_nope.shape[1] == 1:
            o_BTHV = self.decode_attention(self, q_nope, q_pe, c_kv, k_pe, positions)
        else:
            mask = None if cache is None else cache_mask(positions, c_kv.shape[1])
            attend = self.absorbed if absorb else self.expanded
            o_BTHV = attend(q_nope, q_pe, c_kv, k_pe, mask)
        return self.o_proj(o_BTHV.flatten(-2))

    def expanded(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Training/prefill path: per-head keys and values, one SDPA call (causal if no mask)."""
        H, S = self.n_heads, c_kv.shape[1]
        kv_BSHX = self.kv_b_proj(c_kv).unflatten(-1, (H, -1))
        k_nope, v_BSHV = kv_BSHX.split([self.nope_dim, self.v_dim], dim=-1)
        k_BSHK = torch.cat([k_nope, k_pe[:, :, None, :].expand(-1, S, H, -1)], dim=-1)
        q_BTHK = torch.cat([q_nope, q_pe], dim=-1)
        qk_dim = q_BTHK.shape[-1]
        if q_BTHK.is_cuda and self.v_dim < qk_dim:
            # flash attention wants one head size for q, k and v: pad v with zeros, slice after
            v_BSHV = F.pad(v_BSHV, (0, qk_dim - self.v_dim))
        o = F.scaled_dot_product_attention(
            q_BTHK.transpose(1, 2), k_BSHK.transpose(1, 2), v_BSHV.transpose(1, 2),
            attn_mask=mask, is_causal=mask is None, scale=self.scale)
        return o.transpose(1, 2)[..., : self.v_dim]  # [B, T, H, V]

    def absorbed(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Decode path: attention over the latent alone, W_UK and W_UV absorbed."""
        w_HXC = self.kv_b_proj.weight.unflatten(0, (self.n_heads, -1))
        w_uk_HNC, w_uv_HVC = w_HXC.split([self.nope_dim, self.v_dim], dim=1)
        q_lat = torch.einsum("bthn,hnc->bthc", q_nope, w_uk_HNC)
        scores = (torch.einsum("bthc,bsc->bhts", q_lat, c_kv)
                  + torch.einsum("bthr,bsr->bhts", q_pe, k_pe)).float() * self.scale
        if mask is None:
            T, S = q_nope.shape[1], c_kv.shape[1]
            mask = torch.ones(T, S, dtype=torch.bool, device=c_kv.device).tril(S - T)
        scores = scores.masked_fill(~mask, float("-inf"))
        p_BHTS = scores.softmax(dim=-1).to(c_kv.dtype)
        o_lat = torch.einsum("bhts,bsc->bthc", p_BHTS, c_kv)
        return torch.einsum("bthc,hvc->bthv", o_lat, w_uv_HVC)
