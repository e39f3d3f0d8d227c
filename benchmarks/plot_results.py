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


def fp8_gemv() -> Path:
    """The FP8 weight-only linear at one and four rows against BF16, as a share of the copy
    bandwidth per projection (h100_decode_shapes/fp8_gemv)."""
    data = json.loads((RESULTS / "h100_decode_shapes" / "fp8_gemv" / "fp8_gemv.json").read_text())
    # the first run's names, then fp8_gemv.py's since the split over K
    ways = {"gemv": ("FP8 GEMV", "#1f77b4"), "fp8_weight_linear": ("FP8 fp8_weight_linear", "#1f77b4"),
            "tensor-core kernel": ("FP8 tensor-core kernel", "#ff7f0e"),
            "tensor-core kernel unsplit": ("FP8 tensor-core kernel, K unsplit", "#ff7f0e"),
            "bf16 cuBLAS": ("BF16 cuBLAS", "#999999")}
    ways = {k: v for k, v in ways.items() if any(f"{k}_us" in r for r in data["rows"])}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for ax, rows in zip(axes, (1, 4)):
        picked = [r for r in data["rows"] if r["rows"] == rows]
        names = [f"{r['preset'].removeprefix('deepseek-')} {r['projection']}" for r in picked]
        for i, (way, (name, color)) in enumerate(ways.items()):
            us = [r.get(f"{way}_us") for r in picked]
            ys = [j + (i - 1) * 0.27 for j, u in enumerate(us) if u is not None]
            ax.barh(ys, [u for u in us if u is not None], height=0.27, color=color, label=name)
        ax.set_yticks(range(len(names)), names)
        ax.set_xscale("log")
        ax.set_xlabel("µs a call (log scale)")
        ax.set_title(f"{rows} row{'s' if rows > 1 else ''}")
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].invert_yaxis()  # (the axes share it) the table's order, top down
    fig.suptitle("FP8 weight-only linear vs BF16 at decode rows, one H100 (fp8_gemv.json)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(ways), frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return save(fig, "fp8_gemv.png", layout=False)


def decode_shapes() -> Path:
    """Decode at real layer shapes, one H100: each path's share of the bandwidth roofline against
    the issue's targets, and FP8-resident weights' speed against BF16 beside what their bytes
    allow (h100_decode_shapes)."""
    base = RESULTS / "h100_decode_shapes"
    # (shape, result, the batches taken from it, the run's note): V2-Lite's fused step with its
    # searched launch (the one the engine takes from its table) and with the rule's, each beside
    # the compiled step of its own run (another H100 each)
    runs = [("V2-Lite 27L", base / "v2lite_tuned" / "decode_deepseek-v2-lite_tune2.json", (1,), "searched launch"),
            ("V2-Lite 27L", base / "rule_launch" / "decode_deepseek-v2-lite.json", (1, 32), "rule's launch"),
            ("V3 2L", base / "rule_launch" / "v3" / "decode_deepseek-v3_2L.json", (1, 32), "")]
    fractions = []
    for shape, path, batches, note in runs:
        for name, r in json.loads(path.read_text())["rows"].items():
            if r["batch"] in batches:
                step = "fused" if "fused" in name else "compiled"
                run = f" ({note} run)" if note else ""
                fractions.append((f"{shape}, {step}{run}, batch {r['batch']}", 100 * r["roofline_fraction"],
                                  70 if r["batch"] == 1 else 60))
    fp8 = [("V2-Lite 8L", base / "fp8_batch" / "decode_deepseek-v2-lite_8L.json"),
           ("V3 2L", base / "fp8_batch" / "decode_deepseek-v3_2L.json")]
    ratios = []
    for shape, path in fp8:
        rows = json.loads(path.read_text())["rows"]
        for name, r in rows.items():
            if "FP8" in name:
                bf16 = next(b for n, b in rows.items() if "FP8" not in n and b["batch"] == r["batch"])
                ratios.append((f"{shape}, batch {r['batch']}", r["speedup_vs_bf16"], bf16["step_bytes"] / r["step_bytes"]))
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    a.barh([n for n, _, _ in fractions], [v for _, v, _ in fractions], color="#1f77b4")
    a.scatter([t for _, _, t in fractions], range(len(fractions)), marker="|", s=300, color="k", label="target")
    for i, (_, v, _) in enumerate(fractions):
        a.text(v, i, f" {v:.0f}%", va="center")
    a.set_xlim(0, 100)
    a.set_xlabel("share of the bandwidth roofline, %")
    a.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    b.barh([n for n, _, _ in ratios], [v for _, v, _ in ratios], color="#ff7f0e")
    b.scatter([c for _, _, c in ratios], range(len(ratios)), marker="|", s=300, color="k",
              label="what the bytes allow")
    b.axvline(1.7, color="#999999", linestyle="--", label="target 1.7x")
    for i, (_, v, _) in enumerate(ratios):
        b.text(v, i, f" {v:.2f}x", va="center")
    b.set_xlim(0, 2)
    b.set_xlabel("FP8-resident decode speed / BF16")
    b.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    for ax in (a, b):
        ax.invert_yaxis()
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle("Decode at DeepSeek layer shapes, one H100 (h100_decode_shapes)")
    return save(fig, "decode_shapes.png")


def save(fig, name: str, layout: bool = True) -> Path:
    PLOTS.mkdir(exist_ok=True)
    if layout:
        fig.tight_layout()
    fig.savefig(PLOTS / name, dpi=110)
    plt.close(fig)
    return PLOTS / name


if __name__ == "__main__":
    for make in (decode, grpo_trl, speculative, fp8_gemv, decode_shapes):
        print(make())
