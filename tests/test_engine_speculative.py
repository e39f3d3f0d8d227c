"""MTP speculative decoding in the engine: greedy equals plain greedy, stops in the middle of an
accepted run, the MTP layer's cache and drafter state, per-request seeded sampling, stats, CLI."""

import pytest
import torch

from nanoseek import Transformer, preset
from nanoseek.cli import main
from nanoseek.data.tokenizer import ChatTokenizer, byte_tokenizer
from nanoseek.infer.config import InferenceConfig
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.speculative import sampling_probs
from test_speculative import assert_drafts_recomputed  # tests/ is on sys.path

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 200, 300, 400], list(range(20, 31))]


@pytest.fixture(scope="module")
def tokenizer():
    return ChatTokenizer(byte_tokenizer(preset("tiny").vocab_size))


def greedy(n, **kw):
    return SamplingParams(max_tokens=n, ignore_eos=True, **kw)


def plain(model, prompts, params, tokenizer=None):
    return Engine(model, tokenizer, max_batch=len(prompts), max_len=64).generate(prompts, params)


def run_all(engine):
    while engine.has_unfinished():
        engine.step()


def use_oracle(engine, continuations, wrong=lambda rid, step: False):
    """Replace the MTP drafts by the known continuation of each request (request id -> its
    prompt + output); `wrong(rid, step)` shifts a row's second draft onwards by one token."""
    steps = {}

    def draft(seqs, drafter, pending_pos_B, uniforms):
        k, rows = engine.speculative_k, []
        for s, p in zip(seqs, pending_pos_B.tolist()):
            full = continuations[s.request_id]
            right = [full[i] if i < len(full) else 0 for i in range(p + 1, p + 1 + k)]
            steps[s.request_id] = steps.get(s.request_id, 0) + 1
            if wrong(s.request_id, steps[s.request_id]):
                right = right[:1] + [(t + 1) % engine.model.config.vocab_size for t in right[1:]]
            rows.append(right)
        return torch.tensor(rows), None

    engine.runner.draft = draft


@pytest.mark.parametrize("k", [1, 2, 3])
def test_speculative_greedy_equals_plain_greedy_and_stats_add_up(model, k):
    want = [o.token_ids for o in plain(model, PROMPTS, greedy(12))]
    engine = Engine(model, max_batch=4, max_len=64, speculative_k=k)
    outs = engine.generate(PROMPTS, greedy(12))
    assert [o.token_ids for o in outs] == want
    for o in outs:
        s = o.speculative
        assert s["proposed"] == k * s["forwards"] and 0 <= s["accepted"] <= s["proposed"]
        assert s["forwards"] <= 11 and 1 <= s["mean_accepted_length"] <= k + 1
        assert s["acceptance_rate"] == (s["accepted"] / s["proposed"] if s["proposed"] else 0.0)
    total = engine.speculative_stats()
    assert total["k"] == k
    for key in ("proposed", "accepted", "forwards"):
        assert total[key] == sum(o.speculative[key] for o in outs)
    assert total["mean_accepted_length"] == (total["forwards"] + total["accepted"]) / total["forwards"]
    assert Engine(model, max_batch=1, max_len=64).speculative_stats() is None
    assert plain(model, PROMPTS[:1], greedy(2))[0].speculative is None


def test_requests_joining_mid_run_get_the_plain_tokens(model):
    want = [o.token_ids for o in plain(model, PROMPTS, greedy(10))]
    engine = Engine(model, max_batch=3, max_len=64, speculative_k=2)
    a = engine.add_request(PROMPTS[0], greedy(10))
    b = engine.add_request(PROMPTS[1], greedy(3))
    c = engine.add_request(PROMPTS[2], greedy(10))
    while not b.finished:
        engine.step()
    engine.step()  # a speculative step over slots 0 and 2 only: gathered rows
    assert (a.slot, c.slot, engine.scheduler.free_slots) == (0, 2, [1])
    e = engine.add_request(PROMPTS[1], greedy(10))  # joins mid-run, into b's old slot
    d = engine.add_request(PROMPTS[3], greedy(10))  # waits for a slot
    run_all(engine)
    assert b.output_ids == want[1][:3]
    assert [a.output_ids, e.output_ids, c.output_ids, d.output_ids] == want


