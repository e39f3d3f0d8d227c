"""The MLA decode attention kernels in the model's and the engine's decode step
(infer/latent_attention.py) against the model's absorbed attention. Without a GPU the kernels
run in Triton's interpreter (tests/conftest.py)."""

import copy

import pytest
import torch

from nanoseek.config import ConfigError
from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer.config import InferenceConfig
from nanoseek.infer.latent_attention import LatentDecodeAttention

pytest.importorskip("triton")
from test_fused_decode import (DEVICE, copy_prompts, copying_model, greedy_without_cache,  # noqa: E402
                               prefilled_cache, sharp_model)  # tests/ is on sys.path

# small blocks so that a 40-position cache crosses several units and blocks in the interpreter
LAUNCH = dict(attend_split=16, attend_block=16, attend_programs=8, attend_heads=16, merge_splits=2)


@pytest.mark.parametrize("overrides", [dict(), dict(q_lora_rank=None, num_attention_heads=32)])
@pytest.mark.parametrize("rows", [None, [2, 0], [1, 2]])
@pytest.mark.parametrize("kernel", [dict(), dict(attend_transposed=1), dict(attend_tma=1)],
                         ids=["plain", "transposed", "tma"])
def test_decode_attention_kernels_match_the_absorbed_attention(overrides, rows, kernel):
    """One new token a row at positions 37, 5 and 20 of a 40-position cache: the logits with
    the kernels equal the absorbed attention's (float32, float32 dot products in the kernels:
    ~1e-6 of the largest logit). With and without a query LoRA (V2-Lite has none), 16 and 32
    heads (two head blocks), over the whole cache, a gathered view of rows 2 and 0 and a view
    of rows 1 and 2 (a slice, as a captured step reads); the dots as heads x positions or
    transposed, or the TMA kernel (whole blocks of 16 copied, each unit's partial last block
    loaded under a mask)."""
    model = sharp_model(**overrides)
    cache = prefilled_cache(model, [37, 5, 20])
    positions = torch.tensor([[37], [5], [20]], device=DEVICE)
    ids = torch.tensor([[3], [7], [11]], device=DEVICE)
    if rows is not None:
        positions, ids = positions[rows], ids[rows]
    view = (lambda c: c.select(rows)) if rows is not None else (lambda c: c)
    logits = []
    for attend in (None, LatentDecodeAttention(model.config, 40, {**LAUNCH, **kernel})):
        model.set_decode_attention(attend)
        with torch.no_grad():
            logits.append(model(ids, positions=positions, cache=view(copy.deepcopy(cache))).logits[:, -1].double())
    model.set_decode_attention(None)
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-5 * logits[0].abs().max().item())


@pytest.mark.skipif(DEVICE == "cuda", reason="float32 at a 512-wide latent asks more shared memory than an SM has; "
                    "test_bf16_decode_attention_kernels_at_real_widths runs the launch on a GPU")
def test_one_row_takes_wider_head_blocks_at_v3_widths():
    """At V3's latent width (512) and 64+ heads a long cache's step of one row attends with 64
    heads a program in blocks of 32 positions (latent_attention.one_row_launch), more rows with
    the rule's 32 in blocks of 64; both give the absorbed attention's logits within float32's
    rounding of sums over the latent's C = 512 channels in another order, C·2^-24 of the
    largest logit (either launch: ~1.7e-5 on this CPU)."""
    from nanoseek.infer.latent_attention import OP_LAUNCH
    model = sharp_model(num_attention_heads=64, kv_lora_rank=512)
    attend = LatentDecodeAttention(model.config, 8192, dict(attend_programs=8, merge_splits=2))
    launches = [dict(zip(OP_LAUNCH, launch)) for launch in (attend.one_row, attend.launch)]
    assert [(t["attend_heads"], t["attend_block"], t["attend_split"]) for t in launches] == [(64, 32, 64), (32, 64, 64)]
    assert LatentDecodeAttention(model.config, 4096).one_row == LatentDecodeAttention(model.config, 4096).launch
    cache = prefilled_cache(model, [37, 20])
    for rows in ([0], [0, 1]):
        positions = torch.tensor([[37], [20]], device=DEVICE)[rows]
        ids = torch.tensor([[3], [7]], device=DEVICE)[rows]
        logits = []
        for chosen in (None, attend):
            model.set_decode_attention(chosen)
            with torch.no_grad():
                out = model(ids, positions=positions, cache=copy.deepcopy(cache).select(rows))
            logits.append(out.logits[:, -1].double())
        model.set_decode_attention(None)
        bound = model.config.kv_lora_rank * 2**-24 * logits[0].abs().max().item()
        torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=bound)


