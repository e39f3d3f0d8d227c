"""The inference engine: continuous batching over the latent cache, sampling, stops, streaming, CLI."""

import dataclasses

import pytest
import torch

from conftest import float32_tolerance  # tests/ is on sys.path
from nanoseek import Transformer, preset
from nanoseek.cli import main
from nanoseek.data.tokenizer import ChatTokenizer, byte_tokenizer
from nanoseek.infer.config import InferenceConfig
from nanoseek.infer.engine import Engine
from nanoseek.infer.reasoning import ReasoningSplitter
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.sequence import Sequence

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 200, 300, 400], list(range(20, 31))]


@pytest.fixture(scope="module")
def tokenizer():
    return ChatTokenizer(byte_tokenizer(preset("tiny").vocab_size))


@torch.no_grad()
def greedy_by_recomputation(model, prompt, n, margins=None):
    """n greedy tokens, each from a full forward over everything before it (no cache);
    margins: collects each choice's lead of the best logit over the second."""
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1]
        if margins is not None:
            top = logits.topk(2).values
            margins.append((float(top[0] - top[1]), float32_tolerance(model.config, len(ids), float(logits.abs().max()))))
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def reference(model):
    return [greedy_by_recomputation(model, p, 8) for p in PROMPTS]


def test_the_reference_choices_are_decisive(model):
    """Every greedy choice of the full recomputation leads the runner-up by more than twice
    the drift float32 allows between two orders of summation (conftest.float32_tolerance):
    the engine's cached computation cannot flip it, so the token equalities below test the
    engine, not rounding luck."""
    margins = []
    for prompt in PROMPTS:
        greedy_by_recomputation(model, prompt, 8, margins)
    assert all(lead > 2 * tol for lead, tol in margins), min(margins)


def greedy(n, **kw):
    return SamplingParams(max_tokens=n, ignore_eos=True, **kw)


def run_all(engine):
    while engine.has_unfinished():
        engine.step()


def test_greedy_batch_of_different_lengths_equals_full_recomputation(model, reference):
    engine = Engine(model, max_batch=4, max_len=64)
    outs = engine.generate(PROMPTS, greedy(8))
    for out, ref, prompt in zip(outs, reference, PROMPTS):
        assert out.token_ids == ref
        assert out.finish_reason == "length"
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt), 8)


@pytest.mark.parametrize("chunk", [1, 3, 5])
def test_chunked_prefill_equals_one_shot(model, reference, chunk):
    """Prompts of 2-11 tokens prefilled in chunks of 1, 3 or 5 through the cache (each chunk
    attending to the positions before it there): the prefill's next-token logits are the
    one-shot prefill's within float32's reordering bound, and the greedy tokens are the
    full recomputation's."""
    def prefill_logits(prefill_chunk):
        engine = Engine(model, max_batch=4, max_len=64, config=InferenceConfig(prefill_chunk=prefill_chunk))
        seqs = [engine.add_request(p, greedy(8)) for p in PROMPTS]
        kind, scheduled = engine.scheduler.schedule()
        assert kind == "prefill" and scheduled == seqs
        return engine.runner.prefill(seqs)
    want = prefill_logits(64)
    tol = float32_tolerance(model.config, max(map(len, PROMPTS)), float(want.abs().max()))
    torch.testing.assert_close(prefill_logits(chunk), want, rtol=0, atol=tol)
    engine = Engine(model, max_batch=4, max_len=64, config=InferenceConfig(prefill_chunk=chunk))
    assert [o.token_ids for o in engine.generate(PROMPTS, greedy(8))] == reference


