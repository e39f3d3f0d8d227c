"""Training checkpoints: everything a run needs to continue bit for bit, written atomically.

A checkpoint is a directory `run_dir/checkpoints/step_{step:08d}/`:

    config.json, model.safetensors   the model in the HF layout (`hf.save_pretrained`), the
                                     router's e_score_correction_bias included (float32)
    optimizer.safetensors            every optimizer state tensor, `{param name}.{state key}`
                                     (`model.layers.0.mlp.gate.weight.exp_avg`, `....step`)
    optimizer.json                   the rest: class, param groups (hyper-parameters and the
                                     names of their parameters), which state each param has
    trainer_state.json               the caller's `train_state` (step, schedule, loader, config)
    rng.safetensors, rng.json        torch CPU / CUDA generator states; Python and numpy states
    tokenizer.json, tokenizer_config.json   copied from `tokenizer_dir`, when given

Parameters are matched by their names in `model.named_parameters()`, not by position, so a
checkpoint loads into an optimizer whose groups list the same parameters in another order.
Nothing is pickled.

Atomicity. A save writes into `checkpoints/.tmp-step_…-<host>-<pid>-…`, fsyncs every file and
the directory, and renames it to `step_…` in one `rename`; only then is `checkpoints/latest`
(a text file naming the step directory) replaced by write-temp-fsync-`os.replace`, and only
after that are checkpoints beyond `keep_last` deleted (renamed to a `.tmp-` name first, so a
half-deleted one never looks complete). A process killed at any point leaves `latest` naming
a complete checkpoint and at worst a `.tmp-*` directory, which the next save removes (a load
removes the ones whose writer is a dead process on this host; a live writer's are left).
One process writes a run's checkpoints (rank 0); loads may run beside it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import tempfile
import warnings
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import ConfigError, ModelConfig
from ..hf import (FP8_BLOCK, CheckpointError, WeightFiles, float32_params, key_mismatch, plan_load,
                  save_pretrained, some_keys)
from ..loading import (CHECKPOINTS, LATEST, TRAINER_STATE, checkpoint_root, latest_checkpoint,  # noqa: F401
                       step_dir_name, step_dirs)
from ..model.moe import Router

TMP_PREFIX = ".tmp-"
OPTIMIZER_TENSORS, OPTIMIZER_JSON = "optimizer.safetensors", "optimizer.json"
RNG_TENSORS, RNG_JSON = "rng.safetensors", "rng.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
OPTIMIZER_FORMAT = "nanoseek-optimizer/1"

_TMP_OWNER = re.compile(r"^\.tmp-.*?-host=(?P<host>[^-]*)-pid=(?P<pid>\d+)-")
# optimizer.json: a param-group value stored as a tensor in optimizer.safetensors (e.g. lr)
_GROUP_TENSOR = "__tensor__"


# ============================================================================ paths
def _tmp_name(what: str) -> str:
    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())
    return f"{TMP_PREFIX}{what}-host={host}-pid={os.getpid()}-"


def _writer_alive(name: str) -> bool:
    """Whether the process that made this .tmp- entry may still be writing it."""
    m = _TMP_OWNER.match(name)
    if not m:
        return False
    if m["host"] != re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()):
        return True  # another host's process: we cannot tell, leave it
    pid = int(m["pid"])
    if pid == os.getpid():
        return False  # ours, and nothing of ours is in flight when this runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_tmp(run_dir: str | Path, only_dead_writers: bool = False) -> list[Path]:
    """Delete what a killed save left under run_dir/checkpoints (`.tmp-*`). Returns them.
    only_dead_writers: keep the ones a live process on this host (or another host) may own."""
    root = checkpoint_root(Path(run_dir))
    removed = []
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        if not p.name.startswith(TMP_PREFIX):
            continue
        if only_dead_writers and _writer_alive(p.name):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


# ============================================================================ save
def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    train_state: dict, tokenizer_dir: str | Path | None = None,
                    keep_last: int | None = 3) -> Path:
    """Write `run_dir/checkpoints/step_{step:08d}/` atomically, point `latest` at it and
    keep the `keep_last` newest checkpoints (None or 0: keep all). Returns its path.

    `model` is the plain Transformer (not a compiled or wrapped one); `train_state` must be
    JSON-serialisable (TypeError before anything is written otherwise).
    """
    _check_one_dtype(model)
    opt_tensors, opt_json = (_optimizer_to_flat(optimizer, model) if optimizer is not None
                             else (None, None))

    def write_model(tmp: Path) -> None:
        # hf.save_pretrained writes atomically into a directory of its own; let it do so inside
        # tmp, then lift its files up (renames within one directory tree).
        save_pretrained(model, tmp / "model")
        for f in (tmp / "model").iterdir():
            os.rename(f, tmp / f.name)
        os.rmdir(tmp / "model")
        if optimizer is not None:
            _save_optimizer(tmp, opt_tensors, opt_json)

    return write_checkpoint(run_dir, step, write_model, train_state, tokenizer_dir, keep_last)


def write_checkpoint(run_dir: str | Path, step: int, write_files, train_state: dict,
                     tokenizer_dir: str | Path | None = None, keep_last: int | None = 3) -> Path:
    """The atomic frame of every save: `write_files(tmp)` fills a fresh temporary directory
    with the model (and optimizer) files, then the train state, RNG states and tokenizer join
    them, everything is fsynced, renamed into place, `latest` points at it and old ones go."""
    root = checkpoint_root(Path(run_dir))
    root.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    final = root / name
    try:
        state_text = json.dumps(train_state, indent=2, allow_nan=True) + "\n"
    except (TypeError, ValueError) as e:
        raise TypeError(f"train_state is not JSON-serialisable: {e}") from None
    tok_files = _tokenizer_files(tokenizer_dir) if tokenizer_dir is not None else []

    clean_stale_tmp(run_dir)  # we are the run's only writer
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_name(name), dir=root))
    try:
        _chmod_like_umask(tmp, 0o777)
        write_files(tmp)
        _write_text(tmp / TRAINER_STATE, state_text)
        _save_rng(tmp)
        for f in tok_files:
            shutil.copyfile(f, tmp / f.name)
            _chmod_like_umask(tmp / f.name, 0o666)
        _fsync_dir_tree(tmp)
        _rename_into_place(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _point_latest(root, name)
    if keep_last:
        _prune(root, keep_last, keep={name})
    return final


def _check_one_dtype(model: nn.Module) -> None:
    """hf.save_pretrained stores every floating tensor but the router's in one dtype; refuse a
    model it would silently round (e.g. float32 weights beside a bfloat16 embedding)."""
    fp32 = float32_params(model)
    dtypes = {t.dtype for k, t in model.state_dict().items() if t.is_floating_point() and k not in fp32}
    if len(dtypes) > 1:
        raise ValueError(f"the model mixes floating dtypes {sorted(map(str, dtypes))}; a checkpoint "
                         "would round them to one. Cast the model to one dtype first")


def _save_optimizer(directory: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    save_file(tensors, directory / OPTIMIZER_TENSORS, metadata={"format": OPTIMIZER_FORMAT})
    _write_text(directory / OPTIMIZER_JSON, json.dumps(meta, indent=2) + "\n")


def _optimizer_to_flat(optimizer: torch.optim.Optimizer, model: nn.Module):
    """optimizer.state_dict() -> ({'{param}.{key}': tensor}, json-able structure), by name."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    groups, state = [], {}
    for gi, group in enumerate(optimizer.param_groups):
        entry: dict = {}
        for key, value in group.items():
            if key == "params":
                continue
            if isinstance(value, torch.Tensor):
                tkey = f"param_groups.{gi}.{key}"
                tensors[tkey] = _cpu_copy(value)
                entry[key] = {_GROUP_TENSOR: tkey}
            else:
                entry[key] = _jsonable(value, f"optimizer.param_groups[{gi}][{key!r}]")
        params = []
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError(f"optimizer param group {gi} holds a parameter of shape "
                                 f"{list(p.shape)} that is not in model.named_parameters()")
            name = names[id(p)]
            params.append(name)
            s = optimizer.state.get(p)
            if not s:
                continue
            record = {"tensors": [], "values": {}}
            for key, value in s.items():
                if "." in key:
                    raise ValueError(f"optimizer state key {key!r} contains a dot")
                if isinstance(value, torch.Tensor):
                    tensors[f"{name}.{key}"] = _cpu_copy(value)
                    record["tensors"].append(key)
                else:
                    record["values"][key] = _jsonable(value, f"optimizer state {name}.{key}")
            state[name] = record
        entry["params"] = params
        groups.append(entry)
    meta = {"format": OPTIMIZER_FORMAT, "class": type(optimizer).__name__,
            "param_groups": groups, "state": state}
    return tensors, meta


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)