@pytest.mark.parametrize("kernel", [dict(), dict(attend_tma=1)], ids=["plain", "tma"])
def test_decode_attention_compiles_whole(kernel):
    """The model's decode step with the kernels compiles as one graph (the custom op's fake
    shape; the launch a constant) and gives eager's logits; the TMA kernel's descriptors are
    made inside the op, from its real tensors."""
    model = sharp_model()
    cache = prefilled_cache(model, [30, 12])
    model.set_decode_attention(LatentDecodeAttention(model.config, 40, {**LAUNCH, **kernel}))
    positions, ids = torch.tensor([[30], [12]], device=DEVICE), torch.tensor([[3], [7]], device=DEVICE)

    def step(ids, positions, cache):
        return model(ids, positions=positions, cache=cache).logits
    with torch.no_grad():
        eager = step(ids, positions, copy.deepcopy(cache))
        compiled = torch.compile(step, fullgraph=True)(ids, positions, copy.deepcopy(cache))
    model.set_decode_attention(None)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5 * eager.abs().max().item())


def test_engine_decodes_the_reference_tokens_with_the_kernels():
    """Greedy generation of two prompts of different lengths, with the decode attention kernels
    (called once a layer and step) and with the absorbed attention: both give the tokens of full
    forwards without a cache. The model copies its prompt's period (copying_model), so each
    choice leads by over a logit and paths that round differently (BF16, compiled on a GPU)
    cannot flip it, where sharp_model's amplified rounding did. After the engine's forwards the
    model's layers are as they were (a later generate() or engine must not get this engine's
    cache length)."""
    from nanoseek.model.mla import MLA
    model = copying_model()
    layers = [m for m in model.modules() if isinstance(m, MLA)]
    prompts, want = copy_prompts(12)
    for prompt, tokens in zip(prompts, want):
        reference, margins = greedy_without_cache(model, prompt, 12)
        assert reference == tokens and min(margins) > 1.0, (reference, margins)  # a decisive copier
    calls = []
    for choice in ("torch", "kernel"):
        engine = Engine(model, max_batch=2, max_len=40,
                        config=InferenceConfig(decode_attention=choice, fused_launch=LAUNCH))
        attend = engine.runner.decode_attend
        assert (attend is None) == (choice == "torch")
        if attend is not None:
            engine.runner.decode_attend = lambda *args: calls.append(1) or attend(*args)
        out = [o.token_ids for o in engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0))]
        assert out == want, choice
        assert all(m.decode_attention is None for m in layers)
        graphs = engine.runner.graphs is not None
    # once a main layer and batched decode step (11); a CUDA graph replays its kernels without
    # calling the op, which runs only while a step is compiled and captured
    L = model.config.num_hidden_layers
    assert (len(calls) % L == 0 and 0 < len(calls) < 11 * L) if graphs else len(calls) == 11 * L


