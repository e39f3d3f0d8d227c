"""The small-batch experts kernels (kernels/moe.py) against their twin, moe.Experts'
per-expert loop. Without a GPU the kernels run in Triton's interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 there); on a GPU they run compiled."""

import copy

import pytest
import torch

from nanoseek.model import moe

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# blocks of 32: two of F and two of D per expert, so the kernels' loops and grids both step
BLOCKS_32 = {"up": dict(block_f=32, block_d=32, stages=1), "down": dict(block_d=32, block_f=32, stages=1)}


def experts_and_batch(E, K, N, D=64, F=64, dtype=torch.float32, path=None):
    torch.manual_seed(0)
    ex = moe.Experts(E, D, F, path)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(N, D)
    # expert 1: no row chose it (its blocks must write nothing); row 0 holds the last expert
    others = torch.tensor([e for e in range(E) if e != 1])
    idx = torch.stack([others[torch.randperm(E - 1)[:K]] for _ in range(N)])
    if not (idx[0] == E - 1).any():
        idx[0, 0] = E - 1
    gate = torch.rand(N, K)
    return ex.to(DEVICE, dtype), x.to(DEVICE, dtype), idx.to(DEVICE), gate.to(DEVICE)


def kernel_tolerance(ex, want) -> float:
    """float32 sums over D then F in another order than the loop's (conftest.float32_tolerance)."""
    _, F, D = ex.gate_proj.shape
    return torch.finfo(torch.float32).eps * (D + F) * float(want.abs().max())


@pytest.mark.parametrize("E, K, N", [(8, 3, 7), (16, 6, 20)])
def test_small_batch_experts_match_the_loop(E, K, N):
    """Each token's gated sum over its K experts equals the loop's, through Experts.forward's
    dispatch (which must take the kernels) and from the op itself, for N rows not a power of
    two, K not a power of two (6), an expert no row chose (its programs skip) and the last
    expert chosen; the op puts each (token, slot)'s gated output at its slot."""
    from nanoseek.kernels.moe import small_batch_experts
    ex, x, idx, gate = experts_and_batch(E, K, N, path=moe.ExpertPath("small_batch", small_batch_launch=BLOCKS_32))
    assert not (idx == 1).any() and (idx == E - 1).any()
    with torch.no_grad():
        want = ex.forward_loop(x, gate, idx)
        got = ex(x, gate, idx)
        assert ex.last_path == "small_batch"
        y_NKD = small_batch_experts(x, idx, gate, ex.gate_proj, ex.up_proj, ex.down_proj, launch=BLOCKS_32)
        n, k = 3, 2                                 # one (token, slot) by hand
        e = int(idx[n, k])
        h = torch.nn.functional.silu(x[n] @ ex.gate_proj[e].T) * (x[n] @ ex.up_proj[e].T)
        slot = gate[n, k] * (h @ ex.down_proj[e].T)
    tol = kernel_tolerance(ex, want)
    torch.testing.assert_close(got, want, rtol=0, atol=tol)
    torch.testing.assert_close(y_NKD.sum(1), want, rtol=0, atol=tol)
    torch.testing.assert_close(y_NKD[n, k], slot, rtol=0, atol=tol)


@pytest.mark.parametrize("block", [(32, 32), (64, 32)])
def test_fp8_small_batch_experts_match_the_dequantized_loop(block):
    """FP8 experts (infer/fp8_weights.FP8Experts, as an FP8 checkpoint is kept) through the
    kernels, which read the E4M3 weights in place and apply each scale block's scale to its
    partial sums, give the loop's output over the dequantised weights (the twin): float32
    activations, so only the order of the sums and of the scaling differs. Scale blocks of
    one weight tile and of two; Experts.forward's dispatch takes the kernels."""
    from nanoseek.infer.fp8_weights import FP8Experts
    ex, x, idx, gate = experts_and_batch(16, 6, 20, path=moe.ExpertPath("small_batch", small_batch_launch=BLOCKS_32))
    fp8 = FP8Experts(ex, block)
    twin = copy.deepcopy(ex)
    with torch.no_grad():
        for p, w in zip((twin.gate_proj, twin.up_proj, twin.down_proj), fp8.expert_weights()):
            p.copy_(w)
        want = twin.forward_loop(x, gate, idx)
        got = fp8(x, gate, idx)
    assert fp8.last_path == "small_batch" and fp8.gate_proj.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(got, want, rtol=0, atol=2 * kernel_tolerance(twin, want))
    # and the scales matter: the same weights with every scale doubled double the down projection's output
    with torch.no_grad():
        fp8.down_proj_scale_inv.mul_(2)
        torch.testing.assert_close(fp8(x, gate, idx), 2 * want, rtol=0, atol=4 * kernel_tolerance(twin, want))


