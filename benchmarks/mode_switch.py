"""Host cost of switching a model's mode: Module.eval() + .train(False) walk every submodule.

The engine used to do both on every decode step (infer/engine.py ModelRunner._context); this
measures what that cost on the host, on a bench-1b built on the meta device (no weights).

    python benchmarks/mode_switch.py [--preset bench-1b] [--repeat 200]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402

from nanoseek import Transformer, preset  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="bench-1b")
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args()
    with torch.device("meta"):
        model = Transformer(preset(args.preset))
    modules = sum(1 for _ in model.modules())
    for _ in range(10):
        model.eval()
        model.train(False)
    t0 = time.perf_counter()
    for _ in range(args.repeat):
        model.eval()
        model.train(False)
    us = (time.perf_counter() - t0) / args.repeat * 1e6
    print(f"{args.preset}: {modules} modules, eval() + train(False): {us:.0f} us on the host")
    write_json({"benchmark": "mode_switch", **environment(), "preset": args.preset, "modules": modules,
                "eval_plus_train_false_us": us, "repeat": args.repeat}, "mode_switch.json")


if __name__ == "__main__":
    main()
