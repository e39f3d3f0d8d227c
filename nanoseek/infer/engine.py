"""The inference engine: continuous batching over the latent cache, in nano-vllm's shape.

    engine = Engine(model, tokenizer, max_batch=8)
    outs = engine.generate(["2+2="], SamplingParams(max_tokens=16))        # RequestOutputs
    for request_id, new_text, finished, reason in engine.generate(prompts, params, stream=True):
        ...

A server drives the same loop itself: `add_request()` at any time, `step()` to advance,
`abort()` to drop a request at once. Each step reads schedule -> run -> postprocess:

- schedule (scheduler.py): a prefill of newly admitted requests, or decoding of all
  running ones, and the cache slot (row) each holds;
- run (`ModelRunner`): a prefill is one forward over exactly those rows of the cache
  (`cache.select`), other rows untouched, through the expanded attention, then sampling
  (sampling.py); decoding goes through the absorbed MLA path, which reads only the cached
  latent: on a GPU a burst of steps from CUDA graphs (below), else one eager step;
- postprocess (sequence.py): the sampled ids (one `.tolist()` per step or burst, the only
  host sync) appended, stop strings / stop ids / EOS / max_tokens checked, text streamed.

Decode bursts. From CUDA graphs a decode step also chooses its tokens (argmax, or the
sampler at the request's uniform) and writes them and the next positions into its own
inputs, so `decode_burst` steps (default 8) replay back to back and their tokens come to
the host in one `.tolist()`: the host's work of a step, a millisecond of Python that would
otherwise leave the GPU idle between two steps, runs once per burst while the GPU works.
Postprocess then takes each request's burst up to the token that finishes it
(`Sequence.extend`), as it takes a speculative run, so a stop inside the burst ends the
request there; a burst is as long as the batch's
longest max_tokens left allows (at most decode_burst), and a request with fewer left keeps
only those. Without graphs (CPU, or a batch no captured bucket holds) a step is one eager
forward.

Logprobs, penalties, bias, grammars (sampling.py, grammar.py). A request's logprobs are
computed on the device from the logits its tokens came from and read back packed with the
tokens (a burst's with its tokens, after the last replay); prompt logprobs come from the
prefill's forward, one read for the rows that ask. Rows whose logits change before the
choice (penalties, logit_bias, a grammar's mask) step eagerly, one token per step: a
grammar's next mask needs the token just chosen.

Prefix caching (prefix_cache.py, `InferenceConfig(prefix_cache=True)`): a prompt whose first
blocks are still held by a slot, idle or running, starts from them (copied when in another
slot); the rest of it is prefilled in chunks like any prompt.

Memory. The cache is `num_slots` rows of `max_len` tokens. Per token and layer MLA keeps
the latent c_kv (kv_lora_rank values) and the rotated RoPE key (qk_rope_head_dim values),
nothing else, so a token costs (kv_lora_rank + qk_rope_head_dim) × layers × element size
bytes (DeepSeek-V3 in BF16: (512 + 64) × 61 × 2 = 70,272 B). Given `cache_budget_bytes`
the engine holds as many slots as fit (at most max_batch); a request whose prompt plus
max_tokens cannot fit in one slot is refused when it is added, naming the numbers.

Speculative decoding (`speculative_k=K`, speculative.py has the algorithm and its proofs).
The cache then has one more layer, the first MTP module's (`mtp_cache_bytes_per_token`,
reported apart from the main model's `cache_bytes_per_token`), and K - 1 more positions per
slot (a verify writes up to K - 1 positions past the last token a request may hold). Per
slot the runner keeps the drafter state: the MTP module's output at the position before the
pending token, from which the next draft starts. A prefill also runs the MTP layer over the
prompt (position i on h_i and the token after it, the last one paired with the first sampled
token). A decode step is then, for all running rows at once: K drafts from the MTP module,
ONE main-model forward over [last token, d_1..d_K] at each row's own positions, the
acceptance rule per row (greedy: the longest prefix equal to the main model's argmax, then
its next token, so the output equals non-speculative greedy decoding token for token;
sampled: min(1, p/q) and the residual resample, with the request's own uniforms, 2K + 1 per
step), and the MTP layer's catch-up over the accepted positions. Postprocess appends the
1..K+1 tokens of each row one by one, so a stop string, stop id, EOS or max_tokens in the
middle of an accepted run ends the request there and the rest is dropped. Each
RequestOutput carries `speculative` (proposed, accepted, forwards, acceptance_rate,
mean_accepted_length); `engine.speculative_stats()` sums over every request served.
A seeded sampled request draws differently with and without speculation (different uses of
its uniforms), with the same distribution. On a GPU an all-greedy speculative step is one
captured CUDA graph (cuda_graph.GraphSpeculator), replayed in bursts like the plain decode
step (up to decode_burst steps while the request with the most tokens left has room for K + 1
tokens a step); a step with sampled rows runs eagerly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
from collections.abc import Iterator

import torch

from ..kernels import fast_kernels_supported
from ..model import Transformer
from ..model.cache import StaticCache, cache_entry_shapes
from ..model.mla import MLA
from .config import InferenceConfig
from .decode_paths import measured_fused_step
from .fp8_weights import has_fp8_weights
from .grammar import GrammarCompiler, bitmask
from .prefix_cache import PrefixCache
from .sampling import (SamplingParams, TokenLogprob, logprob_rows, process_logits, row_settings, sample_rows,
                       sample_tensors, unpack_logprobs)
from .scheduler import Scheduler
from .sequence import RequestOutput, Sequence, Status, StreamEvent
from .speculative import MTPDrafter, RequestStats, greedy_accept, sampling_probs, speculative_accept_rows


# A compiled step's absorbed attention is one batched GEMM over the whole cache. Where a latent byte
# meets many heads' FLOPs (V3's 128) it beat the kernels at 4K (135 against 261 µs at 16 rows, and 134
# against 183 with 15 of them at 1K); at 32K they won (773 against 787 µs at 16 full rows, 223 against
# 787 with 15 short ones). At 16 heads (V2-Lite) the kernels won from 32K by 1.3-12x, and lost only
# at 4K with one row, 34 against 31 µs (H100, benchmarks/results/h100_attention/captured).
WIDE_HEADS, WIDE_CACHE = 64, 32768
# the widest latent whose float32 cache the kernels' launches fit in an SM's shared memory (the GPU
# tests' 32-wide one does; V3's 512-wide asked 272 KB of an H100's 227)
FLOAT32_LATENT = 64


def decode_attention(config: InferenceConfig, model: Transformer, cache_len: int, device: torch.device,
                     speculative_k: int = 0, cache_dtype: torch.dtype = torch.bfloat16):
    """The MLA decode attention InferenceConfig.decode_attention chooses (None: the model's
    absorbed attention); "kernel" on a model the kernels cannot take says why. auto takes the
    kernels where the fused step's kernels run by default (fast_kernels_supported: a Hopper+
    GPU, a 16-bit cache; their launches are sized for one, and at V3's widths a float32 cache
    asks more shared memory than an SM has) for caches over SHORT_CACHE positions, and for a
    compiled step of WIDE_HEADS or more heads from WIDE_CACHE on. Without
    speculation the cache's last position is the padding rows' of a captured step (no
    request's token is fed there), so their attention reads that position only."""
    from .fused import SHORT_CACHE
    from .latent_attention import LatentDecodeAttention
    why = LatentDecodeAttention.unsupported(model.config, model)
    if config.decode_attention == "kernel":
        if why:
            raise ValueError(f"decode_attention='kernel': the decode attention kernels do not take this model: "
                             f"{why}; use decode_attention='torch'")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"decode_attention='kernel': the decode attention kernels run on a GPU (or in "
                             f"Triton's interpreter, TRITON_INTERPRET=1), not on {device.type}; use "
                             f"decode_attention='torch'")
        wide = model.config.kv_lora_rank > FLOAT32_LATENT
        if device.type == "cuda" and cache_dtype not in (torch.bfloat16, torch.float16) and wide:
            raise ValueError(f"decode_attention='kernel': on a GPU the decode attention kernels take a 16-bit cache "
                             f"at a latent {model.config.kv_lora_rank} wide (a {str(cache_dtype).removeprefix('torch.')} "
                             f"one asks more shared memory than an SM has); run the model in bfloat16 or use "
                             f"decode_attention='torch'")
    elif (config.decode_attention == "torch" or why or cache_len <= SHORT_CACHE
          or not fast_kernels_supported(device, cache_dtype)):
        return None
    elif (config.compile and config.cuda_graphs and model.config.num_attention_heads >= WIDE_HEADS
          and cache_len < WIDE_CACHE):
        return None
    return LatentDecodeAttention(model.config, cache_len, config.fused_launch, -1 if speculative_k else cache_len - 1)