def test_small_batch_experts_compile_as_one_op():
    """Under torch.compile (fullgraph) the kernels are one opaque op of the traced graph, and
    the compiled call gives the loop's output."""
    ex, x, idx, gate = experts_and_batch(8, 3, 7, path=moe.ExpertPath("small_batch", small_batch_launch=BLOCKS_32))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    step = torch.compile(lambda x, gate, idx: ex(x, gate, idx), fullgraph=True, backend=backend)
    with torch.no_grad():
        want = ex.forward_loop(x, gate, idx)
        torch.testing.assert_close(step(x, gate, idx), want, rtol=0, atol=kernel_tolerance(ex, want))
    ops = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.nanoseek.small_batch_experts.default) == 1, ops


def test_small_batch_experts_refuse_what_they_cannot_read():
    """The op itself (not only the dispatch) refuses more than MAX_TOKENS rows, widths its
    blocks do not divide, weights it cannot read in place, launch keys it does not know, FP8
    scale blocks that split a weight tile and scales with 32-bit weights, saying what is wrong."""
    from nanoseek.kernels.moe import MAX_TOKENS, small_batch_experts
    ex, x, idx, gate = experts_and_batch(8, 3, MAX_TOKENS + 1)
    w = (ex.gate_proj, ex.up_proj, ex.down_proj)
    with pytest.raises(ValueError, match=rf"cannot take {MAX_TOKENS + 1} tokens \(it takes 1..{MAX_TOKENS}\)"):
        small_batch_experts(x, idx, gate, *w, launch=BLOCKS_32)
    with pytest.raises(ValueError, match="expert width 48"):
        small_batch_experts(x[:4], idx[:4], gate[:4], ex.gate_proj[:, :48].contiguous(),
                            ex.up_proj[:, :48].contiguous(), ex.down_proj[..., :48].contiguous(), launch=BLOCKS_32)
    with pytest.raises(ValueError, match="contiguous"):
        small_batch_experts(x[:4], idx[:4], gate[:4], ex.gate_proj, ex.up_proj,
                            ex.down_proj.transpose(1, 2).contiguous().transpose(1, 2), launch=BLOCKS_32)
    with pytest.raises(ValueError, match="launch up=.*block_k"):
        small_batch_experts(x[:4], idx[:4], gate[:4], *w, launch={"up": dict(block_k=32)})
    from nanoseek.infer.fp8_weights import FP8Experts
    fp8 = FP8Experts(ex, (16, 32))
    w8, scales, block = fp8.small_batch_weights()
    with pytest.raises(ValueError, match=r"scale block \(16, 32\)"):  # a 32-row tile spans two blocks
        small_batch_experts(x[:4], idx[:4], gate[:4], *w8, launch=BLOCKS_32, scales=scales, block=block)
    with pytest.raises(ValueError, match="scales given with torch.float32 weights"):
        small_batch_experts(x[:4], idx[:4], gate[:4], *w, launch=BLOCKS_32, scales=scales, block=(32, 32))


