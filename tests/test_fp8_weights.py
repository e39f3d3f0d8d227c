"""FP8 weights at inference (infer/fp8_weights.py, kernels/fp8_linear.py): an FP8 checkpoint
loaded FP8-resident computes what the model dequantised at load computes, in about half
the memory; the weight-only FP8 kernel against its dequantise-then-matmul twin."""

import pytest
import torch
from safetensors.torch import save_file

from conftest import float32_tolerance  # tests/ is on sys.path
from nanoseek import Transformer, from_pretrained, preset
from nanoseek.hf import SCALE_SUFFIX, hf_config_dict, quantize_fp8_blockwise, save_pretrained, to_hf_state_dict
from nanoseek.infer.config import InferenceConfig
from nanoseek.infer.engine import Engine
from nanoseek.infer.fp8_weights import (FP8Experts, FP8Linear, has_fp8_weights, keep_fp8_weights,
                                         quantize_weights, weight_bytes)
from nanoseek.infer.sampling import SamplingParams

# kept in BF16 by the official V3 checkpoints: the embedding, the output heads, the routers
NOT_FP8 = ("embed_tokens", "lm_head", "shared_head.head", "mlp.gate.")


def write_fp8_checkpoint(model: Transformer, path, block=(128, 128)) -> None:
    """model as an official V3 checkpoint holds it: its 2-D layer weights float8_e4m3fn with
    `weight_scale_inv` block scales, the rest BF16 (the router float32)."""
    save_pretrained(model, path, dtype=torch.bfloat16)  # config.json, and the layout
    tensors = {}
    for key, t in to_hf_state_dict(model).items():
        t = t.detach().float().contiguous()
        if t.dim() == 2 and key.endswith(".weight") and not any(n in key for n in NOT_FP8):
            tensors[key], tensors[key + SCALE_SUFFIX] = quantize_fp8_blockwise(t, block)
        else:
            tensors[key] = t if "mlp.gate." in key else t.to(torch.bfloat16)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "model.safetensors")
    config = hf_config_dict(model, torch.bfloat16)
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block)}
    (path / "config.json").write_text(__import__("json").dumps(config))


def sharp_tiny(**overrides) -> Transformer:
    """The tiny preset with its output head scaled up: decisive greedy choices."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
        model.lm_head.weight.mul_(4)
    return model


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8") / "tiny-fp8"
    write_fp8_checkpoint(sharp_tiny(), path, block=(32, 32))  # blocks smaller than tiny's widths
    return path


def load(path, dtype, kernel="twin"):
    return from_pretrained(path, dtype=dtype, keep_fp8=lambda m, names, block: keep_fp8_weights(m, names, block, kernel))


def test_fp8_resident_logits_equal_the_dequantized_models(fp8_dir):
    """float32: the FP8-resident model (weights dequantised where they are read) and the model
    dequantised at load compute the same logits bit for bit, for a prefill through the
    expanded attention and a cached decode step through the absorbed one; the checkpoint's
    FP8 layers are FP8Linear / FP8Experts, kv_b_proj dequantised at load."""
    fp8, plain = load(fp8_dir, torch.float32), from_pretrained(fp8_dir, dtype=torch.float32)
    attn = fp8.model.layers[1].self_attn
    assert isinstance(attn.q_a_proj, FP8Linear) and attn.q_a_proj.weight.dtype == torch.float8_e4m3fn
    assert type(attn.kv_b_proj) is torch.nn.Linear
    assert isinstance(fp8.model.layers[1].mlp.experts, FP8Experts)
    assert type(fp8.lm_head) is torch.nn.Linear
    ids = torch.randint(0, fp8.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(fp8(ids).logits, plain(ids).logits)
        logits = []
        for model in (fp8, plain):
            from nanoseek.model import StaticCache
            cache = StaticCache(model.config, 2, 16)
            model(ids, positions=torch.arange(9).expand(2, 9), cache=cache, absorb=False)
            logits.append(model(ids[:, :1], positions=torch.full((2, 1), 9), cache=cache).logits)
    assert torch.equal(*logits)


def test_fp8_weights_take_about_half_the_bytes_of_bf16(tmp_path):
    """BF16 compute: the FP8-resident model holds each FP8 weight in one byte plus a float32
    scale per 128x128 block, the rest as the BF16 model does: a model whose layers dominate
    (V3-like 128-multiples, a small vocabulary) takes a little over half the BF16 bytes."""
    model = sharp_tiny(vocab_size=256, hidden_size=256, moe_intermediate_size=128, intermediate_size=512,
                       q_lora_rank=128, kv_lora_rank=128, num_attention_heads=2, qk_nope_head_dim=64,
                       v_head_dim=64, num_nextn_predict_layers=0)
    write_fp8_checkpoint(model, tmp_path / "fp8")
    fp8, bf16 = load(tmp_path / "fp8", torch.bfloat16), from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16)
    quantized = sum(t.numel() for n, t in fp8.state_dict().items() if t.dtype == torch.float8_e4m3fn)
    scales = sum(t.numel() for n, t in fp8.state_dict().items() if n.endswith(SCALE_SUFFIX))
    assert weight_bytes(fp8) == weight_bytes(bf16) - quantized + 4 * scales  # 2 bytes -> 1, + scales
    assert 0.5 < weight_bytes(fp8) / weight_bytes(bf16) < 0.6


@pytest.mark.parametrize("M, N, K, block", [(1, 600, 300, (128, 128)), (1, 40, 96, (16, 32)),
                                            (1, 24, 4500, (128, 128)), (3, 200, 300, (128, 128)),
                                            (8, 40, 300, (16, 32)), (16, 64, 96, (64, 32))])
@pytest.mark.parametrize("split_blocks", [4, 1])
def test_fp8_kernel_matches_the_dequantized_matmul(M, N, K, block, split_blocks, monkeypatch):
    """kernels/fp8_linear.py (Triton's interpreter without a GPU) against the twin, for edge
    blocks cut short on both sides: one row by the GEMV (a K past GEMV_K in three loads), more
    by the tensor-core kernel, whose K is split in shares of SPLIT_BLOCKS blocks where few
    programs would run (with 1, every case past one row splits, the last share short): float32
    sums of K products in another order, the scale applied per block after them."""
    pytest.importorskip("triton")
    from nanoseek.kernels import fp8_linear
    monkeypatch.setattr(fp8_linear, "SPLIT_BLOCKS", split_blocks)
    if M > 1 and split_blocks == 1:
        assert fp8_linear.k_shares(N, K, block)[0] > 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    w, scale = quantize_fp8_blockwise(torch.randn(N, K), block)
    x = torch.randn(M, K)
    from nanoseek.hf import dequantize_fp8_blockwise
    want = x.double() @ dequantize_fp8_blockwise(w, scale, block).double().T
    got = fp8_linear.fp8_weight_linear(x.to(device), w.to(device), scale.to(device), list(block)).cpu()
    bound = torch.finfo(torch.float32).eps * K * float((x.abs().double() @ dequantize_fp8_blockwise(
        w, scale, block).abs().double().T).max())
    torch.testing.assert_close(got.double(), want, rtol=0, atol=bound)


def test_fp8_linear_takes_the_kernel_where_told(fp8_dir):
    """kernel="triton": decode-sized inputs go through the kernel (up to 64 rows), larger
    ones and autograd through the twin; the logits of a decode step stay within float32's
    reordering bound of the twin's."""
    pytest.importorskip("triton")
    fp8, twin = load(fp8_dir, torch.float32, kernel="triton"), load(fp8_dir, torch.float32)
    layer = fp8.model.layers[0].self_attn.q_a_proj
    x = torch.randn(4, layer.in_features)
    with torch.no_grad():
        assert layer.takes_kernel(x) and not layer.takes_kernel(torch.randn(65, layer.in_features))
    assert not layer.takes_kernel(x)  # grad on
    ids = torch.randint(0, fp8.config.vocab_size, (2, 3))
    with torch.no_grad():
        got, want = fp8(ids).logits, twin(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=float32_tolerance(fp8.config, 3, float(want.abs().max())))


def test_the_engine_decodes_an_fp8_checkpoint_as_the_dequantized_model(fp8_dir):
    """Greedy tokens of the engine on the FP8-resident model equal the dequantised model's."""
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]

    def tokens(model):
        engine = Engine(model, max_batch=2, max_len=32, config=InferenceConfig(cuda_graphs=False))
        return [o.token_ids for o in engine.generate(prompts, SamplingParams(max_tokens=12))]
    assert tokens(load(fp8_dir, torch.float32)) == tokens(from_pretrained(fp8_dir, dtype=torch.float32))


