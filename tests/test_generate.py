import math

import torch

from nanoseek import Transformer, preset
from nanoseek.infer import generate, sample_next


def greedy_by_recomputation(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_batched_greedy_equals_full_recomputation():
    cfg = preset("tiny")
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5)  # sharper logits: fewer near-ties between the two computations
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 200, 300, 400]]
    outs = generate(model, prompts, max_new_tokens=6)
    with torch.no_grad():
        for p, o in zip(prompts, outs):
            assert o == greedy_by_recomputation(model, p, 6)


def test_eos_stops_a_row_and_sampling_is_seeded():
    cfg = preset("tiny")
    model = Transformer(cfg).eval()
    first = generate(model, [[1, 2, 3]], max_new_tokens=1)[0][0]
    out = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=5, eos_id=first)
    assert out[0] == [first]
    a = generate(model, [[1, 2, 3]], 8, temperature=1.0, seed=7)
    b = generate(model, [[1, 2, 3]], 8, temperature=1.0, seed=7)
    assert a == b


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) <= {2, 3}
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=g).tolist()) == {3}


def test_top_k_keeps_exactly_k_tokens_with_their_renormalised_probabilities():
    """filter_sorted: k tokens stay even where values tie at the k-th (the sort's order
    breaks the tie), beyond k is -inf, and what stays is the distribution renormalised."""
    from nanoseek.infer.sampling import filter_sorted
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0], [1.0, 3.0, 2.0, 2.0, 0.0]])  # sampled in float32
    sorted_BV, order_BV = filter_sorted(logits, torch.tensor([1.0, 2.0]), torch.tensor([2, 9]),
                                        torch.tensor([1.0, 1.0]))
    assert torch.isinf(sorted_BV[0, 2:]).all() and torch.isfinite(sorted_BV[0, :2]).all()
    assert order_BV[0, 0] == 1 and order_BV[0, 1] in (2, 3)
    p = sorted_BV[0].double().softmax(-1)[:2]  # exp(3 - 3), exp(2 - 3), renormalised
    assert torch.allclose(p, torch.tensor([1.0, math.exp(-1)], dtype=torch.float64) / (1 + math.exp(-1)), rtol=1e-12)
    # k above the vocabulary keeps all, at the row's temperature
    assert torch.equal(sorted_BV[1], torch.tensor([1.5, 1.0, 1.0, 0.5, 0.0]))


def test_the_inverse_cdf_draws_in_vocabulary_order_and_never_a_banned_token():
    """sampling.draw / sample_tensors: uniforms on a fine grid land on each token as often as
    its probability says; 0 and 1 - 2^-24 land on the first and last allowed token (never a
    -inf one); unfiltered and filtered-with-no-filter batches draw the same tokens."""
    from nanoseek.infer.sampling import draw, sample_tensors
    inf = float("inf")
    logits = torch.tensor([[-inf, 1.0, 0.0, 2.0, -inf]])
    n = 20000
    u = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    tokens = draw(logits.expand(n, -1), u)
    p = logits[0].double().softmax(-1)
    freq = torch.bincount(tokens, minlength=5).double() / n
    assert freq[0] == 0 and freq[4] == 0
    assert torch.allclose(freq, p, atol=2.0 / n)          # each token's share of the grid, to a grid step
    assert draw(logits, torch.tensor([0.0])).item() == 1
    assert draw(logits, torch.tensor([1 - 2 ** -24])).item() == 3
    # the same rows through the filter with nothing to filter (top_k 0, top_p 1), and without it
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(64, 50, generator=g) * 3
    settings = (torch.zeros(64, dtype=torch.bool), torch.full((64,), 0.7), torch.zeros(64, dtype=torch.long),
                torch.ones(64))
    uniforms = torch.rand(64, generator=g)
    assert torch.equal(sample_tensors(rows, *settings, uniforms, filtered=True),
                       sample_tensors(rows, *settings, uniforms, filtered=False))


def test_the_two_level_inverse_cdf_matches_a_float64_one_across_blocks():
    """sampling.draw over a vocabulary of several DRAW_BLOCK blocks (a ragged last one), with
    banned tokens at block edges and a whole banned block: every uniform of a fine grid gets
    the token of a float64 inverse CDF, except within 1e-5 of a boundary between two tokens
    (float32 sums may put it either side); never a banned token; 0 and 1 - 2^-24 land on the
    first and last allowed tokens."""
    from nanoseek.infer.sampling import DRAW_BLOCK, draw
    K, V = DRAW_BLOCK, 3 * DRAW_BLOCK + 40
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, V, generator=g, dtype=torch.float64) * 2
    banned = torch.zeros(V, dtype=torch.bool)
    banned[[0, 1, K - 1, K, V - 1]] = True
    banned[2 * K:3 * K] = True  # a block with no weight at all
    logits[:, banned] = -torch.inf
    logits[2, 5:V - 9] = -torch.inf  # a row whose few allowed tokens sit at its two ends
    n = 20000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    for row in logits:
        tokens = draw(row.float().expand(n, -1), u.float())
        cdf = row.softmax(-1).cumsum(-1)
        want = torch.searchsorted(cdf, u, right=True).clamp(max=V - 1)
        near = (u[:, None] - cdf[None, :]).abs().min(-1).values < 1e-5
        assert not torch.isinf(row[tokens]).any()
        assert torch.equal(tokens[~near], want[~near]) and near.sum() < n // 100
        allowed = torch.isfinite(row).nonzero()[:, 0]
        assert draw(row[None].float(), torch.tensor([0.0])).item() == allowed[0]
        assert draw(row[None].float(), torch.tensor([1 - 2 ** -24])).item() == allowed[-1]

