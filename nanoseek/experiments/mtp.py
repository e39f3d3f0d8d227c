"""Claim 4: multi-token prediction improves the main model and drafts tokens that mostly pass.

DeepSeek-V3 §4.5.1, Table 4: with one MTP module (depth 1, discarded at inference, so the
main model's compute is unchanged) the model improves on most benchmarks. §5.4.3: used as a
speculative drafter, the MTP module's second token is accepted 85-90% of the time, and
decoding runs at 1.8x the tokens per second.

Arms: V3's MoE with one MTP module (λ = 0.3, the config's default) and without; the main
models are the same. On the trained MTP model, greedy speculative decoding with one draft
per step (`infer.speculative.speculative_generate`) over held-out problems of the accuracy's
levels gives the acceptance rate; its wall time against plain greedy decoding (`infer.generate`) of the same
prompts, one batch each after a warm-up, gives the speedup. Greedy speculation must return
the plain decoding's tokens; `identical` records that it did.
"""

from __future__ import annotations

import time

import torch

from ..config import ModelConfig
from ..data.tasks import get_task
from ..infer import generate
from ..infer.speculative import speculative_generate
from ..train.evaluate import task_prompt
from .runner import ACCURACY_LEVELS, Arm, Bound, Compare, Experiment


def arms(scale) -> list[Arm]:
    base = ModelConfig(**{**scale.trunk, **scale.moe})
    return [Arm("mtp", base.replace(num_nextn_predict_layers=1), "1 MTP module, λ=0.3"),
            Arm("no-mtp", base, "next-token loss only")]


def measure(model, data, scale) -> dict:
    if not model.config.num_nextn_predict_layers:
        return {}
    tok = data.tokenizer
    # the accuracy's levels in equal parts: level 1 alone (answers of 1-3 tokens that every arm gets
    # right at the gpu scale) drafted 100% and said nothing about harder text
    per = max(1, scale.decode_prompts // len(ACCURACY_LEVELS))
    problems = [ex for level in ACCURACY_LEVELS
                for ex in get_task("arithmetic").generate(per, level=level, split="test", seed=7)]
    prompts = [task_prompt(tok, ex.prompt, "plain") for ex in problems]
    autocast = torch.bfloat16 if next(model.parameters()).is_cuda else None
    kwargs = dict(max_new_tokens=scale.decode_tokens, eos_id=tok.eos_id, autocast=autocast)

    def timed(fn):
        fn(prompts[:2], **{**kwargs, "max_new_tokens": 4})  # warm-up: allocator, kernels
        t0 = time.perf_counter()
        out = fn(prompts, **kwargs)  # both read their tokens on the host every step: synchronised
        return out, time.perf_counter() - t0

    plain, plain_s = timed(lambda p, **kw: generate(model, p, **kw))
    (drafted, stats), spec_s = timed(lambda p, **kw: speculative_generate(model, p, k=1, **kw))
    return {"acceptance": stats.acceptance_rate, "tokens_per_forward": stats.mean_accepted_length,
            "speedup": plain_s / spec_s, "identical": drafted == plain}


EXPERIMENT = Experiment(
    name="mtp", claim=4, title="multi-token prediction on/off",
    paper="DeepSeek-V3 Table 4: MTP (depth 1) improves most benchmarks at equal main-model compute; §5.4.3: "
          "its drafted token is accepted 85-90% of the time, 1.8x tokens per second.",
    arms=arms,
    checks=[Compare("MTP: lower main-model held-out loss", "val_loss", "mtp", "no-mtp", "better on most benchmarks"),
            Compare("MTP: higher held-out accuracy", "accuracy", "mtp", "no-mtp", "better on most benchmarks",
                    lower_is_better=False, trials="accuracy_problems"),
            Bound("MTP: acceptance rate of the drafted token", "acceptance", "mtp", 0.85, 0.90, "85-90%"),
            Bound("MTP: greedy decoding speedup with 1 draft per step", "speedup", "mtp", 1.8, float("inf"),
                  "1.8x")],
    metrics=[("val_loss", "main-model held-out loss", "{:.4f}"),
             ("accuracy", "arithmetic accuracy, levels 1, 3, 5", "{:.1%}"),
             ("acceptance", "draft acceptance", "{:.1%}"), ("tokens_per_forward", "tokens per forward", "{:.2f}"),
             ("speedup", "decode speedup", "{:.2f}x")],
    equal=[("activated_params", ("mtp", "no-mtp")), ("train_flops_per_token", ("mtp", "no-mtp"))],
    accuracy=True, measure=measure,
    notes={"cpu": "CPU scale: the decode speedup is wall time of a tiny model on a shared CPU, where the "
                  "per-step overhead dominates and other jobs add noise; the acceptance rate is the figure "
                  "that carries over."})