def _jsonable(value, where: str):
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        raise TypeError(f"{where} = {value!r} cannot be stored in JSON") from None
    return value


def _save_rng(directory: Path) -> None:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    save_file(tensors, directory / RNG_TENSORS)
    version, internal, gauss = random.getstate()
    meta = {"python_random": [version, list(internal), gauss]}
    try:
        import numpy as np
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        meta["numpy_random"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    _write_text(directory / RNG_JSON, json.dumps(meta) + "\n")


def _tokenizer_files(tokenizer_dir: str | Path) -> list[Path]:
    d = Path(tokenizer_dir)
    files = [d / f for f in TOKENIZER_FILES if (d / f).is_file()]
    if not (d / "tokenizer.json").is_file():
        raise FileNotFoundError(f"tokenizer_dir {d} has no tokenizer.json")
    return files


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _chmod_like_umask(path: Path, mode: int) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir_tree(directory: Path) -> None:
    for f in directory.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        elif f.is_dir():
            _fsync_dir_tree(f)
    _fsync_dir(directory)


def _rename_into_place(tmp: Path, final: Path) -> None:
    """One rename. A checkpoint already at `final` (the same step saved again) is moved aside
    first and deleted after; `latest_checkpoint` falls back to the newest complete one if a kill
    lands between the two renames."""
    if not final.exists():
        os.rename(tmp, final)
        return
    aside = final.parent / (_tmp_name("replaced-" + final.name) + "old")
    os.rename(final, aside)
    os.rename(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)


def _point_latest(root: Path, name: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=_tmp_name(LATEST), dir=root)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        _chmod_like_umask(Path(tmp), 0o666)
        os.replace(tmp, root / LATEST)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(root)


def _prune(root: Path, keep_last: int, keep: set[str]) -> None:
    """Delete all but the keep_last highest steps (never those in `keep`, nor what latest names).
    Each is renamed to a .tmp- name first: a kill mid-delete leaves only stale tmp behind."""
    latest = (root / LATEST).read_text().strip() if (root / LATEST).exists() else ""
    dirs = step_dirs(root)
    for _, p in dirs[:max(len(dirs) - keep_last, 0)]:
        if p.name in keep or p.name == latest:
            continue
        doomed = root / (_tmp_name("delete-" + p.name) + "old")
        os.rename(p, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


# ============================================================================ load
def load_checkpoint(run_dir_or_ckpt_dir: str | Path, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None,
                    map_location: torch.device | str | None = None, restore_rng: bool = True,
                    stage: str | None = None) -> dict:
    """Load a checkpoint into `model` (in place: parameters keep their identity, so an
    optimizer built on them stays valid), `optimizer` and the RNGs; return the train_state.

    run_dir_or_ckpt_dir: a run directory (its latest checkpoint), its `checkpoints/`, or one
    checkpoint directory. `map_location`: where tensors are read to before they are copied to
    the model's / optimizer's own devices (default CPU). Everything is read and checked before
    the model, optimizer or RNGs are touched, so a bad checkpoint changes nothing.
    Raises CheckpointError naming the file for a missing or corrupt checkpoint, or, given
    `stage`, for a checkpoint of another kind of run (train_state["stage"]).
    """
    ckpt = resolve_checkpoint(run_dir_or_ckpt_dir)
    clean_stale_tmp(ckpt.parent.parent, only_dead_writers=True)
    device = torch.device(map_location) if map_location is not None else torch.device("cpu")

    train_state = _read_json(ckpt / TRAINER_STATE)
    if not isinstance(train_state, dict):
        raise CheckpointError(f"{ckpt / TRAINER_STATE} must hold a JSON object")
    if stage is not None and train_state.get("stage") != stage:
        raise CheckpointError(f"{ckpt.parent.parent} holds a {train_state.get('stage')!r} run, "
                              f"not a {stage!r} run")
    opt_state = _load_optimizer(ckpt, optimizer, model, device) if optimizer is not None else None
    rng = _load_rng(ckpt) if restore_rng else None
    _check_config(ckpt, model)

    if hasattr(model, "load_pretrained_weights"):  # a wrapped transformers model (train/hf_student.py)
        model.load_pretrained_weights(ckpt)
    else:
        with ExitStack() as stack:
            weights = WeightFiles.open(ckpt, stack)
            plan, missing, unexpected = plan_load(weights, model, FP8_BLOCK)
            if missing or unexpected:
                raise CheckpointError(f"{ckpt / 'model.safetensors'} does not match the model: "
                                      f"{key_mismatch(missing, unexpected)}")
            loaded = {}
            for key in plan:
                try:
                    loaded[key] = weights.tensor(key, FP8_BLOCK).to(device)
                except Exception as e:
                    raise CheckpointError(f"{weights.where[key]}: cannot read {key}: {e}") from None
            targets = model.state_dict(keep_vars=True)
            with torch.no_grad():
                for key, pieces in plan.items():
                    t = loaded[key]
                    for p in pieces:
                        src = t if p.part is None else t.chunk(p.n_parts, dim=-2)[p.part]
                        dst = targets[p.name] if p.expert is None else targets[p.name][p.expert]
                        dst.copy_(src)
    # counters of a step in flight are not part of a checkpoint (saved between steps)
    for module in model.modules():
        if isinstance(module, Router):
            module.load.zero_()

    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    if rng is not None:
        _set_rng(rng)
    return train_state


def resolve_checkpoint(path: str | Path) -> Path:
    """A run dir, its checkpoints/ dir or a checkpoint dir -> the checkpoint dir."""
    path = Path(path)
    if (path / TRAINER_STATE).exists():
        ckpt = path
    elif (path / CHECKPOINTS).is_dir():
        ckpt = latest_checkpoint(path)
    elif (path / LATEST).exists() or path.name == CHECKPOINTS:
        ckpt = latest_checkpoint(path.parent)
    elif (path / "config.json").exists():
        ckpt = path  # a model directory: named as incomplete below
    else:
        raise CheckpointError(f"no checkpoint at {path} (expected a run directory with "
                              f"{CHECKPOINTS}/ or a checkpoint directory with {TRAINER_STATE})")
    if ckpt is None:
        raise CheckpointError(f"no complete checkpoint under {path}")
    for f in (TRAINER_STATE, "config.json"):
        if not (ckpt / f).is_file():
            raise CheckpointError(f"{ckpt / f} is missing: not a complete checkpoint")
    return ckpt


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def _read_safetensors(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a bad file
        raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from None


def _check_config(ckpt: Path, model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        return
    try:
        saved = ModelConfig.from_json(ckpt)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    ours, theirs = config.to_dict(), saved.to_dict()
    differ = sorted(k for k in set(ours) | set(theirs)
                    if k not in ("dtype", "torch_dtype") and ours.get(k) != theirs.get(k))
    if differ:
        warnings.warn(f"{ckpt / 'config.json'} differs from the model's config in "
                      + ", ".join(f"{k} ({theirs.get(k)!r} saved, {ours.get(k)!r} now)" for k in differ),
                      stacklevel=3)


def _load_optimizer(ckpt: Path, optimizer: torch.optim.Optimizer, model: nn.Module,
                    device: torch.device) -> dict:
    """optimizer.safetensors + optimizer.json -> a state_dict for `optimizer`, checked."""
    meta_path, tensors_path = ckpt / OPTIMIZER_JSON, ckpt / OPTIMIZER_TENSORS
    meta = _read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != OPTIMIZER_FORMAT:
        raise CheckpointError(f"{meta_path} is not a {OPTIMIZER_FORMAT} file")
    if meta.get("class") != type(optimizer).__name__:
        raise CheckpointError(f"{meta_path} holds {meta.get('class')} state; the optimizer is "
                              f"{type(optimizer).__name__}")
    tensors = _read_safetensors(tensors_path, device)
    names = {id(p): n for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    index: dict[str, int] = {}  # param name -> its position in the optimizer's state_dict
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError("the optimizer holds a parameter that is not in model.named_parameters()")
            index[names[id(p)]] = len(index)

    saved_groups = meta["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise CheckpointError(f"{meta_path}: {len(saved_groups)} param groups saved, the optimizer "
                              f"has {len(optimizer.param_groups)}")
    groups = []
    for gi, (saved, current) in enumerate(zip(saved_groups, optimizer.param_groups)):
        ours = [names[id(p)] for p in current["params"]]
        if set(saved["params"]) != set(ours):
            lost = sorted(set(ours) - set(saved["params"]))
            extra = sorted(set(saved["params"]) - set(ours))
            raise CheckpointError(f"{meta_path}: param group {gi} does not match the optimizer's"
                                  + (f"; not saved: {some_keys(lost)}" if lost else "")
                                  + (f"; saved but not in it: {some_keys(extra)}" if extra else ""))
        group = {}
        for key, value in saved.items():
            if key == "params":
                continue
            if isinstance(value, dict) and _GROUP_TENSOR in value:
                value = _need(tensors, value[_GROUP_TENSOR], tensors_path)
            elif isinstance(value, list) and isinstance(current.get(key), tuple):
                value = tuple(value)
            group[key] = value
        group["params"] = [index[n] for n in ours]
        groups.append(group)

    state = {}
    for name, record in meta["state"].items():
        if name not in index:
            raise CheckpointError(f"{meta_path}: state for {name}, which the optimizer does not hold")
        entry = dict(record.get("values", {}))
        for key in record["tensors"]:
            t = entry[key] = _need(tensors, f"{name}.{key}", tensors_path)
            if t.dim() and t.shape != params[name].shape:
                raise CheckpointError(f"{tensors_path}: {name}.{key} has shape {list(t.shape)}, the "
                                      f"parameter {list(params[name].shape)}")
        if isinstance(entry.get("step"), torch.Tensor):
            # torch keeps `step` on the CPU unless capturable/fused, and moves it itself then
            entry["step"] = entry["step"].cpu()
        state[index[name]] = entry
    return {"state": state, "param_groups": groups}


def _need(tensors: dict, key: str, path: Path) -> torch.Tensor:
    if key not in tensors:
        raise CheckpointError(f"{path} has no tensor {key}")
    return tensors[key]


def restore_rng(ckpt: Path) -> None:
    """Set the random generators to the states a checkpoint saved (a warning if it has none)."""
    rng = _load_rng(ckpt)
    if rng is not None:
        _set_rng(rng)


def _load_rng(ckpt: Path) -> dict | None:
    if not (ckpt / RNG_TENSORS).exists():
        warnings.warn(f"{ckpt} has no {RNG_TENSORS}; random states not restored", stacklevel=3)
        return None
    rng = {"tensors": _read_safetensors(ckpt / RNG_TENSORS, torch.device("cpu"))}
    if "torch_cpu" not in rng["tensors"]:
        raise CheckpointError(f"{ckpt / RNG_TENSORS} has no torch_cpu state")
    rng["json"] = _read_json(ckpt / RNG_JSON) if (ckpt / RNG_JSON).exists() else {}
    return rng


def _set_rng(rng: dict) -> None:
    t = rng["tensors"]
    torch.set_rng_state(t["torch_cpu"])
    cuda = [t[k] for k in sorted((k for k in t if k.startswith("torch_cuda_")),
                                 key=lambda k: int(k.rsplit("_", 1)[1]))]
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(cuda[i], i)
    meta = rng["json"]
    if "python_random" in meta:
        version, internal, gauss = meta["python_random"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy_random" in meta:
        try:
            import numpy as np
        except ImportError:
            return
        kind, keys, pos, has_gauss, cached = meta["numpy_random"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
