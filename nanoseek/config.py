"""ModelConfig: one dataclass for the whole DeepSeek family and its baselines.

Field names are those of `transformers.DeepseekV3Config` / `DeepseekV2Config`, so an
official checkpoint's `config.json` loads as it is (`ModelConfig.from_dict`). Fields that
only nanoseek knows (the attention kind of a baseline, the bias-update speed γ, the MTP loss
weight λ, ...) have defaults that reproduce the papers.

RoPE settings arrive in either of two spellings: the V2/V3 checkpoints' top-level
`rope_theta` + `rope_scaling`, or transformers 5's `rope_parameters` (which holds
`rope_theta` and `rope_type` beside the YaRN fields). Both are read; `rope_scaling` is the
canonical attribute and `to_dict` writes both spellings so that either reader is happy.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config field holds a value nanoseek cannot build. The message names the field."""


SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
ATTENTION_TYPES = ("mla", "mha", "gqa")
ROPE_TYPES = ("default", "yarn")


class CheckedConfig:
    """The field checks every config dataclass shares (ModelConfig, TrainConfig, GRPOConfig):
    `check_types()` holds each value to its annotation before any range check compares it, so
    a wrong type is named instead of failing inside a comparison; `need()` states a range.
    Messages read "{kind} field 'name' = value: what is wrong"."""

    kind = "config"

    def check_types(self) -> None:
        kinds = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "dict": (dict,)}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            parts = [p.strip() for p in str(f.type).split("|")]
            if value is None:
                if "None" in parts:
                    continue
                raise ConfigError(f"{self.kind} field '{f.name}' must not be null")
            allowed = tuple(t for p in parts for t in kinds.get(p, ()))
            if not allowed:
                continue
            want = " or ".join(p for p in parts if p != "None") + (" or null" if "None" in parts else "")
            # true/false is not a number here, though Python's bool is an int
            if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
                raise ConfigError(f"{self.kind} field '{f.name}' = {value!r}: must be {want}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{self.kind} field '{f.name}' = {value!r}: must be a finite number")

    def need(self, cond: bool, name: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{self.kind} field '{name}' = {getattr(self, name)!r}: {msg}")

    def need_at_least(self, minimum: int, *names: str) -> None:
        for name in names:
            self.need(getattr(self, name) >= minimum, name,
                      "must be a positive integer" if minimum == 1 else f"must be >= {minimum}")

    def need_one_of(self, name: str, allowed: tuple[str, ...]) -> None:
        self.need(getattr(self, name) in allowed, name, f"must be one of {', '.join(allowed)}")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)} - {"extra"}

    @classmethod
    def with_changes(cls, **changes: Any):
        """The defaults with `changes`; an unknown field is a ConfigError naming the known ones."""
        unknown = [k for k in changes if k not in cls.field_names()]
        if unknown:
            raise ConfigError(f"unknown {cls.kind} field(s) {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(cls.field_names()))}")
        return cls(**changes)

    @classmethod
    def field_table(cls) -> str:
        """`name=default  meaning` per field (defaults as the JSON a key=value word takes)."""
        rows = [(f"{f.name}={json.dumps(_default(f))}", f.metadata.get("help", ""))
                for f in dataclasses.fields(cls) if f.name != "extra"]
        width = max(len(left) for left, _ in rows)
        return "\n".join(f"  {left:<{width}}  {meaning}".rstrip() for left, meaning in rows)


