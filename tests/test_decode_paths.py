"""Which decode step the engine takes per model (infer/decode_paths.py), and the fused step's
launch shapes derived from the model's widths (infer/fused.py)."""

import json
import shutil

import pytest
import torch

from nanoseek import Transformer, preset
from nanoseek.config import ConfigError
from nanoseek.infer import decode_paths
from nanoseek.infer.config import InferenceConfig
from nanoseek.infer.decode_paths import measured_fused_rows, record_fused_rows, rows_the_fused_step_won

pytest.importorskip("triton")
CUDA = torch.device("cuda")


def test_the_shipped_table_takes_the_fused_step_only_where_it_won(hopper, monkeypatch):
    """bench-1b in BF16 on an H200 was measured: the fused step at batch 1. Its float32 or
    CPU weights, another GPU or a model unmeasured on this one (V3's and V2-Lite's layer
    widths) take the compiled step (0 fused rows)."""
    bench = preset("bench-1b")
    assert measured_fused_rows(bench, torch.bfloat16, CUDA) == 1
    assert measured_fused_rows(bench, torch.float32, CUDA) == 0
    assert measured_fused_rows(bench, torch.bfloat16, torch.device("cpu")) == 0
    assert measured_fused_rows(preset("deepseek-v3"), torch.bfloat16, CUDA) == 0
    assert measured_fused_rows(preset("deepseek-v2-lite"), torch.bfloat16, CUDA) == 0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert measured_fused_rows(bench, torch.bfloat16, CUDA) == 0
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert measured_fused_rows(bench, torch.bfloat16, CUDA) == 0  # not where its kernels are tuned


def test_a_recorded_measurement_is_what_the_engine_takes(hopper, tmp_path):
    """rows_the_fused_step_won keeps the batches up to the first the fused step lost; the
    record replaces an earlier figure of the same shape, device and dtype."""
    assert rows_the_fused_step_won({1: (2100.0, 1200.0), 2: (3000.0, 2900.0), 4: (4000.0, 4100.0),
                                    8: (9000.0, 5000.0)}) == 2
    assert rows_the_fused_step_won({1: (520.0, 830.0)}) == 0
    table = tmp_path / "paths.json"
    shutil.copy(decode_paths.TABLE, table)
    shipped = len(json.loads(table.read_text())["measured"])
    tiny = preset("tiny")
    assert measured_fused_rows(tiny, torch.bfloat16, CUDA, table) == 0
    record_fused_rows(tiny, torch.bfloat16, "NVIDIA H200", 4, "benchmarks/results/decode_tiny.json", table)
    record_fused_rows(tiny, torch.bfloat16, "NVIDIA H200", 2, "benchmarks/results/decode_tiny.json", table)
    assert measured_fused_rows(tiny, torch.bfloat16, CUDA, table) == 2
    assert measured_fused_rows(preset("bench-1b"), torch.bfloat16, CUDA, table) == 1
    assert len(json.loads(table.read_text())["measured"]) == shipped + 1


def test_a_recorded_launch_is_what_the_fused_step_takes(hopper, tmp_path, monkeypatch):
    """A measurement recorded with the fused step's searched launch gives that launch back for
    caches up to the short ones it was measured at (past them its weight kernels' shapes only),
    and the engine's step runs it unless its config names a launch; an entry without one and a
    shape where the fused step lost take the rule's (None)."""
    from nanoseek.infer import engine as engine_module
    from nanoseek.infer.decode_paths import measured_fused_step
    from nanoseek.infer.fused import SHORT_CACHE
    table = tmp_path / "paths.json"
    shutil.copy(decode_paths.TABLE, table)
    tiny, bench = preset("tiny"), preset("bench-1b")
    searched = {"gemv_rows": 8, "down_split": 1, "attend_split": 64, "attend_warps": 4, "output_split": 4,
                "output_warps": 2, "merge_splits": 8}
    record_fused_rows(tiny, torch.bfloat16, "NVIDIA H200", 1, "decode_tiny.json", table, fused_launch=searched)
    assert measured_fused_step(tiny, torch.bfloat16, CUDA, SHORT_CACHE, table) == (1, searched)
    # past the short cache the attention's shapes are the rule's, the weights' kernels' the table's
    assert measured_fused_step(tiny, torch.bfloat16, CUDA, SHORT_CACHE + 1, table) == (1, {"gemv_rows": 8,
                                                                                           "down_split": 1})
    assert measured_fused_step(bench, torch.bfloat16, CUDA, 640, table) == (1, None)  # measured with the rule's
    record_fused_rows(tiny, torch.bfloat16, "NVIDIA H200", 0, "decode_tiny.json", table, fused_launch=searched)
    assert measured_fused_step(tiny, torch.bfloat16, CUDA, 640, table) == (0, None)  # the fused step lost
    # the engine: a table that says fused at one row with a launch (the CPU model stands in for a GPU one)
    seen = []

    class Runner(engine_module.ModelRunner):
        def __init__(self, model, cache, autocast, config, *args):
            seen.append(config.fused_launch)
            super().__init__(model, cache, autocast, config, *args)
    monkeypatch.setattr(engine_module, "ModelRunner", Runner)
    monkeypatch.setattr(engine_module, "measured_fused_step",
                        lambda config, dtype, device, cache_len: (1, searched if cache_len <= 100 else None))
    model = Transformer(tiny)  # (its positions end short of SHORT_CACHE: the fake's is 100)
    engine_module.Engine(model, max_batch=1, max_len=64)
    engine_module.Engine(model, max_batch=1, max_len=101)
    engine_module.Engine(model, max_batch=1, max_len=64, config=InferenceConfig(fused_launch={"gemv_rows": 2}))
    assert seen == [searched, None, {"gemv_rows": 2}]


