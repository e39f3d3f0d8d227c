"""HF checkpoints in and out: safetensors in the DeepSeek-V2 / V3 layout, BF16 or FP8.

Layout. nanoseek's module names are the checkpoints' names, so most tensors keep their key
(`model.layers.{i}.self_attn.kv_b_proj.weight`, `model.layers.{i}.mlp.gate.weight`, ...).
The differences are few and all of them sit in one table, `HF_TO_NANOSEEK`:

1. Routed experts. The checkpoints hold one key per expert and projection,
   `model.layers.{i}.mlp.experts.{e}.gate_proj.weight` [F, D] (`up_proj` [F, D],
   `down_proj` [D, F]); nanoseek stacks them, `model.layers.{i}.mlp.experts.gate_proj`
   [E, F, D], for grouped GEMMs. transformers 5 stacks them too in memory, with gate and up
   fused: `experts.gate_up_proj` [E, 2F, D] (the F gate rows first) and `experts.down_proj`
   [E, D, F]. It converts back to per-expert keys when it saves, but a file written in its
   in-memory layout loads as well.
2. Multi-Token Prediction. V3's MTP module k (from 0) is `model.layers.{L + k}`, L =
   num_hidden_layers, in the checkpoints and in nanoseek alike: a decoder layer plus `enorm`,
   `hnorm`, `eh_proj` and `shared_head.norm`. The official checkpoint also stores, inside each
   MTP layer, copies of the embedding and output head that it shares with the main model:
   `model.layers.{L + k}.embed_tokens.weight`, `model.layers.{L + k}.shared_head.head.weight`.
   save_pretrained writes the copies; from_pretrained ignores them, and their absence. A
   checkpoint with no MTP layer at all (transformers writes none) loads without MTP.
3. With tied embeddings there is no `lm_head.weight`.
Derived tensors are never stored (rotary `inv_freq`, the router's `load` counters); the
router's `e_score_correction_bias` is, in float32 like the router weight.

Config. config.json is `ModelConfig.to_dict()` (HF field names, both RoPE spellings) with
`head_dim` = qk_rope_head_dim, which transformers sizes its rotary tables by, `dtype`, and,
for a dense model, `n_routed_experts: 0` so that it reads back dense.

FP8. The official V3 / R1 weights keep most 2-D weights as float8_e4m3fn (largest finite
value 448) with one float32 scale per 128x128 block beside them: `<name>_scale_inv`, e.g.
`model.layers.0.self_attn.q_a_proj.weight_scale_inv`, of shape [ceil(out/128),
ceil(in/128)]; blocks at the bottom and right edges are partial. scale_inv = amax/448 is the
inverse of the scale the quantiser multiplied the block by, so w ≈ w_fp8 · scale_inv, which is
how from_pretrained dequantises. The block size comes from config.json's
`quantization_config.weight_block_size`. save_pretrained(dtype=torch.float8_e4m3fn) writes
this layout: the weights the official checkpoints quantize (`stored_in_fp8`) in FP8 with
their scales, the rest in BF16 (the routers in float32).

Safety. Only safetensors files are read, never pickles: a stray `pytorch_model.bin` is
ignored. Loading checks every key and shape against config.json before it reads a tensor.
Saving writes into a temporary directory beside the target and renames it into place.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .fp8.quant import FP8_DTYPE, WEIGHT_BLOCK, Quantized, dequantize, quantize
from .model.moe import Router
from .model.rope import RotaryEmbedding
from .model.transformer import Transformer


class CheckpointError(ValueError):
    """A checkpoint does not match its config.json, or is not a checkpoint. Names the key/file."""


# Checkpoint key (HF layout) -> nanoseek state_dict key. `{}` stands for a layer or expert
# number, filled in order. Keys not listed are the same on both sides.
#   "name[{}]": one row of a stacked [E, ...] tensor       ("a", "b"): halves of a fused tensor
#   None: not loaded (derived, or a copy of a tensor nanoseek shares)
HF_TO_NANOSEEK: dict[str, str | tuple[str, ...] | None] = {
    # routed experts: one key per expert in the checkpoints, stacked [E, F, D] / [E, D, F] here
    "model.layers.{}.mlp.experts.{}.gate_proj.weight": "model.layers.{}.mlp.experts.gate_proj[{}]",
    "model.layers.{}.mlp.experts.{}.up_proj.weight": "model.layers.{}.mlp.experts.up_proj[{}]",
    "model.layers.{}.mlp.experts.{}.down_proj.weight": "model.layers.{}.mlp.experts.down_proj[{}]",
    # transformers 5 in memory: gate and up fused as [E, 2F, D]; down_proj [E, D, F] as here
    "model.layers.{}.mlp.experts.gate_up_proj": ("model.layers.{}.mlp.experts.gate_proj",
                                                 "model.layers.{}.mlp.experts.up_proj"),
    "model.layers.{}.mlp.experts.down_proj": "model.layers.{}.mlp.experts.down_proj",
    # each V3 MTP layer stores copies of the shared embedding and output head (MTP_SHARED_COPIES)
    "model.layers.{}.embed_tokens.weight": None,
    "model.layers.{}.shared_head.head.weight": None,
    # derived from the config, never loaded
    "model.rotary_emb.inv_freq": None,
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,
}

# what save_pretrained writes into MTP layer L+k: key suffix -> the shared nanoseek tensor
MTP_SHARED_COPIES = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "shared_head.head.weight": "lm_head.weight",
}

# stacked nanoseek tensor -> its per-expert checkpoint key, from the table above
_PER_EXPERT_KEY = {v.removesuffix("[{}]"): k for k, v in HF_TO_NANOSEEK.items()
                   if isinstance(v, str) and v.endswith("[{}]")}

SCALE_SUFFIX = "_scale_inv"
FP8_BLOCK = WEIGHT_BLOCK
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# config.json keys of a loaded checkpoint that no longer describe what we write
_STALE_CONFIG_KEYS = ("quantization_config", "torch_dtype", "auto_map", "moe_impl")

_NUMBER = re.compile(r"(?<=\.)\d+(?=\.|$)")


def _abstract(key: str) -> tuple[str, list[int]]:
    """'model.layers.3.mlp.experts.7.up_proj.weight'
    -> ('model.layers.{}.mlp.experts.{}.up_proj.weight', [3, 7])"""
    return _NUMBER.sub("{}", key), [int(n) for n in _NUMBER.findall(key)]


def float32_params(model: Transformer) -> set[str]:
    """The router's weight and bias stay float32 whatever the dtype, as in DeepSeek's code."""
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, Router):
            names |= {f"{prefix}.weight", f"{prefix}.e_score_correction_bias"}
    return names


# ============================================================================ FP8 blocks
def quantize_fp8_blockwise(w: torch.Tensor, block: tuple[int, int] = FP8_BLOCK):
    """w [..., out, in] -> float8_e4m3fn [..., out, in], float32 scale_inv [..., ⌈out/b⌉, ⌈in/b⌉].

    One scale per block: scale_inv = amax(|block|) / 448, so that each block's largest value
    lands on the largest float8 value (fp8/quant.py, which FP8 training shares).
    """
    q = quantize(w, block)
    return q.data, q.scale


def dequantize_fp8_blockwise(w_fp8: torch.Tensor, scale_inv: torch.Tensor,
                             block: tuple[int, int] = FP8_BLOCK) -> torch.Tensor:
    """w = w_fp8 · scale_inv, each scale spread over its block (edge blocks cut). float32."""
    return dequantize(Quantized(w_fp8, scale_inv.float(), block))


# ============================================================================ save
def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """nanoseek tensors under their checkpoint keys (views, no copies), in layer order."""
    c = model.config
    state = model.state_dict()
    out = {}
    for name, t in state.items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        abstract, nums = _abstract(name)
        if abstract in _PER_EXPERT_KEY:
            for e in range(t.shape[0]):
                out[_PER_EXPERT_KEY[abstract].format(*nums, e)] = t[e]
        else:
            out[name] = t
    for k in range(c.num_nextn_predict_layers):
        for suffix, shared in MTP_SHARED_COPIES.items():
            out[f"model.layers.{c.num_hidden_layers + k}.{suffix}"] = state[shared]
    return out


def hf_config_dict(model: Transformer, dtype: torch.dtype) -> dict:
    """config.json: ModelConfig.to_dict() plus what transformers needs to build the same model."""
    c = model.config
    d = c.to_dict()
    for key in _STALE_CONFIG_KEYS:
        d.pop(key, None)
    d["dtype"] = str(dtype).removeprefix("torch.")
    if dtype == FP8_DTYPE:  # as the official V3 config.json says it
        d["dtype"] = "bfloat16"
        d["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                    "weight_block_size": list(FP8_BLOCK)}
    return d


def stored_in_fp8(key: str, t: torch.Tensor) -> bool:
    """What the official V3 / R1 checkpoints keep in FP8: the 2-D weights of linear layers,
    not the embedding, the output heads or the routers (`mlp.gate`)."""
    return (t.dim() == 2 and key.endswith(".weight") and ".mlp.gate." not in key
            and "embed_tokens" not in key and "head" not in key)


def quantize_fp8_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors with those stored_in_fp8 quantized in 128x128 blocks, each followed by its
    `_scale_inv`."""
    out = {}
    for key, t in tensors.items():
        if stored_in_fp8(key, t):
            out[key], out[key + SCALE_SUFFIX] = quantize_fp8_blockwise(t.detach())
        else:
            out[key] = t
    return out


