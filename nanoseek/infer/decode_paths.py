"""Which captured decode step the engine runs for a model: the fused Triton step (fused.py)
or the compiled model step (cuda_graph.py with torch.compile).

The fused step wins where a step's time is the chain of kernels it launches (a small model,
a batch of one) and can lose where it is the weight reads of wide layers; which one is
faster depends on the model's widths, the batch, the device and the weight dtype, so the
choice is a measurement, not a guess: `decode_paths.json` holds, per model shape, device and
dtype, the largest batch up to which the fused step was faster than the compiled one at
every batch measured in one job (`benchmarks/decode.py --modes fused compiled
--record-paths` writes it). A model, device or dtype without a measurement takes the
compiled step, the path that has not lost anywhere.

An entry may also hold the fused step's launch shapes that measurement ran with (searched by
`benchmarks/fused_decode.py --tune`, given to decode.py by `--fused-tuning`): the engine takes
them over the rule's (fused.fused_step_launch) for that shape and device, as tuned-kernel
tables do; the rule derives every other model's. They were measured at a short cache: past
fused.SHORT_CACHE positions the engine keeps only the weight kernels' shapes and takes the
rule's for the attention (its split, blocks and merge follow the cache's length).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ModelConfig
from ..kernels import fast_kernels_supported

TABLE = Path(__file__).with_name("decode_paths.json")
# what a decode step's kernels see of a model: its widths (the depth only repeats them)
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts",
                "num_experts_per_tok", "n_group", "topk_group")


def decode_shape(config: ModelConfig) -> dict:
    return {name: getattr(config, name) for name in SHAPE_FIELDS}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def measured_fused_rows(config: ModelConfig, dtype: torch.dtype, device: torch.device,
                        table: Path = TABLE) -> int:
    """Batches up to which the engine takes the fused step (measured_fused_step's first)."""
    return measured_fused_step(config, dtype, device, 0, table)[0]


def measured_fused_step(config: ModelConfig, dtype: torch.dtype, device: torch.device, cache_len: int,
                        table: Path = TABLE) -> tuple[int, dict | None]:
    """(Batches up to which the engine takes the fused step, the launch shapes it was measured
    with or None) from the table's entry for this model shape, device and weight dtype, where
    the fused step runs at all (fast_kernels_supported, FusedDecoder.unsupported); else (0,
    None). The launch is whole for caches of cache_len up to SHORT_CACHE, past that its weight
    kernels' part only (fused.ATTENTION_KEYS are left to the rule)."""
    # an FP8 model (its own entries, dtype float8) computes in BF16
    if not fast_kernels_supported(device, torch.bfloat16 if dtype == torch.float8_e4m3fn else dtype):
        return 0, None
    from .fused import ATTENTION_KEYS, SHORT_CACHE, FusedDecoder  # imports Triton, which fast_kernels_supported found
    if FusedDecoder.unsupported(config) is not None:
        return 0, None
    key = dict(device=torch.cuda.get_device_name(device), dtype=dtype_name(dtype), shape=decode_shape(config))
    entry = next((e for e in json.loads(table.read_text())["measured"] if {k: e[k] for k in key} == key), {})
    rows, launch = entry.get("fused_rows", 0), entry.get("fused_launch")
    if not rows or launch is None:
        return rows, None
    return rows, launch if cache_len <= SHORT_CACHE else {k: v for k, v in launch.items() if k not in ATTENTION_KEYS}


def rows_the_fused_step_won(tokens_per_s: dict[int, tuple[float, float]]) -> int:
    """From {batch: (fused tokens/s, compiled tokens/s)} of one job: the largest batch B at
    which the fused step was faster at every measured batch up to B (0: it lost at the
    smallest)."""
    won = 0
    for batch in sorted(tokens_per_s):
        fused, compiled = tokens_per_s[batch]
        if fused <= compiled:
            break
        won = batch
    return won


def record_fused_rows(config: ModelConfig, dtype: torch.dtype, device_name: str, fused_rows: int,
                      result: str, table: Path = TABLE, fused_launch: dict | None = None) -> None:
    """Put a measurement into the table, replacing the one of the same shape, device and dtype;
    result: the benchmark's result file the figure comes from; fused_launch: the launch shapes
    the fused step ran with there, if not the rule's."""
    data = json.loads(table.read_text())
    entry = dict(device=device_name, dtype=dtype_name(dtype), shape=decode_shape(config),
                 fused_rows=fused_rows, result=result, **({"fused_launch": fused_launch} if fused_launch else {}))
    same = ("device", "dtype", "shape")
    data["measured"] = [e for e in data["measured"] if any(e[k] != entry[k] for k in same)] + [entry]
    table.write_text(json.dumps(data, indent=2) + "\n")
