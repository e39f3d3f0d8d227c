"""Which of the engine's decode paths gives greedy tokens that differ from a full forward without
a cache: the decode attention (kernel or torch) crossed with CUDA graphs, compile and the fused
step, on the sharpened tiny test model (tests/test_fused_decode.sharp_model), two prompts of
different lengths. Prints one line a path and the first step where a row leaves the reference;
writes $OUT/decode_attention_check.json.

    python benchmarks/decode_attention_check.py [--max-len 40] [--new 12]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def reference(model, prompt: list[int], new: int) -> list[int]:
    """Greedy tokens by full forwards over the whole sequence, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            logits = model(torch.tensor([ids], device=next(model.parameters()).device)).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-len", type=int, default=40)
    ap.add_argument("--new", type=int, default=12)
    args = ap.parse_args()
    from test_fused_decode import sharp_model  # noqa: E402 - tests/ on sys.path
    from test_latent_attention import LAUNCH  # noqa: E402
    from nanoseek.infer import Engine, SamplingParams
    from nanoseek.infer.config import InferenceConfig

    model = sharp_model()
    prompts = [[5, 9, 2, 7, 1, 3, 8], [4, 4]]
    ref = [reference(model, p, args.new) for p in prompts]
    print("reference", ref, flush=True)
    rows = []
    compiled_graphs = (True, True, 0, 8)
    paths = [("torch", *compiled_graphs), ("torch", True, True, None, 8),
             ("kernel", *compiled_graphs), ("kernel", True, True, None, 8), ("kernel", True, True, 0, 1),
             ("kernel", True, False, 0, 8), ("kernel", False, False, 0, 1)]
    for attention, graphs, compiled, fused, burst in paths:
        config = InferenceConfig(decode_attention=attention, fused_launch=LAUNCH,
                                 cuda_graphs=graphs, compile=compiled, fused_decode_rows=fused, decode_burst=burst)
        name = f"{attention} graphs={graphs} compile={compiled} fused_rows={fused} burst={burst}"
        try:
            engine = Engine(model, max_batch=2, max_len=args.max_len, config=config)
            out = [o.token_ids for o in engine.generate(prompts, SamplingParams(max_tokens=args.new, temperature=0))]
        except Exception as e:  # noqa: BLE001 - a diagnostic: report and go on
            rows.append(dict(path=name, error=f"{type(e).__name__}: {e}"))
            print(name, "ERROR", e, flush=True)
            continue
        first = [next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), None) for o, r in zip(out, ref)]
        rows.append(dict(path=name, tokens=out, first_difference=first))
        print(f"{name}: first difference per row {first} {out}", flush=True)
    path = os.path.join(os.environ.get("OUT", "."), "decode_attention_check.json")
    with open(path, "w") as f:
        json.dump(dict(reference=ref, rows=rows, device=torch.cuda.get_device_name() if torch.cuda.is_available()
                       else "cpu"), f, indent=1)


if __name__ == "__main__":
    main()