class ModelRunner:
    """Forward passes over rows of the engine's cache: prefill and decode return next-token
    logits [n, V]; with speculative_k, draft_prompts() follows each prefill and speculate()
    replaces decode (draft, verify, accept, MTP catch-up in one call)."""

    def __init__(self, model: Transformer, cache: StaticCache, autocast: torch.dtype | None,
                 config: InferenceConfig, speculative_k: int = 0, fused_rows: int = 0):
        """fused_rows: config.fused_decode_rows resolved (decode_paths.measured_fused_step)."""
        self.model, self.cache, self.autocast = model, cache, autocast
        self.prefill_chunk = config.prefill_chunk
        self.device = model.model.embed_tokens.weight.device
        # the MLA decode attention of this engine's forwards only (set and put back around each:
        # another engine or generate() on the same model must not get this cache's launch)
        self.attention_layers = [m for m in model.modules() if isinstance(m, MLA)]
        self.decode_attend = decode_attention(config, model, cache.max_len, self.device, speculative_k,
                                              cache.layers[0][0].dtype)
        self.k = speculative_k
        if self.k:
            # per slot: the MTP module's output at the position before the pending token
            self.draft_h = torch.zeros(cache.num_slots, model.config.hidden_size, device=self.device,
                                       dtype=model.model.embed_tokens.weight.dtype)
            self.prompt_states = None
        self.graphs = self.spec_graphs = None
        if config.cuda_graphs and self.device.type == "cuda":
            from .cuda_graph import GraphDecoder, GraphSpeculator
            if self.k:
                self.spec_graphs = GraphSpeculator(self, compile=config.compile)
            else:
                self.graphs = GraphDecoder(model, cache, autocast, compile=config.compile, fused_rows=fused_rows,
                                           fused_launch=config.fused_launch,
                                           compile_options=config.compile_options)

    @contextlib.contextmanager
    def _context(self):
        # Module.eval() walks every submodule, which takes longer on the host than a small
        # decode step on the GPU, so the mode is switched only when it must be
        was_training = self.model.training
        if was_training:
            self.model.eval()
        before = self._attend_with(self.decode_attend)
        # cache_enabled=False: autocast's cache of bf16 weight copies lives only as long as the
        # context, so a CUDA graph captured inside it would read freed copies (garbage or an
        # illegal memory access) that never see optimizer updates (GRPO rollouts); without the
        # cache the casts are kernels of the graph reading the live float32 weights
        amp = (torch.autocast(self.device.type, dtype=self.autocast, cache_enabled=False) if self.autocast
               else contextlib.nullcontext())
        try:
            with torch.no_grad(), amp:
                yield
        finally:
            self._attend_with(before)
            if was_training:
                self.model.train()

    def _attend_with(self, attend):
        """Every MLA layer's decode attention set to `attend`; returns the one they had (a loop
        over the layers only when it changes: this runs around every forward)."""
        layers = self.attention_layers
        before = layers[0].decode_attention if layers else None
        if before is not attend:
            for m in layers:
                m.decode_attention = attend
        return before

    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Prompts right-padded to the longest; a row's padding lands at positions beyond
        its prompt, which it never reads and its first decode step overwrites. A prompt whose
        first cached_tokens are in the cache already (prefix_cache.py; copied into its slot
        first when they are in another) is computed from there on. A remainder longer than
        prefill_chunk goes through in chunks: each chunk's tokens attend to the cache's
        positions up to the chunk's end, so attention holds chunk x context scores, not
        context^2. Rows that ask for prompt logprobs get them here (Sequence.prompt_logprobs),
        chunk by chunk from the same forwards; the scheduler gives those rows no cached prefix."""
        for s in seqs:
            if s.copy_from is not None:
                self.cache.copy_prefix(s.copy_from, s.slot, s.cached_tokens)
        starts = [s.cached_tokens for s in seqs]
        lens = [len(s.prompt_ids) - start for s, start in zip(seqs, starts)]  # tokens to compute
        T = max(lens)
        ids = torch.tensor([s.prompt_ids[start:] + [0] * (T - n) for s, start, n in zip(seqs, starts, lens)],
                           device=self.device)
        # padding of a row that starts late may run past the cache: held at its last position
        positions = (torch.tensor(starts, device=self.device)[:, None] + torch.arange(T, device=self.device)
                     ).clamp(max=self.cache.max_len - 1)
        slots = [s.slot for s in seqs]
        last = [n - 1 for n in lens]
        scored = {b: [] for b, s in enumerate(seqs) if s.params.prompt_logprobs is not None}
        with self._context():
            h_D, hidden = [None] * len(seqs), []  # per row, the hidden state at its last token
            for start, end in self._chunks(T):
                view = self.cache.select(slots, kv_len=min(max(starts) + end, self.cache.max_len))
                out = self.model(ids[:, start:end], positions=positions[:, start:end], cache=view, absorb=False,
                                 logits_to_keep=1)
                for row in (r for r, p in enumerate(last) if start <= p < end):  # rows whose prompt ends here
                    h_D[row] = out.hidden_states[row, last[row] - start]
                for b, rows in scored.items():  # position i predicts token i + 1; the last one, an output
                    stop = min(end, last[b])
                    if stop > start:
                        rows.append(self.score_prompt(out.hidden_states[b, : stop - start], ids[b, start + 1: stop + 1],
                                                      seqs[b].params.prompt_logprobs))
                if self.k:
                    hidden.append(out.hidden_states)
            if self.k:  # for draft_prompts(), once the first tokens are sampled
                self.prompt_states = (slots, ids, positions, torch.cat(hidden, 1), last)
            for b, rows in scored.items():  # one read per row that asked
                host = torch.cat(rows).tolist() if rows else []
                seqs[b].prompt_logprobs = [None] + [unpack_logprobs(r, seqs[b].params.prompt_logprobs) for r in host]
            return self.model.lm_head(torch.stack(h_D))

    def _chunks(self, T: int) -> list[tuple[int, int]]:
        return [(start, min(T, start + self.prefill_chunk)) for start in range(0, T, self.prefill_chunk)]

    def score_prompt(self, hidden_TD: torch.Tensor, target_T: torch.Tensor, k: int, chunk: int = 512) -> torch.Tensor:
        """logprob_rows of the tokens target_T that the positions of hidden_TD predict, with k
        top tokens; the head runs over `chunk` positions at a time, so a long prompt never
        holds its whole [T, V] logits."""
        return torch.cat([logprob_rows(self.model.lm_head(hidden_TD[i: i + chunk]), target_T[i: i + chunk], k)
                          for i in range(0, len(target_T), chunk)])

    def draft_prompts(self, seqs: list[Sequence], first_n: torch.Tensor) -> None:
        """Speculative: after a prefill, the MTP layer over the prompts (in the prefill's
        chunks), position i on (h_i, x_{i+1}) with the sampled first token after the last one;
        its output there is the state the first draft starts from."""
        slots, ids, positions, hidden, last = self.prompt_states
        self.prompt_states = None
        last_n = torch.tensor(last, device=self.device)
        next_ids = torch.cat([ids[:, 1:], ids[:, :1]], 1).scatter(1, last_n[:, None], first_n[:, None])
        with self._context():
            for start, end in self._chunks(ids.shape[1]):
                drafter = MTPDrafter(self.model, self.cache.select(slots, kv_len=end))
                drafter.observe(hidden[:, start:end], next_ids[:, start:end], positions[:, start:end],
                                (last_n - start).clamp(0, end - start - 1), absorb=False)
                for row in (r for r, p in enumerate(last) if start <= p < end):
                    self.draft_h[slots[row]] = drafter.h_BD[row].to(self.draft_h.dtype)

    def draft(self, seqs: list[Sequence], drafter: MTPDrafter, pending_pos_B: torch.Tensor,
              sampling: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """K drafts per row [B, K] and, when some row samples, the distributions they were
        drawn from [B, K, V]: greedy rows take the MTP head's argmax, sampled rows its
        filtered distribution (the request's own temperature / top-k / top-p) at their
        uniforms. sampling: None for an all-greedy batch, else the rows' settings
        (row_settings) and their draft uniforms [B, K]."""
        if sampling is None:
            return drafter.propose(pending_pos_B, self.k)  # the drafter's own rule: argmax
        greedy_B, *settings, u_BK = sampling

        def choose(logits_BV, j):
            return (sample_tensors(logits_BV, greedy_B, *settings, u_BK[:, j]),
                    sampling_probs(logits_BV, *settings))
        return drafter.propose(pending_pos_B, self.k, choose)

    def speculate(self, seqs: list[Sequence], uniforms: list[list[float]]) -> list[list[int]]:
        """One speculative decode step of `seqs` (module docstring). uniforms: per row 2K + 1
        numbers (K for the drafts, K for keeping them, one for the token after them; unused by
        greedy rows). Returns per row [a, x_1..x_{K+1}]: a drafts accepted, so x_1..x_{a+1}
        are the new tokens (the rest repeats x_{a+1}). The eager step: an all-greedy batch
        runs from a captured graph where one fits (speculate_burst)."""
        k, dev = self.k, self.device
        slots = [s.slot for s in seqs]
        sampled = not all(s.params.greedy for s in seqs)
        if sampled:  # each uploaded once for the drafts, the acceptance and the token after
            greedy_B, *settings = row_settings([s.params for s in seqs], dev)
            u = torch.tensor(uniforms, device=dev)
        rows = torch.tensor(slots, device=dev)
        pending_B = torch.tensor([s.last_token for s in seqs], device=dev)
        pos_B = torch.tensor([s.num_tokens - 1 for s in seqs], device=dev)      # x_{n-1} at n-1
        # drafting writes the MTP layer up to n+K-3, verifying both up to n-1+K
        view = self.cache.select(slots, kv_len=max(s.num_tokens for s in seqs) + k)
        with self._context():
            drafter = MTPDrafter(self.model, view)
            drafter.h_BD = self.draft_h[rows]
            draft_BK, q_BKV = self.draft(seqs, drafter, pos_B, (greedy_B, *settings, u[:, :k]) if sampled else None)
            offsets = torch.arange(k + 1, device=dev)
            verify_pos = pos_B[:, None] + offsets
            out = self.model(torch.cat([pending_B[:, None], draft_BK], 1), positions=verify_pos, cache=view)
            n_acc, nxt = greedy_accept(out.logits.argmax(-1), draft_BK)
            if sampled:  # some row samples: its drafts came with their distributions q
                p_BKV = sampling_probs(out.logits, *settings)
                s_acc, s_nxt = speculative_accept_rows(p_BKV, q_BKV, draft_BK, u[:, k:2 * k], u[:, 2 * k])
                n_acc, nxt = torch.where(greedy_B, n_acc, s_acc), torch.where(greedy_B, nxt, s_nxt)
            return self._accept(drafter, rows, out.hidden_states, draft_BK, n_acc, nxt, verify_pos).tolist()

    def speculate_burst(self, seqs: list[Sequence], n: int) -> list[list[list[int]]] | None:
        """n all-greedy speculative steps from the captured graph, one read-back: per sequence
        n lists in speculate's layout; None where no graph fits (the caller steps once)."""
        slots = [s.slot for s in seqs]
        if self.spec_graphs is None or not self.spec_graphs.fits(slots):
            return None
        with self._context():
            out = self.spec_graphs.speculate_burst(slots, [s.last_token for s in seqs],
                                                   [s.num_tokens - 1 for s in seqs], n)
        return None if out is None else out.transpose(0, 1).tolist()

    def speculate_greedy(self, rows, pending_B: torch.Tensor, pos_B: torch.Tensor, view) -> torch.Tensor:
        """The all-greedy step as tensors only (no host sync, fixed shapes): rows (a slice or
        index tensor of draft_h) -> [B, K + 2], speculate's layout. What GraphSpeculator
        captures; the eager path above computes the same through draft()."""
        k = self.k
        drafter = MTPDrafter(self.model, view)
        drafter.h_BD = self.draft_h[rows]
        draft_BK, _ = drafter.propose(pos_B, k)  # the drafter's own rule: argmax
        verify_pos = pos_B[:, None] + torch.arange(k + 1, device=pos_B.device)
        out = self.model(torch.cat([pending_B[:, None], draft_BK], 1), positions=verify_pos, cache=view)
        n_acc, nxt = greedy_accept(out.logits.argmax(-1), draft_BK)
        return self._accept(drafter, rows, out.hidden_states, draft_BK, n_acc, nxt, verify_pos)

    def _accept(self, drafter, rows, hidden_BTD, draft_BK, n_acc, nxt, verify_pos) -> torch.Tensor:
        """The MTP catch-up over the verified positions; returns [B, K + 2] = [a, x_1..x_{K+1}]."""
        offsets = torch.arange(self.k + 1, device=draft_BK.device)
        # x_n.. = d_1..d_a, t; t again as filler after it (speculative.py, "Fixed shapes")
        new_BK1 = torch.where(offsets < n_acc[:, None], torch.cat([draft_BK, nxt[:, None]], 1), nxt[:, None])
        drafter.observe(hidden_BTD, new_BK1, verify_pos, n_acc)
        self.draft_h[rows] = drafter.h_BD.to(self.draft_h.dtype)
        return torch.cat([n_acc[:, None], new_BK1], 1)

    def decode_burst(self, seqs: list[Sequence], n: int, logprobs_k: int | None = None) -> list[list] | None:
        """n decode steps of every row from captured graphs, one read-back: per sequence its n
        next tokens (postprocess keeps those its max_tokens allows); None where no graph fits
        (the caller steps eagerly). A row with fewer tokens left runs on for the rest of the
        burst and its tokens there are dropped: its positions stop at the cache's end, and its slot, which it
        leaves after this step, is written again by the next prefill before it is read. So is
        a row's tail after a stop. Sampled rows draw one uniform per token they may keep.
        logprobs_k: per sequence n rows of sampling.logprob_rows (token, logprob, k best) instead
        of n tokens, read back with them."""
        slots = [s.slot for s in seqs]
        if self.graphs is None or not self.graphs.fits(slots):
            return None
        params = [s.params for s in seqs]
        left = [min(n, s.max_tokens - len(s.output_ids)) for s in seqs]
        sampled = not all(p.greedy for p in params)
        drawn = [[] if p.greedy else [s.uniform() for _ in range(m)] for s, p, m in zip(seqs, params, left)]
        with self._context():
            out = self.graphs.decode_burst(slots, [s.last_token for s in seqs],
                                           [s.num_tokens - 1 for s in seqs], n,
                                           params if sampled else None,
                                           [u + [0.0] * (n - len(u)) for u in drawn] if sampled else None,
                                           logprobs_k)
        if out is None:  # capture failed just now: the eager steps draw these again
            for s, u in zip(seqs, drawn):
                s.unread_uniforms(u)
            return None
        return out.transpose(0, 1).tolist()  # each sequence's extend() keeps what its max_tokens allows

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """The eager decode step (no graph fits, or none runs here): each sequence's newest
        token at its own position; attention reads the first kv_len positions of its row
        (kv_len: the longest sequence of the batch)."""
        ids = torch.tensor([[s.last_token] for s in seqs], device=self.device)
        positions = torch.tensor([[s.num_tokens - 1] for s in seqs], device=self.device)
        view = self.cache.select([s.slot for s in seqs], kv_len=max(s.num_tokens for s in seqs))
        with self._context():
            return self.model(ids, positions=positions, cache=view).logits[:, -1]


class Engine:
    def __init__(self, model: Transformer, tokenizer=None, max_batch: int = 8, max_len: int | None = None,
                 cache_budget_bytes: int | None = None, max_prefill_tokens: int = 8192,
                 speculative_k: int = 0, config: InferenceConfig | None = None):
        """model: any `nanoseek.from_pretrained` model; tokenizer: a ChatTokenizer (or None
        to work in token ids only). max_len: tokens per sequence, prompt + output (default
        the model's max_position_embeddings). max_prefill_tokens: padded prompt tokens one
        prefill step may take (one request is always admitted). speculative_k: K > 0 drafts K
        tokens per step with the model's first MTP module (module docstring). config: the
        fast paths (InferenceConfig: CUDA graphs, compile, the fused step, decode bursts, the
        expert path, which the engine sets on the model, chunked prefill, the prefix cache);
        its defaults when None."""
        cfg = model.config
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        max_len = max_len or cfg.max_position_embeddings
        if not 0 < max_len <= cfg.max_position_embeddings:
            raise ValueError(f"max_len {max_len} must be in 1..{cfg.max_position_embeddings} "
                             "(the model's max_position_embeddings)")
        if speculative_k < 0:
            raise ValueError(f"speculative_k (drafts per step) must be >= 0, got {speculative_k}")
        if speculative_k and len(model.mtp_layers) == 0:
            raise ValueError("speculative decoding drafts with the MTP module: this model has "
                             "num_nextn_predict_layers = 0")
        self.model, self.tokenizer, self.max_len = model, tokenizer, max_len
        self.config = config = config or InferenceConfig()
        self.speculative_k, self.decode_burst = speculative_k, config.decode_burst
        self.device = model.model.embed_tokens.weight.device
        model.set_expert_path(config.experts())
        weight_dtype = model.model.embed_tokens.weight.dtype
        # float32 weights on a GPU run under BF16 autocast; the cache holds what attention computes in
        autocast = torch.bfloat16 if self.device.type == "cuda" and weight_dtype == torch.float32 else None
        self.dtype = autocast or weight_dtype
        layer_bytes = sum(math.prod(shape) for shape in cache_entry_shapes(cfg)) * self.dtype.itemsize
        self.cache_bytes_per_token = layer_bytes * cfg.num_hidden_layers    # the main model's
        self.mtp_cache_bytes_per_token = layer_bytes if speculative_k else 0  # the MTP layer's
        bytes_per_token = self.cache_bytes_per_token + self.mtp_cache_bytes_per_token
        # a verify writes up to K - 1 positions beyond the last a request may hold
        cache_len = max_len + max(speculative_k - 1, 0)
        slot_bytes = bytes_per_token * cache_len
        num_slots = max_batch
        if cache_budget_bytes is not None:
            num_slots = min(max_batch, cache_budget_bytes // slot_bytes)
            if num_slots < 1:
                per_token = f"{self.cache_bytes_per_token:,} bytes per token"
                if speculative_k:
                    per_token = (f"{bytes_per_token:,} bytes per token (main model {self.cache_bytes_per_token:,}"
                                 f" + MTP layer {self.mtp_cache_bytes_per_token:,})")
                raise ValueError(f"a cache budget of {cache_budget_bytes:,} bytes holds no sequence: one slot "
                                 f"of max_len {max_len} tokens"
                                 + (f" + {cache_len - max_len} for drafts" if cache_len > max_len else "")
                                 + f" × {per_token} needs {slot_bytes:,} bytes")
        self.cache = StaticCache(cfg, num_slots, cache_len, dtype=self.dtype, device=self.device,
                                 num_layers=cfg.num_hidden_layers + (1 if speculative_k else 0))
        assert self.cache.nbytes_per_token() == bytes_per_token
        # the fused step where it was measured faster than the compiled step, with the launch it
        # was measured with, unless the config says
        table_dtype = torch.float8_e4m3fn if has_fp8_weights(model) else weight_dtype  # FP8: measured apart
        measured_rows, measured_launch = measured_fused_step(cfg, table_dtype, self.device, cache_len)
        fused_rows = measured_rows if config.fused_decode_rows is None else config.fused_decode_rows
        step_config = config
        if config.fused_launch is None and measured_launch:
            step_config = dataclasses.replace(config, fused_launch=measured_launch)
        self.runner = ModelRunner(model, self.cache, autocast, step_config, speculative_k, fused_rows)
        self.speculative_totals = RequestStats()
        if config.prefix_cache and speculative_k:  # the MTP entry at a prefix's end depends on the next token
            raise ValueError("prefix caching is not available with speculative decoding (speculative_k > 0)")
        prefixes = PrefixCache(num_slots) if config.prefix_cache else None
        self.scheduler = Scheduler(num_slots, max_prefill_tokens, prefixes)
        self.last_step_kind: str | None = None  # the last step's: prefill, decode, or None (nothing ran)
        self.prefilled_tokens = 0  # prompt tokens computed (the rest came from the prefix cache)
        eos = getattr(tokenizer, "eos_id", None)
        self.eos_id = eos if eos is not None else cfg.eos_token_id
        self._ids = itertools.count()
        self._grammars: GrammarCompiler | None = None  # built on the first grammar request

    # ------------------------------------------------------------------ figures
    @property
    def num_slots(self) -> int:
        return self.cache.num_slots

    @property
    def cache_bytes(self) -> int:
        return self.cache.nbytes()

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> Sequence:
        """Queue one request; raises ValueError (naming the numbers) if it cannot fit."""
        seq = self._new_sequence(prompt, params, request_id)
        self.scheduler.add(seq)
        return seq

    def _new_sequence(self, prompt, params, request_id) -> Sequence:
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if self.scheduler.find(request_id) is not None:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids")
            prompt = self.tokenizer.encode(prompt)
        prompt = list(prompt)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        n, vocab = len(prompt), self.model.config.vocab_size
        if n == 0:
            raise ValueError(f"request {request_id}: the prompt has no tokens")
        if not all(0 <= t < vocab for t in prompt):
            raise ValueError(f"request {request_id}: prompt token ids must be in 0..{vocab - 1}")
        context = (f"the context of {self.max_len} tokens per sequence (engine max_len; "
                   f"the model's max_position_embeddings is {self.model.config.max_position_embeddings})")
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_len - n
        if n + max_tokens > self.max_len or max_tokens < (0 if params.prompt_logprobs is not None else 1):
            raise ValueError(f"request {request_id}: prompt ({n} tokens) + max_tokens ({max_tokens}) = "
                             f"{n + max_tokens} tokens does not fit in {context}")
        if not all(0 <= t < vocab for t in params.logit_bias):
            raise ValueError(f"request {request_id}: logit_bias token ids must be in 0..{vocab - 1}")
        if self.speculative_k and (params.processed or params.logprobs is not None
                                   or params.prompt_logprobs is not None):
            raise ValueError("logprobs, penalties, logit_bias and grammars are not available with "
                             "speculative decoding; start the engine without speculative_k for them")
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()))
        seq = Sequence(request_id, prompt, params, max_tokens, seed)
        if params.grammar is not None:
            seq.matcher = self.grammars().matcher(params.grammar)
        if self.speculative_k:
            seq.speculative = RequestStats()
        return seq

    def grammars(self) -> GrammarCompiler:
        """The compiler of grammar requests for this engine's tokenizer (built once)."""
        if self.tokenizer is None:
            raise ValueError("grammar-constrained decoding needs the engine's tokenizer")
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.model.config.vocab_size, self.eos_id)
        return self._grammars

    def abort(self, request_id: str) -> bool:
        """Drop a waiting or running request now (finish_reason "abort"), freeing its slot."""
        seq = self.scheduler.find(request_id)
        if seq is None:
            return False
        self.scheduler.finish(seq)
        seq.finish_reason = "abort"
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def speculative_stats(self) -> dict | None:
        """Over every request this engine has decoded: k, drafts proposed and accepted,
        verifying forwards, acceptance_rate and mean_accepted_length (tokens per forward);
        None without speculative decoding."""
        if not self.speculative_k:
            return None
        return dict(k=self.speculative_k, **self.speculative_totals.as_dict())

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[StreamEvent]:
        """schedule -> run -> postprocess; one event per request that ran this step."""
        scheduled = self.scheduler.schedule()
        self.last_step_kind = None if scheduled is None else scheduled[0]  # what /metrics counts it as
        if scheduled is None:
            return []
        kind, seqs = scheduled
        if kind == "decode" and self.speculative_k:
            return self._speculative_step(seqs)
        params = [s.params for s in seqs]
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        k = max(wanted) if wanted else None  # top logprobs computed for the batch: the most any row asks
        # from the graphs where they run: n steps, each row to its own max_tokens; a row whose
        # logits change before the choice (penalties, bias, grammar) steps eagerly, with its batch
        if kind == "decode" and not any(p.processed for p in params):
            n = min(self.decode_burst, max(s.max_tokens - len(s.output_ids) for s in seqs))
            runs = self.runner.decode_burst(seqs, n, k)
            if runs is not None:
                return self._postprocess(seqs, *self._unpack(seqs, runs, k))
        if kind == "prefill":
            logits = self.runner.prefill(seqs)
            self.prefilled_tokens += sum(len(s.prompt_ids) - s.cached_tokens for s in seqs)
            if self.scheduler.prefix_cache is not None:
                for seq in seqs:
                    self.scheduler.prefix_cache.record(seq.slot, seq.prompt_ids)
        else:
            logits = self.runner.decode(seqs)
        chosen_from = logits
        if any(p.processed for p in params):
            mask = None
            if any(s.matcher is not None for s in seqs):
                mask = bitmask(len(seqs), logits.shape[-1])
                for b, seq in enumerate(seqs):
                    if seq.matcher is not None:
                        seq.matcher.fill(mask, b)
            chosen_from = process_logits(logits, params, [s.prompt_ids for s in seqs],
                                         [s.output_ids for s in seqs], mask)
        uniforms = [0.0 if p.greedy else s.uniform() for s, p in zip(seqs, params)]
        tokens_n = sample_rows(chosen_from, params, uniforms)
        if kind == "prefill" and self.speculative_k:
            self.runner.draft_prompts(seqs, tokens_n)
        if k is None:
            return self._postprocess(seqs, [[t] for t in tokens_n.tolist()])
        rows = logprob_rows(logits, tokens_n, k).tolist()  # the tokens and their logprobs: one read
        return self._postprocess(seqs, *self._unpack(seqs, [[r] for r in rows], k))

    @staticmethod
    def _unpack(seqs: list[Sequence], runs: list[list], k: int | None):
        """Runs of tokens, or with k runs of logprob_rows: (tokens, TokenLogprobs or None) per sequence."""
        if k is None:
            return runs, [None] * len(runs)
        tokens = [[int(r[0]) for r in run] for run in runs]
        logprobs = [None if s.params.logprobs is None else [unpack_logprobs(r, s.params.logprobs) for r in run]
                    for s, run in zip(seqs, runs)]
        return tokens, logprobs

    def _speculative_step(self, seqs: list[Sequence]) -> list[StreamEvent]:
        k = self.speculative_k
        steps = None  # per sequence, the speculative steps' [a, x_1..x_{K+1}]
        if all(s.params.greedy for s in seqs):  # from the captured graph where one fits
            # a step adds at most K + 1 tokens: the burst stays within the longest max_tokens
            # left; a request with less ends inside it and runs on at positions held at the
            # cache's end (GraphSpeculator), its tokens and statistics there dropped
            n = min(self.decode_burst, max((s.max_tokens - len(s.output_ids)) // (k + 1) for s in seqs))
            steps = self.runner.speculate_burst(seqs, max(n, 1))
        if steps is None:
            uniforms = [[0.0] * (2 * k + 1) if s.params.greedy else [s.uniform() for _ in range(2 * k + 1)]
                        for s in seqs]
            steps = [[run] for run in self.runner.speculate(seqs, uniforms)]
        before = [len(s.output_ids) for s in seqs]
        events = self._postprocess(seqs, [[t for run in runs for t in run[1: run[0] + 2]] for runs in steps])
        for seq, runs, start in zip(seqs, steps, before):
            # the steps the request took a token from, each counted in full even where a stop or
            # max_tokens cuts its run short; steps after the request ended are not counted
            taken, offset = len(seq.output_ids) - start, 0
            for run in runs:
                if offset >= taken:
                    break
                seq.speculative.add(k, run[0])
                self.speculative_totals.add(k, run[0])
                offset += run[0] + 1
        return events

    def _postprocess(self, seqs: list[Sequence], runs: list[list[int]],
                     logprobs: list[list[TokenLogprob] | None] | None = None) -> list[StreamEvent]:
        """Append each sequence's new tokens in order, up to the one that finishes it."""
        events = []
        for seq, run, lps in zip(seqs, runs, logprobs or [None] * len(seqs)):
            events.append(seq.extend(run, self.tokenizer, self.eos_id, lps))
            if seq.finished:
                self.scheduler.finish(seq)
        return events

    def generate(self, prompts: list[str | list[int]] | str, params: SamplingParams | list | None = None,
                 stream: bool = False) -> list[RequestOutput] | Iterator[StreamEvent]:
        """Run prompts to completion (one SamplingParams for all, or one each).

        stream=False: a RequestOutput per prompt, in order. stream=True: an iterator of
        StreamEvent(request_id, new_text, finished, finish_reason) as text becomes stable;
        closing it early aborts what is left. Other requests in the engine advance too."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        seqs = [self._new_sequence(p, sp, None) for p, sp in zip(prompts, params)]  # all valid first
        for seq in seqs:
            self.scheduler.add(seq)
        if stream:
            return self._stream(seqs)
        while any(not s.finished for s in seqs):
            self.step()
        return [s.output() for s in seqs]

    def _stream(self, seqs: list[Sequence]) -> Iterator[StreamEvent]:
        mine = {s.request_id for s in seqs}
        try:
            while any(not s.finished for s in seqs):
                for event in self.step():
                    if event.request_id in mine and (event.new_text or event.finished):
                        yield event
        finally:
            for seq in seqs:
                if seq.status is not Status.FINISHED:
                    self.abort(seq.request_id)
