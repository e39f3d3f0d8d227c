"""What a request changes about the next token: logprobs, prompt logprobs, penalties, logit bias.

Logprobs are checked against a full forward of prompt + output: in float64 for the reference,
with a tolerance that is the float32 full forward's own distance from it (the engine rounds
differently — cached latents, the absorbed decode path — but no worse than a few times that).
"""

import copy

import pytest
import torch

from test_engine import burst_engine

from nanoseek import preset
from nanoseek.data.tokenizer import ChatTokenizer, byte_tokenizer
from nanoseek.infer.config import InferenceConfig
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams, process_logits

PROMPT = [12, 40, 77, 5, 93, 61, 8]


@pytest.fixture(scope="module")
def tokenizer():
    return ChatTokenizer(byte_tokenizer(preset("tiny").vocab_size))


@torch.no_grad()
def full_logprobs(model, ids):
    """log_softmax of a full forward's logits over ids [T, V], in float32 and float64."""
    lp32 = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    lp64 = copy.deepcopy(model).double()(torch.tensor([ids])).logits[0].log_softmax(-1)
    return lp32, lp64


def tolerance(lp32, lp64):
    """A few times the float32 forward's own rounding, plus a few float32 ulps of the values."""
    eps = torch.finfo(torch.float32).eps
    return 8 * (lp32.double() - lp64).abs().max().item() + 16 * eps * lp64.abs().max().item()


@pytest.mark.parametrize("path", ["eager", "burst", "chunked"])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_logprobs_are_log_softmax_of_the_models_logits(model, path, temperature):
    """Output and prompt logprobs, and the top tokens, equal a full forward's log_softmax at
    the tokens returned, for greedy and sampled rows, eager steps and decode bursts, and a
    prompt prefilled in chunks of 3 (its logprobs gathered chunk by chunk)."""
    engine = {"eager": lambda: Engine(model, None, max_batch=2, max_len=32),
              "burst": lambda: burst_engine(model, max_batch=2, max_len=32),
              "chunked": lambda: Engine(model, None, max_batch=2, max_len=32,
                                        config=InferenceConfig(prefill_chunk=3))}[path]()
    params = SamplingParams(max_tokens=9, temperature=temperature, seed=4, ignore_eos=True, logprobs=3,
                            prompt_logprobs=2)
    other = SamplingParams(max_tokens=5, ignore_eos=True)  # a batch-mate without logprobs
    out, plain = engine.generate([PROMPT, [3, 4]], [params, other])
    assert plain.logprobs is None and plain.prompt_logprobs is None
    ids = PROMPT + out.token_ids
    lp32, lp64 = full_logprobs(model, ids)
    tol = tolerance(lp32, lp64)
    n = len(PROMPT)
    assert len(out.logprobs) == len(out.token_ids) == 9
    for i, entry in enumerate(out.logprobs):
        ref = lp64[n - 1 + i]
        assert entry.token == out.token_ids[i]
        assert abs(entry.logprob - ref[entry.token].item()) <= tol
        want_top = ref.topk(3)
        assert [t for t, _ in entry.top] == want_top.indices.tolist()
        assert max(abs(lp - r) for (_, lp), r in zip(entry.top, want_top.values.tolist())) <= tol
        if temperature == 0:
            assert entry.top[0][0] == entry.token  # greedy: the most likely token
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == n
    for i in range(1, n):
        entry = out.prompt_logprobs[i]
        assert entry.token == PROMPT[i] and len(entry.top) == 2
        assert abs(entry.logprob - lp64[i - 1, PROMPT[i]].item()) <= tol


def test_max_tokens_zero_scores_the_prompt_only(model):
    engine = Engine(model, None, max_batch=2, max_len=16)
    (out,) = engine.generate([PROMPT], SamplingParams(max_tokens=0, prompt_logprobs=0))
    assert out.token_ids == [] and out.finish_reason == "length"
    lp32, lp64 = full_logprobs(model, PROMPT)
    got = torch.tensor([e.logprob for e in out.prompt_logprobs[1:]], dtype=torch.float64)
    want = lp64[torch.arange(len(PROMPT) - 1), torch.tensor(PROMPT[1:])]
    assert (got - want).abs().max().item() <= tolerance(lp32, lp64)
    with pytest.raises(ValueError, match="max_tokens must be at least 1"):
        SamplingParams(max_tokens=0)


def test_logit_bias_bans_and_forces_tokens(model):
    engine = Engine(model, None, max_batch=2, max_len=32)
    greedy = dict(max_tokens=6, ignore_eos=True)
    (free,) = engine.generate([PROMPT], SamplingParams(**greedy))
    banned = {t: -100.0 for t in free.token_ids}
    (out,) = engine.generate([PROMPT], SamplingParams(**greedy, logit_bias=banned))
    assert not set(out.token_ids) & set(banned)
    (forced,) = engine.generate([PROMPT], SamplingParams(**greedy, temperature=1.0, seed=1,
                                                         logit_bias={321: 100.0}))
    assert forced.token_ids == [321] * 6
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={1: 101.0})
    with pytest.raises(ValueError, match="logit_bias token ids"):
        engine.add_request(PROMPT, SamplingParams(logit_bias={10**6: 1.0}))