def test_serve_keeps_an_fp8_checkpoint_fp8_unless_told(fp8_dir, tmp_path):
    """`serve --model DIR` of an FP8 checkpoint serves FP8 weights; `--dtype bf16` dequantizes;
    a BF16 checkpoint stays as it is under the default."""
    from nanoseek.cli import build_parser
    from nanoseek.data.tokenizer import byte_tokenizer, save_tokenizer
    from nanoseek.serve.launch import inference_config, load_engine
    save_tokenizer(byte_tokenizer(300), fp8_dir)

    def served(*flags, model=fp8_dir):
        args = build_parser().parse_args(["serve", "--model", str(model), "--device", "cpu", "--max-len", "32",
                                          *flags])
        return load_engine(args, inference_config(args))[0].model
    assert has_fp8_weights(served())
    plain = served("--dtype", "bf16")
    assert not has_fp8_weights(plain) and plain.model.embed_tokens.weight.dtype == torch.bfloat16
    save_pretrained(sharp_tiny(), tmp_path / "bf16", dtype=torch.bfloat16)
    save_tokenizer(byte_tokenizer(300), tmp_path / "bf16")
    assert not has_fp8_weights(served(model=tmp_path / "bf16"))


def dequantize_cases():
    """FP8 weights with their 128x128 block scales: ragged edges, one matrix and a stack of
    three, columns spanning five decades (so that the blocks' scales differ)."""
    torch.manual_seed(0)
    out = []
    for shape in [(300, 200), (3, 130, 260), (128, 128)]:
        x = torch.randn(*shape) * torch.logspace(-3, 2, shape[-1])
        pairs = [quantize_fp8_blockwise(m) for m in x.reshape(-1, *shape[-2:])]
        out.append((torch.stack([w for w, _ in pairs]).view(shape), torch.stack([s for _, s in pairs]).squeeze(0)))
    return out


def test_fp8_dequantize_kernel_is_the_twin():
    """kernels/fp8_linear.fp8_dequantize against the twin (fp8/quant.dequantize in float32, then
    a cast): bit for bit into float32 and float16. Into BF16 within one unit of BF16's last
    place: Triton's interpreter casts float32 to BF16 by truncation whatever the rounding asked
    (the GPU rounds to nearest even: the GPU test below asks bit equality)."""
    pytest.importorskip("triton")
    from nanoseek.hf import dequantize_fp8_blockwise
    from nanoseek.kernels.fp8_linear import fp8_dequantize
    for w, scale in dequantize_cases():
        twin = dequantize_fp8_blockwise(w, scale)
        for dtype in (torch.float32, torch.float16):
            assert torch.equal(fp8_dequantize(w, scale, [128, 128], dtype), twin.to(dtype)), (w.shape, dtype)
        got = fp8_dequantize(w, scale, [128, 128], torch.bfloat16).float()
        assert bool(((got - twin).abs() <= 2 ** -7 * twin.abs()).all()), w.shape