def test_requests_joining_mid_batch_get_the_same_tokens_as_alone(model, reference):
    engine = Engine(model, max_batch=3, max_len=64)
    assert engine.last_step_kind is None
    a = engine.add_request(PROMPTS[0], greedy(8))
    b = engine.add_request(PROMPTS[1], greedy(3))
    c = engine.add_request(PROMPTS[2], greedy(8))
    engine.step()
    assert engine.last_step_kind == "prefill"  # what a server's /metrics counts each step as
    while not b.finished:
        engine.step()
    engine.step()  # a decode over slots 0 and 2 only: rows gathered around the free one
    assert (a.slot, c.slot, engine.scheduler.free_slots) == (0, 2, [1]) and engine.last_step_kind == "decode"
    e = engine.add_request(PROMPTS[1], greedy(8))  # joins mid-batch, into b's old slot
    d = engine.add_request(PROMPTS[3], greedy(8))  # no slot left: waits for a or c to finish
    engine.step()
    assert e.slot == 1 and d.slot is None
    run_all(engine)
    assert engine.step() == [] and engine.last_step_kind is None  # nothing left: no step of either kind
    assert b.output_ids == reference[1][:3] and b.finish_reason == "length"
    assert [a.output_ids, e.output_ids, c.output_ids, d.output_ids] == reference


def test_abort_frees_the_slot_and_the_others_continue_unchanged(model, reference):
    engine = Engine(model, max_batch=2, max_len=64)
    a = engine.add_request(PROMPTS[0], greedy(8), request_id="a")
    b = engine.add_request(PROMPTS[1], greedy(8), request_id="b")
    engine.step(), engine.step()
    slot = a.slot
    assert engine.abort("a") and not engine.abort("a") and not engine.abort("nope")
    assert a.finish_reason == "abort" and a.finished and slot in engine.scheduler.free_slots
    c = engine.add_request(PROMPTS[3], greedy(8))
    engine.step()  # c is admitted at once, into a's slot
    assert c.slot == slot
    run_all(engine)
    assert b.output_ids == reference[1] and c.output_ids == reference[3]


def test_seeded_sampling_is_per_request_and_independent_of_the_batch(model):
    params = SamplingParams(max_tokens=12, temperature=1.5, top_k=100, top_p=0.95, seed=123, ignore_eos=True)
    alone = Engine(model, max_batch=1, max_len=64).generate([PROMPTS[0]], params)[0].token_ids
    engine = Engine(model, max_batch=4, max_len=64)
    others = [greedy(5), SamplingParams(max_tokens=9, temperature=1.0, seed=7, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=1.5, seed=124, ignore_eos=True)]
    outs = engine.generate([PROMPTS[1], PROMPTS[2], PROMPTS[0], PROMPTS[0]], others[:2] + [params] + others[2:])
    assert outs[2].token_ids == alone
    assert outs[3].token_ids != alone  # another seed, another sample
    assert len(set(alone)) > 3  # really sampled (not greedy-like)


