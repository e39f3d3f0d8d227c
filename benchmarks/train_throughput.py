"""Training throughput: nanoseek against transformers' DeepseekV3ForCausalLM, same job.

Both sides train bench-1b from the same weights (nanoseek saves them in HF layout and
transformers loads that directory), on the same token batches (batch 8 x 1024 by default),
with the same optimizer (fused AdamW, lr 3e-4, betas 0.9/0.95, weight decay 0.1, clip 1.0),
float32 master weights under BF16 autocast. One step = forward, backward, clip, AdamW
step, zero_grad and one host read of the loss (what a trainer logging every step does).

transformers trains the main model only: it has no MTP loss and no balance loss. nanoseek
runs twice: with MTP (its real objective, ~1 extra MoE layer and output head) and without,
which is the same computation as transformers' and is the apples-to-apples ratio.

MFU = tokens/s x training FLOPs per token (`nanoseek info`, at this sequence length) /
989 TFLOP/s (H100/H200 SXM dense BF16 datasheet; ~790 measured on this card's matmuls).

    python benchmarks/train_throughput.py [--batch 8 --seq 1024 --steps 10 --profile]
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, out_dir, write_json  # noqa: E402

from nanoseek import Transformer, preset, save_pretrained  # noqa: E402
from nanoseek.info import model_info  # noqa: E402
from nanoseek.train.optim import build_optimizer  # noqa: E402
from nanoseek.train.step import train_step  # noqa: E402

PEAK_BF16 = 989e12
LR = 3e-4


def measure(step_fn, batches, warmup, steps):
    for i in range(warmup):
        step_fn(batches[i % len(batches)])
    torch.cuda.synchronize()
    times = []
    for i in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = step_fn(batches[i % len(batches)])
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2], loss


def time_steps(step, batches, args) -> dict:
    """First step (compilation included), median step after warm-up, peak memory."""
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    step(batches[0])
    first = time.time() - t0
    ms, loss = measure(step, batches, args.warmup, args.steps)
    return {"median_step_ms": ms, "first_step_s": first, "last_loss": loss,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def nanoseek_side(cfg, state, batches, args, mtp: bool, compile: bool, profile_dir=None):
    model = Transformer(cfg if mtp else cfg.replace(num_nextn_predict_layers=0)).cuda().train()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and all(".12." in k for k in unexpected), (missing, unexpected)
    opt = build_optimizer(model, LR)
    call = torch.compile(model, fullgraph=True, dynamic=False) if compile else model

    def step(batch):
        stats = train_step(model, [batch], opt, grad_clip=1.0, autocast_dtype=torch.bfloat16,
                           compiled=call, base_model=model)
        return stats["loss"]

    row = time_steps(step, batches, args)
    if profile_dir is not None:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for b in batches[:3]:
                step(b)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
        (Path(profile_dir) / "profile_nanoseek.txt").write_text(table)
        print(table[:6000])
    del model, opt, call
    print(f"nanoseek mtp={mtp} compile={compile}: {row['median_step_ms']:.1f} ms/step, "
          f"first step {row['first_step_s']:.0f}s", flush=True)
    return row


def hf_side(ckpt_dir, batches, args):
    import transformers
    from transformers import AutoModelForCausalLM
    transformers.logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32).cuda().train()
    opt = build_optimizer(model, LR)  # nanoseek's parameter groups: the module names are the same
    impl = {"attn": model.config._attn_implementation,
            "experts": getattr(model.config, "_experts_implementation", None)}

    def step(batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=batch["input_ids"], labels=batch["labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)

    row = time_steps(step, batches, args)
    del model, opt
    print(f"transformers {impl}: {row['median_step_ms']:.1f} ms/step", flush=True)
    return {**row, "implementation": impl}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = preset("bench-1b")
    ref = Transformer(cfg)
    state = ref.state_dict()
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).cuda()
        batches.append({"input_ids": ids, "labels": ids})
    tokens = args.batch * args.seq
    flops = model_info(cfg, context_length=args.seq)["train_flops_per_token"]
    results = out_dir()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(ref, tmp)
        del ref
        gc.collect()
        if not args.skip_hf:
            rows["transformers (eager, default)"] = hf_side(tmp, batches, args)
            gc.collect(); torch.cuda.empty_cache()
    rows["nanoseek eager, no MTP"] = nanoseek_side(cfg, state, batches, args, mtp=False, compile=False)
    gc.collect(); torch.cuda.empty_cache()
    rows["nanoseek compile, no MTP"] = nanoseek_side(cfg, state, batches, args, mtp=False, compile=True,
                                                     profile_dir=results if args.profile else None)
    gc.collect(); torch.cuda.empty_cache(); torch._dynamo.reset()
    rows["nanoseek compile, MTP"] = nanoseek_side(cfg, state, batches, args, mtp=True, compile=True)
    for r in rows.values():
        r["tokens_per_s"] = tokens / (r["median_step_ms"] / 1e3)
        r["mfu"] = r["tokens_per_s"] * flops / PEAK_BF16
    hf = rows.get("transformers (eager, default)")
    if hf:
        for r in rows.values():
            r["speedup_vs_transformers"] = r["tokens_per_s"] / hf["tokens_per_s"]
    result = {"benchmark": "train_throughput", **environment(), "preset": "bench-1b",
              "batch": args.batch, "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
              "train_flops_per_token": flops, "peak_flops": PEAK_BF16, "rows": rows,
              "config": cfg.to_dict()}
    path = write_json(result, "train_throughput.json")
    print(f"\n{'run':32s} {'step ms':>8s} {'tokens/s':>10s} {'MFU':>6s} {'peak GiB':>9s} {'vs HF':>6s}")
    for name, r in rows.items():
        print(f"{name:32s} {r['median_step_ms']:8.1f} {r['tokens_per_s']:10,.0f} {r['mfu']:6.1%} "
              f"{r['peak_memory_gib']:9.1f} {r.get('speedup_vs_transformers', float('nan')):6.2f}x")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
