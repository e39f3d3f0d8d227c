"""Training throughput: nanoseek in BF16 and FP8 against transformers' DeepseekV3ForCausalLM, same job.

Both sides train the same weights (nanoseek saves them in HF layout and transformers loads
that directory) on the same token batches (batch 8 x 1024 by default), with the same
optimizer (fused AdamW, lr 3e-4, betas 0.9/0.95, weight decay 0.1, clip 1.0), float32
master weights under BF16 autocast. One step = forward and backward of `--accum`
micro-batches, clip, AdamW step, zero_grad and one host read of the loss (what a trainer
logging every step does).

transformers trains the main model only: it has no MTP loss and no balance loss. nanoseek
runs with MTP (its real objective, ~1 extra MoE layer and output head, where the preset
has MTP) and without, which is the same computation as transformers' and is the
apples-to-apples ratio. `--precision bf16,fp8` adds nanoseek's FP8 rows (nanoseek/fp8:
DeepSeek-V3's recipe), against which transformers has nothing to run. `bf16-per-use` and
`fp8-per-use` prepare the weights (the BF16 cast, the experts' FP8 quantization) at every
use instead of once a step (train field weights_once, on by default): the peers that
default must beat. `bf16-fused-accum` and `fp8-fused-accum` add each micro-batch's BF16
weight gradient into the float32 one in a single pass, and FP8's routed experts add theirs in
the wgrad kernel (train field fuse_grad_accumulation).

Shapes: `--preset bench-1b` (default), or a real model's layer shapes with fewer layers,
e.g. `--preset deepseek-v2-lite --layers 4 --batch 2 --seq 4096`.

MFU = tokens/s x training FLOPs per token (`nanoseek info`, at this sequence length) over
a peak: the datasheet's dense peak of the row's GEMM precision (H100/H200 SXM: 989 TFLOP/s
BF16, 1,979 FP8) and the GEMM ceiling measured in the same job (an 8192^3 BF16 matmul; an
8192^3 FP8 `torch._scaled_mm` with 1x128 / 128x128 scales). An FP8 row's attention and
head still run in BF16, so its MFU against the FP8 peak understates it.

    python benchmarks/train_throughput.py [--preset NAME --layers N --batch 8 --seq 1024
        --accum 1 --precision bf16,fp8 --steps 10 --profile --skip-hf --activation-checkpointing]
    python benchmarks/train_throughput.py --smoke    the CPU, tiny preset, 2 steps: checks the script
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import traceback
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bf16_gemm_flops, environment, gemm_flops, out_dir, write_json  # noqa: E402

from nanoseek import Transformer, preset, save_pretrained  # noqa: E402
from nanoseek.info import model_info  # noqa: E402
from nanoseek.train.optim import build_optimizer  # noqa: E402
from nanoseek.train.precision import prepare_precision  # noqa: E402
from nanoseek.train.recompute import checkpoint_blocks  # noqa: E402
from nanoseek.train.step import train_step  # noqa: E402

PEAK = {"bf16": 989e12, "fp8": 1979e12}  # H100/H200 SXM dense datasheet peaks
LR = 3e-4


class Clock:
    """Milliseconds of a call: CUDA events on a GPU, the wall clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn):
        if not self.cuda:
            t0 = time.perf_counter()
            out = fn()
            return (time.perf_counter() - t0) * 1e3, out
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end), out