def test_stop_strings_stop_ids_and_max_tokens(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=2, max_len=64)
    full = engine.generate([PROMPTS[3]], greedy(16))[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 16
    # a stop string from inside the text: the output ends right before its first occurrence
    i = next(i for i in range(2, len(full.text) - 2)
             if "\ufffd" not in full.text[i:i + 2] and full.text.find(full.text[i:i + 2]) == i)
    stop = full.text[i:i + 2]
    out = engine.generate([PROMPTS[3]], greedy(16, stop=["never there", stop]))[0]
    assert out.text == full.text[:i] and out.finish_reason == "stop"
    assert out.token_ids == full.token_ids[: len(out.token_ids)] and len(out.token_ids) <= 16
    # a stop token id: kept in the ids, not in the text
    k = next(k for k in range(2, 16) if full.token_ids[k] not in full.token_ids[:k])
    out = engine.generate([PROMPTS[3]], greedy(16, stop_token_ids=[full.token_ids[k]]))[0]
    assert out.token_ids == full.token_ids[: k + 1] and out.finish_reason == "stop"
    assert out.text == tokenizer.decode(full.token_ids[:k])
    # EOS counts as a stop unless ignored
    engine.eos_id = full.token_ids[k]
    assert engine.generate([PROMPTS[3]], SamplingParams(max_tokens=16))[0].token_ids == full.token_ids[: k + 1]


def test_streaming_concatenates_to_the_full_text(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=3, max_len=64)
    prompts = ["Hello", "a", "12+3="]
    params = [greedy(20), greedy(14, temperature=1.0, seed=3), greedy(20, stop=["ab", "e"])]
    outs = engine.generate(prompts, params)
    texts, done = {}, {}
    for rid, new_text, finished, reason in engine.generate(prompts, params, stream=True):
        assert rid not in done
        texts[rid] = texts.get(rid, "") + new_text
        if finished:
            done[rid] = reason
    order = sorted(done, key=lambda rid: int(rid.split("-")[1]))  # request ids req-N, N in order
    assert [texts.get(rid, "") for rid in order] == [o.text for o in outs]
    assert [done[rid] for rid in order] == [o.finish_reason for o in outs]
    assert {o.finish_reason for o in outs} == {"stop", "length"}


def test_stream_never_breaks_a_character_nor_shows_part_of_a_stop(tokenizer):
    text = "naïve € costs 5 ST"
    ids = tokenizer.encode(text + "OP and more")
    seq = Sequence("r", [1], SamplingParams(stop=["STOP"]), max_tokens=100, seed=0)
    pieces = []
    for t in ids:
        pieces.append(seq.extend([t], tokenizer, eos_id=None))
        if seq.finished:
            break
    sent = [p.new_text for p in pieces]
    assert all("\ufffd" not in s and "S" not in s for s in sent)  # no half character, no start of STOP
    assert "".join(sent) == seq.text == "naïve € costs 5 "
    assert [p.finished for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert pieces[-1].finish_reason == "stop" and len(pieces) == len(tokenizer.encode(text + "OP"))


def test_a_token_completing_two_stop_strings_cuts_at_the_first():
    """"cd" completes both "bcd" (at 2) and "cd" (at 3) of "xabcd": the text ends before the
    earlier one, whichever is listed first."""
    pieces = {1: "x", 2: "a", 3: "b", 4: "cd", 5: "e"}

    class Pieces:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(pieces[i] for i in ids)

    seq = Sequence("r", [1], SamplingParams(stop=["cd", "bcd"]), max_tokens=100, seed=0)
    sent = [seq.extend([t], Pieces(), eos_id=None).new_text for t in (1, 2, 3, 4)]
    assert seq.finished and seq.finish_reason == "stop"
    assert seq.text == "".join(sent) == "xa"


def test_cache_holds_latent_and_rope_key_only_within_a_budget():
    cfg = preset("tiny")
    model = Transformer(cfg).to(torch.bfloat16).eval()
    per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 2
    engine = Engine(model, max_batch=3, max_len=64)
    assert engine.cache_bytes_per_token == per_token == 240
    buffers = [b for layer in engine.cache.layers for b in layer]
    assert len(buffers) == 2 * cfg.num_hidden_layers  # c_kv and k_pe per main layer, no MTP
    assert {tuple(b.shape) for b in buffers} == {(3, 64, cfg.kv_lora_rank), (3, 64, cfg.qk_rope_head_dim)}
    assert all(b.dtype == torch.bfloat16 for b in buffers)
    assert engine.cache_bytes == sum(b.numel() * b.element_size() for b in buffers) == 3 * 64 * per_token
    out = engine.generate([[1, 2, 3]], greedy(4))[0]  # bf16 end to end
    assert len(out.token_ids) == 4
    budgeted = Engine(model, max_batch=8, max_len=64, cache_budget_bytes=2 * 64 * per_token + 100)
    assert budgeted.num_slots == 2 and budgeted.cache_bytes == 2 * 64 * per_token
    with pytest.raises(ValueError, match=r"budget of 1,000 bytes holds no sequence.*64 tokens × 240 bytes"):
        Engine(model, max_len=64, cache_budget_bytes=1000)


def test_a_request_that_cannot_fit_is_refused_with_the_numbers(model):
    engine = Engine(model, max_batch=2, max_len=32)
    with pytest.raises(ValueError, match=r"prompt \(20 tokens\) \+ max_tokens \(13\) = 33 tokens does not fit "
                                         r"in the context of 32 tokens.*max_position_embeddings is 512"):
        engine.add_request(list(range(20)), SamplingParams(max_tokens=13))
    engine.add_request(list(range(20)), SamplingParams(max_tokens=12))  # exactly fits
    assert engine.add_request(list(range(20))).max_tokens == 12  # default: what the context leaves
    with pytest.raises(ValueError, match="max_position_embeddings"):
        Engine(model, max_len=513)
    with pytest.raises(ValueError, match="num_nextn_predict_layers = 0"):
        Engine(Transformer(preset("tiny", num_nextn_predict_layers=0)), speculative_k=2)
    with pytest.raises(ValueError, match="speculative_k"):
        Engine(model, speculative_k=-1)


def test_reasoning_is_split_from_the_answer_across_chunks():
    s = ReasoningSplitter()
    pieces = []
    for chunk in ["<th", "ink>let me", " see</t", "hink>", "4", "<"]:
        pieces += s.feed(chunk)
    pieces += s.flush()
    assert pieces == [("reasoning", "let me"), ("reasoning", " see"), ("answer", "4"), ("answer", "<")]
    assert (s.reasoning, s.answer) == ("let me see", "4<")


def test_cli_generate_prints_what_the_engine_generates(tmp_path, capsys):
    import nanoseek
    from nanoseek.loading import tokenizer_for
    ckpt = tmp_path / "ckpt"
    assert main(["init", "--preset", "tiny", "--out", str(ckpt)]) == 0
    model, tok = nanoseek.from_pretrained(ckpt), tokenizer_for(ckpt)
    capsys.readouterr()
    for extra, params, prompt in [
            ([], SamplingParams(max_tokens=12), "Hello"),
            (["--temperature", "0.9", "--top-p", "0.9", "--seed", "5"],
             SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=5), "Hello"),
            (["--chat"], SamplingParams(max_tokens=12),
             tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True))]:
        expected = Engine(model, tok, max_batch=1, max_len=128).generate([prompt], params)[0].text
        rc = main(["generate", "--model", str(ckpt), "--prompt", "Hello", "--max-tokens", "12",
                   "--device", "cpu", *extra])
        out, err = capsys.readouterr()
        assert rc == 0 and out == expected + "\n", err
    rc = main(["generate", "--model", str(ckpt), "--prompt", "Hi", "--max-tokens", "600", "--device", "cpu"])
    assert rc == 2 and "does not fit in the context of 512 tokens" in capsys.readouterr().err


