"""report.md of an `nanoseek r1` run: accuracy after each stage, and the RL curves.

The table gives each stage's held-out greedy accuracy with its 95% Wilson score interval
(Wilson 1927; unlike the normal approximation it stays inside [0, 1] and holds up at 0 or n
correct). The curves are the R1 paper's Figure 2 and 3 shapes for each RL stage: held-out
accuracy and mean response length over the RL steps (each GRPO run's plots/rl.png, which also
shows the reward). Whether response length grew is decided on the per-step mean lengths:
the last quarter of the steps against the first, a change beyond two standard errors of the
difference of their means counting as growth (or shrinkage), anything less as no clear change.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from ..train.metrics import read_metrics

Z95 = 1.959964  # the standard normal's 97.5% quantile
MIN_TREND_STEPS = 20  # RL steps a length verdict needs: quarters of 5

FORMATS = {"r1_zero": "R1-Zero template", "plain": "pretraining text", "chat": "chat template"}


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion correct/n."""
    if n < 1:
        raise ValueError("an interval needs n >= 1")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def length_trend(records: list[dict]) -> dict | None:
    """The mean response length of the first and the last quarter of the RL steps, their
    difference with its standard error, and a verdict: grew, shrank, or no clear change.
    None with fewer than MIN_TREND_STEPS steps: two standard errors estimated from fewer than
    five points a quarter are no guide (Student's t at 2 degrees of freedom is 4.3, not 2)."""
    lengths = [r["response_length"] for r in records if isinstance(r.get("response_length"), (int, float))]
    if len(lengths) < MIN_TREND_STEPS:
        return None
    q = len(lengths) // 4
    first, last = lengths[:q], lengths[-q:]

    def mean_var(xs):
        m = sum(xs) / len(xs)
        return m, sum((x - m) ** 2 for x in xs) / (len(xs) - 1)

    (m0, v0), (m1, v1) = mean_var(first), mean_var(last)
    change, se = m1 - m0, math.sqrt(v0 / q + v1 / q)
    verdict = "grew" if change > 2 * se else "shrank" if change < -2 * se else "no clear change"
    return {"steps": len(lengths), "quarter": q, "first": m0, "last": m1, "change": change, "se": se,
            "verdict": verdict}


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def accuracy_cells(r: dict) -> str:
    lo, hi = wilson_interval(r["correct"], r["n"])
    return f"{r['n']} | {pct(r['accuracy'])} | {pct(lo)} – {pct(hi)}"


def what_it_did(r: dict, settings: dict) -> str:
    name = r["stage"]
    if name == "base":
        return "the pretrained model, before any stage"
    if name == "rejection":
        return (f"kept {r['kept']} of {r['samples']} samples (correct and well-formed; {r['prompts_with_a_pass']} of "
                f"{r['prompts']} prompts had one), mixed with {r['cold_start_chats']} cold-start chats: "
                f"{r['chats']} chats → `{r['data']}`")
    if "rewards" in r:
        start = "the base" if r["start"] == "base" else f"`{r['start']}`"
        return f"GRPO from {start}, {r['steps']} steps, rewards {json.dumps(r['rewards'])}"
    return f"SFT of the base on `{r['data']}`, {r['steps']} steps, final loss {r['final_loss']:.3f}"


def rl_section(out: Path, r: dict) -> list[str]:
    name = r["stage"]
    records = read_metrics(out / name)
    plot = out / name / "plots" / "rl.png"
    lines = ["", f"### {r['title']} (`{name}/`)", ""]
    if plot.is_file():
        (out / "plots").mkdir(exist_ok=True)
        shutil.copy2(plot, out / "plots" / f"{name}_rl.png")
        lines += [f"![{r['title']}: reward, accuracy and response length over steps](plots/{name}_rl.png)", ""]
    curve = ", ".join(f"{pct(p['eval_accuracy'])} (step {p['step']})" for p in r["curve"])
    lines.append(f"Held-out greedy accuracy (n={r['n']}) over the steps: {curve}.")
    trained = [x for x in records if isinstance(x.get("accuracy"), (int, float))]
    if trained:
        q = max(1, len(trained) // 4)
        first = sum(x["accuracy"] for x in trained[:q]) / q
        last = sum(x["accuracy"] for x in trained[-q:]) / q
        lines.append(f"Accuracy of the sampled rollouts: {pct(first)} over the first {q} steps, {pct(last)} over "
                     f"the last {q}.")
    trend = length_trend(records)
    if trend is None:
        lines.append(f"Response length: too few steps (fewer than {MIN_TREND_STEPS}) to tell a trend.")
    else:
        lines.append(
            f"Mean response length: {trend['first']:.1f} tokens over the first {trend['quarter']} steps, "
            f"{trend['last']:.1f} over the last {trend['quarter']} ({trend['change']:+.1f} ± "
            f"{2 * trend['se']:.1f}, two standard errors): **{trend['verdict']}**.")
    return lines


def write_report(out: Path, settings: dict, results: list[dict], device: str) -> Path:
    zero = settings["stages"] == "zero"
    title = "R1-Zero" if zero else "the R1 pipeline"
    lines = [f"# nanoseek r1: {title} on {settings['task']} level {settings['level']}", "",
             f"Base model `{settings['model']}`; device: {device}. Held-out problems: the task's test split, "
             f"which no training problem shares; greedy decoding, {settings['max_new_tokens']} new tokens at most.",
             "",
             "## Held-out accuracy after each stage", "",
             "| stage | what it did | prompt | n | greedy accuracy | 95% interval (Wilson) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        if "accuracy" in r:
            lines.append(f"| {r['title']} | {what_it_did(r, settings)} | {FORMATS[r['format']]} | "
                         f"{accuracy_cells(r)} |")
        else:
            lines.append(f"| {r['title']} | {what_it_did(r, settings)} | | | | |")
    rl = [r for r in results if "curve" in r]
    if rl:
        lines += ["", "## RL curves", "",
                  "Accuracy and mean response length over the RL steps, the shapes of the R1 paper's Figures 2 "
                  "and 3. A length change counts when the last quarter's per-step mean differs from the "
                  "first quarter's by more than two standard errors."]
        for r in rl:
            lines += rl_section(out, r)
    if zero and rl:
        trend = length_trend(read_metrics(out / rl[0]["stage"]))
        answer = ("too few RL steps to tell" if trend is None else
                  "yes" if trend["verdict"] == "grew" else
                  f"no: it {trend['verdict']}" if trend["verdict"] == "shrank" else
                  "no clear change (a null result)")
        lines += ["", f"**Did the response length grow over R1-Zero's RL, as in the paper?** {answer}."]
    walls = " · ".join(f"{r['title']} {r['wall_s'] / 60:.1f} min" for r in results)
    total = sum(r["wall_s"] for r in results) / 60
    lines += ["", "## Run", "",
              f"Wall time per stage: {walls} (total {total:.1f} min; a resumed stage counts its last session only).",
              "",
              "Settings (`r1.json`):", "", "```json", json.dumps(settings, indent=2), "```", "",
              "Per-stage figures: `<stage>/stage.json`; per-step metrics: `<stage>/metrics.jsonl`; models: "
              "`<stage>/final` (HF layout)."]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
