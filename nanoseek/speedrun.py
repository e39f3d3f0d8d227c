"""`nanoseek speedrun` — what `make run` runs: the whole pipeline on built-in data.

    tokenizer (BPE on the data) -> pretrain -> eval -> SFT (R1 cold-start format) -> eval
        -> GRPO on a task of the right difficulty -> eval -> report.md

The data are the built-in verifiable tasks: multi-digit arithmetic with worked column
solutions and Countdown. On a GPU the `small` preset trains within budgets in minutes: a few
calibration steps measure the step time and set the number of steps, so the learning-rate
schedule completes within the budget. On a CPU the run's work is fixed instead (CPU_STEPS),
so that its results do not depend on how busy the machine is; `--minutes` gives it a budget
as on a GPU. `--seed` changes everything random: the generated data, the initialization, the
data order and the rollouts.

Held-out accuracies are measured on EVAL_N problems of the test split, disjoint from all
training data, each with its 95% Wilson interval; a stage's effect is the paired difference
on the same problems with its interval (train/intervals.py), so the report can say whether
the stage helped beyond noise.

GRPO stage (R1's reasoning RL after the cold start). RL learns only where the model is
sometimes right: a group whose G samples are all wrong (or all right) has zero advantages.
So the SFT model's held-out greedy accuracy on GRPO_CANDIDATES is looked at in order, and
the first (task, level) in GRPO_BAND is trained (else the one closest to GRPO_TARGET). With
a budget in minutes, two throwaway steps measure the step time, which sets the number of
steps and the evaluation interval; the loop also stops at the deadline whatever the
estimate (`GRPOTrainer.fit(deadline=)`), with the final held-out evaluation and checkpoint
at the step where it stops.

The report opens with one line per stage (what it did, whether it helped), then the config,
parameter counts, the KV-cache saving against MHA, loss and MaxVio plots, held-out
accuracies, the GRPO task choice and curves, throughput, wall and CPU time, and ends with
the command that reproduces it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import shutil
import time
from pathlib import Path

import torch

from .config import preset
from .data.tasks import format_chat, get_task
from .info import model_info
from .rl.trainer import GRPOConfig, GRPOTrainer, grpo, grpo_config
from .train.evaluate import evaluate_task
from .train.intervals import paired_difference, paired_mean_difference
from .data.datasets import load_documents
from .data.tokenizer import ChatTokenizer, train_bpe
from .fp8 import fast_fp8
from .train.stages import load_base, pretrain, read_specs, sft, train_config


def pretrain_data(gpu: bool, seed: int) -> str:
    """(task, level, n) of the pretraining documents. On a GPU the small model masters levels 1
    and 2 (benchmarks/results/speedrun_h200/report.md); a little of level 3 (2-digit
    multiplication) gives it a level it only partly solves, where GRPO can teach."""
    spec = f"builtin:arithmetic:level=1:n=30000:seed={seed},builtin:arithmetic:level=2:n=3000:seed={seed}"
    return spec + (f",builtin:arithmetic:level=3:n=3000:seed={seed}" if gpu else "")


def sft_data(gpu: bool, seed: int) -> str:
    """The SFT chats: other problems of the same levels, and on a GPU Countdown too."""
    s = seed + 1  # other draws than the pretraining documents'
    spec = f"builtin:arithmetic:level=1:n=6000:seed={s},builtin:arithmetic:level=2:n=3000:seed={s}"
    return spec + (f",builtin:countdown:level=1:n=2000:seed={s},builtin:arithmetic:level=3:n=1000:seed={s}"
                   if gpu else "")


# (task, level, k of pass@k) evaluated after SFT
EVALS = [("arithmetic", 1, 4), ("arithmetic", 2, 0), ("countdown", 1, 0)]
# On a CPU: level 1 only (countdown stays at 0% on the CPU model, pass@k would cost k more
# evaluations, and the GRPO task choice evaluates level 2 itself when level 1 is out of its band)
EVALS_CPU = [("arithmetic", 1, 0)]
EVAL_N = 200  # held-out problems per evaluation: +-7 points at 50%, a paired change of +-5 or less

# GRPO: the first candidate whose held-out greedy accuracy after SFT lies in the band
GRPO_CANDIDATES = [("arithmetic", 1), ("arithmetic", 2), ("arithmetic", 3), ("arithmetic", 4),
                   ("countdown", 1), ("countdown", 2)]
GRPO_BAND = (0.10, 0.70)
GRPO_TARGET = 0.35  # without a candidate in the band: the one closest to this
GRPO_CURVE_POINTS = 2  # held-out evaluations during the GRPO stage (the last at its end)
# Before and after GRPO also R1's metric: pass@1 as the mean of samples at T = 0.6 per problem
# (DeepSeek-R1 §3.1); fewer samples on a CPU, where each costs about one greedy evaluation
SAMPLED_T = 0.6
SAMPLED_K = {"gpu": 4, "cpu": 2}

# The CPU run's work, fixed so that its results do not depend on the machine's load. GRPO
# gets about 40% of the time; SFT's 600 steps (not 400) took level 2, where GRPO then works,
# from 7.5% to 18.5% on the seed whose pretraining learned it least
# (benchmarks/results/grpo_cpu_settings/README.md)
CPU_STEPS = {"pretrain": 1400, "sft": 600, "grpo": 80}
# seconds per step on an idle 2-core CPU (an evaluation: EVAL_N problems): a 16x128-token
# step costs 0.24 s of CPU time on one thread, a GRPO step 5 s on one thread
# (grpo_cpu_200steps); only for the progress lines' estimate, never for the number of steps
CPU_STEP_SECONDS = {"pretrain": 0.22, "sft": 0.22, "grpo": 4.5, "eval": 15.0}


def cpu_model():
    """The CPU run's model: `tiny` widened a little so that it can learn carries in minutes."""
    return preset("tiny", hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
                  num_hidden_layers=4, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=64,
                  qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8,
                  num_experts_per_tok=2, n_group=2, topk_group=1)