def test_cli_chat_streams_a_reply_per_turn(tmp_path, capsys, monkeypatch):
    import io
    ckpt = tmp_path / "ckpt"
    main(["init", "--preset", "tiny", "--out", str(ckpt)])
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nhow are you?\n"))
    assert main(["chat", "--model", str(ckpt), "--max-tokens", "5", "--seed", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 2 and out.startswith("nanoseek chat:")


@pytest.mark.parametrize("compile", [False, True])
def test_static_shape_decode_step_matches_eager_decode(compile):
    """The CUDA-graph step (all bucket rows, full-length reads, dummy rows at position 0),
    plain or through torch.compile, computes what the eager decode computes; run here
    without capture, on the CPU."""
    from nanoseek.infer.cuda_graph import GraphDecoder
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.sampling import SamplingParams
    cfg = preset("tiny")
    model = Transformer(cfg).eval()
    engine = Engine(model, None, max_batch=4, max_len=32)
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=8), request_id="a")
    engine.add_request([1, 2, 3, 4], SamplingParams(max_tokens=8), request_id="gone")
    engine.add_request([9, 10], SamplingParams(max_tokens=8), request_id="b")
    engine.step()  # prefill all three
    engine.abort("gone")  # slots 0 and 2 decode: bucket 4, dummy rows 1 and 3, rows gathered
    seqs = [engine.scheduler.find("a"), engine.scheduler.find("b")]
    assert [s.slot for s in seqs] == [0, 2]
    eager = engine.runner.decode(seqs)
    # the eager decode wrote its own entries; the static step rewrites the same slots
    graph = GraphDecoder(model, engine.cache, None, compile=compile, capture=False)
    slots = [s.slot for s in seqs]
    with torch.no_grad():
        static = graph.decode(slots, [s.last_token for s in seqs], [s.num_tokens - 1 for s in seqs])
    assert graph.graphs and graph.compile == compile  # no silent fallback
    torch.testing.assert_close(static, eager, rtol=1e-4, atol=1e-5)