@pytest.mark.parametrize("k", [1, 3])
def test_perfect_drafter_accepts_everything(model, k):
    steps = 3
    n = 1 + steps * (k + 1)  # the prefill's token, then k+1 per verifying forward
    cont = plain(model, PROMPTS, greedy(n + k + 1))
    engine = Engine(model, max_batch=4, max_len=64, speculative_k=k)
    use_oracle(engine, {f"p{i}": p + c.token_ids for i, (p, c) in enumerate(zip(PROMPTS, cont))})
    seqs = [engine.add_request(p, greedy(n), request_id=f"p{i}") for i, p in enumerate(PROMPTS)]
    run_all(engine)
    assert [s.output_ids for s in seqs] == [c.token_ids[:n] for c in cont]
    for s in seqs:
        assert s.output().speculative == dict(proposed=steps * k, accepted=steps * k, forwards=steps,
                                              acceptance_rate=1.0, mean_accepted_length=k + 1)
    stats = engine.speculative_stats()
    assert stats["acceptance_rate"] == 1.0 and stats["mean_accepted_length"] == k + 1
    assert stats["forwards"] == 4 * steps


def test_stops_in_the_middle_of_an_accepted_run(model, tokenizer):
    """With every draft accepted (4 tokens a step), a stop string, a stop id, EOS or
    max_tokens that falls inside a run ends the request there, as without speculation."""
    prompt = PROMPTS[3]
    full = plain(model, [prompt], greedy(24), tokenizer)[0]
    dec = tokenizer.decode
    j = next(j for j in range(5, 20) if j % 4 and full.token_ids[j] not in full.token_ids[:j])
    i = next(i for i in range(5, 20) if i % 4 and "\ufffd" not in dec(full.token_ids[i: i + 1])
             and dec(full.token_ids[i: i + 1]) not in dec(full.token_ids[:i]))
    cases = [greedy(24, stop=[dec(full.token_ids[i: i + 1])]), greedy(24, stop_token_ids=[full.token_ids[j]]),
             greedy(7), SamplingParams(max_tokens=24)]
    for params in cases:
        eng = Engine(model, tokenizer, max_batch=1, max_len=64, speculative_k=3)
        eng.eos_id = full.token_ids[j]  # only the last case does not ignore it
        base = Engine(model, tokenizer, max_batch=1, max_len=64)
        base.eos_id = full.token_ids[j]
        want = base.generate([prompt], params)[0]
        use_oracle(eng, {"r": prompt + full.token_ids})
        seq = eng.add_request(prompt, params, request_id="r")
        run_all(eng)
        got = seq.output()
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)
        assert got.speculative["acceptance_rate"] == 1.0 and len(got.token_ids) in (i + 1, j + 1, 7)
        assert len(got.token_ids) < 24 and got.speculative["forwards"] == -(-(len(got.token_ids) - 1) // 4)


def test_stream_of_a_speculative_request_concatenates_to_its_text(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=2, max_len=64, speculative_k=2)
    prompts, params = ["Hello", "12+3="], [greedy(20), greedy(20, stop=["ab", "e"])]
    outs = engine.generate(prompts, params)
    texts = {}
    for rid, new_text, finished, reason in engine.generate(prompts, params, stream=True):
        texts[rid] = texts.get(rid, "") + new_text
    assert sorted(texts.values()) == sorted(o.text for o in outs)
    assert [o.text for o in outs] == [o.text for o in plain(model, prompts, params, tokenizer)]


@pytest.mark.parametrize("prefill_chunk", [2048, 3])
def test_mtp_state_matches_recomputation_without_cache(model, prefill_chunk):
    """The engine's drafter state per slot against the MTP module run over the whole accepted
    sequence, with rows accepting k, 1, 0 or alternately k/1 drafts, a request joining mid-run
    and gathered (non-contiguous) rows: the state behind each row's first draft, the draft
    itself, and (through the MTP layer's cache) the second draft; with the prompts prefilled
    whole, and in chunks of 3 (the MTP layer's pass over them too)."""
    k, n = 2, 9
    cont = plain(model, PROMPTS, greedy(n + k + 1))
    full = {f"p{i}": p + c.token_ids for i, (p, c) in enumerate(zip(PROMPTS, cont))}
    engine = Engine(model, max_batch=3, max_len=64, speculative_k=k, config=InferenceConfig(prefill_chunk=prefill_chunk))
    real_draft, calls = engine.runner.draft, []

    def draft(seqs, drafter, pending_pos_B, uniforms):
        h = drafter.h_BD.clone()
        d, q = real_draft(seqs, drafter, pending_pos_B, uniforms)
        calls.append(([s.request_id for s in seqs], pending_pos_B.tolist(), h, d))
        out = []
        for b, (s, p) in enumerate(zip(seqs, pending_pos_B.tolist())):
            right = full[s.request_id][p + 1: p + 1 + k]
            wrong = [(t + 1) % model.config.vocab_size for t in right]
            rule = {"p0": right, "p1": right[:1] + wrong[1:], "p2": d[b].tolist(),
                    "p3": right if len(calls) % 2 else right[:1] + wrong[1:]}[s.request_id]
            out.append(rule)
        return torch.tensor(out), q

    engine.runner.draft = draft
    seqs = [engine.add_request(p, greedy(n), request_id=f"p{i}") for i, p in enumerate(PROMPTS[:3])]
    engine.step(), engine.step()
    seqs.append(engine.add_request(PROMPTS[3], greedy(n), request_id="p3"))
    run_all(engine)
    assert [s.output_ids for s in seqs] == [c.token_ids[:n] for c in cont]
    assert seqs[0].speculative.accepted == k * seqs[0].speculative.forwards
    checked = 0
    for rids, positions, h, d in calls:
        for b, (rid, p) in enumerate(zip(rids, positions)):
            assert_drafts_recomputed(model, full[rid], p, h[b], d[b])
            checked += 1
    assert checked >= 12


def test_seeded_sampled_speculative_requests_are_reproducible(model):
    params = SamplingParams(max_tokens=12, temperature=1.5, top_k=100, top_p=0.95, seed=123, ignore_eos=True)
    alone = Engine(model, max_batch=1, max_len=64, speculative_k=2).generate([PROMPTS[0]], params)[0]
    again = Engine(model, max_batch=1, max_len=64, speculative_k=2).generate([PROMPTS[0]], params)[0]
    assert alone.token_ids == again.token_ids and alone.speculative == again.speculative
    assert len(set(alone.token_ids)) > 3  # really sampled
    engine = Engine(model, max_batch=4, max_len=64, speculative_k=2)
    others = [greedy(9), SamplingParams(max_tokens=9, temperature=1.0, seed=7, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=1.5, seed=124, ignore_eos=True)]
    outs = engine.generate([PROMPTS[1], PROMPTS[2], PROMPTS[0], PROMPTS[0]], others[:2] + [params] + others[2:])
    assert outs[2].token_ids == alone.token_ids  # the same in any batch
    assert outs[3].token_ids != alone.token_ids  # another seed, another sample
    assert outs[0].token_ids == plain(model, [PROMPTS[1]], greedy(9))[0].token_ids  # a greedy row beside
    # top-k 1 makes p and q one-hot: the sampling rule reproduces greedy decoding
    top1 = SamplingParams(max_tokens=10, temperature=0.7, top_k=1, seed=3, ignore_eos=True)
    got = Engine(model, max_batch=4, max_len=64, speculative_k=3).generate(PROMPTS, top1)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain(model, PROMPTS, greedy(10))]


