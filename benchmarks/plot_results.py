"""Plots of the comparisons in benchmarks/RESULTS.md, drawn from the committed result files.

    python benchmarks/plot_results.py        # -> benchmarks/results/plots/*.png
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PLOTS = RESULTS / "plots"


def bars(ax, labels: list[str], values: list[float], unit: str, colors: list[str]) -> None:
    ax.barh(labels, values, color=colors)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:,.0f} {unit}" if v >= 10 else f" {v:.2f} {unit}", va="center")
    ax.set_xlim(0, max(values) * 1.35)
    ax.spines[["top", "right"]].set_visible(False)


def label(name: str) -> str:
    return "nanoseek engine (compiled step)" if name == "nanoseek engine" else name


def decode() -> Path:
    rows = json.loads((RESULTS / "decode.json").read_text())["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    for ax, batch in zip(axes, (1, 32)):
        picked = [(label(name.split(", batch")[0]), r["decode_tokens_per_s"]) for name, r in rows.items()
                  if r["batch"] == batch]
        colors = ["#999999" if n.startswith("transformers") else "#1f77b4" for n, _ in picked]
        bars(ax, [n for n, _ in picked], [v for _, v in picked], "tok/s", colors)
        ax.set_title(f"decode tokens/s, batch {batch}")
    fig.suptitle("bench-1b decode on an H200, prompt 512, 128 new tokens (decode.json)")
    return save(fig, "decode.png")


def grpo_trl() -> Path:
    sides = json.loads((RESULTS / "grpo_trl.json").read_text())["sides"]
    fig, ax = plt.subplots(figsize=(7, 2.2))
    names = ["nanoseek", "trl"]
    bars(ax, ["nanoseek GRPO", "TRL GRPOTrainer"], [sides[n]["median_step_s"] for n in names], "s",
         ["#1f77b4", "#999999"])
    ax.set_title("GRPO step time, small preset, 8 prompts x G 8 x 128 tokens, H200 (grpo_trl.json)")
    return save(fig, "grpo_trl.png")


def speculative() -> Path:
    rows = json.loads((RESULTS / "speculative.json").read_text())["rows"]
    fig, ax = plt.subplots(figsize=(7, 3))
    for batch, color in ((1, "#1f77b4"), (8, "#ff7f0e")):
        ks = sorted({r["k"] for r in rows.values() if r["batch"] == batch})
        tps = [next(r["tokens_per_s"] for r in rows.values() if r["batch"] == batch and r["k"] == k) for k in ks]
        ax.plot(ks, tps, "o-", color=color, label=f"batch {batch}")
    ax.set_xticks([0, 1, 2], ["no MTP", "K = 1", "K = 2"])
    ax.set_ylabel("tokens/s")
    ax.legend()
    ax.set_title("MTP speculative decoding, small model, H200 (speculative.json)")
    ax.spines[["top", "right"]].set_visible(False)
    return save(fig, "speculative.png")


def save(fig, name: str) -> Path:
    PLOTS.mkdir(exist_ok=True)
    fig.tight_layout()
    fig.savefig(PLOTS / name, dpi=110)
    plt.close(fig)
    return PLOTS / name


if __name__ == "__main__":
    for make in (decode, grpo_trl, speculative):
        print(make())
