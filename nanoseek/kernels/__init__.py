"""Triton fast paths. Each has a plain-torch twin it is tested against:

- decode.py: the kernels of the fused small-batch decode step (infer/fused.py), whose twin
  is the model's own absorbed-MLA decode forward.
- moe.py: the routed experts of a batch of up to 64 tokens (model/moe.py's Experts takes
  them above GATHER_MAX_PAIRS on a Hopper+ NVIDIA GPU with 16-bit weights, without
  autograd), whose twin is Experts.forward_loop.

Importing a module here imports Triton; callers import lazily, only where a fast path runs
(this package itself does not). Under TRITON_INTERPRET=1 the kernels run on CPU tensors
(slowly), which is how the CPU tests check them.
"""

import importlib.util

import torch

TRITON = importlib.util.find_spec("triton") is not None


def tuned_gpu(device: torch.device, dtype: torch.dtype) -> bool:
    """Where the fast paths are on by default: where they were measured and tuned, an NVIDIA
    Hopper+ GPU with 16-bit weights, and Triton installed."""
    return (TRITON and device.type == "cuda" and not torch.version.hip
            and dtype in (torch.bfloat16, torch.float16) and torch.cuda.get_device_capability(device)[0] >= 9)
