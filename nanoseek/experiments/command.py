"""`nanoseek experiment NAME [--budget-minutes M] [--seeds 2] [--device cuda|cpu] [--out DIR]`."""

from __future__ import annotations

import argparse
import importlib

from . import EXPERIMENTS

DEFAULT_OUT = "benchmarks/results/claims"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import positive_int  # the CLI's own argument types (it is loaded: it calls this)

    # the listing keeps its lines; everything else is formatted as the CLI formats every command
    p.formatter_class = type("ListingHelp", (argparse.RawDescriptionHelpFormatter, p.formatter_class), {})
    p.epilog = "experiments:\n" + "\n".join(f"  {name:<15} {what}" for name, what in EXPERIMENTS.items())
    p.add_argument("name", choices=list(EXPERIMENTS), metavar="NAME", help="the experiment (listed below)")
    p.add_argument("--budget-minutes", type=float, default=None, metavar="M",
                   help="wall time of the whole experiment (default 8 on a GPU, 4 on the CPU)")
    p.add_argument("--seeds", type=positive_int, default=2, metavar="N", help="seeds per arm (default 2)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda if available; the scale follows the device")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help=f"results go to DIR/<scale>/NAME/, and DIR/README.md (default {DEFAULT_OUT})")


def run(args: argparse.Namespace) -> None:
    import torch

    from .runner import run_experiment
    from .scale import SCALES

    if args.budget_minutes is not None and not args.budget_minutes > 0:
        raise ValueError(f"--budget-minutes must be positive, got {args.budget_minutes:g}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")  # the CLI checked it exists
    scale = SCALES["gpu" if device == "cuda" else "cpu"]
    exp = importlib.import_module(f".{args.name}", __package__).EXPERIMENT
    result = run_experiment(exp, scale, list(range(args.seeds)), args.budget_minutes or scale.budget_minutes,
                            device, args.out)
    for v in result["verdicts"]:
        print(f"{v['verdict']:>12}  {v['statement']}")
    print(f"wrote {args.out}/{scale.name}/{args.name}/ in {result['scale']['wall_minutes']:.1f} min")
