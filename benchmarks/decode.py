"""Decode speed against the memory-bandwidth roofline, and against transformers' `generate`
on the same weights in the same job.

A preset's model (`--preset`: bench-1b, deepseek-v2-lite, deepseek-v3 ...; `--layers N`: its
first N layers with their real shapes, MTP off) with random weights (seeded) is saved in HF
layout; transformers loads that directory; both run in BF16 on random prompts of `--prompt`
tokens and generate exactly `--new` tokens greedily (`--temperature T`: the engine samples,
seeded), EOS ignored, at each of `--batches`.

Per row:
- TTFT: prefill + first token, timed as a 1-token generation;
- decode tokens/s: batch × (new − 1) / the time from every row's first token to every
  row's last within the same run (transformers' per-step logits, the engine's step loop);
- peak memory (GPU): torch.cuda.max_memory_allocated during the run;
- the roofline: a decode step must read every weight it uses (attention, dense MLPs, shared
  experts, routers, the output head), the routed experts its batch touches, and the latent
  cache of every row up to its position. `roofline_tokens_per_s` is the batch over the time
  those bytes take at the device copy bandwidth measured in this run (`copy_bandwidth_GBps`);
  the experts touched are counted per layer and step in an eager pass over the same prompts
  (`experts_touched_per_layer`), the cache at the decode's middle position;
  `roofline_fraction` = decode tokens/s ÷ roofline.
Modes (`--modes`): the engine's defaults (`default`), the compiled captured step
(`compiled`), batches up to 4 on the fused Triton step (`fused`), compiled with the routed
experts always on the grouped GEMM (`grouped`), compiled with the MLA attention on the
decode attention kernels or on the absorbed attention (`kernel-attention`, `torch-attention`:
InferenceConfig.decode_attention; `--max-len`, a cache longer than the requests, is where
they differ most), captured but not compiled (`graphs`), no CUDA graphs (`eager`). Greedy tokens are compared with the compiled engine's
(`same_tokens_as_compiled`; random weights leave logits near-tied, so BF16 rounding alone
changes some) and between an engine's first and last run (`same_tokens_run_to_run`).
`--fp8`: the BF16 rows run the weights an FP8 checkpoint of the model holds, dequantised
(the twin), then the same modes run them FP8-resident (128x128 block scales, as the official
V3 checkpoints: infer/fp8_weights.py), weight-only and with the activations in FP8 too
(`--fp8-kernels auto w8a8`), or with FP8Linear's dequantization written in the step for
Inductor to fuse (`twin`: in the batch-1 step's tuned compile a one-row matmul becomes a
reduction that reads the FP8 weight in place; elsewhere it dequantizes whole weights), rows
marked "FP8 weights" with `speedup_vs_bf16` (beside `speedup_ceiling_vs_bf16`, the ratio of the
two rows' step bytes: the most FP8 can gain there) and
`same_tokens_as_bf16` against the BF16 row of their mode and batch (near-tie flips of a
random model included), and `fp8_teacher_forced_vs_bf16`: the largest batch's BF16
continuations forced through each FP8 model's cached decode, its greedy choices against BF16's
at every position and where BF16's top-two gap exceeds 0.25, 0.5 and 1 logit standard
deviations. Each figure is the median of `--repeat` runs after a warm-up run.
`--record-paths` (with
`fused` and `compiled`) writes the batches up to which the fused step was faster into
nanoseek/infer/decode_paths.json, the engine's default choice of decode step, for the BF16
weights and (with `--fp8`) the FP8-resident ones, or only those named (`--record-paths fp8`);
`--record-paths-from JSON` does the same from a result file this script wrote.

    python benchmarks/decode.py --preset deepseek-v2-lite --batches 1 32
    python benchmarks/decode.py --preset deepseek-v3 --layers 2 --modes compiled fused --record-paths
    python benchmarks/decode.py --preset deepseek-v2-lite --batches 1 32 --modes default --fp8 --skip-hf
    python benchmarks/decode.py --device cpu --preset tiny --prompt 32 --new 8 --batches 1 4 --skip-hf --modes eager
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (copy_bandwidth, environment, graph_flags, median_seconds, out_dir, profile_kernels,  # noqa: E402
                    result_tag, sliced_preset, synchronize, write_json)  # noqa: E402

from nanoseek import Transformer, from_pretrained, save_pretrained  # noqa: E402
from nanoseek.infer.config import InferenceConfig  # noqa: E402
from nanoseek.infer.engine import Engine  # noqa: E402
from nanoseek.infer.sampling import SamplingParams  # noqa: E402
from nanoseek.model.moe import Experts, MoE  # noqa: E402

# --modes: (row label suffix, the engine's InferenceConfig settings)
MODES = {"default": (" (defaults)", dict()),
         "compiled": (" (compiled step)", dict(compile=True, fused_decode_rows=0)),
         # batches of up to 4 rows on the fused Triton step (infer/fused.py); larger ones compiled
         "fused": (" (fused Triton step)", dict(compile=True, fused_decode_rows=4)),
         "grouped": (" (compiled, grouped GEMM experts only)",
                     dict(compile=True, fused_decode_rows=0, expert_path="grouped")),
         # the routed experts gathered, their down projection (FP8: every projection) through the GEMV
         "gemv-experts": (" (compiled, GEMV expert down projections)",
                          dict(compile=True, fused_decode_rows=0, expert_path="gather_gemv")),
         # the compiled step's MLA attention forced either way (compiled: decode_attention auto)
         "kernel-attention": (" (compiled, attention kernels)",
                              dict(compile=True, fused_decode_rows=0, decode_attention="kernel")),
         "torch-attention": (" (compiled, absorbed attention)",
                             dict(compile=True, fused_decode_rows=0, decode_attention="torch")),
         "graphs": (" (CUDA graphs, not compiled)", dict(compile=False, fused_decode_rows=0)),
         "eager": (" (no CUDA graphs)", dict(cuda_graphs=False, compile=False))}

# FP8Linear.kernel -> the rows' label
FP8_LABELS = {"auto": " FP8 weights", "w8a8": " FP8 weights, W8A8", "twin": " FP8 weights, fused dequantization"}


def launch_file(path: str | None) -> dict | None:
    """Launch shapes saved by a tuning run (fused_tuning.json, moe_tuning.json), or None."""
    return json.loads(Path(path).read_text()) if path else None


def same_tokens(a: list[list[int]], b: list[list[int]]) -> float:
    """The fraction of positions at which two runs' token lists agree."""
    return sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / sum(map(len, a))


