"""`parallelize()`: a built single-device Transformer -> this rank's part of the parallel model.

The order is fixed (torchtitan's): split into pipeline stages, swap in expert-parallel
experts, wrap for data parallelism (FSDP2 or replicate), then build the pipeline schedule
over the wrapped stages. The model's own code is untouched: all of it happens here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from ..model.moe import Router
from ..model.transformer import Transformer
from .data_parallel import apply_data_parallel
from .expert_parallel import apply_expert_parallel, check_expert_layout
from .mesh import Meshes, ParallelConfig
from .pipeline import build_schedule, make_stages, pipeline_step
from .stage import ModelStage

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class ParallelModel:
    """This rank's stages (one, or two for DualPipeV), `view`: one module holding them under
    the full model's names (the optimizer and checkpoints use it), and the schedule if pp > 1."""
    config: ModelConfig
    cfg: ParallelConfig
    stages: list[ModelStage]
    view: nn.Module
    schedule: object | None = None

    def forward_backward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> None:
        if self.schedule is not None:
            pipeline_step(self.schedule, self.stages, input_ids, labels)
            return
        stage = self.stages[0]
        stage.loss(stage(input_ids), labels).backward()

    def routers(self) -> dict[int, Router]:
        """The routers of this rank's MoE layers, by layer index."""
        return {int(_LAYER.search(name + ".")[1]): m for name, m in self.view.named_modules()
                if isinstance(m, Router)}


def local_view(stages: list[ModelStage]) -> nn.Module:
    """One module over the stages' parameters and buffers with the full model's names."""
    if len(stages) == 1:
        return stages[0]
    view = nn.Module()
    view.model = nn.Module()
    view.model.layers = nn.ModuleDict()
    for stage in stages:
        for name, child in stage.model.named_children():
            if name == "layers":
                view.model.layers.update(child)
            elif name != "rotary":
                view.model.add_module(name, child)
        if stage.is_last:
            view.lm_head = stage.lm_head
    return view


def parallelize(model: Transformer, cfg: ParallelConfig, mesh: Meshes | None,
                device: torch.device) -> ParallelModel:
    """This rank's part of `model` (moved to `device`) under `cfg`; `mesh` from build_mesh,
    None for one process."""
    check_expert_layout(model.config, cfg.ep)
    model.to(device)
    pp_rank = mesh.pp.get_local_rank() if mesh is not None else 0
    stages = make_stages(model, cfg, pp_rank)
    for stage in stages:
        if cfg.ep > 1:
            apply_expert_parallel(stage, mesh.ep)
        apply_data_parallel(stage, mesh, cfg)
    schedule = None
    if cfg.pp > 1:
        lead = next((s for s in stages if s.is_last), None)
        schedule = build_schedule(stages, cfg, mesh.pp, device,
                                  lead.loss if lead is not None else _not_last_stage)
    return ParallelModel(model.config, cfg, stages, local_view(stages), schedule)


def _not_last_stage(outputs, labels):
    raise RuntimeError("the pipeline asked a rank without the last stage for the loss")