def test_fp8_linear_prefill_dequantizes_by_the_kernel_where_kernels_run(monkeypatch):
    """Past the kernels' 64 rows an FP8Linear dequantizes its weight and calls cuBLAS: through
    fp8_dequantize where its kernel choice runs kernels (the twin's values), through torch for
    the twin."""
    pytest.importorskip("triton")
    from nanoseek.infer.fp8_weights import FP8Linear
    from nanoseek.kernels import fp8_linear
    calls = []
    real = fp8_linear.fp8_dequantize
    monkeypatch.setattr(fp8_linear, "fp8_dequantize", lambda *a: calls.append(a[0].shape) or real(*a))
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 192, bias=False)
    fast, twin = FP8Linear(linear, (128, 128), "triton"), FP8Linear(linear, (128, 128), "twin")
    x = torch.randn(70, 256)
    with torch.no_grad():
        got, want = fast(x), twin(x)
    assert calls == [torch.Size([192, 256])]
    assert torch.equal(got, want)  # float32: the same weight, the same matmul


@pytest.mark.gpu
def test_fp8_dequantize_kernel_on_gpu_is_the_twin_bit_for_bit():
    """On a GPU the kernel rounds its float32 products to nearest even, as the twin's cast does:
    equal in BF16 too."""
    from nanoseek.hf import dequantize_fp8_blockwise
    from nanoseek.kernels.fp8_linear import fp8_dequantize
    for w, scale in dequantize_cases():
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            got = fp8_dequantize(w.cuda(), scale.cuda(), [128, 128], dtype).cpu()
            assert torch.equal(got, dequantize_fp8_blockwise(w, scale).to(dtype)), (w.shape, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 3, 8])
def test_bf16_fp8_kernel_on_gpu_is_as_close_as_bf16_rounding(M):
    """On a GPU in BF16: the kernel's output against the float64 product of the same FP8
    weights is within BF16's rounding of the result: float32 sums, one rounding to BF16 on
    store. The tensor cores' products (3 and 8 rows) are exact; the GEMV's (1 row) round twice
    in float32, the weight times its scale and that times x."""
    from nanoseek.hf import dequantize_fp8_blockwise
    from nanoseek.kernels.fp8_linear import fp8_weight_linear
    w, scale = quantize_fp8_blockwise(torch.randn(1024, 2048))
    x = torch.randn(M, 2048).to(torch.bfloat16)
    w64 = dequantize_fp8_blockwise(w, scale).double()
    want = x.double() @ w64.T
    got = fp8_weight_linear(x.cuda(), w.cuda(), scale.cuda(), [128, 128]).cpu().double()
    bound = 2 ** -8 * want.abs() + (2048 + 2) * torch.finfo(torch.float32).eps * (x.double().abs() @ w64.abs().T)
    assert bool(((got - want).abs() <= bound).all())


def decode_argmax(model, seqs: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced greedy choices of a cached decode: seqs [B, T] prefilled up to `start`,
    then one token a step through the cache (decode-sized inputs: the FP8 kernels' rows);
    the argmax after each of positions start-1 .. T-2, [B, T - start], and those logits
    [B, T - start, V] in float32."""
    from nanoseek.infer.generate import forced_decode
    steps = torch.stack([logits.float() for logits in forced_decode(model, seqs, start)], 1)
    return steps.argmax(-1), steps


def near_ties(logits: torch.Tensor, chosen: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Where two choices differ, whether the reference logits hold them within 4 BF16 units of
    the largest logit (2^-6 of it): a tie that another kernel's rounding may break either way."""
    gap = logits.gather(-1, chosen[..., None]) - logits.gather(-1, other[..., None])
    return (chosen == other) | (gap[..., 0].abs() <= 2 ** -6 * logits.abs().amax(-1))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fp8_model_decodes_the_dequantized_models_tokens(fp8_dir, device):
    """BF16 compute, teacher-forced over the engine's greedy continuations (a cached decode,
    decode-sized inputs: the FP8 kernels' rows). On the CPU both models compute with the same
    dequantised BF16 weights, so every greedy choice agrees. On the GPU the FP8 weights go
    through the FP8 kernel, whose products are exact where the dequantised model rounded each
    weight to BF16: both approximate the float32 model of the checkpoint's exact weights, and
    the FP8-resident one may be no farther from it than the BF16 one (2x slack for the two
    kernels' accumulation orders)."""
    from nanoseek.infer.engine import Engine
    bf16 = from_pretrained(fp8_dir, dtype=torch.bfloat16, device=device)
    fp8 = from_pretrained(fp8_dir, dtype=torch.bfloat16, device=device, keep_fp8=keep_fp8_weights)
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12], [1, 2, 3, 4]]
    outs = Engine(bf16, max_batch=3, max_len=64).generate(prompts, SamplingParams(max_tokens=32, ignore_eos=True))
    seqs = torch.tensor([p + o.token_ids for p, o in zip(prompts, outs)], device=device)
    (want, logits), (got, fp8_logits) = decode_argmax(bf16, seqs, 4), decode_argmax(fp8, seqs, 4)
    if device == "cpu":
        # the cached decode reproduces the engine's greedy tokens but for near-ties; both models
        # dequantise the FP8 weights to the same BF16 values, so every choice agrees
        assert near_ties(logits, want, seqs[:, 4:]).all()
        assert torch.equal(got, want)
    else:
        # a random tiny model's router turns some roundings into another expert, which moves
        # that position's logits far: the median position's error is the measure, not the worst
        _, exact = decode_argmax(from_pretrained(fp8_dir, dtype=torch.float32, device=device), seqs, 4)
        fp8_err, bf16_err = median_error(fp8_logits, exact), median_error(logits, exact)
        assert fp8_err <= 2 * bf16_err, (fp8_err, bf16_err)


def median_error(logits: torch.Tensor, exact: torch.Tensor) -> float:
    """The median over positions of ||logits - exact|| / ||exact||."""
    return ((logits - exact).norm(dim=-1) / exact.norm(dim=-1)).median().item()


