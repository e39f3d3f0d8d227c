"""Loss parity: the same pretraining run in BF16 and in FP8 (nanoseek/fp8), both curves in one plot.

V3 Appendix B.1 trains the same models in BF16 and in its FP8 recipe and reports the FP8
run's loss within 0.25% relative of BF16's. Here: one model config, one tokenizer (trained
once on the data), the same seed, data order and schedule; only `precision` differs. The
figure compared is the final training loss, the mean over the last `--tail` steps (one
step's loss is noisy), and its relative difference.

    python benchmarks/fp8_loss_parity.py [--preset small --steps 2000 --batch 32 --seq 512]
    python benchmarks/fp8_loss_parity.py --smoke    the CPU (FP8 emulated), tiny preset, 10 steps

Where one job cannot hold both runs, run them apart and join them:
    python benchmarks/fp8_loss_parity.py --only bf16 ...             also writes the tokenizer
    python benchmarks/fp8_loss_parity.py --only fp8 --tokenizer DIR ...
    python benchmarks/fp8_loss_parity.py --join BF16.json FP8.json [BF16_SEED1.json BF16_RERUN.json ...]
                                     the plot and the comparison; further BF16 runs (another seed,
                                     or the same seed again) give the spread the difference is read against

Writes fp8_loss_parity[_PRESET][_smoke].json and .png into benchmarks/results (or $OUT).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, out_dir, write_json  # noqa: E402

from nanoseek import preset  # noqa: E402
from nanoseek.train.metrics import read_metrics  # noqa: E402
from nanoseek.train.stages import pretrain, train_config  # noqa: E402

DATA = ("builtin:arithmetic:level=1:n=30000,builtin:arithmetic:level=2:n=10000,"
        "builtin:arithmetic:level=3:n=10000,builtin:countdown:level=1:n=10000")
V3_CLAIM = 0.0025  # V3 Appendix B.1: relative loss error below 0.25%


def run(precision: str, args, work: Path, tokenizer: Path | None) -> list[dict]:
    cfg = train_config(steps=args.steps, batch_size=args.batch, seq_len=args.seq, lr=args.lr,
                       warmup=args.warmup, precision=precision, compile=args.compile, seed=args.seed)
    out = work / precision
    model_cfg = preset(args.preset, **({"num_hidden_layers": args.layers} if args.layers else {}))
    pretrain(model_cfg, cfg, args.data, out, tokenizer=tokenizer, progress=False)
    return read_metrics(out)


def plot(curves: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, rel) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 1))
    smooth = {}
    for name, records in curves.items():
        steps = [r["step"] for r in records]
        loss = [r["loss"] for r in records]
        ema, s = [], loss[0]
        for v in loss:  # exponential moving average, for the eye
            s = 0.95 * s + 0.05 * v
            ema.append(s)
        smooth[name] = ema
        line, = ax.plot(steps, loss, alpha=0.25, linewidth=0.8)
        ax.plot(steps, ema, color=line.get_color(), linewidth=1.5, label=f"{name} (EMA 0.95)")
    ax.set_yscale("log")  # the first 200 steps fall from 12 to 1; the comparison is in the tail
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    steps = [r["step"] for r in curves["bf16"]]
    yardsticks = iter(("-", "--", ":", "-."))
    for other in (k for k in curves if k != "bf16"):  # FP8 in black, the BF16 yardsticks in gray
        style = dict(color="black") if other == "fp8" else dict(color="tab:gray", linestyle=next(yardsticks, "-"))
        rel.plot(steps, [100 * (f - b) / b for f, b in zip(smooth[other], smooth["bf16"])], linewidth=1,
                 label=f"{other} - bf16", **style)
    rel.axhline(100 * V3_CLAIM, color="tab:red", linestyle="--", linewidth=0.8)
    rel.axhline(-100 * V3_CLAIM, color="tab:red", linestyle="--", linewidth=0.8, label="±0.25% (V3 B.1)")
    rel.set_ylabel("% of bf16")
    rel.set_xlabel("step")
    rel.grid(alpha=0.3)
    rel.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--tail", type=int, default=100, help="final loss: the mean over these last steps")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--seed", type=int, default=0, help="initialization and data order (with --only)")
    ap.add_argument("--compile", action="store_true", help="torch.compile both runs (GPU)")
    ap.add_argument("--smoke", action="store_true", help="the CPU, tiny preset, 10 steps")
    ap.add_argument("--only", choices=("bf16", "fp8"), help="run one precision, write its curve")
    ap.add_argument("--tokenizer", type=Path, help="the tokenizer of the other run (with --only)")
    ap.add_argument("--join", nargs="+", type=Path, metavar="JSON",
                    help="compare --only runs' curves: BF16 FP8 [more BF16 runs as yardsticks]")
    args = ap.parse_args()
    if args.join:
        return join(args)
    if args.smoke:
        args.preset, args.steps, args.batch, args.seq, args.warmup, args.tail = "tiny", 10, 2, 64, 2, 5
        args.data, args.compile = "builtin:arithmetic:level=1:n=300", False
    if not torch.cuda.is_available() and not args.smoke:
        print("note: no GPU; the FP8 run is the emulated twin (slow)", file=sys.stderr)
    name = f"fp8_loss_parity{'' if args.preset == 'small' else '_' + args.preset}{'_smoke' if args.smoke else ''}"
    setting = {"preset": args.preset, "layers": args.layers, "steps": args.steps, "batch": args.batch,
               "seq": args.seq, "tokens": args.steps * args.batch * args.seq, "lr": args.lr, "data": args.data,
               "tail": args.tail}
    curves, wall = {}, {}
    with tempfile.TemporaryDirectory(prefix="fp8_parity-") as tmp:
        work = Path(tmp)
        for precision in [args.only] if args.only else ["bf16", "fp8"]:
            tokenizer = args.tokenizer or (work / "bf16" / "tokenizer" if curves else None)  # the same tokenizer
            t0 = time.time()
            curves[precision] = run(precision, args, work, tokenizer)
            wall[precision] = time.time() - t0
            print(f"{precision}: {args.steps} steps in {wall[precision]:.0f}s", flush=True)
        if args.only and args.tokenizer is None:  # for the other precision's run
            shutil.copytree(work / args.only / "tokenizer", out_dir() / f"{name}_tokenizer", dirs_exist_ok=True)
    if not args.only:
        return compare(curves, setting, name)
    write_json({"benchmark": "fp8_loss_parity", **environment(), **setting, "name": name, "precision": args.only,
                "seed": args.seed, "wall_s": wall[args.only], "command": " ".join(sys.argv),
                "curve": [{"step": r["step"], "loss": r["loss"]} for r in curves[args.only]]},
               f"{name}_{args.only}{f'_seed{args.seed}' if args.seed else ''}.json")


def join(args):
    """The comparison of --only runs: BF16, FP8, then any number of BF16 yardsticks (other
    seeds, or the same seed again: GPU kernels are not bit-for-bit reproducible, so a rerun
    drifts too). The settings must agree."""
    runs = [json.loads(p.read_text()) for p in args.join]
    keys = ("preset", "layers", "steps", "batch", "seq", "lr", "data", "tail")
    precisions = [r.get("precision") for r in runs]
    seeds = [r.get("seed", 0) for r in runs]
    same_setting = all(r[k] == runs[0][k] for r in runs for k in keys)
    if precisions[:2] != ["bf16", "fp8"] or any(p != "bf16" for p in precisions[2:]) or not same_setting \
            or seeds[0] != seeds[1]:
        sys.exit(f"--join takes a bf16 and an fp8 run of the same setting ({', '.join(keys)}) and seed, then "
                 f"any bf16 runs of that setting as yardsticks; got "
                 f"{[{k: r.get(k) for k in ('precision', 'seed', *keys)} for r in runs]}")
    setting = {k: runs[0][k] for k in (*keys, "tokens")}
    curves = {"bf16": runs[0]["curve"], "fp8": runs[1]["curve"]}
    taken = {seeds[0]}
    for i, (run, seed) in enumerate(zip(runs[2:], seeds[2:])):
        label = f"bf16 seed {seed}" + (" rerun" if seed in taken else "")
        taken.add(seed)
        curves[label if label not in curves else f"{label} {i + 2}"] = run["curve"]
    compare(curves, setting, runs[0]["name"])


def compare(curves: dict[str, list[dict]], setting: dict, name: str) -> None:
    """FP8's final loss against BF16's; further BF16 curves (another seed, or a rerun) are the
    yardstick: how far two BF16 runs that differ only by chance end apart at this scale."""
    tail = setting["tail"]
    final = {k: statistics.fmean(r["loss"] for r in v[-tail:]) for k, v in curves.items()}
    rel = {k: (v - final["bf16"]) / final["bf16"] for k, v in final.items() if k != "bf16"}
    png = out_dir() / f"{name}.png"
    plot(curves, png, f"{setting['preset']}: BF16 vs FP8, {setting['steps']} steps, "
                      f"{setting['tokens'] / 1e6:.0f}M tokens")
    spread = {k: v for k, v in rel.items() if k != "fp8"}
    # the widest gap between two BF16 runs, as a fraction of the reference run's loss
    widest = max(0.0, *spread.values()) - min(0.0, *spread.values()) if spread else None
    result = {"benchmark": "fp8_loss_parity", **environment(), **setting, "final_loss": final,
              "relative_difference": rel["fp8"], "bf16_spread": spread,
              "widest_bf16_gap": widest,
              "within_bf16_spread": None if widest is None else abs(rel["fp8"]) <= widest,
              "within_v3_claim": abs(rel["fp8"]) <= V3_CLAIM, "command": " ".join(sys.argv),
              "curves": {k: [{"step": r["step"], "loss": r["loss"]} for r in v] for k, v in curves.items()}}
    path = write_json(result, f"{name}.json")
    print(f"final training loss (mean of the last {tail} steps): "
          + ", ".join(f"{k} {v:.4f}" for k, v in final.items())
          + f"; fp8 relative {rel['fp8']:+.3%} (V3 B.1: within ±{V3_CLAIM:.2%})"
          + "".join(f"; {k} {v:+.3%}" for k, v in spread.items())
          + ("" if widest is None else f"; FP8's gap {'within' if abs(rel['fp8']) <= widest else 'beyond'} "
             f"the widest between two BF16 runs, {widest:.3%}"))
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
