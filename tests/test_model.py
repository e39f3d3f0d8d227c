"""Model internals: every fast path against its reference twin, losses against hand maths."""

import math

import pytest
import torch
import torch.nn.functional as F

import nanoseek
from conftest import float32_tolerance  # tests/ is on sys.path
from nanoseek.config import ConfigError, ModelConfig, preset
from nanoseek.model import StaticCache, Transformer
from nanoseek.model.moe import ExpertPath, Experts, MoE, Router, balance_loss, max_violation
from nanoseek.model.rope import apply_rope
from nanoseek.model.transformer import shifted_cross_entropy


def tiny(**kw) -> ModelConfig:
    return preset("tiny", **kw)


def randomize_(model: Transformer) -> Transformer:
    """Non-trivial norms and router biases, so that no path hides behind ones and zeros."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or "norm" in name:
                p.normal_(1.0, 0.2)
        for r in model.routers().values():
            if r.e_score_correction_bias is not None:
                r.e_score_correction_bias.normal_(0, 0.05)
    return model


# ---------------------------------------------------------------- MLA
@pytest.mark.parametrize("q_lora_rank", [48, None])
def test_absorbed_mla_equals_training_path(q_lora_rank):
    cfg = tiny(q_lora_rank=q_lora_rank)
    model = randomize_(Transformer(cfg)).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    ref = model(ids).logits  # expanded path, causal SDPA
    cache = StaticCache(cfg, batch_size=2, max_len=32)
    positions = torch.arange(24).expand(2, 24)
    out = model(ids, positions=positions, cache=cache).logits  # absorbed, prefill through cache
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    expanded_via_cache = model(ids, positions=positions, cache=StaticCache(cfg, 2, 32), absorb=False).logits
    torch.testing.assert_close(expanded_via_cache, ref, rtol=1e-4, atol=1e-5)


def test_token_by_token_decode_equals_full_forward():
    cfg = tiny()
    model = randomize_(Transformer(cfg)).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    ref = model(ids).logits
    cache = StaticCache(cfg, batch_size=1, max_len=20)
    model(ids[:, :8], positions=torch.arange(8)[None], cache=cache)
    steps = [model(ids[:, t:t + 1], positions=torch.tensor([[t]]), cache=cache).logits for t in range(8, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), ref[:, 8:], rtol=1e-4, atol=1e-5)


def test_cache_holds_only_latent_and_rope_key():
    cfg = tiny()
    cache = StaticCache(cfg, batch_size=1, max_len=4, dtype=torch.bfloat16, num_layers=cfg.num_hidden_layers)
    assert cache.nbytes_per_token() == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 2


@pytest.mark.parametrize("rows", [slice(1, 3), [2, 0]])
def test_cache_view_writes_each_row_at_its_own_positions(rows):
    """A view's update writes row b's entries at positions[b] of that row only (a run of rows
    and a gathered set alike), returns the view's rows, and refuses positions for fewer rows
    than the view holds (index_put_ would copy one row's entries into every row)."""
    cfg = tiny()
    cache = StaticCache(cfg, batch_size=3, max_len=6, num_layers=1)
    view = cache.select(list(range(3))[rows] if isinstance(rows, slice) else rows, kv_len=6)
    slots = list(range(3))[rows] if isinstance(rows, slice) else rows
    shapes = [b[0, 0].shape for b in cache.layers[0]]
    new = [torch.randn(2, 2, *shape) for shape in shapes]
    positions = torch.tensor([[4, 1], [0, 5]])
    out = view.update(0, positions, *new)
    for buf, entry, got in zip(cache.layers[0], new, out):
        want = torch.zeros(3, 6, *entry.shape[2:])
        for b, slot in enumerate(slots):
            want[slot, positions[b]] = entry[b]
        torch.testing.assert_close(buf, want)
        torch.testing.assert_close(got, want[slots])
    with pytest.raises(RuntimeError, match="one row per row of the view"):
        view.update(0, positions[:1], *(e[:1] for e in new))


def test_batch_of_different_lengths_matches_each_alone():
    cfg = tiny()
    model = randomize_(Transformer(cfg)).eval()
    a = torch.randint(0, cfg.vocab_size, (1, 12))
    b = torch.randint(0, cfg.vocab_size, (1, 7))
    batch = torch.zeros(2, 12, dtype=torch.long)
    batch[0], batch[1, :7] = a[0], b[0]
    cache = StaticCache(cfg, batch_size=2, max_len=16)
    # padding of the short row goes to slots it never reads: positions beyond its length
    logits = model(batch, positions=torch.arange(12).expand(2, 12), cache=cache).logits
    torch.testing.assert_close(logits[0], model(a).logits[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[1, :7], model(b).logits[0], rtol=1e-4, atol=1e-5)
    # one decode step for both rows at their own positions
    nxt = torch.tensor([[3], [5]])
    step = model(nxt, positions=torch.tensor([[12], [7]]), cache=cache).logits
    torch.testing.assert_close(step[1, 0], model(torch.cat([b, nxt[1:]], 1)).logits[0, -1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(step[0, 0], model(torch.cat([a, nxt[:1]], 1)).logits[0, -1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attention_type", ["mha", "gqa"])
def test_baseline_attention_decode_matches_full(attention_type):
    cfg = tiny(attention_type=attention_type, num_key_value_heads=2)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    ref = model(ids).logits
    cache = StaticCache(cfg, 2, 10)
    model(ids[:, :6], positions=torch.arange(6).expand(2, 6), cache=cache)
    step = [model(ids[:, t:t + 1], positions=torch.full((2, 1), t), cache=cache).logits for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(step, 1), ref[:, 6:], rtol=1e-4, atol=1e-5)
    kv = 2 * cfg.kv_heads * cfg.attn_head_dim * cfg.num_hidden_layers * 2
    assert StaticCache(cfg, 1, 1, torch.bfloat16, num_layers=cfg.num_hidden_layers).nbytes_per_token() == kv


def test_rope_rotates_interleaved_pairs_like_complex_multiplication():
    x = torch.randn(2, 5, 3, 8)
    angles = torch.rand(1, 5, 4) * 6
    out = apply_rope(x, angles.cos(), angles.sin())
    z = torch.view_as_complex(x.unflatten(-1, (4, 2)).contiguous())
    ref = torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)[:, :, None]).flatten(-2)
    torch.testing.assert_close(out, ref)


def test_yarn_softmax_scale_and_frequencies():
    rs = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
          "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    cfg = tiny(rope_scaling=rs, rope_theta=10000.0, qk_rope_head_dim=64, qk_nope_head_dim=128)
    m = 0.1 * math.log(40) + 1
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * m * m)
    from nanoseek.model.rope import RotaryEmbedding
    rope = RotaryEmbedding(cfg, 64)
    base = 1.0 / 10000 ** (torch.arange(0, 64, 2).float() / 64)
    # the fastest pairs keep their frequency, the slowest are divided by the factor
    assert rope.inv_freq[0] == pytest.approx(base[0].item())
    assert rope.inv_freq[-1] == pytest.approx(base[-1].item() / 40)
    assert rope.attention_factor == pytest.approx(1.0)


# ---------------------------------------------------------------- MoE
def test_grouped_experts_equal_per_expert_loop():
    torch.manual_seed(1)
    experts = Experts(n_experts=8, dim=32, hidden=16)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(40, 32, requires_grad=True)
    w = torch.rand(40, 3)
    idx = torch.stack([torch.randperm(8)[:3] for _ in range(40)])
    idx[:, 0] = 2  # one crowded expert; expert counts differ, some may be empty
    y_grouped = experts.forward_grouped(x, w, idx)
    y_loop = experts.forward_loop(x, w, idx)
    torch.testing.assert_close(y_grouped, y_loop, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(experts.forward_dense(x, w, idx), y_loop, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(experts.forward_gathered(x, w, idx), y_loop, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y_loop)
    grads_grouped = torch.autograd.grad(y_grouped, [x, experts.gate_proj, experts.down_proj], g)
    grads_loop = torch.autograd.grad(experts.forward_loop(x, w, idx), [x, experts.gate_proj, experts.down_proj], g)
    for a, b in zip(grads_grouped, grads_loop):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_auto_expert_path_gathers_small_decode_batches():
    """"auto": without grad and with at most gather_max_pairs (token, expert) pairs the
    experts are gathered per pair; larger batches, and any forward that records gradients,
    are not; last_path says which path ran."""
    experts = Experts(n_experts=8, dim=16, hidden=8, path=ExpertPath("auto", gather_max_pairs=6))
    x, w = torch.randn(2, 16), torch.rand(2, 3)
    idx = torch.tensor([[0, 1, 2], [3, 4, 5]])
    with torch.no_grad():
        experts(x, w, idx)
        assert experts.last_path == "gather"
        experts.path = ExpertPath("auto", gather_max_pairs=5)  # 6 pairs: the grouped GEMM
        experts(x, w, idx)
        assert experts.last_path == "grouped"
    experts.path = ExpertPath("gather")
    experts(x, w, idx)  # grad enabled: training never gathers
    assert experts.last_path == "grouped"


# kernels/moe.py's blocks for the tiny preset's widths (64 and 32; the defaults do not divide 32)
TINY_KERNEL_LAUNCH = {"up": dict(block_f=32, block_d=32, stages=1), "down": dict(block_d=32, block_f=32, stages=1)}


@pytest.mark.parametrize("kind", ["grouped", "gather", "small_batch", "auto", "loop"])
def test_each_expert_path_runs_when_chosen_and_gives_the_loops_logits(kind):
    """set_expert_path reaches every MoE layer's experts: a decode-sized forward (20 pairs)
    runs the chosen path in each (auto on the CPU: above 16 pairs, the grouped GEMM; the
    small-batch kernels in Triton's interpreter) and gives the reference loop's logits."""
    if kind == "small_batch":
        pytest.importorskip("triton")
    cfg = tiny()
    model = randomize_(Transformer(cfg)).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    experts = [m for m in model.main_layers.modules() if isinstance(m, Experts)]
    with torch.no_grad():
        model.set_expert_path(ExpertPath("loop"))
        want = model(ids).logits
        model.set_expert_path(ExpertPath(kind, small_batch_launch=TINY_KERNEL_LAUNCH))
        got = model(ids).logits
    assert [e.last_path for e in experts] == [{"auto": "grouped"}.get(kind, kind)] * len(experts)
    # the paths sum each expert's products in other orders
    torch.testing.assert_close(got, want, rtol=0, atol=float32_tolerance(cfg, 5, float(want.abs().max())))


def test_expert_path_names_are_checked():
    with pytest.raises(ValueError, match="expert path 'fast': must be one of auto, grouped, gather"):
        ExpertPath("fast")
    with pytest.raises(ValueError, match="gather_max_pairs must be >= 0, got -1"):
        ExpertPath(gather_max_pairs=-1)


def _router(**kw):
    cfg = tiny(hidden_size=16, n_routed_experts=8, num_experts_per_tok=2, **kw)
    r = Router(cfg)
    torch.nn.init.normal_(r.weight)
    return r


def test_group_limited_routing_keeps_topk_groups_v3():
    r = _router(n_group=4, topk_group=2, scoring_func="sigmoid", topk_method="noaux_tc")
    x = torch.randn(64, 16)
    w, idx, scores = r(x)
    groups = scores.view(64, 4, 2)
    best = groups.topk(2, -1).values.sum(-1).topk(2, -1).indices  # V3: sum of top-2 per group
    for t in range(64):
        assert set((idx[t] // 2).tolist()) <= set(best[t].tolist())
    # weights: unbiased sigmoid scores of the chosen experts, normalised, scaled
    ref = scores.gather(1, idx)
    torch.testing.assert_close(w, ref / ref.sum(-1, keepdim=True) * r.scaling)


def test_pairwise_ranks_equal_topk_order_with_ties_to_the_lower_index():
    from nanoseek.model.moe import rank_order, ranks
    torch.manual_seed(0)
    x = torch.randn(37, 64)
    torch.testing.assert_close(rank_order(ranks(x), 6), x.topk(6).indices, rtol=0, atol=0)
    x[:, 3] = x[:, 5]  # a tie: the lower index ranks first, as a stable descending sort
    x[:, 9] = float("-inf")
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices
    torch.testing.assert_close(rank_order(ranks(x), 64), order, rtol=0, atol=0)
    x[:, 7] = float("nan")  # a non-finite step: still a permutation, NaN as -inf (index 7 before 9)
    r = ranks(x)
    assert torch.equal(r.sort(-1).values, torch.arange(64).expand(37, 64))
    assert (r[:, 7] == 62).all() and (r[:, 9] == 63).all()


@pytest.mark.parametrize("method", ["noaux_tc", "group_limited_greedy", "greedy"])
def test_router_choice_by_pairwise_ranks_equals_topk(monkeypatch, method):
    """Few tokens under torch.compile rank by pairwise comparison, many (or eager) by
    torch.topk: the same experts and gate values. (is_compiling is patched: the branch's
    logic runs eagerly here; test_compiled_decode_... runs it compiled.)"""
    from nanoseek.model import moe
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    kw = dict(n_group=4, topk_group=2) if method != "greedy" else dict(n_group=1, topk_group=1)
    r = _router(topk_method=method, scoring_func="softmax" if method == "group_limited_greedy" else "sigmoid",
                **kw)
    if r.e_score_correction_bias is not None:
        r.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(24, 16)
    calls = []
    ranks = moe.ranks
    monkeypatch.setattr(moe, "ranks", lambda t: calls.append(t.shape) or ranks(t))
    w_small, idx_small, _ = r(x)
    assert calls  # the pairwise path ran
    monkeypatch.setattr(moe, "PAIRWISE_TOPK_MAX", 0)
    calls.clear()
    w_topk, idx_topk, _ = r(x)
    assert not calls  # and here torch.topk did
    torch.testing.assert_close(idx_small, idx_topk, rtol=0, atol=0)
    torch.testing.assert_close(w_small, w_topk)


def test_compiled_decode_router_and_gathered_experts_equal_the_loop():
    """Under torch.compile a decode step's router scores by product-and-sum and the gathered
    experts read their rows in place (moe.py); same choice and output as the eager twins."""
    torch.manual_seed(3)
    r = _router(n_group=4, topk_group=2, topk_method="noaux_tc")
    r.e_score_correction_bias.normal_(0, 0.1)
    experts = Experts(n_experts=8, dim=16, hidden=8)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 16)

    def step(x):
        w, idx, _ = r(x)
        return experts.forward_gathered(x, w, idx), idx

    with torch.no_grad():
        y, idx = torch.compile(step, fullgraph=True)(x)
        w_ref, idx_ref, _ = r(x)
    torch.testing.assert_close(idx, idx_ref, rtol=0, atol=0)
    torch.testing.assert_close(y, experts.forward_loop(x, w_ref, idx_ref), rtol=1e-5, atol=1e-6)


def test_group_limited_routing_v2_uses_group_max():
    r = _router(n_group=4, topk_group=1, scoring_func="softmax", topk_method="group_limited_greedy",
                norm_topk_prob=False, routed_scaling_factor=1.0)
    x = torch.randn(64, 16)
    w, idx, scores = r(x)
    best = scores.view(64, 4, 2).amax(-1).argmax(-1)
    assert ((idx // 2) == best[:, None]).all()
    torch.testing.assert_close(w, scores.gather(1, idx))


def test_bias_changes_selection_not_gate_values():
    r = _router(n_group=1, topk_group=1)
    x = torch.randn(32, 16)
    _, idx0, scores = r(x)
    r.e_score_correction_bias[5] = 10.0  # expert 5 always chosen now
    w, idx, _ = r(x)
    assert (idx == 5).any(-1).all() and not (idx0 == 5).any(-1).all()
    ref = scores.gather(1, idx)
    torch.testing.assert_close(w, ref / ref.sum(-1, keepdim=True) * r.scaling)


def test_bias_update_lowers_maxvio_on_skewed_router():
    cfg = tiny(hidden_size=32, n_routed_experts=16, num_experts_per_tok=2, n_group=4, topk_group=2,
               bias_update_speed=0.01)
    moe = MoE(cfg).train()
    torch.nn.init.normal_(moe.gate.weight, std=0.1)
    for p in moe.experts.parameters():
        torch.nn.init.normal_(p, std=0.02)
    with torch.no_grad():
        moe.gate.weight[:3] += 1.0  # three experts attract almost every token of data with a bias
    x = torch.randn(4, 64, 32) + 0.5
    moe(x)
    first = max_violation(moe.gate.update_bias())
    for _ in range(300):
        moe(x)
        last = max_violation(moe.gate.update_bias())
    assert first > 3.0, first
    assert last < 0.5 * first and last < 1.0, (first, last)
    b = moe.gate.e_score_correction_bias
    assert b[:3].max() < 0 and b[3:].mean() > b[:3].mean()


def test_bias_update_rule_is_sign_of_mean_minus_load():
    r = _router(n_group=1, topk_group=1, bias_update_speed=0.001)
    r.load.copy_(torch.tensor([5.0, 1, 3, 3, 0, 4, 4, 4]))  # mean 3
    load = r.update_bias()
    expected = 0.001 * torch.tensor([-1.0, 1, 0, 0, 1, -1, -1, -1])
    torch.testing.assert_close(r.e_score_correction_bias, expected)
    assert load.sum() == 24 and r.load.sum() == 0


def test_sequence_wise_balance_loss_by_hand():
    # B=1 sequence, T=2 tokens, E=4, K=2
    scores = torch.tensor([[[0.8, 0.4, 0.6, 0.2], [0.1, 0.9, 0.5, 0.5]]])
    idx = torch.tensor([[[0, 2], [1, 2]]])
    # f = E/(K·T)·counts = 4/4·[1, 1, 2, 0];  P = mean of per-token normalised scores
    s1, s2 = scores[0, 0] / 2.0, scores[0, 1] / 2.0
    P = (s1 + s2) / 2
    expected = 0.1 * (torch.tensor([1.0, 1, 2, 0]) * P).sum()
    got = balance_loss(scores, idx, n_experts=4, alpha=0.1, per_sequence=True)
    torch.testing.assert_close(got, expected)
    # two sequences, each sending both tokens to one expert: imbalanced per sequence,
    # balanced over the batch. Per sequence f = [2, 0], P = [.9, .1] -> 1.8; batch -> 1.0
    scores2 = torch.tensor([[[0.9, 0.1]] * 2, [[0.1, 0.9]] * 2])
    idx2 = torch.tensor([[[0]] * 2, [[1]] * 2])
    torch.testing.assert_close(balance_loss(scores2, idx2, 2, 0.1, True), torch.tensor(0.18))
    torch.testing.assert_close(balance_loss(scores2, idx2, 2, 0.1, False), torch.tensor(0.10))


def test_loads_are_counted_in_training_only():
    cfg = tiny()
    model = Transformer(cfg)
    K, L = cfg.num_experts_per_tok, cfg.num_hidden_layers
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    model.eval()
    model(ids, labels=ids)
    assert all(load.sum() == 0 for load in model.expert_loads().values())
    model.train()
    model(ids)  # no labels: the MTP module does not run
    loads = model.expert_loads()
    assert all(loads[i].sum() == 2 * 8 * K for i in range(1, L)) and loads[L].sum() == 0
    model(ids, labels=ids)  # MTP depth 1 sees B·(T−1) tokens
    loads = model.update_expert_bias()
    assert loads[1].sum() == 2 * (2 * 8 * K) and loads[L].sum() == 2 * 7 * K
    assert all(load.sum() == 0 for load in model.expert_loads().values())


# ---------------------------------------------------------------- MTP and losses
def test_mtp_loss_by_hand():
    cfg = tiny(mtp_loss_weight=0.3)
    model = randomize_(Transformer(cfg)).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    out = model(ids, labels=ids, return_mtp=True)
    # main loss: next-token CE
    main = F.cross_entropy(out.logits[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.main_loss, main)
    # depth 1 by hand: [enorm(Emb(t_{i+1})); hnorm(h_i)] -> eh_proj -> block -> shared_head.norm -> head
    mtp = model.mtp_layers[0]
    h = out.hidden_states
    emb = model.model.embed_tokens(ids)
    x = mtp.eh_proj(torch.cat([mtp.enorm(emb[:, 1:]), mtp.hnorm(h[:, :-1])], -1))
    cos, sin = model.model.rotary(torch.arange(11).expand(2, 11))
    x = x + mtp.self_attn(mtp.input_layernorm(x), cos, sin)
    x = x + mtp.mlp(mtp.post_attention_layernorm(x))[0]
    logits1 = model.lm_head(mtp.shared_head.norm(x))
    torch.testing.assert_close(out.mtp_logits[0], logits1, rtol=1e-5, atol=1e-5)
    # position i predicts t_{i+2}
    ce1 = F.cross_entropy(logits1[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 2:].reshape(-1))
    torch.testing.assert_close(out.mtp_loss, 0.3 / 1 * ce1)
    torch.testing.assert_close(out.loss, main + 0.3 * ce1 + out.balance_loss)


def test_mtp_depth_two_and_ignore_index():
    cfg = tiny(num_nextn_predict_layers=2, mtp_loss_weight=0.5)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 10))
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(ids, labels=labels, return_mtp=True)
    assert [lg.shape[1] for lg in out.mtp_logits] == [9, 8]
    ces = [shifted_cross_entropy(lg, labels, k) for k, lg in enumerate(out.mtp_logits, 1)]
    by_hand = F.cross_entropy(out.mtp_logits[1][0, :7], ids[0, 3:10], reduction="none")[1:].mean()
    torch.testing.assert_close(ces[1], by_hand)
    torch.testing.assert_close(out.mtp_loss, 0.5 / 2 * (ces[0] + ces[1]))


def test_training_step_reduces_loss_and_grads_reach_everything():
    cfg = tiny()
    model = Transformer(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, cfg.vocab_size, (4, 32))
    losses = []
    for _ in range(15):
        out = model(ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        if not losses:
            missing = [n for n, p in model.named_parameters() if p.grad is None]
            assert not missing, missing
        opt.step()
        model.update_expert_bias()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_dynamo_traces_forward_without_graph_breaks():
    """No .item()/.tolist()/data-dependent branching in the forward pass."""
    cfg = tiny()
    model = Transformer(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    out = compiled(ids, labels=ids)
    ref = model(ids, labels=ids)
    torch.testing.assert_close(out.loss, ref.loss)


# ---------------------------------------------------------------- config
@pytest.mark.parametrize("field,value,words", [
    ("scoring_func", "relu", ["scoring_func", "sigmoid", "softmax"]),
    ("topk_method", "best", ["topk_method", "noaux_tc", "greedy", "group_limited_greedy"]),
    ("attention_type", "linear", ["attention_type", "mla", "mha", "gqa"]),
    ("n_group", 3, ["n_group", "divide"]),
    ("topk_group", 5, ["topk_group"]),
    ("num_experts_per_tok", 99, ["num_experts_per_tok"]),
    ("qk_rope_head_dim", 7, ["qk_rope_head_dim", "even"]),
    ("hidden_act", "gelu", ["hidden_act", "silu"]),
])
def test_config_errors_name_the_field(field, value, words):
    with pytest.raises(ConfigError) as e:
        tiny(**{field: value})
    for w in words:
        assert w in str(e.value)


def test_config_reads_rope_parameters_and_rope_scaling():
    yarn = {"factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
            "mscale": 1.0, "mscale_all_dim": 1.0}
    base = {k: v for k, v in nanoseek.config.PRESETS["tiny"].items() if k != "rope_scaling"}
    a = ModelConfig.from_dict({**base, "rope_theta": 50000.0, "rope_scaling": {"type": "yarn", **yarn}})
    b = ModelConfig.from_dict({**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 50000.0, **yarn}})
    assert a.rope_scaling == b.rope_scaling and a.rope_theta == b.rope_theta == 50000.0
    assert a.softmax_scale == b.softmax_scale
    c = ModelConfig.from_dict(a.to_dict())
    assert c.rope_scaling == a.rope_scaling and c.softmax_scale == a.softmax_scale


def test_presets_build_and_bench_1b_shape():
    cfg = preset("bench-1b")
    with torch.device("meta"):
        m = Transformer(cfg)
    assert m.num_parameters(include_mtp=False) == pytest.approx(1.25e9, rel=0.005)
    for name in nanoseek.PRESETS:
        preset(name)  # every preset validates


def test_config_wrong_type_names_the_field():
    with pytest.raises(ConfigError, match="'kv_lora_rank' = 'abc': must be int"):
        tiny(kv_lora_rank="abc")
    with pytest.raises(ConfigError, match="'norm_topk_prob'"):
        tiny(norm_topk_prob="yes")


@pytest.mark.parametrize("name", ["dense", "gshard", "tiny", "deepseek-v2-lite"])
def test_config_dict_round_trip(name):
    cfg = preset(name)
    back = ModelConfig.from_dict(cfg.to_dict())
    assert back.is_moe == cfg.is_moe
    for f in ("num_nextn_predict_layers", "scoring_func", "topk_method", "q_lora_rank",
              "rope_scaling", "softmax_scale", "attention_type"):
        assert getattr(back, f) == getattr(cfg, f), f
    if cfg.is_moe:
        assert back.first_k_dense_replace == cfg.first_k_dense_replace
        assert back.n_routed_experts == cfg.n_routed_experts


def test_loss_of_a_fully_masked_batch_is_zero_not_nan():
    cfg = tiny()
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    out = model(ids, labels=torch.full_like(ids, -100))
    assert out.main_loss.item() == 0.0 and torch.isfinite(out.loss)


def test_nanoseek_runs_without_transformers():
    """transformers is a test dependency only: block it and build, run and save a model."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import torch, tempfile, nanoseek\n"
            "m = nanoseek.Transformer(nanoseek.preset('tiny'))\n"
            "d = tempfile.mkdtemp(); nanoseek.save_pretrained(m, d)\n"
            "x = torch.randint(0, 1024, (1, 8))\n"
            "assert torch.equal(nanoseek.from_pretrained(d)(x).logits, m.eval()(x).logits)\n"
            "import nanoseek.cli, nanoseek.train.trainer, nanoseek.data.tasks\n"
            "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
