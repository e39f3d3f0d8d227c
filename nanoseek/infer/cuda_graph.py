"""CUDA graphs for the decode step and the greedy speculative step (nano-vllm / gpt-fast style).

A decode step of a small batch is hundreds of short kernels; launching them costs more
than running them. So the step is captured once per batch-size bucket (1, 2, 4, 8, 16, 32,
...) and replayed:

- `GraphDecoder`: embedding, every layer's absorbed MLA over the latent cache and the
  routed experts (by the model's expert path: model/moe.py), the head, the token choice
  (argmax, or the sampler at the row's uniform): next-token logits and tokens of each row,
  the tokens and next positions also written into the step's own inputs, so that steps
  replay back to back (a burst).
  Buckets of up to `fused_rows` rows run the fused Triton step (fused.py) in place of the
  model's forward, uncompiled; a fused bucket that fails to capture hands every bucket
  back to the model's step;
- `GraphSpeculator`: a whole greedy MTP speculative step (speculative.py): K drafts from
  the MTP module, the main model's verifying forward over [last token, d_1..d_K], the
  greedy acceptance and the MTP catch-up; out come the accepted count and the new tokens,
  and the last new token and its position go into the step's inputs (bursts again).

With `compile=True` the step is first put through `torch.compile` (Inductor), which fuses
the norms, RoPE, the router's elementwise work and the residual adds into a few Triton
kernels, and the graph then captures the compiled step: fewer, fuller kernels per token.
Compilation happens on first use: the first bucket met static, later ones through one
shape-generic graph (dynamo's automatic dynamic shapes; the size thresholds of the MoE's
decode paths add their guards; the greedy and the sampling decode step are graphs of their
own); the compile cache limit is raised to 64 graphs. The batch-1 decode step (where the
fused step does not take it) has a static compilation of its own, with Inductor's
coordinate-descent tuning, which also turns its one-row matmuls into tuned, fused reductions
(gpt-fast's setting): cuBLAS's small-M GEMMs were the largest item of a batch-1 step.

Shapes are static: the bucket covers cache rows [0, bucket); the absorbed attention reads all
max_len positions of each row, masked by the row's own position, while the decode attention
kernels (InferenceConfig.decode_attention, latent_attention.py) read each row's own; rows of the bucket that
no sequence holds run a dummy token at the cache's last position, which no request's
tokens occupy (a free slot keeps what a prefix cache may reuse: prefix_cache.py); the rows
of requests that end inside a burst run on past their last token for the rest of it
(clamped at the cache's end), where the next request in that slot writes before reading. The scheduler decodes every
running request in each decode step, so no row in the bucket belongs to a sequence that is
left out of the step.

Nothing in a step reads back to the host (the forwards are sync-free by construction), so
capture works; if compiling or capturing fails anyway (an unsupported op on some build),
the runner says so once and falls back: a sampling step whose sampler does not compile to
the compiled forward with the sampler uncompiled, then from compiled to plain capture, from
capture to eager steps.
"""

from __future__ import annotations

import warnings

import torch

from ..model import StaticCache, Transformer
from .sampling import SamplingParams, argmax_rows, filters, logprob_rows, row_settings, sample_tensors

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# the decode step's forms, a key's second part: False greedy, True sampling (with the top-k /
# top-p filter), UNFILTERED sampling where no row filters (no sort of the vocabulary)
UNFILTERED = "unfiltered"