def tv(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - probs).abs().sum())


def test_sampled_speculative_output_has_the_target_distribution():
    """2000 seeded requests on an 8-token vocabulary (drafts often kept), each with its own
    uniforms: the 1st, 2nd and 3rd new tokens against their exact marginals."""
    torch.manual_seed(0)
    m = Transformer(preset("tiny", vocab_size=8)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(4)
    prompt, N, V = [1, 2, 3], 2000, 8
    engine = Engine(m, max_batch=N, max_len=8, speculative_k=2)
    outs = engine.generate([prompt] * N, [SamplingParams(max_tokens=3, temperature=1.0, seed=s, ignore_eos=True)
                                          for s in range(N)])
    assert 0.05 < engine.speculative_stats()["acceptance_rate"] < 0.95
    with torch.no_grad():
        p1 = sampling_probs(m(torch.tensor([prompt])).logits[0, -1], 1.0)
        p2 = sampling_probs(m(torch.tensor([prompt + [a] for a in range(V)])).logits[:, -1], 1.0)
        p3 = sampling_probs(m(torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])).logits[:, -1],
                            1.0).reshape(V, V, V)
    joint12 = p1[:, None] * p2
    o = torch.tensor([out.token_ids for out in outs])
    assert tv(torch.bincount(o[:, 0], minlength=V).float(), p1) < 0.06
    assert tv(torch.bincount(o[:, 1], minlength=V).float(), joint12.sum(0)) < 0.06
    assert tv(torch.bincount(o[:, 2], minlength=V).float(), (joint12[..., None] * p3).sum((0, 1))) < 0.06