DECISIVE = (0.25, 0.5, 1.0)  # top-two logit gaps, in the logits' standard deviations


def teacher_forced(model, seqs: torch.Tensor, start: int,
                   fused_launch: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """generate.forced_decode's choices after each of positions start-1 .. T-2, [B, T - start],
    and the gap between each one's top two logits over the logits' standard deviation."""
    from nanoseek.infer.generate import forced_decode
    choices, gaps = [], []
    for logits in forced_decode(model, seqs, start, fused_launch):
        logits = logits.float()
        top = logits.topk(2, -1).values
        choices.append(logits.argmax(-1))
        gaps.append((top[:, 0] - top[:, 1]) / logits.std(-1))
    return torch.stack(choices, 1), torch.stack(gaps, 1)


def agreement(choice: torch.Tensor, reference: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """How often `choice` equals the reference's choices: at every position, and where the
    reference's top-two gap exceeds each of DECISIVE (a random model's logits are near-tied,
    median gap ~0.2 std, so its flips there say little about a kernel's arithmetic)."""
    ref, gap = reference
    same = choice == ref
    out = {"positions": ref.numel(), "same": int(same.sum()) / ref.numel()}
    for t in DECISIVE:
        n = int((gap > t).sum())
        out[f"gap_over_{t}_std"] = {"positions": n, "same": int(same[gap > t].sum()) / n if n else None}
    return out


def inductor_option(text: str) -> tuple[str, object]:
    """'key=value' -> (key, value as bool, int, float or string)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"--tuned-option wants KEY=VALUE, got {text!r}")
    for parse in (lambda v: {"true": True, "false": False}[v.lower()], int, float):
        try:
            return key, parse(value)
        except (KeyError, ValueError):
            pass
    return key, value


def measure(run, batch, new, repeat, device):
    """run(n) generates n tokens per row and returns the seconds from every row's first token
    to every row's last. TTFT and the whole run are medians of `repeat` timed runs after a
    warm-up; decode tokens/s is batch·(new − 1) over the median first-to-last span of the
    timed full runs (not the full runs minus the TTFT runs: prefill jitter would dominate)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ttft = median_seconds(lambda: run(1), repeat, device)
    spans = []
    total = median_seconds(lambda: spans.append(run(new)), repeat, device)
    span = statistics.median(spans[1:])  # the timed runs, not the warm-up
    return {"ttft_s": ttft, "total_s": total, "decode_s": span, "decode_tokens_per_s": batch * (new - 1) / span,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


class StepTimes:
    """A transformers logits processor that only notes when each step's logits are ready
    (one call per generated token; the synchronize is what transformers' own per-step
    stopping check does anyway)."""

    def __init__(self, device):
        self.times, self.device = [], device

    def __call__(self, input_ids, scores):
        synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


def engine_run(engine, prompts, n, temperature: float = 0.0):
    """Run of the prompts to n tokens each through the engine's step loop, greedy or sampled
    at `temperature` (request i seeded with i): the token lists and the seconds from the step
    that gave every request its first token to the end (each step ends with the tokens read
    back to the host)."""
    seqs = [engine.add_request(p, SamplingParams(max_tokens=n, ignore_eos=True, temperature=temperature, seed=i))
            for i, p in enumerate(prompts)]
    first = None
    while engine.has_unfinished():
        engine.step()
        if first is None and all(s.output_ids for s in seqs):
            first = time.perf_counter()
    return [list(s.output_ids) for s in seqs], time.perf_counter() - first


def tensor_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def experts_touched(model, prompts, steps: int) -> list[float]:
    """Distinct routed experts a decode step of len(prompts) rows reads, per MoE layer, mean
    over `steps` eager decode steps after the prompts' prefill (the routers' choices as the
    engine makes them)."""
    B, counts = len(prompts), {}
    hooks = []
    for i, layer in enumerate(model.main_layers):
        if isinstance(layer.mlp, MoE):
            def count(module, args, out, i=i):
                if out[1].shape[0] == B:  # a decode step: one token per row
                    counts.setdefault(i, []).append(out[1].unique().numel())
            hooks.append(layer.mlp.gate.register_forward_hook(count))
    try:
        engine_run(Engine(model, None, max_batch=B, max_len=len(prompts[0]) + steps + 1,
                          config=InferenceConfig(cuda_graphs=False)), prompts, steps + 1)
    finally:
        for h in hooks:
            h.remove()
    return [statistics.mean(c) for _, c in sorted(counts.items())]


def step_bytes(model, touched: list[float], batch: int, positions: float, cache_bytes_per_token: int) -> float:
    """Bytes one decode step of `batch` rows must read: every main-layer weight but the routed
    experts, their touched experts, the final norm and head, the batch's embedding rows, and
    each row's latent cache up to `positions`."""
    total, moe = 0.0, iter(touched)
    for layer in model.main_layers:
        total += tensor_bytes(layer)
        experts = next((m for m in layer.modules() if isinstance(m, Experts)), None)
        if experts is not None:
            per_expert = tensor_bytes(experts) / experts.gate_proj.shape[0]
            total += per_expert * next(moe) - tensor_bytes(experts)
    emb = model.model.embed_tokens.weight
    total += tensor_bytes(model.model.norm) + tensor_bytes(model.lm_head) + batch * emb[0].numel() * emb.element_size()
    return total + batch * positions * cache_bytes_per_token


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="bench-1b")
    ap.add_argument("--layers", type=int, default=None, help="the preset's first N layers (real shapes, no MTP)")
    ap.add_argument("--device", default=None, help="cuda (default when there is one) or cpu (a smoke run)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="the engine's requests sample at this temperature, seeded (default 0: greedy; "
                         "transformers stays greedy, so use --skip-hf)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--max-len", type=int, default=None,
                    help="the engine's cache length (default prompt + new): a server's, longer than its requests")
    ap.add_argument("--modes", nargs="+", default=["default", "compiled"], choices=list(MODES))
    ap.add_argument("--fp8", action="store_true", help="the modes again with the layer weights in FP8")
    ap.add_argument("--fp8-kernels", nargs="+", default=["auto", "w8a8"], choices=list(FP8_LABELS),
                    help="with --fp8, FP8Linear's kernels to run: weight-only (auto), activations in FP8 too "
                         "(w8a8), the dequantization left to the compiler (twin)")
    ap.add_argument("--sharpen", type=float, default=1.0, metavar="F",
                    help="every random weight times F (tests/conftest.py's model: 5). It does not move a "
                         "random model's logits away from ties (the top-two gap stays ~0.2 of their std), "
                         "so token agreement between modes counts near-tie flips too")
    ap.add_argument("--record-paths", nargs="*", choices=["bf16", "fp8"], metavar="WEIGHTS",
                    help="write the batches where fused beat compiled into nanoseek/infer/decode_paths.json: "
                         "for the weights named (bf16, fp8), or for every weights measured")
    ap.add_argument("--record-paths-from", metavar="JSON",
                    help="the same from a result this script wrote (with fused and compiled rows), then stop")
    ap.add_argument("--tuned-option", action="append", default=[], metavar="KEY=VALUE",
                    help="an Inductor option for the batch-1 step's compilation, beside coordinate-descent "
                         "tuning (e.g. combo_kernels=true); repeatable")
    ap.add_argument("--fused-tuning", metavar="JSON",
                    help="launch shapes for the fused step (fused_tuning.json of benchmarks/fused_decode.py --tune)")
    ap.add_argument("--fp8-fused-tuning", metavar="JSON",
                    help="the same for the FP8 rows (fused_decode.py --tune --fp8; default: --fused-tuning's)")
    ap.add_argument("--moe-tuning", metavar="JSON",
                    help="launch shapes for the small-batch experts kernels (moe_tuning.json of "
                         "benchmarks/decode_step.py --moe-sweep)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile the compiled decode step (uncaptured) per kernel: decode_profile.txt")
    args = ap.parse_args()
    if args.record_paths_from:
        saved = json.loads(Path(args.record_paths_from).read_text())
        record_paths(sliced_preset(saved["preset"], saved["layers"]), getattr(torch, saved["dtype"]), saved["device"],
                     saved["rows"], args.record_paths_from, saved["inference_config"].get("fused_launch"))
        return
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.record_paths is not None and not {"fused", "compiled"} <= set(args.modes):
        raise SystemExit("--record-paths compares the fused and the compiled step: add --modes fused compiled")
    # every mode's engine: these, then the mode's own settings
    common = dict(compile_options=dict(map(inductor_option, args.tuned_option)),
                  fused_launch=launch_file(args.fused_tuning), small_batch_launch=launch_file(args.moe_tuning))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = sliced_preset(args.preset, args.layers)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, cfg.vocab_size, (max(args.batches), args.prompt), generator=g)
    bandwidth = copy_bandwidth(device)
    print(f"{args.preset}{f' ({args.layers} layers)' if args.layers else ''} on {device}: copy bandwidth "
          f"{bandwidth / 1e9:,.0f} GB/s", flush=True)
    rows = {}
    began = time.perf_counter()
    model = Transformer(cfg)
    with tempfile.TemporaryDirectory(dir=checkpoint_dir(model)) as tmp:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(args.sharpen)
        save_pretrained(model, tmp, dtype=dtype)
        del model
        gc.collect()
        if not args.skip_hf:
            rows.update(transformers_rows(tmp, prompts, args, dtype, device))
        model = from_pretrained(tmp, dtype=dtype, device=device)
    print(f"model built, saved and loaded in {time.perf_counter() - began:.0f} s", flush=True)
    plists = {B: [p.tolist() for p in prompts[:B]] for B in args.batches}
    tokens = {}
    if common["fused_launch"] is None and "fused" in args.modes and device.type == "cuda":
        # the launch the engine's fused step takes without one: the table's for this shape, or the rule's
        from nanoseek.infer.decode_paths import measured_fused_step
        common["fused_launch"] = measured_fused_step(model.config, dtype, device, max_len(args))[1]
        print(f"fused step launch: {common['fused_launch'] or 'the rule'}", flush=True)
    if args.fp8:
        fp8_round_trip(model)
    engine_rows(model, plists, args, common, device, bandwidth, rows, tokens)
    fused, compiled = MODES["fused"][0], MODES["compiled"][0]
    B = min(args.batches)
    if {"fused", "compiled"} <= set(args.modes) and (fused, B) in tokens:
        # the compiled step's continuations forced through the fused step and through the model's
        # own decode: a free run's tokens part at the first near-tie, these are compared everywhere
        seqs = torch.tensor([p + g for p, g in zip(plists[B], tokens[compiled, B][-1])], device=device)
        row = rows[f"nanoseek engine{fused}, batch {B}"]
        row["fused_teacher_forced_vs_model"] = agreement(
            teacher_forced(model, seqs, args.prompt, common["fused_launch"] or {})[0],
            teacher_forced(model, seqs, args.prompt))
        print(f"teacher-forced greedy choices, fused step against the model: "
              f"{row['fused_teacher_forced_vs_model']}", flush=True)
    forced, fp8_launch = {}, launch_file(args.fp8_fused_tuning)
    if args.fp8:
        from nanoseek.infer.fp8_weights import FP8Experts, FP8Linear, quantize_weights
        # the largest batch's BF16 continuations, forced through both models: greedy choices
        # compared position by position, not only until two free runs first part
        B = max(args.batches)
        label = MODES[args.modes[0]][0]
        seqs = torch.tensor([p + g for p, g in zip(plists[B], tokens[label, B][-1])], device=device)
        reference = teacher_forced(model, seqs, args.prompt)
        quantize_weights(model)
        # the FP8 rows' settings: their own fused launch if given (BF16's is recorded with BF16's rows)
        fp8_common = {**common, "fused_launch": fp8_launch or common["fused_launch"]}
        for kernel in args.fp8_kernels:
            for m in model.modules():
                if isinstance(m, (FP8Linear, FP8Experts)):  # the experts' gathered GEMV follows it too
                    m.kernel = kernel
            engine_rows(model, plists, args, fp8_common, device, bandwidth, rows, tokens, FP8_LABELS[kernel])
            name = FP8_LABELS[kernel].strip()
            forced[name] = agreement(teacher_forced(model, seqs, args.prompt)[0], reference)
            print(f"teacher-forced greedy choices, {name} against BF16: {forced[name]}", flush=True)
            if kernel == "auto" and recorded(args, "fp8"):  # the FP8 model's own entry in the engine's table
                record_paths(cfg, torch.float8_e4m3fn, device_name(device), rows,
                             f"benchmarks/results/{result_name(args)}", fp8_common["fused_launch"], FP8_LABELS[kernel])
    for B in args.batches:
        hf_row = rows.get(f"transformers generate, batch {B}")
        for r in rows.values():
            if hf_row and r["batch"] == B:
                r["decode_speedup_vs_transformers"] = r["decode_tokens_per_s"] / hf_row["decode_tokens_per_s"]
    name = result_name(args)
    result = {"benchmark": "decode", **environment(), "preset": args.preset, "layers": cfg.num_hidden_layers,
              "prompt_tokens": args.prompt, "new_tokens": args.new, "dtype": str(dtype).removeprefix("torch."),
              "greedy": args.temperature == 0, "temperature": args.temperature, "sharpen": args.sharpen,
              "copy_bandwidth_GBps": bandwidth / 1e9,
              "inference_config": common, "rows": rows,
              **({"fp8_fused_launch": fp8_launch} if fp8_launch else {}),
              **({"fp8_teacher_forced_vs_bf16": forced} if forced else {})}
    path = write_json(result, name)
    print(f"\n{'run':52s} {'TTFT ms':>8s} {'decode tok/s':>13s} {'roofline':>9s} {'fraction':>8s} {'vs HF':>7s}")
    for label, r in rows.items():
        print(f"{label:52s} {r['ttft_s'] * 1e3:8.1f} {r['decode_tokens_per_s']:13,.0f} "
              f"{r.get('roofline_tokens_per_s', float('nan')):9,.0f} {r.get('roofline_fraction', float('nan')):8.0%} "
              f"{r.get('decode_speedup_vs_transformers', float('nan')):6.1f}x")
    print(f"wrote {path}")
    if recorded(args, "bf16"):
        record_paths(cfg, dtype, device_name(device), rows,
                     f"benchmarks/results/{name}", common["fused_launch"])
    if args.profile and device.type == "cuda":
        profile_decode_step(model, args, prompts)




def fp8_round_trip(model) -> None:
    """The layer weights an FP8 checkpoint would hold, dequantised in place: the BF16 twin the
    FP8-resident rows are compared with."""
    from nanoseek.hf import dequantize_fp8_blockwise, quantize_fp8_blockwise
    from nanoseek.infer.fp8_weights import layer_weights
    names = layer_weights(model)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            stacked = name.rsplit(".", 1)[0] + ".gate_proj"  # an expert tensor's name in the set
            if name in names or (name.endswith(("up_proj", "down_proj")) and stacked in names):
                # an expert at a time: V3's 256 stacked experts in float32 are 14 GiB a tensor
                for part in (t if t.dim() == 3 else [t]):
                    part.copy_(dequantize_fp8_blockwise(*quantize_fp8_blockwise(part.float())))


def checkpoint_dir(model) -> str | None:
    """Where the random model's checkpoint goes: /dev/shm when it has room for its BF16 weights
    twice over (all of V2-Lite is 31 GB, written and read back), else the default temporary
    directory."""
    shm, size = Path("/dev/shm"), 2 * sum(p.numel() for p in model.parameters())
    return str(shm) if shm.is_dir() and shutil.disk_usage(shm).free > 2 * size else None


def max_len(args) -> int:
    """The engines' cache length: --max-len, at least what the prompt and the new tokens take."""
    return max(args.max_len or 0, args.prompt + args.new)


def engine_rows(model, plists, args, common, device, bandwidth, rows, tokens, weights="") -> None:
    """The engine's rows of every mode and batch into rows (their tokens into tokens); weights:
    the label of the model's weights (FP8 rows are compared with the BF16 ones)."""
    roofline = {}
    for B in args.batches:  # what a step must read at this batch, at the bandwidth measured above
        touched = experts_touched(model, plists[B], min(args.new, 16))
        engine = Engine(model, None, max_batch=B, max_len=args.prompt + args.new, config=InferenceConfig(cuda_graphs=False))
        nbytes = step_bytes(model, touched, B, args.prompt + args.new / 2, engine.cache_bytes_per_token)
        roofline[B] = {"step_bytes": nbytes, "experts_touched_per_layer": touched,
                       "roofline_tokens_per_s": B * bandwidth / nbytes}
        del engine
    from nanoseek.infer.fused import FusedDecoder
    for mode_label, mode in (MODES[m] for m in args.modes):
        why = mode.get("fused_decode_rows") and FusedDecoder.unsupported(model.config, model)
        if why:  # the engine would run its compiled step under the fused step's label
            print(f"{mode_label.strip()} skipped: the fused step does not take this model ({why})", flush=True)
            continue
        label = mode_label + weights
        config = InferenceConfig(**{**common, **mode})
        engine = Engine(model, None, max_batch=max(args.batches), max_len=max_len(args), config=config)
        for B in args.batches:
            if B > (config.fused_decode_rows or B):
                continue  # the fused mode's larger batches are the compiled mode's

            def run(n, B=B, label=label):
                outs, span = engine_run(engine, plists[B], n, args.temperature)
                assert all(len(o) == n for o in outs)
                if n == args.new:  # every full run's tokens: the first and last are compared below
                    tokens.setdefault((label, B), []).append(outs)
                return span
            name = f"nanoseek engine{label}, batch {B}"
            began = time.perf_counter()
            row = rows[name] = {"batch": B, **measure(run, B, args.new, args.repeat, device), **roofline[B]}
            row["measure_wall_s"] = time.perf_counter() - began  # with the first run's compile and capture
            row["roofline_fraction"] = row["decode_tokens_per_s"] / row["roofline_tokens_per_s"]
            row.update(graph_flags(engine.runner.graphs))
            runs = tokens[label, B]
            row["same_tokens_run_to_run"] = same_tokens(runs[0], runs[-1])
            compiled = MODES["compiled"][0] + weights
            if label != compiled and (compiled, B) in tokens:
                row["same_tokens_as_compiled"] = same_tokens(runs[-1], tokens[compiled, B][-1])
            if weights:
                bf16 = rows[f"nanoseek engine{mode_label}, batch {B}"]
                row["speedup_vs_bf16"] = row["decode_tokens_per_s"] / bf16["decode_tokens_per_s"]
                # the most these weights' bytes allow (fp8_decode_ceiling.py): the head and the cache stay 16-bit
                row["speedup_ceiling_vs_bf16"] = bf16["step_bytes"] / row["step_bytes"]
                row["same_tokens_as_bf16"] = same_tokens(runs[-1], tokens[mode_label, B][-1])
            print(f"{name}: {row}", flush=True)
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def transformers_rows(directory, prompts, args, dtype, device) -> dict:
    import transformers
    transformers.logging.set_verbosity_error()
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()
    rows = {}
    for B in args.batches:
        ids = prompts[:B].to(device)

        def run(n, ids=ids):
            steps = StepTimes(device)
            with torch.no_grad():
                hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, eos_token_id=None, pad_token_id=0,
                            logits_processor=transformers.LogitsProcessorList([steps]))
            assert len(steps.times) == n
            return steps.times[-1] - steps.times[0]
        rows[f"transformers generate, batch {B}"] = {"batch": B, **measure(run, B, args.new, args.repeat, device)}
        print(f"transformers batch {B}: {rows[f'transformers generate, batch {B}']}", flush=True)
    del hf
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def recorded(args, weights: str) -> bool:
    """Whether --record-paths asks for these weights' entry (given without names: all measured)."""
    return args.record_paths is not None and (not args.record_paths or weights in args.record_paths)


