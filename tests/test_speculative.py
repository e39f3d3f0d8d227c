import pytest
import torch

from conftest import float32_tolerance  # tests/ is on sys.path
from nanoseek import Transformer, preset
from nanoseek.infer import generate
from nanoseek.infer.speculative import (RequestStats, SpeculativeStats, greedy_accept, sampling_probs,
                                        speculative_accept, speculative_generate)

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 200, 300, 400], [42]]


class OracleDrafter:
    """Drafts from known continuations; `wrong` shifts every draft by one token."""

    def __init__(self, prompts, continuations, vocab, wrong=False):
        self.seqs = [p + c for p, c in zip(prompts, continuations)]
        self.vocab, self.wrong = vocab, wrong

    def observe(self, *args):
        pass

    def propose(self, pending_pos_B, k):
        drafts = [[s[i] if i < len(s) else 0 for i in range(p + 1, p + 1 + k)]
                  for s, p in zip(self.seqs, pending_pos_B.tolist())]
        d = torch.tensor(drafts)
        return ((d + 1) % self.vocab if self.wrong else d), None


@pytest.mark.parametrize("k", [1, 2, 3])
def test_speculative_greedy_equals_plain_greedy(model, k):
    want = generate(model, PROMPTS, max_new_tokens=12)
    got, stats = speculative_generate(model, PROMPTS, max_new_tokens=12, k=k)
    assert got == want
    for r in stats.requests:
        assert r.proposed == k * r.forwards and 0 <= r.accepted <= r.proposed
        assert 1 <= r.mean_accepted_length <= k + 1


def test_eos_stops_a_row(model):
    want = generate(model, PROMPTS, max_new_tokens=10)
    eos = want[0][3]
    got, _ = speculative_generate(model, PROMPTS, max_new_tokens=10, k=2, eos_id=eos)
    assert got == generate(model, PROMPTS, max_new_tokens=10, eos_id=eos)
    assert got[0] == want[0][: want[0].index(eos) + 1]


@pytest.mark.parametrize("k", [1, 3])
def test_perfect_drafter_accepts_everything(model, k):
    steps = 3
    n = 1 + steps * (k + 1)  # the prefill's token, then k+1 per verifying forward
    cont = generate(model, PROMPTS, max_new_tokens=n + k + 1)
    got, stats = speculative_generate(model, PROMPTS, max_new_tokens=n, k=k,
                                      drafter=OracleDrafter(PROMPTS, cont, model.config.vocab_size))
    assert got == [c[:n] for c in cont]
    for r in stats.requests:
        assert (r.proposed, r.accepted, r.forwards) == (steps * k, steps * k, steps)
    assert stats.acceptance_rate == 1.0 and stats.mean_accepted_length == k + 1


def test_wrong_drafter_accepts_nothing(model):
    n, k = 7, 2
    cont = generate(model, PROMPTS, max_new_tokens=n + k + 1)
    got, stats = speculative_generate(model, PROMPTS, max_new_tokens=n, k=k,
                                      drafter=OracleDrafter(PROMPTS, cont, model.config.vocab_size, wrong=True))
    assert got == [c[:n] for c in cont]
    assert stats.acceptance_rate == 0.0 and stats.mean_accepted_length == 1.0
    assert all(r.forwards == n - 1 for r in stats.requests)


def test_sampled_path_with_top_k_1_is_greedy_and_seeded(model):
    # top-k 1 makes p and q one-hot: the sampling rule must then reproduce greedy decoding
    want = generate(model, PROMPTS, max_new_tokens=8)
    got, _ = speculative_generate(model, PROMPTS, max_new_tokens=8, k=2, temperature=0.7, top_k=1, seed=3)
    assert got == want
    a = speculative_generate(model, PROMPTS, 8, k=2, temperature=1.0, seed=5)
    b = speculative_generate(model, PROMPTS, 8, k=2, temperature=1.0, seed=5)
    assert a[0] == b[0] and a[1].as_dict() == b[1].as_dict()
    assert all(len(o) == 8 for o in a[0])


