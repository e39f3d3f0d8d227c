"""The inference engine: continuous batching over the latent cache, in nano-vllm's shape.

    engine = Engine(model, tokenizer, max_batch=8)
    outs = engine.generate(["2+2="], SamplingParams(max_tokens=16))        # RequestOutputs
    for request_id, new_text, finished, reason in engine.generate(prompts, params, stream=True):
        ...

A server drives the same loop itself: `add_request()` at any time, `step()` to advance,
`abort()` to drop a request at once. Each step reads schedule -> run -> postprocess:

- schedule (scheduler.py): a prefill of newly admitted requests, or one decode step of all
  running ones, and the cache slot (row) each holds;
- run (`ModelRunner`): one forward over exactly those rows of the cache (`cache.select`),
  other rows untouched; prefill through the expanded attention, decode through the
  absorbed MLA path, which reads only the cached latent; then sampling (sampling.py);
- postprocess (sequence.py): the sampled ids (one `.tolist()` per step, the only host
  sync) appended, stop strings / stop ids / EOS / max_tokens checked, text streamed.

Memory. The cache is `num_slots` rows of `max_len` tokens. Per token and layer MLA keeps
the latent c_kv (kv_lora_rank values) and the rotated RoPE key (qk_rope_head_dim values),
nothing else, so a token costs (kv_lora_rank + qk_rope_head_dim) × layers × element size
bytes (DeepSeek-V3 in BF16: (512 + 64) × 61 × 2 = 70,272 B). Given `cache_budget_bytes`
the engine holds as many slots as fit (at most max_batch); a request whose prompt plus
max_tokens cannot fit in one slot is refused when it is added, naming the numbers.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator

import torch

from ..model import Transformer
from ..model.cache import StaticCache, cache_entry_shapes
from .sampling import SamplingParams, sample_rows
from .scheduler import Scheduler
from .sequence import RequestOutput, Sequence, Status, StreamEvent


class ModelRunner:
    """Forward passes over rows of the engine's cache; returns next-token logits [n, V]."""

    def __init__(self, model: Transformer, cache: StaticCache, autocast: torch.dtype | None,
                 cuda_graphs: bool = True):
        self.model, self.cache, self.autocast = model, cache, autocast
        self.device = model.model.embed_tokens.weight.device
        self.graphs = None
        if cuda_graphs and self.device.type == "cuda":
            from .cuda_graph import GraphDecoder
            self.graphs = GraphDecoder(model, cache, autocast)

    @contextlib.contextmanager
    def _context(self):
        was_training = self.model.training
        self.model.eval()
        amp = (torch.autocast(self.device.type, dtype=self.autocast) if self.autocast
               else contextlib.nullcontext())
        try:
            with torch.no_grad(), amp:
                yield
        finally:
            self.model.train(was_training)

    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Prompts right-padded to the longest; a row's padding lands at positions beyond
        its prompt, which it never reads and its first decode step overwrites."""
        lens = [len(s.prompt_ids) for s in seqs]
        T = max(lens)
        ids = torch.tensor([s.prompt_ids + [0] * (T - len(s.prompt_ids)) for s in seqs], device=self.device)
        positions = torch.arange(T, device=self.device).expand(len(seqs), T)
        view = self.cache.select([s.slot for s in seqs], kv_len=T)
        with self._context():
            out = self.model(ids, positions=positions, cache=view, absorb=False, logits_to_keep=1)
            last = torch.tensor(lens, device=self.device) - 1
            h_nD = out.hidden_states[torch.arange(len(seqs), device=self.device), last]
            return self.model.lm_head(h_nD)

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """Each sequence's newest token at its own position; attention reads the first
        kv_len positions of its row (kv_len: the longest sequence of the batch)."""
        if self.graphs is not None:
            with self._context():
                logits = self.graphs.decode([s.slot for s in seqs], [s.last_token for s in seqs],
                                            [s.num_tokens - 1 for s in seqs])
            if logits is not None:
                return logits
        ids = torch.tensor([[s.last_token] for s in seqs], device=self.device)
        positions = torch.tensor([[s.num_tokens - 1] for s in seqs], device=self.device)
        view = self.cache.select([s.slot for s in seqs], kv_len=max(s.num_tokens for s in seqs))
        with self._context():
            return self.model(ids, positions=positions, cache=view).logits[:, -1]


class Engine:
    def __init__(self, model: Transformer, tokenizer=None, max_batch: int = 8, max_len: int | None = None,
                 cache_budget_bytes: int | None = None, max_prefill_tokens: int = 8192,
                 speculative_k: int = 0, cuda_graphs: bool = True):
        """model: any `nanoseek.from_pretrained` model; tokenizer: a ChatTokenizer (or None
        to work in token ids only). max_len: tokens per sequence, prompt + output (default
        the model's max_position_embeddings). max_prefill_tokens: padded prompt tokens one
        prefill step may take (one request is always admitted). cuda_graphs: on a GPU, replay
        the decode step from captured CUDA graphs (cuda_graph.py)."""
        cfg = model.config
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        max_len = max_len or cfg.max_position_embeddings
        if not 0 < max_len <= cfg.max_position_embeddings:
            raise ValueError(f"max_len {max_len} must be in 1..{cfg.max_position_embeddings} "
                             "(the model's max_position_embeddings)")
        if speculative_k:
            try:
                from . import speculative  # noqa: F401
            except ImportError:
                raise ValueError("speculative decoding is not available yet") from None
            raise ValueError("speculative decoding is not wired into the engine yet")
        self.model, self.tokenizer, self.max_len = model, tokenizer, max_len
        self.device = model.model.embed_tokens.weight.device
        weight_dtype = model.model.embed_tokens.weight.dtype
        # float32 weights on a GPU run under BF16 autocast; the cache holds what attention computes in
        autocast = torch.bfloat16 if self.device.type == "cuda" and weight_dtype == torch.float32 else None
        self.dtype = autocast or weight_dtype
        num_layers = cfg.num_hidden_layers
        values_per_token = sum(math.prod(shape) for shape in cache_entry_shapes(cfg)) * num_layers
        self.cache_bytes_per_token = values_per_token * self.dtype.itemsize
        slot_bytes = self.cache_bytes_per_token * max_len
        num_slots = max_batch
        if cache_budget_bytes is not None:
            num_slots = min(max_batch, cache_budget_bytes // slot_bytes)
            if num_slots < 1:
                raise ValueError(f"a cache budget of {cache_budget_bytes:,} bytes holds no sequence: one slot "
                                 f"of max_len {max_len} tokens × {self.cache_bytes_per_token:,} bytes per token "
                                 f"needs {slot_bytes:,} bytes")
        self.cache = StaticCache(cfg, num_slots, max_len, dtype=self.dtype, device=self.device,
                                 num_layers=num_layers)
        assert self.cache.nbytes_per_token() == self.cache_bytes_per_token
        self.runner = ModelRunner(model, self.cache, autocast, cuda_graphs)
        self.scheduler = Scheduler(num_slots, max_prefill_tokens)
        eos = getattr(tokenizer, "eos_id", None)
        self.eos_id = eos if eos is not None else cfg.eos_token_id
        self._ids = itertools.count()

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
        if n + max_tokens > self.max_len or max_tokens < 1:
            raise ValueError(f"request {request_id}: prompt ({n} tokens) + max_tokens ({max_tokens}) = "
                             f"{n + max_tokens} tokens does not fit in {context}")
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()))
        return Sequence(request_id, prompt, params, max_tokens, seed)

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

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[StreamEvent]:
        """schedule -> run -> postprocess; one event per request that ran this step."""
        scheduled = self.scheduler.schedule()
        if scheduled is None:
            return []
        kind, seqs = scheduled
        logits = self.runner.prefill(seqs) if kind == "prefill" else self.runner.decode(seqs)
        uniforms = [0.0 if s.params.greedy else s.uniform() for s in seqs]
        tokens = sample_rows(logits, [s.params for s in seqs], uniforms).tolist()
        events = []
        for seq, token in zip(seqs, tokens):
            events.append(seq.append(token, self.tokenizer, self.eos_id))
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
