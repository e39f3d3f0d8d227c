"""MTP speculative decoding (DeepSeek-V3 §5.4.3): the MTP module drafts, the main model verifies.

A row's sequence is x_0..x_{n-1}, where x_{n-1} was sampled but has not yet been through
the main model (so the main cache holds positions 0..n-2). One step:

    draft    d_1 = MTP(h_{n-2}, Emb(x_{n-1}))       at position n-2
             d_j = MTP(g_{j-1}, Emb(d_{j-1}))       at position n+j-3,  j = 2..k
    verify   main model over [x_{n-1}, d_1..d_k] at positions n-1..n-1+k, ONE forward:
             p_0..p_k (p_j scores the token after d_j) and the hidden states h_{n-1..n-1+k}
    accept   a of the k drafts (0..a..k), then one token t from p_a: 1..k+1 new tokens
    catch up MTP over positions n-1..n-1+a on (h_i, Emb(x_{i+1})), x_{n+a} = t; its output
             at the last of them is the next step's h for d_1; n <- n + a + 1

h is the main model's final-normed hidden state (what the MTP module consumes as h^0 in
training, see model/mtp.py) and g_j = shared_head.norm(MTP output) is the module's own
final-normed state, the one its head scores.

Depth k > 1. V3 trains one module (D = 1) that predicts one token further. For more drafts
we apply that same module again, one position further on, to its own output and its own
draft (EAGLE's feature-level recursion): g at position i has seen tokens up to i+1 and
scores x_{i+2}, the role h_{i+1} plays for the main model. The module was never trained on
its own outputs, so acceptance falls with depth; verification makes that a question of speed,
never of correctness. A checkpoint with D > 1 modules still drafts with module 1 only.

Acceptance (Leviathan et al. 2023; Chen et al. 2023). Greedy: the longest prefix of drafts
equal to the main model's argmax, then the argmax after it, so the output is plain greedy
decoding token for token. Sampled: draft d_j, drawn from q_j, is kept with probability
min(1, p_j(d_j) / q_j(d_j)); at the first rejection a token is drawn from
norm(max(0, p_j - q_j)) and the step ends; if all k are kept, one more comes from p_k. Each
emitted token is then distributed exactly as p, whatever q is. q and p use the same
temperature / top-k / top-p transform, so both are the distributions actually sampled from.

Caches. Both the main layers and the MTP layer write their cache at the positions they run
at, and attention at position q reads only slots <= q (model/cache.py). Before a step the
main cache is right at 0..n-2 and the MTP cache at 0..n-3; drafting writes the MTP slot
n-2 correctly and n-1..n+k-3 from drafts; verification writes main slots n-1..n-1+k. After
accepting a, main slots 0..n-1+a hold accepted tokens, and the catch-up rewrites the MTP
slots n-1..n-1+a from the true hidden states: both are right up to the new n - 2 (MTP
slot new n - 2 is the next draft's own). Every slot beyond holds a rejected draft or prompt
padding, and the next step writes it before any query at or after it reads it.

Fixed shapes. The catch-up always runs over the k+1 verified positions, the row's token t
at index a and t again as filler after it: the filler writes slots beyond the new n - 2,
which the argument above already covers. Every forward is [B, k+1] or [B, 1], whatever
each row accepted, so rows of one batch advance at their own speed without a host sync in
any forward (the host reads the accepted tokens once per step to emit them).

`speculative_generate` below is the self-contained loop over one batch; the engine
(engine.py) runs the same step over its cache slots with per-request sampling settings and
per-request uniforms (`speculative_accept_rows`), so requests join and leave between steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..model import StaticCache, Transformer
from .generate import check_prompts
from .sampling import filter_sorted, sample_next


# ------------------------------------------------------------------------- the rule
def sampling_probs(logits: torch.Tensor, temperature, top_k=0, top_p=1.0) -> torch.Tensor:
    """The distribution sample_next / sample_rows draw from, [..., V] float32, in vocabulary order.

    temperature, top_k, top_p: numbers, or tensors [B] of per-row settings for logits [B, ..., V]."""
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    N, dev = flat.shape[0], flat.device

    def per_row(x, dtype):
        x = torch.as_tensor(x, dtype=dtype, device=dev)
        return x.expand(N) if x.dim() == 0 else x.repeat_interleave(N // x.shape[0])

    sorted_NV, order_NV = filter_sorted(flat, per_row(temperature, torch.float32), per_row(top_k, torch.long),
                                        per_row(top_p, torch.float32))
    probs = torch.zeros_like(sorted_NV).scatter_(-1, order_NV, sorted_NV.softmax(-1))
    return probs.reshape(logits.shape)


def sample_at(probs_BV: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    """The inverse CDF of each row's distribution (vocabulary order) at u_B in [0, 1)."""
    cdf_BV = probs_BV.float().cumsum(-1)
    # the first index whose cdf reaches a target > 0 has positive probability
    target_B1 = (u_B.to(cdf_BV.dtype)[:, None] * cdf_BV[:, -1:]).clamp_min(torch.finfo(cdf_BV.dtype).tiny)
    return torch.searchsorted(cdf_BV, target_B1).clamp(max=cdf_BV.shape[-1] - 1)[:, 0]


