"""MLA decode attention over the latent cache at long contexts: time and bandwidth reached.

A decode step's attention reads, per row and layer, the latent cache of every position so
far, kv_lora_rank + qk_rope_head_dim values each, and little else: at long contexts that
read is the step's cost, so its bandwidth is the figure of merit (FlashMLA reports about 90%
of HBM bandwidth on an H800). For a preset's attention widths (`--preset`, default
deepseek-v3: 128 heads, a 512-wide latent, YaRN RoPE to 128K positions), one layer, one new
token per row over `--contexts` cached positions (4K, 32K, 128K) at `--batches` rows (1, 16),
random BF16 weights and cache, each timed as the median of `--repeat` calls after warm-up:

- `absorbed`: the model's absorbed attention (mla.MLA.absorbed: the absorbed query against
  the latent, softmax over all positions, W_UV), eager;
- `absorbed_compiled`: the same under torch.compile (GPU);
- `kernel_op`: what the engine's compiled step runs in place of the absorbed attention
  (InferenceConfig.decode_attention = kernel: infer/latent_attention.py), W_UK folded into the
  query, the kernels below, compiled (GPU); it does not need a query LoRA (V2-Lite);
- `fused`: the fused decode step's attention (FusedDecoder.attend: kernels/decode.py's
  mla_attend + mla_output, launch shapes derived from the widths and the context), from its
  absorbed queries; GPU, or Triton's interpreter with TRITON_INTERPRET=1.
Each call is captured in a CUDA graph, as the engine's steps run it, and its replays are timed
on the GPU by CUDA events with L2 flushed before each (triton's do_bench), so the latent comes
from HBM as it does in a step whose other layers evicted it (`<way>_timed`: graph, or launch
where capture failed). Per row:
µs per call, the latent bytes read (rows × context × (C + R) × element size) over that time
and its fraction of the device copy bandwidth measured in the same run; and the roofline:
the larger of the latent's time at that bandwidth and the attention's FLOPs (rows × context
× heads × 2·(2C + R): scores and the weighted sum) at the BF16 GEMM rate measured in the same
run. With 128 heads a latent byte meets ~240 FLOPs, more than an H200's ~200 FLOP/byte ridge:
V3's decode attention is bound by the tensor cores there, not by HBM.
`--mixed` also times each batch of several rows as one row at the full context among rows at
1,024 positions: a step's split count is fixed while its rows' lengths differ.
`--sweep` also times the fused attention at other launch shapes than the rule's (heads per
program, programs aimed for, the dots transposed or not; then positions per block, warps and
pipeline stages around the fastest), to derive the rule from measurements.

    python benchmarks/attention.py [--contexts 4096 32768 131072 --batches 1 16 --mixed --sweep]
    python benchmarks/attention.py --device cpu --preset tiny --contexts 256 512 --batches 1 2
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bf16_gemm_flops, copy_bandwidth, environment, median_seconds, sliced_preset, write_json  # noqa: E402

from nanoseek import Transformer  # noqa: E402
from nanoseek.hf import to_dtype  # noqa: E402
from nanoseek.model import StaticCache  # noqa: E402
from nanoseek.model.cache import cache_mask  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="deepseek-v3")
    ap.add_argument("--device", default=None, help="cuda (default when there is one) or cpu (a smoke run)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--mixed", action="store_true",
                    help=f"also time each batch of several rows as one long row among rows at {MIXED_SHORT} positions")
    ap.add_argument("--sweep", action="store_true",
                    help="also time the fused attention at the launch shapes of sweep_launches")
    ap.add_argument("--sweep-tma", action="store_true",
                    help="the same with the TMA kernel's launches only (sweep_launches' first six, then their "
                         "blocks and stages around the fastest): beside the rule's and the op's in each row")
    args = ap.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # one dense layer of the preset's widths, a small vocabulary: only the attention is timed
    cfg = sliced_preset(args.preset, 1, vocab_size=256, intermediate_size=256)
    too_long = [n for n in args.contexts if n > cfg.max_position_embeddings]
    if too_long:
        raise SystemExit(f"contexts {too_long} exceed {args.preset}'s {cfg.max_position_embeddings} positions")
    torch.manual_seed(0)
    model = to_dtype(Transformer(cfg), dtype).to(device).eval()
    attn = model.main_layers[0].self_attn
    bandwidth = copy_bandwidth(device)
    gemm_rate = bf16_gemm_flops(device) if device.type == "cuda" else None
    kernels_run = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    fused_runs = op_runs = kernels_run
    if kernels_run:
        from nanoseek.infer.fused import FusedDecoder
        from nanoseek.infer.latent_attention import LatentDecodeAttention
        why = FusedDecoder.unsupported(cfg, model)
        if why:
            print(f"{args.preset}: no fused step ({why}); its attention kernels run as the engine's op", flush=True)
            fused_runs = False
        op_runs = LatentDecodeAttention.unsupported(cfg, model) is None
    compiled = torch.compile(attn.absorbed, dynamic=False) if device.type == "cuda" else None
    rows = {}
    for S in args.contexts:
        for B in args.batches:
            cache = StaticCache(cfg, B, S, dtype=dtype, device=device, num_layers=1)
            for buf in cache.layers[0]:
                buf.normal_()
            layouts = {"": [S - 1] * B}
            if args.mixed and B > 1 and S > MIXED_SHORT:  # a long row among short ones
                layouts[f", mixed: 1 row at {S}, {B - 1} at {MIXED_SHORT}"] = [S - 1] + [MIXED_SHORT - 1] * (B - 1)
            for label, pos in layouts.items():
                positions = torch.tensor(pos, device=device)[:, None]
                row = time_row(args, model, cache, attn, compiled, positions, bandwidth, gemm_rate, device,
                               fused_runs, op_runs,
                               sweep_it=(args.sweep or args.sweep_tma) and fused_runs and not label)
                rows[f"context {S}, batch {B}{label}"] = row
                print(summary(row) + label, flush=True)
                write_json(result(args, dtype, bandwidth, gemm_rate, rows), f"attention_{args.preset}.json")  # so far
            del cache
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"wrote {write_json(result(args, dtype, bandwidth, gemm_rate, rows), f'attention_{args.preset}.json')}")


def time_row(args, model, cache, attn, compiled, positions, bandwidth, gemm_rate, device, fused_runs, op_runs,
             sweep_it: bool) -> dict:
    """Each way's time for one new token per row at `positions` [B, 1] over the cache, with the
    latent bytes and FLOPs those positions need and their roofline."""
    cfg, (c_kv, k_pe) = model.config, cache.layers[0]
    C, R, H = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.num_attention_heads
    B, S = positions.shape[0], cache.max_len
    mask = cache_mask(positions, S)
    q_nope = torch.randn(B, 1, H, cfg.qk_nope_head_dim, device=device, dtype=c_kv.dtype)
    q_pe = torch.randn(B, 1, H, R, device=device, dtype=c_kv.dtype)
    seen = int(positions.sum()) + B  # positions each row attends to, summed
    nbytes = seen * (C + R) * c_kv.element_size()
    flops = seen * H * 2 * (2 * C + R)
    roofline = max(nbytes / bandwidth, flops / gemm_rate if gemm_rate else 0.0)
    row = {"context": S, "batch": B, "positions": positions[:, 0].tolist() if B <= 16 else None,
           "latent_bytes": nbytes, "flops": flops, "roofline_us": roofline * 1e6,
           "bound": "compute" if gemm_rate and flops / gemm_rate > nbytes / bandwidth else "memory"}
    with torch.no_grad():
        reference = attn.absorbed(q_nope, q_pe, c_kv, k_pe, mask).float()  # what the kernels are checked against
        ways = {"absorbed": lambda: attn.absorbed(q_nope, q_pe, c_kv, k_pe, mask)}
        if compiled is not None:
            ways["absorbed_compiled"] = lambda: compiled(q_nope, q_pe, c_kv, k_pe, mask)
        if op_runs:  # the engine's compiled step's attention: W_UK folded in, the kernels, BF16 out
            from nanoseek.infer.latent_attention import LatentDecodeAttention
            op = LatentDecodeAttention(cfg, S)

            def engine_attention(q_nope, q_pe, c_kv, k_pe, positions):
                return op(attn, q_nope, q_pe, c_kv, k_pe, positions)
            if device.type == "cuda":
                engine_attention = torch.compile(engine_attention, dynamic=False)
            got = engine_attention(q_nope, q_pe, c_kv, k_pe, positions).float()
            row["kernel_op_error"] = float((got - reference).abs().max() / reference.abs().max())
            ways["kernel_op"] = lambda: engine_attention(q_nope, q_pe, c_kv, k_pe, positions)
        if fused_runs:
            from nanoseek.infer.fused import FusedDecoder
            from nanoseek.infer.latent_attention import attend_warps_stages
            fused = FusedDecoder(model, cache, B)
            row["fused_error"] = fused_error(fused, attn, q_nope, q_pe, positions, reference)
            ways["fused"] = lambda: fused.attend(attn, 0, positions[:, 0], B)
            row["fused_launch"] = {k: fused.t[k] for k in ATTEND_KEYS}
            row["fused_launch"]["units"] = fused.units(B)
            ws = attend_warps_stages(fused.t, B, model.config.kv_lora_rank)  # what the launch runs at B rows
            row["fused_launch"].update(attend_warps=ws["num_warps"], attend_stages=ws["num_stages"])
        for name, fn in ways.items():
            try:
                t, row[f"{name}_timed"] = call_seconds(fn, args.repeat, device)
            except torch.OutOfMemoryError as e:
                row[f"{name}_error"] = f"out of memory: {str(e)[:120]}"
                torch.cuda.empty_cache()
                continue
            row[f"{name}_us"] = t * 1e6
            row[f"{name}_GBps"] = nbytes / t / 1e9
            row[f"{name}_bandwidth_fraction"] = nbytes / t / bandwidth
            row[f"{name}_roofline_fraction"] = roofline / t
            if gemm_rate:
                row[f"{name}_TFLOPs"] = flops / t / 1e12
    if sweep_it:
        row["fused_sweep"] = sweep(model, cache, attn, positions, B, args.repeat, device,
                                   lambda f: fused_error(f, attn, q_nope, q_pe, positions, reference),
                                   tma_only=args.sweep_tma)
        best = min(row["fused_sweep"], key=launch_time, default={"launch": None})
        if "us" in best:
            row["fused_best"] = {"launch": best["launch"], "us": best["us"],
                                 "roofline_fraction": roofline * 1e6 / best["us"]}
        print(f"  fastest fused launch {best['launch']}: {best.get('us', float('nan')):.1f} µs", flush=True)
    return row


WRONG = 0.05  # a fused result this far from the reference is wrong, not rounded: never the fastest launch


def launch_time(entry: dict) -> float:
    return entry["us"] if "us" in entry and entry.get("error", 0.0) < WRONG else float("inf")


def fused_error(fused, attn, q_nope, q_pe, positions, reference) -> float:
    """The fused attention's largest deviation from the model's absorbed attention on the same
    queries, relative to the reference's largest value: a launch shape that computes something
    else shows up here (~1e-2 is BF16 rounding of the reference; a wrong result is ~1)."""
    B = positions.shape[0]
    w_uk_HNC = attn.kv_b_proj.weight.unflatten(0, (attn.n_heads, -1))[:, :attn.nope_dim]
    fused.q_lat[:B] = torch.einsum("bhn,hnc->bhc", q_nope[:, 0].float(), w_uk_HNC.float())
    fused.q_pe[:B] = q_pe[:, 0].float()
    out = fused.attend(attn, 0, positions[:, 0], B).view(reference.shape)
    return float((out - reference).abs().max() / reference.abs().max())


def result(args, dtype, bandwidth, gemm_rate, rows) -> dict:
    return {"benchmark": "attention", **environment(), "preset": args.preset, "dtype": str(dtype),
            "copy_bandwidth_GBps": bandwidth / 1e9, "bf16_gemm_TFLOPs": gemm_rate and gemm_rate / 1e12, "rows": rows}


MIXED_SHORT = 1024  # the short rows' context in --mixed batches
ATTEND_KEYS = ("attend_heads", "attend_programs", "attend_split", "attend_block", "attend_warps", "attend_stages",
               "attend_transposed", "attend_tma")


def call_seconds(fn, repeat: int, device: torch.device) -> tuple[float, str]:
    """Median seconds of fn() and how it was launched. On a GPU: fn captured in a CUDA graph (as
    the engine's steps run it), its replays timed by CUDA events with L2 flushed before each
    (triton's do_bench); a call that cannot be captured is timed as launched from the host.
    Launched from the host, a call of a few kernels costs ~0.2 ms of Python and launch overhead
    whatever its size, which hid the kernels' own time at every size below ~1 ms. Else host time."""
    if device.type != "cuda":
        return median_seconds(fn, repeat, device, warmup=2), "host"
    import triton.testing
    fn()  # compilation and autotuning outside the timing
    run, how = fn, "launch"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # capture wants its warm-up off the default stream
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run, how = graph.replay, "graph"
    except Exception as e:  # noqa: BLE001 - not capturable: timed as launched, and said so
        print(f"  (not captured in a CUDA graph: {type(e).__name__}: {str(e)[:100]}; timed as launched)", flush=True)
        torch.cuda.synchronize()
    # warmup and rep are milliseconds of calls, not counts
    seconds = triton.testing.do_bench(run, warmup=5, rep=max(2 * repeat, 20), return_mode="median") / 1e3
    return seconds, how


def summary(row: dict) -> str:
    ways = [k.removesuffix("_us") for k in row if k.endswith("_us") and k != "roofline_us"]
    times = ", ".join(f"{w} {row[w + '_us']:.0f} µs ({row[w + '_roofline_fraction']:.0%})" for w in ways)
    best = row.get("fused_best")
    error = "".join(f"; {way} error {row[f'{way}_error']:.1e}" for way in ("kernel_op", "fused")
                    if f"{way}_error" in row)
    swept = f"; swept fused {best['us']:.0f} µs ({best['roofline_fraction']:.0%})" if best else ""
    return (f"context {row['context']}, batch {row['batch']}: roofline {row['roofline_us']:.0f} µs "
            f"({row['bound']}-bound); {times}{error}{swept}")


def sweep_launches(rule: dict, heads: int, best: dict | None = None) -> list[dict]:
    """First (best None): 16 to 64 heads a program (at most the model's) x 128 to 1024
    attention programs aimed for x the dots as heads x positions or transposed, at the rule's
    block, warps and stages; 64 heads at blocks of 32 positions and 2 stages, the most whose
    tiles fit an SM's shared memory (benchmarks/kernel_resources.py: wgmma's 64 rows, at 8 warps
    32 bytes of spill; none at blocks of 16); with 64+ heads, the TMA kernel (attend_tma: wgmma's
    64 rows, the latent copied by TMA, no spill at 8 warps) at blocks of 64 and 2 stages or 32
    and 2-3, 128 or 256 programs. Then, around the fastest of those, blocks of 16 to 64
    positions x 4 or 8 warps x 2 to 4 stages."""
    if best is None:
        widths = [h for h in (16, 32, 64) if h <= max(16, heads)]
        fit = {64: dict(attend_block=min(32, rule["attend_block"]), attend_split=rule["attend_split"], attend_stages=2,
                        attend_warps=8)}
        tma = [dict(attend_heads=64, attend_tma=1, attend_block=block, attend_split=max(block, rule["attend_split"]),
                    attend_stages=stages, attend_warps=8, attend_programs=p)
               for block, stages in ((64, 2), (32, 3), (32, 2)) for p in (128, 256)] if heads >= 64 else []
        return tma + [dict(attend_heads=h, attend_programs=p, attend_transposed=t, **fit.get(h, {}))
                      for t in (0, 1) for h in widths for p in (128, 256, 512, 1024)]
    return [dict(best, attend_block=b, attend_split=max(b, rule["attend_split"]), attend_warps=w, attend_stages=st)
            for b in (16, 32, 64) for w in (4, 8) for st in (2, 3, 4)]


def tma_neighbours(best: dict) -> list[dict]:
    """Around the fastest TMA launch: blocks of 32 and 64 at 2 and 3 stages (8 warps hold a
    64-head program's two [64, 256] float32 halves)."""
    return [dict(best, attend_block=b, attend_split=max(b, best["attend_split"]), attend_stages=st)
            for b in (32, 64) for st in (2, 3)]


def sweep(model, cache, attn, positions, B, repeat, device, error, tma_only: bool = False) -> list[dict]:
    from nanoseek.infer.fused import FusedDecoder, fused_step_launch
    rule = fused_step_launch(model.config, cache.max_len)
    out = []

    def time_launches(launches):
        for launch in launches:
            entry = {"launch": launch}
            try:
                fused = FusedDecoder(model, cache, B, launch=launch)
                entry["units"] = fused.units(B)
                entry["error"] = error(fused)
                t, entry["timed"] = call_seconds(lambda: fused.attend(attn, 0, positions[:, 0], B), repeat, device)
                entry["us"] = t * 1e6
                del fused
            except Exception as e:  # noqa: BLE001 - a shape that does not compile or fit is a result too
                entry["failed"] = f"{type(e).__name__}: {str(e)[:160]}"
            out.append(entry)

    first = sweep_launches(rule, model.config.num_attention_heads)
    time_launches([x for x in first if x.get("attend_tma")] if tma_only else first)
    if not out:  # no TMA launch for fewer than 64 heads
        return out
    best = min(out, key=launch_time)["launch"]
    time_launches(tma_neighbours(best) if tma_only else sweep_launches(rule, model.config.num_attention_heads, best))
    return out


if __name__ == "__main__":
    main()
