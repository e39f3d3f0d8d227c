"""Model accounting from a ModelConfig: parameters, activated parameters, KV cache, FLOPs.

Parameters are counted on a model built on the `meta` device, so the figures follow the
modules exactly as `model/` builds them (the 671B preset included) without allocating a
byte of weights. The rest is arithmetic on those counts and the config.

Conventions (papers differ; these are the choices, and what they reproduce):

- `total_params`: the main model — embedding, layers, final norm, output head — without
  the MTP modules. A tied head is counted once. The router's `e_score_correction_bias`
  is a buffer here (not trained by gradient), so it is not counted; it is 256 numbers a
  layer in V3.
- `activated_params`: what one token computes with: total minus the routed experts it
  does not use (E − K of E per MoE layer), minus the input-embedding table, which is a
  lookup and does no arithmetic. The output head counts (it is a matmul). Routers and
  shared experts count. With tied embeddings the table is the head, so nothing is
  subtracted for it.
- `activated_params_with_embedding`: the same plus the embedding table.
  Which convention the papers use, checked against the presets:
      DeepSeek-V3       37B   without: 36.63B   with: 37.55B   -> without (0.37B off vs 0.55B)
      DeepSeek-V2       21B   without: 20.85B   with: 21.38B   -> without (0.15B off vs 0.38B)
      DeepSeek-V2-Lite  2.4B  without: 2.45B    with: 2.66B    -> without (2.45B; 2.4 looks
                                                                  truncated, not rounded)
      DeepSeekMoE-16B   2.8B  without: 2.62B    with: 2.83B    -> with
  So the DeepSeek-V2/V3 reports leave the embedding out, the DeepSeekMoE paper keeps it in.
- `mtp_params`: the MTP modules as an HF V3 checkpoint stores them: each module's own
  weights plus its copies of the embedding table and the output head
  (`model.layers.61.embed_tokens`, `model.layers.61.shared_head.head`), which nanoseek
  shares with the main model. V3: 13.46B, the "14B" of the model card, and
  `hf_total_params` = 684.49B, its "685B".
- KV cache, BF16 (2 bytes a number), all main layers, per token:
    built: what `model/cache.py` stores: MLA (kv_lora_rank + qk_rope_head_dim)·L·2
           (V3: 576·61·2 = 70,272 bytes); MHA/GQA 2·G·d_h·L·2.
    mha:   2 tensors (K and V) of H heads. For MLA configs the equivalent MHA has
           K heads of qk_nope_head_dim + qk_rope_head_dim and V heads of v_head_dim, i.e.
           H·(d_qk + d_v)·L·2 bytes (what MLA's expanded path materialises).
    gqa:   the same with G KV groups: num_key_value_heads if the config sets fewer than H,
           else 8 (or H when there are fewer than 8 heads).
  `kv_cache_saving_vs_mha` / `_vs_gqa` = that baseline's bytes / the built bytes.
- FLOPs per token (PaLM appendix B / Chinchilla style): 2 per multiply-add of every
  activated matmul weight (`matmul_params`: activated params minus the norm weights, the
  embedding lookup already excluded), plus attention scores and values over a context of
  T = `context_length` keys. No discount for causal masking (PaLM's convention: every
  token is charged the full T), no softmax/norm/activation FLOPs, main model only
  (training with MTP adds roughly one layer and one head per MTP depth).
    train  = 6·matmul_params + 6·L·H·(d_qk + d_v)·T      (forward 2×, backward 4×)
    decode = 2·matmul_params + 2·L·H·(d_score + d_value)·T
  Training uses MLA's expanded path: d_qk = qk_nope + qk_rope, d_v = v_head_dim. Decode uses
  the absorbed path, which attends over the latent itself: d_score = kv_lora_rank +
  qk_rope_head_dim, d_value = kv_lora_rank — more FLOPs than expanded heads (V3: 576 + 512
  against 192 + 128), traded for reading only the 70 KB latent cache. The absorbed
  projections (W_UK into the query, W_UV into the output) use the kv_b_proj weights once
  per token, so they are already in 2·matmul_params. MHA/GQA: d = head_dim for both, over
  H query heads (GQA shares keys, not score FLOPs).
- `expert_combinations`: C(n_routed_experts, num_experts_per_tok), exact (`expert_combinations`).
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig
from .model import Transformer
from .model.cache import cache_entry_shapes
from .model.moe import MoE
from .model.norm import RMSNorm

BYTES_BF16 = 2
GQA_GROUPS = 8


def expert_combinations(n_experts: int, k: int) -> int:
    """Ways to choose k of n routed experts: C(64, 8) = 4,426,165,368 (DeepSeekMoE §3.1)."""
    return math.comb(n_experts, k)


def meta_model(config: ModelConfig) -> Transformer:
    """The model as `model/` builds it, with shapes but no storage."""
    with torch.device("meta"):
        return Transformer(config)


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """Parameter counts by role, read off a meta-device model."""
    model = meta_model(config)
    c = config
    inactive = 0
    for layer in model.main_layers:
        if isinstance(layer.mlp, MoE):
            per_expert = sum(p.numel() for p in layer.mlp.experts.parameters()) // c.n_routed_experts
            inactive += per_expert * (c.n_routed_experts - c.num_experts_per_tok)
    main_modules = [model.model.embed_tokens, model.model.norm, model.lm_head, *model.main_layers]
    norms = sum(m.weight.numel() for top in main_modules for m in top.modules() if isinstance(m, RMSNorm))
    return {
        "total": model.num_parameters(include_mtp=False),
        "mtp_layers": sum(p.numel() for p in model.mtp_layers.parameters()),
        "embedding": model.model.embed_tokens.weight.numel(),
        "head": model.lm_head.weight.numel(),
        "inactive_experts": inactive,
        "norms": norms,
    }


def model_info(config: ModelConfig, context_length: int = 4096) -> dict:
    """Everything `nanoseek info` prints, as one flat dict (see the module docstring)."""
    c = config
    n = count_parameters(c)
    L, H, T = c.num_hidden_layers, c.num_attention_heads, context_length

    activated_with_embedding = n["total"] - n["inactive_experts"]
    activated = activated_with_embedding - (0 if c.tie_word_embeddings else n["embedding"])
    matmul_params = activated - n["norms"]
    mtp = n["mtp_layers"] + c.num_nextn_predict_layers * (n["embedding"] + n["head"])

    kv_built = sum(math.prod(s) for s in cache_entry_shapes(c)) * L * BYTES_BF16
    if c.attention_type == "mla":
        k_dim, v_dim = c.qk_head_dim, c.v_head_dim
        train_score, train_value = c.qk_head_dim, c.v_head_dim
        decode_score, decode_value = c.kv_lora_rank + c.qk_rope_head_dim, c.kv_lora_rank
    else:
        k_dim = v_dim = train_score = train_value = decode_score = decode_value = c.attn_head_dim
    groups = (c.num_key_value_heads if c.num_key_value_heads and c.num_key_value_heads < H
              else min(GQA_GROUPS, H))
    kv_mha = H * (k_dim + v_dim) * L * BYTES_BF16
    kv_gqa = groups * (k_dim + v_dim) * L * BYTES_BF16

    train_flops = 6 * matmul_params + 6 * L * H * (train_score + train_value) * T
    decode_flops = 2 * matmul_params + 2 * L * H * (decode_score + decode_value) * T

    n_moe_layers = sum(c.is_moe_layer(i) for i in range(L))
    return {
        # parameters
        "total_params": n["total"],
        "activated_params": activated,
        "activated_params_with_embedding": activated_with_embedding,
        "embedding_params": n["embedding"],
        "matmul_params": matmul_params,
        "mtp_params": mtp,
        "hf_total_params": n["total"] + mtp,
        # KV cache
        "kv_cache_bytes_per_token": kv_built,
        "kv_cache_bytes_per_token_mha": kv_mha,
        "kv_cache_bytes_per_token_gqa": kv_gqa,
        "gqa_groups": groups,
        "kv_cache_saving_vs_mha": kv_mha / kv_built,
        "kv_cache_saving_vs_gqa": kv_gqa / kv_built,
        # compute
        "context_length": T,
        "train_flops_per_token": train_flops,
        "decode_flops_per_token": decode_flops,
        # routing
        "expert_combinations": (expert_combinations(c.n_routed_experts, c.num_experts_per_tok)
                                if c.is_moe else None),
        "moe_layers": n_moe_layers,
        # key config fields
        "attention_type": c.attention_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": L,
        "num_attention_heads": H,
        "q_lora_rank": c.q_lora_rank if c.attention_type == "mla" else None,
        "kv_lora_rank": c.kv_lora_rank if c.attention_type == "mla" else None,
        "qk_nope_head_dim": c.qk_nope_head_dim if c.attention_type == "mla" else None,
        "qk_rope_head_dim": c.qk_rope_head_dim if c.attention_type == "mla" else None,
        "v_head_dim": c.v_head_dim if c.attention_type == "mla" else None,
        "head_dim": c.attn_head_dim if c.attention_type != "mla" else None,
        "num_key_value_heads": c.kv_heads if c.attention_type != "mla" else None,
        "intermediate_size": c.intermediate_size,
        "moe_intermediate_size": c.moe_intermediate_size if c.is_moe else None,
        "n_routed_experts": c.n_routed_experts or 0,
        "n_shared_experts": (c.n_shared_experts or 0) if c.is_moe else 0,
        "num_experts_per_tok": c.num_experts_per_tok if c.is_moe else None,
        "first_k_dense_replace": c.first_k_dense_replace,
        "scoring_func": c.scoring_func if c.is_moe else None,
        "topk_method": c.topk_method if c.is_moe else None,
        "num_nextn_predict_layers": c.num_nextn_predict_layers,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
    }