def test_small_batch_kernels_dispatch(monkeypatch):
    """Where the kernels can take a batch: not under autograd, not for more than MAX_TOKENS
    rows, not when the weights' dtype is not the compute dtype (float32 weights, BF16
    activations), not for weights they cannot read in place (a transposed view); by default
    ("auto") only on a GPU with 16-bit weights, "small_batch" wherever Triton runs."""
    from nanoseek.kernels import moe as moe_kernels
    take = moe.small_batch_kernels_take
    gate = torch.zeros(4, 128, 128, dtype=torch.bfloat16)  # [E, F, D]
    w16 = (gate, gate.clone(), gate.clone())
    x16 = torch.zeros(8, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        assert take(x16, w16, 8, anywhere=True)
        assert not take(x16, w16, moe_kernels.MAX_TOKENS + 1, anywhere=True)
        assert not take(x16, tuple(w.float() for w in w16), 8, anywhere=True)  # weights not in x's dtype
        f48 = torch.zeros(4, 48, 128, dtype=torch.bfloat16)
        assert not take(x16, (f48, f48, f48.transpose(1, 2).contiguous()), 8, anywhere=True)  # F = 48
        assert not take(x16, (gate, gate.transpose(1, 2), gate), 8, anywhere=True)
        assert not take(x16, w16, 8)                                   # auto: not on CPU tensors
        if torch.cuda.is_available():
            cuda = tuple(w.cuda() for w in w16)
            assert take(x16.cuda(), cuda, 8)
            assert not take(x16.cuda().float(), tuple(w.float() for w in cuda), 8)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert take(x16, w16, 8, anywhere=True) == torch.cuda.is_available()  # no interpreter, no GPU
    assert not take(x16, w16, 8, anywhere=True)                         # autograd on


@pytest.mark.gpu
def test_bf16_small_batch_experts_on_gpu():
    """On a GPU in BF16 at the default launch shapes (tensor-core dots): as close to the
    float32 loop as the BF16 grouped GEMM is, within half again; the same bits run to run."""
    ex32, x32, idx, gate = experts_and_batch(64, 6, 32, D=256, F=128)
    ex16, x16 = copy.deepcopy(ex32).to(torch.bfloat16), x32.to(torch.bfloat16)
    with torch.no_grad():
        ref = ex32.forward_loop(x32, gate, idx)
        grouped = ex16.forward_grouped(x16, gate, idx).float()
        got = ex16.forward_small_batch(x16, gate, idx).float()
        again = ex16.forward_small_batch(x16, gate, idx).float()

    def rel(y):
        return float((y - ref).norm() / ref.norm())
    assert rel(got) <= 1.5 * rel(grouped) + 1e-3, (rel(got), rel(grouped))
    assert torch.equal(got, again)


@pytest.mark.gpu
def test_fp8_small_batch_experts_on_gpu():
    """On a GPU, FP8 expert weights with 128x128 scale blocks read in place under BF16
    activations (the default launch, tensor-core dots): as close to the float32 loop over the
    dequantised weights as that model's BF16 grouped GEMM, within half again, and taken by
    the default ("auto") dispatch at 32 tokens."""
    from nanoseek.infer.fp8_weights import FP8Experts
    ex32, x32, idx, gate = experts_and_batch(64, 6, 32, D=256, F=256)
    fp8 = FP8Experts(copy.deepcopy(ex32), (128, 128))
    twin32 = copy.deepcopy(ex32)
    with torch.no_grad():
        for p, w in zip((twin32.gate_proj, twin32.up_proj, twin32.down_proj), fp8.expert_weights()):
            p.copy_(w.float())
        ref = twin32.forward_loop(x32, gate, idx)
        grouped = copy.deepcopy(twin32).to(torch.bfloat16).forward_grouped(x32.bfloat16(), gate, idx).float()
        got = fp8(x32.bfloat16(), gate, idx).float()
    assert fp8.last_path == "small_batch"

    def rel(y):
        return float((y - ref).norm() / ref.norm())
    assert rel(got) <= 1.5 * rel(grouped) + 1e-3, (rel(got), rel(grouped))


@pytest.mark.gpu
def test_bf16_captured_decode_steps_take_the_small_batch_kernels(monkeypatch):
    """On a GPU, the engine's compiled and captured decode step of a BF16 model at buckets 4,
    8 and 16 (the first compiled static, the others shape-generic) traces its routed experts
    through kernels/moe.py on the "small_batch" path, and its logits at each bucket match
    the grouped GEMM's step as closely as BF16 allows."""
    from nanoseek import Transformer, preset
    from nanoseek.hf import to_dtype
    from nanoseek.infer.cuda_graph import GraphDecoder
    from nanoseek.model import StaticCache
    torch.manual_seed(0)
    model = to_dtype(Transformer(preset("tiny", hidden_size=128, moe_intermediate_size=128)), torch.bfloat16)
    model = model.cuda().eval()
    R, S = 16, 24
    cache = StaticCache(model.config, R, 32, dtype=torch.bfloat16, device="cuda")
    prompts = torch.randint(0, model.config.vocab_size, (R, S), device="cuda")
    with torch.no_grad():
        for b in range(R):
            model(prompts[b:b + 1], positions=torch.arange(S, device="cuda")[None],
                  cache=cache.select([b], kv_len=S), absorb=False)
    nxt = torch.randint(0, model.config.vocab_size, (R,)).tolist()
    traced = []
    forward_small_batch = moe.Experts.forward_small_batch
    monkeypatch.setattr(moe.Experts, "forward_small_batch",
                        lambda self, *a: traced.append(1) or forward_small_batch(self, *a))

    def logits(kind):
        model.set_expert_path(moe.ExpertPath(kind))
        torch._dynamo.reset()
        step = GraphDecoder(model, copy.deepcopy(cache), None, compile=True)
        out = [step.decode(list(range(B)), nxt[:B], [S] * B).float() for B in (4, 8, 16)]
        assert step.compile and not step.failed and len(step.graphs) == 3
        return out

    got = logits("small_batch")
    assert traced, "the compiled step did not trace the small-batch experts"
    traced.clear()
    want = logits("grouped")
    assert not traced
    for g, w in zip(got, want):
        assert float((g - w).norm() / w.norm()) < 2e-2
