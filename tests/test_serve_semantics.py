"""Every OpenAI field the server accepts does what it does in OpenAI's API (or vLLM's), checked
with the official `openai` client against a live server: logprobs, echo, penalties, logit
bias, stop sequences, JSON output, tools, R1 reasoning, special tokens, unknown fields."""

import json
import shutil

import pytest

openai = pytest.importorskip("openai")

from test_sampling import full_logprobs, tolerance  # noqa: E402
from test_serve import CHAT, ScriptedEngine, live, tiny_app  # noqa: E402

from nanoseek.cli import build_parser  # noqa: E402
from nanoseek.data.tokenizer import BYTE_SYMBOLS, ChatTokenizer  # noqa: E402
from nanoseek.hf import from_pretrained  # noqa: E402
from nanoseek.loading import tokenizer_for  # noqa: E402
from nanoseek.infer.config import InferenceConfig  # noqa: E402
from nanoseek.infer.engine import Engine  # noqa: E402
from nanoseek.serve.app import create_app  # noqa: E402
from nanoseek.serve.launch import settings_from_args  # noqa: E402
from nanoseek.serve.prompt import ChatEncoder  # noqa: E402
from nanoseek.serve.tools import (CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, OUTPUT_BEGIN, OUTPUT_END,  # noqa: E402
                                  OUTPUTS_BEGIN, OUTPUTS_END, SEP, forced_call_grammar, template_turns)
from nanoseek.serve.protocol import ChatCompletionRequest  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_dir):
    app = tiny_app(tiny_dir, "tiny", max_tokens=64)
    with live(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return tokenizer_for(tiny_dir)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return from_pretrained(tiny_dir).eval()


def token_id(tok, raw: bytes) -> int:
    """The byte tokenizer's id of a token given by its bytes (one byte, or a special token)."""
    text = BYTE_SYMBOLS[raw[0]] if len(raw) == 1 else raw.decode()
    return tok.tokenizer.token_to_id(text)


def chat_ids(tok, messages):
    return ChatEncoder(tok).encode_chat([{"role": m["role"], "content": m["content"]} for m in messages])


# ------------------------------------------------------------ unknown fields
def test_unknown_fields_are_400_naming_them_unless_allowed(client, tiny_dir):
    for extra, param in (({"best_of": 2}, "best_of"), ({"messages": [{**CHAT[0], "name": "bob"}]}, "messages.0.name")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, extra_body=extra)
        assert e.value.code == "unknown_parameter" and e.value.param == param
        assert param.split(".")[-1] in e.value.message
    assert settings_from_args(build_parser().parse_args(["serve", "--model", "m", "--allow-unknown-fields"])
                              ).allow_unknown_fields
    relaxed = tiny_app(tiny_dir, "tiny", allow_unknown_fields=True)
    with live(relaxed) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        out = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, extra_body={"best_of": 2})
        assert out.usage.completion_tokens >= 1
        with pytest.raises(openai.BadRequestError) as e:  # the known fields' types stay strict
            c.chat.completions.create(model="tiny", messages=CHAT, extra_body={"max_tokens": "2", "best_of": 2})
        assert e.value.code == "invalid_value" and e.value.param == "max_tokens"


# ------------------------------------------------------------ logprobs and echo
def test_chat_logprobs_are_log_softmax_of_the_models_logits(client, tok, model):
    out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    output = [token_id(tok, bytes(e.bytes)) for e in content]
    prompt = chat_ids(tok, CHAT)
    lp32, lp64 = full_logprobs(model, prompt + output)
    tol = tolerance(lp32, lp64)
    for i, (entry, token) in enumerate(zip(content, output)):
        ref = lp64[len(prompt) - 1 + i]
        assert abs(entry.logprob - ref[token].item()) <= tol
        assert [token_id(tok, bytes(t.bytes)) for t in entry.top_logprobs] == ref.topk(3).indices.tolist()
        assert entry.top_logprobs[0].logprob == entry.logprob  # greedy: the most likely token
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=CHAT, top_logprobs=2)  # without logprobs
    streamed = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, temperature=0,
                                              logprobs=True, stream=True)
    entries = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.logprob for e in entries] == [e.logprob for e in content]