def result_name(args) -> str:
    name = f"decode{result_tag(args.preset, args.layers)}.json"
    if args.tuned_option:  # a run with other Inductor options keeps its own file
        name = name.replace(".json", "_" + "_".join(o.replace("=", "-") for o in args.tuned_option) + ".json")
    return name


def record_paths(cfg, dtype, device_name: str, rows, result: str, fused_launch: dict | None,
                 weights: str = "") -> None:
    """The batches up to which the fused step's tokens/s beat the compiled step's, into the
    engine's table of decode paths, with the fused step's launch shapes if they were given
    (--fused-tuning); weights: the rows' weights label (FP8 rows go in under dtype float8)."""
    from nanoseek.infer.decode_paths import record_fused_rows, rows_the_fused_step_won
    fused, compiled = MODES["fused"][0] + weights, MODES["compiled"][0] + weights
    pairs = {r["batch"]: (rows[f"nanoseek engine{fused}, batch {r['batch']}"]["decode_tokens_per_s"],
                          r["decode_tokens_per_s"])
             for name, r in rows.items() if name == f"nanoseek engine{compiled}, batch {r['batch']}"
             and f"nanoseek engine{fused}, batch {r['batch']}" in rows}
    won = rows_the_fused_step_won(pairs)
    record_fused_rows(cfg, dtype, device_name, won, result, fused_launch=fused_launch)
    print(f"decode paths: the fused step up to batch {won} for this shape (nanoseek/infer/decode_paths.json)")


