"""What every claim's experiment does: train each arm for each seed, evaluate, compare.

    arms (sized, accounting checked) -> tokenizer and held-out batches, once
      -> steps from the budget (a short timed probe of each arm)
      -> per arm, per seed: `train.stages.pretrain` (the trainer; no loop of our own),
         held-out loss, task accuracy and the claim's own measurements
      -> summary over seeds, verdicts, table, plot, JSON (report.py)

Equal tokens: every arm and seed trains the same number of steps on the same documents
(the seed changes the initialisation and the order). The budget is the experiment's wall
time: the probe measures each arm's step time, and the steps are set so that training
takes `TRAIN_SHARE` of what the budget leaves after the data and the probe; evaluation
takes the rest. The JSON records the wall time it really took.

Verdict rule, per comparison the paper makes: the claimed-better arm's mean must beat the
other's by more than the larger of the two arms' seed ranges (max − min) to *support* the
claim at this scale; worse by that much *contradicts* it; anything between is
*inconclusive*. For an accuracy over n problems the margin is at least two binomial
standard errors, 2·sqrt(p(1 − p)/n), so that two seeds agreeing by chance decide nothing.
A figure the paper states as a level (85-90% acceptance, < 0.25% error) is *within*,
*below* or *above* it, by the seeds' mean.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..config import ModelConfig
from ..data.datasets import load_documents
from ..data.loader import PackedLoader
from ..data.tasks import format_pretrain, get_task
from ..data.tokenizer import ChatTokenizer, train_bpe
from ..speedrun import calibrate_steps
from ..train.evaluate import evaluate_task, heldout_loss
from ..train.stages import pretrain, read_specs, train_config
from .scale import DOMAINS, Scale
from .sizing import accounting, check_equal

TRAIN_SHARE = 0.7   # of the budget left after the data and the probe
# the trained arithmetic levels, easy to hard: level 1 alone saturated at the gpu scale (every arm
# 99-100%), so the task accuracy pools all three
ACCURACY_LEVELS = tuple(sorted(level for task, level in DOMAINS.values() if task == "arithmetic"))
MIN_STEPS = 10
CURVE_POINTS = 100  # training-curve points kept per run in the JSON


@dataclass
class Arm:
    name: str
    config: ModelConfig
    note: str = ""                              # what sets it apart, for the table
    train: dict = field(default_factory=dict)   # TrainConfig fields of this arm only


@dataclass
class Compare:
    """The paper says `better` beats `worse` on `metric`."""
    statement: str
    metric: str
    better: str
    worse: str
    paper: str
    lower_is_better: bool = True
    trials: str | None = None  # the run figure counting the trials `metric` is a rate over


@dataclass
class Bound:
    """The paper reports `metric` of `arm` within [low, high]."""
    statement: str
    metric: str
    arm: str
    low: float
    high: float
    paper: str


@dataclass
class Experiment:
    name: str
    claim: int
    title: str
    paper: str                                    # the paper's figures, a sentence or two
    arms: Callable[[Scale], list[Arm]]
    checks: list[Compare | Bound]
    metrics: list[tuple[str, str, str]]           # (key, column label, format) of per-run figures
    equal: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)  # (model_info key, arms)
    tolerance: float = 0.02                       # of the equalities in `equal`
    accuracy: bool = False                        # held-out arithmetic accuracy per run
    measure: Callable | None = None               # (model, data, scale) -> {metric: value}
    derive: Callable | None = None                # (runs) -> {arm: {metric: [per seed]}}
    figures: Callable | None = None               # (result, out_dir) -> [extra image paths]
    notes: dict[str, str] = field(default_factory=dict)  # scale name: what a result there does and does not show


@dataclass
class Data:
    spec: str                            # the training documents (built-in tasks' train split)
    tokenizer: ChatTokenizer
    tokenizer_dir: Path
    heldout: list[dict]                  # validation batches, every domain
    domains: dict[str, list[dict]]       # validation batches of each domain


def build_data(scale: Scale, work: Path) -> Data:
    """The training spec, one BPE tokenizer for every arm, and the held-out batches."""
    spec = ",".join(f"builtin:{task}:level={level}:n={scale.docs_per_domain}" for task, level in DOMAINS.values())
    tok = ChatTokenizer(train_bpe(read_specs(spec, load_documents), scale.trunk["vocab_size"]))
    tok_dir = work / "tokenizer"
    tok.save(tok_dir)

    def batches(docs: list[str], rows: int) -> list[dict]:
        token_docs = [[tok.bos_id] + ids for ids in tok.encode_batch(docs)]  # as pretrain packs them
        loader = PackedLoader(token_docs, scale.batch_size, scale.seq_len, seed=0, eos_id=tok.eos_id)
        return [loader.next_batch() for _ in range(math.ceil(rows / scale.batch_size))]

    docs = {name: [format_pretrain(e) for e in get_task(task).generate(
                scale.heldout_docs_per_domain, level=level, split="test", seed=0)]
            for name, (task, level) in DOMAINS.items()}
    return Data(spec, tok, tok_dir, heldout=batches([d for ds in docs.values() for d in ds], scale.heldout_rows),
                domains={name: batches(ds, max(1, scale.heldout_rows // len(DOMAINS))) for name, ds in docs.items()})


def train_fields(scale: Scale, arm: Arm, steps: int, seed: int, device: str) -> dict:
    # save_every=0: only the final checkpoint; the runs are never resumed, so more would
    # only spend the budget
    return dict(scale.train_fields(), steps=steps, seed=seed, device=device, save_every=0, keep_last=1,
                warmup=max(1, min(scale.warmup, steps // 5)), **arm.train)


def steps_for_budget(arms: list[Arm], scale: Scale, data: Data, work: Path, device: str, n_seeds: int,
                     budget_s: float, started: float) -> tuple[int, dict]:
    """Steps per run that fit the budget, from each arm's timed probe (speedrun's)."""
    step_s = {}
    for arm in arms:
        fields = train_fields(scale, arm, 1, 0, device)
        fields.pop("steps")
        step_s[arm.name] = 60.0 / calibrate_steps(arm.config, fields, 1.0, data.spec, work, data.tokenizer_dir)
    left = TRAIN_SHARE * (budget_s - (time.time() - started))
    return max(MIN_STEPS, int(left / (n_seeds * sum(step_s.values())))), step_s


def curve(records: list[dict]) -> dict:
    """Training loss (and MaxVio) by step, thinned to about CURVE_POINTS points."""
    stride = max(1, len(records) // CURVE_POINTS)
    kept = records[stride - 1::stride]
    if records and kept[-1] is not records[-1]:
        kept.append(records[-1])
    out = {"step": [r["step"] for r in kept], "main_loss": [r["main_loss"] for r in kept]}
    if any("maxvio_mean" in r for r in kept):
        out["maxvio"] = [r.get("maxvio_mean") for r in kept]
    return out


def run_arm(exp: Experiment, arm: Arm, seed: int, steps: int, scale: Scale, data: Data, device: str,
            run_dir: Path) -> dict:
    """Train one arm with one seed; its evaluations. The model is not kept."""
    tcfg = train_config(**train_fields(scale, arm, steps, seed, device))
    trainer, tok, records = pretrain(arm.config, tcfg, data.spec, run_dir, tokenizer=data.tokenizer_dir,
                                     progress=False)
    model = trainer.model
    run = {"arm": arm.name, "seed": seed, "val_loss": heldout_loss(model, data.heldout)}
    if exp.accuracy:
        for level in ACCURACY_LEVELS:
            run[f"accuracy_L{level}"] = evaluate_task(
                model, tok, "arithmetic", level, n=scale.eval_problems, fmt="plain",
                max_new_tokens=scale.eval_max_tokens, batch_size=scale.eval_problems,
                progress=False)["greedy_accuracy"]
        run["accuracy"] = sum(run[f"accuracy_L{level}"] for level in ACCURACY_LEVELS) / len(ACCURACY_LEVELS)
        run["accuracy_problems"] = scale.eval_problems * len(ACCURACY_LEVELS)
    if exp.measure is not None:
        run.update(exp.measure(model, data, scale))
    late = [r["maxvio_mean"] for r in records[len(records) // 2:] if "maxvio_mean" in r]
    if late:  # the trainer's per-step MaxVio (over the step's batch), once the router has settled
        run["maxvio_batch"] = sum(late) / len(late)
    run["train_seconds"] = sum(r["step_time_s"] for r in records)
    run["curve"] = curve(records)
    shutil.rmtree(run_dir, ignore_errors=True)
    return run


# ---------------------------------------------------------------------------- summary
def summarize(runs: list[dict], derived: dict | None = None) -> dict:
    """{arm: {metric: {values (by seed), mean, min, max}}} of every number a run reports."""
    values: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for key, value in run.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "seed":
                values.setdefault(run["arm"], {}).setdefault(key, []).append(float(value))
    for arm, metrics in (derived or {}).items():
        values.setdefault(arm, {}).update(metrics)
    return {arm: {key: {"values": vs, "mean": statistics.fmean(vs), "min": min(vs), "max": max(vs)}
                  for key, vs in metrics.items()} for arm, metrics in values.items()}


def verdict(check: Compare | Bound, summary: dict) -> dict:
    """One comparison's figures and its verdict at this scale (the module docstring's rule)."""
    if isinstance(check, Bound):
        s = summary[check.arm][check.metric]
        word = "below" if s["mean"] < check.low else "above" if s["mean"] > check.high else "within"
        return {"statement": check.statement, "metric": check.metric, "paper": check.paper, "ours": s["mean"],
                "spread": s["max"] - s["min"], "verdict": word}
    a, b = summary[check.better][check.metric], summary[check.worse][check.metric]
    gain = (b["mean"] - a["mean"]) * (1 if check.lower_is_better else -1)
    noise = max(a["max"] - a["min"], b["max"] - b["min"])
    if check.trials:  # a rate over n trials: seeds that agree by chance must not look decisive
        p, n = (a["mean"] + b["mean"]) / 2, summary[check.better][check.trials]["mean"]
        noise = max(noise, 2 * math.sqrt(p * (1 - p) / n))
    single = len(a["values"]) < 2
    word = ("supports" if gain > noise else "contradicts" if gain < -noise else "inconclusive")
    if single:
        word += " (one seed: no spread)"
    return {"statement": check.statement, "metric": check.metric, "paper": check.paper, "ours": {check.better: a["mean"],
            check.worse: b["mean"]}, "difference": gain, "spread": noise, "verdict": word}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def environment(device: str) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        commit = None
    name = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    return {"device": device, "device_name": name, "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__, "git_commit": os.environ.get("GIT_COMMIT") or commit,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# ---------------------------------------------------------------------------- the run
def run_experiment(exp: Experiment, scale: Scale, seeds: list[int], budget_minutes: float, device: str,
                   out: str | Path) -> dict:
    """Run every arm with every seed; writes result.json, table.md and the plots into
    out/<scale>/<name>/ and regenerates out/README.md. Returns the result."""
    from .report import write_readme, write_result

    started = time.time()
    arms = exp.arms(scale)
    rows = {arm.name: accounting(arm.config, scale.seq_len) for arm in arms}
    gaps = [{"metric": metric, "arms": list(names), "gap": check_equal(rows, metric, names, exp.tolerance)}
            for metric, names in exp.equal]
    with tempfile.TemporaryDirectory(prefix=f"nanoseek-{exp.name}-") as tmp:
        work = Path(tmp)
        data = build_data(scale, work)
        probe_s = {}
        steps = scale.steps
        if steps is None:
            steps, probe_s = steps_for_budget(arms, scale, data, work, device, len(seeds),
                                              budget_minutes * 60, started)
        runs = [run_arm(exp, arm, seed, steps, scale, data, device, work / f"{arm.name}-seed{seed}")
                for arm in arms for seed in seeds]
    summary = summarize(runs, exp.derive(runs) if exp.derive else None)
    result = {
        "experiment": exp.name, "claim": exp.claim, "title": exp.title, "paper": exp.paper,
        "note": exp.notes.get(scale.name, ""),
        "scale": {"name": scale.name, "budget_minutes": budget_minutes, "seeds": list(seeds), "steps": steps,
                  "batch_size": scale.batch_size, "seq_len": scale.seq_len,
                  "tokens_per_run": steps * scale.batch_size * scale.seq_len, "probe_step_seconds": probe_s,
                  "wall_minutes": (time.time() - started) / 60, **environment(device)},
        "domains": list(DOMAINS), "tolerance": exp.tolerance, "equalities": gaps,
        "arms": [{"name": arm.name, "note": arm.note, "train": arm.train, **rows[arm.name],
                  "config": {k: v for k, v in arm.config.to_dict().items() if k not in ("architectures",)}}
                 for arm in arms],
        "metrics": [list(m) for m in exp.metrics],
        "runs": runs, "summary": summary,
        "verdicts": [verdict(check, summary) for check in exp.checks],
    }
    out_dir = Path(out) / scale.name / exp.name
    result["files"] = write_result(result, out_dir, exp.figures)
    write_readme(Path(out))
    return result
