"""bench-1b forward+backward on a GPU in BF16 (eager and torch.compile) against CPU float32.

Same weights, same batch: the CPU float32 run is the reference; the GPU runs are BF16
autocast over float32 weights (the training setting) and pure BF16 weights. Reports the
relative error of logits and of gradients (||a-b||/||b||), the loss difference, whether
torch.compile traced the whole model as one graph (fullgraph=True: no host syncs), and
step times. Writes model_gpu_check.json to $OUT (or benchmarks/results).

Why "reference routing". A freshly initialised router scores the 64 experts close together,
so BF16 rounding upstream flips near-tied top-6 choices for many tokens, and a flipped
expert changes that token's output by O(1). Those flips are a property of top-k routing,
not an error in the kernels, but they dominate a logits comparison. So each BF16 variant
runs twice: with free routing (reporting the fraction of routing sets that differ from the
float32 run) and with the float32 run's expert choices imposed through a forward hook on
every router (gate values recomputed from the variant's own scores), which isolates the
arithmetic.

    python benchmarks/model_gpu_check.py [--batch 2 --seq 256]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, rel_err, time_cuda, write_json  # noqa: E402

from nanoseek import Transformer, preset  # noqa: E402

WATCHED = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_a_proj.weight",
           "model.layers.5.self_attn.kv_b_proj.weight", "model.layers.5.mlp.experts.gate_proj",
           "model.layers.5.mlp.shared_experts.down_proj.weight", "model.layers.11.mlp.gate.weight",
           "lm_head.weight", "model.layers.12.eh_proj.weight"]


def record_routing(model):
    """Hooks that store every router's chosen experts; returns (store, handles)."""
    store, handles = {}, []
    for name, mod in model.named_modules():
        if type(mod).__name__ == "Router":
            handles.append(mod.register_forward_hook(
                lambda m, a, out, name=name: store.__setitem__(name, out[1].detach().cpu())))
    return store, handles


def impose_routing(model, ref_idx):
    """Hooks that replace each router's choice by the reference's, gates from own scores."""
    handles = []
    for name, mod in model.named_modules():
        if type(mod).__name__ == "Router":
            def hook(m, args, out, name=name):
                _, _, scores = out
                idx = ref_idx[name].to(scores.device)
                w = scores.gather(1, idx)
                if m.norm_topk_prob:
                    w = w / (w.sum(-1, keepdim=True) + 1e-20)
                return w * m.scaling, idx, scores
            handles.append(mod.register_forward_hook(hook))
    return handles


def flip_fraction(store, ref_idx):
    """Fraction of (token, layer) expert sets that differ from the reference."""
    diff = total = 0
    for name, ref in ref_idx.items():
        a, b = store[name].sort(-1).values, ref.sort(-1).values
        diff += int((a != b).any(-1).sum())
        total += a.shape[0]
    return diff / total


def run(model, ids, autocast: bool, params_of=None):
    """One forward+backward; gradients are read from `params_of` (the uncompiled module)."""
    params_of = params_of or model
    params_of.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in params_of.named_parameters() if n in WATCHED}
    out.loss, out.main_loss = out.loss.detach(), out.main_loss.detach()
    return out, grads


def show(row):
    print(f"{row['variant']:50s} loss diff {row['loss_abs_diff']:.2e}  logits rel {row['logits_rel_err']:.2e}"
          f"  max grad rel {row['grad_rel_err_max']:.2e}", flush=True)
    return row