def test_echo_scores_the_prompt_as_evaluation_harnesses_read_it(client, tok, model):
    """lm-evaluation-harness's loglikelihood request: echo, logprobs 1, max_tokens 1 (and 0:
    the prompt alone); the prompt's token_logprobs are its log_softmax, the first null."""
    prompt = "The cat sat"
    ids = tok.encode(prompt)
    lp32, lp64 = full_logprobs(model, ids)
    tol = tolerance(lp32, lp64)
    for max_tokens in (0, 1):
        out = client.completions.create(model="tiny", prompt=prompt, echo=True, logprobs=1, max_tokens=max_tokens,
                                        temperature=0)
        choice = out.choices[0]
        lp = choice.logprobs
        assert choice.text.startswith(prompt) and len(lp.tokens) == len(ids) + max_tokens
        assert "".join(lp.tokens[: len(ids)]) == prompt and lp.text_offset[: 2] == [0, len(lp.tokens[0])]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for i in range(1, len(ids)):
            assert abs(lp.token_logprobs[i] - lp64[i - 1, ids[i]].item()) <= tol
            best = lp64[i - 1].argmax().item()
            assert max(lp.top_logprobs[i].values()) == pytest.approx(lp64[i - 1, best].item(), abs=tol)
        assert out.usage.completion_tokens == max_tokens
    streamed = list(client.completions.create(model="tiny", prompt=prompt, echo=True, logprobs=1, max_tokens=3,
                                              temperature=0, stream=True))
    whole = client.completions.create(model="tiny", prompt=prompt, echo=True, logprobs=1, max_tokens=3,
                                      temperature=0).choices[0]
    assert "".join(c.choices[0].text for c in streamed) == whole.text
    assert [lp for c in streamed if c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs] == \
        whole.logprobs.token_logprobs
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt=prompt, max_tokens=0)  # nothing to return


# ------------------------------------------------------------ what changes the choice
def test_logit_bias_bans_the_greedy_token(client, tok):
    kw = dict(model="tiny", messages=CHAT, max_tokens=4, temperature=0, logprobs=True)
    free = client.chat.completions.create(**kw).choices[0].logprobs.content
    first = token_id(tok, bytes(free[0].bytes))
    banned = client.chat.completions.create(**kw, logit_bias={str(first): -100}).choices[0].logprobs.content
    assert token_id(tok, bytes(banned[0].bytes)) != first
    assert banned[0].logprob < free[0].logprob  # the next best, under the model's own logits
    forced = client.chat.completions.create(**kw, logit_bias={"300": 100}).choices[0].logprobs.content
    assert [token_id(tok, bytes(e.bytes)) for e in forced] == [300] * 4


@pytest.mark.parametrize("kw, param", [
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(logit_bias={"5": 101}), "logit_bias"), (dict(logit_bias={"x": 1}), "logit_bias"),
    (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
])
def test_penalty_and_bias_ranges_are_openais(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, **kw)
    assert e.value.param == param


@pytest.mark.parametrize("penalty", [dict(frequency_penalty=2.0, presence_penalty=2.0),
                                     dict(extra_body={"repetition_penalty": 3.0, "ignore_eos": True})])
def test_penalties_change_the_output_first_where_it_repeats(client, tok, penalty):
    """Penalties only lower seen tokens (tests/test_sampling.py): the greedy output is kept up
    to its first repeated token (or prompt token, for the repetition penalty) and changes there."""
    kw = dict(model="tiny", messages=CHAT, max_tokens=24, temperature=0, logprobs=True)

    def ids(**more):
        more["extra_body"] = {"ignore_eos": True, **more.get("extra_body", {})}
        content = client.chat.completions.create(**kw, **more).choices[0].logprobs.content
        return [token_id(tok, bytes(e.bytes)) for e in content]

    free, pen = ids(), ids(**penalty)
    seen = set(chat_ids(tok, CHAT)) if "extra_body" in penalty else set()
    first = next(i for i, t in enumerate(free) if t in seen or t in free[:i])
    assert pen[:first] == free[:first] and pen[first] != free[first]


def test_sixteen_stop_sequences_are_accepted_as_vllm_does(client):
    """OpenAI takes 4, vLLM 16 (evaluation harnesses append the EOS string to theirs); the text
    ends before the stop. 17: test_serve_robustness.py; one token completing two stops:
    test_engine.py."""
    kw = dict(model="tiny", prompt="Once", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    stop = next(full[i: i + 2] for i in range(1, len(full) - 1) if "\ufffd" not in full[i: i + 2])
    never = [f"never{k}" for k in range(15)]
    out = client.completions.create(**kw, stop=never + [stop]).choices[0]
    assert out.text == full[: full.find(stop)] and out.finish_reason == "stop"


def test_special_tokens_are_left_out_of_the_text_by_default(client):
    kw = dict(model="tiny", prompt="a", max_tokens=3, temperature=0, logit_bias={"300": 100})
    assert client.completions.create(**kw).choices[0].text == ""
    kept = client.completions.create(**kw, extra_body={"skip_special_tokens": False}).choices[0].text
    assert kept == "<|reserved_35|>" * 3


# ------------------------------------------------------------ JSON output
SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
          "required": ["city", "days"], "additionalProperties": False}


