"""Sampling: the parameters of a request and the choice of the next token.

Every request of an engine batch has its own temperature, top-k, top-p and seed, so the
filter works per row (tensors [B]) and the randomness comes from the request, not from
the batch: each request owns a generator (Python's `random.Random`, sequence.py) that gives
one uniform number per sampled token, and the token is the inverse CDF of that row's
filtered distribution at that number, over the vocabulary in its own order (so that a batch
where no row keeps only its top-k or top-p skips the sort those filters need, and a row
draws the same token in either kind of batch). A request therefore draws the same numbers alone or
in any batch, on any device, and the only host work per step is one float per sampled row
(the same tokens wherever its logits are the same: a batch of another size can run other
kernels, whose last bits differ in BF16).

Before the choice, `process_logits` applies what OpenAI and vLLM let a request change
about the distribution, on the device, per row: the repetition penalty (CTRL's: a seen
token's positive logit divided by it, a negative one multiplied), the frequency and presence
penalties (OpenAI's: logit - frequency × count - presence × [count > 0], over the output so
far), the logit bias (added) and a grammar's token mask (-inf outside it). Logprobs are
those of the model's own logits (vLLM's raw logprobs), whatever changed the choice.

`sample_next` is the one-generator, one-setting form that `generate()` uses.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

MAX_LOGPROBS = 20  # top logprobs per token (OpenAI's chat limit; vLLM's default)
# argmax_rows reads a row in chunks of at most this many logits, at least ARGMAX_LEAST
ARGMAX_CHUNK, ARGMAX_LEAST = 2048, 256


def argmax_rows(logits_BV: torch.Tensor) -> torch.Tensor:
    """logits_BV.argmax(-1) (the first of equal maxima; NaN above all) on a GPU in two passes,
    the maximum of each chunk of a row, then of the chunks' (chunked_argmax): torch's argmax of
    one row of V2-Lite's 102,400 logits took 31 us on an H100, 1.2% of a decode step. A
    vocabulary with no divisor in [ARGMAX_LEAST, ARGMAX_CHUNK], or a CPU, takes the one pass."""
    chunk = argmax_chunk(logits_BV.shape[-1]) if logits_BV.device.type == "cuda" else 0
    return chunked_argmax(logits_BV, chunk) if chunk else logits_BV.argmax(-1)


@functools.cache  # (a scan of up to ~1,800 candidates: once a vocabulary, not once a step)
def argmax_chunk(V: int) -> int:
    """The largest divisor of V in [ARGMAX_LEAST, min(ARGMAX_CHUNK, V / 2)], or 0."""
    return next((c for c in range(min(ARGMAX_CHUNK, V // 2), ARGMAX_LEAST - 1, -1) if V % c == 0), 0)


def chunked_argmax(logits_BV: torch.Tensor, chunk: int) -> torch.Tensor:
    """argmax over each row read as chunks of `chunk` logits (V a multiple of it): the first
    chunk holding the row's maximum, then that chunk's first maximum."""
    B, V = logits_BV.shape
    best, where = logits_BV.view(B, V // chunk, chunk).max(-1)
    first = best.argmax(-1, keepdim=True)
    return first.squeeze(-1) * chunk + where.gather(-1, first).squeeze(-1)


@dataclass
class SamplingParams:
    """What to generate for one request (the names of vLLM's / OpenAI's parameters).

    temperature 0 is greedy. max_tokens None: up to the engine's context. A stop string
    ends the output before it (finish_reason "stop"); so does a token of stop_token_ids or
    EOS (unless ignore_eos), which is kept in the token ids but not in the text; reaching
    max_tokens gives finish_reason "length".

    logprobs: per output token its logprob and the `logprobs` most likely tokens' (0: the
    chosen token's only; None: none); prompt_logprobs: the same over the prompt (the first
    token has none), and then max_tokens may be 0 (score the prompt only). Penalties and
    logit_bias (token id -> added to its logit) as in OpenAI's API, repetition_penalty as in
    vLLM (1: off); grammar: an llguidance grammar (grammar.py) the output must match.
    skip_special_tokens: special tokens are left out of the text (not of the token ids); off
    by default here, so that the text decodes every id (the HTTP API turns it on, as vLLM)."""
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None
    skip_special_tokens: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        least = 0 if self.prompt_logprobs is not None else 1
        if self.max_tokens is not None and self.max_tokens < least:
            raise ValueError(f"max_tokens must be at least {least}, got {self.max_tokens}"
                             + ("" if least == 0 else " (0 only to score a prompt: with prompt_logprobs)"))
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in 0..{MAX_LOGPROBS}, got {k}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in -2..2, got {getattr(self, name)}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1: off), got {self.repetition_penalty}")
        for token, bias in self.logit_bias.items():
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias of token {token} must be in -100..100, got {bias}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1
                    or self.logit_bias)

    @property
    def processed(self) -> bool:
        """Whether the logits change before the choice (process_logits)."""
        return self.penalized or self.grammar is not None


class TokenLogprob(NamedTuple):
    """A token, its logprob under the model, and the most likely tokens' [(id, logprob)]."""
    token: int
    logprob: float
    top: list[tuple[int, float]]