class BucketGraphs:
    """`_step(*static inputs sliced to the bucket)` captured per key, replayed by `run`.

    A key is (bucket, variant): the variant picks a form of the step (the decoder's greedy or
    sampling step), each its own compilation and graph. A step returns its outputs and the
    next values of its inputs (None: unchanged), which `_call` writes after it, outside the
    compiled graph: an opaque op in the graph (the decode attention kernels) that reads an
    input the same graph also writes depends on Inductor ordering that write after it, and a
    copy that would decouple them is one Inductor removes as a no-op."""

    kind = "step"
    tuned_buckets: tuple[int, ...] = ()  # compiled with Inductor's coordinate-descent tuning

    def __init__(self, num_slots: int, device: torch.device, compile: bool = False, capture: bool = True,
                 compile_options: dict | None = None):
        """compile_options: Inductor options added to the tuned buckets' compilation."""
        self.device = device
        self.tuned_options = {"coordinate_descent_tuning": True, **(compile_options or {})}
        self.buckets = [b for b in BUCKETS if b < num_slots] + [num_slots]
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph | None, object]] = {}
        self.pool = None
        self.failed = False          # capture failed: callers step eagerly
        self.capture = capture       # False: run the (compiled) step without a graph (tests, CPU)
        self.compile = compile       # False again if compiling fails
        self._compiled: dict[tuple[str, bool], object] = {}  # (the step's method, tuned bucket or not)
        if compile:
            # a compiled graph per bucket shape and step variant; engines (and step kinds) share the limit
            cfg = torch._dynamo.config
            cfg.cache_size_limit = max(cfg.cache_size_limit, 64)

    def bucket_for(self, rows_needed: int) -> int | None:
        return next((b for b in self.buckets if b >= rows_needed), None)

    def _inputs(self, key: tuple) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _state(self) -> list[torch.Tensor]:
        """Tensors besides the cache that the step writes (restored after the warm-up runs)."""
        return []

    def _step(self, *inputs) -> tuple[object, tuple]:
        """(outputs, the inputs' next values or None each)."""
        raise NotImplementedError

    def _step_for(self, key: tuple):
        """The method that runs key's form of the step."""
        return self._step

    def _compiled_step(self, key: tuple):
        return self._compile(self._step_for(key), key[0] in self.tuned_buckets)

    def _compile(self, fn, tuned: bool):
        """fn (a method of this step) through torch.compile, one compilation per (fn, tuned)."""
        if (fn.__name__, tuned) not in self._compiled:
            if tuned:
                # static, and with coordinate-descent tuning, which also makes Inductor write a
                # one-row matmul (a batch-1 decode's every projection) as a reduction it fuses
                # with its neighbours and tunes, instead of a cuBLAS GEMM call
                compiled = torch.compile(fn, fullgraph=True, dynamic=False, options=dict(self.tuned_options))
            else:
                # the first bucket met compiles static, the next one shape-generic for all the
                # others (dynamo's automatic dynamic shapes): two compilations, not one per bucket
                compiled = torch.compile(fn, fullgraph=True, dynamic=None)
            self._compiled[fn.__name__, tuned] = compiled
        return self._compiled[fn.__name__, tuned]

    def _compiles(self, key: tuple) -> bool:
        """Whether this key's step goes through torch.compile (when compiling at all)."""
        return True

    def _call(self, key: tuple):
        inputs = self._inputs(key)
        out = None
        if self.compile and self._compiles(key):
            try:
                out, nexts = self._compiled_step(key)(*inputs)
            except Exception as e:  # noqa: BLE001 — any compiler failure: plain steps, loudly, once
                if self._plainer_compile(key, e):
                    return self._call(key)
                warnings.warn(f"torch.compile of the {self.kind} step failed ({type(e).__name__}: "
                              f"{str(e)[:300]}); capturing the uncompiled step")
                self.compile = False
        if out is None:
            out, nexts = self._step_for(key)(*inputs)
        for dst, value in zip(inputs, nexts):
            if value is not None:
                dst.copy_(value)
        return out

    def _plainer_compile(self, key: tuple, error: Exception) -> bool:
        """After key's compiled step failed: whether a plainer compiled form may run instead
        (then _call tries again), or not (every step runs uncompiled)."""
        return False

    def _warm_up(self, key: tuple) -> None:
        """Two runs before capture (compilation, lazy inits and autotuning outside the graph),
        then the state they advanced put back."""
        state = [t.clone() for t in self._state()]
        try:
            for _ in range(2):
                self._call(key)
        finally:  # also when a warm-up fails: the eager steps that follow read this state
            for t, saved in zip(self._state(), state):
                t.copy_(saved)

    def _capture(self, key: tuple) -> None:
        if not self.capture:  # the warm-ups still run, so CPU tests see what they leave behind
            self._warm_up(key)
            self.graphs[key] = (None, None)
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._warm_up(key)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._call(key)
        self.pool = graph.pool()
        self.graphs[key] = (graph, out)

    def run(self, key: tuple):
        """The step's outputs for the static inputs as they are now; None if capture failed."""
        if self.failed:
            return None
        if key not in self.graphs:
            try:
                self._capture(key)
            except Exception as e:  # noqa: BLE001 — fall back, loudly, once
                if self._recover(key, e):
                    return self.run(key)
                warnings.warn(f"CUDA graph capture of the {self.kind} step failed "
                              f"({type(e).__name__}: {str(e)[:300]}); stepping eagerly")
                self.failed = True
                return None
        graph, out = self.graphs[key]
        if graph is None:
            return self._call(key)
        graph.replay()
        return out

    def _recover(self, key: tuple, error: Exception) -> bool:
        """After a failed capture of key: whether a plainer form of the step may capture
        instead (then run() tries again), or not (every step goes eager)."""
        return False

    def fits(self, slots: list[int]) -> bool:
        """Whether a captured step can run these rows (else the caller steps eagerly)."""
        return not self.failed and self.bucket_for(max(slots) + 1) is not None

    def load(self, buffers: list[torch.Tensor], slots: list[int], *values: list,
             fill: list[float] | None = None) -> int:
        """Write values[i] at rows `slots` of buffers[i] (fill[i], default 0, elsewhere), all
        of one dtype in one upload; returns the bucket."""
        bucket = self.bucket_for(max(slots) + 1)
        host = torch.zeros(len(buffers), bucket, dtype=buffers[0].dtype)
        if fill is not None:
            host[:] = torch.tensor(fill, dtype=host.dtype)[:, None]
        idx = torch.tensor(slots)
        for i, vals in enumerate(values):
            host[i, idx] = torch.as_tensor(vals, dtype=host.dtype)
        host = host.to(self.device, non_blocking=True)
        for i, buf in enumerate(buffers):
            buf.view(buf.shape[0], -1)[:bucket, 0].copy_(host[i])
        return bucket

    def rows(self, out: torch.Tensor, slots: list[int], dim: int = 0) -> torch.Tensor:
        """out's entries (along dim) for `slots`, in their order."""
        if slots == list(range(len(slots))):
            return out.narrow(dim, 0, len(slots))
        return out.index_select(dim, torch.tensor(slots, device=out.device))