def test_json_schema_output_parses_and_validates(client):
    jsonschema = pytest.importorskip("jsonschema")
    fmt = {"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA}}
    for seed in (0, 1):
        out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=48, temperature=1.0,
                                             seed=seed, response_format=fmt)
        assert out.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)
    obj = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=48, temperature=0,
                                         response_format={"type": "json_object"}).choices[0]
    assert obj.finish_reason == "length" or isinstance(json.loads(obj.message.content), dict)
    assert obj.message.content.startswith("{")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=CHAT, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nonsense"}}})
    assert e.value.param == "response_format"


# ------------------------------------------------------------ tools
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                            "parameters": SCHEMA}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}
MARKERS = [CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP, OUTPUTS_BEGIN, OUTPUTS_END, OUTPUT_BEGIN, OUTPUT_END]


@pytest.fixture(scope="module")
def ds_client(tiny_dir, tmp_path_factory):
    """The tiny model with a tokenizer that has DeepSeek's tool markers as special tokens (in
    place of nine reserved ones), as DeepSeek-V3's own tokenizer has them."""
    out = tmp_path_factory.mktemp("ds") / "tiny"
    shutil.copytree(tiny_dir, out)
    text = (out / "tokenizer.json").read_text()
    for i, marker in enumerate(MARKERS):
        text = text.replace(f'"<|reserved_{i}|>"', json.dumps(marker, ensure_ascii=False))
    (out / "tokenizer.json").write_text(text)
    tok = tokenizer_for(out)
    assert [tok.tokenizer.token_to_id(m) for m in MARKERS] == list(range(265, 274))
    engine = Engine(from_pretrained(out), tok, max_batch=2, max_len=512)
    with live(create_app(engine, tok, "tiny")) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60), tok


def test_forced_tool_calls_come_back_as_tool_calls(ds_client):
    client, _ = ds_client
    jsonschema = pytest.importorskip("jsonschema")
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in (named, "required"):
        out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=64, temperature=0,
                                             tools=[WEATHER, CLOCK], tool_choice=choice,
                                             parallel_tool_calls=False).choices[0]
        assert out.finish_reason == "tool_calls" and not out.message.content
        (call,) = out.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        if choice is named:
            assert call.function.name == "get_weather"
        if call.function.name == "get_weather":
            jsonschema.validate(json.loads(call.function.arguments), SCHEMA)
        else:
            assert json.loads(call.function.arguments) == {}
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=64, temperature=0,
                                                 tools=[WEATHER], tool_choice=named, stream=True))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert [d.function.name for d in deltas] == ["get_weather"]
    assert json.loads(deltas[0].function.arguments)["city"] in ("Paris", "Oslo")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_forced_call_grammar_spells_markers_a_tokenizer_lacks(tok):
    """nanoseek's byte tokenizer has no tool-call tokens: the grammar matches their text, and
    the call json.dumps would write for arguments of the schema, then only EOS."""
    from nanoseek.infer.grammar import GrammarCompiler
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": CHAT, "tools": [WEATHER, CLOCK]})
    matcher = GrammarCompiler(tok, tok.vocab_size, tok.eos_id).matcher(
        forced_call_grammar(req.tools, None, True, tok))
    args = json.dumps({"city": "Oslo", "days": 3})
    text = (CALLS_BEGIN + CALL_BEGIN + "function" + SEP + "get_time\n```json\n{}\n```" + CALL_END + "\n"
            + CALL_BEGIN + "function" + SEP + f"get_weather\n```json\n{args}\n```" + CALL_END + CALLS_END)
    matcher.consume(tok.encode(text))
    assert matcher.done
    with pytest.raises(RuntimeError, match="rejected"):
        GrammarCompiler(tok, tok.vocab_size, tok.eos_id).matcher(
            forced_call_grammar(req.tools, "get_time", False, tok)).consume(tok.encode(CALLS_BEGIN + "x"))


