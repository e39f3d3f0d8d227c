"""InferenceConfig: every fast-path choice of the engine, in one validated place.

None of these changes what a request decodes beyond rounding (the paths are twins, tested
against each other); they change how fast. The engine applies them from outside the model:
the expert path through `Transformer.set_expert_path`, the rest in its runner and CUDA
graphs. Benchmarks and the server pass one of these; nothing sets module globals.

    engine = Engine(model, tokenizer, config=InferenceConfig(expert_path="grouped", decode_burst=1))
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import CheckedConfig
from ..model.moe import EXPERT_PATHS, ExpertPath


DECODE_ATTENTION = ("auto", "kernel", "torch")


@dataclass
class InferenceConfig(CheckedConfig):
    # routed experts (model/moe.py): auto, grouped, gather, gather_gemv, small_batch or loop
    expert_path: str = "auto"
    # under "auto": (token, expert) pairs up to which a decode step gathers the experts; 0: never
    gather_max_pairs: int = 16
    # launch shapes of kernels/moe.py's small-batch kernels, over SMALL_BATCH_EXPERTS_LAUNCH
    small_batch_launch: dict | None = None
    # GPU: replay decode steps from CUDA graphs captured per batch bucket (cuda_graph.py)
    cuda_graphs: bool = True
    # GPU: torch.compile the captured steps first (fewer, fused kernels; compiled on first use,
    # so the first requests of a new batch size wait for it)
    compile: bool = True
    # Inductor options added to the batch-1 step's compilation (coordinate-descent tuning is on)
    compile_options: dict = field(default_factory=dict)
    # GPU: decode batches of up to this many rows take the fused Triton step (fused.py);
    # 0: never; None: as far as it was measured faster than the compiled step (decode_paths.py)
    fused_decode_rows: int | None = None
    # launch shapes of the fused step's kernels, over those fused.fused_step_launch derives
    fused_launch: dict | None = None
    # MLA decode attention for one new token a row: "kernel" (latent_attention.py: Triton kernels
    # that read each row's own positions), "torch" (the model's absorbed attention, which reads
    # every position of the cache and masks), or "auto": the kernels on a Hopper+ GPU with a 16-bit
    # cache longer than fused.SHORT_CACHE positions, where reading all of it costs the most; a
    # compiled step of 64 or more heads from 32K (engine.decode_attention says why)
    decode_attention: str = "auto"
    # GPU: decode steps replayed back to back per read-back of their tokens
    decode_burst: int = 8
    # prompt tokens one prefill forward takes; longer prompts go through the cache in chunks
    # (attention then holds chunk x context scores, not context^2)
    prefill_chunk: int = 2048
    # reuse the cache of prompt prefixes that slots still hold (prefix_cache.py); not with
    # speculative decoding, whose MTP layer's entry at a prefix's end depends on the token after it
    prefix_cache: bool = False

    def __post_init__(self) -> None:
        self.check_types()
        self.need_one_of("expert_path", EXPERT_PATHS)
        self.need(self.gather_max_pairs >= 0, "gather_max_pairs", "must be >= 0 (0: never gather)")
        self.need(self.fused_decode_rows is None or self.fused_decode_rows >= 0, "fused_decode_rows",
                  "must be >= 0 (0: never the fused step), or null for the measured default")
        self.need_one_of("decode_attention", DECODE_ATTENTION)
        self.need(self.decode_burst >= 1, "decode_burst", "must be >= 1 (1: read every step back)")
        self.need_at_least(1, "prefill_chunk")

    def experts(self) -> ExpertPath:
        """The model-side expert path these settings choose."""
        return ExpertPath(self.expert_path, self.gather_max_pairs, self.small_batch_launch)
