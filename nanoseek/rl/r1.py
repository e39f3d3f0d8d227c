"""`nanoseek r1`: the DeepSeek-R1 recipe as one resumable command.

    zero   base -> GRPO, R1-Zero template (R1 Table 1), accuracy + format rewards     -> zero_rl/
    full   base -> SFT on cold-start chats (built-in, or --cold-start FILE)           -> cold_start/
                -> GRPO, chat template, accuracy + format + language rewards         -> reasoning_rl/
                -> rejection sampling (correct, well-formed) + the cold-start chats  -> rejection/
           base -> SFT on that mix                                                   -> sft/
                -> GRPO, the same rewards                                            -> final_rl/

These are the stages of DeepSeek-R1 §2.3 at the scale of a built-in task: R1-Zero is RL on
the base model with no SFT (§2.2); the pipeline's cold start, reasoning-oriented RL with
the language-consistency reward (§2.3.2), rejection sampling whose data, mixed with
non-reasoning SFT data, fine-tunes the *base* model again (§2.3.3: "we fine-tune
DeepSeek-V3-Base ... using the above curated dataset"; here the cold-start chats stand in
for the non-reasoning data), then RL once more (§2.3.4; R1 adds reward models for helpfulness
and harmlessness there, which a verifiable task has no use for).

Each stage is the existing stage function (`train.stages.sft`, `rl.trainer.grpo`,
`rl.distill.rejection_sample`) writing into its own directory of the run; the next stage
reads what it wrote (a run's `final/`, the SFT mix file). A finished stage leaves
`stage.json` (its held-out accuracy and figures). Running the command again skips the
finished stages and resumes the unfinished one from its latest checkpoint (rejection sampling
keeps none: it runs again whole, from the same seed); `r1.json` keeps the settings,
and a re-run with other settings is refused rather than mixed in.

Held-out accuracy after each stage: greedy, on `eval_n` problems of the task's test split
(the problems `nanoseek eval` and GRPO's evaluations use), in the prompt format the stage's
model is trained for: the R1-Zero template for zero, the pretraining text format for the
base of full, the chat template after SFT. The GRPO stages evaluate along the way
(`curve_points` times) for the accuracy curve; their response lengths per step give the
length curve (R1's Figures 2 and 3). `report.md` (r1_report.py) gathers it all.

Defaults are a CPU smoke scale; on a GPU the settings of GPU_SETTINGS apply (key=value
words override either).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import CheckedConfig, described
from ..data.datasets import load_chats
from ..data.tasks import get_task
from ..infer.sampling import SamplingParams
from ..loading import load_model_dir, resolve_device, resolve_model_dir
from ..train.evaluate import evaluate_task
from ..train.metrics import read_metrics
from ..train.stages import read_specs, sft, train_config
from ..train.trainer import TrainConfig
from .distill import rejection_sample, task_rows, write_jsonl
from .trainer import GRPOConfig, generate_repeated, grpo, grpo_config

STAGE_FILE = "stage.json"      # a finished stage's results: the marker a re-run skips it by
SETTINGS_FILE = "r1.json"
HELD_OUT_SEED = 1234           # the test problems evaluate_task and GRPOTrainer.evaluate draw
ZERO_REWARDS = {"accuracy": 1.0, "format": 0.1}                     # R1 §2.2.2
REASONING_REWARDS = {"accuracy": 1.0, "format": 0.1, "language": 0.1}  # + R1 §2.3.2's language reward


@dataclass
class R1Config(CheckedConfig):
    kind = "r1"
    task: str = described("arithmetic", "built-in task (arithmetic, countdown)")
    level: int = described(1, "task difficulty")
    eval_n: int = described(200, "held-out problems per evaluation (95% interval about +-7 points at 50%)")
    max_new_tokens: int = described(96, "tokens per rollout, rejection sample and evaluation answer")
    cold_start_n: int = described(2000, "built-in cold-start chats when no --cold-start file is given")
    cold_start_steps: int = described(150, "SFT steps of the cold start")
    sft_steps: int = described(150, "SFT steps of the base on the rejection-sampled mix")
    sft_lr: float = described(1e-3, "learning rate of both SFT stages")
    batch_size: int = described(8, "SFT batch size")
    seq_len: int = described(256, "SFT sequence length")
    train: dict = described({}, "further TrainConfig fields of the SFT stages")
    zero_steps: int = described(60, "GRPO steps of R1-Zero")
    reasoning_steps: int = described(40, "GRPO steps of the reasoning RL after the cold start")
    final_steps: int = described(20, "GRPO steps of the final RL")
    group_size: int = described(8, "G completions per prompt")
    prompts_per_step: int = described(8, "prompts per GRPO step")
    grpo_lr: float = described(1e-4, "GRPO learning rate")
    temperature: float = described(1.0, "sampling temperature of the rollouts")
    curve_points: int = described(4, "held-out evaluations per RL stage, the last at its end")
    grpo: dict = described({}, "further GRPOConfig fields of every RL stage (beta, rewards, ...)")
    rejection_prompts: int = described(400, "training problems the RL model is sampled on")
    rejection_samples: int = described(4, "samples per problem")
    rejection_temperature: float = described(0.7, "their sampling temperature")
    save_every: int = described(25, "checkpoint every K steps within a stage, where a killed run resumes")
    seed: int = described(0, "seed of the data order, prompts and samples")
    device: str = described("auto", "auto (a GPU when there is one), cpu, cuda, cuda:N")

    def __post_init__(self):
        self.check_types()
        self.need_at_least(1, "level", "eval_n", "max_new_tokens", "cold_start_n", "cold_start_steps",
                           "sft_steps", "batch_size", "seq_len", "zero_steps", "reasoning_steps", "final_steps",
                           "group_size", "prompts_per_step", "curve_points", "rejection_prompts",
                           "rejection_samples", "save_every")
        for name, config in (("train", TrainConfig), ("grpo", GRPOConfig)):
            unknown = sorted(set(getattr(self, name)) - config.field_names())
            self.need(not unknown, name, f"unknown {config.kind} field(s) {', '.join(unknown)}")
        get_task(self.task).generate(1, level=self.level)  # a bad task or level fails now


# On a GPU: the speedrun's GPU settings (speedrun.grpo_settings and its SFT), over longer
# stages. A GRPO step of 32 x 16 samples took ~4 s on an H100 (benchmarks/results/r1/h100_zero:
# R1-Zero's 250 steps in ~17 minutes), so the pipeline's two RL stages get 120 + 60 steps to
# finish within ~20 minutes with its SFT stages (R1-Zero had made most of its gain by step 120).
GPU_SETTINGS = dict(eval_n=500, max_new_tokens=128, cold_start_n=6000, cold_start_steps=400, sft_steps=400,
                    sft_lr=5e-4, batch_size=32, seq_len=512, train={"compile": True},
                    zero_steps=250, reasoning_steps=120, final_steps=60, group_size=16, prompts_per_step=32,
                    grpo_lr=5e-5, curve_points=6,
                    grpo={"dynamic_sampling": True, "clip_eps_high": 0.28, "micro_batch": 256},
                    rejection_prompts=2000, save_every=50)


def r1_config(gpu: bool | None = None, **changes) -> R1Config:
    """The defaults (GPU_SETTINGS over them on a GPU; gpu=None: whether torch sees one) with
    `changes`; an unknown field is named with the known ones."""
    if gpu is None:
        gpu = torch.cuda.is_available() and changes.get("device", "auto") != "cpu"
    return R1Config.with_changes(**{**(GPU_SETTINGS if gpu else {}), **changes})


# ---------------------------------------------------------------------- one run
@dataclass
class Run:
    base: str
    out: Path
    stages: str
    cold_start: str | None
    cfg: R1Config
    progress: bool | None
    say: Callable[[str], None]
    results: dict = field(default_factory=dict)   # stage name -> its stage.json

    @property
    def cold_start_data(self) -> str:
        c = self.cfg
        return self.cold_start or f"builtin:{c.task}:level={c.level}:n={c.cold_start_n}:seed=1"


def held_out(model, tokenizer, cfg: R1Config, fmt: str) -> dict:
    """Greedy accuracy on cfg.eval_n test problems: {"correct", "n", "accuracy"}. fmt: chat or
    plain (evaluate_task, as `nanoseek eval`), or r1_zero (the engine on the R1-Zero
    template, as GRPOTrainer.evaluate does for that format)."""
    if fmt == "r1_zero":
        task = get_task(cfg.task)
        examples = task.generate(cfg.eval_n, level=cfg.level, split="test", seed=HELD_OUT_SEED, unique=True)
        _, outs, _ = generate_repeated(model, tokenizer, [ex.prompt for ex in examples],
                                       SamplingParams(max_tokens=cfg.max_new_tokens), prompt_format="r1_zero",
                                       max_new_tokens=cfg.max_new_tokens)
        correct = sum(task.check(ex, o.text) for ex, o in zip(examples, outs))
    else:
        r = evaluate_task(model, tokenizer, cfg.task, cfg.level, n=cfg.eval_n, fmt=fmt,
                          max_new_tokens=cfg.max_new_tokens, seed=HELD_OUT_SEED)
        correct = round(r["greedy_accuracy"] * cfg.eval_n)
    return {"correct": correct, "n": cfg.eval_n, "accuracy": correct / cfg.eval_n}


def stage_base(run: Run) -> dict:
    fmt = "r1_zero" if run.stages == "zero" else "plain"
    src, model, tokenizer = load_model_dir(run.base, run.cfg.device)
    return {"model": str(src), "format": fmt, **held_out(model, tokenizer, run.cfg, fmt)}


def run_sft(run: Run, name: str, data: str, steps: int) -> dict:
    c = run.cfg
    tcfg = train_config(steps=steps, lr=c.sft_lr, batch_size=c.batch_size, seq_len=c.seq_len,
                        warmup=max(1, steps // 10), save_every=c.save_every, keep_last=1, seed=c.seed,
                        device=c.device, **c.train)
    trainer, tokenizer, _ = sft(run.base, tcfg, data, run.out / name, resume=True, progress=run.progress)
    last = read_metrics(run.out / name)[-1]
    shown = str(Path(data).relative_to(run.out)) if Path(data).is_relative_to(run.out) else data
    return {"model": f"{name}/final", "format": "chat", "data": shown, "steps": trainer.step,
            "final_loss": last["loss"], **held_out(trainer.model, tokenizer, c, "chat")}


def run_grpo(run: Run, name: str, start: str, fmt: str, steps: int, rewards: dict) -> dict:
    """GRPO from the stage `start` (whose held-out accuracy is this run's step 0)."""
    c = run.cfg
    gcfg = grpo_config(**{
        "group_size": c.group_size, "prompts_per_step": c.prompts_per_step, "max_new_tokens": c.max_new_tokens,
        "temperature": c.temperature, "lr": c.grpo_lr, "beta": 0.0, "rewards": rewards, "level": c.level,
        "prompt_format": fmt, "eval_every": max(1, math.ceil(steps / c.curve_points)), "eval_n": c.eval_n,
        "save_every": c.save_every, "keep_last": 1, "steps": steps, "seed": c.seed, "device": c.device,
        **c.grpo})
    before = run.results[start]
    source = run.base if start == "base" else run.out / start
    trainer, _ = grpo(source, c.task, gcfg, run.out / name, resume=True, progress=run.progress,
                      before={"eval_accuracy": before["accuracy"]})
    curve = [{"step": r["step"], "eval_accuracy": r["eval_accuracy"]}
             for r in read_metrics(run.out / name) if "eval_accuracy" in r]
    correct = round(curve[-1]["eval_accuracy"] * c.eval_n)
    return {"model": f"{name}/final", "format": fmt, "start": start, "steps": trainer.step,
            "rewards": gcfg.rewards, "correct": correct, "n": c.eval_n, "accuracy": correct / c.eval_n,
            "curve": curve}


def stage_zero_rl(run: Run) -> dict:
    return run_grpo(run, "zero_rl", "base", "r1_zero", run.cfg.zero_steps, ZERO_REWARDS)


def stage_cold_start(run: Run) -> dict:
    return run_sft(run, "cold_start", run.cold_start_data, run.cfg.cold_start_steps)


def stage_reasoning_rl(run: Run) -> dict:
    return run_grpo(run, "reasoning_rl", "cold_start", "chat", run.cfg.reasoning_steps, REASONING_REWARDS)


def stage_rejection(run: Run) -> dict:
    """Samples of the reasoning-RL model on fresh training problems; the correct, well-formed
    ones plus the cold-start chats -> rejection/sft_mix.jsonl, the next SFT's data."""
    c = run.cfg
    rows = task_rows(c.task, c.level, c.rejection_prompts, seed=c.seed + 1)
    kept_file = run.out / "rejection" / "rejection.jsonl"
    stats = rejection_sample(run.out / "reasoning_rl", rows, kept_file, n=c.rejection_samples,
                             temperature=c.rejection_temperature, max_tokens=c.max_new_tokens, seed=c.seed,
                             device=c.device)
    kept = [json.loads(line) for line in kept_file.read_text().splitlines()]
    cold = read_specs(run.cold_start_data, load_chats)
    mix = write_jsonl(run.out / "rejection" / "sft_mix.jsonl", kept + [{"messages": chat} for chat in cold])
    return {"data": str(mix.relative_to(run.out)), "kept": stats["kept"], "samples": stats["samples"],
            "prompts": stats["prompts"], "prompts_with_a_pass": stats["prompts_with_a_pass"],
            "mean_pass_rate": stats["mean_pass_rate"], "cold_start_chats": len(cold), "chats": len(kept) + len(cold)}


def stage_sft(run: Run) -> dict:
    return run_sft(run, "sft", str(run.out / run.results["rejection"]["data"]), run.cfg.sft_steps)


def stage_final_rl(run: Run) -> dict:
    return run_grpo(run, "final_rl", "sft", "chat", run.cfg.final_steps, REASONING_REWARDS)


# name, title, function; in order
PIPELINES: dict[str, list[tuple[str, str, Callable[[Run], dict]]]] = {
    "zero": [("base", "base model", stage_base),
             ("zero_rl", "R1-Zero RL", stage_zero_rl)],
    "full": [("base", "base model", stage_base),
             ("cold_start", "cold-start SFT", stage_cold_start),
             ("reasoning_rl", "reasoning RL", stage_reasoning_rl),
             ("rejection", "rejection sampling", stage_rejection),
             ("sft", "SFT of the base", stage_sft),
             ("final_rl", "final RL", stage_final_rl)],
}


def claim(out: Path, settings: dict) -> None:
    """Record the run's settings in out/r1.json, or check that a run already there has the same."""
    path = out / SETTINGS_FILE
    if path.is_file():
        before = json.loads(path.read_text())
        differ = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if differ:
            changes = ", ".join(f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" for k in differ)
            raise ValueError(f"{out} holds an r1 run with other settings ({changes}); run the same command to "
                             "resume it, or choose another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n")


def r1(base: str | Path, out: str | Path, stages: str = "full", cold_start: str | None = None,
       cfg: R1Config | None = None, progress: bool | None = None, say: Callable[[str], None] = print) -> Path:
    """Run (or resume) the recipe into `out`; returns out/report.md."""
    from .r1_report import write_report
    if stages not in PIPELINES:
        raise ValueError(f"stages must be one of {', '.join(PIPELINES)}, not {stages!r}")
    if cold_start is not None and stages != "full":
        raise ValueError("a cold-start file is for --stages full; R1-Zero has no SFT")
    cfg = cfg or r1_config()
    device = resolve_device(cfg.device)  # a wrong device or path fails before anything is written
    resolve_model_dir(base)
    out = Path(out)
    settings = {"model": str(Path(base)), "stages": stages, "cold_start": cold_start, **dataclasses.asdict(cfg)}
    claim(out, settings)
    run = Run(str(Path(base)), out, stages, cold_start, cfg, progress, say)
    t0 = time.time()
    plan = PIPELINES[stages]
    for i, (name, title, fn) in enumerate(plan, 1):
        marker = out / name / STAGE_FILE
        if marker.is_file():
            run.results[name] = json.loads(marker.read_text())
            say(f"[r1 {time.time() - t0:6.0f}s] {i}/{len(plan)} {title}: finished before, skipped")
            continue
        say(f"[r1 {time.time() - t0:6.0f}s] {i}/{len(plan)} {title} -> {out / name}")
        t = time.time()
        result = {"stage": name, "title": title, **fn(run), "wall_s": time.time() - t}
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(marker)  # the marker appears whole or not at all
        run.results[name] = result
        acc = f": held-out {result['accuracy']:.1%} (n={result['n']})" if "accuracy" in result else ""
        say(f"[r1 {time.time() - t0:6.0f}s] {i}/{len(plan)} {title} done in {result['wall_s']:.0f}s{acc}")
    where = (torch.cuda.get_device_name(device) if device.type == "cuda" else
             f"{device.type} ({os.cpu_count()} cores)" if device.type == "cpu" else device.type)
    report = write_report(out, settings, [run.results[name] for name, _, _ in plan],
                          device=f"{where}, torch {torch.__version__}")
    say(f"[r1 {time.time() - t0:6.0f}s] report: {report}")
    return report


# ---------------------------------------------------------------------- command line
def add_r1_args(p: argparse.ArgumentParser) -> None:
    from ..cli import add_list_fields, positive_int  # the command line's shared options (cli imports us)
    p.add_argument("--model", required=True, metavar="BASE", help="the pretrained base model (checkpoint or run dir)")
    p.add_argument("--task", default="arithmetic", metavar="NAME", help="built-in task (arithmetic, countdown)")
    p.add_argument("--level", type=positive_int, default=None, metavar="L", help="task difficulty (default 1)")
    p.add_argument("--stages", choices=tuple(PIPELINES), default="full",
                   help="zero: GRPO on the base with the R1-Zero template; full: cold-start SFT, reasoning RL, "
                        "rejection sampling + SFT of the base, final RL")
    p.add_argument("--cold-start", metavar="FILE", help="cold-start chats (.jsonl/.json/.parquet with messages; "
                   "default: the task's built-in worked solutions)")
    p.add_argument("--out", required=True, metavar="DIR", help="the run directory; run the same command to resume")
    add_list_fields(p, R1Config, "\n(on a GPU, GPU_SETTINGS in nanoseek/rl/r1.py replace some defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="R1 settings, JSON values (zero_steps=100 eval_n=500 grpo='{\"beta\": 0.001}')")
    p.set_defaults(rerun_resumes=True)  # an interrupted run says: run the same command again


def cmd_r1(args: argparse.Namespace) -> None:
    from ..config import coerce_value
    changes = {"task": args.task}
    if args.level is not None:
        changes["level"] = args.level
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key=value")
        changes[key] = coerce_value(value)
    r1(args.model, args.out, args.stages, args.cold_start, r1_config(**changes))
