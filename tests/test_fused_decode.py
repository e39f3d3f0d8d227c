"""The fused Triton decode step (infer/fused.py, kernels/decode.py) against its twin, the
model's absorbed decode forward. Without a GPU the kernels run in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 there); on a GPU they run compiled."""

import copy
import functools
import os

import pytest
import torch

from nanoseek import Transformer, preset
from nanoseek.model import StaticCache

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# Triton's interpreter (no GPU) pays per program: bigger blocks than the GPU's, still several
# programs per kernel so that block boundaries are crossed
LAUNCH = (dict(gemv_rows=16, head_rows=16, up_rows=16, down_rows=32)
          if os.environ.get("TRITON_INTERPRET") == "1" else {})


def sharp_model(**overrides):
    """tiny with a smaller vocabulary (the interpreter's time is per program), weights scaled
    up and a random expert bias, so that a wrong expert or a wrong position shows."""
    torch.manual_seed(0)
    m = Transformer(preset("tiny", vocab_size=256, **overrides)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(5)
        for r in m.routers().values():
            if r.e_score_correction_bias is not None:
                r.e_score_correction_bias.normal_(0, 0.1)
    return m.to(DEVICE)


@functools.lru_cache(maxsize=1)
def copying_model(period: int = 8, max_steps: int = 1000):
    """tiny (vocab 256, no MTP) trained to continue its prompt by repeating the prompt's first
    `period` tokens, a copy that needs attention over the cache. Its greedy choices lead by
    4-6 logits (sharp_model's by as little as 0.01), so rounding that differs between two
    decode paths cannot flip them: the model for comparing paths' tokens. Trained until its
    loss is under 0.03 (~300 steps, ~12 s on 2 CPU cores; where the copy is learnt varies with
    the machine's rounding), once a process (callers leave its weights alone)."""
    torch.manual_seed(0)
    m = Transformer(preset("tiny", vocab_size=256, num_nextn_predict_layers=0)).to(DEVICE)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(max_steps):
        ids = torch.randint(0, 256, (32, period), generator=g).repeat(1, 5).to(DEVICE)
        labels = ids.clone()
        labels[:, :period] = -100  # the first period cannot be predicted
        loss = m(ids, labels=labels).loss
        if loss.item() < 0.03:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval().requires_grad_(False)


def copy_prompts(n: int = 12) -> tuple[list[list[int]], list[list[int]]]:
    """Two prompts of different lengths for copying_model (a period and three tokens of its
    repeat; a period alone) and the n tokens that continue each."""
    periods = [[17, 203, 5, 88, 140, 61, 230, 9], [44, 190, 7, 126, 33, 251, 72, 158]]
    prompts = [periods[0] + periods[0][:3], periods[1]]
    repeats = [p * (2 + n // len(p)) for p in periods]
    return prompts, [r[len(q):len(q) + n] for r, q in zip(repeats, prompts)]


def greedy_without_cache(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """n greedy tokens by full forwards without a cache, in float64 logits, and each choice's
    lead over the runner-up."""
    ids, margins = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids], device=DEVICE)).logits[0, -1].double()
            top = logits.topk(2).values
            margins.append((top[0] - top[1]).item())
            ids.append(int(logits.argmax()))
    return ids[len(prompt):], margins


def prefilled_cache(model, lengths, max_len=40, ids=None, dtype=torch.float32):
    """A cache whose rows hold prompts of the given lengths (the model's prefill; random
    prompts unless ids [rows, longest] are given)."""
    cache = StaticCache(model.config, len(lengths), max_len, dtype=dtype, device=DEVICE)
    if ids is None:
        ids = torch.randint(0, model.config.vocab_size, (len(lengths), max(lengths)), device=DEVICE)
    with torch.no_grad():
        for b, n in enumerate(lengths):
            model(ids[b:b + 1, :n], positions=torch.arange(n, device=DEVICE)[None],
                  cache=cache.select([b], kv_len=n), absorb=False)
    return cache


def three_rows(model):
    """A cache prefilled with rows of 7, 20 and 1 positions, a copy for the fused step, and a
    new token a row at positions 7, 20 and 0 (a bucket's dummy row)."""
    cache = prefilled_cache(model, [7, 20, 1])
    ids = torch.randint(0, model.config.vocab_size, (3, 1), device=DEVICE)
    return cache, copy.deepcopy(cache), ids, torch.tensor([[7], [20], [0]], device=DEVICE)


@pytest.mark.parametrize("overrides, chunked, extra, fp8", [(*case, {}, None) for case in [
    (dict(), False),                                          # V3: sigmoid, noaux_tc, bias
    (dict(topk_method="greedy", n_shared_experts=0), True),   # no groups, no shared experts
    (dict(scoring_func="softmax", topk_method="group_limited_greedy", n_group=4, topk_group=2,
          n_shared_experts=2), False),                        # V2, two shared experts
    (dict(num_attention_heads=32), False),                    # attention in two blocks of heads
    (dict(q_lora_rank=None, scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
          n_shared_experts=2), True),                         # V2-Lite: no query LoRA, greedy softmax
    (dict(hidden_size=56, intermediate_size=88, moe_intermediate_size=40, num_attention_heads=32,
          q_lora_rank=40), True),                           # V3-like: rows end in a part chunk
    (dict(rope_scaling={"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                        "mscale_all_dim": 1.0, "original_max_position_embeddings": 16}), False),  # V3's YaRN
    (dict(n_routed_experts=64, n_group=8, topk_group=4, num_experts_per_tok=8, moe_intermediate_size=16,
          routed_scaling_factor=2.5), False),               # V3's routing: top-8 of 64 in 4 of 8 groups
]] + [
    # the query's columns in shares (each recomputing q_b's rows with a LoRA), the merge's V
    # outputs in blocks: by the rule without a LoRA, given with one
    (dict(q_lora_rank=None, n_shared_experts=2), True, dict(query_split=2, output_split=4), None),
    (dict(), True, dict(query_split=2, output_split=2), None),
    # the down projection split over its slots and their column blocks, summed by the last program
    (dict(hidden_size=56, intermediate_size=88, moe_intermediate_size=40, num_attention_heads=32,
          q_lora_rank=40, n_shared_experts=2), True, dict(down_split=1, down_rows=8), None),
    # the down kernel's columns in blocks narrower than the other kernels' (a loop; more split programs)
    (dict(hidden_size=56, intermediate_size=88, moe_intermediate_size=40, num_attention_heads=32,
          q_lora_rank=40, n_shared_experts=2), False, dict(down_block=16), None),
    (dict(hidden_size=56, intermediate_size=88, moe_intermediate_size=40, num_attention_heads=32,
          q_lora_rank=40, n_shared_experts=2), False, dict(down_split=1, down_block=16), None),
    # the up kernel on the tensor cores: rows and columns ending mid-block, two shared slots
    (dict(hidden_size=56, intermediate_size=88, moe_intermediate_size=40, num_attention_heads=32,
          q_lora_rank=40, n_shared_experts=2), False, dict(up_dot=1, up_rows=16, up_block=16), None),
] + [
    # FP8 weights (every layer weight but kv_b_proj) in scale blocks smaller than tiny's widths,
    # taller or wider than square, with fewer rows a program than a block has (a head's query rows
    # straddle two blocks): the twin is the model's forward, which dequantises them
    (overrides, chunked, {"gemv_rows": rows, "up_rows": rows, "down_rows": rows, **extra}, block)
    for overrides, chunked, extra, block, rows in [
        (dict(), False, {}, (32, 16), 16),                    # V3: query LoRA, a dense layer
        (dict(q_lora_rank=None, scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
              n_shared_experts=2), True, {}, (16, 32), 8),    # V2-Lite: two shared experts
        (dict(hidden_size=56, intermediate_size=88, moe_intermediate_size=40, num_attention_heads=32,
              q_lora_rank=40), True, dict(down_split=1), (64, 16), 16),  # widths ending mid-block
        (dict(n_shared_experts=2), False, dict(down_split=1, down_block=16), (16, 16), 16),  # split shared chunks
        (dict(topk_method="greedy", n_shared_experts=0), True, {}, (32, 16), 8),  # no shared experts
        # the tensor-core up kernel: a scale a chunk of 16 columns (of 32-column blocks), two shared slots
        (dict(q_lora_rank=None, n_shared_experts=2), False, dict(up_dot=1, up_block=16), (16, 32), 16)]
])
def test_fused_step_matches_model_decode(overrides, chunked, extra, fp8, monkeypatch):
    """Logits of rows at different positions (one of them the dummy row at 0 that a bucket
    pads with) and every layer's cache entries: the fused step equals the model's absorbed
    decode forward in float32. Attention in units of 16 positions (row 1 spans two, the
    others one), 16 heads per program; chunked: rows wider than 16 read in chunks (the path of
    a wide model's hidden size, and of the query kernel's q_b and W_UK), units of 32 positions
    read in blocks of 16, merged two at a time. fp8: the layer weights FP8 in blocks of that
    shape (wrong block scales move the logits by whole units)."""
    from nanoseek.infer import fused
    from nanoseek.infer.fp8_weights import quantize_weights
    if chunked:
        monkeypatch.setattr(fused, "QUERY_CHUNK", 16)
    model = sharp_model(**overrides)
    if fp8:
        quantize_weights(model, fp8, "twin")
    cache, fused_cache, ids, positions = three_rows(model)
    with torch.no_grad():
        want = model(ids, positions=positions, cache=cache.prefix(3)).logits[:, -1]
    chunks = dict(attend_split=32, max_block=16, attend_block=16, merge_splits=2) if chunked else dict(attend_split=16)
    step = fused.FusedDecoder(model, fused_cache, max_rows=4, launch={**LAUNCH, **chunks, "attend_heads": 16, **extra})
    assert all(step.t[k] == v for k, v in extra.items()) and step.fp8_block == fp8
    assert step.units(3) == (6 if chunked else 9)  # the step's 30 positions: units of the least length
    for scratch in (step.part_acc, step.part_m, step.part_l):  # scratch past the step's units is
        scratch.fill_(float("nan"))                          # neither written nor read
    got = step.forward(ids, positions)
    used = sum(-(-(pos + 1) // step.t["attend_split"]) for pos in positions[:, 0].tolist())
    written = ~step.part_m[:, 0].isnan()  # (the last layer's scratch)
    assert used == (3 if chunked else 4) and written[:used].all() and not written[used:].any()
    assert want.abs().max() > 5  # sharp logits: a wrong expert moves them by whole units
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-4)
    for layer, fused_layer in zip(cache.layers, fused_cache.layers):
        for buf, fused_buf in zip(layer, fused_layer):
            torch.testing.assert_close(fused_buf, buf, rtol=1e-4, atol=1e-4)



@functools.cache
def _e4m3_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def to_e4m3(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + i, tl.load(x_ptr + i, mask=i < n).to(tl.float8e4nv), mask=i < n)
    return to_e4m3


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """x rounded to E4M3 by Triton's conversion, the kernels': on a GPU the hardware's, as
    torch's; Triton's interpreter carries no rounding into the exponent (127.5 becomes 64,
    not 128), and the twin must round as the kernel under test does."""
    flat = x.float().contiguous().flatten()
    out = torch.empty(flat.shape, dtype=torch.float8_e4m3fn, device=x.device)
    _e4m3_kernel()[(-(-flat.numel() // 1024),)](flat, out, flat.numel(), BLOCK=1024)
    return out.view(x.shape)


def fake_quantized(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [.., D] quantized to E4M3 in chunks of `block` columns (scale amax / 448, 1 for an
    all-zero chunk; D padded with zeros) and dequantized: what the W8A8 up kernel multiplies."""
    D = x.shape[-1]
    chunks = torch.nn.functional.pad(x.float(), (0, -D % block)).unflatten(-1, (-1, block))
    amax = chunks.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    return (to_e4m3(chunks / scale).float() * scale).flatten(-2)[..., :D].to(x.dtype)


@pytest.mark.parametrize("overrides, up_block, block", [
    (dict(q_lora_rank=None, n_shared_experts=2), 16, (16, 32)),                      # chunks of 16: 2 a scale block
    (dict(hidden_size=56, intermediate_size=88, moe_intermediate_size=40, num_attention_heads=32,
          q_lora_rank=40), 32, (32, 32))])                                          # a last chunk of 24 columns
def test_w8a8_up_kernel_matches_its_quantized_twin(overrides, up_block, block):
    """up_dot=2: the up kernel multiplies the FP8 experts by the activation quantized to E4M3 in
    chunks of up_block columns (W8A8, training's 1x128 tiles). The fused step's logits equal the
    model's forward on the same FP8 weights whose MLPs' gate and up projections read the
    activation fake-quantized the same way (the router reads it unquantized, as the kernels do):
    float32 sums of exact products in another order, rtol 1e-4. Without the twin's quantization
    the step is off by more than that: the test sees the quantization."""
    from nanoseek.infer.fp8_weights import quantize_weights
    from nanoseek.infer.fused import FusedDecoder
    from nanoseek.model.moe import MLP
    model = sharp_model(**overrides)
    quantize_weights(model, block, "twin")
    cache, fused_cache, ids, positions = three_rows(model)
    with torch.no_grad():
        plain = model(ids, positions=positions, cache=copy.deepcopy(cache).prefix(3)).logits[:, -1]
        hooks = [m.register_forward_pre_hook(lambda m, args: (fake_quantized(args[0], up_block), *args[1:]))
                 for layer in model.main_layers for m in layer.modules()
                 if isinstance(m, MLP) or m is getattr(layer.mlp, "experts", None)]
        want = model(ids, positions=positions, cache=cache.prefix(3)).logits[:, -1]
        for hook in hooks:
            hook.remove()
    step = FusedDecoder(model, fused_cache, max_rows=4,
                        launch={**LAUNCH, "attend_split": 16, "attend_heads": 16, "up_dot": 2, "up_rows": 16,
                                "up_block": up_block, **({"gemv_rows": 16, "down_rows": 16} if LAUNCH else {})})
    got = step.forward(ids, positions)
    assert want.abs().max() > 5 and (plain - want).abs().max() > 1e-2  # sharp logits; the quantization shows
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-4)
    with pytest.raises(ValueError, match="up_dot=2 multiplies FP8 weights"):
        FusedDecoder(sharp_model(**overrides), copy.deepcopy(cache), max_rows=4, launch={"up_dot": 2})

@pytest.mark.parametrize("programs, heads, tma", [(4, 16, 0), (24, 16, 0), (24, 32, 0), (4, 16, 1)])
def test_fused_attention_units_follow_the_positions(programs, heads, tma):
    """The fused attention (units, merge, W_UV) against float64 attention over the latent,
    rows at positions 150, 37 and 0 of a 200-position cache. The step's 189 positions are cut
    in chunks of one length for all rows, so the long row gets the most units. 32 heads in two
    blocks of 16 aiming for 4 programs: 1 unit a row, 3 in all, chunks of 64 positions (the
    long row's 151 in 3 units, the row at 37 in 1); aiming for 24: 4 units a row, 12 in all,
    chunks of 16 (10 units, 3, 1), merged two at a time. One block of 32 heads, 24 programs:
    8 a row, 24 in all, chunks of 16 (the same cut). The cache past each row's position holds
    NaN, as memory never written may: no kernel reads it into a sum (the TMA kernel's copies
    stop at a unit's last whole block)."""
    from nanoseek.infer.fused import FusedDecoder
    from nanoseek.infer.latent_attention import ATTEND_ROWS, attend_warps_stages, attention_parts
    model = sharp_model(num_attention_heads=32)
    c = model.config
    H, C, V, N = c.num_attention_heads, c.kv_lora_rank, c.v_head_dim, c.qk_nope_head_dim
    cache = StaticCache(c, 3, 200, dtype=torch.float32, device=DEVICE)
    pos = torch.tensor([150, 37, 0], device=DEVICE)
    past = torch.arange(200, device=DEVICE) > pos[:, None]
    for buf in cache.layers[0]:
        buf.normal_()
        buf[past] = float("nan")
    step = FusedDecoder(model, cache, max_rows=3, launch={**LAUNCH, "attend_split": 16, "attend_block": 16,
                                                          "attend_programs": programs, "attend_heads": heads,
                                                          "merge_splits": 2, "attend_tma": tma})
    step.q_lat.normal_()
    step.q_pe.normal_()
    step.part_m.fill_(float("nan"))
    attn = model.main_layers[0].self_attn
    got = step.attend(attn, 0, pos, 3).double()

    ckv, kpe = (t.double().masked_fill(past[..., None], 0) for t in cache.layers[0])
    scores = (torch.einsum("bhc,bsc->bhs", step.q_lat.double(), ckv)
              + torch.einsum("bhr,bsr->bhs", step.q_pe.double(), kpe)) * attn.scale
    scores = scores.masked_fill(past[:, None], float("-inf"))
    o_lat = torch.einsum("bhs,bsc->bhc", scores.softmax(-1), ckv)
    w_uv = attn.kv_b_proj.weight.double().unflatten(0, (H, -1))[:, N:]
    want = torch.einsum("bhc,hvc->bhv", o_lat, w_uv).flatten(1)
    # float32 sums of a few hundred products of unit-scale values: ~1e-6 of the largest
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())

    aim = step.units(3)
    assert aim == {(4, 16): 3, (24, 16): 12, (24, 32): 24}[programs, heads]
    chunk = -(-(-(-189 // aim)) // 16) * 16
    counts = [-(-(p + 1) // chunk) for p in pos.tolist()]
    assert (chunk, counts) == {3: (64, [3, 1, 1]), 12: (16, [10, 3, 1]), 24: (16, [10, 3, 1])}[aim]
    written = ~step.part_m[:, 0].isnan()  # the units the attention wrote, a row's consecutive
    assert written[: sum(counts)].all() and not written[sum(counts):].any()
    assert len(step.part_m) == max(attention_parts(step.t, H, 200, B) for B in (1, 2, 3)) >= aim + 3
    assert step.units(64) == 64 * step.units(ATTEND_ROWS) // ATTEND_ROWS  # more rows, more units
    warps = step.t["attend_warps"]  # more rows than one wave holds: half the warps, 2 stages
    assert attend_warps_stages(step.t, ATTEND_ROWS, C) == dict(num_warps=warps, num_stages=step.t["attend_stages"])
    assert attend_warps_stages(step.t, 64, C) == dict(num_warps=max(4, warps // 2), num_stages=2)
    # but never so few that a program's [heads, C] float32 accumulator passes 128 registers a thread
    wide = dict(attend_warps=8, attend_stages=3, attend_heads=64)
    assert attend_warps_stages(wide, 64, 512)["num_warps"] == 8  # 64 x 512 floats over 256 threads
    assert attend_warps_stages({**wide, "attend_heads": 32}, 64, 512)["num_warps"] == 4


def test_a_padding_row_attends_to_its_own_position_only():
    """A CUDA-graph bucket's padding row sits at the cache's last position (idle): its
    attention reads that position alone (o_lat = its latent, one unit), so the step is cut as
    if the row held one position, and the other rows' results are unchanged; without the
    rule the row reads the whole cache and takes most of the units."""
    from nanoseek.infer.fused import FusedDecoder
    model = sharp_model(num_attention_heads=32)
    c = model.config
    H, N = c.num_attention_heads, c.qk_nope_head_dim
    cache = StaticCache(c, 3, 200, dtype=torch.float32, device=DEVICE)
    for buf in cache.layers[0]:
        buf.normal_()
    launch = {**LAUNCH, "attend_split": 16, "attend_block": 16, "attend_programs": 24, "merge_splits": 2}
    attn = model.main_layers[0].self_attn
    runs = {}
    for name, idle, middle in (("padded", 199, 199), ("one position", -1, 0), ("no rule", -1, 199)):
        step = FusedDecoder(model, cache, max_rows=3, launch=launch, idle=idle)
        torch.manual_seed(1)  # the same queries in every run
        step.q_lat.normal_()
        step.q_pe.normal_()
        step.part_m.fill_(float("nan"))
        o = step.attend(attn, 0, torch.tensor([150, middle, 37], device=DEVICE), 3).clone()
        runs[name] = (o, int((~step.part_m[:, 0].isnan()).sum()))
    (padded, units), (short, short_units), (_, units_no_rule) = runs.values()
    w_uv = attn.kv_b_proj.weight.unflatten(0, (H, -1))[:, N:]
    alone = torch.einsum("hvc,c->hv", w_uv, cache.layers[0][0][1, 199]).flatten()  # softmax over one position
    torch.testing.assert_close(padded[1], alone, rtol=1e-5, atol=1e-5 * alone.abs().max().item())
    assert torch.equal(padded[[0, 2]], short[[0, 2]])  # the same cut, the same sums
    # 24 units aimed for: 190 positions in chunks of 16 give the rows 10, 1 and 3 units; without
    # the rule 389 in chunks of 32 give 5, 7 and 2: half the step for the padding row
    assert units == short_units == 10 + 1 + 3 and units_no_rule == 5 + 7 + 2


def test_fused_step_of_a_dense_model():
    """A model without experts (n_routed_experts None): every layer's MLP is the one slot."""
    from nanoseek.infer.fused import FusedDecoder
    torch.manual_seed(0)
    model = Transformer(preset("dense", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=2, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8,
                               qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=None)).eval().to(DEVICE)
    cache = prefilled_cache(model, [5, 3])
    fused_cache = copy.deepcopy(cache)
    ids = torch.randint(0, 128, (2, 1), device=DEVICE)
    positions = torch.tensor([[5], [3]], device=DEVICE)
    with torch.no_grad():
        want = model(ids, positions=positions, cache=cache.prefix(2)).logits[:, -1]
    torch.testing.assert_close(FusedDecoder(model, fused_cache, 2, LAUNCH).forward(ids, positions), want,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fp8", [None, (32, 32)])
def test_fused_decoder_bursts_equal_the_model_step(fp8):
    """GraphDecoder with fused rows, uncaptured here: a greedy burst (the token chosen inside
    the step, the inputs advanced by it) gives the model step's tokens and cache, and a
    sampled one (top-p, each row's own uniforms) its tokens; buckets above fused_rows keep
    the model's forward (and may compile). fp8: an FP8-resident model's, in blocks of that shape."""
    from nanoseek.infer.cuda_graph import GraphDecoder
    from nanoseek.infer.fp8_weights import quantize_weights
    from nanoseek.infer.sampling import SamplingParams
    model = sharp_model()
    if fp8:
        quantize_weights(model, fp8, "twin")
    cache = prefilled_cache(model, [5, 9])
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=1), SamplingParams(max_tokens=4)]

    def burst(fused_rows, sampled=False, n=2):
        c = copy.deepcopy(cache)
        step = GraphDecoder(model, c, None, capture=False, fused_rows=fused_rows, fused_launch=LAUNCH)
        extra = (params, [[0.3] * n, [0.0] * n]) if sampled else ()
        return step.decode_burst([0, 1], [3, 4], [5, 9], n, *extra).tolist(), step, c

    want, plain, want_cache = burst(0)
    got, fused, got_cache = burst(2)
    assert fused._fused(2) and not fused._compiles((2, False)) and plain.fused is None and fused.fused.fp8_block == fp8
    assert got == want
    for layer, fused_layer in zip(want_cache.layers, got_cache.layers):
        for buf, fused_buf in zip(layer, fused_layer):  # c_kv and k_pe
            torch.testing.assert_close(fused_buf, buf, rtol=1e-4, atol=1e-5)
    assert burst(2, sampled=True, n=1)[0] == burst(0, sampled=True, n=1)[0]
    one = GraphDecoder(model, copy.deepcopy(cache), None, capture=False, fused_rows=1, fused_launch=LAUNCH)
    assert one.fused.max_rows == 1 and one._fused(1) and not one._fused(2) and one._compiles((2, False))


def test_forced_decode_through_the_fused_step_is_the_models():
    """generate.forced_decode with a fused launch (the benchmark's teacher-forced check of the
    fused step) steps through the fused step: the logits after each forced token equal the
    model's own cached decode's along the same sequences, rows of two prompts at once."""
    from nanoseek.infer.generate import forced_decode
    model = sharp_model()
    seqs = torch.randint(0, model.config.vocab_size, (2, 9), device=DEVICE)
    want = torch.stack(list(forced_decode(model, seqs, 5)), 1)
    got = torch.stack(list(forced_decode(model, seqs, 5, dict(LAUNCH, attend_split=16))), 1)
    assert got.shape == (2, 4, model.config.vocab_size) and want.abs().max() > 5
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-4)


def test_unsupported_models_say_why():
    from nanoseek.infer.fused import FusedDecoder
    with pytest.raises(ValueError, match="unknown launch keys \\['gemv_row'\\]"):
        m = Transformer(preset("tiny"))
        FusedDecoder(m, StaticCache(m.config, 1, 8), 1, launch=dict(gemv_row=8))
    assert FusedDecoder.unsupported(preset("tiny")) is None
    assert FusedDecoder.unsupported(preset("bench-1b")) is None
    assert FusedDecoder.unsupported(preset("deepseek-v2-lite")) is None  # no query LoRA
    cases = {"attention_type": dict(attention_type="gqa", num_key_value_heads=2),
             "96 routed experts in 8 groups": dict(n_routed_experts=96, n_group=8, topk_group=4),
             "at most 256": dict(n_routed_experts=512, n_group=8, topk_group=4)}
    for words, overrides in cases.items():
        reason = FusedDecoder.unsupported(preset("tiny", **overrides))
        assert reason and words in reason, reason
    m = Transformer(preset("tiny", attention_type="gqa", num_key_value_heads=2))
    with pytest.raises(ValueError, match="does not support this model: attention_type"):
        FusedDecoder(m, StaticCache(m.config, 1, 8), 1)
    from nanoseek.infer.cuda_graph import GraphDecoder  # the decoder then keeps the model's step
    assert GraphDecoder(m, StaticCache(m.config, 2, 8), None, capture=False, fused_rows=2).fused is None


@pytest.mark.parametrize("overrides", [
    dict(),                                                                        # V3: sigmoid, noaux_tc, bias
    dict(scoring_func="softmax", topk_method="group_limited_greedy", n_group=4, topk_group=3,
         norm_topk_prob=False),                                                    # V2
    dict(topk_method="greedy", n_group=1, topk_group=1),                           # no groups
])
def test_routing_kernel_chooses_the_routers_experts(overrides):
    """moe_route_kernel, launched as the fused step launches it (fused.route), against
    moe.Router on 48 tokens of bench-1b's routing shape (64 experts, top 6; 8 groups for V3,
    4 for V2, none for greedy): the same experts and gates for every token (slots may come in
    another order), a random bias included."""
    from nanoseek.infer.fused import FusedDecoder, route
    from nanoseek.model.moe import Router
    cfg = preset("bench-1b", **overrides)
    router = Router(cfg).to(DEVICE)
    torch.nn.init.normal_(router.weight, std=0.05)
    if router.e_score_correction_bias is not None:
        router.e_score_correction_bias.normal_(0, 0.05)
    x = torch.randn(48, cfg.hidden_size, device=DEVICE)
    with torch.no_grad():
        want_gate, want_idx, _ = router(x)
        logits = x @ router.weight.T
    K = router.top_k
    idx = torch.zeros(48, K, dtype=torch.int32, device=DEVICE)
    gate = torch.zeros(48, K, device=DEVICE)
    route(router, logits, idx, gate, 48)
    order, want_order = idx.long().argsort(-1), want_idx.argsort(-1)
    assert torch.equal(idx.long().gather(1, order), want_idx.gather(1, want_order))
    torch.testing.assert_close(gate.gather(1, order), want_gate.gather(1, want_order), rtol=1e-5, atol=1e-6)
    assert FusedDecoder.unsupported(cfg) is None


def test_a_failing_fused_step_falls_back_to_the_model_step(monkeypatch):
    """Fused kernels that fail (say, do not compile on this GPU) hand every bucket back to the
    model's step, with a warning, instead of leaving the decoder without graphs."""
    from nanoseek.infer.cuda_graph import GraphDecoder
    from nanoseek.infer.fused import FusedDecoder
    model = sharp_model()
    cache = prefilled_cache(model, [5, 9])
    want = GraphDecoder(model, copy.deepcopy(cache), None, capture=False).decode_burst([0, 1], [3, 4], [5, 9], 1)

    def broken(self, ids, positions):
        raise RuntimeError("no kernel image for this GPU")
    monkeypatch.setattr(FusedDecoder, "forward", broken)
    step = GraphDecoder(model, copy.deepcopy(cache), None, capture=False, fused_rows=2, fused_launch=LAUNCH)
    with pytest.warns(UserWarning, match="fused decode step failed .*no kernel image.*model's step"):
        got = step.decode_burst([0, 1], [3, 4], [5, 9], 1)
    assert step.fused is None and not step.failed and torch.equal(got, want)


@pytest.mark.gpu
def test_bf16_fused_step_is_as_accurate_as_the_bf16_model():
    """On a GPU, in BF16 (weights and cache; the tensor-core dots the interpreter cannot run):
    the fused step's logits are as close to a float32 reference (model and cache) as the
    BF16 model's own forward is, within half again, for rows at different positions."""
    from nanoseek.hf import to_dtype
    from nanoseek.infer.fused import FusedDecoder
    model = sharp_model()
    half = to_dtype(copy.deepcopy(model), torch.bfloat16)
    lengths = [7, 20, 1]
    ids = torch.randint(0, model.config.vocab_size, (3, 20), device=DEVICE)
    cache32 = prefilled_cache(model, lengths, ids=ids)
    cache16 = prefilled_cache(half, lengths, ids=ids, dtype=torch.bfloat16)
    nxt = torch.randint(0, model.config.vocab_size, (3, 1), device=DEVICE)
    positions = torch.tensor([[7], [20], [0]], device=DEVICE)
    with torch.no_grad():
        ref = model(nxt, positions=positions, cache=copy.deepcopy(cache32).prefix(3)).logits[:, -1]
        plain = half(nxt, positions=positions, cache=copy.deepcopy(cache16).prefix(3)).logits[:, -1].float()
    fused = FusedDecoder(half, cache16, 4).forward(nxt, positions)

    def rel(x):
        return float((x - ref).norm() / ref.norm())
    assert rel(fused) <= 1.5 * rel(plain) + 1e-3, (rel(fused), rel(plain))


@pytest.mark.gpu
@pytest.mark.parametrize("name, extra, weights", [
    ("deepseek-v3", {}, "bf16"), ("deepseek-v3", dict(attend_transposed=1), "bf16"), ("deepseek-v2-lite", {}, "bf16"),
    ("deepseek-v2-lite", dict(down_split=1), "bf16"), ("deepseek-v3", dict(down_split=1), "bf16"),
    ("deepseek-v2-lite", {}, "fp8"), ("deepseek-v3", {}, "fp8"),
    ("deepseek-v2-lite", dict(up_dot=1), "bf16"), ("deepseek-v2-lite", dict(up_dot=1), "fp8"),
    ("deepseek-v3", dict(up_dot=1), "fp8"),
    ("deepseek-v3", dict(attend_tma=1, attend_heads=64, attend_warps=8), "bf16")],
    ids=lambda v: ("_".join(f"{k}{x}" for k, x in v.items()) or "rule") if isinstance(v, dict) else None)
def test_fused_step_at_real_layer_widths(name, extra, weights):
    """On a GPU, BF16, DeepSeek-V3's layer widths (hidden 7168, 128 heads, latent 512,
    q_lora 1536, experts of width 2048, top-8 in 4 of 8 groups; 64 experts instead of 256 and
    a small vocabulary, to fit a float32 reference beside it), one dense and one MoE layer:
    the fused step with the launch shapes derived for these widths (2 GEMV rows a program,
    attention in 32-head blocks, its dots transposed or not) is as close to float32 as the
    BF16 model's own step. The same at V2-Lite's (hidden 2048, 16 heads, no query LoRA, 64
    experts of width 1408, greedy softmax top-6, two shared experts). With the down projection
    split over its slots too, whose last program per block sums the others' partial sums: the
    same logits bit for bit step after step (a program reading a sum not yet written would not
    be). With the up kernel on the tensor cores (its activation rounded to float16). With the
    TMA attention kernel at 64 heads a program. fp8: the layer weights FP8 in 128x128 blocks as
    an official checkpoint holds them, the
    fused step reading the float8 bytes, held to float32 arithmetic on the same FP8 values as
    closely as the model holding them dequantised to BF16 (fp8_twins)."""
    from nanoseek.hf import to_dtype
    from nanoseek.infer.fused import FusedDecoder
    torch.manual_seed(0)
    cfg = preset(name, num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=64,
                 vocab_size=2048, num_nextn_predict_layers=0)
    model = Transformer(cfg).cuda().eval()
    # a random model's expert scores all sit near one value: a spread of selection bias (V3),
    # or router logits scaled up (V2-Lite, no bias), makes the routing decisive, so that the
    # test measures the step's arithmetic, not which expert BF16 rounding happens to pick
    with torch.no_grad():
        for r in model.routers().values():
            if r.e_score_correction_bias is not None:
                r.e_score_correction_bias.normal_(0, 1)
            else:
                r.weight.mul_(20)
    # the model the fused step reads, the model stepped by its own forward, the float32 reference
    if weights == "fp8":
        stepped, plain_model, model = fp8_twins(model, torch.bfloat16)
    else:
        stepped = plain_model = to_dtype(copy.deepcopy(model), torch.bfloat16)
    lengths = [100, 37]
    ids = torch.randint(0, cfg.vocab_size, (2, 100), device=DEVICE)
    cache32 = prefilled_cache(model, lengths, max_len=128, ids=ids)
    cache16 = prefilled_cache(plain_model, lengths, max_len=128, ids=ids, dtype=torch.bfloat16)
    nxt = torch.randint(0, cfg.vocab_size, (2, 1), device=DEVICE)
    positions = torch.tensor([[100], [37]], device=DEVICE)
    with torch.no_grad():
        ref = model(nxt, positions=positions, cache=copy.deepcopy(cache32).prefix(2)).logits[:, -1]
        plain = plain_model(nxt, positions=positions, cache=copy.deepcopy(cache16).prefix(2)).logits[:, -1].float()
    fused = FusedDecoder(stepped, cache16, 2, launch=extra)
    assert (fused.t["gemv_rows"], fused.t["attend_heads"]) == ((2, 32) if name == "deepseek-v3" else (2, 16))
    assert fused.fp8_block == ((128, 128) if weights == "fp8" else None)
    got = fused.forward(nxt, positions).clone()  # (forward returns its logits buffer, which the next overwrites)
    for _ in range(8):  # the step rewrites the same cache entries: nothing else may move
        assert torch.equal(fused.forward(nxt, positions), got)

    def rel(x):
        return float((x - ref).norm() / ref.norm())
    assert rel(got) <= 1.5 * rel(plain) + 1e-3, (rel(got), rel(plain))


def fp8_twins(model, dtype):
    """From a float32 model: (the model holding its layer weights FP8 in 128x128 blocks, the rest
    in dtype; the same FP8 weights dequantised into dtype at every forward, the BF16-dequantised
    model; the same in float32, the reference: float32 arithmetic on the FP8 checkpoint's values)."""
    from nanoseek.hf import to_dtype
    from nanoseek.infer.fp8_weights import FP8Experts, FP8Linear, quantize_weights
    fp8 = quantize_weights(to_dtype(copy.deepcopy(model), dtype))
    twin, ref = copy.deepcopy(fp8), to_dtype(copy.deepcopy(fp8), torch.float32)  # (float8 values cast exactly)
    for m, r in zip(twin.modules(), ref.modules()):
        if isinstance(m, (FP8Linear, FP8Experts)):
            m.kernel, r.kernel, r.dtype = "twin", "twin", torch.float32
    return fp8, twin, ref
