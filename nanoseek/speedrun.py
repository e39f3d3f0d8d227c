"""`nanoseek speedrun` — what `make run` runs: the whole pipeline on built-in data.

    tokenizer (BPE on the data) -> pretrain -> SFT (R1 cold-start format) -> eval
        -> GRPO on a task of the right difficulty -> eval -> report.md

The data are the built-in verifiable tasks: multi-digit arithmetic with worked column
solutions and Countdown. On a CPU a small MoE model (MLA, DeepSeekMoE with bias balancing,
MTP) trains for a few minutes; with a GPU the `small` preset trains longer. The training
budget is in minutes: a few calibration steps measure the step time and set the number of
steps, so the learning-rate schedule completes within the budget.

GRPO stage (R1's reasoning RL after the cold start). RL learns only where the model is
sometimes right: a group whose G samples are all wrong (or all right) has zero advantages.
So the SFT model is evaluated greedily on held-out problems of GRPO_CANDIDATES in order,
and the first (task, level) whose accuracy lies in GRPO_BAND is trained (else the one
closest to GRPO_TARGET). The stage has its own budget in minutes: two throwaway steps
measure the step time, which sets the number of steps and the evaluation interval; the
loop also stops at the deadline whatever the estimate (`GRPOTrainer.fit(deadline=)`),
with the final held-out evaluation and checkpoint at the step where it stops.

The report holds the config, parameter counts, the KV-cache saving against MHA, loss and
MaxVio plots, held-out accuracies (greedy and pass@k), the GRPO task choice, accuracy
before and after GRPO and its curves, throughput and wall time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import torch

from .config import preset
from .data.tasks import format_chat, get_task
from .info import model_info
from .rl.trainer import GRPOConfig, GRPOTrainer, grpo, grpo_config
from .train.evaluate import evaluate_task
from .data.datasets import load_documents
from .data.tokenizer import ChatTokenizer, train_bpe
from .fp8 import fast_fp8
from .train.stages import load_base, pretrain, read_specs, sft, train_config

# (task, level, n) of the pretraining documents and of the SFT chats
PRETRAIN_DATA = "builtin:arithmetic:level=1:n=30000,builtin:arithmetic:level=2:n=3000"
SFT_DATA = ("builtin:arithmetic:level=1:n=6000:seed=1,builtin:arithmetic:level=2:n=3000:seed=1,"
            "builtin:countdown:level=1:n=2000:seed=1")
EVALS = [("arithmetic", 1, 4), ("arithmetic", 2, 0), ("countdown", 1, 0)]
# On a GPU the small model masters levels 1 and 2 (benchmarks/results/speedrun_h200/report.md);
# a little of level 3 (2-digit multiplication) gives it a level it only partly solves, where
# GRPO can teach.
GPU_PRETRAIN_EXTRA = ",builtin:arithmetic:level=3:n=3000"
GPU_SFT_EXTRA = ",builtin:arithmetic:level=3:n=1000:seed=1"

# GRPO: the first candidate whose held-out greedy accuracy after SFT lies in the band
GRPO_CANDIDATES = [("arithmetic", 1), ("arithmetic", 2), ("arithmetic", 3), ("arithmetic", 4),
                   ("countdown", 1), ("countdown", 2)]
GRPO_BAND = (0.10, 0.60)
GRPO_TARGET = 0.35  # without a candidate in the band: the one closest to this
GRPO_EVAL_N = 100      # held-out problems per evaluation on a CPU (+-5 points)
GRPO_EVAL_N_GPU = 200  # on a GPU, where they cost seconds (+-3.5 points)
GRPO_CURVE_POINTS = 5  # held-out evaluations during the GRPO stage (the last at its end)


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


def speedrun(out: str | Path = "runs/speedrun", minutes: float | None = None,
             grpo_minutes: float | None = None, precision: str = "auto") -> Path:
    """minutes: pretrain + SFT budget (default 20 on a GPU, 9.5 on a CPU); grpo_minutes: the
    GRPO stage's budget (default 6 on a GPU, 1.5 on a CPU; 0 skips the stage); precision: of
    every training stage (train/precision.py)."""
    t_start = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    train_config(precision=precision)  # a bad value fails before any work
    if precision == "fp8":
        fast_fp8("cuda" if gpu else "cpu")  # and so does a GPU that cannot run FP8
    minutes = minutes or (20.0 if gpu else 9.5)
    grpo_minutes = (6.0 if gpu else 1.5) if grpo_minutes is None else grpo_minutes
    pretrain_data, sft_data = PRETRAIN_DATA, SFT_DATA
    # save_every=0 (here and in grpo_settings): a speedrun starts its stages afresh, so
    # checkpoints along the way would only spend its budget
    if gpu:
        model_cfg = preset("small")
        common = dict(batch_size=32, seq_len=512, warmup=50, compile=True, save_every=0, precision=precision)
        pre_lr, sft_lr = 2e-3, 5e-4
        pretrain_data, sft_data = PRETRAIN_DATA + GPU_PRETRAIN_EXTRA, SFT_DATA + GPU_SFT_EXTRA
    else:
        torch.set_num_threads(max(1, torch.get_num_threads()))
        model_cfg = cpu_model()
        # small batches, many steps: on a CPU budget, steps teach more than tokens per step
        common = dict(batch_size=8, seq_len=256, warmup=30, save_every=0, precision=precision)
        pre_lr, sft_lr = 5e-3, 1e-3
    say = lambda msg: print(f"[speedrun {time.time() - t_start:5.0f}s] {msg}", flush=True)  # noqa: E731

    # ---- pretrain (the tokenizer is trained on the same documents first)
    pre_minutes, sft_minutes = 0.7 * minutes, 0.3 * minutes
    for stage in ("pretrain", "sft", "grpo"):
        shutil.rmtree(out / stage, ignore_errors=True)
    say("pretrain: the tokenizer, then a few steps to time them")
    bpe = out / ".tokenizer"  # trained once on the pretraining documents, for the probe and the run
    ChatTokenizer(train_bpe(read_specs(pretrain_data, load_documents), model_cfg.vocab_size)).save(bpe)
    steps = calibrate_steps(model_cfg, dict(common, lr=pre_lr), pre_minutes, pretrain_data, out, bpe)
    say(f"pretrain: {steps} steps of {common['batch_size']}x{common['seq_len']} tokens")
    t0 = time.time()
    trainer, tok, pre_records = pretrain(model_cfg, train_config(steps=steps, lr=pre_lr, **common),
                                         pretrain_data, out / "pretrain", tokenizer=bpe)
    shutil.rmtree(bpe, ignore_errors=True)
    pre_wall = time.time() - t0
    model_cfg = trainer.model.config

    say("eval of the pretrained model (plain format)")
    pre_eval = [evaluate_task(trainer.model, tok, "arithmetic", 1, n=100, fmt="plain")]

    # ---- SFT in the R1 cold-start format: <think> reasoning </think> <answer> answer </answer>
    sft_common = dict(common, warmup=10)
    sft_steps = max(20, int(steps * sft_minutes / pre_minutes))
    say(f"sft: {sft_steps} steps")
    t0 = time.time()
    sft_trainer, tok, sft_records = sft(out / "pretrain", train_config(steps=sft_steps, lr=sft_lr, **sft_common),
                                        sft_data, out / "sft")
    sft_wall = time.time() - t0

    # ---- eval on held-out problems (the test split is disjoint from all training data)
    say("eval")
    evals = [evaluate_task(sft_trainer.model, tok, task, level, n=100, k=k) for task, level, k in EVALS]
    for e in evals:
        say(f"{e['task']} level {e['level']}: greedy {e['greedy_accuracy']:.0%}"
            + (f", pass@{EVALS[0][2]} {e.get(f'pass@{EVALS[0][2]}', 0):.0%}" if f"pass@{EVALS[0][2]}" in e else ""))

    # ---- GRPO on the first task of the right difficulty
    grpo_summary, grpo_wall = None, 0.0
    if grpo_minutes > 0:
        t0 = time.time()
        grpo_summary = grpo_stage(sft_trainer.model, tok, out, grpo_minutes, gpu, say, precision=precision)
        grpo_wall = time.time() - t0

    report = write_report(out, model_cfg, pre_records, sft_records, pre_eval, evals,
                          {"pretrain_s": pre_wall, "sft_s": sft_wall, "grpo_s": grpo_wall,
                           "total_s": time.time() - t_start},
                          device=torch.cuda.get_device_name() if gpu else "cpu", grpo=grpo_summary)
    say(f"done: {report}")
    return report


# ---------------------------------------------------------------------- GRPO stage
def grpo_settings(gpu: bool, max_new_tokens: int, level: int) -> GRPOConfig:
    """The speedrun's GRPO hyper-parameters (steps and eval_every are set from the budget).

    Temperature 1.0 and no KL term (beta 0), as DAPO and Dr. GRPO do for verifiable rewards.
    The SFT policy's low entropy leaves most groups with zero advantage, hence on the GPU DAPO's
    dynamic sampling and clip-higher; the learning rates sit far above the literature's 1e-6,
    since this small model trained from scratch gets only hundreds of steps
    (benchmarks/results/grpo_cpu_200steps, benchmarks/results/speedrun_h200). Rewards: task
    accuracy (1.0) and the R1 format reward (0.1), which keeps the cold start's structure."""
    common = dict(max_new_tokens=max_new_tokens, temperature=1.0, beta=0.0, level=level,
                  rewards={"accuracy": 1.0, "format": 0.1}, prompt_format="chat",
                  keep_last=1, save_every=0)
    if gpu:
        return grpo_config(group_size=16, prompts_per_step=32, lr=5e-5, micro_batch=256,
                           dynamic_sampling=True, clip_eps_high=0.28, **common)
    return grpo_config(group_size=8, prompts_per_step=4, lr=1e-5, **common)


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