def test_the_compiled_step_leaves_its_inputs_to_the_caller():
    """The decode step's compiled function returns the next ids and positions instead of
    writing them: an opaque op in the graph (the attention kernels) reads the positions, and
    Inductor need not order a write inside the graph after it. _call writes them, clamped at
    the cache's last position, outside the compiled function."""
    from nanoseek.infer.cuda_graph import GraphDecoder
    model = Transformer(preset("tiny")).eval()
    engine = Engine(model, None, max_batch=2, max_len=16)
    graph = GraphDecoder(model, engine.cache, None, compile=True, capture=False)
    graph.load([graph.ids, graph.positions], [0, 1], [5, 9], [3, 15])
    ids, positions = graph.ids.clone(), graph.positions.clone()
    with torch.no_grad():
        (logits, tokens), (next_ids, next_positions) = graph._compiled_step((2, False))(*graph._inputs((2, False)))
    assert torch.equal(graph.ids, ids) and torch.equal(graph.positions, positions)  # untouched inside
    assert torch.equal(next_ids[:, 0], logits.argmax(-1)) and torch.equal(tokens, logits.argmax(-1))
    assert next_positions[:, 0].tolist() == [4, 15]  # the last position holds
    with torch.no_grad():
        graph._call((2, False))
    assert graph.ids[:2, 0].tolist() == tokens.tolist() and graph.positions[:2, 0].tolist() == [4, 15]


def burst_engine(model, tokenizer=None, compile=False, config=None, **kw):
    """An engine whose decode runs through GraphDecoder's static step in bursts of 4, here
    without capture (CPU): the step's own token choice and input advance, as replayed on a GPU.
    config: its other settings (InferenceConfig's defaults when None)."""
    from nanoseek.infer.cuda_graph import GraphDecoder
    engine = Engine(model, tokenizer, config=dataclasses.replace(config or InferenceConfig(), decode_burst=4), **kw)
    engine.runner.graphs = GraphDecoder(model, engine.cache, None, compile=compile, capture=False)
    return engine


def test_decode_bursts_equal_one_step_at_a_time(model, tokenizer):
    """Greedy and seeded sampled requests (top-k, top-p), stop strings, stop ids, EOS, different
    budgets and a request that joins mid-way: bursts of 4 steps, tokens chosen inside the step,
    give exactly the one-step engine's outputs, stops inside a burst included."""
    plain = Engine(model, tokenizer, max_batch=3, max_len=64)
    full = plain.generate(["Hello"], greedy(16))[0]
    stop = next(full.text[i:i + 2] for i in range(5, len(full.text) - 2)
                if "\ufffd" not in full.text[i:i + 2] and full.text.find(full.text[i:i + 2]) == i)
    prompts = ["Hello", "a", "12+3=", "Hello", "xyz"]
    params = [greedy(16, stop=[stop]), greedy(13, temperature=1.0, seed=3),
              greedy(11, temperature=0.8, top_k=50, top_p=0.9, seed=5),
              greedy(16, stop_token_ids=[full.token_ids[6]]), SamplingParams(max_tokens=14, seed=9)]
    expected = [o for o in plain.generate(prompts, params)]
    engine = burst_engine(model, tokenizer, max_batch=3, max_len=64)
    seqs = [engine.add_request(p, sp) for p, sp in zip(prompts[:3], params[:3])]
    engine.step(), engine.step()  # prefill, one burst; then two more join as slots free up
    seqs += [engine.add_request(p, sp) for p, sp in zip(prompts[3:], params[3:])]
    run_all(engine)
    got = [s.output() for s in seqs]
    assert [(o.token_ids, o.text, o.finish_reason) for o in got] == \
        [(o.token_ids, o.text, o.finish_reason) for o in expected]
    assert got[0].finish_reason == got[3].finish_reason == "stop"  # a stop string, a stop id
    graphs = engine.runner.graphs
    assert {sampled for _, sampled in graphs.graphs} == {False, True}  # both step forms ran


