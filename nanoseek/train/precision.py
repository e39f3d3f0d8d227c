"""Training precision, one choice for every trainer (pretraining, SFT, GRPO):

    auto   BF16 autocast on a GPU, float32 on the CPU
    bf16   BF16 autocast (float32 master weights, gradients and optimizer)
    fp32   float32 throughout
    fp8    DeepSeek-V3's FP8 recipe (nanoseek/fp8) for the linear and expert GEMMs, BF16
           autocast for the rest; on the CPU the FP8 GEMMs are emulated (float32 products of
           FP8-rounded operands) and the rest runs in float32
"""

from __future__ import annotations

import torch
from torch import nn

PRECISIONS = ("auto", "bf16", "fp32", "fp8")


def prepare_precision(model: nn.Module, precision: str, device: torch.device) -> torch.dtype | None:
    """Apply `precision` to a model about to train on `device`: for fp8, swap its layers for
    the FP8 ones (raising fp8.Fp8Unsupported, one line, on a GPU that cannot run them).
    Returns the autocast dtype of the forward passes (None: none)."""
    if precision == "fp8":
        from ..fp8 import convert_to_fp8
        convert_to_fp8(model, device=device)
    gpu = device.type == "cuda"
    if precision == "bf16" or (precision in ("auto", "fp8") and gpu):
        return torch.bfloat16
    return None