def grpo_stage(model, tokenizer, out: Path, minutes: float, gpu: bool, say=print,
               candidates=GRPO_CANDIDATES, eval_n: int | None = None, **changes) -> dict:
    """Choose the task (held-out greedy accuracy of `model`, the SFT model in memory, equal to
    out/sft/final), then GRPO from out/sft/final into out/grpo within `minutes`. `changes`:
    GRPOConfig fields over grpo_settings (a max_new_tokens there holds for the evaluations
    that choose the task too). eval_n: held-out problems per evaluation (default
    GRPO_EVAL_N_GPU on a GPU, GRPO_EVAL_N on a CPU)."""
    if eval_n is None:
        eval_n = GRPO_EVAL_N_GPU if gpu else GRPO_EVAL_N
    budgets, evals, eval_s = {}, {}, {}

    def accuracy_of(task, level):
        budgets[task, level] = changes.get("max_new_tokens") or answer_budget(tokenizer, task, level)
        t0 = time.time()
        r = evaluate_task(model, tokenizer, task, level, n=eval_n, max_new_tokens=budgets[task, level])
        eval_s[task, level] = time.time() - t0
        evals[task, level] = r["greedy_accuracy"]
        say(f"grpo candidate {task} level {level}: greedy {r['greedy_accuracy']:.0%} "
            f"(max_new_tokens {budgets[task, level]})")
        return r["greedy_accuracy"]

    task, level, why, tried = choose_grpo_task(accuracy_of, candidates)
    model.train()
    say(f"grpo on {task} level {level}: {why}")
    cfg = dataclasses.replace(grpo_settings(gpu, budgets[task, level], level), eval_n=eval_n, **changes)

    # the budget: two throwaway steps measure the step time (the first builds the engine)
    t_start = time.time()
    deadline = t_start + 60 * minutes
    probe = out / ".calibrate_grpo"
    shutil.rmtree(probe, ignore_errors=True)
    _, probe_tok, _, probe_model = load_base(out / "sft", probe)
    trainer = GRPOTrainer(probe_model, probe_tok, task, dataclasses.replace(cfg, eval_n=0), probe)
    step_s = [trainer.train_step()["step_time_s"] for _ in range(2)][-1]
    del trainer, probe_model
    shutil.rmtree(probe, ignore_errors=True)
    left = deadline - time.time()
    one_eval = eval_s[task, level]
    steps = max(2, int((left - GRPO_CURVE_POINTS * one_eval) / (1.1 * step_s)))
    eval_every = max(1, math.ceil(steps / GRPO_CURVE_POINTS))
    cfg = dataclasses.replace(cfg, steps=steps, eval_every=eval_every)
    say(f"grpo: {steps} steps of {cfg.prompts_per_step}x{cfg.group_size} rollouts "
        f"(~{step_s:.1f} s each), held-out eval every {eval_every}")
    trainer, records = grpo(out / "sft", task, cfg, out / "grpo", deadline=deadline,
                            before={"eval_accuracy": evals[task, level]})  # same problems, same n
    curve = [{"step": 0, "eval_accuracy": evals[task, level]}] + [
        {"step": r["step"], "eval_accuracy": r["eval_accuracy"]} for r in records if "eval_accuracy" in r]
    after = curve[-1]["eval_accuracy"]
    say(f"grpo on {task} level {level}: greedy {evals[task, level]:.0%} -> {after:.0%} "
        f"in {trainer.step} steps")
    median = lambda xs: sorted(xs)[len(xs) // 2] if xs else float("nan")  # noqa: E731
    return {"task": task, "level": level, "why": why, "candidates": tried,
            "before": evals[task, level], "after": after, "curve": curve, "steps": trainer.step,
            "seconds_per_step": median([r["step_time_s"] for r in records]),
            "rollout_tokens_per_s": median([r["rollout_tokens_per_s"] for r in records]),
            "reward_first": records[0]["reward"], "reward_last": records[-1]["reward"],
            "train_accuracy_first": records[0].get("accuracy"),
            "train_accuracy_last": records[-1].get("accuracy"),
            "budget_minutes": minutes, "wall_s": time.time() - t_start,
            "config": dataclasses.asdict(cfg)}


def _throughput(records: list[dict]) -> float:
    rates = sorted(r["tokens_per_s"] for r in records[len(records) // 10:]) or [0.0]
    return rates[len(rates) // 2]


def write_report(out: Path, cfg, pre_records, sft_records, pre_eval, evals, walls, device,
                 grpo: dict | None = None) -> Path:
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
        f"GRPO {walls.get('grpo_s', 0) / 60:.1f} with its task choice).",
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
            pk = next((f"{v:.0%} (k={k[5:]})" for k, v in e.items() if k.startswith("pass@")), "")
            lines.append(f"| {stage} | {e['task']} | {e['level']} | {e['n']} | {e['greedy_accuracy']:.0%} | {pk} |")
    if grpo:
        lines += grpo_report_lines(grpo)
    lines += ["", f"Full figures: `summary.json`; per-step metrics: `pretrain/metrics.jsonl`, "
              f"`sft/metrics.jsonl`" + (", `grpo/metrics.jsonl`" if grpo else "") +
              "; models: `pretrain/final`, `sft/final`" + (", `grpo/final`" if grpo else "") + " (HF layout)."]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def grpo_report_lines(g: dict) -> list[str]:
    c = g["config"]
    tried = ", ".join(f"{t['task']} {t['level']}: {t['greedy_accuracy']:.0%}" for t in g["candidates"])
    curve = ", ".join(f"{p['eval_accuracy']:.0%} (step {p['step']})" for p in g["curve"])
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
        f"{g['before']:.0%} | {g['after']:.0%} |",
        f"| mean reward of the rollouts (first / last step) | {g['reward_first']:.3f} | {g['reward_last']:.3f} |",
        "",
        f"{g['steps']} steps in {g['wall_s'] / 60:.1f} min (budget {g['budget_minutes']:g} min): "
        f"{g['seconds_per_step']:.2f} s per step, rollouts at {g['rollout_tokens_per_s']:,.0f} tokens/s "
        f"(medians). Held-out accuracy along the way: {curve}.",
        "",
        f"Settings: G={c['group_size']} samples per prompt, {c['prompts_per_step']} prompts per step, "
        f"temperature {c['temperature']}, lr {c['lr']:g} (constant), beta {c['beta']:g}, loss "
        f"{c['loss_type']}, clip eps {c['clip_eps']}, mu {c['mu']}, max_new_tokens {c['max_new_tokens']}, "
        f"rewards {json.dumps(c['rewards'])}, {c['prompt_format']} prompts.",
        "",
        "![GRPO reward, accuracy and length](plots/grpo_rl.png)",
    ]