def test_penalties_as_openai_and_ctrl_define_them():
    """process_logits against the formulas written out in float64 on a small vocabulary."""
    torch.manual_seed(0)
    logits = torch.randn(3, 7, dtype=torch.float64) * 3
    prompts, outputs = [[0, 1], [2], [4]], [[1, 1, 3], [5], []]
    params = [SamplingParams(frequency_penalty=0.5, presence_penalty=-0.25),
              SamplingParams(repetition_penalty=1.5, logit_bias={6: 2.0}),
              SamplingParams()]
    got = process_logits(logits, params, prompts, outputs).double()
    want = logits.clone()
    for token, count in ((1, 2), (3, 1)):  # row 0: the output's tokens only
        want[0, token] -= 0.5 * count + (-0.25)
    for token in (2, 5):                   # row 1: prompt and output tokens
        v = want[1, token]
        want[1, token] = v / 1.5 if v > 0 else v * 1.5
    want[1, 6] += 2.0
    eps = torch.finfo(torch.float32).eps
    assert (got - want).abs().max() <= 4 * eps * want.abs().max()
    for name in ("presence_penalty", "frequency_penalty"):
        with pytest.raises(ValueError, match=name):
            SamplingParams(**{name: 2.5})


@pytest.mark.parametrize("penalty", [dict(frequency_penalty=2.0, presence_penalty=2.0),
                                     dict(repetition_penalty=3.0)])
def test_a_penalty_changes_greedy_output_first_where_it_repeats(model, penalty):
    """Penalties only lower seen tokens' logits, so a greedy output keeps its tokens up to the
    first one it had already seen (in its output; for the repetition penalty, in the prompt
    too), and there this model's penalized choice moves to another token."""
    engine = Engine(model, None, max_batch=1, max_len=48)
    greedy = dict(max_tokens=16, ignore_eos=True)
    (free,) = engine.generate([PROMPT], SamplingParams(**greedy))
    (penalized,) = engine.generate([PROMPT], SamplingParams(**greedy, **penalty))
    seen = set(PROMPT) if "repetition_penalty" in penalty else set()
    first = next(i for i, t in enumerate(free.token_ids) if t in seen or t in free.token_ids[:i])
    assert penalized.token_ids[:first] == free.token_ids[:first]
    assert penalized.token_ids[first] != free.token_ids[first]


def test_skip_special_tokens_leaves_them_out_of_the_text(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=1, max_len=48)
    params = dict(max_tokens=24, ignore_eos=True, logit_bias={300: 3.0, 0: 3.0})  # reserved, BOS
    (kept,) = engine.generate([PROMPT], SamplingParams(**params))
    (skipped,) = engine.generate([PROMPT], SamplingParams(**params, skip_special_tokens=True))
    assert kept.token_ids == skipped.token_ids and {0, 300} & set(kept.token_ids)
    assert skipped.text == tokenizer.decode([t for t in kept.token_ids if t not in range(0, 9) and t < 265])
    assert kept.text == tokenizer.decode(kept.token_ids) != skipped.text


def test_chunked_argmax_is_torchs_argmax():
    """The two-pass argmax of a GPU decode step gives torch's argmax: random rows, a maximum
    repeated within a chunk and across chunks (the first wins), a row all -inf but one entry,
    a NaN (above all, the first), a maximum in the last chunk's last entry; and the one-pass
    fallback where no chunk divides the vocabulary."""
    from nanoseek.infer.sampling import argmax_chunk, argmax_rows, chunked_argmax
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 24 * 64, generator=g)
    x[1, [70, 75, 700]] = 9.0            # ties in one chunk and in a later one
    x[2] = float("-inf")
    x[2, 1000] = -1e30
    x[3, [5, 900]] = float("nan")
    x[4, -1] = 50.0
    x[5, [64, 128]] = 7.0               # ties at the first entries of two chunks
    want = x.argmax(-1)
    assert want[:6].tolist()[1:6] == [70, 1000, 5, 24 * 64 - 1, 64]
    for chunk in (64, 128, 256):
        assert torch.equal(chunked_argmax(x, chunk), want)
    assert torch.equal(argmax_rows(x), want)
    # V2-Lite's, V3's and bench-1b's vocabularies in chunks of 2,048, 2,020 and 2,000; a prime none
    assert [argmax_chunk(V) for V in (102400, 129280, 32000, 1009)] == [2048, 2020, 2000, 0]