def test_the_fused_step_takes_an_fp8_checkpoint_and_says_what_it_cannot(fp8_dir):
    """The fused Triton step reads an FP8 checkpoint's weights as held (its logits against the
    dequantised twin: tests/test_fused_decode.py); a layout its kernels cannot read says why, and
    the engine then keeps the model step."""
    pytest.importorskip("triton")
    from torch import nn

    from nanoseek.infer.fused import FusedDecoder, fp8_layout
    from nanoseek.model import StaticCache
    fp8 = load(fp8_dir, torch.float32)
    assert FusedDecoder.unsupported(fp8.config, fp8) is None
    assert fp8_layout(fp8) == ((32, 32), None)
    assert fp8_layout(load(fp8_dir, torch.float32, kernel="w8a8"))[1].startswith("FP8 weights with W8A8 kernels")
    with pytest.raises(ValueError, match="blocks of 32 rows take at most 32 rows a program"):
        FusedDecoder(fp8, StaticCache(fp8.config, 1, 8), 1, launch=dict(up_rows=64))
    # the rule's rows at tiny's widths (64) are cut to a block's, the warps following them
    step = FusedDecoder(fp8, StaticCache(fp8.config, 1, 8), 1)
    assert (step.t["gemv_rows"], step.t["up_rows"]) == (32, 32) and step.t["up_warps"] == 2
    assert fp8_layout(quantize_weights(Transformer(preset("tiny")), (1, 32), "twin"))[1].startswith(
        "FP8 scale blocks of 1x32")
    attn = fp8.model.layers[1].self_attn
    attn.o_proj = nn.Linear(attn.o_proj.in_features, attn.o_proj.out_features, bias=False)
    assert FusedDecoder.unsupported(fp8.config, fp8) == \
        "FP8 and 16-bit layer weights mixed (self_attn.o_proj is not FP8)"
    two_shared = quantize_weights(Transformer(preset("tiny", n_shared_experts=2, moe_intermediate_size=48)),
                                  (32, 32), "twin")
    assert fp8_layout(two_shared)[1] == "shared experts of width 48 in FP8 blocks of 32 rows (a multiple needed)"


def test_quantizing_a_loaded_model_equals_loading_its_fp8_checkpoint(fp8_dir, tmp_path):
    """quantize_weights on a loaded (dequantised) model gives the FP8 values and block scales
    its FP8 checkpoint holds: the in-memory way to the FP8-resident model."""
    from nanoseek.infer.fp8_weights import quantize_weights
    model = sharp_tiny()
    write_fp8_checkpoint(model, tmp_path / "ckpt", block=(32, 32))
    loaded = load(tmp_path / "ckpt", torch.float32)
    quantized = quantize_weights(from_pretrained(tmp_path / "ckpt", dtype=torch.float32), (32, 32), "twin")
    want = {k: v for k, v in loaded.state_dict().items() if v.dtype == torch.float8_e4m3fn or k.endswith(SCALE_SUFFIX)}
    got = quantized.state_dict()
    assert want and all(torch.equal(got[k].float(), v.float()) for k, v in want.items())