def _counts(rows_of_ids: list[list[int]], V: int, device) -> torch.Tensor:
    """[B, V] how often each token occurs in each row's list (one upload, one scatter)."""
    L = max(1, max(map(len, rows_of_ids)))
    ids_BL = torch.tensor([ids + [V] * (L - len(ids)) for ids in rows_of_ids], device=device)
    counts = torch.zeros(len(rows_of_ids), V + 1, device=device)
    return counts.scatter_add_(1, ids_BL, torch.ones_like(ids_BL, dtype=counts.dtype))[:, :V]


def process_logits(logits_BV: torch.Tensor, params: list[SamplingParams], prompts: list[list[int]],
                   outputs: list[list[int]], bitmask_BW: torch.Tensor | None = None) -> torch.Tensor:
    """The logits a row's token is chosen from (module docstring), float32 [B, V]; rows whose
    params change nothing keep theirs. bitmask_BW: a grammar's allowed tokens, bit v % 32 of
    word v // 32 (llguidance's layout, all ones for free rows), on the host."""
    B, V = logits_BV.shape
    dev = logits_BV.device
    out = logits_BV.float().clone()
    if any(p.penalized for p in params):
        rep_B1 = torch.tensor([[p.repetition_penalty] for p in params], device=dev)
        seen = _counts([pr + o if p.repetition_penalty != 1 else [] for p, pr, o in zip(params, prompts, outputs)],
                       V, dev) > 0
        out = torch.where(seen, torch.where(out > 0, out / rep_B1, out * rep_B1), out)
        counts_BV = _counts(outputs, V, dev)
        freq_B1 = torch.tensor([[p.frequency_penalty] for p in params], device=dev)
        pres_B1 = torch.tensor([[p.presence_penalty] for p in params], device=dev)
        out = out - freq_B1 * counts_BV - pres_B1 * (counts_BV > 0)
        biased = [(b, t, v) for b, p in enumerate(params) for t, v in p.logit_bias.items()]
        if biased:
            rows, tokens, values = zip(*biased)
            out.index_put_((torch.tensor(rows, device=dev), torch.tensor(tokens, device=dev)),
                           torch.tensor(values, device=dev), accumulate=True)
    if bitmask_BW is not None:
        bits = torch.arange(32, device=dev, dtype=torch.int32)
        allowed_BV = ((bitmask_BW.to(dev, non_blocking=True)[:, :, None] >> bits) & 1).flatten(1)[:, :V]
        out = out.masked_fill(allowed_BV == 0, float("-inf"))
    return out


def logprob_rows(logits_BV: torch.Tensor, tokens_B: torch.Tensor, k: int) -> torch.Tensor:
    """[B, 2 + 2k] float64: the token, its logprob, the k most likely tokens and theirs, in
    one tensor so that they reach the host with the tokens in one read (ids are exact in
    float64). Logprobs in float32 at least (float64 models keep float64)."""
    lp_BV = logits_BV.to(torch.promote_types(logits_BV.dtype, torch.float32)).log_softmax(-1)
    chosen_B1 = lp_BV.gather(-1, tokens_B[:, None])
    top_lp, top_ids = lp_BV.topk(k, -1)
    return torch.cat([tokens_B[:, None].double(), chosen_B1.double(), top_ids.double(), top_lp.double()], 1)


def unpack_logprobs(row: list[float], k: int) -> TokenLogprob:
    """A row of logprob_rows as a TokenLogprob (its first k top tokens)."""
    width = (len(row) - 2) // 2
    top = [(int(t), lp) for t, lp in zip(row[2: 2 + k], row[2 + width: 2 + width + k])]
    return TokenLogprob(int(row[0]), row[1], top)