def test_tool_messages_are_rendered_in_deepseeks_format(ds_client):
    client, tok = ds_client
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    out = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], max_tokens=2)
    assert out.usage.prompt_tokens > 0
    req = ChatCompletionRequest.model_validate({"model": "tiny", "messages": messages, "tools": [WEATHER]})
    text = tok.decode(ChatEncoder(tok).encode_chat(template_turns(req.messages, req.tools)))
    assert text.startswith("<|begin_of_sentence|>Be brief.\n\n## Tools\n")
    assert ("<|User|>Weather in Oslo?<|Assistant|>" + CALLS_BEGIN + CALL_BEGIN + "function" + SEP
            + 'get_weather\n```json\n{"city": "Oslo", "days": 1}\n```' + CALL_END + CALLS_END
            + "<|end_of_sentence|>" + OUTPUTS_BEGIN + OUTPUT_BEGIN + "sunny" + OUTPUT_END + OUTPUTS_END
            + "<|Assistant|>") in text
    with pytest.raises(openai.BadRequestError):  # a tool answer must say which call it answers
        client.chat.completions.create(model="tiny", messages=[*messages[:3], {"role": "tool", "content": "x"}])


def test_tool_calls_the_model_writes_under_auto_are_parsed(tok):
    call = (CALLS_BEGIN + CALL_BEGIN + "function" + SEP + 'get_time\n```json\n{}\n```' + CALL_END + "\n"
            + CALL_BEGIN + "function" + SEP + 'get_weather\n```json\n{"city": "Paris", "days": 2}\n```'
            + CALL_END + CALLS_END)
    pieces = ["Let me check.", call[:17], call[17:60], call[60:]]
    with live(create_app(ScriptedEngine(pieces), tok, "m")) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
        msg = c.chat.completions.create(model="m", messages=CHAT, tools=[WEATHER, CLOCK]).choices[0]
        assert msg.finish_reason == "tool_calls" and msg.message.content == "Let me check."
        assert [(t.function.name, json.loads(t.function.arguments)) for t in msg.message.tool_calls] == \
            [("get_time", {}), ("get_weather", {"city": "Paris", "days": 2})]
        chunks = list(c.chat.completions.create(model="m", messages=CHAT, tools=[WEATHER, CLOCK], stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(d.content or "" for d in deltas) == "Let me check."
        calls = [t for d in deltas for t in d.tool_calls or []]
        assert [(t.index, t.function.name) for t in calls] == [(0, "get_time"), (1, "get_weather")]
        plain = c.chat.completions.create(model="m", messages=CHAT, tools=[WEATHER], tool_choice="none")
        assert plain.choices[0].message.tool_calls is None and CALLS_BEGIN in plain.choices[0].message.content


# ------------------------------------------------------------ R1's open <think>
def test_reasoning_is_split_when_the_template_opens_it(tok):
    class R1Tokenizer(ChatTokenizer):
        """DeepSeek-R1's later templates end the generation prompt with "<think>\\n"."""
        def apply_chat_template(self, messages, add_generation_prompt=False):
            return super().apply_chat_template(messages, add_generation_prompt) + (
                "<think>\n" if add_generation_prompt else "")

    r1 = R1Tokenizer(tok.tokenizer)
    pieces = ["Let me", " plan.</th", "ink>\n", "\nThe answer is 4."]
    with live(create_app(ScriptedEngine(pieces), r1, "r1")) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
        msg = c.chat.completions.create(model="r1", messages=CHAT).choices[0].message
        assert (msg.reasoning_content, msg.content) == ("Let me plan.", "The answer is 4.")
        deltas = [ch.choices[0].delta for ch in c.chat.completions.create(model="r1", messages=CHAT, stream=True)
                  if ch.choices]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "Let me plan."
        assert "".join(d.content or "" for d in deltas) == "The answer is 4."


# ------------------------------------------------------------ prefix cache
def test_cached_prompt_tokens_are_reported_in_usage(tiny_dir, tok):
    engine = Engine(from_pretrained(tiny_dir), tok, max_batch=2, max_len=256, config=InferenceConfig(prefix_cache=True))
    system = {"role": "system", "content": "You are a terse assistant who answers in one word. " * 2}
    with live(create_app(engine, tok, "tiny")) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        first, second = (c.chat.completions.create(model="tiny", max_tokens=2, temperature=0,
                                                   messages=[system, {"role": "user", "content": q}])
                         for q in ("Hi?", "Why?"))
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        shared = len(tok.encode("<|begin_of_sentence|>" + system["content"] + "<|User|>"))
        assert second.usage.prompt_tokens_details.cached_tokens == shared // 16 * 16 > 0
