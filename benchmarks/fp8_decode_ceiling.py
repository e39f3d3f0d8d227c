"""How much faster FP8 weights can make a batch-1 decode step, from the bytes alone (no GPU).

A one-token step reads every weight it uses once, so its time is at best those bytes over the
bandwidth. FP8-resident weights (infer/fp8_weights.py, as an official V3 checkpoint holds them)
halve the layer weights but not the output head, the embedding row, the norms, the routers or
kv_b_proj (dequantised at load), so the ratio of BF16's bytes to FP8's is the most any FP8 step
can gain over a BF16 step that reaches the same share of its own roofline. Per model shape (a
preset, or its first N layers: a slice keeps the head, so its ceiling is lower than the whole
model's), built on the meta device: bytes a step reads in BF16 and in FP8
(fused_decode.step_weight_bytes: the routed experts a token chooses, not all), and their ratio.

    python benchmarks/fp8_decode_ceiling.py [--shapes deepseek-v2-lite deepseek-v2-lite:8 deepseek-v3:2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, sliced_preset, write_json  # noqa: E402
from fused_decode import step_weight_bytes  # noqa: E402

from nanoseek import Transformer  # noqa: E402
from nanoseek.infer.fp8_weights import quantize_weights  # noqa: E402


def ceiling(name: str, layers: int | None) -> dict:
    cfg = sliced_preset(name, layers)
    with torch.device("meta"):
        model = Transformer(cfg).to(torch.bfloat16)
    bf16 = step_weight_bytes(model)
    fp8 = step_weight_bytes(quantize_weights(model))
    head = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    return {"preset": name, "layers": cfg.num_hidden_layers, "bf16_step_bytes": bf16, "fp8_step_bytes": fp8,
            "head_bytes": head, "fp8_speedup_ceiling": bf16 / fp8}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["deepseek-v2-lite", "deepseek-v2-lite:8", "deepseek-v3:2",
                                                    "deepseek-v3"],
                    metavar="PRESET[:LAYERS]")
    args = ap.parse_args()
    rows = []
    for shape in args.shapes:
        name, _, layers = shape.partition(":")
        rows.append(ceiling(name, int(layers) if layers else None))
        r = rows[-1]
        print(f"{name} ({r['layers']} layers): BF16 {r['bf16_step_bytes'] / 1e9:.3f} GB, FP8 "
              f"{r['fp8_step_bytes'] / 1e9:.3f} GB a batch-1 step (head {r['head_bytes'] / 1e9:.3f} GB): "
              f"FP8 at most {r['fp8_speedup_ceiling']:.2f}x", flush=True)
    print(f"wrote {write_json({'benchmark': 'fp8_decode_ceiling', **environment(), 'rows': rows}, 'fp8_decode_ceiling.json')}")


if __name__ == "__main__":
    main()
