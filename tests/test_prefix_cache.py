"""Prefix caching: the same tokens with and without it, fewer prompt tokens computed with it."""

import pytest
import torch
from test_engine import burst_engine

from nanoseek.infer.config import InferenceConfig
from nanoseek.infer.engine import Engine
from nanoseek.infer.prefix_cache import PrefixCache
from nanoseek.infer.sampling import SamplingParams

SYSTEM = [(7 * i + 3) % 500 + 9 for i in range(53)]  # a 53-token "system prompt": 3 full blocks of 16
QUESTIONS = [[11, 12, 13], [40, 41], [200, 201, 202, 203, 204], [77], list(range(90, 102))]


CACHED = InferenceConfig(prefix_cache=True)


def greedy(n=8):
    return SamplingParams(max_tokens=n, ignore_eos=True)


def run(engine, prompts, params):
    """Requests added in two waves (the second while the first decodes), run to the end."""
    half = len(prompts) // 2
    seqs = [engine.add_request(p, params) for p in prompts[:half]]
    engine.step(), engine.step()
    seqs += [engine.add_request(p, params) for p in prompts[half:]]
    while engine.has_unfinished():
        engine.step()
    return seqs


@pytest.mark.parametrize("make", [Engine, burst_engine])
def test_outputs_are_token_identical_with_and_without_the_prefix_cache(model, make):
    """Prompts sharing a system prompt, two slots for five requests (prefixes read from a running
    slot, from a free one in place, copied from another, evicted), plus a second turn that
    extends a first conversation; greedy tokens equal those of the engine without the cache.
    With bursts, the rows no request holds must leave the free slots' cached prefixes alone."""
    prompts = [SYSTEM + q for q in QUESTIONS]
    plain = [s.output_ids for s in run(make(model, max_batch=2, max_len=96), prompts, greedy())]
    engine = make(model, max_batch=2, max_len=96, config=CACHED)
    seqs = run(engine, prompts, greedy())
    assert [s.output_ids for s in seqs] == plain
    assert [s.cached_tokens for s in seqs] == [0, 48, 48, 48, 48]
    assert engine.prefilled_tokens == sum(map(len, prompts)) - 4 * 48
    # a second turn of the last conversation: its prompt and answer stayed in its slot (all
    # but the answer's last token, 65 + 7 tokens: 4 blocks, one past the system prompt)
    turn = prompts[-1] + plain[-1] + [300, 301]
    (second,) = engine.generate([turn], greedy())
    (want,) = make(model, max_batch=2, max_len=96).generate([turn], greedy())
    assert second.token_ids == want.token_ids and second.cached_tokens == 64


@pytest.mark.parametrize("chunk", [4, 7])
def test_a_cached_prefix_and_a_remainder_prefilled_in_chunks(model, chunk):
    """Prefix cache and chunked prefill together: a request that reads the system prompt's 48
    cached tokens computes the rest of its prompt (6 to 17 tokens) in chunks of `chunk`, each
    at the positions after what the cache holds; greedy tokens equal those of the engine with
    neither, and only the uncached tokens are computed."""
    prompts = [SYSTEM + q for q in QUESTIONS]
    plain = [s.output_ids for s in run(Engine(model, max_batch=2, max_len=96), prompts, greedy())]
    engine = Engine(model, max_batch=2, max_len=96, config=InferenceConfig(prefix_cache=True, prefill_chunk=chunk))
    starts = []  # per prefill forward, the first position of each row

    def record(module, args, kwargs):
        if kwargs.get("absorb") is False:  # the prefill's expanded attention, not a decode step
            starts.append(kwargs["positions"][:, 0].tolist())
            assert kwargs["positions"].shape[1] <= chunk
    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        seqs = run(engine, prompts, greedy())
    finally:
        hook.remove()
    assert [s.output_ids for s in seqs] == plain
    assert [s.cached_tokens for s in seqs] == [0, 48, 48, 48, 48]
    assert engine.prefilled_tokens == sum(map(len, prompts)) - 4 * 48
    # a cached request's remainder: its first chunk at position 48, its second one chunk later
    assert any(48 in rows for rows in starts) and any(48 + chunk in rows for rows in starts)


