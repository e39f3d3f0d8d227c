"""An experiment's outputs: result.json, table.md and its plot; the folder's README.md.

    out/<scale>/<name>/result.json   everything: scale, arms' accounting, runs, summary, verdicts
    out/<scale>/<name>/table.md      the claim's section: verdicts, then the arms
    out/<scale>/<name>/<name>.png    training curves and one bar chart per figure
    out/README.md                    every claim's section at every scale found, in claim order

A figure is printed as mean ± half its range over the seeds.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

RESULT = "result.json"
SCALE_TITLES = {"gpu": "GPU scale", "cpu": "CPU scale (tiny models)"}


# ---------------------------------------------------------------------------- text
def spread(s: dict, fmt: str) -> str:
    half = (s["max"] - s["min"]) / 2
    return fmt.format(s["mean"]) + (f" ± {fmt.format(half)}" if len(s["values"]) > 1 else "")


def scale_line(result: dict) -> str:
    s = result["scale"]
    return (f"Run at the {s['name']} scale on {s['device_name']} ({s['device']}, "
            f"{s['cpu_threads']} CPU thread{'s' if s['cpu_threads'] != 1 else ''}), budget {s['budget_minutes']:g} min, took "
            f"{s['wall_minutes']:.1f} min; seeds {', '.join(map(str, s['seeds']))}; {s['steps']} steps of "
            f"{s['batch_size']}x{s['seq_len']} tokens ({s['tokens_per_run']:,} tokens per run); "
            f"torch {s['torch']}, commit {s['git_commit']}, {s['time']}")


def checks_table(result: dict) -> list[str]:
    fmt = {key: f for key, _, f in result["metrics"]}
    lines = ["| claim | paper | ours | seeds' spread | verdict at this scale |", "|---|---|---|---|---|"]
    for v in result["verdicts"]:
        f = fmt.get(v["metric"], "{:.4g}")
        if isinstance(v["ours"], dict):
            ours = " vs ".join(f"{arm} {f.format(x)}" for arm, x in v["ours"].items())
        else:
            ours = f.format(v["ours"])
        lines.append(f"| {v['statement']} | {v['paper']} | {ours} | {f.format(v['spread'])} | "
                     f"**{v['verdict']}** |")
    return lines


def arms_table(result: dict) -> list[str]:
    head = ["arm", "what differs", "total params", "activated params", "train FLOPs/token",
            "KV cache B/token"] + [label for _, label, _ in result["metrics"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in result["arms"]:
        s = result["summary"].get(arm["name"], {})
        cells = [arm["name"], arm["note"], f"{arm['total_params']:,}", f"{arm['activated_params']:,}",
                 f"{arm['train_flops_per_token'] / 1e6:,.2f}M", f"{arm['kv_cache_bytes_per_token']:,}"]
        cells += [spread(s[key], f) if key in s else "–" for key, _, f in result["metrics"]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def section(result: dict, image_prefix: str = "") -> str:
    eq = "; ".join(f"{e['metric']} of {', '.join(e['arms'])} within {e['gap']:.2%}" for e in result["equalities"])
    lines = [scale_line(result), ""] + ([f"*{result['note']}*", ""] if result.get("note") else [])
    lines += checks_table(result) + ["", *arms_table(result), ""]
    if eq:
        lines += [f"Equal by construction and search (tolerance {result['tolerance']:.0%}): {eq}.", ""]
    lines += [f"![{result['experiment']}]({image_prefix}{name})" for name in result["files"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- plot
def plot(result: dict, path: Path) -> None:
    """Training loss (and MaxVio) curves by tokens, mean over seeds; one bar chart per figure
    with each seed as a dot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, PercentFormatter

    arms = [a["name"] for a in result["arms"]]
    tokens_per_step = result["scale"]["batch_size"] * result["scale"]["seq_len"]
    curves = [("main_loss", "training loss (next token; y from the last 3/4)")]
    if any("maxvio" in r["curve"] for r in result["runs"]):
        curves.append(("maxvio", "MaxVio_batch (mean over MoE layers)"))
    bars = [m for m in result["metrics"] if any(m[0] in result["summary"].get(a, {}) for a in arms)]
    n = len(curves) + len(bars)
    cols = min(3, n)
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(4.6 * cols, 3.6 * math.ceil(n / cols)),
                             squeeze=False)
    colors = {a: plt.get_cmap("tab10")(i % 10) for i, a in enumerate(arms)}
    panels = iter(axes.flat)
    for key, title in curves:
        ax = next(panels)
        late = []
        for arm in arms:
            series = [r["curve"][key] for r in result["runs"] if r["arm"] == arm and key in r["curve"]]
            if not series:
                continue
            steps = next(r["curve"]["step"] for r in result["runs"] if r["arm"] == arm)
            mean = smooth([sum(v) / len(v) for v in zip(*series)])
            ax.plot([s * tokens_per_step for s in steps], mean, label=arm, color=colors[arm], lw=1.2)
            late += mean[len(mean) // 4:]
        if key == "main_loss" and late:  # the arms part late in training: show that, not the first drop
            ax.set_ylim(0.98 * min(late), max(late) + 0.02 * min(late))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training tokens")
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for key, label, fmt in bars:
        ax = next(panels)
        shown = [a for a in arms if key in result["summary"].get(a, {})]
        for i, arm in enumerate(shown):
            s = result["summary"][arm][key]
            ax.bar(i, s["mean"], color=colors[arm], alpha=0.6)
            ax.plot([i] * len(s["values"]), s["values"], "k.", ms=5)
        ax.set_xticks(range(len(shown)), shown, rotation=20, fontsize=7, ha="right")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        lows = [min(result["summary"][a][key]["values"]) for a in shown]
        highs = [max(result["summary"][a][key]["values"]) for a in shown]
        if "%" in fmt:  # a rate: its whole range, unless all of it lies in the bottom fifth (loss errors)
            ax.set_ylim(0, 1 if max(highs) > 0.2 else max(1.3 * max(highs), 1e-6))
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        elif len(shown) > 1 and min(lows) > 0 and max(highs) - min(lows) < 0.2 * max(highs):  # close: zoom in
            pad = max(max(highs) - min(lows), 1e-9 + 0.01 * max(highs))
            ax.set_ylim(min(lows) - pad, max(highs) + pad)
    for ax in panels:
        ax.axis("off")
    fig.suptitle(f"claim {result['claim']}: {result['title']} ({result['scale']['name']} scale, "
                 f"{len(result['scale']['seeds'])} seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def smooth(values: list[float], window: int = 5) -> list[float]:
    """Trailing mean over `window` points: the curves' step-to-step noise hides their order."""
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


# ---------------------------------------------------------------------------- files
def write_result(result: dict, out_dir: Path, figures=None) -> list[str]:
    """result.json, the plot, the claim's extra figures and table.md; returns the images' names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    image = out_dir / f"{result['experiment']}.png"
    plot(result, image)
    names = [image.name] + [p.name for p in (figures(result, out_dir) if figures else [])]
    result["files"] = names
    (out_dir / RESULT).write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "table.md").write_text(f"# Claim {result['claim']}: {result['title']}\n\n{result['paper']}\n\n"
                                      + section(result))
    return names


README_HEAD = """# The papers' claims at small scale

Each claim of the DeepSeek papers that nanoseek's architecture rests on, as an experiment
that trains small models and compares them: `nanoseek experiment NAME [--budget-minutes M]
[--seeds 2] [--device cuda|cpu] [--out DIR]` (`nanoseek experiment --help` lists them; the
code is `nanoseek/experiments/`). Every arm trains the same steps on the same documents (the
built-in arithmetic and Countdown tasks' train split) through the project's trainer; the
held-out loss is measured on their test split, which no training problem shares.

**Equal compute is computed**: each arm's row shows total and activated parameters and
training FLOPs per token from `nanoseek.info.model_info`, and arms that must match are sized
by a search over a width, held to the stated tolerance.

**Verdicts hold at the scale they were measured at only.** A claimed advantage *supports*
the claim when it exceeds the larger seed range (max − min) of the two arms, *contradicts*
it when it is reversed by that much (for an accuracy over n problems, by at least two
binomial standard errors), and is *inconclusive* otherwise; a figure the paper states as a
level is *within*, *below* or *above* it. Figures are mean ± half the range over seeds;
"seeds' spread" is that larger range.
The CPU-scale results are tiny models trained for a few minutes on a shared 2-core machine:
they test that each experiment runs end to end and show what such models do, not what the
papers' billion-parameter models do.

Scales: `gpu` (the default with CUDA: 8 minutes an experiment on one H100/H200, so that one
device call runs one) and `cpu` (tiny models). This file is regenerated from the
`result.json` files below it after every experiment; after copying a device run's
`<scale>/<name>/` folder here, regenerate it with
`python -c "from nanoseek.experiments.report import write_readme; write_readme('benchmarks/results/claims')"`.
"""


def write_readme(root: str | Path) -> Path:
    from . import EXPERIMENTS

    root = Path(root)

    results = {}
    for path in sorted(root.glob(f"*/*/{RESULT}")):
        r = json.loads(path.read_text())
        results.setdefault(r["experiment"], []).append((path.parent.relative_to(root).as_posix(), r))
    parts = [README_HEAD]
    for name in EXPERIMENTS:
        exp = importlib.import_module(f".{name}", __package__).EXPERIMENT
        parts.append(f"## Claim {exp.claim}: {exp.title} (`nanoseek experiment {name}`)\n\n{exp.paper}\n")
        found = sorted(results.get(name, []), key=lambda x: x[1]["scale"]["name"] != "gpu")
        if not found:
            parts.append("Not run yet.\n")
        for folder, r in found:
            # the code's caveat (also for older results), then what the run's own conditions were
            r["note"] = " ".join(filter(None, (exp.notes.get(r["scale"]["name"], ""), r.get("run_note", ""))))
            parts.append(f"### {SCALE_TITLES.get(r['scale']['name'], r['scale']['name'])} "
                         f"([JSON]({folder}/{RESULT}))\n\n" + section(r, image_prefix=folder + "/"))
    path = root / "README.md"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path
