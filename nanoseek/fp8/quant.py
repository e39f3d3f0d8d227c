"""Fine-grained E4M3 quantization: tiles and blocks, each with its own online scale.

A tensor [..., R, C] is cut into tiles of `block` = (br, bc) elements: (1, 128) for
activations and gradients (per row, 128 columns at a time), (128, 128) for weights. The
tiles at the bottom and right edges are partial when R or C is not a multiple of the block
(they are zero-padded to find their amax and cropped after). Each tile gets

    scale_inv = amax(|tile|) / 448          (448: the largest finite float8_e4m3fn)
    q         = tile / scale_inv            rounded to E4M3, within [-448, 448]

so the tile's largest value lands on E4M3's largest, and tile ≈ q · scale_inv, which is
what `dequantize` returns and what the GEMMs multiply back in (the DeepSeek-V3 checkpoints
name the scale `weight_scale_inv` for this reason).

Edge cases, by design:
- amax = 0 (a tile of zeros): scale_inv = 1, q = 0; the tile dequantizes to zeros.
- a tile holding inf or NaN gets a non-finite scale and dequantizes to NaN throughout. An
  overflow is never saturated into a finite number: it reaches the gradient norm, and the
  trainer skips the step (train/step.py).

The wgrad GEMMs contract over tokens, so their operands are quantized along the token
axis (128x1 tiles of the [tokens, channels] tensor, which `quantize_tokens` returns
transposed, as 1x128 tiles of [channels, tokens]). With experts, tokens come sorted by
expert and a tile must not straddle two experts (each expert's weight gradient sums over
its own tokens only): each group starts a new tile, so a group of n tokens takes ⌈n/128⌉
tiles. The tokens are laid out padded: group e's first token at column 128·first_tile[e],
zeros in the gaps. Every tile is then a plain aligned 128 columns (a gather and a dense
amax to build, aligned loads for the kernel), where a scatter into ragged tiles was slow.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
TILE = 128       # the 1x128 activation tile's length and the 128x128 weight block's side
ACT_TILE = (1, TILE)
WEIGHT_BLOCK = (TILE, TILE)


class Quantized(NamedTuple):
    """data [..., R, C] float8_e4m3fn and scale [..., ⌈R/br⌉, ⌈C/bc⌉] float32 (x ≈ data ·
    scale, each scale spread over its tile)."""
    data: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int]

    def t(self) -> "Quantized":
        """The transpose [..., C, R], contiguous, with its blocks' scales transposed: a square
        block's scale is the same number either way, so a 128x128-quantized weight serves the
        backward GEMM that needs W^T without quantizing again."""
        if self.block[0] != self.block[1]:
            raise ValueError(f"only square blocks transpose with their scales (got {self.block} tiles)")
        return Quantized(self.data.transpose(-2, -1).contiguous(), self.scale.transpose(-2, -1).contiguous(),
                         self.block)


def tile_scale(amax: torch.Tensor) -> torch.Tensor:
    """scale_inv of tiles with this amax: amax/448, 1 for an all-zero tile; inf or NaN stays non-finite."""
    return torch.where(amax == 0, torch.ones_like(amax), amax / FP8_MAX)


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale rounded to E4M3. The clamp only catches a rounding of 448·(1 + ε); a NaN
    (from a non-finite tile) passes through it."""
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def block_scale_shape(shape: torch.Size | tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The scales' shape of a [..., R, C] tensor quantized in `block` tiles: [..., ⌈R/br⌉, ⌈C/bc⌉]."""
    *lead, R, C = shape
    return (*lead, math.ceil(R / block[0]), math.ceil(C / block[1]))


def spread_scales(scale: torch.Tensor, block: tuple[int, int], shape: torch.Size) -> torch.Tensor:
    """Each block's scale repeated over its block, cut to the quantized tensor's `shape`."""
    R, C = shape[-2:]
    return scale.repeat_interleave(block[0], -2).repeat_interleave(block[1], -1)[..., :R, :C]


def quantize(x: torch.Tensor, block: tuple[int, int]) -> Quantized:
    """x [..., R, C] (any float dtype) -> Quantized with one scale per `block` tile."""
    *lead, R, C = x.shape
    br, bc = block
    nr, nc = block_scale_shape(x.shape, block)[-2:]
    xf = x.float()
    if R % br or C % bc:  # ragged edges: zero-pad (zeros do not change a tile's amax), crop after
        xf = F.pad(xf, (0, nc * bc - C, 0, nr * br - R))
    tiles = xf.unflatten(-1, (nc, bc)).unflatten(-3, (nr, br))     # [..., nr, br, nc, bc]
    scale = tile_scale(tiles.abs().amax(dim=(-3, -1)))              # [..., nr, nc]
    q = to_fp8(tiles, scale[..., :, None, :, None]).flatten(-2).flatten(-3, -2)
    if R % br or C % bc:
        q = q[..., :R, :C]
    return Quantized(q.contiguous(), scale, tuple(block))


def dequantize(q: Quantized) -> torch.Tensor:
    """data · scale, float32, each scale spread over its tile (edge tiles cut)."""
    return q.data.float() * spread_scales(q.scale, q.block, q.data.shape)


def first_tiles(offsets_E: torch.Tensor) -> torch.Tensor:
    """[E + 1] the first token tile of each group, and the tile count last; offsets_E: the
    cumulative group ends (int32, as torch._grouped_mm takes them)."""
    ends = offsets_E.long()
    tiles_per_group = (torch.diff(ends, prepend=ends.new_zeros(1)) + TILE - 1) // TILE
    return F.pad(tiles_per_group.cumsum(0), (1, 0))


def n_tiles(offsets_E: torch.Tensor, n_tokens: int) -> int:
    """The group-aligned tiles of n tokens in E groups, at most: ⌈n/128⌉ + E - 1."""
    return math.ceil(n_tokens / TILE) + offsets_E.shape[0] - 1


def token_of_column(offsets_E: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """[128·T] the token each column of the padded group-aligned layout holds, n_tokens for a
    padding column (T = n_tiles, a static bound: no host sync). The tokens keep their order."""
    ends = offsets_E.long()
    first = first_tiles(offsets_E)
    tile = torch.arange(n_tiles(offsets_E, n_tokens), device=offsets_E.device)
    # the group of each tile: how many groups end at or before it (tiles past the last group's
    # count in the last group and stay empty). Not bucketize: torch 2.11's inductor cannot lower
    # it on a slice.
    group_T = (first[1:, None] <= tile).sum(0).clamp_max(ends.shape[0] - 1)
    start_T = (ends - torch.diff(ends, prepend=ends.new_zeros(1)))[group_T]
    token_TP = (start_T + (tile - first[group_T]) * TILE)[:, None] + torch.arange(TILE, device=offsets_E.device)
    return torch.where(token_TP < ends[group_T][:, None], token_TP, n_tokens).flatten()


def quantize_tokens(x_MC: torch.Tensor, offsets_E: torch.Tensor | None = None, fast: bool = False) -> Quantized:
    """x [M tokens, C] -> x^T quantized along the tokens: 128x1 tiles of x (what a GEMM
    contracting over tokens needs), data [C, M] and scale [C, ⌈M/128⌉]. With offsets_E (tokens
    sorted by group), the padded group-aligned layout of the module docstring: data [C, 128·T]
    and scale [C, T] with T = n_tiles(offsets_E, M), its columns as `token_of_column` says.
    fast (a GPU): the grouped layout by one Triton pass (kernels.quantize_tokens_fp8), where
    the gather, amax and transpose below took ~10x their HBM time compiled."""
    if offsets_E is None:
        return quantize(x_MC.t(), ACT_TILE)
    if fast:
        from .kernels import quantize_tokens_fp8
        return Quantized(*quantize_tokens_fp8(x_MC.contiguous(), offsets_E, first_tiles(offsets_E)), ACT_TILE)
    M, C = x_MC.shape
    token_P = token_of_column(offsets_E, M)
    x_PC = torch.where((token_P < M)[:, None], x_MC[token_P.clamp_max(max(M - 1, 0))].float(), 0.0)
    x_TPC = x_PC.view(-1, TILE, C)
    scale_TC = tile_scale(x_TPC.abs().amax(1))  # amax keeps a NaN: a NaN tile stays non-finite
    q_PC = to_fp8(x_TPC, scale_TC[:, None, :]).flatten(0, 1)
    return Quantized(q_PC.t().contiguous(), scale_TC.t().contiguous(), ACT_TILE)