def test_mtp_cache_matches_recomputation_without_cache(model, monkeypatch):
    """The drafter's cache bookkeeping against a cache-free twin, with rows accepting 2, 1,
    0 and alternately 2/0 drafts per step (oracle tokens replace the MTP module's drafts
    on the way to the verifier): at every step the MTP state behind d_1 equals the module
    run over the whole accepted sequence, and the module's own d_2 equals it applied once
    more to its normed output and d_1."""
    import nanoseek.infer.speculative as spec

    k, n = 2, 11
    seqs = [p + c for p, c in zip(PROMPTS, generate(model, PROMPTS, max_new_tokens=n + k + 1))]
    calls = []

    class Recording(spec.MTPDrafter):
        def propose(self, pending_pos_B, k):
            h = self.h_BD.clone()
            d, q = super().propose(pending_pos_B, k)
            calls.append((pending_pos_B.tolist(), h, d))
            right = torch.tensor([s[p + 1: p + 1 + k] for s, p in zip(seqs, pending_pos_B.tolist())])
            wrong = (right + 1) % model.config.vocab_size
            step = len(calls)
            return torch.stack([right[0], torch.stack([right[1, 0], wrong[1, 1]]), d[2],
                                right[3] if step % 2 else wrong[3]]), q

    monkeypatch.setattr(spec, "MTPDrafter", Recording)
    out, stats = spec.speculative_generate(model, PROMPTS, max_new_tokens=n, k=k)
    assert out == [s[len(p): len(p) + n] for p, s in zip(PROMPTS, seqs)]
    assert [r.accepted for r in stats.requests][:2] == [2 * stats.requests[0].forwards, stats.requests[1].forwards]
    checked = set()
    with torch.no_grad():
        for b, prompt in enumerate(PROMPTS):
            seq = prompt + out[b]
            for pos, h, d in calls:
                p = pos[b]  # x_p is pending; the MTP module runs at p-1 on (h_{p-1}, x_p)
                if (b, p) in checked:  # a finished row repeats its last position
                    continue
                checked.add((b, p))
                assert_drafts_recomputed(model, seq, p, h[b], d[b])
    assert len(checked) >= 3 + 5 + 5 + 5


def assert_drafts_recomputed(model, seq: list[int], p: int, h_D, d_K) -> None:
    """The drafter's state h (MTP output at p - 1, x_p pending) and its first two drafts equal
    a cache-free recomputation over seq[: p + 1]: the MTP module on (h_{<p}, x_{1..p}), then
    once more on its own normed output and first draft."""
    layer, stack = model.mtp_layers[0], model.model
    with torch.no_grad():
        ids = torch.tensor([seq[: p + 1]])
        hid = model(ids).hidden_states[:, :p]
        cos, sin = stack.rotary(torch.arange(p + 1)[None])
        ref, _ = layer(hid, stack.embed_tokens(ids[:, 1:]), cos[:, :p], sin[:, :p])
        # the cached and cache-free paths sum in other orders
        tol = float32_tolerance(model.config, p + 1, float(ref[0, -1].abs().max()))
        torch.testing.assert_close(h_D, ref[0, -1], atol=tol, rtol=0)
        g = layer.shared_head.norm(ref[:, -1:])
        assert int(model.lm_head(g)[0, 0].argmax()) == int(d_K[0])
        ref2, _ = layer(torch.cat([hid, g], 1), stack.embed_tokens(torch.cat([ids[:, 1:], d_K[None, :1]], 1)),
                        cos, sin)
        assert int(model.lm_head(layer.shared_head.norm(ref2[0, -1])).argmax()) == int(d_K[1])


def tv(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - probs).abs().sum())


P0 = torch.tensor([0.40, 0.25, 0.20, 0.10, 0.05, 0.00])
Q0 = torch.tensor([0.05, 0.10, 0.30, 0.05, 0.30, 0.20])  # mass where p has none, little where p has much
P1 = torch.tensor([0.10, 0.10, 0.50, 0.05, 0.05, 0.20])
Q1 = torch.tensor([0.30, 0.00, 0.30, 0.10, 0.10, 0.20])