def test_a_request_sharing_a_prefix_with_one_in_the_same_step_waits_to_reuse_it(model):
    engine = Engine(model, max_batch=4, max_len=96, config=CACHED)
    seqs = [engine.add_request(SYSTEM + q, greedy(2)) for q in QUESTIONS[:3]]
    engine.step()  # the first prefills alone; the others would compute the same 48 tokens again
    assert [s.slot is not None for s in seqs] == [True, False, False]
    engine.step()
    assert [s.cached_tokens for s in seqs] == [0, 48, 48] and len({s.slot for s in seqs}) == 3
    assert {s.copy_from for s in seqs[1:]} == {seqs[0].slot}


def test_the_least_recently_used_prefix_is_evicted_when_its_slot_is_needed(model):
    engine = Engine(model, max_batch=2, max_len=96, config=CACHED)
    other = [(5 * i + 1) % 400 + 9 for i in range(40)]
    third = [(3 * i + 2) % 300 + 9 for i in range(40)]
    engine.generate([SYSTEM + [1], other + [1]], greedy(2))  # both slots hold a prefix now
    (again,) = engine.generate([SYSTEM + [2]], greedy(2))
    assert again.cached_tokens == 48  # read in place; `other` is now the least recently used
    engine.generate([third + [1]], greedy(2))  # takes the slot that held `other`
    (kept,) = engine.generate([SYSTEM + [3]], greedy(2))
    (gone,) = engine.generate([other + [2]], greedy(2))
    assert kept.cached_tokens == 48 and gone.cached_tokens == 0


def test_chained_block_hashes_name_a_whole_prefix():
    pc = PrefixCache(num_slots=2, block_size=4)
    a, b = pc.hashes([1, 2, 3, 4, 5, 6, 7, 8, 9]), pc.hashes([0, 2, 3, 4, 5, 6, 7, 8])
    assert len(a) == 2 and len(b) == 2 and a[1] != b[1]  # same second block, different first
    pc.record(0, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert pc.longest(a, limit_tokens=9) == (0, 8) and pc.longest(a, limit_tokens=7) == (0, 4)
    assert pc.longest(b, limit_tokens=8) == (None, 0)
    pc.forget(0, keep=1)
    assert pc.longest(a, limit_tokens=9) == (0, 4) and pc.cached_blocks == 1


def test_prefix_caching_refuses_speculative_decoding(model):
    with pytest.raises(ValueError, match="speculative"):
        Engine(model, max_batch=1, max_len=32, speculative_k=2, config=CACHED)


def test_the_benchmarks_float32_referee_judges_where_two_outputs_part(model):
    """benchmarks/prefix_cache.py: where the no-cache and cached tokens part, the reference
    model's logits there give the margin (over the logits' std) and the side it prefers."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "prefix_cache_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "prefix_cache.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    prompts = [SYSTEM + QUESTIONS[0], SYSTEM + QUESTIONS[1], SYSTEM + QUESTIONS[2]]
    with torch.no_grad():
        logits = model(torch.tensor([prompts[1] + [5, 6]])).logits[0, -1].double()
    best, worse = logits.topk(2).indices.tolist()
    pairs = [([5, 6, 7], [5, 6, 7]),            # identical: not judged
             ([5, 6, worse, 1], [5, 6, best, 1]),  # part at 2, the cached side has the better token
             ([3, best], [3, best, 2])]          # one a prefix of the other: they never part in a token
    verdict = bench.referee(model, prompts, pairs)
    gap = (logits[best] - logits[worse]).item() / logits.std().item()
    assert verdict["parted"] == 1 and verdict["cache_preferred"] == 1
    assert verdict["margin_over_logit_std"]["median"] == pytest.approx(gap, rel=1e-4, abs=1e-4)
    assert verdict["margin_over_logit_std"]["max"] == pytest.approx(gap, rel=1e-4, abs=1e-4)
    assert bench.referee(model, prompts[:1], pairs[:1]) == {"parted": 0, "cache_preferred": 0,
                                                           "margin_over_logit_std": None}
