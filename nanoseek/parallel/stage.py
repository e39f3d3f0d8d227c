"""A consecutive slice of a Transformer as one module, and the loss of a global batch.

`ModelStage` holds layers [start, end) of a built `Transformer` (its own modules, not copies),
plus the embedding on the first stage and the final norm, head and MTP modules on the last,
under the full model's names (`model.layers.{i}`, `lm_head`), so that optimizer state and
distributed checkpoints of any split are one model's. One stage holding everything is the
model without a pipeline: the data- and expert-parallel path uses it too.

Between stages travel the hidden state and, when the model has MTP modules, the token
embeddings (MTP on the last stage consumes them; V3 §3.2.1 shares the embedding between the
first and last stage for the same reason). So the embedding has one copy, whose gradient
arrives through the pipeline.

The loss of a step is the single-process loss of the global batch, whatever the split. Each
rank's share of it is computed from global denominators (`set_denominators`): the token
counts of each cross-entropy term and the number of sequences, over all ranks and
micro-batches. Then gradients add up across micro-batches and ranks (summed reductions) to
the single-process gradient. A stage's balance losses (V3 eq. 17-20, a mean over sequences)
join the backward without being outputs: on the last stage they are added to the loss, on
the others `attach_loss` makes the hidden state carry them (Megatron's
MoEAuxLossAutoScaler), which is how they reach the routers of any stage.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.transformer import Transformer, run_blocks, run_mtp, shifted_cross_entropy
from .mesh import ParallelError

# `stats` buffer slots: this rank's shares of the step's loss terms
MAIN, MTP, BALANCE = range(3)


class _AttachLoss(torch.autograd.Function):
    """x (a copy) whose backward also sends gradient 1 into `loss` (a scalar)."""

    @staticmethod
    def forward(ctx, x, loss):
        ctx.loss_shape = loss.shape
        # a copy, not x itself: autograd would make that a view, and the pipeline's backward
        # detaches its stage outputs in place, which a view refuses
        return x.clone()

    @staticmethod
    def backward(ctx, grad_x):
        return grad_x, grad_x.new_ones(ctx.loss_shape, dtype=torch.float32)


def attach_loss(x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    return _AttachLoss.apply(x, loss) if loss.requires_grad else x


def split_layers(n_layers: int, n_mtp: int, n_stages: int) -> list[range]:
    """Main layers of each stage, as even as possible counting each MTP module as a layer of
    the last stage; earlier stages take the remainder (the last also runs the head)."""
    units = n_layers + n_mtp
    if n_stages > units:
        raise ParallelError(f"{n_stages} pipeline stages for {n_layers} layers and {n_mtp} MTP modules: "
                            "every stage needs one; lower --pp (DualPipeV runs two stages per rank)")
    sizes = [units // n_stages + (s < units % n_stages) for s in range(n_stages)]
    sizes[-1] -= n_mtp
    while sizes[-1] < 0:            # MTP outweighs the last stage's share: move layers up
        s = max(range(n_stages - 1), key=lambda i: sizes[i])
        sizes[s] -= 1
        sizes[-1] += 1
    starts = [sum(sizes[:s]) for s in range(n_stages)]
    return [range(a, a + n) for a, n in zip(starts, sizes)]


class ModelStage(nn.Module):
    """Stage `index` of `n_stages` of `model`: forward(input_ids) on the first stage, else
    forward(h[, emb]); returns (h[, emb]), or on the last stage (logits, *mtp_logits)."""

    def __init__(self, model: Transformer, layers: range, index: int, n_stages: int):
        super().__init__()
        c = self.config = model.config
        self.index, self.n_stages = index, n_stages
        self.is_first, self.is_last = index == 0, index == n_stages - 1
        self.has_mtp = c.num_nextn_predict_layers > 0
        if n_stages > 1 and c.tie_word_embeddings:
            raise ParallelError("a pipeline cannot split tied embeddings from the head; "
                                "set tie_word_embeddings=false or --pp 1")
        self.model = nn.Module()
        self.model.rotary = model.model.rotary
        if self.is_first:
            self.model.embed_tokens = model.model.embed_tokens
        kept = {str(i): model.model.layers[i] for i in layers}
        if self.is_last:
            L = c.num_hidden_layers
            kept.update({str(i): model.model.layers[i] for i in range(L, L + c.num_nextn_predict_layers)})
            self.model.norm = model.model.norm
            self.lm_head = model.lm_head
        self.model.layers = nn.ModuleDict(kept)
        self.main_blocks = [model.model.layers[i] for i in layers]  # plain list: registered above
        self.mtp_blocks = list(model.mtp_layers) if self.is_last else []
        self.register_buffer("stats", torch.zeros(3), persistent=False)
        self._balance_share: torch.Tensor | None = None   # the last stage's, until loss()
        # [tokens of CE term k for k = 0..n_mtp, sequences]: the global batch's denominators
        self.register_buffer("denominators", torch.ones(c.num_nextn_predict_layers + 2), persistent=False)

    def set_denominators(self, denominators: torch.Tensor) -> None:
        # a term without any counted token has a zero sum: 0/1, not 0/0
        self.denominators.copy_(denominators.clamp_min(1))

    def forward(self, *inputs: torch.Tensor):
        if self.is_first:
            h = emb = self.model.embed_tokens(inputs[0])
        else:
            h, emb = inputs if self.has_mtp else (inputs[0], None)
        B, T = h.shape[:2]
        positions = torch.arange(T, device=h.device).expand(B, T)
        cos, sin = self.model.rotary(positions)
        h, balance = run_blocks(self.main_blocks, h, cos, sin, positions)
        if self.is_last:
            h = self.model.norm(h)
            mtp_logits, mtp_balance = run_mtp(self.mtp_blocks, self.lm_head, h, emb, cos, sin, positions)
            outputs = (self.lm_head(h), *mtp_logits)
            balance = balance + mtp_balance
        else:
            outputs = (h, emb) if self.has_mtp else (h,)
        share = balance * (B / self.denominators[-1])      # mean over sequences -> global share
        with torch.no_grad():
            self.stats[BALANCE] += share.detach()
        if self.is_last:            # loss() adds it (the schedule calls it right after forward)
            self._balance_share = share
        else:
            outputs = (attach_loss(outputs[0], share), *outputs[1:])
        return outputs if len(outputs) > 1 else outputs[0]

    def loss(self, outputs, labels: torch.Tensor) -> torch.Tensor:
        """This micro-batch's share of the global loss: main CE + λ/D·Σ_k CE_k, each a sum over
        tokens divided by the global count (the last stage's `loss_fn`)."""
        logits, *mtp_logits = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        terms = [self._ce_share(logits, labels, 0)]
        terms += [self._ce_share(lg, labels, k) for k, lg in enumerate(mtp_logits, start=1)]
        main = terms[0]
        mtp = (self.config.mtp_loss_weight / len(self.mtp_blocks) * torch.stack(terms[1:]).sum()
               if len(terms) > 1 else torch.zeros_like(main))
        with torch.no_grad():
            self.stats[MAIN] += main.detach()
            self.stats[MTP] += mtp.detach()
        balance, self._balance_share = self._balance_share, None
        return main + mtp + balance

    def _ce_share(self, logits, labels, k: int) -> torch.Tensor:
        local = (labels[:, k + 1:] != -100).sum()
        return shifted_cross_entropy(logits, labels, k) * (local / self.denominators[k])


def denominators(labels: torch.Tensor, n_mtp: int) -> torch.Tensor:
    """Token counts of the main and each MTP cross-entropy term, and the number of rows, of
    one rank's batch [B, T] (float64: exact counts); all-reduce them for the global batch."""
    counts = [(labels[:, k + 1:] != -100).sum() for k in range(n_mtp + 1)]
    return torch.stack([*counts, labels.new_tensor(labels.shape[0])]).to(torch.float64)
