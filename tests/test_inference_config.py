"""InferenceConfig: its checks, and that the engine applies every choice it holds."""

import pytest
import torch

from nanoseek import Transformer, preset
from nanoseek.config import ConfigError
from nanoseek.infer.config import InferenceConfig
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.model.moe import ExpertPath, Experts


@pytest.mark.parametrize("field, value, message", [
    ("expert_path", "fast",
     "'expert_path' = 'fast': must be one of auto, grouped, gather, gather_gemv, small_batch, loop"),
    ("gather_max_pairs", -1, "'gather_max_pairs' = -1: must be >= 0"),
    ("fused_decode_rows", -2, "'fused_decode_rows' = -2: must be >= 0"),
    ("decode_burst", 0, "'decode_burst' = 0: must be >= 1"),
    ("compile", "yes", "'compile' = 'yes': must be bool"),
    ("cuda_graphs", 1, "'cuda_graphs' = 1: must be bool"),
    ("decode_burst", 2.5, "'decode_burst' = 2.5: must be int"),
    ("compile_options", None, "'compile_options' must not be null"),
    ("prefix_cache", 1, "'prefix_cache' = 1: must be bool"),
])
def test_bad_values_are_one_clear_error(field, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as e:
        InferenceConfig(**{field: value})
    assert "\n" not in str(e.value)


def test_the_expert_settings_make_the_models_expert_path():
    launch = {"up": {"block_f": 32}}
    config = InferenceConfig(expert_path="gather", gather_max_pairs=3, small_batch_launch=launch)
    assert config.experts() == ExpertPath("gather", 3, launch)


def routed_experts(model):
    return [m for m in model.main_layers.modules() if isinstance(m, Experts)]


@pytest.mark.parametrize("config, ran", [
    (InferenceConfig(), {"gather"}),                  # auto: 12 pairs (prefill), 2 (decode) <= 16
    (InferenceConfig(gather_max_pairs=4), {"gather", "grouped"}),   # the prefill's 12 > 4
    (InferenceConfig(gather_max_pairs=0), {"grouped"}),
    (InferenceConfig(expert_path="loop"), {"loop"}),
    (InferenceConfig(expert_path="gather"), {"gather"}),
    (InferenceConfig(expert_path="gather_gemv"), {"gather_gemv"}),  # Triton's interpreter on a CPU
])
def test_the_engine_runs_the_configured_expert_path(config, ran):
    """The engine sets its config's expert path on the model, and the prefill (6 tokens, 12
    (token, expert) pairs at K = 2) and the decode steps (2 pairs) run it."""
    model = Transformer(preset("tiny")).eval()
    engine = Engine(model, max_batch=1, max_len=16, config=config)
    seen = set()
    for e in routed_experts(model):
        e.register_forward_hook(lambda module, args, out: seen.add(module.last_path))
    engine.generate([[5, 6, 7, 8, 9, 10]], SamplingParams(max_tokens=3))
    assert seen == ran and engine.decode_burst == config.decode_burst
    assert all(e.path == config.experts() for e in routed_experts(model))


@pytest.mark.gpu
def test_the_engine_hands_the_step_settings_to_its_cuda_graphs():
    """On a GPU the captured decode step gets the config's compile, fused rows, fused launch
    shapes and Inductor options; cuda_graphs=False leaves the engine without graphs."""
    model = Transformer(preset("tiny")).cuda().to(torch.bfloat16).eval()
    config = InferenceConfig(compile=True, fused_decode_rows=2, fused_launch={"gemv_rows": 8},
                             compile_options={"max_autotune": False})
    graphs = Engine(model, max_batch=4, max_len=16, config=config).runner.graphs
    assert graphs.compile and graphs.fused.max_rows == 2 and graphs.fused.t["gemv_rows"] == 8
    assert graphs.tuned_options == {"coordinate_descent_tuning": True, "max_autotune": False}
    assert Engine(model, max_batch=4, max_len=16, config=InferenceConfig(cuda_graphs=False)).runner.graphs is None
