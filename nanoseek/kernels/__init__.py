"""Triton fast paths. Each has a plain-torch twin it is tested against:

- decode.py: the kernels of the fused small-batch decode step (infer/fused.py), whose twin
  is the model's own absorbed-MLA decode forward.
- moe.py: the routed experts of a batch of up to 64 tokens (model/moe.py's "small_batch"
  expert path), whose twin is Experts.forward_loop.

Importing a module here imports Triton; callers import lazily, only where a fast path runs
(this package itself does not). Under TRITON_INTERPRET=1 the kernels run on CPU tensors
(slowly), which is how the CPU tests check them.
"""

import importlib.util
import os

import torch

TRITON = importlib.util.find_spec("triton") is not None


def fast_kernels_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Triton fast paths are taken by default here: where they were measured
    faster than the compiled PyTorch forward, an NVIDIA Hopper+ GPU with 16-bit weights."""
    return (TRITON and device.type == "cuda" and not torch.version.hip
            and dtype in (torch.bfloat16, torch.float16) and torch.cuda.get_device_capability(device)[0] >= 9)


def triton_runs(device: torch.device) -> bool:
    """Whether Triton kernels can run on this device's tensors at all: a GPU, or any device
    under Triton's interpreter (TRITON_INTERPRET=1)."""
    return TRITON and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
