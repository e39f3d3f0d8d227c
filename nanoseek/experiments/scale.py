"""How big the experiments are on each device: the shared model trunk, batches and budgets.

Two scales, one code path. `gpu`: models of about 10-90M parameters, eager (compiling ten
models would eat the budget), and an 8-minute default budget, so that one experiment (up to
ten trained models with their evaluations) fits a 10-minute call on one H100/H200; the
runner's timed probe sets the steps to fit. `cpu`: the same design shrunk to tiny models
that train in a few minutes.
Tests build a smaller scale still with `dataclasses.replace` and fixed `steps`.

The trunk keeps DeepSeek-V2's attention proportions (§2.1.2 and Table 1): with d_h the head
size of the MHA baseline, MLA's latent is d_c = 4·d_h and its RoPE key d_h/2, so its cache
per token and layer, d_c + d_h/2 = 4.5·d_h, is that of GQA with 2.25 groups (2·d_h each).
Every layer is an MoE layer (first_k_dense_replace = 0): the dense first layers V3 keeps for
stability would leave a 2-layer model with one MoE layer to measure.

The data are the built-in tasks in four domains (claim 6's heatmap rows): the training mix
is their train split, the held-out loss their test split, which no training problem shares.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# name: (task, level); equal numbers of documents of each
DOMAINS = {
    "add/sub to 99": ("arithmetic", 1),
    "2-digit ×": ("arithmetic", 3),
    "expressions": ("arithmetic", 5),
    "countdown": ("countdown", 1),
}


@dataclass(frozen=True)
class Scale:
    name: str
    budget_minutes: float          # default budget of one experiment (all arms and seeds)
    trunk: dict                    # ModelConfig fields every arm shares
    moe: dict                      # DeepSeek-V3's MoE at this scale (claims 2, 4, 5, 6)
    gshard_width: int              # GShard's expert width (claim 1); DeepSeekMoE splits it in 4
    batch_size: int
    seq_len: int
    lr: float
    warmup: int
    docs_per_domain: int           # training documents of each domain
    heldout_docs_per_domain: int   # test-split documents of each domain
    heldout_rows: int              # held-out rows of seq_len tokens for the validation loss
    eval_problems: int             # held-out arithmetic problems for the task accuracy
    eval_max_tokens: int           # generated tokens per problem
    decode_prompts: int            # prompts of the speculative-decoding measurement (claim 4)
    decode_tokens: int             # new tokens per prompt there
    steps: int | None = None       # fixed steps (tests); None: as many as the budget allows
    train: dict = field(default_factory=dict)  # further TrainConfig fields

    def replace(self, **changes) -> "Scale":
        return dataclasses.replace(self, **changes)

    def train_fields(self) -> dict:
        return dict(batch_size=self.batch_size, seq_len=self.seq_len, lr=self.lr, **self.train)


def mla_trunk(vocab_size: int, hidden_size: int, layers: int, heads: int, head_dim: int,
              q_lora_rank: int, intermediate_size: int) -> dict:
    """ModelConfig fields of a trunk whose MLA has V2's proportions to a head size d_h."""
    return dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                num_attention_heads=heads, head_dim=head_dim, intermediate_size=intermediate_size,
                q_lora_rank=q_lora_rank, kv_lora_rank=4 * head_dim, qk_nope_head_dim=head_dim,
                qk_rope_head_dim=head_dim // 2, v_head_dim=head_dim, first_k_dense_replace=0,
                num_nextn_predict_layers=0, max_position_embeddings=4096, initializer_range=0.02,
                n_routed_experts=0, n_shared_experts=0, num_experts_per_tok=None, n_group=None,
                topk_group=None)


def v3_moe(experts: int, width: int, top_k: int, groups: int, topk_group: int) -> dict:
    """V3's routed + 1 shared experts, sigmoid router, group-limited, auxiliary-loss-free
    (bias speed γ = 0.001, no balance loss; V3 adds a tiny sequence-wise α = 0.0001)."""
    return dict(n_routed_experts=experts, moe_intermediate_size=width, num_experts_per_tok=top_k,
                n_shared_experts=1, n_group=groups, topk_group=topk_group, scoring_func="sigmoid",
                topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5,
                bias_update_speed=0.001, aux_loss_alpha=0.0, seq_aux=True)


SCALES = {
    "gpu": Scale(name="gpu", budget_minutes=8.0,
                 trunk=mla_trunk(2048, 384, 6, 6, 64, q_lora_rank=192, intermediate_size=1024),
                 moe=v3_moe(32, 128, 4, 4, 2), gshard_width=768,
                 batch_size=32, seq_len=512, lr=2e-3, warmup=50,
                 docs_per_domain=12000, heldout_docs_per_domain=1000, heldout_rows=128,
                 eval_problems=128, eval_max_tokens=96, decode_prompts=32, decode_tokens=64),
    "cpu": Scale(name="cpu", budget_minutes=4.0,
                 trunk=mla_trunk(512, 64, 2, 4, 16, q_lora_rank=48, intermediate_size=192),
                 moe=v3_moe(16, 32, 4, 4, 2), gshard_width=128,
                 batch_size=8, seq_len=128, lr=3e-3, warmup=20,
                 docs_per_domain=1000, heldout_docs_per_domain=100, heldout_rows=32,
                 eval_problems=50, eval_max_tokens=96, decode_prompts=8, decode_tokens=48),
}