def time_steps(step, batches, args, clock: Clock) -> dict:
    """First step (compilation included), median step after warm-up, peak memory."""
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    step(batches[0])
    clock.sync()
    first = time.time() - t0
    for i in range(args.warmup):
        step(batches[i % len(batches)])
    clock.sync()
    timed = [clock.time(lambda b=batches[i % len(batches)]: step(b)) for i in range(args.steps)]
    times = sorted(ms for ms, _ in timed)
    return {"median_step_ms": times[len(times) // 2], "first_step_s": first, "last_loss": timed[-1][1],
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if clock.cuda else None}


def gemm_ceilings(device: torch.device, n: int = 8192) -> dict:
    """TFLOP/s of an n^3 BF16 matmul and of an n^3 FP8 blockwise-scaled _scaled_mm, measured."""
    if device.type != "cuda":
        return {}
    from nanoseek.fp8 import gemm
    from nanoseek.fp8.quant import ACT_TILE, WEIGHT_BLOCK, quantize
    qa, qb = (quantize(torch.randn(n, n, device=device, dtype=torch.bfloat16), block)
              for block in (ACT_TILE, WEIGHT_BLOCK))
    return {"bf16": bf16_gemm_flops(device, n),
            "fp8": gemm_flops(lambda: gemm.scaled_mm(qa, qb, torch.bfloat16, fast=True), n)}


def nanoseek_side(cfg, state, batches, args, device, precision: str, mtp: bool, compile: bool,
                  profile_dir=None):
    model = Transformer(cfg if mtp else cfg.replace(num_nextn_predict_layers=0)).to(device).train()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and all(k.startswith(f"model.layers.{cfg.num_hidden_layers}.") for k in unexpected), \
        (missing, unexpected)
    base = precision.removesuffix("-per-use").removesuffix("-fused-accum")
    per_use, fused = precision.endswith("-per-use"), precision.endswith("-fused-accum")
    autocast = prepare_precision(model, base, device)
    if args.activation_checkpointing:
        checkpoint_blocks(model)
    opt = build_optimizer(model, LR)
    call = torch.compile(model, fullgraph=True, dynamic=False) if compile else None  # None: as the trainer

    def step(batch):
        stats = train_step(model, [batch] * args.accum, opt, grad_clip=1.0, autocast_dtype=autocast, compiled=call,
                           base_model=model, weights_once=not per_use, fuse_accumulation=fused)
        return stats["loss"]

    row = time_steps(step, batches, args, Clock(device))
    if profile_dir is not None:
        from common import profile_kernels
        _, _, table = profile_kernels(lambda: step(batches[0]), calls=3)
        (Path(profile_dir) / f"profile_train_{args.preset}_{precision}.txt").write_text(table)
        print(table[:6000])
    del model, opt, call
    print(f"nanoseek {precision} mtp={mtp} compile={compile}: {row['median_step_ms']:.1f} ms/step, "
          f"first step {row['first_step_s']:.0f}s", flush=True)
    return {**row, "precision": base, "variant": precision}


def hf_side(ckpt_dir, batches, args, device):
    import transformers
    from transformers import AutoModelForCausalLM
    transformers.logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32).to(device).train()
    opt = build_optimizer(model, LR)  # nanoseek's parameter groups: the module names are the same
    impl = {"attn": model.config._attn_implementation,
            "experts": getattr(model.config, "_experts_implementation", None)}

    def step(batch):
        for _ in range(args.accum):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = model(input_ids=batch["input_ids"], labels=batch["labels"])
            (out.loss / args.accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)

    row = time_steps(step, batches, args, Clock(device))
    del model, opt
    print(f"transformers {impl}: {row['median_step_ms']:.1f} ms/step", flush=True)
    return {**row, "implementation": impl, "precision": "bf16"}


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="bench-1b")
    ap.add_argument("--layers", type=int, default=None, help="num_hidden_layers (default: the preset's)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--precision", default="bf16", help="comma-separated: bf16, fp8, and either with -per-use or "
                                                         "-fused-accum")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (a real run's "
                    "global batch is many: the AdamW step, which FP8 does not change, is paid once for them)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="kernel table of one compiled step per precision")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--eager", action="store_true", help="also eager rows (default: compiled only, and "
                    "bench-1b's eager BF16 row)")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="the CPU, the tiny preset, 2 steps, no compile")
    args = ap.parse_args()
    if args.smoke:
        args.preset, args.batch, args.seq, args.steps, args.warmup = "tiny", 2, 64, 2, 0
        args.skip_hf, args.layers = True, args.layers or 2
    args.precisions = args.precision.split(",")
    if not set(args.precisions) <= {*PEAK, *(f"{p}-{v}" for p in PEAK for v in ("per-use", "fused-accum"))}:
        ap.error(f"--precision {args.precision}: comma-separated bf16, fp8, and either with -per-use or -fused-accum")
    return args