def test_a_burst_where_no_row_filters_samples_without_the_sort(model, tokenizer):
    """Temperature-only requests (no top-k, no top-p): the bursts run the unfiltered form of
    the sampling step, and every request's tokens are those the one-step engine draws, where
    a filtering request in the same batch makes it sort."""
    from nanoseek.infer.cuda_graph import UNFILTERED
    prompts = ["Hello", "a", "12+3="]
    params = [greedy(12, temperature=1.0, seed=3), greedy(12, temperature=0.7, seed=4), greedy(12)]
    engine = burst_engine(model, tokenizer, max_batch=3, max_len=64)
    got = [o.token_ids for o in engine.generate(prompts, params)]
    assert {variant for _, variant in engine.runner.graphs.graphs} == {UNFILTERED}
    assert got == [o.token_ids for o in Engine(model, tokenizer, max_batch=3, max_len=64).generate(prompts, params)]
    # beside a row that filters, the same requests draw the same tokens
    mixed = burst_engine(model, tokenizer, max_batch=4, max_len=64)
    both = mixed.generate(prompts + ["xyz"], params + [greedy(12, temperature=0.8, top_p=0.5, seed=5)])
    assert [o.token_ids for o in both[:3]] == got
    assert {variant for _, variant in mixed.runner.graphs.graphs} == {True}


