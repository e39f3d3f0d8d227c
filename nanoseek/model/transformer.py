"""Block and Transformer: wiring of mla.py / attention.py, moe.py and mtp.py.

Module names follow the HF checkpoints (`model.embed_tokens`, `model.layers.{i}.self_attn`,
`...mlp.experts`, `model.norm`, `lm_head`); the MTP modules sit after the main layers in
`model.layers`, exactly where the V3 checkpoints keep them. The only layout difference is
that routed experts are stored stacked; hf.py converts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import GQA
from .mla import MLA
from .moe import MLP, ExpertPath, Experts, MoE, Router, max_violation
from .mtp import make_mtp_layer
from .norm import RMSNorm
from .rope import RotaryEmbedding


@dataclass
class ModelOutput:
    logits: torch.Tensor                    # [B, T, vocab]
    loss: torch.Tensor | None = None        # main + mtp + balance
    main_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth k: [B, T-k, vocab]
    hidden_states: torch.Tensor | None = None  # final-normed, [B, T, D]


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLA(config, layer_idx) if config.attention_type == "mla" else GQA(config, layer_idx)
        self.mlp = (MoE(config) if config.is_moe_layer(layer_idx)
                    else MLP(config.hidden_size, config.intermediate_size))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h_BTD, cos, sin, positions=None, cache=None, absorb=None):
        h_BTD = h_BTD + self.self_attn(self.input_layernorm(h_BTD), cos, sin, positions, cache, absorb)
        y = self.mlp(self.post_attention_layernorm(h_BTD))
        y, balance = y if isinstance(y, tuple) else (y, None)
        return h_BTD + y, balance


MTPLayer = make_mtp_layer(Block)


class DecoderStack(nn.Module):
    """`model.*` in the checkpoints."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        L = c.num_hidden_layers
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList([Block(c, i) for i in range(L)]
                                    + [MTPLayer(c, L + k) for k in range(c.num_nextn_predict_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        rope_dim = c.qk_rope_head_dim if c.attention_type == "mla" else c.attn_head_dim
        self.rotary = RotaryEmbedding(c, rope_dim)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    # -------------------------------------------------------------- structure
    @property
    def main_layers(self) -> nn.ModuleList:
        return self.model.layers[: self.config.num_hidden_layers]

    @property
    def mtp_layers(self) -> nn.ModuleList:
        return self.model.layers[self.config.num_hidden_layers:]

    def set_expert_path(self, path: ExpertPath) -> None:
        """How every MoE layer computes its routed experts from now on (moe.ExpertPath): the
        one switch of the experts' fast paths; an inference engine sets it from its config."""
        for module in self.modules():
            if isinstance(module, Experts):
                module.path = path

    def set_decode_attention(self, attend=None) -> None:
        """What every MLA layer computes its attention with for one new token a row over a
        cache (MLA.decode_attention; None: the absorbed attention). An inference engine sets
        it around its own forwards only (ModelRunner._context)."""
        for module in self.modules():
            if isinstance(module, MLA):
                module.decode_attention = attend

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, Router):
                nn.init.normal_(m.weight, std=std)
                if m.e_score_correction_bias is not None:
                    m.e_score_correction_bias.zero_()
            elif isinstance(m, Experts):
                for p in (m.gate_proj, m.up_proj, m.down_proj):
                    nn.init.normal_(p, std=std)

    def num_parameters(self, include_mtp: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not include_mtp:
            n -= sum(p.numel() for p in self.mtp_layers.parameters())
        return n

    # -------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache=None, return_mtp: bool = False,
                absorb: bool | None = None, logits_to_keep: int = 0) -> ModelOutput:
        """input_ids [B, T]; labels [B, T] aligned with input_ids (shifted inside, -100 ignored).

        With a `cache` (model/cache.py) `positions` [B, T] say where each token goes and what
        it may attend to; MLA then decodes through the absorbed path unless `absorb=False`.
        """
        c = self.config
        B, T = input_ids.shape
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required with a cache")
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = self.model.rotary(positions)
        h = self.model.embed_tokens(input_ids)
        h, balance = run_blocks(self.main_layers, h, cos, sin, positions, cache, absorb)
        h = self.model.norm(h)
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        out = ModelOutput(logits=logits, hidden_states=h)

        want_mtp = len(self.mtp_layers) > 0 and (return_mtp or (labels is not None and self.training))
        if want_mtp and cache is None:
            out.mtp_logits, mtp_balance = run_mtp(self.mtp_layers, self.lm_head, h,
                                                  self.model.embed_tokens(input_ids), cos, sin, positions)
            balance = balance + mtp_balance

        if labels is not None:
            out.main_loss = shifted_cross_entropy(logits, labels, 0)
            out.balance_loss = balance
            out.loss = out.main_loss + balance
            if out.mtp_logits:
                ces = [shifted_cross_entropy(lg, labels, k) for k, lg in enumerate(out.mtp_logits, 1)]
                out.mtp_loss = c.mtp_loss_weight / len(self.mtp_layers) * torch.stack(ces).sum()
                out.loss = out.loss + out.mtp_loss
        return out

    # -------------------------------------------------------------- balancing
    def routers(self) -> dict[int, Router]:
        return {i: layer.mlp.gate for i, layer in enumerate(self.model.layers) if isinstance(layer.mlp, MoE)}

    @torch.no_grad()
    def update_expert_bias(self) -> dict[int, torch.Tensor]:
        """The auxiliary-loss-free update, once per optimizer step: returns each MoE layer's
        expert loads over that step (tokens per expert) and resets the counters."""
        return {i: r.update_bias() for i, r in self.routers().items()}

    @torch.no_grad()
    def expert_loads(self) -> dict[int, torch.Tensor]:
        """Tokens per expert counted since the last update_expert_bias(), per MoE layer."""
        return {i: r.load.clone() for i, r in self.routers().items()}


def run_blocks(blocks, h_BTD, cos, sin, positions=None, cache=None, absorb=None):
    """Decoder blocks in order; returns the hidden state and their summed balance losses."""
    balance = h_BTD.new_zeros((), dtype=torch.float32)
    for block in blocks:
        h_BTD, aux = block(h_BTD, cos, sin, positions, cache, absorb)
        if aux is not None:
            balance = balance + aux
    return h_BTD, balance


def run_mtp(mtp_layers, lm_head: nn.Module, h_BTD, emb_BTD, cos, sin, positions):
    """The MTP modules on the main model's final-normed h and the token embeddings: depth k's
    logits [B, T-k, vocab] for each k, and their summed balance losses."""
    T = h_BTD.shape[1]
    logits, balance = [], h_BTD.new_zeros((), dtype=torch.float32)
    h_prev = h_BTD
    for k, layer in enumerate(mtp_layers, start=1):
        if T - k <= 0:
            break
        h_prev, aux = layer(h_prev[:, : T - k], emb_BTD[:, k:], cos[:, : T - k], sin[:, : T - k],
                            positions[:, : T - k])
        if aux is not None:
            balance = balance + aux
        logits.append(lm_head(layer.shared_head.norm(h_prev)))
    return logits, balance


def shifted_cross_entropy(logits_BTV: torch.Tensor, labels_BT: torch.Tensor, k: int) -> torch.Tensor:
    """CE of logits at i against labels at i+k+1 (k = 0: next token; k >= 1: MTP depth k).

    `logits` may already be shorter than labels by k (MTP depth k covers T-k positions)."""
    T = labels_BT.shape[1]
    n = T - k - 1
    if n <= 0:
        return logits_BTV.new_zeros((), dtype=torch.float32)
    pred = logits_BTV[:, :n].float()
    target = labels_BT[:, k + 1: k + 1 + n]
    total = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=-100,
                            reduction="sum")
    # mean over the counted positions; 0, not 0/0, for a batch whose labels are all ignored
    return total / (target != -100).sum().clamp_min(1)


def maxvio_per_layer(loads: dict[int, torch.Tensor]) -> dict[int, float]:
    return {i: float(max_violation(load)) for i, load in loads.items()}
