"""Find and load a model for any purpose (serve, RL, eval, chat): the one way in.

A model directory is a checkpoint (HF layout: config.json + safetensors, tokenizer beside it)
or a run directory, whose `final/` or latest complete training checkpoint is taken. The run
directory's layout (`checkpoints/step_*`, `checkpoints/latest`) is defined here, since every
reader needs it and the trainer is only one writer.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .data.tokenizer import ChatTokenizer, load_tokenizer

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Checkpoint directories under `root` (complete or not), oldest step first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def is_complete(ckpt: Path) -> bool:
    return ckpt.is_dir() and (ckpt / TRAINER_STATE).is_file() and (ckpt / "config.json").is_file()


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `run_dir/checkpoints/latest` names; if that file is missing or names a
    directory that is gone, the complete checkpoint with the highest step; None if there is none."""
    root = checkpoint_root(run_dir)
    try:
        name = (root / LATEST).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        name = ""
    if name and _STEP_DIR.match(name) and is_complete(root / name):
        return root / name
    complete = [p for _, p in step_dirs(root) if is_complete(p)]
    return complete[-1] if complete else None


def resolve_model_dir(path: str | Path) -> Path:
    """A checkpoint directory (config.json) or a run directory (its `final/` or latest checkpoint)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / "final" / "config.json").is_file():
        return path / "final"
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    raise FileNotFoundError(f"{path}: not a checkpoint (no config.json) nor a run directory")


def tokenizer_for(path: Path) -> ChatTokenizer:
    for candidate in (path, path / "tokenizer", path.parent / "tokenizer", path.parent.parent / "tokenizer"):
        if (candidate / "tokenizer.json").is_file():
            return load_tokenizer(candidate)
    raise FileNotFoundError(f"{path}: no tokenizer.json beside the model")


def resolve_device(name: str) -> torch.device:
    """`auto` (a GPU when there is one), `cpu`, `cuda`, `cuda:1`, `mps` ...; a device this machine
    lacks is a ValueError that says which ones it has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but this torch build sees no CUDA GPU; "
                             "use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} asked for, but there are {torch.cuda.device_count()} GPUs")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' asked for, but this machine has no MPS backend; use cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def load_model_dir(path: str | Path, device: str = "auto", dtype=None, keep_fp8=None):
    """(checkpoint, model, tokenizer) of a checkpoint or run directory (resolve_model_dir), the
    model on `device` ("auto": a GPU when there is one), in the checkpoint's dtype unless given;
    keep_fp8: from_pretrained's module swap that keeps FP8 weights FP8."""
    from .hf import from_pretrained
    target = resolve_device(device)  # a bad device fails before the weights are read
    src = resolve_model_dir(path)
    tokenizer = tokenizer_for(src)
    return src, from_pretrained(src, dtype=dtype, device=target, keep_fp8=keep_fp8), tokenizer