def draw(q: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    return torch.multinomial(q.expand(n, -1), 1, replacement=True, generator=g)[:, 0]


def test_speculative_accept_emits_the_target_distribution():
    N, V = 20000, P0.numel()
    g = torch.Generator().manual_seed(0)
    # k = 1: the first emitted token is the draft when kept, else the residual's draw
    d = draw(Q0, N, g)
    n_acc, nxt = speculative_accept(torch.stack([P0, P1]).expand(N, 2, V), Q0.expand(N, 1, V), d[:, None], g)
    first = torch.where(n_acc == 1, d, nxt)
    assert tv(torch.bincount(first, minlength=V).float(), P0) < 0.02
    assert abs(n_acc.float().mean() - torch.minimum(P0, Q0).sum()) < 0.02  # P(keep) = Σ min(p, q)
    bonus = nxt[n_acc == 1]  # all drafts kept: one more from p_1
    assert tv(torch.bincount(bonus, minlength=V).float(), P1) < 0.04
    # k = 2: given the first draft kept, the second emitted token is distributed as p_1
    d = torch.stack([draw(Q0, N, g), draw(Q1, N, g)], 1)
    n_acc, nxt = speculative_accept(torch.stack([P0, P1, P0]).expand(N, 3, V),
                                    torch.stack([Q0, Q1]).expand(N, 2, V), d, g)
    first = torch.where(n_acc >= 1, d[:, 0], nxt)
    assert tv(torch.bincount(first, minlength=V).float(), P0) < 0.02
    second = torch.where(n_acc >= 2, d[:, 1], nxt)[n_acc >= 1]
    assert tv(torch.bincount(second, minlength=V).float(), P1) < 0.04


def test_sampled_generation_has_the_target_distribution():
    """End to end with the MTP drafter on an 8-token vocabulary (so drafts are often kept):
    the 1st, 2nd and 3rd new tokens of 4000 samples against their exact marginals. With
    k = 2 the 2nd and 3rd come from kept drafts, residual draws, bonus tokens and the next
    step; drawing a rejected draft's replacement from p instead of the residual gives TV > 0.1."""
    torch.manual_seed(0)
    m = Transformer(preset("tiny", vocab_size=8)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(4)
    prompt, N, V = [1, 2, 3], 4000, 8
    out, stats = speculative_generate(m, [prompt] * N, 3, k=2, temperature=1.0, seed=0)
    assert 0.05 < stats.acceptance_rate < 0.95
    with torch.no_grad():
        p1 = sampling_probs(m(torch.tensor([prompt])).logits[0, -1], 1.0)                       # [V]
        p2 = sampling_probs(m(torch.tensor([prompt + [a] for a in range(V)])).logits[:, -1], 1.0)  # [V, V]
        p3 = sampling_probs(m(torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])).logits[:, -1],
                            1.0).reshape(V, V, V)
    joint12 = p1[:, None] * p2
    o = torch.tensor(out)
    assert tv(torch.bincount(o[:, 0], minlength=V).float(), p1) < 0.05
    assert tv(torch.bincount(o[:, 1], minlength=V).float(), joint12.sum(0)) < 0.05
    assert tv(torch.bincount(o[:, 2], minlength=V).float(), (joint12[..., None] * p3).sum((0, 1))) < 0.05
    assert tv(torch.bincount(o[:, 0] * V + o[:, 1], minlength=V * V).float(), joint12.flatten()) < 0.07


def test_speculative_accept_edge_cases():
    g = torch.Generator().manual_seed(1)
    p = torch.tensor([[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]]).expand(1000, 2, 3)
    d = draw(p[0, 0], 1000, g)[:, None]
    n_acc, _ = speculative_accept(p, p[:, :1], d, g)
    assert bool((n_acc == 1).all())  # q == p: every draft kept
    n_acc, nxt = speculative_accept(p, torch.tensor([0.0, 0.0, 1.0]).expand(1000, 1, 3), torch.full((1000, 1), 2), g)
    assert bool((n_acc == 0).all()) and set(nxt.tolist()) <= {0, 1}  # p(d) = 0: always rejected


def test_greedy_accept_and_sampling_probs():
    target = torch.tensor([[1, 2, 3, 4], [1, 9, 3, 4], [7, 2, 3, 4]])
    n_acc, nxt = greedy_accept(target, torch.tensor([[1, 2, 3], [1, 2, 3], [1, 2, 3]]))
    assert n_acc.tolist() == [3, 1, 0] and nxt.tolist() == [4, 9, 7]
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert torch.allclose(sampling_probs(logits, 1.0), logits.softmax(-1))
    assert sampling_probs(logits, 1.0, top_k=2)[0, :2].sum() == 0
    probs = sampling_probs(logits[None].expand(2, 3, 4), 0.5, top_p=0.5)
    assert probs.shape == (2, 3, 4) and bool((probs[..., 3] == 1).all())


def test_stats_bookkeeping():
    s = SpeculativeStats([RequestStats(proposed=6, accepted=3, forwards=3), RequestStats(2, 2, 1),
                          RequestStats()])
    assert (s.total.proposed, s.total.accepted, s.total.forwards) == (8, 5, 4)
    assert s.acceptance_rate == 5 / 8 and s.mean_accepted_length == 9 / 4
    assert s.requests[0].mean_accepted_length == 2.0 and s.requests[2].acceptance_rate == 0.0
    d = s.as_dict()
    assert d["total"]["accepted"] == 5 and len(d["requests"]) == 3


def test_errors(model):
    with pytest.raises(ValueError, match=r"k \(drafts per step\) must be at least 1, got 0"):
        speculative_generate(model, [[1]], 4, k=0)
    no_mtp = Transformer(preset("tiny", num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match="MTP"):
        speculative_generate(no_mtp, [[1]], 4)