def test_cache_has_the_mtp_layer_reported_apart():
    cfg = preset("tiny")
    model = Transformer(cfg).to(torch.bfloat16).eval()
    per_layer = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
    engine = Engine(model, max_batch=3, max_len=64, speculative_k=3)
    assert engine.cache_bytes_per_token == per_layer * cfg.num_hidden_layers  # the main model's figure
    assert engine.mtp_cache_bytes_per_token == per_layer
    assert len(engine.cache.layers) == cfg.num_hidden_layers + 1 and engine.cache.max_len == 64 + 2
    assert engine.cache_bytes == 3 * 66 * per_layer * (cfg.num_hidden_layers + 1)
    assert len(engine.generate([[1, 2, 3]], greedy(6))[0].token_ids) == 6  # bf16 end to end
    assert Engine(model, max_batch=3, max_len=64).mtp_cache_bytes_per_token == 0
    with pytest.raises(ValueError, match=r"64 tokens \+ 2 for drafts × 320 bytes per token \(main model 240 "
                                         r"\+ MTP layer 80\) needs 21,120 bytes"):
        Engine(model, max_len=64, cache_budget_bytes=1000, speculative_k=3)
    # the longest request that fits runs to its end: verifies write past it, inside the slot
    out = Engine(model, max_batch=1, max_len=16, speculative_k=3).generate([list(range(4))], greedy(12))[0]
    assert len(out.token_ids) == 12


