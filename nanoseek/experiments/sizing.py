"""Equal compute, computed: the arms' accounting from `model_info` and a search over widths.

An arm that must match another in total or activated parameters gets the width (an FFN or
expert `intermediate_size`, a multiple of 8) whose count comes closest, found by bisection
over the widths (every count here grows with the width). `check_equal` then holds the arms to a stated
relative tolerance, so a comparison never silently runs between unequal models.
"""

from __future__ import annotations

from ..config import ModelConfig
from ..info import model_info

# widths are searched in steps of 8: 16-byte rows for BF16 GEMMs (grouped ones require it)
WIDTH_MULTIPLE = 8
# model_info's figures that each arm's table row shows
ACCOUNTING = ("total_params", "activated_params", "train_flops_per_token", "kv_cache_bytes_per_token",
              "mtp_params")


def accounting(config: ModelConfig, seq_len: int) -> dict:
    """Total and activated parameters, training FLOPs per token at seq_len, KV-cache bytes
    per token (BF16) and the MTP modules' parameters."""
    info = model_info(config, context_length=seq_len)
    return {key: info[key] for key in ACCOUNTING}


def fit_width(config: ModelConfig, field: str, metric: str, target: float, seq_len: int,
              multiple: int = WIDTH_MULTIPLE) -> ModelConfig:
    """`config` with the width `field` set to the multiple of `multiple` whose model_info
    `metric` is closest to target."""
    def value(k: int) -> float:
        return model_info(config.replace(**{field: k * multiple}), context_length=seq_len)[metric]

    lo, hi = 1, 2
    while value(hi) < target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # value(lo) < target <= value(hi), or lo = 1
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if value(mid) < target else (lo, mid)
    best = min((lo, hi), key=lambda k: abs(value(k) - target))
    return config.replace(**{field: best * multiple})


def relative_gap(values: list[float]) -> float:
    """(max − min) / max of a set of counts."""
    return (max(values) - min(values)) / max(values)


def check_equal(rows: dict[str, dict], metric: str, arms: tuple[str, ...], tolerance: float) -> float:
    """The arms' relative gap in `metric`; a ValueError if it exceeds the tolerance."""
    gap = relative_gap([rows[a][metric] for a in arms])
    if gap > tolerance:
        figures = ", ".join(f"{a} {rows[a][metric]:,}" for a in arms)
        raise ValueError(f"{metric} of {', '.join(arms)} differ by {gap:.1%} (> {tolerance:.0%}): {figures}; "
                         "the scale's widths cannot be matched, change the scale")
    return gap