def compare(name, out, grads, ref_out, ref_grads):
    row = {"variant": name,
           "loss": float(out.loss), "loss_ref": float(ref_out.loss),
           "loss_abs_diff": abs(float(out.loss) - float(ref_out.loss)),
           "main_loss_abs_diff": abs(float(out.main_loss) - float(ref_out.main_loss)),
           "logits_rel_err": rel_err(out.logits.float(), ref_out.logits),
           "grad_rel_err": {n: rel_err(grads[n], ref_grads[n]) for n in WATCHED}}
    row["grad_rel_err_max"] = max(row["grad_rel_err"].values())
    return show(row)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--time-batch", type=int, default=8)
    ap.add_argument("--time-seq", type=int, default=1024)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = preset("bench-1b")
    cpu_model = Transformer(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    t0 = time.time()
    ref_idx, handles = record_routing(cpu_model)
    ref_out, ref_grads = run(cpu_model, ids, autocast=False)
    for h in handles:
        h.remove()
    cpu_s = time.time() - t0
    ref_out.logits = ref_out.logits.detach()
    print(f"cpu fp32 reference: loss {float(ref_out.loss):.5f} in {cpu_s:.1f}s", flush=True)

    rows = []
    gpu = torch.device("cuda")
    ids_gpu = ids.to(gpu)
    model = copy.deepcopy(cpu_model).to(gpu)

    def variant(name, m, autocast, params_of=None, imposed=False):
        store, rec = record_routing(params_of or m)  # first: sees the variant's own choice
        handles = impose_routing(params_of or m, ref_idx) if imposed else []
        out, grads = run(m, ids_gpu, autocast, params_of)
        for h in handles + rec:
            h.remove()
        row = compare(name + (", reference routing" if imposed else ", free routing"),
                      out, grads, ref_out, ref_grads)
        row["routing_flip_fraction"] = flip_fraction(store, ref_idx)
        print(f"{'':32s} routing sets differing from float32: {row['routing_flip_fraction']:.1%}")
        rows.append(row)

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    variant("fp32 gpu, eager", model, autocast=False)
    variant("bf16 autocast, eager", model, autocast=True)
    variant("bf16 autocast, eager", model, autocast=True, imposed=True)
    pure = copy.deepcopy(cpu_model).to(gpu, dtype=torch.bfloat16)
    for r in pure.routers().values():  # DeepSeek keeps the gate in float32
        r.float()
    variant("bf16 weights, eager", pure, autocast=False, imposed=True)
    del pure

    fullgraph = True
    t0 = time.time()
    try:
        compiled = torch.compile(model, fullgraph=True, dynamic=False)
        variant("bf16 autocast, compile", compiled, autocast=True, params_of=model, imposed=True)
    except Exception as e:  # report, then fall back to a graph with breaks
        print(f"fullgraph compile failed: {type(e).__name__}: {str(e)[:500]}", flush=True)
        fullgraph = False
        torch._dynamo.reset()
        compiled = torch.compile(model, dynamic=False)
        variant("bf16 autocast, compile", compiled, autocast=True, params_of=model, imposed=True)
    rows[-1]["fullgraph"], rows[-1]["first_call_s"] = fullgraph, time.time() - t0
    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=False)  # without routing hooks, for timing

    # step times at the training shape (forward+backward, no optimizer)
    big = torch.randint(0, cfg.vocab_size, (args.time_batch, args.time_seq), device=gpu)
    timing = {}
    for name, m in (("eager", model), ("compile", compiled)):
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = m(big, labels=big)
            out.loss.backward()
        t = time_cuda(step, warmup=3, repeat=10)
        t["tokens_per_s"] = args.time_batch * args.time_seq / (t["median_ms"] / 1e3)
        timing[name] = t
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30

    result = {"benchmark": "model_gpu_check", **environment(), "preset": "bench-1b",
              "config": cfg.to_dict(), "reference": {"device": "cpu", "dtype": "float32",
                                                     "batch": args.batch, "seq": args.seq,
                                                     "loss": float(ref_out.loss), "seconds": cpu_s},
              "rows": rows, "fwd_bwd_timing": timing, "peak_memory_gib": peak}
    path = write_json(result, "model_gpu_check.json")
    print(f"\n{'variant':50s} {'loss diff':>10s} {'logits rel':>11s} {'max grad rel':>13s} {'flips':>7s}")
    for r in rows:
        print(f"{r['variant']:50s} {r['loss_abs_diff']:10.2e} {r['logits_rel_err']:11.2e} "
              f"{r['grad_rel_err_max']:13.2e} {r['routing_flip_fraction']:7.1%}")
    for name, t in timing.items():
        print(f"fwd+bwd {name:8s} {args.time_batch}x{args.time_seq}: {t['median_ms']:.1f} ms, "
              f"{t['tokens_per_s']:,.0f} tokens/s")
    print(f"torch.compile fullgraph: {fullgraph}; peak memory {peak:.1f} GiB; wrote {path}")


if __name__ == "__main__":
    main()