def calibrate_steps(model_cfg, tcfg_kwargs: dict, minutes: float, data: str, out: Path,
                    tokenizer: Path | None = None) -> int:
    """Steps that fit `minutes`, from the median time of a few throwaway steps (on the run's
    tokenizer when given, else one trained for the probe)."""
    probe = out / ".calibrate"
    shutil.rmtree(probe, ignore_errors=True)
    n = 24
    trainer, _, records = pretrain(model_cfg, train_config(steps=n, **tcfg_kwargs), data, probe,
                                   tokenizer=tokenizer, progress=False)
    # the first steps run slow (allocator, compile, and on a CPU the threads still busy after
    # the tokenizer's training), so only the second half counts
    times = sorted(r["step_time_s"] for r in records[n // 2:])
    shutil.rmtree(probe, ignore_errors=True)
    # + 4%: what a whole run adds to its median step (logging, checkpoints, slower steps)
    step_s = times[len(times) // 2] * 1.04
    return max(20, int(minutes * 60 / step_s))


def cpu_seconds() -> float:
    """CPU time of this process so far, all its threads (user + system)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class StageClock:
    """The speedrun's progress lines: elapsed time, and the time left estimated from the
    stages' planned seconds, scaled by how the finished stages went against their plan."""

    def __init__(self, planned: dict[str, float]):
        self.planned, self.took = dict(planned), {}
        self.t0 = self.t_stage = time.time()
        self.stage = None

    def start(self, stage: str, what: str) -> None:
        now = time.time()
        if self.stage is not None:
            self.took[self.stage] = now - self.t_stage
        self.stage, self.t_stage = stage, now
        planned_done = sum(self.planned.get(s, 0.0) for s in self.took)
        pace = sum(self.took.values()) / planned_done if planned_done > 0 else 1.0
        left = pace * sum(v for s, v in self.planned.items() if s not in self.took)
        self.say(f"{what} (about {left / 60:.1f} min left)")

    def say(self, msg: str) -> None:
        print(f"[speedrun {time.time() - self.t0:5.0f}s] {msg}", flush=True)


def speedrun(out: str | Path = "runs/speedrun", minutes: float | None = None,
             grpo_minutes: float | None = None, seed: int = 0, precision: str = "auto") -> Path:
    """minutes: pretrain + SFT budget (default on a GPU 20; on a CPU CPU_STEPS' fixed steps);
    grpo_minutes: the GRPO stage's budget (default on a GPU 6, on a CPU its fixed steps; 0
    skips the stage); seed: of the data, the initialization, the data order and the rollouts;
    precision: of every training stage (train/precision.py)."""
    t_start, cpu_start = time.time(), cpu_seconds()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    train_config(precision=precision)  # a bad value fails before any work
    if precision == "fp8":
        fast_fp8("cuda" if gpu else "cpu")  # and so does a GPU that cannot run FP8
    timed = gpu or minutes is not None  # budgets in minutes; else the fixed CPU_STEPS
    minutes = minutes or 20.0
    grpo_timed = gpu or grpo_minutes is not None
    grpo_minutes = 6.0 if grpo_minutes is None else grpo_minutes
    data, chats = pretrain_data(gpu, seed), sft_data(gpu, seed)
    # save_every=0 (here and in grpo_settings): a speedrun starts its stages afresh, so
    # checkpoints along the way would only spend its budget
    if gpu:
        model_cfg = preset("small")
        common = dict(batch_size=32, seq_len=512, warmup=50, compile=True, save_every=0, seed=seed,
                      precision=precision)
        sft_shape = {}
        pre_lr, sft_lr = 2e-3, 5e-4
        pre_schedule = "cosine"
    else:
        model_cfg = cpu_model()
        # small batches, many steps: on a CPU budget, steps teach more than tokens per step;
        # 128 tokens hold two packed documents and cost a quarter less than 256 (attention)
        common = dict(batch_size=16, seq_len=128, warmup=30, save_every=0, seed=seed, precision=precision)
        # one chat per row: 128 tokens fit the longest level-2 chat (about 120)
        sft_shape = dict(batch_size=16, seq_len=128)
        # the chat tokens are new to the pretrained model, which must learn again to read the
        # operands inside them: a lower SFT rate left some seeds misreading digits after 600 steps
        pre_lr, sft_lr = 5e-3, 2e-3
        # V3's warmup-stable-decay shape: the peak rate held to 80% of the run. Pretrained under
        # cosine decay, seeds 0 / 1 / 2 answered level 1 88% / 27% / 98%, under wsd 90% / 96% / 99%
        # (the reports in benchmarks/results/speedrun_cpu_seed*, and their git history)
        pre_schedule = "wsd"
    evals_after_sft = EVALS if gpu else EVALS_CPU
    evals_s = CPU_STEP_SECONDS["eval"] * sum(1 + k for _, _, k in evals_after_sft)
    if timed:
        planned = {"pretrain": 0.7 * 60 * minutes, "sft": 0.3 * 60 * minutes}
    else:
        planned = {stage: CPU_STEPS[stage] * CPU_STEP_SECONDS[stage] for stage in ("pretrain", "sft")}
    planned["eval_pretrained"], planned["eval"] = CPU_STEP_SECONDS["eval"], evals_s
    if grpo_minutes > 0 or not grpo_timed:
        planned["grpo"] = (60 * grpo_minutes if grpo_timed
                           else CPU_STEPS["grpo"] * CPU_STEP_SECONDS["grpo"]
                           + (GRPO_CURVE_POINTS + 2 * SAMPLED_K["cpu"]) * CPU_STEP_SECONDS["eval"])
    clock = StageClock(planned)

    # ---- pretrain (the tokenizer is trained on the same documents first)
    for stage in ("pretrain", "sft", "grpo"):
        shutil.rmtree(out / stage, ignore_errors=True)
    clock.start("pretrain", "pretrain: the tokenizer" + (", then a few steps to time them" if timed else ""))
    bpe = out / ".tokenizer"  # trained once on the pretraining documents, for the probe and the run
    ChatTokenizer(train_bpe(read_specs(data, load_documents), model_cfg.vocab_size)).save(bpe)
    if timed:
        steps = calibrate_steps(model_cfg, dict(common, lr=pre_lr), 0.7 * minutes, data, out, bpe)
        sft_steps = max(20, int(steps * 0.3 / 0.7))
    else:
        steps, sft_steps = CPU_STEPS["pretrain"], CPU_STEPS["sft"]
    clock.say(f"pretrain: {steps} steps of {common['batch_size']}x{common['seq_len']} tokens")
    t0 = time.time()
    trainer, tok, pre_records = pretrain(model_cfg, train_config(steps=steps, lr=pre_lr, schedule=pre_schedule,
                                                              **common),
                                         data, out / "pretrain", tokenizer=bpe)
    shutil.rmtree(bpe, ignore_errors=True)
    pre_wall = time.time() - t0
    model_cfg = trainer.model.config

    clock.start("eval_pretrained", "eval of the pretrained model (plain format)")
    pre_eval = [evaluate_task(trainer.model, tok, "arithmetic", 1, n=EVAL_N, fmt="plain", per_problem=True)]

    # ---- SFT in the R1 cold-start format: <think> reasoning </think> <answer> answer </answer>
    clock.start("sft", f"sft: {sft_steps} steps")
    t0 = time.time()
    sft_trainer, tok, sft_records = sft(out / "pretrain",
                                        train_config(steps=sft_steps, lr=sft_lr, **dict(common, warmup=10, **sft_shape)),
                                        chats, out / "sft")
    sft_wall = time.time() - t0

    # ---- eval on held-out problems (the test split is disjoint from all training data)
    clock.start("eval", "eval of the SFT model")
    evals = [evaluate_task(sft_trainer.model, tok, task, level, n=EVAL_N, k=k, per_problem=True,
                           max_new_tokens=answer_budget(tok, task, level))
             for task, level, k in evals_after_sft]
    for e in evals:
        clock.say(f"{e['task']} level {e['level']}: greedy {accuracy_text(e['greedy_accuracy'], e['greedy_interval'])}")

    # ---- GRPO on the first task of the right difficulty
    grpo_summary, grpo_wall = None, 0.0
    if "grpo" in planned:
        clock.start("grpo", "grpo: the task, then the steps")
        t0 = time.time()
        grpo_summary = grpo_stage(sft_trainer.model, tok, out, gpu, say=clock.say, seed=seed, precision=precision,
                                  known={(e["task"], e["level"]): e for e in evals}, eval_n=EVAL_N,
                                  **({"minutes": grpo_minutes} if grpo_timed else {"steps": CPU_STEPS["grpo"]}))
        grpo_wall = time.time() - t0

    walls = {"pretrain_s": pre_wall, "sft_s": sft_wall, "grpo_s": grpo_wall, "total_s": time.time() - t_start,
             "cpu_s": cpu_seconds() - cpu_start, "threads": torch.get_num_threads()}
    command = "nanoseek speedrun" + (f" --seed {seed}" if seed else "") + (
        f" --minutes {minutes:g}" if timed and not gpu else "") + (
        f" --grpo-minutes {grpo_minutes:g}" if grpo_timed and not gpu else "")
    report = write_report(out, model_cfg, pre_records, sft_records, pre_eval, evals, walls,
                          device=torch.cuda.get_device_name() if gpu else "cpu", grpo=grpo_summary,
                          command=command)
    clock.say(f"done: {report}")
    return report


# ---------------------------------------------------------------------- GRPO stage
def grpo_settings(gpu: bool, max_new_tokens: int, level: int) -> GRPOConfig:
    """The speedrun's GRPO hyper-parameters (steps and eval_every are set by the stage).

    No KL term (beta 0), as DAPO and Dr. GRPO do for verifiable rewards. The SFT policy's low
    entropy leaves many groups with zero advantage, hence DAPO's dynamic sampling and
    clip-higher; the learning rates sit far above the literature's 1e-6, since this small
    model trained from scratch gets only tens to hundreds of steps
    (benchmarks/results/grpo_cpu_200steps, benchmarks/results/speedrun_h200). Rewards: task
    accuracy (1.0) and the R1 format reward (0.1), which keeps the cold start's structure.
    The CPU's 80 steps sample at T 0.7 and take two updates per batch (mu 2): at T 1.0 and
    mu 1 they sharpened the sampled policy without moving greedy accuracy (+1 point), at
    T 0.7 / mu 2 greedy rose 54% -> 62.5% on the same SFT model
    (benchmarks/results/grpo_cpu_settings/README.md)."""
    common = dict(max_new_tokens=max_new_tokens, beta=0.0, level=level,
                  rewards={"accuracy": 1.0, "format": 0.1}, prompt_format="chat",
                  keep_last=1, save_every=0, dynamic_sampling=True, clip_eps_high=0.28)
    if gpu:
        return grpo_config(group_size=16, prompts_per_step=32, lr=5e-5, micro_batch=256, temperature=1.0, **common)
    return grpo_config(group_size=8, prompts_per_step=16, lr=1e-4, temperature=0.7, mu=2, **common)


def answer_budget(tokenizer, task: str, level: int, n: int = 256) -> int:
    """max_new_tokens for a task: the longest SFT reply (worked solution and answer) over n
    training examples, + 25% and the EOS, rounded up to a multiple of 16."""
    examples = get_task(task).generate(n, level=level, split="train", seed=1)
    longest = max(len(tokenizer.encode(format_chat(e)[1]["content"])) for e in examples)
    return 16 * math.ceil((1.25 * longest + 1) / 16)


def choose_grpo_task(accuracy_of, candidates=GRPO_CANDIDATES, band=GRPO_BAND, target=GRPO_TARGET):
    """(task, level, why, tried): the first candidate whose `accuracy_of(task, level)` lies
    in `band` (candidates after it are not evaluated), else the one closest to `target`."""
    tried = []
    for task, level in candidates:
        acc = accuracy_of(task, level)
        tried.append({"task": task, "level": level, "greedy_accuracy": acc})
        if band[0] <= acc <= band[1]:
            return task, level, (f"the first candidate whose held-out greedy accuracy after SFT "
                                 f"({acc:.0%}) lies in [{band[0]:.0%}, {band[1]:.0%}]"), tried
    best = min(tried, key=lambda t: abs(t["greedy_accuracy"] - target))
    return best["task"], best["level"], (f"no candidate's accuracy after SFT lies in "
                                         f"[{band[0]:.0%}, {band[1]:.0%}]; the closest to "
                                         f"{target:.0%} ({best['greedy_accuracy']:.0%})"), tried


def grpo_stage(model, tokenizer, out: Path, gpu: bool, say=print, minutes: float | None = None,
               steps: int | None = None, candidates=GRPO_CANDIDATES, eval_n: int = EVAL_N,
               known: dict | None = None, **changes) -> dict:
    """Choose the task (held-out greedy accuracy of `model`, the SFT model in memory, equal to
    out/sft/final), then GRPO from out/sft/final into out/grpo, for `steps` steps or within
    `minutes`. known: {(task, level): evaluate_task result with greedy_correct} already
    measured on the same eval_n problems and answer budget, not measured again. `changes`:
    GRPOConfig fields over grpo_settings (a max_new_tokens there holds for the evaluations
    that choose the task too)."""
    if (minutes is None) == (steps is None):
        raise ValueError("grpo_stage needs either minutes (a time budget) or steps (a fixed amount of work)")
    known = known or {}
    budgets, evals, eval_s = {}, {}, {}

    def accuracy_of(task, level):
        budgets[task, level] = changes.get("max_new_tokens") or answer_budget(tokenizer, task, level)
        r = known.get((task, level))
        if r is None or r["n"] != eval_n or "max_new_tokens" in changes or "greedy_correct" not in r:
            t0 = time.time()
            r = evaluate_task(model, tokenizer, task, level, n=eval_n, max_new_tokens=budgets[task, level],
                              per_problem=True, progress=False)
            eval_s[task, level] = time.time() - t0
        evals[task, level] = r
        say(f"grpo candidate {task} level {level}: greedy "
            f"{accuracy_text(r['greedy_accuracy'], r['greedy_interval'])} (max_new_tokens {budgets[task, level]})")
        return r["greedy_accuracy"]

    task, level, why, tried = choose_grpo_task(accuracy_of, candidates)
    sampled = dict(samples=SAMPLED_K["gpu" if gpu else "cpu"], temperature=SAMPLED_T, greedy=False, n=eval_n,
                   max_new_tokens=budgets[task, level], per_problem=True, progress=False)
    before_sampled = evaluate_task(model, tokenizer, task, level, **sampled)
    model.train()
    say(f"grpo on {task} level {level}: {why}")
    cfg = dataclasses.replace(grpo_settings(gpu, budgets[task, level], level), eval_n=eval_n, **changes)
    before = evals[task, level]

    t_start = time.time()
    deadline = None
    if minutes is not None:
        # the budget: two throwaway steps measure the step time (the first builds the engine)
        deadline = t_start + 60 * minutes
        probe = out / ".calibrate_grpo"
        shutil.rmtree(probe, ignore_errors=True)
        _, probe_tok, _, probe_model = load_base(out / "sft", probe)
        trainer = GRPOTrainer(probe_model, probe_tok, task, dataclasses.replace(cfg, eval_n=0), probe)
        step_s = [trainer.train_step()["step_time_s"] for _ in range(2)][-1]
        del trainer, probe_model
        shutil.rmtree(probe, ignore_errors=True)
        one_eval = eval_s.get((task, level), step_s)
        steps = max(2, int((deadline - time.time() - GRPO_CURVE_POINTS * one_eval) / (1.1 * step_s)))
    eval_every = max(1, math.ceil(steps / GRPO_CURVE_POINTS))
    cfg = dataclasses.replace(cfg, steps=steps, eval_every=eval_every)
    say(f"grpo: {steps} steps of {cfg.prompts_per_step}x{cfg.group_size} rollouts, held-out eval every {eval_every}")
    trainer, records = grpo(out / "sft", task, cfg, out / "grpo", deadline=deadline,
                            before={"eval_accuracy": before["greedy_accuracy"]})  # same problems, same n
    curve = [{"step": 0, "eval_accuracy": before["greedy_accuracy"]}] + [
        {"step": r["step"], "eval_accuracy": r["eval_accuracy"]} for r in records if "eval_accuracy" in r]
    after = trainer.last_evaluation or {}
    change = (paired_difference(before["greedy_correct"], after["greedy_correct"])
              if "greedy_correct" in after else None)
    after_sampled = evaluate_task(trainer.rollout_model, tokenizer, task, level, **sampled)
    trainer.model.train()
    sampled_change = paired_mean_difference(before_sampled["sampled_scores"], after_sampled["sampled_scores"])
    say(f"grpo on {task} level {level}: greedy {before['greedy_accuracy']:.0%} -> {curve[-1]['eval_accuracy']:.0%} "
        f"in {trainer.step} steps" + (f", change {difference_text(change)}" if change else "")
        + f"; sampled pass@1 {before_sampled['sampled_pass@1']:.0%} -> {after_sampled['sampled_pass@1']:.0%}")
    median = lambda xs: sorted(xs)[len(xs) // 2] if xs else float("nan")  # noqa: E731
    return {"task": task, "level": level, "why": why, "candidates": tried,
            "before": before["greedy_accuracy"], "before_interval": before["greedy_interval"],
            "after": curve[-1]["eval_accuracy"], "after_interval": after.get("greedy_interval"),
            "change": change, "curve": curve, "steps": trainer.step,
            "sampled": {"samples": sampled["samples"], "temperature": SAMPLED_T,
                        "before": before_sampled["sampled_pass@1"],
                        "before_interval": before_sampled["sampled_pass@1_interval"],
                        "after": after_sampled["sampled_pass@1"],
                        "after_interval": after_sampled["sampled_pass@1_interval"], "change": sampled_change},
            "seconds_per_step": median([r["step_time_s"] for r in records]),
            "rollout_tokens_per_s": median([r["rollout_tokens_per_s"] for r in records]),
            "reward_first": records[0]["reward"], "reward_last": records[-1]["reward"],
            "train_accuracy_first": records[0].get("accuracy"),
            "train_accuracy_last": records[-1].get("accuracy"),
            "budget_minutes": minutes, "wall_s": time.time() - t_start,
            "config": dataclasses.asdict(cfg)}


def accuracy_text(accuracy: float, interval) -> str:
    """'43% [38, 48]': an accuracy and its 95% interval in points."""
    return f"{accuracy:.0%} [{100 * interval[0]:.0f}, {100 * interval[1]:.0f}]"


def difference_text(d: dict) -> str:
    """'+9 points [+4, +14] (36 gained, 0 lost)': a paired difference and its 95% interval."""
    return f"{mean_difference_text(d)} ({d['gains']} gained, {d['losses']} lost)"


def mean_difference_text(d: dict) -> str:
    """'+9 points [+4, +14]': a paired difference of means and its 95% interval."""
    lo, hi = d["interval"]
    return f"{100 * d['difference']:+.0f} points [{100 * lo:+.0f}, {100 * hi:+.0f}]"


def _throughput(records: list[dict]) -> float:
    rates = sorted(r["tokens_per_s"] for r in records[len(records) // 10:]) or [0.0]
    return rates[len(rates) // 2]


def stage_lines(pre_records, pre_eval, evals, grpo: dict | None) -> list[str]:
    """One line per stage: what it did, and whether it helped beyond noise (an interval that
    excludes 0: for pretraining the accuracy itself, as a random model answers none; for SFT
    and GRPO the paired difference on the same held-out problems)."""
    def verdict(lo: float, hi: float) -> str:
        return "helped" if lo > 0 else ("made it worse" if hi < 0 else "no change beyond noise")

    lines = []
    p = pre_eval[0] if pre_eval else None
    if p:
        lines.append(f"- **Pretraining**: {len(pre_records)} steps on worked arithmetic solutions; the model "
                     f"answers {p['task']} level {p['level']} (plain prompt) "
                     f"{accuracy_text(p['greedy_accuracy'], p['greedy_interval'])}: "
                     f"{verdict(*p['greedy_interval'])}.")
    s = next((e for e in evals if p and (e["task"], e["level"]) == (p["task"], p["level"])), None)
    if s and "greedy_correct" in p and "greedy_correct" in s:
        d = paired_difference(p["greedy_correct"], s["greedy_correct"])
        lines.append(f"- **SFT** (R1 cold-start format): {s['task']} level {s['level']} "
                     f"{accuracy_text(s['greedy_accuracy'], s['greedy_interval'])}, "
                     f"{difference_text(d)} against pretraining: {verdict(*d['interval'])}.")
    if grpo and grpo.get("change"):
        d = grpo["change"]
        line = (f"- **GRPO** ({grpo['steps']} steps on {grpo['task']} level {grpo['level']}): greedy "
                f"{grpo['before']:.0%} -> {accuracy_text(grpo['after'], grpo['after_interval'])}, "
                f"{difference_text(d)}: {verdict(*d['interval'])}")
        if grpo.get("sampled"):
            sp = grpo["sampled"]
            line += (f"; R1's sampled pass@1 {sp['before']:.0%} -> {accuracy_text(sp['after'], sp['after_interval'])}, "
                     f"{mean_difference_text(sp['change'])}: {verdict(*sp['change']['interval'])}")
        lines.append(line + ".")
    return lines


def write_report(out: Path, cfg, pre_records, sft_records, pre_eval, evals, walls, device,
                 grpo: dict | None = None, command: str = "nanoseek speedrun") -> Path:
    info = model_info(cfg, context_length=cfg.max_position_embeddings)
    summary = {"device": device, "config": cfg.to_dict(), "info": info, "pretrain_eval": pre_eval,
               "eval": evals, "wall_time_s": walls,
               "pretrain": {"steps": len(pre_records), "final_loss": pre_records[-1]["loss"],
                            "tokens_per_s": _throughput(pre_records)},
               "sft": {"steps": len(sft_records), "final_loss": sft_records[-1]["loss"],
                       "tokens_per_s": _throughput(sft_records)},
               "grpo": grpo}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    for stage in ("pretrain", "sft", "grpo"):
        for name in ("loss.png", "maxvio.png", "rl.png"):
            src = out / stage / "plots" / name
            if src.exists():
                shutil.copy2(src, plots / f"{stage}_{name}")
    pre_tokens = sum(r["tokens"] for r in pre_records)
    lines = [
        "# nanoseek speedrun",
        "",
        f"Device: {device}. Wall time {walls['total_s'] / 60:.1f} min "
        f"(pretrain {walls['pretrain_s'] / 60:.1f}, SFT {walls['sft_s'] / 60:.1f}, "
        f"GRPO {walls.get('grpo_s', 0) / 60:.1f} with its task choice)"
        + (f"; CPU time {walls['cpu_s'] / 60:.1f} min on {walls['threads']} threads." if "cpu_s" in walls else "."),
        "",
        *stage_lines(pre_records, pre_eval, evals, grpo),
        "",
        "Accuracies: greedy, on n held-out problems, with the 95% Wilson interval in points; a "
        "change: the paired difference on the same problems, with its 95% interval from the "
        "discordant pairs (train/intervals.py). R1's sampled pass@1: the mean accuracy of "
        "samples at temperature 0.6 per problem (DeepSeek-R1's metric), its change the mean "
        "per-problem difference with its normal 95% interval.",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| layers | {cfg.num_hidden_layers} ({cfg.first_k_dense_replace} dense, MTP depth {cfg.num_nextn_predict_layers}) |",
        f"| hidden / heads | {cfg.hidden_size} / {cfg.num_attention_heads} |",
        f"| attention | MLA: kv_lora_rank {cfg.kv_lora_rank}, q_lora_rank {cfg.q_lora_rank}, rope dim {cfg.qk_rope_head_dim} |",
        f"| experts | {cfg.num_experts_per_tok} of {cfg.n_routed_experts} routed + {cfg.n_shared_experts} shared, "
        f"{cfg.scoring_func} router, {cfg.topk_method} |",
        f"| parameters | {info['total_params']:,} total, {info['activated_params']:,} activated per token, "
        f"{info['mtp_params']:,} in MTP |",
        f"| KV cache per token (BF16) | {info['kv_cache_bytes_per_token']:,} B; MHA with the same heads "
        f"{info['kv_cache_bytes_per_token_mha']:,} B ({info['kv_cache_saving_vs_mha']:.1f}x more) |",
        f"| vocabulary | {cfg.vocab_size} (byte-level BPE trained on the data) |",
        "",
        "## Training",
        "",
        "| stage | steps | tokens | final loss | tokens/s |",
        "|---|---|---|---|---|",
        f"| pretrain | {len(pre_records)} | {pre_tokens:,} | {pre_records[-1]['loss']:.3f} | {_throughput(pre_records):,.0f} |",
        f"| SFT | {len(sft_records)} | {sum(r['tokens'] for r in sft_records):,} | "
        f"{sft_records[-1]['loss']:.3f} | {_throughput(sft_records):,.0f} |",
        "",
        "![pretrain loss](plots/pretrain_loss.png)",
        "![pretrain MaxVio](plots/pretrain_maxvio.png)",
        "![SFT loss](plots/sft_loss.png)",
        "",
        "## Held-out accuracy",
        "",
        "Problems from the test split, which no training example shares.",
        "",
        "| model | task | level | n | greedy | pass@k |",
        "|---|---|---|---|---|---|",
    ]
    for stage, rows in (("pretrained (plain prompt)", pre_eval), ("after SFT (chat)", evals)):
        for e in rows:
            pk = next((f"{accuracy_text(v, e[k + '_interval'])} (k={k[5:]})" for k, v in e.items()
                       if k.startswith("pass@") and not k.endswith("_interval")), "")
            lines.append(f"| {stage} | {e['task']} | {e['level']} | {e['n']} | "
                         f"{accuracy_text(e['greedy_accuracy'], e['greedy_interval'])} | {pk} |")
    if grpo:
        lines += grpo_report_lines(grpo)
    lines += ["", f"Full figures: `summary.json`; per-step metrics: `pretrain/metrics.jsonl`, "
              f"`sft/metrics.jsonl`" + (", `grpo/metrics.jsonl`" if grpo else "") +
              "; models: `pretrain/final`, `sft/final`" + (", `grpo/final`" if grpo else "") + " (HF layout).",
              "", f"Reproduce: `{command}`"]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def grpo_report_lines(g: dict) -> list[str]:
    c = g["config"]
    tried = ", ".join(f"{t['task']} {t['level']}: {t['greedy_accuracy']:.0%}" for t in g["candidates"])
    curve = ", ".join(f"{p['eval_accuracy']:.0%} (step {p['step']})" for p in g["curve"])
    after = accuracy_text(g["after"], g["after_interval"]) if g.get("after_interval") else f"{g['after']:.0%}"
    change = f" Change: {difference_text(g['change'])}." if g.get("change") else ""
    return [
        "",
        "## GRPO",
        "",
        f"Task: **{g['task']} level {g['level']}**, {g['why']}. Candidates evaluated (held-out "
        f"greedy after SFT, n={c['eval_n']}): {tried}.",
        "",
        "| | before GRPO (SFT) | after GRPO |",
        "|---|---|---|",
        f"| held-out greedy accuracy, {g['task']} level {g['level']} (n={c['eval_n']}) | "
        f"{accuracy_text(g['before'], g['before_interval'])} | {after} |",
        *([f"| R1's sampled pass@1 ({g['sampled']['samples']} samples at T {g['sampled']['temperature']:g} "
           f"per problem) | {accuracy_text(g['sampled']['before'], g['sampled']['before_interval'])} | "
           f"{accuracy_text(g['sampled']['after'], g['sampled']['after_interval'])} |"] if g.get("sampled") else []),
        f"| mean reward of the rollouts (first / last step) | {g['reward_first']:.3f} | {g['reward_last']:.3f} |",
        "",
        f"{g['steps']} steps in {g['wall_s'] / 60:.1f} min"
        + (f" (budget {g['budget_minutes']:g} min)" if g.get("budget_minutes") else "") + ": "
        f"{g['seconds_per_step']:.2f} s per step, rollouts at {g['rollout_tokens_per_s']:,.0f} tokens/s "
        f"(medians). Held-out accuracy along the way: {curve}.{change}",
        "",
        f"Settings: G={c['group_size']} samples per prompt, {c['prompts_per_step']} prompts per step, "
        f"temperature {c['temperature']}, lr {c['lr']:g} (constant), beta {c['beta']:g}, loss "
        f"{c['loss_type']}, clip eps {c['clip_eps']}, mu {c['mu']}, max_new_tokens {c['max_new_tokens']}, "
        f"rewards {json.dumps(c['rewards'])}, {c['prompt_format']} prompts.",
        "",
        "![GRPO reward, accuracy and length](plots/grpo_rl.png)",
    ]
