"""Claim 5: FP8 training follows BF16's loss curve within 0.25%.

DeepSeek-V3 Appendix B.1, Figure 10: with fine-grained FP8 (1x128 activation tiles, 128x128
weight blocks, FP32 promotion of the partial sums), the training loss of a 16B and a 230B
MoE stays within 0.25% of the BF16 baseline's.

Arms: the same V3 MoE trained with `precision="fp8"` (train/precision.py) and with the
baseline precision, BF16 autocast on a GPU or float32 on the CPU (where FP8 GEMMs are
emulated in float32 and the rest runs in float32). With the same seed the two see the same
data in the same order, so the relative loss error |L_fp8 − L_base| / L_base is taken step
by step on the two training curves (mean over the second half of training) and on the
final held-out loss, and each seed is one pair. No speed is measured: on the CPU the FP8
GEMMs are a quantize-dequantize twin, so a CPU result is a numerics check only.
"""

from __future__ import annotations

from ..config import ModelConfig
from .runner import Arm, Bound, Experiment


def arms(scale) -> list[Arm]:
    model = ModelConfig(**{**scale.trunk, **scale.moe})
    base = "bf16" if scale.name == "gpu" else "fp32"
    return [Arm("fp8", model, "FP8 GEMMs (V3 recipe)", {"precision": "fp8"}),
            Arm("baseline", model, f"precision {base}", {"precision": base})]


def derive(runs: list[dict]) -> dict:
    """Per seed: the relative loss error over the second half of training, and at the end on
    held-out data."""
    by = {(r["arm"], r["seed"]): r for r in runs}
    curve_err, final_err = [], []
    for (arm, seed), run in sorted(by.items()):
        if arm != "fp8":
            continue
        ref = by[("baseline", seed)]
        pairs = list(zip(run["curve"]["main_loss"], ref["curve"]["main_loss"]))[len(run["curve"]["main_loss"]) // 2:]
        curve_err.append(sum(abs(a - b) / b for a, b in pairs) / len(pairs))
        final_err.append(abs(run["val_loss"] - ref["val_loss"]) / ref["val_loss"])
    return {"fp8": {"rel_error_train": curve_err, "rel_error_heldout": final_err}}


EXPERIMENT = Experiment(
    name="fp8", claim=5, title="FP8 vs BF16 training",
    paper="DeepSeek-V3 Appendix B.1: the FP8 run's training loss stays within 0.25% of BF16's (16B and 230B MoE).",
    arms=arms,
    checks=[Bound("FP8: relative training-loss error (2nd half of training)", "rel_error_train", "fp8", 0.0, 0.0025,
                  "< 0.25%"),
            Bound("FP8: relative held-out loss error", "rel_error_heldout", "fp8", 0.0, 0.0025, "< 0.25%")],
    metrics=[("val_loss", "held-out loss", "{:.4f}"), ("rel_error_train", "relative loss error (training)", "{:.3%}"),
             ("rel_error_heldout", "relative loss error (held-out)", "{:.3%}")],
    equal=[("activated_params", ("fp8", "baseline"))],
    derive=derive,
    notes={"cpu": "CPU scale: a numerics check of FP8 training's quantize-dequantize twin against float32 "
                  "(the loss gap only; no speed figure, and no FP8 hardware involved)."})