def test_decode_attention_choice(hopper, monkeypatch):
    """auto takes the kernels on a Hopper GPU with a 16-bit cache longer than SHORT_CACHE only
    (for a compiled step of 64+ heads, from WIDE_CACHE), the last position idle unless
    speculating; kernel on a model they cannot take says why; an unknown choice is a config
    error."""
    from nanoseek.infer.engine import WIDE_CACHE, decode_attention
    from nanoseek.infer.fused import SHORT_CACHE
    model = sharp_model()
    auto, cuda = InferenceConfig(compile=False), torch.device("cuda")
    assert isinstance(decode_attention(InferenceConfig(), model, SHORT_CACHE + 1, cuda), LatentDecodeAttention)
    # 128 heads (V3's): a compiled step keeps the absorbed attention below WIDE_CACHE, an eager one not
    wide = sharp_model(num_attention_heads=128)
    assert decode_attention(InferenceConfig(), wide, WIDE_CACHE - 1, cuda) is None
    assert isinstance(decode_attention(InferenceConfig(), wide, WIDE_CACHE, cuda), LatentDecodeAttention)
    for eager in (auto, InferenceConfig(cuda_graphs=False)):  # compile without graphs: eager steps
        assert isinstance(decode_attention(eager, wide, SHORT_CACHE + 1, cuda), LatentDecodeAttention)
    assert decode_attention(auto, model, SHORT_CACHE, cuda) is None
    chosen = decode_attention(auto, model, SHORT_CACHE + 1, cuda)
    # a captured step's padding rows sit at the last position, which speculation's verify may write
    assert isinstance(chosen, LatentDecodeAttention) and chosen.idle == SHORT_CACHE
    assert decode_attention(auto, model, SHORT_CACHE + 1, cuda, speculative_k=2).idle == -1
    assert decode_attention(auto, model, SHORT_CACHE + 1, torch.device("cpu")) is None
    assert decode_attention(auto, model, SHORT_CACHE + 1, cuda, cache_dtype=torch.float32) is None
    kernel = InferenceConfig(decode_attention="kernel")
    assert isinstance(decode_attention(kernel, model, 64, cuda, cache_dtype=torch.float32), LatentDecodeAttention)
    with pytest.raises(ValueError, match="16-bit cache at a latent 512 wide .*float32.*use decode_attention='torch'"):
        decode_attention(kernel, sharp_model(kv_lora_rank=512), 64, cuda, cache_dtype=torch.float32)
    assert decode_attention(InferenceConfig(decode_attention="torch"), model, 10**5, cuda) is None
    with monkeypatch.context() as ampere:  # where the kernels' launches were not measured
        ampere.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
        assert decode_attention(auto, model, SHORT_CACHE + 1, cuda) is None
    mha = sharp_model(attention_type="mha")
    with pytest.raises(ValueError, match="attention_type 'mha' \\(MLA only\\); use decode_attention='torch'"):
        decode_attention(InferenceConfig(decode_attention="kernel"), mha, 64, cuda)
    with pytest.raises(ConfigError, match="decode_attention"):
        InferenceConfig(decode_attention="flash")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="kernels run on a GPU .*not on cpu; use decode_attention='torch'"):
        decode_attention(InferenceConfig(decode_attention="kernel"), model, 64, torch.device("cpu"))


def test_the_op_takes_any_strides():
    """A compiled graph may hand the op other strides than eager's: the kernels index each
    row's positions and channels packed, so the op packs what it reads first (same output)."""
    from nanoseek.infer.latent_attention import OP_LAUNCH, mla_decode_attention
    from nanoseek.infer.fused import fused_step_launch
    g = torch.Generator().manual_seed(0)
    B, H, S, C, R, V = 2, 16, 40, 32, 16, 8
    q_lat, q_pe = torch.randn(B, H, C, generator=g), torch.randn(B, H, R, generator=g)
    ckv, kpe = torch.randn(B, S, C, generator=g), torch.randn(B, S, R, generator=g)
    w_kvb, positions = torch.randn(H * (4 + V), C, generator=g), torch.tensor([37, 5])
    t = fused_step_launch(sharp_model().config, S, LAUNCH)
    launch = [int(t[k]) for k in OP_LAUNCH]
    run = [(x.to(DEVICE)) for x in (q_lat, q_pe, ckv, kpe, positions, w_kvb)]
    packed = mla_decode_attention(*run, 0.1, V, launch, -1)
    strided = [x.transpose(-2, -1).contiguous().transpose(-2, -1) for x in run[:4]]  # channels outermost
    assert not strided[2].is_contiguous()
    torch.testing.assert_close(mla_decode_attention(*strided, *run[4:], 0.1, V, launch, -1), packed,
                               rtol=0, atol=0)