def test_cli_generate_speculative_prints_the_same_text(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert main(["init", "--preset", "tiny", "--out", str(ckpt)]) == 0
    capsys.readouterr()
    texts = []
    for extra in ([], ["--speculative", "2"]):
        rc = main(["generate", "--model", str(ckpt), "--prompt", "Hello", "--max-tokens", "16",
                   "--device", "cpu", *extra])
        out, err = capsys.readouterr()
        assert rc == 0, err
        texts.append(out)
    assert texts[0] == texts[1] and len(texts[0]) > 1
    assert main(["generate", "--model", str(ckpt), "--prompt", "Hi", "--speculative", "-1",
                 "--device", "cpu"]) == 2


@pytest.mark.parametrize("k, burst", [(1, 1), (3, 1), (1, 8), (3, 8)])
def test_static_greedy_speculative_step_equals_plain_greedy(model, k, burst):
    """GraphSpeculator's step (rows [0, bucket), full-length reads, dummy rows at position 0,
    no host sync), one step per read-back or in bursts (each step starting from the token and
    position the last one wrote), gives plain greedy's tokens and the eager path's
    statistics; run here without capture, on the CPU."""
    from nanoseek.infer.cuda_graph import GraphSpeculator
    want = [o.token_ids for o in plain(model, PROMPTS, greedy(12))]
    eager = Engine(model, max_batch=4, max_len=64, speculative_k=k)
    want_stats = [o.speculative for o in eager.generate(PROMPTS[1:], greedy(12))]
    engine = Engine(model, max_batch=4, max_len=64, speculative_k=k, config=InferenceConfig(decode_burst=burst))
    engine.runner.spec_graphs = GraphSpeculator(engine.runner, capture=False)
    # three of four rows: the bucket of 4 holds a dummy row
    outs = engine.generate(PROMPTS[1:], greedy(12))
    assert engine.runner.spec_graphs.graphs  # the static step ran
    assert [o.token_ids for o in outs] == want[1:]
    assert [o.speculative for o in outs] == want_stats


def test_speculative_bursts_stop_inside_a_burst_and_count_only_the_steps_taken(model):
    """A stop id, or a max_tokens, met inside a burst of speculative steps ends the request
    there (plain greedy's tokens up to it), and its statistics count the steps up to that
    one, as one step per read-back does; the steps the burst ran after it are not counted."""
    from nanoseek.infer.cuda_graph import GraphSpeculator
    full = [o.token_ids for o in plain(model, PROMPTS[:3], greedy(24))]
    # a stop id, a short budget (ends inside the first burst) and a long one
    params = [greedy(24, stop_token_ids=[full[0][9]]), greedy(24), greedy(4)]
    want = [o.token_ids for o in plain(model, PROMPTS[:3], params)]
    assert len(want[0]) <= 10 < len(want[1])  # the stop is met early
    stats = {}
    for burst in (1, 8):
        engine = Engine(model, max_batch=3, max_len=64, speculative_k=2, config=InferenceConfig(decode_burst=burst))
        engine.runner.spec_graphs = GraphSpeculator(engine.runner, capture=False)
        outs = engine.generate(PROMPTS[:3], params)
        assert [o.token_ids for o in outs] == want and outs[0].finish_reason == "stop"
        assert outs[2].finish_reason == "length"
        stats[burst] = [o.speculative for o in outs]
    assert stats[8] == stats[1]


def test_graph_warm_ups_leave_the_step_state_as_they_found_it(model):
    """Capture runs each step twice first; those runs advance what the step writes besides the
    cache (the speculator's pending token, position and drafter state; the decoder's ids and
    positions), and all of it must be back before the captured step's first replay."""
    from nanoseek.infer.cuda_graph import GraphDecoder, GraphSpeculator
    engine = Engine(model, max_batch=2, max_len=64, speculative_k=2)
    for p in PROMPTS[:2]:
        engine.add_request(p, greedy(8))
    engine.step()  # prefill: the drafter state of both rows
    spec = GraphSpeculator(engine.runner, capture=False)
    decoder = GraphDecoder(model, engine.cache, None, capture=False)
    seqs = engine.scheduler.running
    for graphs, key, tensors in ((spec, (2, None), [spec.pending, spec.pos, engine.runner.draft_h]),
                                 (decoder, (2, False), [decoder.ids, decoder.positions])):
        graphs.load(tensors[:2], [s.slot for s in seqs], [s.last_token for s in seqs],
                    [s.num_tokens - 1 for s in seqs])
        before = [t.clone() for t in tensors]
        with torch.no_grad():
            graphs._warm_up(key)
            assert all(torch.equal(t, b) for t, b in zip(tensors, before))
            graphs._call(key)  # a step does change every one of them
        assert not any(torch.equal(t, b) for t, b in zip(tensors, before))


def test_speculative_bursts_run_rows_to_the_end_of_their_context(model):
    """Requests that fill a 37-token context (max_tokens None) with prompts of different
    lengths: the first to end runs on inside the burst at positions held where its verify still
    fits the cache; both get plain greedy's tokens, to the context's last position."""
    from nanoseek.infer.cuda_graph import GraphSpeculator
    prompts = [PROMPTS[3], PROMPTS[1]]
    want = [o.token_ids for o in plain(model, prompts, [greedy(37 - len(p)) for p in prompts])]
    engine = Engine(model, max_batch=2, max_len=37, speculative_k=3, config=InferenceConfig(decode_burst=8))
    engine.runner.spec_graphs = GraphSpeculator(engine.runner, capture=False)
    outs = engine.generate(prompts, SamplingParams(ignore_eos=True))
    assert [o.token_ids for o in outs] == want
    assert [len(p) + len(o.token_ids) for p, o in zip(prompts, outs)] == [37, 37]


def test_speculation_takes_the_decode_attention_kernels(model):
    """With decode_attention="kernel" the MTP drafts' one-token steps attend through the
    kernels (latent_attention.py, Triton's interpreter without a GPU; no padding row: idle
    -1), and greedy speculation still gives plain greedy's tokens."""
    pytest.importorskip("triton")
    want = [o.token_ids for o in plain(model, PROMPTS[:2], greedy(8))]
    engine = Engine(model, max_batch=2, max_len=64, speculative_k=2, config=InferenceConfig(decode_attention="kernel"))
    attend, calls = engine.runner.decode_attend, []
    assert attend is not None and attend.idle == -1
    engine.runner.decode_attend = lambda *args: calls.append(1) or attend(*args)
    assert [o.token_ids for o in engine.generate(PROMPTS[:2], greedy(8))] == want
    assert calls
