"""Applying FP8 to a built model from outside: a module swap chosen by name (torchao style).

`convert_to_fp8(model, config)` walks the modules once and swaps, in place:
- every SwiGLU MLP (dense layers, shared experts) for `Fp8TrainMLP`,
- every routed `Experts` for `Fp8TrainExperts`,
- every other `nn.Linear` (the attention projections, MTP's eh_proj) for `Fp8TrainLinear`,
unless `config.skip` names it (the output head, V3 §3.3.1). The embedding, the router (its
logits are float32 in `Router`), the norms and the attention operator are no nn.Linear and
stay as they are; so do subclasses of the three (they compute their own way, e.g.
infer/fp8_weights.py's FP8-stored experts). A swapped module keeps its parameters and names
(checkpoints, optimizer state and `hf.save_pretrained` see the same model) and runs the plain
BF16 layer in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..model.moe import MLP, Experts
from .linear import Fp8TrainLinear
from .swiglu import Fp8TrainExperts, Fp8TrainMLP

BACKENDS = ("auto", "emulated")


class Fp8Unsupported(ValueError):
    """FP8 training was asked for on a device that cannot run it; the message says what to do."""


@dataclass
class Fp8Config:
    # auto: the FP8 kernels on a Hopper GPU, the emulated twin on the CPU; emulated: the twin anywhere
    backend: str = "auto"
    # modules left in BF16, by name: a name containing one of these (V3 §3.3.1: the output head)
    skip: tuple[str, ...] = ("lm_head",)
    # linears whose input is saved for the backward as it is, not in FP8: V3 §3.3.3 keeps the
    # input of the linear after attention in a wider format (E5M6), since the attention's own
    # backward reads the same tensor; there is no E5M6 dtype, so it stays in BF16
    keep_input: tuple[str, ...] = ("self_attn.o_proj",)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"fp8 backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")


def fast_fp8(device: torch.device | str, backend: str = "auto") -> bool:
    """Whether FP8 training on `device` runs the fast kernels (True) or the emulated twin
    (False, the CPU); raises Fp8Unsupported, one line, where neither is on offer."""
    device = torch.device(device)
    if backend == "emulated" or device.type == "cpu":
        return False
    if device.type != "cuda" or torch.version.hip:
        raise Fp8Unsupported(f"FP8 training runs on NVIDIA Hopper GPUs (or emulated on the CPU), not on "
                             f"{device.type}{' (ROCm)' if torch.version.hip else ''}; use --precision bf16")
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        raise Fp8Unsupported(f"FP8 training needs a Hopper GPU (compute capability 9.x: cuBLAS's 1x128/128x128 "
                             f"block-scaled FP8 GEMMs), but {torch.cuda.get_device_name(device)} is {major}.{minor}; "
                             "use --precision bf16")
    return True


def convert_to_fp8(model: nn.Module, config: Fp8Config | None = None,
                   device: torch.device | str | None = None) -> nn.Module:
    """Swap the model's MLPs, experts and linears for their FP8 versions, in place (see the
    module docstring); returns the model. device: where it will train (default: where its
    parameters are), which chooses fast kernels or the emulated twin."""
    config = config or Fp8Config()
    fast = fast_fp8(device or next(model.parameters()).device, config.backend)
    if fast:
        from . import kernels  # noqa: F401  (imports Triton and registers its ops before anything compiles)
        from .gemm import cublas_recipe
        cublas_recipe(device or next(model.parameters()).device)  # probed eagerly, before any compile
    swaps = [(MLP, Fp8TrainMLP), (Experts, Fp8TrainExperts), (nn.Linear, Fp8TrainLinear)]
    inside_mlp: set[str] = set()
    for name, module in list(model.named_modules()):
        if any(s in name for s in config.skip) or name.rpartition(".")[0] in inside_mlp:
            continue
        for plain, fp8 in swaps:
            if type(module) is plain:  # not a subclass: infer/fp8_weights' FP8-stored experts, say
                module.__class__ = fp8  # same object: parameters, hooks and parents stay
                module.fast = fast
                if fp8 is Fp8TrainLinear:
                    module.save_fp8_input = not any(k in name for k in config.keep_input)
                if fp8 is Fp8TrainMLP:
                    inside_mlp.add(name)
                break
    return model


def fp8_modules(model: nn.Module) -> dict[str, nn.Module]:
    """name -> module of everything convert_to_fp8 swapped."""
    kinds = (Fp8TrainLinear, Fp8TrainMLP, Fp8TrainExperts)
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds)}