def test_the_op_reads_a_cut_view_of_the_cache_in_place(monkeypatch):
    """An eager step's view covers fewer positions than the cache holds (StaticCache.select with
    kv_len): its rows are not contiguous, but each row's positions and channels are packed, which
    is all the kernels need. The op hands the kernels the cache's own memory, not a copy."""
    from nanoseek.infer import latent_attention as la
    from nanoseek.model import StaticCache
    cfg = sharp_model().config
    H, C, R, V = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.v_head_dim
    cache = StaticCache(cfg, 2, 64)
    positions = torch.tensor([[37], [5]])
    ckv, kpe = cache.select([0, 1], kv_len=40).update(0, positions, torch.randn(2, 1, C), torch.randn(2, 1, R))
    assert not ckv.is_contiguous()
    handed = []

    def attend(q_lat, q_pe, c, k, *rest):
        handed.append((c, k))
        return torch.zeros(2, H * V)
    monkeypatch.setattr(la, "attend_latent", attend)
    la.mla_decode_attention(torch.randn(2, H, C), torch.randn(2, H, R), ckv, kpe, positions[:, 0],
                            torch.randn(H * (cfg.qk_nope_head_dim + V), C), 0.1, V, [16] * len(la.OP_LAUNCH), -1)
    (c, k), = handed
    assert c.data_ptr() == cache.layers[0][0].data_ptr() and k.data_ptr() == cache.layers[0][1].data_ptr()
    assert c.stride(0) == 64 * C and c.shape[1] == 40  # the cache's row stride, the view's positions


@pytest.mark.gpu
@pytest.mark.parametrize("name, lengths, launch", [
    ("deepseek-v2-lite", [900, 37], {}), ("deepseek-v2-lite", [900, 37], dict(attend_transposed=1)),
    ("deepseek-v3", [900], {}), ("deepseek-v3", [900, 37], dict(attend_tma=1, attend_heads=64, attend_warps=8)),
    ("deepseek-v3", [900, 37], dict(attend_tma=1, attend_heads=64, attend_block=32, attend_stages=3, attend_warps=8))],
    ids=lambda v: ("_".join(f"{k}{x}" for k, x in v.items()) or "rule") if isinstance(v, dict) else None)
def test_bf16_decode_attention_kernels_at_real_widths(name, lengths, launch):
    """On a GPU, BF16, DeepSeek-V2-Lite's layer widths (hidden 2048, 16 heads, no query LoRA,
    latent 512; 2 layers, 8 experts and a small vocabulary to fit a float32 reference beside
    it), rows at positions 900 and 37 of a 1,024-position cache: the model's decode step with
    the kernels, at the launch derived for these widths, is as close to float32 as the BF16
    model's own absorbed attention. The same at V3's widths (128 heads; 64 experts) for one
    row, with the launch of a 32K cache: one_row_launch's 64 heads a program; and for two rows
    with the TMA kernel (64 heads, 8 warps, blocks of 64 in 2 stages or of 32 in 3)."""
    from nanoseek.config import preset
    from nanoseek.hf import to_dtype
    from nanoseek.model import Transformer
    torch.manual_seed(0)
    cfg = preset(name, num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=8 if "lite" in name else 64,
                 vocab_size=2048, num_nextn_predict_layers=0)
    model = Transformer(cfg).to(DEVICE).eval()
    with torch.no_grad():  # V3's sigmoid scores all sit near one value: a bias spread makes routing decisive
        for r in model.routers().values():
            if r.e_score_correction_bias is not None:
                r.e_score_correction_bias.normal_(0, 1)
    half = to_dtype(copy.deepcopy(model), torch.bfloat16)
    S = 1024
    ids = torch.randint(0, cfg.vocab_size, (len(lengths), max(lengths)), device=DEVICE)
    cache32 = prefilled_cache(model, lengths, max_len=S, ids=ids)
    cache16 = prefilled_cache(half, lengths, max_len=S, ids=ids, dtype=torch.bfloat16)
    nxt = torch.randint(0, cfg.vocab_size, (len(lengths), 1), device=DEVICE)
    positions = torch.tensor([[n] for n in lengths], device=DEVICE)
    attend = LatentDecodeAttention(cfg, S if "lite" in name else 32768, launch)
    if "v3" in name and len(lengths) == 1:
        assert attend.one_row != attend.launch  # the one-row launch is what runs
    with torch.no_grad():
        ref = model(nxt, positions=positions, cache=copy.deepcopy(cache32)).logits[:, -1]
        plain = half(nxt, positions=positions, cache=copy.deepcopy(cache16)).logits[:, -1].float()
        half.set_decode_attention(attend)
        got = half(nxt, positions=positions, cache=copy.deepcopy(cache16)).logits[:, -1].float()
        half.set_decode_attention(None)

    def rel(x):
        return float((x - ref).norm() / ref.norm())
    assert rel(got) <= 1.5 * rel(plain) + 1e-3, (rel(got), rel(plain))