def test_the_shipped_tables_launches_are_valid_for_their_shapes():
    """Every launch the shipped table holds is one fused_step_launch takes for its model's widths
    (a renamed or removed launch key would stop the engine building its step): V2-Lite's on an
    H100 among them."""
    from nanoseek.infer.fused import SHORT_CACHE, fused_step_launch
    launches = [(e["shape"], e["fused_launch"]) for e in json.loads(decode_paths.TABLE.read_text())["measured"]
                if "fused_launch" in e]
    assert any(shape["hidden_size"] == 2048 for shape, _ in launches)  # V2-Lite's
    for shape, launch in launches:
        config = preset("deepseek-v2-lite").replace(**shape)
        fused_step_launch(config, SHORT_CACHE, launch)  # raises on a key it does not know


def test_the_engine_defaults_to_the_compiled_step():
    """No setting: compiled captured steps, the fused step only as the table says."""
    config = InferenceConfig()
    assert config.compile and config.cuda_graphs and config.fused_decode_rows is None
    with pytest.raises(ConfigError, match="fused_decode_rows"):
        InferenceConfig(fused_decode_rows=-1)


def test_launch_shapes_follow_the_model_widths():
    """The rule gives back the shapes tuned on an H200 for bench-1b (fused_tuning.json, less
    the knob since removed); for V3's widths the rows per program shrink so a program holds
    the same number of weight elements, attention takes 32 of its 128 heads per program in
    splits of at least 64 positions, aiming for 128 programs. Without a query LoRA (V2-Lite's
    16 heads) the query's latent columns are shared among 8 programs a head. The MoE down
    kernel runs about 512 programs (4 rows at V2-Lite's and V3's hidden sizes) and the merge
    4 blocks of V outputs a head at V2-Lite's and V3's widths up to a 4,096-position cache (one
    past it, where each block would re-read many units' partial sums): V2-Lite's tuned shapes.
    Split over its slots (down_split), a down program reads a GEMV's tile."""
    from nanoseek.infer.fused import MAX_WARPS, fused_step_launch
    tuned = json.loads(open("benchmarks/results/fused_tuning.json").read())
    bench = fused_step_launch(preset("bench-1b"), 640)
    assert {k: bench[k] for k in tuned if k in bench} == {k: v for k, v in tuned.items() if k in bench}
    assert set(tuned) - set(bench) == {"attend_prefetch"}
    lite = fused_step_launch(preset("deepseek-v2-lite"), 4096)
    assert (lite["query_split"], lite["query_warps"], lite["output_split"], lite["down_rows"]) == (8, 4, 4, 4)
    assert fused_step_launch(preset("deepseek-v2-lite"), 32768)["output_split"] == 1  # the units' sums re-read
    v3 = fused_step_launch(preset("deepseek-v3"), 32768)
    assert (v3["gemv_rows"], v3["head_rows"], v3["up_rows"], v3["down_rows"]) == (2, 4, 2, 4)
    assert (v3["attend_heads"], v3["attend_split"], v3["attend_block"], v3["attend_programs"]) == (32, 64, 64, 128)
    assert all(v3[k] <= MAX_WARPS for k in v3 if k.endswith("_warps"))
    assert fused_step_launch(preset("bench-1b"), 640, {"gemv_rows": 16})["gemv_warps"] == 8  # the warps follow
    # the down kernel split over its slots: a GEMV's tile a program, 4 x 2,048 at V2-Lite's and V3's widths
    for name in ("deepseek-v2-lite", "deepseek-v3"):
        split = fused_step_launch(preset(name), 4096, {"down_split": 1})
        assert (split["down_rows"], split["down_warps"]) == (4, 4)
    with pytest.raises(ValueError, match="unknown launch keys \\['gemv_row'\\]"):
        fused_step_launch(preset("tiny"), 64, {"gemv_row": 8})
    with pytest.raises(ValueError, match="attend_heads=8: must be at least 16"):
        fused_step_launch(preset("tiny"), 64, {"attend_heads": 8})
    with pytest.raises(ValueError, match="attend_programs=0: must be at least 1"):
        fused_step_launch(preset("tiny"), 64, {"attend_programs": 0})
    with pytest.raises(ValueError, match="attend_stages=5: must be 1 to 4"):
        fused_step_launch(preset("tiny"), 64, {"attend_stages": 5})
    with pytest.raises(ValueError, match="gemv_rows=3: must be a power of two"):
        fused_step_launch(preset("tiny"), 64, {"gemv_rows": 3})
    # the TMA attention copies whole tiles: half the latent and the RoPE key powers of two, 8 to 256 wide
    assert fused_step_launch(preset("deepseek-v3"), 32768, {"attend_tma": 1})["attend_tma"] == 1
    # its stages fit an SM's shared memory: 64 heads' queries and 2 blocks of 64 positions, or 3 of 32
    tma = [fused_step_launch(preset("deepseek-v3"), 32768, {"attend_tma": 1, "attend_heads": 64, **x})
           for x in ({}, {"attend_block": 32}, {"attend_stages": 1})]
    assert [t["attend_stages"] for t in tma] == [2, 3, 1]
    with pytest.raises(ValueError, match="kv_lora_rank=48, qk_rope_head_dim=8: leave attend_tma at 0"):
        fused_step_launch(preset("tiny", kv_lora_rank=48), 64, {"attend_tma": 1})
    with pytest.raises(ValueError, match="attend_tma=1 with attend_transposed=1"):
        fused_step_launch(preset("deepseek-v3"), 64, {"attend_tma": 1, "attend_transposed": 1})
    with pytest.raises(ValueError, match="attend_tma=1 with attend_block=512"):
        fused_step_launch(preset("deepseek-v3"), 64, {"attend_tma": 1, "attend_block": 512, "attend_split": 512})