def described(default: Any, help: str) -> Any:
    """A dataclass field with a one-line meaning, which `--list-fields` prints."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@dataclass
class ModelConfig(CheckedConfig):
    # --- sizes (HF names) ---
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None  # GQA baseline only; MLA ignores it
    head_dim: int | None = None  # MHA/GQA baselines; defaults to hidden_size // heads
    # --- MLA (DeepSeek-V2 §2.1) ---
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # --- DeepSeekMoE (V2 §2.2, V3 §2.1.2) ---
    n_routed_experts: int | None = 256  # None or 0: a dense model
    n_shared_experts: int | None = 1
    num_experts_per_tok: int | None = 8
    n_group: int | None = 8
    topk_group: int | None = 4
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    # balancing: V3 eq. 16 (bias, γ) and eq. 17-20 (sequence-wise loss, α); GShard aux loss
    aux_loss_alpha: float = 0.0001
    seq_aux: bool = True
    bias_update_speed: float = 0.001  # nanoseek-only: γ of the auxiliary-loss-free update
    # --- MTP (V3 §2.2) ---
    num_nextn_predict_layers: int = 1
    mtp_loss_weight: float = 0.3  # nanoseek-only: λ
    # --- misc (HF names) ---
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    initializer_range: float = 0.006
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    # --- nanoseek-only ---
    attention_type: str = "mla"
    # keys of a loaded config.json that nanoseek does not use; written back on save
    extra: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        self.check_types()
        need = self.need
        self.need_at_least(1, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
        self.need_one_of("scoring_func", SCORING_FUNCS)
        self.need_one_of("topk_method", TOPK_METHODS)
        self.need_one_of("attention_type", ATTENTION_TYPES)
        need(self.hidden_act == "silu", "hidden_act", "only 'silu' (SwiGLU experts) is supported")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        if self.rope_scaling is not None:
            rtype = self.rope_scaling.get("type", self.rope_scaling.get("rope_type", "default"))
            if rtype not in ROPE_TYPES:
                raise ConfigError(f"config field 'rope_scaling.type' = {rtype!r}: must be one of "
                                  f"{', '.join(ROPE_TYPES)}")
            if rtype == "yarn":
                for key in ("factor", "original_max_position_embeddings"):
                    if key not in self.rope_scaling:
                        raise ConfigError(f"config field 'rope_scaling' lacks '{key}', which YaRN needs")
                if not self.rope_scaling["factor"] >= 1:
                    raise ConfigError(f"config field 'rope_scaling.factor' = "
                                      f"{self.rope_scaling['factor']!r}: must be >= 1")
        if self.attention_type == "mla":
            need(self.kv_lora_rank > 0, "kv_lora_rank", "must be > 0 for MLA")
            need(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank",
                 "must be a positive integer, or null for a single query projection")
            need(self.qk_rope_head_dim % 2 == 0 and self.qk_rope_head_dim > 0, "qk_rope_head_dim",
                 "must be a positive even number (RoPE rotates pairs)")
            need(self.qk_nope_head_dim >= 0, "qk_nope_head_dim", "must be >= 0")
            need(self.v_head_dim > 0, "v_head_dim", "must be > 0")
        else:
            if self.head_dim is None:
                need(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
                     "must be divisible by num_attention_heads, or set head_dim")
            need(self.attn_head_dim % 2 == 0, "head_dim", "must be even (RoPE rotates pairs)")
            if self.attention_type == "gqa":
                need(self.num_key_value_heads is not None and self.num_key_value_heads > 0
                     and self.num_attention_heads % self.num_key_value_heads == 0,
                     "num_key_value_heads", "GQA needs a divisor of num_attention_heads")
        if self.is_moe:
            n, k = self.n_routed_experts, self.num_experts_per_tok
            need(k is not None and 1 <= k <= n, "num_experts_per_tok",
                 f"must be between 1 and n_routed_experts ({n})")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be > 0")
            need((self.n_shared_experts or 0) >= 0, "n_shared_experts", "must be >= 0")
            need(self.moe_layer_freq >= 1, "moe_layer_freq", "must be >= 1")
            if self.topk_method != "greedy":
                need(self.n_group is not None and self.n_group >= 1 and n % self.n_group == 0,
                     "n_group", f"must divide n_routed_experts ({n})")
                need(self.topk_group is not None and 1 <= self.topk_group <= self.n_group,
                     "topk_group", f"must be between 1 and n_group ({self.n_group})")
                need(k <= self.topk_group * (n // self.n_group), "num_experts_per_tok",
                     f"cannot exceed topk_group x experts per group "
                     f"({self.topk_group} x {n // self.n_group})")
                if self.topk_method == "noaux_tc":
                    need(n // self.n_group >= 2, "n_group",
                         "noaux_tc scores a group by its top-2 experts, so each group needs >= 2")
            need(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
                 f"must be between 0 and num_hidden_layers ({self.num_hidden_layers})")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        need(self.aux_loss_alpha >= 0, "aux_loss_alpha", "must be >= 0")
        need(self.bias_update_speed >= 0, "bias_update_speed", "must be >= 0")

    # ------------------------------------------------------------------ derived
    @property
    def is_moe(self) -> bool:
        return bool(self.n_routed_experts)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def attn_head_dim(self) -> int:
        """Head size of the MHA/GQA baselines."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        if self.attention_type == "mha":
            return self.num_attention_heads
        return self.num_key_value_heads or self.num_attention_heads

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek's rule: MoE from `first_k_dense_replace` on, every `moe_layer_freq`."""
        return (self.is_moe and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("type", self.rope_scaling.get("rope_type", "default"))

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times YaRN's mscale(s, mscale_all_dim)^2 (V2 appendix / YaRN eq. 22).

        The checkpoints split YaRN's temperature in two: cos/sin carry
        mscale(s, mscale)/mscale(s, mscale_all_dim) (see rope.py) and the softmax scale
        carries mscale(s, mscale_all_dim)^2. With V3's mscale = mscale_all_dim = 1 the
        whole correction sits here.
        """
        d = self.qk_head_dim if self.attention_type == "mla" else self.attn_head_dim
        scale = d ** -0.5
        if self.rope_type == "yarn":
            m_all = self.rope_scaling.get("mscale_all_dim", 0)
            if m_all:
                m = yarn_mscale(self.rope_scaling["factor"], m_all)
                scale *= m * m
        return scale

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        # transformers 5 spelling: rope_parameters = {rope_type, rope_theta, factor, ...}
        rp = d.pop("rope_parameters", None)
        if isinstance(rp, dict):
            rp = dict(rp)
            if "rope_theta" in rp:
                d.setdefault("rope_theta", rp.pop("rope_theta"))
            rtype = rp.pop("rope_type", rp.pop("type", "default"))
            if rtype != "default" and d.get("rope_scaling") is None:
                d["rope_scaling"] = {"type": rtype, **rp}
        rs = d.get("rope_scaling")
        if isinstance(rs, dict):
            rs = dict(rs)
            if "rope_type" in rs and "type" not in rs:
                rs["type"] = rs.pop("rope_type")
            rs.pop("rope_theta", None)
            d["rope_scaling"] = None if rs.get("type", "default") == "default" else rs
        if d.get("model_type") == "deepseek_v2" and "scoring_func" not in d:
            d["scoring_func"] = "softmax"  # the V2 checkpoints leave it implicit
            d.setdefault("norm_topk_prob", False)
        if d.get("model_type") == "deepseek_v2" and "topk_method" not in d:
            d["topk_method"] = "greedy"
        if d.get("model_type") == "deepseek_v3":
            d.setdefault("topk_method", "noaux_tc")
        if d.get("n_routed_experts") is None and "num_local_experts" in d:
            d["n_routed_experts"] = d["num_local_experts"]
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            d["num_nextn_predict_layers"] = d["num_mtp_layers"]
        d.setdefault("num_nextn_predict_layers", 0)  # a checkpoint without the key has no MTP
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known}
        for name in ("eos_token_id", "bos_token_id"):
            if isinstance(kwargs.get(name), list):
                extra[name + "_list"] = kwargs[name]
                kwargs[name] = kwargs[name][0] if kwargs[name] else None
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config file at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_dict(d)

    @property
    def hf_model_type(self) -> str:
        """Which HF architecture this config matches: V3 (sigmoid router) or V2 (softmax)."""
        if self.attention_type != "mla":
            return "nanoseek"
        return "deepseek_v3" if self.scoring_func == "sigmoid" else "deepseek_v2"

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d = {**{k: v for k, v in self.extra.items() if not k.endswith("_list")}, **d}
        mtype = self.hf_model_type
        d["model_type"] = mtype
        d["architectures"] = [{"deepseek_v3": "DeepseekV3ForCausalLM",
                               "deepseek_v2": "DeepseekV2ForCausalLM"}.get(mtype, "NanoseekForCausalLM")]
        # what transformers needs to build the same model
        d["num_key_value_heads"] = self.kv_heads if self.attention_type != "mla" else self.num_attention_heads
        if self.attention_type == "mla":
            d["head_dim"] = self.qk_rope_head_dim  # transformers sizes its rotary tables by it
        d["rope_interleave"] = True
        rp = {"rope_theta": self.rope_theta, "rope_type": self.rope_type}
        if self.rope_scaling:
            rp.update({k: v for k, v in self.rope_scaling.items() if k != "type"})
        d["rope_parameters"] = rp
        if not self.is_moe:
            # transformers builds dense MLPs for layers < first_k_dense_replace
            d["n_routed_experts"] = 0
            d["first_k_dense_replace"] = self.num_hidden_layers
        return d

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature sqrt(1/t) = 0.1·mscale·ln(s) + 1 (YaRN eq. 22)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def coerce_value(text: str) -> Any:
    """Parse a `key=value` override from the command line as JSON, else as a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(cfg: ModelConfig, overrides: list[str]) -> ModelConfig:
    """`["n_routed_experts=16", "q_lora_rank=null"]` -> a validated new config."""
    known = ModelConfig.field_names()
    changes = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        if key not in known:
            close = [k for k in known if k.startswith(key[:4])]
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise ConfigError(f"unknown config field {key!r}{hint}")
        changes[key] = coerce_value(value)
    return cfg.replace(**changes)


# ---------------------------------------------------------------------- presets
_YARN_V3 = {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096}
_YARN_V2 = {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
            "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096}

_SMALL_TRUNK = dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                    num_attention_heads=8, max_position_embeddings=2048, initializer_range=0.02,
                    q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
                    v_head_dim=64)

PRESETS: dict[str, dict[str, Any]] = {
    # DeepSeek-V3 / R1, 671B total, 37B activated (V3 report Table/§4.2)
    "deepseek-v3": dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
                        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
                        n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
                        routed_scaling_factor=2.5, first_k_dense_replace=3, norm_topk_prob=True,
                        scoring_func="sigmoid", topk_method="noaux_tc",
                        max_position_embeddings=163840, rope_scaling=_YARN_V3,
                        num_nextn_predict_layers=1),
    # DeepSeek-V2, 236B total, 21B activated
    "deepseek-v2": dict(vocab_size=102400, hidden_size=5120, intermediate_size=12288,
                        moe_intermediate_size=1536, num_hidden_layers=60, num_attention_heads=128,
                        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=160,
                        n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=3,
                        routed_scaling_factor=16.0, first_k_dense_replace=1, norm_topk_prob=False,
                        scoring_func="softmax", topk_method="group_limited_greedy",
                        aux_loss_alpha=0.003, max_position_embeddings=163840,
                        rope_scaling=_YARN_V2, num_nextn_predict_layers=0, bos_token_id=100000,
                        eos_token_id=100001),
    # DeepSeek-V2-Lite, 15.7B total, 2.4B activated
    "deepseek-v2-lite": dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                             moe_intermediate_size=1408, num_hidden_layers=27,
                             num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
                             qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                             n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
                             n_group=1, topk_group=1, routed_scaling_factor=1.0,
                             first_k_dense_replace=1, norm_topk_prob=False,
                             scoring_func="softmax", topk_method="greedy", aux_loss_alpha=0.001,
                             max_position_embeddings=163840, rope_scaling=_YARN_V2,
                             num_nextn_predict_layers=0, bos_token_id=100000,
                             eos_token_id=100001),
    # DeepSeekMoE 16B: MHA (no MLA), 16.4B total, 2.8B activated
    "deepseek-moe-16b": dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                             moe_intermediate_size=1408, num_hidden_layers=28,
                             num_attention_heads=16, attention_type="mha", head_dim=128,
                             n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
                             n_group=1, topk_group=1, routed_scaling_factor=1.0,
                             first_k_dense_replace=1, norm_topk_prob=False,
                             scoring_func="softmax", topk_method="greedy", aux_loss_alpha=0.001,
                             max_position_embeddings=4096, num_nextn_predict_layers=0,
                             bos_token_id=100000, eos_token_id=100001),
    # trains in seconds on a laptop CPU; every DeepSeek feature is on, MTP included
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=192, moe_intermediate_size=32,
                 num_hidden_layers=3, num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32,
                 qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                 n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                 routed_scaling_factor=2.5, first_k_dense_replace=1, norm_topk_prob=True,
                 max_position_embeddings=512, num_nextn_predict_layers=1,
                 initializer_range=0.02),
    # trains in minutes on one GPU
    "small": dict(**_SMALL_TRUNK, moe_intermediate_size=256, n_routed_experts=32,
                  n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                  routed_scaling_factor=2.5, first_k_dense_replace=1, num_nextn_predict_layers=1),
    # the shape of every speed comparison (1.25B parameters without MTP)
    "bench-1b": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                     moe_intermediate_size=512, num_hidden_layers=12, num_attention_heads=16,
                     first_k_dense_replace=1, n_shared_experts=2, n_routed_experts=64,
                     num_experts_per_tok=6, n_group=8, topk_group=4, routed_scaling_factor=2.5,
                     scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
                     q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                     v_head_dim=64, tie_word_embeddings=False, num_nextn_predict_layers=1,
                     max_position_embeddings=4096, initializer_range=0.02),
    # GShard baseline beside `small`: softmax top-2 of 16 full-width experts, no shared
    # experts, a batch-wise auxiliary balance loss (GShard / Switch), no bias balancing
    "gshard": dict(**_SMALL_TRUNK, moe_intermediate_size=1408, n_routed_experts=16,
                   n_shared_experts=0, num_experts_per_tok=2, n_group=1, topk_group=1,
                   routed_scaling_factor=1.0, first_k_dense_replace=0, norm_topk_prob=False,
                   scoring_func="softmax", topk_method="greedy", aux_loss_alpha=0.01,
                   seq_aux=False, num_nextn_predict_layers=0),
    # dense baseline beside `small`: MLA + SwiGLU, no experts
    "dense": dict(**_SMALL_TRUNK, n_routed_experts=0, n_shared_experts=0, num_experts_per_tok=None,
                  n_group=None, topk_group=None, first_k_dense_replace=0,
                  num_nextn_predict_layers=0),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset as a validated ModelConfig, with optional field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
