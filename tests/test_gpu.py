"""GPU tier (skipped without CUDA): the bf16 fast paths against their float32 twins."""

import pytest
import torch

from nanoseek import StaticCache, Transformer, preset

pytestmark = pytest.mark.gpu


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_grouped_gemm_on_gpu_matches_loop():
    """Same tokens, same routing: grouped GEMM (bf16) against the per-expert loop (float32).

    Compared at the layer, not through a whole random model: a freshly initialised router
    scores every expert near 0.5, so bf16 rounding upstream flips near-tied choices."""
    from nanoseek.model.moe import Experts
    experts = Experts(16, 256, 128).cuda()
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(1000, 256, device="cuda")
    w = torch.rand(1000, 4, device="cuda")
    idx = torch.stack([torch.randperm(16, device="cuda")[:4] for _ in range(1000)])
    ref = experts.forward_loop(x, w, idx)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = experts(x, w, idx)
    assert rel(out.float(), ref) < 1e-2


def test_bf16_gpu_matches_cpu_float32_and_absorbed_decode():
    cfg = preset("tiny")
    cpu = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    ref = cpu(ids).logits
    gpu = Transformer(cfg).cuda().eval()
    gpu.load_state_dict(cpu.state_dict())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = gpu(ids.cuda()).logits.float().cpu()
        cache = StaticCache(cfg, 2, 32, dtype=torch.bfloat16, device="cuda")
        absorbed = gpu(ids.cuda(), positions=torch.arange(32, device="cuda").expand(2, 32), cache=cache)
    assert rel(out, ref) < 2e-2
    assert rel(absorbed.logits.float().cpu(), ref) < 2e-2