def test_cpu_engines_take_no_fused_step():
    engine_model = Transformer(preset("tiny"))
    from nanoseek.infer.engine import Engine
    assert Engine(engine_model, max_batch=2, max_len=16).runner.graphs is None


def test_an_fp8_model_takes_its_own_measurement(hopper, tmp_path, monkeypatch):
    """An FP8-resident model's step is looked up under float8, not under its embedding's dtype:
    the BF16 model's measurement says nothing of the FP8 one's bytes. Its entry is found on a GPU
    where the BF16 kernels run (it computes in BF16)."""
    from nanoseek.infer.decode_paths import measured_fused_step
    table = tmp_path / "paths.json"
    shutil.copy(decode_paths.TABLE, table)
    tiny, fp8 = preset("tiny"), torch.float8_e4m3fn
    record_fused_rows(tiny, fp8, "NVIDIA H200", 2, "decode_tiny.json", table, fused_launch={"gemv_rows": 4})
    assert measured_fused_step(tiny, fp8, CUDA, 64, table) == (2, {"gemv_rows": 4})
    assert measured_fused_step(tiny, torch.bfloat16, CUDA, 64, table) == (0, None)
    from nanoseek.infer import engine as engine_module
    from nanoseek.infer.fp8_weights import quantize_weights
    asked = []
    monkeypatch.setattr(engine_module, "measured_fused_step",
                        lambda config, dtype, device, cache_len: asked.append(dtype) or (0, None))
    model = Transformer(preset("tiny"))
    engine_module.Engine(model, max_batch=1, max_len=16)
    engine_module.Engine(quantize_weights(model, (32, 32), "twin"), max_batch=1, max_len=16)
    assert asked == [torch.float32, torch.float8_e4m3fn]
