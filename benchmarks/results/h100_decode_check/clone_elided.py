"""Does a clone of the positions reach the attention op in a compiled decode step? A step that
advances its positions in place at its end, compiled by Inductor on a CPU (Triton's interpreter
runs the op), the op handed `positions.clone()`: prints the op's call from Inductor's output
code. Its positions argument is `reinterpret_tensor(arg1_1, ...)`, the step's positions input
itself: Inductor's post-grad `remove_noop_ops` dropped the clone.

    TRITON_INTERPRET=1 TORCH_LOGS=output_code python benchmarks/results/h100_decode_check/clone_elided.py 2>&1 \
        | grep -o "mla_decode_attention.default(.*"
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
from test_fused_decode import prefilled_cache, sharp_model  # noqa: E402
from test_latent_attention import LAUNCH  # noqa: E402

from nanoseek.infer.latent_attention import LatentDecodeAttention  # noqa: E402

model = sharp_model()
cache = prefilled_cache(model, [7, 2])
kernels = LatentDecodeAttention(model.config, 40, LAUNCH, idle=39)
model.set_decode_attention(lambda attn, q_nope, q_pe, c_kv, k_pe, positions:
                           kernels(attn, q_nope, q_pe, c_kv, k_pe, positions.clone()))


def step(ids, positions):
    logits = model(ids, positions=positions, cache=cache).logits[:, -1]
    positions.copy_((positions + 1).clamp(max=39))  # as the engine's step did before bcdeb84
    return logits


with torch.no_grad():
    torch.compile(step, fullgraph=True, dynamic=False)(torch.tensor([[3], [4]]), torch.tensor([[7], [2]]))