def filter_sorted(logits_BV: torch.Tensor, temperature_B: torch.Tensor, top_k_B: torch.Tensor,
                  top_p_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: logits / T sorted descending, outside the top-k and the top-p nucleus -inf.

    Returns (sorted logits [B, V], their token ids [B, V]). top_k 0 is off, else exactly k
    tokens stay (ties at the k-th value broken by the sort's order); top-p keeps the smallest
    prefix whose probability reaches top_p (always at least the first token)."""
    V = logits_BV.shape[-1]
    logits = logits_BV.float() / temperature_B[:, None]
    sorted_BV, order_BV = logits.sort(-1, descending=True)
    k_B = torch.where(top_k_B > 0, top_k_B, V)
    # by position, not by comparing with a gathered k-th value: Inductor (torch 2.11, CUDA)
    # failed to generate that gather fused into the softmax below
    beyond_k = torch.arange(V, device=logits.device) >= k_B[:, None]
    sorted_BV = sorted_BV.masked_fill(beyond_k, float("-inf"))
    p = sorted_BV.softmax(-1)
    # top_p 1 keeps every token: a cumulative sum rounded above 1 would drop the tail's last
    drop = (p.cumsum(-1) - p > top_p_B[:, None]) & (top_p_B[:, None] < 1)
    return sorted_BV.masked_fill(drop, float("-inf")), order_BV


def row_settings(params: list[SamplingParams], device) -> tuple[torch.Tensor, ...]:
    """Per-row tensors of a batch's settings: greedy [B] bool, temperature [B] (1.0 for
    greedy rows), top_k [B], top_p [B]."""
    return (torch.tensor([p.greedy for p in params], device=device),
            torch.tensor([p.temperature or 1.0 for p in params], device=device),
            torch.tensor([p.top_k for p in params], device=device),
            torch.tensor([p.top_p for p in params], device=device))


def filters(params: list[SamplingParams]) -> bool:
    """Whether some row keeps only part of its distribution (top-k or top-p): only then does
    the sampler sort the vocabulary."""
    return any(p.top_k > 0 or p.top_p < 1 for p in params if not p.greedy)


DRAW_BLOCK = 128  # tokens per block of the two-level inverse CDF (draw)


def draw(scaled_BV: torch.Tensor, uniform_B: torch.Tensor) -> torch.Tensor:
    """Per row the inverse CDF of softmax(scaled) at uniform, over the vocabulary in its own
    order: the first token whose cumulative probability exceeds uniform × the total, so never
    a token of probability 0 (-inf), whatever the uniform in [0, 1).

    In two levels, blocks of DRAW_BLOCK tokens and then the tokens of the chosen block: no
    cumulative sum runs along the whole vocabulary, which Inductor would split across
    programs on a GPU (and on torch 2.11 fail to compile, fused with the greedy argmax)."""
    B, V = scaled_BV.shape
    K = DRAW_BLOCK
    n_blocks = -(-V // K)
    # unnormalised weights: the target is a fraction of their total, so no division is needed
    w_BV = (scaled_BV - scaled_BV.amax(-1, keepdim=True)).exp()
    within_BNK = torch.nn.functional.pad(w_BV, (0, n_blocks * K - V)).view(B, n_blocks, K).cumsum(-1)
    cdf_BN = within_BNK[..., -1].cumsum(-1)
    total_B1 = cdf_BN[:, -1:].contiguous()
    target_B1 = uniform_B.to(cdf_BN.dtype)[:, None] * total_B1
    # the first block whose cumulative weight exceeds the target; past the end only when
    # rounding put the target at the total: then the last block with weight
    block_B1 = torch.minimum(torch.searchsorted(cdf_BN, target_B1, right=True), torch.searchsorted(cdf_BN, total_B1))
    before_B1 = torch.where(block_B1 > 0, cdf_BN.gather(1, (block_B1 - 1).clamp(min=0)), 0.0)
    row_BK = within_BNK.gather(1, block_B1[:, :, None].expand(B, 1, K)).squeeze(1)
    rest_B1 = (target_B1 - before_B1).clamp(min=0)
    # the same rule within the block, whose own sum can round below what the blocks' sums left
    token_B1 = torch.minimum(torch.searchsorted(row_BK, rest_B1, right=True),
                             torch.searchsorted(row_BK, row_BK[:, -1:].contiguous()))
    return (block_B1 * K + token_B1).squeeze(-1)


def sample_tensors(logits_BV: torch.Tensor, greedy_B: torch.Tensor, temperature_B: torch.Tensor,
                   top_k_B: torch.Tensor, top_p_B: torch.Tensor, uniform_B: torch.Tensor,
                   filtered: bool = True) -> torch.Tensor:
    """sample_rows on tensors only (no host sync, fixed shapes: a CUDA graph captures it):
    argmax where greedy_B, else the inverse CDF of the row's filtered distribution at uniform_B.
    filtered False skips the top-k / top-p filter (and its sort), for a batch where no row
    filters (`filters`); a row draws the same token either way."""
    if filtered:
        sorted_BV, order_BV = filter_sorted(logits_BV, temperature_B, top_k_B, top_p_B)
        scaled_BV = torch.empty_like(sorted_BV).scatter_(-1, order_BV, sorted_BV)  # back in vocabulary order
    else:
        scaled_BV = logits_BV.float() / temperature_B[:, None]
    return torch.where(greedy_B, argmax_rows(logits_BV), draw(scaled_BV, uniform_B))


def sample_rows(logits_BV: torch.Tensor, params: list[SamplingParams],
                uniforms: list[float]) -> torch.Tensor:
    """One token per row: argmax for greedy rows, else the inverse CDF at uniforms[b]."""
    if all(p.greedy for p in params):
        return argmax_rows(logits_BV)
    dev = logits_BV.device
    return sample_tensors(logits_BV, *row_settings(params, dev), torch.tensor(uniforms, device=dev),
                          filtered=filters(params))


def sample_next(logits_BV: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy when temperature == 0, else softmax(logits / T) restricted to top-k / top-p."""
    if temperature <= 0:
        return logits_BV.argmax(-1)
    B, dev = logits_BV.shape[0], logits_BV.device
    sorted_BV, order_BV = filter_sorted(logits_BV, torch.full((B,), float(temperature), device=dev),
                                        torch.full((B,), top_k, device=dev),
                                        torch.full((B,), float(top_p), device=dev))
    idx = torch.multinomial(sorted_BV.softmax(-1), 1, generator=generator)
    return order_BV.gather(-1, idx).squeeze(-1)