class GraphDecoder(BucketGraphs):
    """The decode step: logits and the chosen token of every bucket row. Each row's token and
    next position also go into the step's own inputs, so `decode_burst` replays it n times
    back to back and reads the n tokens to the host once."""

    kind = "decode"
    tuned_buckets = (1,)  # one row: every matmul has M = 1

    def __init__(self, model: Transformer, cache: StaticCache, autocast: torch.dtype | None,
                 compile: bool = False, capture: bool = True, fused_rows: int = 0,
                 fused_launch: dict | None = None, compile_options: dict | None = None):
        """fused_rows: buckets of up to this many rows run the fused Triton step (fused.py)
        instead of the model's forward, uncompiled, where the model supports it (0: none);
        fused_launch: its launch shapes over those fused.fused_step_launch derives."""
        self.model, self.cache, self.autocast = model, cache, autocast
        device = model.model.embed_tokens.weight.device
        super().__init__(cache.num_slots, device, compile, capture, compile_options)
        self.fused = None
        if fused_rows:
            from .fused import FusedDecoder
            if FusedDecoder.unsupported(model.config, model) is None:  # else the model's step for all
                # its padding rows (at the last position, below) attend to that position only
                self.fused = FusedDecoder(model, cache, max(b for b in self.buckets if b <= fused_rows),
                                          fused_launch, idle=cache.max_len - 1)
        n = cache.num_slots
        self.ids = torch.zeros(n, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, 1, dtype=torch.long, device=device)
        # the sampling step's settings per row: greedy, temperature, top_k, top_p; and its uniform
        self.settings = torch.zeros(4, n, dtype=torch.float32, device=device)
        self.uniform = torch.zeros(n, dtype=torch.float32, device=device)
        self.last_position = cache.max_len - 1
        self.compile_sampler = True  # False: sampling steps compile the model's forward only

    def _inputs(self, key):
        bucket, sampled = key
        static = (self.ids[:bucket], self.positions[:bucket])
        return static + ((self.settings[:, :bucket], self.uniform[:bucket]) if sampled else ())

    def _state(self):
        return [self.ids, self.positions]

    def _fused(self, bucket: int) -> bool:
        return self.fused is not None and bucket <= self.fused.max_rows

    def _compiles(self, key):
        return not self._fused(key[0])  # Triton already: nothing for Inductor to fuse

    def _recover(self, key, error):
        """A fused bucket that fails (its kernels do not compile on this GPU, say) falls back
        to the model's step for every bucket, not to eager steps."""
        if not self._fused(key[0]):
            return False
        warnings.warn(f"the fused decode step failed ({type(error).__name__}: {str(error)[:300]}); "
                      "decoding with the model's step")
        max_rows, self.fused = self.fused.max_rows, None
        self.graphs = {k: v for k, v in self.graphs.items() if k[0] > max_rows}
        return True

    def _plainer_compile(self, key, error):
        """A sampling step that does not compile (Inductor's code generation failed on the
        sampler's fused gather and softmax on one build) keeps the model's forward compiled
        and samples uncompiled; the greedy step stays whole."""
        if not (key[1] and self.compile_sampler):
            return False
        warnings.warn(f"torch.compile of the sampling decode step failed ({type(error).__name__}: "
                      f"{str(error)[:300]}); compiling the model's forward only, sampling uncompiled")
        self.compile_sampler = False
        return True

    def _compiled_step(self, key):
        if self.compile_sampler or not key[1]:
            return super()._compiled_step(key)
        logits = self._compile(self._logits, key[0] in self.tuned_buckets)
        filtered = key[1] is not UNFILTERED
        return lambda ids_B1, positions_B1, *settings: self._choose(logits(ids_B1, positions_B1), positions_B1,
                                                                     *settings, filtered=filtered)

    def _step_for(self, key):
        return self._step_unfiltered if key[1] is UNFILTERED else self._step

    def _step(self, ids_B1, positions_B1, settings_4B=None, uniform_B=None):
        return self._choose(self._logits(ids_B1, positions_B1), positions_B1, settings_4B, uniform_B)

    def _step_unfiltered(self, ids_B1, positions_B1, settings_4B, uniform_B):
        """The sampling step of a batch where no row filters (sampling.filters): no sort."""
        return self._choose(self._logits(ids_B1, positions_B1), positions_B1, settings_4B, uniform_B,
                            filtered=False)

    def _logits(self, ids_B1, positions_B1):
        if self._fused(ids_B1.shape[0]):
            return self.fused.forward(ids_B1, positions_B1)
        view = self.cache.prefix(ids_B1.shape[0])
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None,
                            cache_enabled=False):  # see ModelRunner._context
            return self.model(ids_B1, positions=positions_B1, cache=view).logits[:, -1]

    def _choose(self, logits_BV, positions_B1, settings_4B=None, uniform_B=None, filtered=True):
        """((logits, the token of each row: argmax, or the sampler at the row's uniform), the
        step's next ids and positions)."""
        if settings_4B is None:
            tokens_B = argmax_rows(logits_BV)
        else:
            greedy, temperature, top_k, top_p = settings_4B
            tokens_B = sample_tensors(logits_BV, greedy > 0, temperature, top_k.long(), top_p, uniform_B,
                                      filtered=filtered)
        # the next step's inputs (dummy rows too, kept inside the cache)
        return (logits_BV, tokens_B), (tokens_B[:, None], (positions_B1 + 1).clamp(max=self.last_position))

    @torch.no_grad()
    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor | None:
        """Logits [len(slots), V] for one token per listed slot, or None when no graph fits.
        (The engine decodes through decode_burst; this one step with its logits is for tests
        and profiles.)"""
        if not self.fits(slots):
            return None
        bucket = self.load([self.ids, self.positions], slots, tokens, positions, fill=[0, self.last_position])
        out = self.run((bucket, False))
        return None if out is None else self.rows(out[0], slots)

    @torch.no_grad()
    def decode_burst(self, slots: list[int], tokens: list[int], positions: list[int], n: int,
                     params: list[SamplingParams] | None = None,
                     uniforms: list[list[float]] | None = None,
                     logprobs_k: int | None = None) -> torch.Tensor | None:
        """n decode steps from each slot's last token and position: the tokens [n, len(slots)]
        on the device (nothing read back), or None when no graph fits. params (one per slot)
        and uniforms (n per slot) for a batch with sampled rows; None: all greedy. logprobs_k:
        [n, len(slots), 2 + 2k] of sampling.logprob_rows instead, each step's computed from its
        logits between the replays (kernels queued behind the graph, no read-back)."""
        if not self.fits(slots):
            return None
        bucket = self.load([self.ids, self.positions], slots, tokens, positions, fill=[0, self.last_position])
        sampled = params is not None
        variant = (True if filters(params) else UNFILTERED) if sampled else False
        if sampled:
            # rows no request holds: a greedy row's settings (no division by a zero temperature)
            self.load(list(self.settings), slots, *row_settings(params, "cpu"), fill=[1.0, 1.0, 0.0, 1.0])
            u_nB = torch.zeros(n, bucket)
            u_nB[:, torch.tensor(slots)] = torch.tensor(uniforms, dtype=torch.float32).T
            u_nB = u_nB.to(self.device, non_blocking=True)
        tokens_nB = torch.empty(n, bucket, dtype=torch.long, device=self.device)
        logprobs = []
        for i in range(n):
            if sampled:
                self.uniform[:bucket].copy_(u_nB[i])
            out = self.run((bucket, variant))
            if out is None:
                return None
            tokens_nB[i].copy_(out[1])
            if logprobs_k is not None:  # now: the next replay overwrites the step's logits
                logprobs.append(logprob_rows(out[0], out[1], logprobs_k))
        return self.rows(torch.stack(logprobs) if logprobs else tokens_nB, slots, dim=1)


