"""Distributed checkpoints (torch.distributed.checkpoint) of a parallel run.

A checkpoint directory has the single-process layout (train/checkpoint.py: atomic rename,
`latest`, `trainer_state.json`, RNG and tokenizer files, `config.json`), with the model and
optimizer in `dcp/` instead of safetensors: every rank writes the shards it holds, and DCP's
metadata maps them to the full tensors. The state is `get_state_dict`'s, keyed by the full
model's parameter names, the optimizer state flattened per parameter, so a checkpoint loads
into any layout: another dp/ep/pp split, another world size, or one process without a
process group (`load_distributed`), and into a plain Transformer (`load_full_model`), from
which `hf.save_pretrained` writes the single-file HF layout.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from ..config import ModelConfig
from ..hf import CheckpointError
from ..loading import TRAINER_STATE
from ..model import Transformer
from ..model.moe import Router
from ..train.checkpoint import resolve_checkpoint, restore_rng, write_checkpoint

DCP_DIR = "dcp"
OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def is_distributed_checkpoint(ckpt: Path) -> bool:
    return (ckpt / DCP_DIR / ".metadata").is_file()


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def _one_process_quietly():
    """DCP warns that it assumes one process whenever it runs without a process group, even
    where that is the point."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled|unavailable)")
        yield


def save_distributed(run_dir: str | Path, step: int, view: nn.Module, optimizer: torch.optim.Optimizer,
                     config: ModelConfig, train_state: dict, tokenizer_dir: str | Path | None = None,
                     keep_last: int | None = 3) -> Path:
    """Every rank calls this; rank 0 frames the checkpoint (write_checkpoint), all ranks write
    their shards into it. Returns the checkpoint path once it is complete on every rank."""
    model_sd, optim_sd = get_state_dict(view, optimizer, options=OPTIONS)
    state = {"model": model_sd, "optim": optim_sd}

    def write_files(tmp: Path) -> None:
        if _distributed():
            dist.broadcast_object_list([str(tmp)], src=0)
        with _one_process_quietly():
            dcp.save(state, checkpoint_id=tmp / DCP_DIR, no_dist=not _distributed())
        config.to_json(tmp / "config.json")

    if not _distributed() or dist.get_rank() == 0:
        path = write_checkpoint(run_dir, step, write_files, train_state, tokenizer_dir, keep_last)
    else:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        dcp.save(state, checkpoint_id=Path(box[0]) / DCP_DIR)
        path = None
    if _distributed():
        box = [str(path) if path is not None else None]
        dist.broadcast_object_list(box, src=0)     # also: nobody reads it before it is in place
        path = Path(box[0])
    return path


def load_distributed(path: str | Path, view: nn.Module, optimizer: torch.optim.Optimizer | None,
                     stage: str | None = None, restore_rng_states: bool = True) -> dict:
    """Load a checkpoint (a run directory's latest, or one checkpoint directory) into this
    rank's part of the model and its optimizer, whatever layout wrote it; returns the train
    state. Every rank calls it (one process: without a process group)."""
    ckpt = resolve_checkpoint(path)
    if not is_distributed_checkpoint(ckpt):
        raise CheckpointError(f"{ckpt} is a single-process checkpoint (no {DCP_DIR}/): resume it "
                              "without --dp/--ep/--pp, or start the parallel run afresh")
    train_state = json.loads((ckpt / TRAINER_STATE).read_text())
    if stage is not None and train_state.get("stage") != stage:
        raise CheckpointError(f"{ckpt.parent.parent} holds a {train_state.get('stage')!r} run, "
                              f"not a {stage!r} run")
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(view, optimizer, options=OPTIONS)
        state = {"model": model_sd, "optim": optim_sd}
    else:
        state = {"model": get_model_state_dict(view, options=OPTIONS)}
    with _one_process_quietly():
        dcp.load(state, checkpoint_id=ckpt / DCP_DIR, no_dist=not _distributed())
    if optimizer is not None:
        set_state_dict(view, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=OPTIONS)
    else:
        set_model_state_dict(view, state["model"], options=OPTIONS)
    for module in view.modules():       # counters of a step in flight are not checkpointed
        if isinstance(module, Router):
            module.load.zero_()
    if restore_rng_states:
        restore_rng(ckpt)
    return train_state


def load_full_model(path: str | Path) -> Transformer:
    """The whole model of a (distributed) checkpoint, in one process on the CPU, in float32:
    what `hf.save_pretrained` exports to the single-file HF layout."""
    ckpt = resolve_checkpoint(path)
    model = Transformer(ModelConfig.from_json(ckpt / "config.json"))
    state = {"model": model.state_dict()}
    with _one_process_quietly():
        dcp.load(state, checkpoint_id=ckpt / DCP_DIR, no_dist=True)
    return model