def hand_w8a8(x: torch.Tensor, w_fp8: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """x quantised by hand per row and 128 columns (float32 scale amax/448, x/scale rounded
    to E4M3), times the dequantised FP8 weight, in float64."""
    from nanoseek.hf import dequantize_fp8_blockwise
    tiles = x.float().unflatten(-1, (-1, 128))
    scale = tiles.abs().amax(-1, keepdim=True) / 448
    x_q = ((tiles / scale).to(torch.float8_e4m3fn).double() * scale.double()).flatten(-2)
    return x_q @ dequantize_fp8_blockwise(w_fp8, scale_inv).double().T


def w8a8_linear(out_features: int, in_features: int) -> FP8Linear:
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    return FP8Linear(linear, (128, 128), kernel="w8a8")


def test_w8a8_quantizes_activations_per_1x128_tile():
    """kernel="w8a8" on the CPU (the float32 twin): the hand-quantised activations times the
    FP8 weight, to float32 rounding of the K-long sums."""
    torch.manual_seed(0)
    layer = w8a8_linear(192, 256)
    x = torch.randn(3, 256) * torch.logspace(-2, 2, 256)  # tiles of very different ranges
    with torch.no_grad():
        got = layer(x).double()
    want = hand_w8a8(x, layer.weight, layer.weight_scale_inv)
    from nanoseek.hf import dequantize_fp8_blockwise
    mag = x.double().abs() @ dequantize_fp8_blockwise(layer.weight, layer.weight_scale_inv).double().abs().T
    assert bool(((got - want).abs() <= 2 * 256 * torch.finfo(torch.float32).eps * mag).all())
    # and not the weight-only product: the activations' rounding shows
    layer.kernel = "twin"
    with torch.no_grad():
        assert not torch.allclose(layer(x).double(), want, rtol=1e-4, atol=0)


@pytest.mark.gpu
def test_gpu_w8a8_matches_the_hand_product_at_decode_and_prefill_rows():
    """On a Hopper GPU (cuBLAS's blockwise FP8 GEMM, rows padded to 16): BF16 output within
    BF16 rounding of the float64 hand product plus the tensor cores' accumulation error.
    Inside each 128-long K block the tensor cores add 32 products per MMA step, aligned to the
    step's largest and kept to about 14 bits (V3 §3.3.2): each product can lose up to 2^-13 of
    that largest, 2^-13 · 128 · max|x·w| ≤ 2^-6 of a block's Σ|x·w| at worst. Products of random
    signs lose in random directions, so the loss grows as the square root of their count:
    √128 · 2^-13 ≈ 2^-9.5 of Σ|x·w|, the bound used (an H100 measured 2^-10 at K = 2048 with
    300 rows). A wrong scale or tile is off by O(1) of Σ|x·w|. For 1 (decode) and 300 (prefill)
    rows."""
    torch.manual_seed(0)
    layer = w8a8_linear(1024, 2048).cuda()
    for rows in (1, 300):
        x = torch.randn(rows, 2048).to(torch.bfloat16).cuda()
        with torch.no_grad():
            got = layer(x).double().cpu()
        want = hand_w8a8(x.cpu().float(), layer.weight.cpu(), layer.weight_scale_inv.cpu())
        from nanoseek.hf import dequantize_fp8_blockwise
        w64 = dequantize_fp8_blockwise(layer.weight.cpu(), layer.weight_scale_inv.cpu()).double()
        mag = x.cpu().double().abs() @ w64.abs().T
        assert got.shape == (rows, 1024)
        err, bound = (got - want).abs(), 2 ** -8 * want.abs() + 2 ** -9.5 * mag
        i = int((err - bound).argmax())
        assert bool((err <= bound).all()), (f"rows {rows}: worst at {divmod(i, 1024)}: got {got.flatten()[i]:.6g}, "
                                            f"want {want.flatten()[i]:.6g}, Σ|x·w| {mag.flatten()[i]:.4g}; "
                                            f"max err/Σ|x·w| {float((err / mag).max()):.3e}")


def test_decode_benchmark_counts_agreement_where_the_reference_is_decisive():
    """benchmarks/decode.py's FP8 agreement: over all forced positions, and over those where the
    BF16 reference's top-two gap exceeds 0.25, 0.5 and 1 standard deviations."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("decode_bench", Path(__file__).resolve().parents[1] / "benchmarks"
                                                  / "decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ref = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    gap = torch.tensor([[0.1, 0.3, 0.6, 2.0], [0.2, 0.4, 1.5, 0.05]])
    choice = torch.tensor([[9, 2, 3, 9], [5, 9, 7, 8]])  # wrong at gaps 0.1, 2.0 and 0.4
    got = bench.agreement(choice, (ref, gap))
    assert got["positions"] == 8 and got["same"] == 5 / 8
    assert got["gap_over_0.25_std"] == {"positions": 5, "same": 3 / 5}  # 0.3, 0.6, 2.0, 0.4, 1.5
    assert got["gap_over_0.5_std"] == {"positions": 3, "same": 2 / 3}   # 0.6, 2.0, 1.5
    assert got["gap_over_1.0_std"] == {"positions": 2, "same": 1 / 2}   # 2.0, 1.5


# ---------------------------------------------------------------------- a prefill's grouped experts
def fp8_experts(kernel: str, E=4, F=200, D=320, spread: bool = False) -> FP8Experts:
    """FP8 experts with 128x128 blocks cut short at both widths (F, D not multiples of 128);
    spread: expert e's weights 2^e times as large, so that each expert has its own scales."""
    from nanoseek.model.moe import Experts
    experts = Experts(E, D, F)
    for w in (experts.gate_proj, experts.up_proj, experts.down_proj):
        torch.nn.init.normal_(w, std=0.05)
        if spread:
            w.data *= 2.0 ** torch.arange(E)[:, None, None]
    return FP8Experts(experts, (128, 128), kernel)


def dequantized(experts: FP8Experts) -> tuple[torch.Tensor, ...]:
    from nanoseek.hf import dequantize_fp8_blockwise
    return tuple(dequantize_fp8_blockwise(getattr(experts, n), getattr(experts, n + SCALE_SUFFIX)).double()
                 for n in ("gate_proj", "up_proj", "down_proj"))


# tokens per expert: one expert without tokens, one with more than a 128-row tile
COUNTS = [3, 0, 130, 7]


def test_weight_only_grouped_kernel_matches_the_dequantized_product():
    """fp8/kernels.py's grouped GEMM with unquantized activations (Triton's interpreter without
    a GPU, float32): each row times its own expert's dequantized weight, to float32 rounding of
    the K-long sums (the block scales applied to partial sums instead of to each weight)."""
    pytest.importorskip("triton")
    from nanoseek.fp8.kernels import grouped_mm_fp8_weight
    from nanoseek.fp8.quant import first_tiles
    experts = fp8_experts("triton")
    offsets = torch.tensor(COUNTS).cumsum(0, dtype=torch.int32)
    x = torch.randn(sum(COUNTS), 320)
    got = grouped_mm_fp8_weight(x, experts.gate_proj, experts.gate_proj_scale_inv, offsets,
                                first_tiles(offsets)).double()
    w_gate = dequantized(experts)[0]
    expert_of_row = torch.repeat_interleave(torch.arange(4), torch.tensor(COUNTS))
    want = torch.einsum("md,mfd->mf", x.double(), w_gate[expert_of_row])
    mag = torch.einsum("md,mfd->mf", x.double().abs(), w_gate[expert_of_row].abs())
    assert got.shape == (sum(COUNTS), 200)
    assert bool(((got - want).abs() <= 320 * torch.finfo(torch.float32).eps * mag).all())


def test_fp8_experts_take_the_grouped_kernels_where_told():
    """Which grouped forwards read the FP8 weights in place: inference only, 128x128 blocks
    only, never the twin; "triton" under Triton's interpreter, "w8a8" anywhere (its float32
    twin without an FP8 GPU), "auto" only where the fast kernels run (not on a CPU)."""
    x = torch.randn(5, 320)
    with torch.no_grad():
        assert fp8_experts("triton").grouped_kernels_take(x)
        assert fp8_experts("w8a8").grouped_kernels_take(x)
        assert not fp8_experts("twin").grouped_kernels_take(x)
        assert not fp8_experts("auto").grouped_kernels_take(x)
        small_blocks = fp8_experts("triton")
        small_blocks.block = (32, 32)
        assert not small_blocks.grouped_kernels_take(x)
    assert not fp8_experts("triton").grouped_kernels_take(x)  # grad on: the twin


def test_fp8_experts_prefill_through_the_weight_only_kernel_is_the_twin(monkeypatch):
    """float32: the grouped forward of a prefill on the FP8 weights in place (the kernel runs
    for each of the three projections) gives the dequantised experts' output (kernel="twin")
    to float32 rounding through the SwiGLU's two chained sums (D, then F, scaled by the down
    weights' magnitude)."""
    pytest.importorskip("triton")
    from nanoseek.fp8 import kernels
    calls, op = [], kernels.grouped_mm_fp8_weight
    monkeypatch.setattr(kernels, "grouped_mm_fp8_weight", lambda *a: calls.append(a[0].shape) or op(*a))
    kernel, twin = fp8_experts("triton"), fp8_experts("twin")
    twin.load_state_dict(kernel.state_dict())
    N, K = 70, 2
    x = torch.randn(N, 320)
    # two distinct experts a token among 0, 2 and 3: expert 1 gets none
    idx = torch.tensor([0, 2, 3])[torch.stack([torch.randperm(3)[:K] for _ in range(N)])]
    weight = torch.rand(N, K)
    with torch.no_grad():
        got, want = kernel.forward_grouped(x, weight, idx).double(), twin.forward_grouped(x, weight, idx).double()
    w_gate, w_up, w_down = dequantized(kernel)
    h = (x.double().abs() @ w_gate.abs().amax(0).T) * (x.double().abs() @ w_up.abs().amax(0).T)
    bound = 8 * (320 + 200) * torch.finfo(torch.float32).eps * (h @ w_down.abs().amax(0).T)
    assert calls == [(N * K, 320), (N * K, 320), (N * K, 200)]  # gate, up, down; the twin none
    assert bool(((got - want).abs() <= bound).all())


def hand_w8a8_experts(x: torch.Tensor, counts: list[int], experts: FP8Experts) -> torch.Tensor:
    """Rows sorted by expert through the W8A8 SwiGLU by hand: x and the SwiGLU's output each
    quantised per row and 128 columns (hand_w8a8), float64 products with the FP8 weights."""
    out, start = [], 0
    for e, n in enumerate(counts):
        rows = x[start:start + n]
        start += n
        w = {name: (getattr(experts, name)[e], getattr(experts, name + SCALE_SUFFIX)[e])
             for name in ("gate_proj", "up_proj", "down_proj")}
        h = torch.nn.functional.silu(hand_w8a8(rows, *w["gate_proj"])) * hand_w8a8(rows, *w["up_proj"])
        out.append(hand_w8a8(h.float(), *w["down_proj"]))
    return torch.cat(out)


def test_w8a8_fp8_experts_quantize_the_activations_of_a_prefill():
    """kernel="w8a8" on a CPU (the FP8 GEMM's float32 twin): the hand-quantised SwiGLU of each
    expert's rows, to float32 rounding; not the dequantised experts' product."""
    experts = fp8_experts("w8a8", F=256, D=384)  # widths of whole 128-column tiles, as hand_w8a8 cuts
    counts = torch.tensor(COUNTS)
    x = torch.randn(sum(COUNTS), 384) * torch.logspace(-1, 1, 384)
    with torch.no_grad():
        got = experts.swiglu_sorted(x, counts).double()
        experts.kernel = "twin"
        twin = experts.swiglu_sorted(x, counts).double()
    want = hand_w8a8_experts(x, COUNTS, experts)
    # the SwiGLU's output is requantised from float32 values one rounding apart from the hand's:
    # a value on a rounding edge may land one E4M3 step (2^-3 of its tile's largest) the other way
    err = (got - want).abs() / want.abs().amax(-1, keepdim=True)
    assert float(err.median()) < 1e-5 and float(err.max()) < 2 ** -3
    assert float(((twin - want).abs() / want.abs().amax(-1, keepdim=True)).median()) > 1e-4


@pytest.mark.gpu
def test_gpu_fp8_experts_prefill_is_the_bf16_twin_to_bf16_rounding():
    """On a Hopper GPU in BF16 (kernel "auto"): the weight-only grouped kernels of a prefill
    against the float64 SwiGLU of the same FP8 weights, each GEMM within BF16's rounding of its
    result plus float32 sums; the dequantised BF16 twin alike, so the FP8 path is no farther."""
    experts = fp8_experts("auto", E=8, F=1408, D=2048).cuda()
    counts = torch.tensor([300, 0, 5, 128, 129, 64, 1, 400])
    x = torch.randn(int(counts.sum()), 2048, device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        assert experts.grouped_kernels_take(x)
        got = experts.swiglu_sorted(x, counts.cuda()).double().cpu()
        experts.kernel = "twin"
        twin = experts.swiglu_sorted(x, counts.cuda()).double().cpu()
    w_gate, w_up, w_down = (w.cpu() for w in dequantized(experts))
    expert_of_row = torch.repeat_interleave(torch.arange(8), counts)
    x64 = x.cpu().double()
    h = (torch.nn.functional.silu(torch.einsum("md,mfd->mf", x64, w_gate[expert_of_row]))
         * torch.einsum("md,mfd->mf", x64, w_up[expert_of_row]))
    want = torch.einsum("mf,mdf->md", h, w_down[expert_of_row])
    scale = want.abs().amax(-1, keepdim=True)
    fp8_err, twin_err = float(((got - want).abs() / scale).median()), float(((twin - want).abs() / scale).median())
    assert fp8_err <= 2 * twin_err + 2 ** -12, (fp8_err, twin_err)
    assert float(((got - want).abs() / scale).max()) < 2 ** -4


# ---------------------------------------------------------------------- a decode step's gathered experts
def hand_gathered_experts(x: torch.Tensor, idx: torch.Tensor, route: torch.Tensor,
                          weights: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Float64 on the experts' (gate, up, down) weights [E, ...]: y [N, K, D], each (token,
    slot)'s expert SwiGLU times its route weight; the same with every product's magnitude (for
    the rounding bound); and the hidden h [N, K, F] with its magnitude."""
    w_gate, w_up, w_down = (w.double()[idx] for w in weights)  # [N, K, ...]
    x64 = x.double()[:, None, :, None]
    gate, up = (w_gate @ x64)[..., 0], (w_up @ x64)[..., 0]
    h = torch.nn.functional.silu(gate) * up
    y = (w_down @ h[..., None])[..., 0] * route.double()[..., None]
    mag_h = (w_gate.abs() @ x64.abs())[..., 0] * (w_up.abs() @ x64.abs())[..., 0]
    mag = (w_down.abs() @ mag_h[..., None])[..., 0] * route.double()[..., None]
    return y, mag, h, mag_h


@pytest.mark.parametrize("gemv_k", [2048, 128])
def test_fp8_experts_gemv_matches_the_dequantized_experts(gemv_k, monkeypatch):
    """kernels/fp8_linear.fp8_experts_gemv (Triton's interpreter, float32): each (token, expert)
    pair through its own expert's FP8 weights in place, gate and up in one launch, down times the
    route weight, against float64 on the dequantised experts; F and D not multiples of 128, so
    each expert's scale rows end short (a scale or weight read from the wrong expert fails), and
    with gemv_k 128 every projection takes several loads. Bound: float32 sums over D then F."""
    pytest.importorskip("triton")
    from nanoseek.kernels import fp8_linear
    monkeypatch.setattr(fp8_linear, "GEMV_K", gemv_k)
    experts = fp8_experts("triton", spread=True)
    idx = torch.tensor([[3, 0], [1, 3]])  # two tokens, two experts each, expert 3 twice
    route = torch.rand(2, 2)
    x = torch.randn(2, 320)
    got = fp8_linear.fp8_experts_gemv(x, idx, route, experts.gate_proj, experts.up_proj, experts.down_proj,
                                      experts.gate_proj_scale_inv, experts.up_proj_scale_inv,
                                      experts.down_proj_scale_inv, [128, 128]).double()
    want, mag, _, _ = hand_gathered_experts(x, idx, route, dequantized(experts))
    assert got.shape == (2, 2, 320)
    assert bool(((got - want).abs() <= 8 * (320 + 200) * torch.finfo(torch.float32).eps * mag).all())


def test_fp8_experts_gather_through_the_gemv_where_told(monkeypatch):
    """A decode step's gathered experts: kernel "triton" runs the GEMV op once (no autograd) and
    gives the dequantised twin's sum over the token's experts to float32 rounding; "twin",
    "w8a8", "auto" on a CPU and autograd dequantise instead."""
    pytest.importorskip("triton")
    from nanoseek.kernels import fp8_linear
    calls, op = [], fp8_linear.fp8_experts_gemv
    monkeypatch.setattr(fp8_linear, "fp8_experts_gemv", lambda *a: calls.append(a[1].shape) or op(*a))
    kernel, twin = fp8_experts("triton", spread=True), fp8_experts("twin")
    twin.load_state_dict(kernel.state_dict())
    x, idx, route = torch.randn(3, 320), torch.tensor([[0, 2], [3, 1], [2, 3]]), torch.rand(3, 2)
    with torch.no_grad():
        assert kernel.gemv_takes(x)
        assert not any(fp8_experts(k).gemv_takes(x) for k in ("twin", "w8a8", "auto"))
        got = kernel.forward_gathered(x, route, idx).double()
        want = twin.forward_gathered(x, route, idx).double()
    assert not kernel.gemv_takes(x)  # grad on
    assert calls == [(3, 2)]
    _, mag, _, _ = hand_gathered_experts(x, idx, route, dequantized(kernel))
    assert bool(((got - want).abs() <= 8 * (320 + 200) * torch.finfo(torch.float32).eps * mag.sum(1)).all())


def test_one_row_takes_the_gemv_unless_the_tensor_core_kernel_fills_the_gpu():
    from nanoseek.kernels.fp8_linear import GEMV_K, SPLIT_PROGRAMS, takes_gemv
    assert takes_gemv(1, 7168, 16384, (128, 128)) and takes_gemv(1, 576, 2048, (128, 128))
    assert not takes_gemv(1, 24576, 1536, (128, 128))  # V3's q_b_proj: 384 programs of 64 outputs
    assert takes_gemv(1, 18432, 7168, (128, 128))  # V3's dense up: a K past one GEMV load, unmeasured
    last = 64 * (SPLIT_PROGRAMS - 1)  # the most outputs the tensor-core kernel covers in fewer programs
    assert takes_gemv(1, last, GEMV_K, (128, 128)) and not takes_gemv(1, last + 1, GEMV_K, (128, 128))
    assert not takes_gemv(2, 576, 2048, (128, 128))


def test_fp8_model_decodes_through_the_gemv_as_its_twin(fp8_dir, monkeypatch):
    """A cached decode of one row of the FP8 model with kernel="triton" (Triton's interpreter,
    float32): every linear layer and every MoE layer's routed experts through the GEMV, the
    weights read in place, against the dequantised twin: logits within float32's reordering bound."""
    pytest.importorskip("triton")
    from nanoseek.kernels import fp8_linear
    calls, op = [], fp8_linear.fp8_experts_gemv
    monkeypatch.setattr(fp8_linear, "fp8_experts_gemv", lambda *a: calls.append(1) or op(*a))
    fp8, twin = load(fp8_dir, torch.float32, kernel="triton"), load(fp8_dir, torch.float32)
    seqs = torch.randint(0, fp8.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (_, got), (_, want) = decode_argmax(fp8, seqs, 4), decode_argmax(twin, seqs, 4)
    c = fp8.config
    assert len(calls) == 2 * (c.num_hidden_layers - c.first_k_dense_replace)  # two decode steps
    torch.testing.assert_close(got, want, rtol=0, atol=float32_tolerance(c, 6, float(want.abs().max())))


def test_fp8_mlp_takes_one_swiglu_gemv_at_one_row(monkeypatch):
    """An MLP whose gate and up are FP8Linear becomes an FP8MLP: at one row with kernel "triton"
    (Triton's interpreter, float32) gate and up go through one fused GEMV launch, to the
    dequantised twin's output within float32 sums over K then F; two rows, "twin" and autograd
    keep the MLP's own forward."""
    pytest.importorskip("triton")
    from nanoseek.infer.fp8_weights import FP8MLP
    from nanoseek.kernels import fp8_linear
    from nanoseek.model.moe import MLP
    calls, op = [], fp8_linear.fp8_swiglu_gemv
    monkeypatch.setattr(fp8_linear, "fp8_swiglu_gemv", lambda *a: calls.append(a[0].shape) or op(*a))
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.mlp = MLP(320, 200)
    with torch.no_grad():  # gate and up of different magnitudes: each weight keeps its own scales
        model.mlp.up_proj.weight.mul_(8)
    names = {f"mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}
    keep_fp8_weights(model, names, (128, 128), "triton")
    mlp = model.mlp
    assert type(mlp) is FP8MLP and isinstance(mlp.gate_proj, FP8Linear)
    x = torch.randn(1, 1, 320)
    with torch.no_grad():
        got = mlp(x).double()
        assert calls == [(1, 320)]
        for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            lin.kernel = "twin"
        want = mlp(x).double()
        for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            lin.kernel = "triton"
        mlp(torch.randn(2, 320))
    mlp(x)  # grad on
    assert calls == [(1, 320)]
    w_gate, w_up, w_down = (lin.dequantized_weight().double().abs() for lin in (mlp.gate_proj, mlp.up_proj,
                                                                                  mlp.down_proj))
    x64 = x.double().abs()[0]
    mag = ((x64 @ w_gate.T) * (x64 @ w_up.T)) @ w_down.T
    assert bool(((got - want).abs()[0] <= 8 * (320 + 200) * torch.finfo(torch.float32).eps * mag).all())


def test_gather_gemv_path_reads_16bit_experts_down_in_place(monkeypatch):
    """The "gather_gemv" expert path on 16- or 32-bit experts (Triton's interpreter, float32):
    gate and up as the gathered forward computes them, the down projection through the GEMV (the
    op runs once), times the route weights: the loop twin's sum within float32 sums over D then F.
    Under autograd it is never taken."""
    pytest.importorskip("triton")
    from nanoseek.kernels import fp8_linear
    from nanoseek.model.moe import ExpertPath, Experts
    calls, op = [], fp8_linear.experts_down_gemv
    monkeypatch.setattr(fp8_linear, "experts_down_gemv", lambda *a: calls.append(a[1].shape) or op(*a))
    torch.manual_seed(0)
    experts = Experts(4, 320, 200, ExpertPath("gather_gemv"))
    for w in (experts.gate_proj, experts.up_proj, experts.down_proj):
        torch.nn.init.normal_(w, std=0.05)
    with torch.no_grad():
        experts.down_proj.mul_(2.0 ** torch.arange(4)[:, None, None])  # a wrong expert's rows fail
    x, idx, route = torch.randn(3, 320), torch.tensor([[0, 2], [3, 1], [2, 3]]), torch.rand(3, 2)
    with torch.no_grad():
        got = experts(x, route, idx).double()
        assert experts.last_path == "gather_gemv" and calls == [(3, 2)]
        want = experts.forward_loop(x, route, idx).double()
    experts(x, route, idx)  # grad on
    assert experts.last_path != "gather_gemv"
    _, mag, _, _ = hand_gathered_experts(x, idx, route, (experts.gate_proj.detach(), experts.up_proj.detach(),
                                                         experts.down_proj.detach()))
    assert bool(((got - want).abs() <= 8 * (320 + 200) * torch.finfo(torch.float32).eps * mag.sum(1)).all())


@pytest.mark.gpu
def test_bf16_fp8_experts_and_swiglu_gemv_on_gpu_at_v2_lite_widths():
    """On a GPU in BF16 at V2-Lite's widths (D 2,048, expert width 1,408, shared 2,816): the
    SwiGLU GEMV and the routed experts' GEMV against float64 on the same FP8 weights, within the
    BF16 rounding of h (and, for the experts, of nothing else: y is float32) plus float32 sums."""
    from nanoseek.kernels.fp8_linear import fp8_experts_gemv, fp8_swiglu_gemv
    eps = torch.finfo(torch.float32).eps
    x = torch.randn(2, 2048).to(torch.bfloat16)
    x64 = x.double()
    (wg, sg), (wu, su) = (quantize_fp8_blockwise(torch.randn(2816, 2048) * 2048 ** -0.5) for _ in range(2))
    from nanoseek.hf import dequantize_fp8_blockwise
    g64, u64 = (x64[:1] @ dequantize_fp8_blockwise(w, s).double().T for w, s in ((wg, sg), (wu, su)))
    want = torch.nn.functional.silu(g64) * u64
    got = fp8_swiglu_gemv(x[:1].cuda(), wg.cuda(), sg.cuda(), wu.cuda(), su.cuda(), [128, 128]).cpu().double()
    mag = (x64[:1].abs() @ dequantize_fp8_blockwise(wg, sg).double().abs().T) * \
        (x64[:1].abs() @ dequantize_fp8_blockwise(wu, su).double().abs().T)
    assert bool(((got - want).abs() <= 2 ** -8 * want.abs() + 2.2 * 2050 * eps * mag).all())

    experts = fp8_experts("auto", E=8, F=1408, D=2048, spread=True).cuda()
    idx, route = torch.tensor([[1, 5, 7, 0, 3, 6], [2, 5, 4, 0, 1, 7]]), torch.rand(2, 6)
    with torch.no_grad():
        assert experts.gemv_takes(x.cuda())
        got = fp8_experts_gemv(x.cuda(), idx.cuda(), route.cuda(), experts.gate_proj, experts.up_proj,
                               experts.down_proj, experts.gate_proj_scale_inv, experts.up_proj_scale_inv,
                               experts.down_proj_scale_inv, [128, 128]).cpu().double()
    weights = tuple(w.cpu() for w in dequantized(experts))
    want, _, h, mag_h = hand_gathered_experts(x, idx, route, weights)
    w_down = weights[2][idx].abs()
    bound = route.double()[..., None] * (w_down @ (2 ** -8 * h.abs() + 2.2 * 2050 * eps * mag_h)[..., None]
                                         + 1410 * eps * (w_down @ h.abs()[..., None]))[..., 0]
    assert bool(((got - want).abs() <= bound).all())
