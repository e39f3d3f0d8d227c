"""`nanoseek speedrun` — what `make run` runs: the whole pipeline on built-in data.

    tokenizer (BPE on the data) -> pretrain -> SFT (R1 cold-start format) -> eval -> report.md

The data are the built-in verifiable tasks: multi-digit arithmetic with worked column
solutions and Countdown. On a CPU a small MoE model (MLA, DeepSeekMoE with bias balancing,
MTP) trains for a few minutes; with a GPU the `small` preset trains longer. The training
budget is in minutes: a few calibration steps measure the step time and set the number of
steps, so the learning-rate schedule completes within the budget.

The report holds the config, parameter counts, the KV-cache saving against MHA, loss and
MaxVio plots, held-out accuracies (greedy and pass@k), throughput and wall time.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from .config import preset
from .info import model_info
from .train.evaluate import evaluate_task
from .train.pipeline import pretrain, sft, train_config

# (task, level, n) of the pretraining documents and of the SFT chats
PRETRAIN_DATA = "builtin:arithmetic:level=1:n=30000,builtin:arithmetic:level=2:n=3000"
SFT_DATA = ("builtin:arithmetic:level=1:n=6000:seed=1,builtin:arithmetic:level=2:n=3000:seed=1,"
            "builtin:countdown:level=1:n=2000:seed=1")
EVALS = [("arithmetic", 1, 4), ("arithmetic", 2, 0), ("countdown", 1, 0)]


def cpu_model():
    """The CPU run's model: `tiny` widened a little so that it can learn carries in minutes."""
    return preset("tiny", hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
                  num_hidden_layers=4, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=64,
                  qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8,
                  num_experts_per_tok=2, n_group=2, topk_group=1)


def calibrate_steps(model_cfg, tcfg_kwargs: dict, minutes: float, data: str, out: Path) -> int:
    """Steps that fit `minutes`, from the median time of a few throwaway steps."""
    probe = out / ".calibrate"
    shutil.rmtree(probe, ignore_errors=True)
    n = 6
    trainer, _, records = pretrain(model_cfg, train_config(steps=n, **tcfg_kwargs), data, probe, progress=False)
    times = sorted(r["step_time_s"] for r in records[2:])
    shutil.rmtree(probe, ignore_errors=True)
    step_s = times[len(times) // 2] * 1.2  # the calibration steps run ~20% faster than a whole run
    return max(20, int(minutes * 60 / step_s))


def speedrun(out: str | Path = "runs/speedrun", minutes: float | None = None) -> Path:
    t_start = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    minutes = minutes or (20.0 if gpu else 10.0)
    if gpu:
        model_cfg = preset("small")
        common = dict(batch_size=32, seq_len=512, warmup=50, compile=True)
        pre_lr, sft_lr = 2e-3, 5e-4
    else:
        torch.set_num_threads(max(1, torch.get_num_threads()))
        model_cfg = cpu_model()
        # small batches, many steps: on a CPU budget, steps teach more than tokens per step
        common = dict(batch_size=8, seq_len=256, warmup=30)
        pre_lr, sft_lr = 5e-3, 1e-3
    say = lambda msg: print(f"[speedrun {time.time() - t_start:5.0f}s] {msg}", flush=True)  # noqa: E731

    # ---- pretrain (the tokenizer is trained on the same documents first)
    pre_minutes, sft_minutes = 0.7 * minutes, 0.3 * minutes
    for stage in ("pretrain", "sft"):
        shutil.rmtree(out / stage, ignore_errors=True)
    steps = calibrate_steps(model_cfg, dict(common, lr=pre_lr), pre_minutes, PRETRAIN_DATA, out)
    say(f"pretrain: {steps} steps of {common['batch_size']}x{common['seq_len']} tokens")
    t0 = time.time()
    trainer, tok, pre_records = pretrain(model_cfg, train_config(steps=steps, lr=pre_lr, **common),
                                         PRETRAIN_DATA, out / "pretrain")
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
                                        SFT_DATA, out / "sft")
    sft_wall = time.time() - t0

    # ---- eval on held-out problems (the test split is disjoint from all training data)
    say("eval")
    evals = [evaluate_task(sft_trainer.model, tok, task, level, n=100, k=k) for task, level, k in EVALS]
    for e in evals:
        say(f"{e['task']} level {e['level']}: greedy {e['greedy_accuracy']:.0%}"
            + (f", pass@{EVALS[0][2]} {e.get(f'pass@{EVALS[0][2]}', 0):.0%}" if f"pass@{EVALS[0][2]}" in e else ""))

    report = write_report(out, model_cfg, pre_records, sft_records, pre_eval, evals,
                          {"pretrain_s": pre_wall, "sft_s": sft_wall, "total_s": time.time() - t_start},
                          device=torch.cuda.get_device_name() if gpu else "cpu")
    say(f"done: {report}")
    return report


def _throughput(records: list[dict]) -> float:
    rates = sorted(r["tokens_per_s"] for r in records[len(records) // 10:]) or [0.0]
    return rates[len(rates) // 2]


def write_report(out: Path, cfg, pre_records, sft_records, pre_eval, evals, walls, device) -> Path:
    info = model_info(cfg, context_length=cfg.max_position_embeddings)
    summary = {"device": device, "config": cfg.to_dict(), "info": info, "pretrain_eval": pre_eval,
               "eval": evals, "wall_time_s": walls,
               "pretrain": {"steps": len(pre_records), "final_loss": pre_records[-1]["loss"],
                            "tokens_per_s": _throughput(pre_records)},
               "sft": {"steps": len(sft_records), "final_loss": sft_records[-1]["loss"],
                       "tokens_per_s": _throughput(sft_records)}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    for stage in ("pretrain", "sft"):
        for name in ("loss.png", "maxvio.png"):
            src = out / stage / "plots" / name
            if src.exists():
                shutil.copy2(src, plots / f"{stage}_{name}")
    pre_tokens = sum(r["tokens"] for r in pre_records)
    lines = [
        "# nanoseek speedrun",
        "",
        f"Device: {device}. Wall time {walls['total_s'] / 60:.1f} min "
        f"(pretrain {walls['pretrain_s'] / 60:.1f}, SFT {walls['sft_s'] / 60:.1f}).",
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
    lines += ["", f"Full figures: `summary.json`; per-step metrics: `pretrain/metrics.jsonl`, "
              f"`sft/metrics.jsonl`; models: `pretrain/final`, `sft/final` (HF layout)."]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
