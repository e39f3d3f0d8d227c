"""Claim 1: DeepSeekMoE beats GShard at equal total parameters and activated compute.

DeepSeekMoE (Dai et al. 2024) §4.2, Table 1: at 2.0B total parameters and the same activated
ones, 100B tokens, fine-grained experts plus a shared one reach a Pile loss of 1.808 against
GShard's 1.867 (a dense model of the activated size: 2.060), and more on every benchmark.

Arms, as in that table:
- gshard: 16 experts of width W, top-2, no shared expert;
- deepseekmoe: each expert split in 4 (m = 4), one of the 64 quarter-width experts made
  shared: 63 routed top-7 + 1 shared, so 8 quarter experts (= 2 full ones) run per token.
  Its width is then searched so that its total parameters match GShard's;
- dense: a SwiGLU FFN whose width is searched to match GShard's activated parameters.
Both MoE arms route as the paper did (softmax gate, no top-k renormalisation, an
expert-level balance loss α = 0.01 over the batch), so only the expert layout differs.
The 63 experts' router is part of the activated parameters; at the CPU scale's narrow
experts it is a few percent of them, hence the 5% tolerance.
"""

from __future__ import annotations

from ..config import ModelConfig
from .runner import Arm, Compare, Experiment
from .sizing import accounting, fit_width

PAPER_ROUTER = dict(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0,
                    n_group=1, topk_group=1, aux_loss_alpha=0.01, seq_aux=False, bias_update_speed=0.0)


def arms(scale) -> list[Arm]:
    trunk = ModelConfig(**scale.trunk)
    W = scale.gshard_width
    gshard = trunk.replace(**PAPER_ROUTER, n_routed_experts=16, num_experts_per_tok=2, n_shared_experts=0,
                           moe_intermediate_size=W)
    size = accounting(gshard, scale.seq_len)
    fine = trunk.replace(**PAPER_ROUTER, n_routed_experts=63, num_experts_per_tok=7, n_shared_experts=1,
                         moe_intermediate_size=W // 4)
    fine = fit_width(fine, "moe_intermediate_size", "total_params", size["total_params"], scale.seq_len)
    dense = fit_width(trunk, "intermediate_size", "activated_params", size["activated_params"], scale.seq_len)
    return [Arm("deepseekmoe", fine, f"1 shared + 63 routed top-7, width {fine.moe_intermediate_size}"),
            Arm("gshard", gshard, f"16 routed top-2, width {W}"),
            Arm("dense", dense, f"dense FFN, width {dense.intermediate_size}")]


EXPERIMENT = Experiment(
    name="moe", claim=1, title="DeepSeekMoE vs GShard vs dense",
    paper="DeepSeekMoE paper Table 1 (2.0B total, 100B tokens): Pile loss DeepSeekMoE 1.808, GShard 1.867, "
          "dense at equal activated parameters 2.060; HellaSwag 54.8 vs 50.5 vs 38.8.",
    arms=arms,
    checks=[Compare("DeepSeekMoE: lower held-out loss than GShard", "val_loss", "deepseekmoe", "gshard",
                    "1.808 vs 1.867"),
            Compare("DeepSeekMoE: higher held-out accuracy than GShard", "accuracy", "deepseekmoe", "gshard",
                    "HellaSwag 54.8 vs 50.5", lower_is_better=False, trials="accuracy_problems"),
            Compare("GShard: lower held-out loss than dense at equal activated parameters", "val_loss", "gshard",
                    "dense", "1.867 vs 2.060")],
    metrics=[("val_loss", "held-out loss", "{:.4f}"), ("accuracy", "arithmetic accuracy, levels 1, 3, 5", "{:.1%}")],
    equal=[("total_params", ("deepseekmoe", "gshard")), ("activated_params", ("deepseekmoe", "gshard", "dense"))],
    tolerance=0.05, accuracy=True)