def summarize(rows: dict, args, cfg, flops: float, tokens: int, ceilings: dict | None, device) -> dict:
    """The result so far: each timed row's tokens/s, MFU and ratios to transformers and to its
    BF16 twin; a row that failed keeps its error."""
    timed = {name: r for name, r in rows.items() if "median_step_ms" in r}
    for r in timed.values():
        r["tokens_per_s"] = tokens / (r["median_step_ms"] / 1e3)
        achieved = r["tokens_per_s"] * flops
        r["mfu_datasheet"] = achieved / PEAK[r["precision"]] if device.type == "cuda" else None
        r["mfu_measured_ceiling"] = achieved / ceilings[r["precision"]] if ceilings else None
    hf = timed.get("transformers (eager, default)")
    for name, r in timed.items():
        if hf:
            r["speedup_vs_transformers"] = r["tokens_per_s"] / hf["tokens_per_s"]
        variant = name.rsplit(", ", 1)[-1]
        bf16 = timed.get(name.replace(f", {variant}", ", bf16"))  # the same row in BF16 (its default path)
        if bf16 and variant != "bf16":
            r["speedup_vs_bf16"] = r["tokens_per_s"] / bf16["tokens_per_s"]
            r["peak_memory_vs_bf16"] = (r["peak_memory_gib"] / bf16["peak_memory_gib"]
                                        if r["peak_memory_gib"] else None)
    result = {"benchmark": "train_throughput", **environment(), "preset": args.preset, "layers": cfg.num_hidden_layers,
              "batch": args.batch, "seq": args.seq, "accum": args.accum, "steps": args.steps, "warmup": args.warmup,
              "activation_checkpointing": args.activation_checkpointing, "smoke": args.smoke,
              "train_flops_per_token": flops, "peak_flops_datasheet": PEAK,
              "gemm_ceiling_flops_measured": ceilings, "rows": rows, "config": cfg.to_dict(),
              "command": " ".join(sys.argv)}
    return result


def json_name(args) -> str:
    suffix = "" if args.preset == "bench-1b" and not args.smoke else f"_{args.preset}{'_smoke' if args.smoke else ''}"
    return f"train_throughput{suffix}.json"


def main():
    args = parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    torch.manual_seed(0)
    cfg = preset(args.preset)
    if args.layers:
        cfg = cfg.replace(num_hidden_layers=args.layers)
    ref = Transformer(cfg)
    state = ref.state_dict()
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(device)
        batches.append({"input_ids": ids, "labels": ids})
    tokens = args.batch * args.seq * args.accum
    flops = model_info(cfg, context_length=args.seq)["train_flops_per_token"]
    results = out_dir()
    ceilings = gemm_ceilings(device)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(ref, tmp)
        del ref
        gc.collect()
        if not args.skip_hf:
            rows["transformers (eager, default)"] = hf_side(tmp, batches, args, device)
            gc.collect(); torch.cuda.empty_cache()
    compile = device.type == "cuda"
    for precision in args.precisions:
        modes = [False, True] if (args.eager or (args.preset == "bench-1b" and precision == "bf16")) else [True]
        for eager_or_compiled in modes if compile else [False]:
            mtp_rows = [False, True] if cfg.num_nextn_predict_layers and eager_or_compiled else [False]
            for mtp in mtp_rows:
                mode = "compile" if eager_or_compiled else "eager"
                name = f"nanoseek {mode}, {'MTP' if mtp else 'no MTP'}, {precision}"
                profile = results if args.profile and eager_or_compiled and not mtp else None
                try:
                    rows[name] = nanoseek_side(cfg, state, batches, args, device, precision, mtp,
                                               eager_or_compiled, profile)
                except Exception as e:  # noqa: BLE001 - one path failing (a kernel's compile) leaves the others' rows
                    traceback.print_exc()
                    rows[name] = {"variant": precision, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                gc.collect(); torch._dynamo.reset()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                write_json(summarize(rows, args, cfg, flops, tokens, ceilings, device), json_name(args))  # so far
    path = write_json(summarize(rows, args, cfg, flops, tokens, ceilings, device), json_name(args))
    def fmt(v, spec):
        return format(v, spec) if v is not None else format("-", f">{spec.split('.')[0]}")
    print(f"\n{'run':34s} {'step ms':>9s} {'tokens/s':>10s} {'MFU sheet':>9s} {'MFU meas':>9s} "
          f"{'peak GiB':>9s} {'vs HF':>6s} {'vs bf16':>7s}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:34s} failed: {r['error']}")
            continue
        print(f"{name:34s} {r['median_step_ms']:9.1f} {r['tokens_per_s']:10,.0f} {fmt(r['mfu_datasheet'], '9.1%')} "
              f"{fmt(r['mfu_measured_ceiling'], '9.1%')} {fmt(r['peak_memory_gib'], '9.1f')} "
              f"{fmt(r.get('speedup_vs_transformers'), '6.2f')} {fmt(r.get('speedup_vs_bf16'), '7.2f')}")
    if ceilings:
        print("GEMM ceilings measured: " + ", ".join(f"{k} {v / 1e12:,.0f} TFLOP/s" for k, v in ceilings.items()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