def save_pretrained(model: Transformer, path: str | Path, max_shard_bytes: int = 5 * 2**30,
                    dtype: torch.dtype | None = None) -> None:
    """Write config.json and the weights in the HF DeepSeek layout, atomically.

    One `model.safetensors`, or shards `model-00001-of-0000N.safetensors` plus
    `model.safetensors.index.json` beyond max_shard_bytes. `dtype` casts floating tensors
    except the router's; torch.float8_e4m3fn writes the official FP8 layout (module docstring).
    An existing directory at `path` is replaced as a whole, keeping
    the files of it that a save does not write (a tokenizer, a README) but no old weights.
    """
    if not isinstance(model, Transformer):  # a wrapped transformers model (train/hf_student.py)
        return model.save_pretrained(path)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory; not replacing it")
    dtype = dtype or model.model.embed_tokens.weight.dtype
    fp32 = float32_params(model)
    tensors = to_hf_state_dict(model)
    fp8 = dtype == FP8_DTYPE
    if fp8:
        tensors = quantize_fp8_tensors(tensors)

    def stored_dtype(key: str, t: torch.Tensor) -> torch.dtype:
        if key in fp32 or (fp8 and key.endswith(SCALE_SUFFIX)):
            return torch.float32
        if t.dtype == FP8_DTYPE or not t.is_floating_point():
            return t.dtype
        return torch.bfloat16 if fp8 else dtype

    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for key, t in tensors.items():
        nbytes = t.numel() * stored_dtype(key, t).itemsize
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(key)
        shard_bytes += nbytes
    n = len(shards)
    names = ([SINGLE_FILE] if n == 1 else
             [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)])

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a checkpoint is not
    try:
        weight_map, total = {}, 0
        for name, keys in zip(names, shards):
            # copies: contiguous, on the CPU, and sharing no storage (MTP copies, expert rows)
            shard = {k: tensors[k].detach().to("cpu", stored_dtype(k, tensors[k]), copy=True,
                                                memory_format=torch.contiguous_format)
                     for k in keys}
            save_file(shard, tmp / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(keys, name))
            total += sum(t.numel() * t.element_size() for t in shard.values())
            del shard
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(model, dtype), indent=2) + "\n")
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        _keep_other_files(path, tmp)
        _fsync_tree(tmp)
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _keep_other_files(old: Path, new: Path) -> None:
    """Copy into `new` the files of an existing checkpoint dir that this save does not write,
    except old weights and their index."""
    if not old.is_dir():
        return
    for f in old.iterdir():
        stale = f.suffix == ".safetensors" or f.name == INDEX_FILE
        if f.is_file() and not stale and not (new / f.name).exists():
            shutil.copy2(f, new / f.name)