class GraphSpeculator(BucketGraphs):
    """The greedy speculative step of `ModelRunner.speculate_greedy` over rows [0, bucket)."""

    kind = "speculative"

    def __init__(self, runner, compile: bool = False, capture: bool = True):
        self.runner = runner
        super().__init__(runner.cache.num_slots, runner.device, compile, capture)
        n = runner.cache.num_slots
        self.pending = torch.zeros(n, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(n, dtype=torch.long, device=self.device)
        self.last_position = runner.cache.max_len - 1 - runner.k  # a verify writes K past it

    def _inputs(self, key):
        return self.pending[:key[0]], self.pos[:key[0]]

    def _state(self):
        return [self.pending, self.pos, self.runner.draft_h]

    def _step(self, pending_B, pos_B):
        B = pending_B.shape[0]
        out_BK2 = self.runner.speculate_greedy(slice(0, B), pending_B, pos_B, self.runner.cache.prefix(B))
        # the next step's inputs: the last new token x_{a+1}, a + 1 positions on
        n_acc_B = out_BK2[:, 0]
        return out_BK2, (out_BK2.gather(1, n_acc_B[:, None] + 1).squeeze(1),
                         (pos_B + n_acc_B + 1).clamp(max=self.last_position))

    @torch.no_grad()
    def speculate_burst(self, slots: list[int], pending: list[int], positions: list[int],
                        n: int) -> torch.Tensor | None:
        """n speculative steps back to back, each from where the last one ended: [n, len(slots),
        K + 2] (per step the accepted count, then the K + 1 tokens: speculate's layout) on the
        device, or None when no graph fits."""
        if not self.fits(slots):
            return None
        bucket = self.load([self.pending, self.pos], slots, pending, positions)
        out_nBK2 = torch.empty(n, bucket, self.runner.k + 2, dtype=torch.long, device=self.device)
        for i in range(n):
            out = self.run((bucket, None))
            if out is None:
                return None
            out_nBK2[i].copy_(out)
        return self.rows(out_nBK2, slots, dim=1)