def test_a_sampler_that_fails_to_compile_keeps_the_models_forward_compiled(model, tokenizer, monkeypatch):
    """Where Inductor cannot compile the sampling step (code generation failed on the sampler
    on one build), the sampled steps compile the model's forward and sample uncompiled, the
    greedy steps stay whole, and the tokens are the one-step engine's."""
    from nanoseek.infer import cuda_graph
    real = cuda_graph.sample_tensors

    def sampler(*args, **kwargs):
        if torch.compiler.is_compiling():
            raise RuntimeError("the sampler's code generation failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(cuda_graph, "sample_tensors", sampler)
    prompts, params = ["Hello", "12+3="], [greedy(9), greedy(9, temperature=0.8, top_k=50, seed=5)]
    expected = Engine(model, tokenizer, max_batch=2, max_len=32).generate(prompts, params)
    engine = burst_engine(model, tokenizer, compile=True, max_batch=2, max_len=32)
    with pytest.warns(UserWarning, match="compiling the model's forward only"):
        got = engine.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    graphs = engine.runner.graphs
    assert graphs.compile and not graphs.compile_sampler  # not the whole step uncompiled
    assert {name for name, _ in graphs._compiled} == {"_step", "_logits"}


def test_bursts_run_rows_to_the_end_of_their_context(model, tokenizer):
    """Requests that fill the whole context (max_tokens None), with different prompt lengths:
    the shorter budget ends inside a burst, its row runs on to the cache's end and beyond
    (positions held there) while the other continues; the tokens are the one-step engine's."""
    prompts = ["Hello there", "a", "12+3="]
    params = [SamplingParams(ignore_eos=True), SamplingParams(temperature=1.0, seed=11, ignore_eos=True),
              SamplingParams(max_tokens=3, ignore_eos=True)]
    want = [o.token_ids for o in Engine(model, tokenizer, max_batch=3, max_len=25).generate(prompts, params)]
    engine = burst_engine(model, tokenizer, max_batch=3, max_len=25)
    got = engine.generate(prompts, params)
    assert [o.token_ids for o in got] == want
    # 11 + 14 tokens: the first ends 1 step into the fourth burst, whose other 3 steps its row
    # runs at positions 24, 24, 24 (the cache's last), while the second, 1 + 24 tokens, goes on
    assert [len(tokenizer.encode(p)) for p in prompts[:2]] == [11, 1]
    assert [len(p) + len(o.token_ids) for p, o in zip(map(tokenizer.encode, prompts[:2]), got)] == [25, 25]


def test_a_failed_capture_falls_back_to_eager_steps_with_the_same_tokens(model, tokenizer):
    """The burst drew the sampled rows' uniforms before its capture failed: they are given
    back, so the eager steps after it draw the same numbers and the tokens are unchanged."""
    params = [greedy(10, temperature=1.0, seed=4), greedy(10)]
    expected = [o.token_ids for o in Engine(model, tokenizer, max_batch=2, max_len=64).generate(["ab", "c"], params)]
    engine = burst_engine(model, tokenizer, max_batch=2, max_len=64)

    def fail(key):
        raise RuntimeError("no capture here")
    engine.runner.graphs._capture = fail
    with pytest.warns(UserWarning, match="capture of the decode step failed"):
        outs = engine.generate(["ab", "c"], params)
    assert engine.runner.graphs.failed and [o.token_ids for o in outs] == expected


@pytest.mark.gpu
def test_graph_decoding_follows_in_place_weight_updates():
    """float32 weights under bf16 autocast, decode captured as CUDA graphs: after an in-place
    update (as an optimizer's, in GRPO) the engine's tokens equal an eager engine's on the
    new weights; autocast's weight cache would have frozen (or freed) the captured copies."""
    torch.manual_seed(0)
    tok = ChatTokenizer(byte_tokenizer(1024))
    model = Transformer(preset("tiny")).cuda()
    prompts, sp = [tok.encode("What is 12 + 34?"), tok.encode("Using 1, 2")], SamplingParams(max_tokens=16)

    def tokens(engine):
        return [o.token_ids for o in engine.generate(prompts, sp)]

    graphs = Engine(model, tok, max_batch=4, max_len=64)
    before = tokens(graphs)  # captures the graphs with the first weights
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    assert graphs.runner.graphs.graphs  # the decode ran from captured graphs
    after = tokens(Engine(model, tok, max_batch=4, max_len=64, config=InferenceConfig(cuda_graphs=False)))
    assert after != before  # the update changes the tokens, so stale captured weights would show
    assert tokens(graphs) == after


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_captured_decode_bursts_equal_captured_single_steps(compile, tokenizer):
    """On a GPU, bursts of 8 replayed graphs (the token chosen and the inputs advanced inside
    the graph, read back once per burst) give the tokens of single replays, greedy and
    seeded sampled rows alike. One budget for all, so both runs meet the same buckets
    (another bucket can run other kernels, whose last bits differ)."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).cuda().eval()
    prompts = ["What is 12 + 34?", "Using 1, 2", "abc"]
    params = [greedy(24), greedy(24, temperature=1.0, seed=1), greedy(24, temperature=0.7, top_p=0.9, seed=2)]

    def run(burst):
        engine = Engine(model, tokenizer, max_batch=4, max_len=64,
                        config=InferenceConfig(compile=compile, decode_burst=burst))
        outs = engine.generate(prompts, params)
        assert engine.runner.graphs.graphs and not engine.runner.graphs.failed
        assert engine.runner.graphs.compile == compile
        return [o.token_ids for o in outs]
    assert run(8) == run(1)


@pytest.mark.gpu
def test_captured_speculative_bursts_equal_captured_single_steps(tokenizer):
    """On a GPU, bursts of captured greedy speculative steps (each from the token and position
    the last one wrote inside the graph) give the tokens and statistics of single replays."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).cuda().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5)  # sharper logits, as tests/conftest.py's model
    prompts, params = ["What is 12 + 34?", "Using 1, 2", "abc"], greedy(30)

    def run(burst):
        engine = Engine(model, tokenizer, max_batch=4, max_len=64, speculative_k=2,
                        config=InferenceConfig(decode_burst=burst))
        outs = engine.generate(prompts, params)
        assert engine.runner.spec_graphs.graphs and not engine.runner.spec_graphs.failed
        return [(o.token_ids, o.speculative) for o in outs]
    assert run(8) == run(1)


def test_incremental_detokenizing_equals_decoding_the_whole_output():
    """Sequence builds its text token by token from the ids since the last stable point; for
    outputs that split multi-byte characters over tokens (and end inside one) the text equals
    decoding everything at once, and what streams is always a prefix of it."""
    tok = ChatTokenizer(byte_tokenizer(512))
    text = "naïve — 数学 ok 🙂 end"
    base = tok.encode(text)
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        ids = base + torch.randint(9, 265, (int(torch.randint(1, 12, (), generator=g)),), generator=g).tolist()
        seq = Sequence(f"r{trial}", [1], SamplingParams(max_tokens=len(ids), ignore_eos=True), len(ids), seed=0)
        streamed = ""
        for t in ids:
            streamed += seq.extend([t], tok, eos_id=None).new_text
            assert tok.decode(seq.output_ids).startswith(seq.text)
        assert seq.finished and seq.text == tok.decode(ids) and streamed == seq.text


def test_extending_by_runs_equals_extending_token_by_token():
    """Sequence.extend with a decode burst's tokens at once against one token at a time, over
    runs of random lengths: the same ids, text, finish reason and streamed text, for outputs
    that split characters over tokens, stop ids, EOS (and ignore_eos), max_tokens and stop
    strings; without a tokenizer too."""
    tok = ChatTokenizer(byte_tokenizer(512))
    base = tok.encode("naïve — 数学 ok 🙂 end")
    g = torch.Generator().manual_seed(1)
    cases = [dict(), dict(stop_token_ids=[base[7]]), dict(ignore_eos=True), dict(stop=["ok"])]
    for trial in range(24):
        ids = base + torch.randint(9, 265, (int(torch.randint(1, 12, (), generator=g)),), generator=g).tolist()
        eos = ids[int(torch.randint(3, len(ids), (), generator=g))] if trial % 3 == 0 else None
        params = SamplingParams(max_tokens=len(ids) - int(torch.randint(0, 4, (), generator=g)),
                                **cases[trial % len(cases)])
        for tokenizer in (tok, None):
            # the ids run up to 3 past max_tokens: both must cut there
            one = Sequence("a", [1], params, params.max_tokens, seed=0)
            runs = Sequence("b", [1], params, params.max_tokens, seed=0)
            streamed_one = streamed_runs = ""
            for t in ids:
                if not one.finished:
                    streamed_one += one.extend([t], tokenizer, eos).new_text
            i = 0
            while not runs.finished and i < len(ids):
                n = int(torch.randint(1, 9, (), generator=g))
                streamed_runs += runs.extend(ids[i: i + n], tokenizer, eos).new_text
                i += n
            assert (runs.output_ids, runs.text, runs.finish_reason, streamed_runs) == \
                (one.output_ids, one.text, one.finish_reason, streamed_one)


@pytest.mark.parametrize("budget", [0, 3])
def test_a_stop_string_completed_by_the_last_allowed_token_ends_as_stop(budget):
    """max_tokens reached by the very token that completes a stop string: finish_reason
    "stop" and the text cut before it (as with tokens to spare)."""
    tok = ChatTokenizer(byte_tokenizer(512))
    ids = tok.encode("abc</answer>")
    n = len(ids) + budget
    seq = Sequence("r", [1], SamplingParams(max_tokens=n, stop=["</answer>"]), n, seed=0)
    for t in ids:
        seq.extend([t], tok, eos_id=None)
    assert (seq.text, seq.finish_reason, seq.finished) == ("abc", "stop", True)


@pytest.mark.gpu
def test_a_32k_prompt_prefills_in_chunks_on_gpu():
    """DeepSeek-V3's attention widths (128 heads, latent 512), one layer, BF16: a prompt of
    32K tokens prefills chunk by chunk (2048 tokens attending to up to 32K cached positions
    each) and decodes, its peak memory a few GiB; in one shot the expanded keys and values
    of every head and a 32K x 32K mask would come on top of each other."""
    from nanoseek.hf import to_dtype
    cfg = preset("deepseek-v3", num_hidden_layers=1, first_k_dense_replace=1, intermediate_size=2048,
                 vocab_size=1024, num_nextn_predict_layers=0)
    model = to_dtype(Transformer(cfg), torch.bfloat16).cuda().eval()
    n = 32 * 1024
    engine = Engine(model, max_batch=1, max_len=n + 8, config=InferenceConfig(cuda_graphs=False, prefill_chunk=2048))
    torch.cuda.reset_peak_memory_stats()
    out = engine.generate([[t % 1000 + 3 for t in range(n)]], greedy(2))[0]
    assert len(out.token_ids) == 2 and torch.cuda.max_memory_allocated() < 16 * 2**30