def profile_decode_step(model, args, prompts):
    """Where a decode step's GPU time goes: the compiled step run without capture under
    torch.profiler, at batch 1 and the largest batch (and the fused step at batch 1 when the
    fused mode runs and the model takes it), kernels by total CUDA time. Every row
    decodes its own token after its own prompt, so rows choose different experts as in the
    engine (the same token in every row would route every row to the same experts)."""
    from nanoseek.infer.cuda_graph import GraphDecoder
    from nanoseek.infer.fused import FusedDecoder
    engine = Engine(model, None, max_batch=max(args.batches), max_len=args.prompt + args.new,
                    config=InferenceConfig(cuda_graphs=False))
    plist = [p.tolist() for p in prompts]
    engine_run(engine, plist, 1)  # the requests end at their first token; their rows keep the prompts
    lines = []
    steps = [("compiled step", B, 0) for B in sorted({1, max(args.batches)})]
    if "fused" in args.modes and FusedDecoder.unsupported(model.config, model) is None:
        steps.append(("fused step", 1, 1))  # the fused step's kernels at one row, beside the compiled step's
    for name, B, fused_rows in steps:
        step = GraphDecoder(model, engine.cache, None, compile=True, capture=False, fused_rows=fused_rows)
        slots = list(range(B))
        with torch.no_grad():
            nxt = [p[0] for p in plist[:B]]
            for _ in range(3):  # compile, warm up
                step.decode(slots, nxt, [args.prompt] * B)
            torch.cuda.synchronize()
            total, launches, table = profile_kernels(lambda: step.decode(slots, nxt, [args.prompt] * B), 10,
                                                     rows=200)
        lines += [f"## {name}, batch {B}: {total:.0f} us of kernels per decode step, {launches:.0f} kernel launches",
                  "", table, ""]
    out = out_dir() / "decode_profile.txt"
    out.write_text("\n".join(lines))
    print("\n".join(line for line in lines if line.startswith("## ")), f"\nwrote {out}")


if __name__ == "__main__":
    main()