def _fsync_tree(directory: Path) -> None:
    for f in directory.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished tmp directory to path. An existing path is moved aside first and
    deleted after, so at every moment one complete checkpoint exists on disk."""
    if not path.exists():
        os.rename(tmp, path)
        return
    old = tmp.with_name(tmp.name + ".old")
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old)


# ============================================================================ load
def from_pretrained(path: str | Path, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, strict: bool = True,
                    keep_fp8=None) -> Transformer:
    """Build the model of `path/config.json` and load its safetensors (HF V2/V3 layout, BF16/FP8).

    dtype: of the floating weights (the router's stay float32); None: the dtype config.json
    records (`dtype` / `torch_dtype`; bfloat16 for FP8 weights), else float32.
    strict=False lets keys be missing (they keep a fresh init) or unexpected (ignored);
    a wrong shape is an error either way. Returns the model in eval mode.
    keep_fp8: a module swap `keep_fp8(model, names, block)` applied to the model before its
    weights are allocated, given the state-dict names the checkpoint stores in FP8 (e.g.
    infer.fp8_weights.keep_fp8_weights); a weight the swapped model holds as float8 is
    loaded as stored, its block scales into `<name>_scale_inv` beside it. Without it every
    FP8 weight is dequantised into dtype.
    """
    path = Path(path)
    config = ModelConfig.from_json(path)
    with ExitStack() as stack:
        ckpt = WeightFiles.open(path, stack)
        L, n_mtp = config.num_hidden_layers, config.num_nextn_predict_layers
        if n_mtp and not any(ckpt.has_layer(L + k) for k in range(n_mtp)):
            if config.extra.get("model_type") != "deepseek_v2":  # V2 configs leave it at 1
                warnings.warn(f"{path}: config.json has {n_mtp} MTP layer(s) but the weights have "
                              "none; loading the model without MTP", stacklevel=2)
            config = config.replace(num_nextn_predict_layers=0)
        quant = config.extra.pop("quantization_config", None) or {}  # the model we return is not
        block = tuple(quant.get("weight_block_size", FP8_BLOCK))
        dtype = dtype or _recorded_dtype(config)

        with torch.device("meta"):
            model = Transformer(config)
        _cast(model, dtype)
        if keep_fp8 is not None:
            keep_fp8(model, fp8_names(ckpt, config), block)
        plan, missing, unexpected = plan_load(ckpt, model, block)
        if strict and (missing or unexpected):
            raise CheckpointError(f"{path} does not match its config.json: {key_mismatch(missing, unexpected)}")

        model = _materialize(model, torch.device(device or "cpu"))
        if missing:
            model.reset_parameters()
        targets = model.state_dict(keep_vars=True)
        with torch.no_grad():
            for key, pieces in plan.items():  # file by file
                as_stored = targets[pieces[0].name].dtype in FP8_DTYPES
                t = ckpt.stored(key) if as_stored else ckpt.tensor(key, block)
                for p in pieces:
                    if as_stored and p.part is not None:
                        raise CheckpointError(f"{key}: FP8 weights are kept per tensor, not as parts of a fused one")
                    src = t if p.part is None else t.chunk(p.n_parts, dim=-2)[p.part]
                    _target(targets, p.name, p.expert).copy_(src)
                    if as_stored:
                        _target(targets, p.name + SCALE_SUFFIX, p.expert).copy_(ckpt.stored(key + SCALE_SUFFIX))
    return model.eval()


def _target(targets: dict[str, torch.Tensor], name: str, expert: int | None) -> torch.Tensor:
    return targets[name] if expert is None else targets[name][expert]


def fp8_names(ckpt: "WeightFiles", config: ModelConfig) -> set[str]:
    """The nanoseek state-dict names whose checkpoint tensors are FP8 with block scales (a
    stacked expert tensor when its experts' are)."""
    return {p.name for key in ckpt.where if key + SCALE_SUFFIX in ckpt for p in _route(key, config)}


# ------------------------------------------------------------------ the loading API
# WeightFiles, plan_load, key_mismatch and float32_params are what train/checkpoint.py's
# exact-resume loader shares with from_pretrained: one routing of HF keys onto the model.
class WeightFiles:
    """The safetensors files of a checkpoint directory, opened (headers only until read)."""

    def __init__(self, handles: dict):
        self.handles = handles  # file -> safe_open handle
        self.where = {k: f for f, h in handles.items() for k in h.keys()}  # key -> file

    @classmethod
    def open(cls, path: Path, stack: ExitStack) -> "WeightFiles":
        index = path / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a safetensors index ({e})") from None
            files = [path / f for f in dict.fromkeys(weight_map.values())]
        elif (path / SINGLE_FILE).exists():
            files = [path / SINGLE_FILE]
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors weights in {path} (pickled .bin/.pt files are "
                                  "never loaded; convert them to safetensors first)")
        handles = {}
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{f.name} is listed in {INDEX_FILE} but missing from {path}")
            try:
                handles[f] = stack.enter_context(safe_open(str(f), framework="pt"))
            except Exception as e:  # safetensors raises several types for a bad header
                raise CheckpointError(f"{f} is not a valid safetensors file: {e}") from None
        return cls(handles)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def has_layer(self, i: int) -> bool:
        return any(k.startswith(f"model.layers.{i}.") for k in self.where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.handles[self.where[key]].get_slice(key).get_shape())

    def is_fp8(self, key: str) -> bool:
        return self.handles[self.where[key]].get_slice(key).get_dtype().startswith("F8")

    def stored(self, key: str) -> torch.Tensor:
        """The tensor at key as the file stores it."""
        return self.handles[self.where[key]].get_tensor(key)

    def tensor(self, key: str, block: tuple[int, int]) -> torch.Tensor:
        """The tensor at key, dequantised if it has an FP8 scale beside it."""
        t = self.stored(key)
        scale_key = key + SCALE_SUFFIX
        if scale_key in self:
            t = dequantize_fp8_blockwise(t, self.stored(scale_key), block)
        return t


def _recorded_dtype(config: ModelConfig) -> torch.dtype:
    name = str(config.extra.get("dtype") or config.extra.get("torch_dtype") or "float32")
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        return torch.float32
    return torch.bfloat16 if dtype.itemsize == 1 else dtype


def plan_load(ckpt: WeightFiles, model: Transformer, block: tuple[int, int]):
    """Route every checkpoint key and check its shape against the (meta) model, before any
    tensor is read. Returns {key: pieces} in file order, the missing and the unexpected keys."""
    config = model.config
    shapes = {k: t.shape for k, t in model.state_dict().items()}
    plan: dict[str, list[_Piece]] = {}
    covered: dict[str, set[int | None]] = {}
    unexpected = []
    for key in ckpt.where:
        if key.endswith(SCALE_SUFFIX) and key.removesuffix(SCALE_SUFFIX) in ckpt:
            continue  # read with its weight
        pieces = _route(key, config)
        if not pieces:
            continue
        if any(p.name not in shapes or (p.expert or 0) >= shapes[p.name][0] for p in pieces):
            unexpected.append(key)
            continue
        found = ckpt.shape(key)
        for p in pieces:
            want = _expected_shape(p, shapes)
            if found != want:
                raise CheckpointError(f"{key}: shape {list(found)} in {ckpt.where[key].name}, but "
                                      f"config.json implies {list(want)}")
            covered.setdefault(p.name, set()).add(p.expert)
        scale_key = key + SCALE_SUFFIX
        if scale_key in ckpt:
            want = (*found[:-2], *(math.ceil(n / b) for n, b in zip(found[-2:], block)))
            if ckpt.shape(scale_key) != want:
                raise CheckpointError(f"{scale_key}: shape {list(ckpt.shape(scale_key))}, but "
                                      f"{block[0]}x{block[1]} blocks of {key} need {list(want)}")
        elif ckpt.is_fp8(key):
            raise CheckpointError(f"{key} is stored in FP8 but {scale_key} is missing")
        plan[key] = pieces

    missing = []
    for name, shape in shapes.items():
        if name.endswith(SCALE_SUFFIX) and name.removesuffix(SCALE_SUFFIX) in shapes:
            continue  # an FP8 weight's block scales: read with the weight
        got = covered.get(name, set())
        if None in got or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        abstract, nums = _abstract(name)
        if abstract in _PER_EXPERT_KEY:  # name the absent experts' checkpoint keys
            missing += [_PER_EXPERT_KEY[abstract].format(*nums, e)
                        for e in range(shape[0]) if e not in got]
        else:
            missing.append(name)
    return plan, missing, unexpected


@dataclass(frozen=True)
class _Piece:
    """Where (part of) one checkpoint tensor goes."""
    name: str                  # nanoseek state_dict key
    expert: int | None = None  # a row of a stacked [E, ...] tensor; None: the whole tensor
    part: int | None = None    # this part of a fused tensor, split along dim -2
    n_parts: int = 1


def _route(key: str, config: ModelConfig) -> list[_Piece]:
    """Where a checkpoint key goes in nanoseek; [] to ignore it."""
    abstract, nums = _abstract(key)
    if key == "lm_head.weight" and config.tie_word_embeddings:
        return []  # the embedding stands in for it
    if abstract not in HF_TO_NANOSEEK:
        return [_Piece(key)]
    target = HF_TO_NANOSEEK[abstract]
    if target is None:
        return []
    if isinstance(target, tuple):
        return [_Piece(t.format(*nums), part=i, n_parts=len(target)) for i, t in enumerate(target)]
    name = target.format(*nums)
    if name.endswith("]"):
        name, expert = name[:-1].split("[")
        return [_Piece(name, expert=int(expert))]
    return [_Piece(name)]


def _expected_shape(piece: _Piece, shapes: dict[str, torch.Size]) -> tuple[int, ...]:
    shape = list(shapes[piece.name])
    if piece.expert is not None:
        shape = shape[1:]
    if piece.n_parts > 1:
        shape[-2] *= piece.n_parts
    return tuple(shape)


def some_keys(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def key_mismatch(missing: list[str], unexpected: list[str]) -> str:
    """'missing key(s) a, b; unexpected key(s) c' for an error message."""
    return "; ".join(([f"missing key(s) {some_keys(missing)}"] if missing else [])
                     + ([f"unexpected key(s) {some_keys(unexpected)}"] if unexpected else []))


def to_dtype(model: Transformer, dtype: torch.dtype) -> Transformer:
    """The model in dtype as from_pretrained(dtype=) gives it, in place: floating weights in
    dtype, the routers in float32, the RoPE frequencies recomputed in float32 (a cast would
    round them)."""
    routers = [m for m in model.modules() if isinstance(m, Router)]
    kept = [{k: v.clone() for k, v in r.state_dict().items()} for r in routers]  # before any rounding
    _cast(model, dtype)
    for router, state in zip(routers, kept):
        router.load_state_dict(state)
    _rebuild_rope(model, model.model.embed_tokens.weight.device)
    return model


def _cast(model: Transformer, dtype: torch.dtype) -> None:
    model.to(dtype)
    for module in model.modules():
        if isinstance(module, Router):
            module.float()


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _rebuild_rope(model: Transformer, device: torch.device) -> set[str]:
    """The RoPE frequencies recomputed from the config; returns their buffer names."""
    rebuilt = set()
    for prefix, module in model.named_modules():
        if isinstance(module, RotaryEmbedding):
            module.inv_freq = RotaryEmbedding(model.config, module.dim).inv_freq.to(device)
            rebuilt.add(f"{prefix}.inv_freq")
    return rebuilt


def _materialize(model: Transformer, device: torch.device) -> Transformer:
    """Allocate the meta model on `device` in the dtypes it holds, derived buffers recomputed
    (to_empty leaves memory uninitialised), embeddings re-tied."""
    model.to_empty(device=device)
    rebuilt = _rebuild_rope(model, device)
    for prefix, module in model.named_modules():
        if isinstance(module, Router):
            module.load.zero_()
            rebuilt.add(f"{prefix}.load")
    for prefix, module in model.named_modules():
        for name in module._non_persistent_buffers_set:
            if f"{prefix}.{name}" not in rebuilt:
                raise NotImplementedError(f"hf.py does not know how to rebuild the derived buffer "
                                          f"{prefix}.{name}; add it to _materialize")
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model
