"""Activation checkpointing per block, applied to a built model from outside.

`checkpoint_blocks(model)` makes every decoder layer (MTP layers included) keep only its
input for the backward and recompute the rest there: the memory of one layer's activations
instead of all of them, for about one more forward pass of compute. V3 makes this trade for
a few operators (§3.2.3: RMSNorm and the MLA up-projections; §3.3.3: the SwiGLU, which
nanoseek/fp8 recomputes too); here it is whole blocks. Names, parameters and state_dict stay
as they are: the layer's own `forward` is wrapped in place, no wrapper module is inserted.

The router counts each expert's tokens in its forward (the bias update's input). A
recomputation must not count them a second time: eagerly, the recomputation runs with the
routers' counting off (checkpoint's `context_fn`); under torch.compile the count is a buffer
mutation, applied once by the compiled forward and not replayed by the recomputation, which
only rebuilds what gradients need.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..model.moe import Router


@contextlib.contextmanager
def routers_not_counting(routers: list[Router]):
    """The routers' forward without the load count (it counts only in training mode)."""
    modes = [r.training for r in routers]
    for r in routers:
        r.training = False
    try:
        yield
    finally:
        for r, mode in zip(routers, modes):
            r.training = mode


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """Recompute each of model.model.layers in the backward (see the module docstring). In place."""
    for layer in model.model.layers:
        if getattr(layer, "checkpointed", False):
            continue
        forward = layer.forward
        routers = [m for m in layer.modules() if isinstance(m, Router)]

        def contexts(routers=routers):
            return contextlib.nullcontext(), routers_not_counting(routers)

        def checkpointed_forward(*args, _forward=forward, _contexts=contexts, **kwargs):
            if torch.compiler.is_compiling():
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, context_fn=_contexts, **kwargs)

        layer.forward = checkpointed_forward
        layer.checkpointed = True
    return model
