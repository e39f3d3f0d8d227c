"""Claim 3: MLA beats MHA with a KV cache the size of GQA's with 2.25 groups.

DeepSeek-V2 Table 1: MLA caches (d_c + d_h^R)·l = 4.5·d_h·l numbers per token, "equal to
GQA with only 2.25 groups, but stronger performance than MHA". Appendix D.2, Table 9: MLA
ahead of MHA on most benchmarks with 15.6K against 110.6K cached elements per token (small
MoE; large: 34.6K vs 860.2K). Appendix D.1, Table 8: among dense 7B models, MHA ahead of GQA.

Arms are dense models (so that the attention is the only difference): MLA with the trunk's
V2 proportions, MHA and GQA (2 key/value groups) with heads of d_h; the MHA and GQA FFN widths
are searched so that every arm has the same total parameters. The KV-cache bytes per token
are measured on a built BF16 cache (`model.StaticCache`), the figure `nanoseek info` computes.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..model import StaticCache
from .runner import Arm, Bound, Compare, Experiment
from .sizing import accounting, fit_width

GQA_GROUPS = 2


def arms(scale) -> list[Arm]:
    mla = ModelConfig(**scale.trunk)
    total = accounting(mla, scale.seq_len)["total_params"]
    mha = fit_width(mla.replace(attention_type="mha"), "intermediate_size", "total_params", total, scale.seq_len)
    gqa = fit_width(mla.replace(attention_type="gqa", num_key_value_heads=GQA_GROUPS), "intermediate_size",
                    "total_params", total, scale.seq_len)
    return [Arm("mla", mla, f"latent {mla.kv_lora_rank} + rope {mla.qk_rope_head_dim}, FFN {mla.intermediate_size}"),
            Arm("mha", mha, f"{mha.num_attention_heads} kv heads of {mha.attn_head_dim}, FFN {mha.intermediate_size}"),
            Arm("gqa", gqa, f"{GQA_GROUPS} kv heads of {gqa.attn_head_dim}, FFN {gqa.intermediate_size}")]


def measure(model, data, scale) -> dict:
    c = model.config
    cache = StaticCache(c, 1, 1, dtype=torch.bfloat16, num_layers=c.num_hidden_layers)
    per_token = cache.nbytes_per_token()
    group_bytes = 2 * c.attn_head_dim * c.num_hidden_layers * 2  # one GQA group: a key and a value head
    return {"kv_bytes": per_token, "gqa_groups": per_token / group_bytes}


EXPERIMENT = Experiment(
    name="attention", claim=3, title="MLA vs MHA vs GQA",
    paper="DeepSeek-V2 Table 1: MLA's cache is that of GQA with 2.25 groups; Table 9: MLA ahead of MHA with "
          "15.6K vs 110.6K cached elements per token; Table 8: MHA ahead of GQA (dense 7B).",
    arms=arms,
    checks=[Compare("MLA: lower held-out loss than MHA at equal parameters", "val_loss", "mla", "mha",
                    "MLA ahead on most benchmarks (Table 9)"),
            Compare("MHA: lower held-out loss than GQA at equal parameters", "val_loss", "mha", "gqa",
                    "MHA ahead on hard benchmarks (Table 8)"),
            Compare("MLA: smaller KV cache per token than MHA", "kv_bytes", "mla", "mha", "15.6K vs 110.6K elements"),
            Bound("MLA's cache in GQA groups of 2 heads of d_h", "gqa_groups", "mla", 2.25, 2.25, "2.25 groups")],
    metrics=[("val_loss", "held-out loss", "{:.4f}"), ("kv_bytes", "KV cache B/token (measured)", "{:,.0f}"),
             ("gqa_groups", "cache in GQA groups", "{:.2f}")],
    equal=[("total_params", ("mla", "mha", "gqa"))],
    measure=measure)