def greedy_accept(target_BK1: torch.Tensor, draft_BK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """target [B, k+1] = the main model's argmax after x_{n-1}, d_1, .., d_k.

    Returns (drafts accepted [B], the token after them [B])."""
    k = draft_BK.shape[1]
    n_acc = (draft_BK == target_BK1[:, :k]).long().cumprod(-1).sum(-1)
    return n_acc, target_BK1.gather(1, n_acc[:, None])[:, 0]


def speculative_accept(p_probs: torch.Tensor, q_probs: torch.Tensor, draft_tokens: torch.Tensor,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative sampling rule for a batch of rows.

    p_probs [B, k+1, V]: the target's distributions after x_{n-1}, d_1, .., d_k;
    q_probs [B, k, V]: the drafter's, from which draft_tokens [B, k] were drawn.
    Returns (drafts accepted [B], the token after them [B]): drawn from
    norm(max(0, p_a - q_a)) after a rejection at a, from p_k when all k were kept."""
    B, k = draft_tokens.shape
    u = torch.rand(B, k + 1, generator=generator, device=p_probs.device)
    return speculative_accept_rows(p_probs, q_probs, draft_tokens, u[:, :k], u[:, k])


def speculative_accept_rows(p_probs: torch.Tensor, q_probs: torch.Tensor, draft_tokens: torch.Tensor,
                            u_keep_BK: torch.Tensor, u_next_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """speculative_accept with the randomness given: u_keep [B, k] decides the drafts, u_next
    [B] (inverse CDF) the token after them. The engine passes each request's own uniforms,
    so a seeded request draws the same whatever batch it runs in."""
    B, k = draft_tokens.shape
    d = draft_tokens[..., None]
    p_d = p_probs[:, :k].gather(-1, d)[..., 0]
    q_d = q_probs.gather(-1, d)[..., 0]
    keep = u_keep_BK.to(p_d.dtype) * q_d < p_d             # u < p/q, no division by q
    n_acc = keep.long().cumprod(-1).sum(-1)
    rows = torch.arange(B, device=p_probs.device)
    residual = (p_probs - torch.cat([q_probs, torch.zeros_like(q_probs[:, :1])], 1)).clamp_min(0)
    r_BV = residual[rows, n_acc]                            # index k: p_k itself
    # mass 0 only when p_a == q_a up to rounding, where a rejection has probability 0 anyway
    r_BV = torch.where(r_BV.sum(-1, keepdim=True) > 0, r_BV, p_probs[rows, n_acc])
    return n_acc, sample_at(r_BV, u_next_B)


# ------------------------------------------------------------------------- drafters
class Drafter(Protocol):
    def observe(self, hidden_BTD: torch.Tensor, next_ids_BT: torch.Tensor, positions_BT: torch.Tensor,
                last_B: torch.Tensor) -> None:
        """Main hidden states h_i at positions [B, T] and the tokens x_{i+1} after them;
        row b's index last_B[b] is the position the next draft starts from."""

    def propose(self, pending_pos_B: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """k drafts [B, k] for the tokens after the one at pending_pos_B (x_{n-1}), and the
        distributions they were drawn from [B, k, V] (None when greedy)."""


class MTPDrafter:
    """Drafts with the model's first MTP module over `cache` (its layer's entries)."""

    def __init__(self, model: Transformer, cache, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, generator: torch.Generator | None = None):
        if len(model.mtp_layers) == 0:
            raise ValueError("speculative decoding drafts with the MTP module: this model has "
                             "num_nextn_predict_layers = 0")
        self.model, self.cache, self.layer = model, cache, model.mtp_layers[0]
        self.temperature, self.top_k, self.top_p, self.generator = temperature, top_k, top_p, generator
        self.h_BD: torch.Tensor | None = None

    def _run(self, h_BTD, ids_BT, positions_BT, absorb=None):
        cos, sin = self.model.model.rotary(positions_BT)
        out, _ = self.layer(h_BTD, self.model.model.embed_tokens(ids_BT), cos, sin, positions_BT, self.cache,
                            absorb)
        return out

    def observe(self, hidden_BTD, next_ids_BT, positions_BT, last_B, absorb=None):
        out_BTD = self._run(hidden_BTD, next_ids_BT, positions_BT, absorb)
        self.h_BD = out_BTD[torch.arange(out_BTD.shape[0], device=out_BTD.device), last_B]

    def propose(self, pending_pos_B, k, choose=None):
        """choose(logits [B, V], j) -> (draft j [B], its distributions [B, V] or None) replaces
        the drafter's own temperature / top-k / top-p / generator (the engine's per-row rule)."""
        drafts, qs, h_BD = [], [], self.h_BD
        for j in range(k):
            if j:
                h_BD = self._run(g_BD[:, None], drafts[-1][:, None], (pending_pos_B + j - 1)[:, None])[:, 0]
            g_BD = self.layer.shared_head.norm(h_BD)
            logits_BV = self.model.lm_head(g_BD)
            if choose is not None:
                d_B, q_BV = choose(logits_BV, j)
                drafts.append(d_B)
                if q_BV is not None:
                    qs.append(q_BV)
            elif self.temperature <= 0:
                drafts.append(logits_BV.argmax(-1))
            else:
                q_BV = sampling_probs(logits_BV, self.temperature, self.top_k, self.top_p)
                drafts.append(torch.multinomial(q_BV, 1, generator=self.generator)[:, 0])
                qs.append(q_BV)
        return torch.stack(drafts, 1), (torch.stack(qs, 1) if qs else None)


# ------------------------------------------------------------------------- statistics
@dataclass
class RequestStats:
    proposed: int = 0   # drafts proposed
    accepted: int = 0   # drafts accepted by the rule
    forwards: int = 0   # verifying forwards of the main model (the prefill is not counted)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verifying forward: the model's own one plus the accepted drafts (1..k+1).
        The last step counts in full even where max_new_tokens or EOS cut it short."""
        return (self.forwards + self.accepted) / self.forwards if self.forwards else 0.0

    def add(self, proposed: int, accepted: int, forwards: int = 1) -> None:
        self.proposed, self.accepted, self.forwards = (self.proposed + proposed, self.accepted + accepted,
                                                       self.forwards + forwards)

    def as_dict(self) -> dict:
        return dict(proposed=self.proposed, accepted=self.accepted, forwards=self.forwards,
                    acceptance_rate=self.acceptance_rate, mean_accepted_length=self.mean_accepted_length)


@dataclass
class SpeculativeStats:
    requests: list[RequestStats] = field(default_factory=list)

    @property
    def total(self) -> RequestStats:
        return RequestStats(sum(r.proposed for r in self.requests), sum(r.accepted for r in self.requests),
                            sum(r.forwards for r in self.requests))

    @property
    def acceptance_rate(self) -> float:
        return self.total.acceptance_rate

    @property
    def mean_accepted_length(self) -> float:
        return self.total.mean_accepted_length

    def as_dict(self) -> dict:
        return dict(total=self.total.as_dict(), requests=[r.as_dict() for r in self.requests])


# ------------------------------------------------------------------------- the loop
@torch.no_grad()
def speculative_generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, k: int = 1,
                         eos_id: int | None = None, temperature: float = 0.0, top_k: int = 0,
                         top_p: float = 1.0, seed: int | None = None, autocast: torch.dtype | None = None,
                         drafter: Drafter | None = None) -> tuple[list[list[int]], SpeculativeStats]:
    """New tokens for each prompt (stopping after eos, which is kept), k drafts per step.

    Greedy output equals `generate(...)`'s token for token; sampled output has its
    distribution. `drafter` replaces the MTP drafter (tests use oracles)."""
    if k < 1:
        raise ValueError(f"k (drafts per step) must be at least 1, got {k}")
    cfg = model.config
    device = next(model.parameters()).device
    B, lens, T = check_prompts(model, prompts, max_new_tokens)
    stats = SpeculativeStats([RequestStats() for _ in range(B)])
    out: list[list[int]] = [[] for _ in range(B)]
    if max_new_tokens < 1:
        return out, stats
    dtype = autocast or next(model.parameters()).dtype
    # the last verify of a row writes up to position len + max_new_tokens - 2 + k
    cache = StaticCache(cfg, B, T + max_new_tokens + k, dtype=dtype, device=device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    drafter = drafter or MTPDrafter(model, cache, temperature, top_k, top_p, generator)
    ids = torch.zeros(B, T, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p, device=device)
    ctx = torch.autocast(device.type, dtype=autocast) if autocast else torch.autocast(device.type, enabled=False)
    done = [False] * B

    def emit(b: int, tokens: list[int]) -> None:
        for t in tokens:
            out[b].append(t)
            if t == eos_id or len(out[b]) == max_new_tokens:
                done[b] = True
                return

    was_training = model.training
    model.eval()
    try:
        with ctx:
            # prefill: the main model over the prompts; the MTP module over (h_i, x_{i+1}), the
            # last prompt position paired with the first sampled token
            positions = torch.arange(T, device=device).expand(B, T)
            o = model(ids, positions=positions, cache=cache)
            rows = torch.arange(B, device=device)
            first = sample_next(o.logits[rows, lens - 1], temperature, top_k, top_p, generator)
            next_ids = torch.cat([ids[:, 1:], ids[:, :1]], 1).scatter(1, (lens - 1)[:, None], first[:, None])
            drafter.observe(o.hidden_states, next_ids, positions, lens - 1)
            for b, t in enumerate(first.tolist()):
                emit(b, [t])
            pending, pos = first, lens.clone()          # x_{n-1} and its position n-1
            offsets = torch.arange(k + 1, device=device)
            while not all(done):
                draft_BK, q_BKV = drafter.propose(pos, k)
                verify_pos = pos[:, None] + offsets
                o = model(torch.cat([pending[:, None], draft_BK], 1), positions=verify_pos, cache=cache)
                if temperature <= 0:
                    n_acc, nxt = greedy_accept(o.logits.argmax(-1), draft_BK)
                else:
                    p_BKV = sampling_probs(o.logits, temperature, top_k, top_p)
                    n_acc, nxt = speculative_accept(p_BKV, q_BKV, draft_BK, generator)
                # x_n.. = d_1..d_a, t; t again as filler after it (see "Fixed shapes")
                new_BK1 = torch.where(offsets < n_acc[:, None], torch.cat([draft_BK, nxt[:, None]], 1), nxt[:, None])
                drafter.observe(o.hidden_states, new_BK1, verify_pos, n_acc)
                active = [not d for d in done]
                for b, (a, toks) in enumerate(zip(n_acc.tolist(), new_BK1.tolist())):
                    if active[b]:
                        s = stats.requests[b]
                        s.proposed, s.accepted, s.forwards = s.proposed + k, s.accepted + a, s.forwards + 1
                        emit(b, toks[: a + 1])
                # a finished row stays where it is, so its (ignored) writes stay inside the cache
                advance = torch.tensor([not d for d in done], device=device)
                pos = torch.where(advance, pos + n_acc + 1, pos)
                pending = nxt
    finally:
        model.train(was_training)
    return out, stats
