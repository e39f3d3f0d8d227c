"""Rotary position embedding in the interleaved layout of the DeepSeek checkpoints, and YaRN.

Layout. The official checkpoints rotate adjacent pairs (x0, x1), (x2, x3), ... of the RoPE
part of each query and key, pair i by angle pos·θ_i (θ_i = base^(-2i/d)). That is the
complex-number form of DeepSeek's `inference/model.py`; HF's `rope_interleave=True` does the
same and writes the result de-interleaved, which changes no dot product.

YaRN (Peng et al. 2023; DeepSeek-V2 appendix B). To stretch a model trained at
L = original_max_position_embeddings by a factor s, each frequency is blended between the
original θ_i (extrapolation, kept for fast-rotating pairs that complete many turns inside L)
and θ_i/s (interpolation, for slow pairs): θ'_i = θ_i/s·(1 − γ_i) + θ_i·γ_i, where γ_i ramps
linearly from 1 to 0 between the pair indices whose wavelength fits β_fast and β_slow turns
into L (YaRN eq. 17-19). The attention temperature (YaRN eq. 22, 0.1·ln s + 1) is split
across two places exactly as the checkpoints expect: cos/sin are multiplied by
mscale(s, mscale)/mscale(s, mscale_all_dim) here, and the softmax scale by
mscale(s, mscale_all_dim)² (`ModelConfig.softmax_scale`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig, yarn_mscale


def yarn_inv_freq(dim: int, base: float, factor: float, original_max: int,
                  beta_fast: float = 32, beta_slow: float = 1) -> torch.Tensor:
    """YaRN-blended inverse frequencies for a RoPE of `dim` dimensions (dim/2 pairs)."""
    def pair_index(num_rotations: float) -> float:  # inverse of wavelength(i) = L / rotations
        return dim * math.log(original_max / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(pair_index(beta_fast)), 0)
    high = min(math.ceil(pair_index(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1.0 - ramp  # 1 where the pair keeps its original frequency
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    return inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation


class RotaryEmbedding(nn.Module):
    """Maps positions to the (cos, sin) tables of the RoPE part of every head."""

    def __init__(self, config: ModelConfig, dim: int):
        super().__init__()
        self.dim = dim
        rs = config.rope_scaling
        if config.rope_type == "yarn":
            inv_freq = yarn_inv_freq(dim, config.rope_theta, rs["factor"],
                                     rs["original_max_position_embeddings"],
                                     rs.get("beta_fast") or 32, rs.get("beta_slow") or 1)
            m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
            if m and m_all:
                self.attention_factor = yarn_mscale(rs["factor"], m) / yarn_mscale(rs["factor"], m_all)
            else:
                self.attention_factor = yarn_mscale(rs["factor"])
        else:
            inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
            self.attention_factor = 1.0
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [..., T] (int) -> cos, sin [..., T, dim/2] in float32."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, T, H, d] (or [B, T, d]) by cos/sin [B|1, T, d/2].

    Computed in float32 and returned in x's dtype.
    """
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    return out.flatten(-2).to(x.dtype)
