"""GRPO step time: nanoseek's GRPOTrainer against TRL's GRPOTrainer, same model, same job.

One model (a preset with seeded random weights, or a trained checkpoint with `--model`)
is exported once in HF layout with nanoseek's own saver and tokenizer files; each side
loads that directory (nanoseek through `from_pretrained`, TRL through
`AutoModelForCausalLM` / `AutoTokenizer`) and runs `--warmup` + `--steps` GRPO steps on
the built-in arithmetic task with nanoseek's TRL-signature `accuracy_reward`:

    same      model weights (float32 master weights, BF16 autocast on a GPU, as both
              trainers do by default with bf16), prompts (step s uses the N problems
              nanoseek's trainer draws for step s; TRL reads them in that order, unshuffled,
              as chat messages rendered by the exported chat template, which gives the same
              prompt ids as nanoseek's: checked, `prompt_ids_match`), G, N prompts per step
              (B = N·G completions, one optimizer step per GRPO step: TRL with
              per_device_train_batch_size = B, gradient_accumulation_steps = 1,
              steps_per_generation = 1), max new tokens, temperature (top-p 1, no top-k),
              loss_type, group-std advantages, beta (> 0: a frozen reference model on both
              sides), mu = num_iterations = 1 (old log-probs skipped on both sides), lr
              (constant), AdamW betas (0.9, 0.95), weight decay 0, gradient clip 1.0.
    lengths   `--ignore-eos` (default on) makes every completion exactly --max-new-tokens
              long on both sides: nanoseek's GRPOConfig(ignore_eos=True),
              transformers' generate with min_new_tokens = max_new_tokens (EOS is masked out
              until then). `--no-ignore-eos` lets each side stop at EOS; then compare the
              mean completion lengths in the table, not only the seconds.
    rollouts  nanoseek: its engine (continuous batching, latent cache, CUDA-graph decode)
              on the policy's own weights. TRL: transformers `generate` (no vLLM, no
              continuous batching: TRL's default path).
    TRL runs  without gradient checkpointing (TRL's GRPOConfig turns it on by default; off
              it is faster and is what nanoseek does), logging once at the end, no saving.

Per side: the wall time of each step (CUDA synchronized at both ends; for TRL the time
between consecutive `on_step_end` callbacks, so the trainer's own per-step overhead
counts), the median over the timed steps (warm-up excluded: CUDA-graph capture, cuBLAS
plans), generated completion tokens per step, rollout (generation) time per step, peak
CUDA memory from model load to the last step, and the ratio TRL / nanoseek. If TRL (or
`datasets`) fails to import or run, the error goes into the JSON and nanoseek is still
timed. The JSON is written after each side.

nanoseek differences that cost it time, kept: after each optimizer step it updates the
auxiliary-loss-free expert bias (V3 §2.1.2); its loss also computes per-token entropy.

    python benchmarks/grpo_trl.py [--preset small | --model DIR] [--steps 5 --warmup 2]
        [--group-size 8 --prompts-per-step 8 --max-new-tokens 128] [--out FILE]
    CPU smoke run:
    python benchmarks/grpo_trl.py --preset tiny --steps 2 --warmup 1 --device cpu \\
        --group-size 4 --prompts-per-step 2 --max-new-tokens 16
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, graph_flags, out_dir  # noqa: E402

from nanoseek import Transformer, from_pretrained, preset, save_pretrained  # noqa: E402
from nanoseek.data.tasks import get_task  # noqa: E402
from nanoseek.data.tokenizer import ChatTokenizer, byte_tokenizer  # noqa: E402
from nanoseek.rl.rewards import accuracy_reward  # noqa: E402
from nanoseek.rl.templates import chat_prompt  # noqa: E402
from nanoseek.rl.trainer import GRPOTrainer, grpo_config, sample_prompts  # noqa: E402

TASK = "arithmetic"


# ------------------------------------------------------------------ shared pieces
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def summarize(times: list[float], tokens: list[int], rollout: list[float], warmup: int) -> dict:
    """Figures over the timed steps (after `warmup`); the warm-up steps are listed apart."""
    timed, timed_tokens, timed_rollout = times[warmup:], tokens[warmup:], rollout[warmup:]
    median = statistics.median(timed)
    out = {"warmup_step_s": times[:warmup], "step_s": timed,
           "median_step_s": median, "mean_step_s": statistics.fmean(timed), "min_step_s": min(timed),
           "completion_tokens_per_step": timed_tokens,
           "mean_completion_tokens_per_step": statistics.fmean(timed_tokens) if timed_tokens else None,
           "completion_tokens_per_s": (statistics.fmean(timed_tokens) / median) if timed_tokens else None}
    if len(timed_rollout) == len(timed) and timed_rollout:
        out["rollout_s"] = timed_rollout
        out["median_rollout_s"] = statistics.median(timed_rollout)
    return out


def export(args, tmp: Path) -> tuple[Path, ChatTokenizer, dict]:
    """The model and its tokenizer in HF layout (float32, what both sides train from)."""
    from nanoseek.loading import load_model_dir
    torch.manual_seed(args.seed)
    if args.model:
        src, model, tok = load_model_dir(args.model, device="cpu", dtype=torch.float32)
        source = {"model": str(src)}
    else:
        cfg = preset(args.preset)
        tok = ChatTokenizer(byte_tokenizer(cfg.vocab_size))
        cfg = cfg.replace(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        model = Transformer(cfg)
        source = {"preset": args.preset, "weights": f"random, seed {args.seed}",
                  "tokenizer": f"byte_tokenizer({cfg.vocab_size})"}
    export_dir = tmp / "hf"
    save_pretrained(model, export_dir, dtype=torch.float32)
    tok.save(export_dir)
    source["config"] = model.config.to_dict()
    source["parameters"] = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    return export_dir, tok, source


def step_rows(cfg, steps: int) -> list[list[dict]]:
    """The prompts nanoseek's trainer draws at each step (rl.trainer.sample_prompts), so TRL
    can be fed the same ones."""
    task = get_task(TASK)
    return [sample_prompts(task, cfg, s, cfg.prompts_per_step) for s in range(steps)]


def error_record(exc: BaseException) -> dict:
    return {"error": f"{type(exc).__name__}: {exc}",
            "traceback": "".join(traceback.format_exception(exc))[-6000:]}


# ------------------------------------------------------------------ nanoseek
def run_nanoseek(args, export_dir: Path, tok: ChatTokenizer, cfg, rows: list[list[dict]],
                 device: torch.device, tmp: Path) -> dict:
    reset_memory(device)
    model = from_pretrained(export_dir, dtype=torch.float32)
    trainer = GRPOTrainer(model, tok, TASK, cfg, tmp / "nanoseek_run")
    times, tokens, rollout, used, lengths_full = [], [], [], [], True
    for s in range(args.warmup + args.steps):
        used.append(trainer.sample_prompts(cfg.prompts_per_step))
        sync(device)
        t0 = time.perf_counter()
        record = trainer.train_step()
        sync(device)
        times.append(time.perf_counter() - t0)
        tokens.append(int(record["rollout_tokens"]))
        rollout.append(record["rollout_time_s"])
        lengths_full &= tokens[-1] == cfg.prompts_per_step * cfg.group_size * cfg.max_new_tokens
        print(f"nanoseek step {s + 1}: {times[-1]:.3f}s, {tokens[-1]} completion tokens, "
              f"rollout {rollout[-1]:.3f}s, reward {record['reward']:.3f}", flush=True)
    out = summarize(times, tokens, rollout, args.warmup)
    out.update(peak_memory_gib=peak_memory_gib(device), all_full_length=lengths_full,
               same_prompts_as_trl=used == rows,
               implementation={"rollouts": "nanoseek infer.Engine",
                               **graph_flags(trainer.engine and trainer.engine.runner.graphs)})
    del trainer, model
    reset_memory(device)
    return out


# ------------------------------------------------------------------ TRL
def run_trl(args, export_dir: Path, tok: ChatTokenizer, cfg, rows: list[list[dict]],
            device: torch.device, tmp: Path) -> dict:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # renamed-argument notices
    import datasets
    import trl
    datasets.disable_progress_bars()
    versions = {"trl": trl.__version__, "transformers": transformers.__version__,
                "datasets": datasets.__version__}
    try:
        import accelerate
        versions["accelerate"] = accelerate.__version__
    except ImportError:
        pass

    hf_tok = AutoTokenizer.from_pretrained(export_dir)
    tokenizer_fixes = []
    if hf_tok.pad_token is None:  # TRL pads prompts and completions with it
        hf_tok.pad_token = hf_tok.eos_token
        tokenizer_fixes.append("pad_token = eos_token")
    if not hf_tok.chat_template:
        raise RuntimeError(f"{export_dir}: the exported tokenizer has no chat template")
    messages = [[{"role": "user", "content": r["prompt"]}] for step in rows for r in step]
    hf_ids = [hf_tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
              for m in messages]
    ours = [tok.encode(chat_prompt(tok, r["prompt"])) for step in rows for r in step]
    dataset = datasets.Dataset.from_list(
        [{"prompt": m, "meta": json.dumps(r["meta"])}  # JSON text: one column type whatever the task
         for m, r in zip(messages, (r for step in rows for r in step))])

    reset_memory(device)
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
    implementation = {"rollouts": "transformers generate", "attn": model.config._attn_implementation,
                      "experts": getattr(model.config, "_experts_implementation", None)}

    rollout: list[float] = []
    plain_generate = model.generate

    def timed_generate(*a, **k):
        sync(device)
        t0 = time.perf_counter()
        result = plain_generate(*a, **k)
        sync(device)
        rollout.append(time.perf_counter() - t0)
        return result
    model.generate = timed_generate  # TRL generates through the unwrapped model's generate

    tokens: list[int] = []
    full = [True]

    def accuracy(prompts, completions, completion_ids=None, **columns):
        lengths = [len(c) for c in completion_ids]
        tokens.append(sum(lengths))
        full[0] &= all(n == cfg.max_new_tokens for n in lengths)
        return accuracy_reward(prompts, completions, **columns)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.last = [], None

        def on_train_begin(self, *a, **k):
            sync(device)
            self.last = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync(device)
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now
            print(f"TRL step {len(self.times)}: {self.times[-1]:.3f}s, "
                  f"{tokens[-1] if tokens else '?'} completion tokens, "
                  f"rollout {rollout[-1] if rollout else float('nan'):.3f}s", flush=True)

    on_gpu = device.type == "cuda"
    B = cfg.prompts_per_step * cfg.group_size
    trl_args = trl.GRPOConfig(
        output_dir=str(tmp / "trl_run"), report_to="none", save_strategy="no", disable_tqdm=True,
        logging_steps=args.warmup + args.steps, seed=args.seed, data_seed=args.seed,
        use_cpu=not on_gpu, bf16=on_gpu, fp16=False, gradient_checkpointing=False,
        per_device_train_batch_size=B, gradient_accumulation_steps=1, steps_per_generation=1,
        num_generations=cfg.group_size, max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature, top_p=1.0, top_k=0,
        generation_kwargs={"min_new_tokens": cfg.max_new_tokens} if args.ignore_eos else None,
        use_vllm=False, shuffle_dataset=False, dataloader_num_workers=0,
        learning_rate=cfg.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=cfg.weight_decay,
        adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=cfg.grad_clip,
        optim="adamw_torch_fused" if on_gpu else "adamw_torch",
        beta=cfg.beta, num_iterations=cfg.mu, epsilon=cfg.clip_eps, loss_type=cfg.loss_type,
        scale_rewards=cfg.scale, mask_truncated_completions=False,
        max_steps=args.warmup + args.steps)
    timer = StepTimer()
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[accuracy], args=trl_args, train_dataset=dataset,
                              processing_class=hf_tok, callbacks=[timer])
    trainer.train()
    out = summarize(timer.times, tokens, rollout, args.warmup)
    out.update(peak_memory_gib=peak_memory_gib(device), all_full_length=full[0],
               prompt_ids_match=hf_ids == ours, tokenizer_fixes=tokenizer_fixes,
               implementation=implementation, versions=versions,
               gradient_checkpointing=False)
    del trainer, model
    reset_memory(device)
    return out


# ------------------------------------------------------------------ main
def table(result: dict) -> str:
    lines = [f"{'side':10s} {'median s/step':>13s} {'mean':>8s} {'min':>8s} {'rollout s':>9s} "
             f"{'tokens/step':>11s} {'tokens/s':>9s} {'peak GiB':>9s}"]
    for name, r in result["sides"].items():
        if "error" in r:
            lines.append(f"{name:10s} failed: {r['error'][:200]}")
            continue
        peak = r["peak_memory_gib"]
        lines.append(f"{name:10s} {r['median_step_s']:13.3f} {r['mean_step_s']:8.3f} {r['min_step_s']:8.3f} "
                     f"{r.get('median_rollout_s', float('nan')):9.3f} "
                     f"{r['mean_completion_tokens_per_step']:11.0f} {r['completion_tokens_per_s']:9.0f} "
                     f"{peak if peak is not None else float('nan'):9.2f}")
    if result.get("speedup_vs_trl") is not None:
        lines.append(f"speed-up, TRL s/step / nanoseek s/step: {result['speedup_vs_trl']:.2f}x "
                     f"(target >= 3x: {'met' if result['target_3x_met'] else 'NOT met'})")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--preset", default="small", help="a nanoseek preset, random weights (default small)")
    src.add_argument("--model", help="a trained checkpoint or run directory (its tokenizer beside it)")
    ap.add_argument("--steps", type=int, default=5, help="timed GRPO steps per side")
    ap.add_argument("--warmup", type=int, default=2, help="untimed GRPO steps before them")
    ap.add_argument("--group-size", type=int, default=8, help="G completions per prompt")
    ap.add_argument("--prompts-per-step", type=int, default=8, help="N prompts per step")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--beta", type=float, default=0.001, help="KL weight; > 0 loads a reference model")
    ap.add_argument("--loss-type", default="grpo", choices=["grpo", "dr_grpo", "dapo"])
    ap.add_argument("--level", type=int, default=1, help="arithmetic difficulty")
    ap.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                    help="full-length completions on both sides (default on)")
    ap.add_argument("--compile-rollouts", action="store_true",
                    help="nanoseek: compile the engine's decode step before graph capture (warm-up pays it)")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(out_dir() / "grpo_trl.json"))
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    import transformers
    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)

    cfg = grpo_config(group_size=args.group_size, prompts_per_step=args.prompts_per_step,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=1.0,
                      lr=args.lr, weight_decay=0.0, grad_clip=1.0, beta=args.beta, loss_type=args.loss_type,
                      scale="group", mu=1, micro_batch=0, dynamic_sampling=False,
                      compile_rollouts=args.compile_rollouts, ignore_eos=args.ignore_eos,
                      rewards={"accuracy": 1.0}, level=args.level, prompt_format="chat",
                      steps=args.warmup + args.steps, seed=args.seed, device=str(device))
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "grpo_trl", **environment(), "task": TASK,
              "settings": {"group_size": cfg.group_size, "prompts_per_step": cfg.prompts_per_step,
                           "completions_per_step": cfg.group_size * cfg.prompts_per_step,
                           "max_new_tokens": cfg.max_new_tokens, "ignore_eos": args.ignore_eos,
                           "temperature": cfg.temperature, "top_p": 1.0, "lr": cfg.lr, "beta": cfg.beta,
                           "mu": cfg.mu, "loss_type": cfg.loss_type, "scale_rewards": cfg.scale,
                           "clip_eps": cfg.clip_eps, "grad_clip": cfg.grad_clip, "adam_betas": [0.9, 0.95],
                           "weight_decay": 0.0, "level": cfg.level, "prompt_format": "chat",
                           "steps": args.steps, "warmup": args.warmup, "seed": args.seed,
                           "precision": "float32 master weights, bf16 autocast" if device.type == "cuda"
                           else "float32"},
              "sides": {}}

    def write():
        out_path.write_text(json.dumps(result, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        export_dir, tok, source = export(args, tmp)
        result["model"] = source
        rows = step_rows(cfg, args.warmup + args.steps)
        lengths = [len(tok.encode(chat_prompt(tok, r["prompt"]))) for step in rows for r in step]
        result["settings"]["prompt_tokens"] = {"mean": statistics.fmean(lengths), "max": max(lengths)}

        try:
            result["sides"]["nanoseek"] = run_nanoseek(args, export_dir, tok, cfg, rows, device, tmp)
        except Exception as exc:  # noqa: BLE001 - recorded, and TRL still runs
            result["sides"]["nanoseek"] = error_record(exc)
            traceback.print_exc()
            reset_memory(device)
        write()
        if not args.skip_trl:
            try:
                result["sides"]["trl"] = run_trl(args, export_dir, tok, cfg, rows, device, tmp)
            except Exception as exc:  # noqa: BLE001 - an import or run failure is a result too
                result["sides"]["trl"] = error_record(exc)
                traceback.print_exc()
                reset_memory(device)

    nano, hf = result["sides"].get("nanoseek", {}), result["sides"].get("trl", {})
    if "median_step_s" in nano and "median_step_s" in hf:
        result["speedup_vs_trl"] = hf["median_step_s"] / nano["median_step_s"]
        result["target_3x_met"] = result["speedup_vs_trl"] >= 3.0
        if not args.ignore_eos:
            result["note"] = ("completions stop at EOS, so the sides may generate different numbers of "
                              "tokens: read mean_completion_tokens_per_step beside the seconds")
    write()
    print()
    print(table(result))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
