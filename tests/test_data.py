"""Data: built-in tasks and checkers, splits, BPE tokenizer and chat template, user data
formats and their errors, packed and SFT loaders (determinism, resume, loss masking)."""

import json
import re

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nanoseek.data import tasks
from nanoseek.data.datasets import DataError, load_chats, load_documents
from nanoseek.data.loader import IGNORE, PackedLoader, SFTLoader, tokenize_chat
from nanoseek.data.tasks import (Arithmetic, Countdown, Example, check, extract_answer,
                                 format_chat, format_pretrain, get_task, split_of,
                                 verify_countdown)
from nanoseek.data.tokenizer import (BOS, EOS, SPECIAL_TOKENS, TAG_TOKENS, ChatTokenizer,
                                     apply_chat_template, byte_tokenizer, load_tokenizer,
                                     save_tokenizer, train_bpe)

LEVELS = [(name, level) for name in tasks.TASKS for level in tasks.TASKS[name].levels]


def _eval_ascii(expression: str) -> int:
    """Python's own reading of a generated (trusted) expression, to check render/values."""
    s = expression.replace("×", "*").replace("÷", "//").replace("−", "-")
    assert re.fullmatch(r"[0-9+\-*/() ]+", s)
    return eval(s)  # noqa: S307 - our own generated text, characters checked above


# ---------------------------------------------------------------- tasks
@pytest.mark.parametrize("name,level", LEVELS)
def test_generated_examples_check_and_wrong_answers_fail(name, level):
    examples = get_task(name).generate(30, level=level, seed=1)
    assert len(examples) == 30
    for ex in examples:
        assert ex.meta["task"] == name and ex.meta["level"] == level
        assert check(ex, format_chat(ex)[1]["content"])
        assert check(ex.meta, f"<answer>{ex.answer}</answer>")
        assert check(ex, ex.solution)  # no tags: the fallback reads the last line
        wrong = str(int(ex.answer) + 1) if name == "arithmetic" else f"{ex.answer} + 1"
        assert not check(ex, f"<answer>{wrong}</answer>")
        for malformed in ["", "<answer></answer>", "<answer>banana</answer>",
                          f"<answer>{ex.answer} +</answer>", "<answer>)(</answer>"]:
            assert not check(ex, malformed), malformed
        if name == "arithmetic":
            assert _eval_ascii(ex.meta["expression"]) == ex.meta["value"] == int(ex.answer)
            assert ex.solution.endswith(f"= {ex.answer}")
        else:
            numbers, target = ex.meta["numbers"], ex.meta["target"]
            assert len(numbers) == {1: 3, 2: 4, 3: 4, 4: 5, 5: 6}[level]
            assert target not in numbers and _eval_ascii(ex.answer) == target
            steps = ex.solution.splitlines()
            assert steps[-1] == f"{ex.answer} = {target}"
            assert verify_countdown("\n".join(steps[:-1]), numbers, target)  # the steps alone


def test_arithmetic_worked_solutions_by_hand():
    ar = Arithmetic()
    assert ar.example(("+", 47, 85), 1).solution == (
        "ones: 7 + 5 = 12, write 2, carry 1\n"
        "tens: 4 + 8 + 1 = 13, write 3, carry 1\n"
        "hundreds: carry 1, write 1\n"
        "47 + 85 = 132")
    assert ar.example(("−", 503, 78), 2).solution == (
        "ones: 3 + 10 − 8 = 5, borrow 1\n"
        "tens: 0 − 1 + 10 − 7 = 2, borrow 1\n"
        "hundreds: 5 − 1 − 0 = 4\n"
        "503 − 78 = 425")
    assert ar.example(("×", 47, 86), 3).solution == (
        "47 × 6 = 282\n47 × 80 = 3760\n282 + 3760 = 4042\n47 × 86 = 4042")
    neg = ar.example(("−", 120, 345), 4)
    assert neg.answer == "-225" and neg.solution.splitlines()[0].startswith("120 − 345 is negative")
    assert check(neg, "<answer>−225</answer>") and check(neg, "\\boxed{-225}")
    expr = ar.example(("×", ("+", 2, 3), ("−", 10, 4)), 5)
    assert expr.prompt == "What is (2 + 3) × (10 − 4)?" and expr.answer == "30"
    assert expr.solution.splitlines()[-1] == "(2 + 3) × (10 − 4) = 30"


def test_countdown_example_by_hand():
    problem = ([25, 4, 3], 97, ("−", ("×", 25, 4), 3), ["25 × 4 = 100", "100 − 3 = 97"])
    ex = Countdown().example(problem, 1)
    assert ex.solution == "25 × 4 = 100\n100 − 3 = 97\n25 × 4 − 3 = 97"
    assert ex.answer == "25 × 4 − 3" and ex.meta["numbers"] == [25, 4, 3]
    assert "25, 4, 3" in ex.prompt and "make 97" in ex.prompt


def test_countdown_checker_rules():
    nums, target = [25, 4, 3, 5], 97
    ok = ["25 × 4 − 3", "25*4-3", "(25 * 4) - 3", "25 × 4 − 3 = 97", "4 × 25 − 3",
          "25 × 4 = 100\n100 − 3 = 97", "25*4 = 100\n\n100-3 = 97"]
    for c in ok:
        assert verify_countdown(c, nums, target), c
    bad = ["25 × 4 − 3 − 0",  # 0 is not given
           "25 × 4 − 3 × 1",  # 1 is not given
           "25 × 4 − 3 + 5 − 5",  # 5 used twice
           "25 × 4 − 4",  # 4 used twice and wrong
           "25 × 4",  # wrong target
           "25 × 4 = 100\n100 − 3 = 98",  # wrong claimed step result
           "25 × 4 = 100\n100 − 3 = 97\n100 − 3 = 97",  # the 100 used twice
           "25 × 4 = 99\n99 − 2 = 97",
           "__import__('os').system('true')", "(25).real", "25 ** 1", "25 * 4 - 3 if 1 else 0",
           "-3 + 25 * 4", "25e0 * 4 - 3", "25 * 4 - 3.0", "25 × 4 − 3 = 97 = 97", "", "97"]
    for c in bad:
        assert not verify_countdown(c, nums, target), c
    assert not verify_countdown("7 ÷ 2 × 2 + 90", [7, 2, 2, 90], 97)  # inexact division
    assert verify_countdown("8 ÷ 2 × 2 + 89", [8, 2, 2, 89], 97)
    meta = {"task": "countdown", "numbers": nums, "target": target}
    assert check(meta, "I think \\boxed{25 × 4 − 3}.")
    assert check(meta, "so the answer is 25 × 4 − 3.")  # fallback: last line's expression
    assert not check(meta, "<answer>25 × 4 − 4</answer> \\boxed{25 × 4 − 3}")  # tags win


def test_extract_answer_rule():
    assert extract_answer("<answer>1</answer> x <answer> 2 </answer>") == "2"
    assert extract_answer("\\boxed{\\frac{1}{2}} and \\boxed{7}") == "7"
    assert extract_answer("\\boxed{{3}}") == "{3}"
    assert extract_answer("<answer>5</answer> \\boxed{6}") == "5"
    assert extract_answer("just 12") is None
    ar = {"task": "arithmetic", "value": 1234}
    assert check(ar, "... so 1,234") and check(ar, "<answer>1234</answer>")
    assert check(ar, "<answer>1200 + 34 = 1234</answer>")
    assert not check(ar, "1234 then 5") and not check(ar, "<answer>12.34</answer>")


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_generation_is_deterministic_and_splits_are_disjoint(name):
    task = get_task(name)
    a = task.generate(50, level=2, seed=7)
    assert a == task.generate(50, level=2, seed=7)
    assert a != task.generate(50, level=2, seed=8)
    train, test = set(), set()
    for level in task.levels:
        for seed in range(3):
            for split, keys in (("train", train), ("test", test)):
                for ex in task.generate(100, level=level, split=split, seed=seed):
                    key = _key(task, ex)
                    assert split_of(key) == split
                    keys.add(key)
    assert train and test and not train & test
    unique = task.generate(300, level=1, split="test", unique=True)
    assert len({_key(task, ex) for ex in unique}) == 300


def _key(task, ex: Example) -> str:
    if task.name == "arithmetic":
        expression = ex.meta["expression"].replace("×", "*").replace("−", "-")
        return "arithmetic:" + expression.replace(" ", "")
    return f"countdown:{','.join(map(str, sorted(ex.meta['numbers'])))}->{ex.meta['target']}"


def test_split_fraction_and_registry_errors():
    frac = sum(split_of(f"k{i}") == "test" for i in range(20000)) / 20000
    assert 0.09 < frac < 0.11
    with pytest.raises(ValueError, match="arithmetic, countdown"):
        get_task("sudoku")
    with pytest.raises(ValueError, match="levels 1..5"):
        get_task("countdown").generate(1, level=9)
    with pytest.raises(ValueError, match="split"):
        get_task("countdown").generate(1, split="valid")
    with pytest.raises(ValueError, match="too few distinct"):
        get_task("arithmetic").generate(2000, level=3, split="test", unique=True)


def test_formats():
    ex = get_task("arithmetic").generate(1, level=1)[0]
    doc = format_pretrain(ex)
    assert doc.startswith(f"Question: {ex.prompt}\n") and doc.endswith(f"Answer: {ex.answer}")
    assert ex.solution in doc
    assert format_chat(ex) == [
        {"role": "user", "content": ex.prompt},
        {"role": "assistant",
         "content": f"<think>\n{ex.solution}\n</think>\n<answer>{ex.answer}</answer>"}]


# ---------------------------------------------------------------- tokenizer
TEXTS = ["What is 12345 + 67890? Ünïcødé 🙂 naïve café", "  leading spaces\n\ttabs\r\nCRLF ",
         "<|begin_of_sentence|><|User|>hi<|Assistant|><think>1+1=2</think><answer>2</answer>"
         "<|end_of_sentence|><|pad|>", "数字 ١٢٣ and 0.5e-3", ""]


@pytest.fixture(scope="module")
def bpe():
    corpus = [format_pretrain(e) for e in get_task("arithmetic").generate(200, level=2)]
    corpus += [format_pretrain(e) for e in get_task("countdown").generate(200, level=3)]
    return train_bpe(corpus * 2, 600)


def test_train_bpe_vocab_specials_and_digits(bpe):
    assert bpe.get_vocab_size() == 600
    assert [bpe.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    merged = [t for t in bpe.get_vocab() if len(t) > 1 and not t.startswith("<")]
    assert merged, "BPE learned no merges"
    assert not any(re.search(r"\d", t) and len(t) > 1 for t in merged if not t.startswith("<|"))
    tok = ChatTokenizer(bpe)
    ids = tok.encode("What is 12345 + 607?")
    digit_tokens = [tok.decode([i]) for i in ids if re.search(r"\d", tok.decode([i]))]
    assert digit_tokens == list("12345607")
    tiny = train_bpe(["ab ab"], 300)  # merges run out: padded with reserved tokens
    assert tiny.get_vocab_size() == 300 and tiny.id_to_token(299).startswith("<|reserved_")
    with pytest.raises(ValueError, match="at least 265"):
        train_bpe(["x"], 100)


@pytest.mark.parametrize("which", ["bpe", "bytes"])
def test_round_trip(bpe, which):
    tok = ChatTokenizer(bpe if which == "bpe" else byte_tokenizer(300))
    vocab_size = 600 if which == "bpe" else 300
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, 2, vocab_size)
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    for s in SPECIAL_TOKENS:
        assert tok.encode(s) == [tok.tokenizer.token_to_id(s)]
    assert tok.encode("hi")[0] != tok.bos_id  # encode adds no bos


CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "<think>\nx\n</think>\n<answer>1</answer>"},
     {"role": "user", "content": "again 🙂"}, {"role": "assistant", "content": "ok"}],
]


def test_chat_template_matches_transformers(bpe, tmp_path):
    from transformers import AutoTokenizer
    save_tokenizer(bpe, tmp_path)
    assert "chat_template" in json.loads((tmp_path / "tokenizer_config.json").read_text())
    hf = AutoTokenizer.from_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    assert apply_chat_template(CHATS[1]) == (
        "<|begin_of_sentence|>Be brief.<|User|>hi<|Assistant|><think>\nx\n</think>\n"
        "<answer>1</answer><|end_of_sentence|><|User|>again 🙂<|Assistant|>ok<|end_of_sentence|>")
    for chat in CHATS:
        for gen in (False, True):
            text = apply_chat_template(chat, add_generation_prompt=gen)
            assert hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen) == text
            assert ours.apply_chat_template(chat, add_generation_prompt=gen) == text
        ids, _ = tokenize_chat(ours, chat)
        assert ids == ours.encode(apply_chat_template(chat))
        assert ids == hf(apply_chat_template(chat), add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="role"):
        apply_chat_template([{"role": "tool", "content": "x"}])


def _deepseek_style(tmp_path, with_config: bool):
    """A tokenizer.json with DeepSeek's spellings of the special tokens at other ids."""
    ds = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜User｜>",
          "<｜Assistant｜>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world 123"] * 5, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens(ds + ["<think>", "</think>"])
    tmp_path.mkdir(exist_ok=True)
    tok.save(str(tmp_path / "tokenizer.json"))
    if with_config:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({
            "bos_token": {"__type": "AddedToken", "content": ds[0]}, "eos_token": ds[1]}))
    return tok, ds


@pytest.mark.parametrize("with_config", [False, True])
def test_load_other_hf_tokenizer(tmp_path, with_config):
    raw, ds = _deepseek_style(tmp_path / "ds", with_config)
    tok = load_tokenizer(tmp_path / "ds")
    assert tok.bos_id == raw.token_to_id(ds[0]) and tok.eos_id == raw.token_to_id(ds[1]) > 255
    assert tok.pad_id == raw.token_to_id(ds[2]) and tok.user_id == raw.token_to_id(ds[3])
    text = f"{ds[0]}{ds[3]}hello 🙂 42{ds[4]}<think>ok</think>{ds[1]}"
    assert tok.decode(tok.encode(text)) == text
    chat = CHATS[1]
    assert tok.apply_chat_template(chat).startswith(f"{ds[0]}Be brief.{ds[3]}hi{ds[4]}")
    ids, mask = tokenize_chat(tok, chat)
    assert ids == tok.encode(tok.apply_chat_template(chat)) and ids[0] == tok.bos_id
    assert load_tokenizer(tmp_path / "ds" / "tokenizer.json").eos_id == tok.eos_id
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nothing")


# ---------------------------------------------------------------- datasets
CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_each_format(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\nline two\n\n\nsecond doc\n  \nthird\n")
    assert load_documents(txt) == ["first doc\nline two", "second doc", "third"]
    rows = [{"text": "one"}, {"messages": CHAT}, {"text": "two", "id": 3}]
    docs = load_documents(_jsonl(tmp_path / "b.jsonl", rows))
    assert docs == ["one", apply_chat_template(CHAT), "two"]
    assert load_chats(_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}] * 2)) == [CHAT, CHAT]
    docs = load_documents("builtin:arithmetic:level=2:n=5")
    assert len(docs) == 5 and docs[0].startswith("Question: What is")
    chats = load_chats("builtin:countdown:n=3:seed=4")
    assert len(chats) == 3 and chats[0][1]["content"].startswith("<think>")
    assert chats == [format_chat(e) for e in get_task("countdown").generate(3, level=1, seed=4)]


def test_load_json_list(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"text": "one"}, {"messages": CHAT}]))
    assert load_documents(path) == ["one", apply_chat_template(CHAT)]
    path.write_text(json.dumps([{"messages": CHAT}, {"text": "x"}]))
    with pytest.raises(DataError, match=r"a.json row 2: a chat record needs 'messages'"):
        load_chats(path)


def test_load_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "t.parquet")
    pq.write_table(pa.table({"messages": [CHAT]}), tmp_path / "m.parquet")
    assert load_documents(tmp_path / "t.parquet") == ["a", "b"]
    assert load_chats(tmp_path / "m.parquet") == [CHAT]
    with pytest.raises(DataError, match=r"t.parquet row 1: a chat record needs 'messages'"):
        load_chats(tmp_path / "t.parquet")


def test_load_saved_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"messages": [CHAT, CHAT]}).save_to_disk(str(tmp_path / "chats"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x", "y"]})}).save_to_disk(
        str(tmp_path / "dd"))
    assert load_chats(tmp_path / "chats") == [CHAT, CHAT]
    assert load_documents(tmp_path / "dd") == ["x", "y"]


def _bad(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content)
    return p


@pytest.mark.parametrize("make,loader,message", [
    (lambda d: d / "missing.jsonl", load_documents, "missing.jsonl: no such file"),
    (lambda d: _bad(d, "x.csv", "a,b"), load_documents, "x.csv: unknown data format '.csv'"),
    (lambda d: _bad(d, "j.jsonl", '{"text": "ok"}\n{"text": oops}\n'), load_documents,
     "j.jsonl:2: malformed JSON"),
    (lambda d: _bad(d, "j.jsonl", '{"text": "ok"}\n\n{"body": "x"}\n'), load_documents,
     "j.jsonl:3: a record needs a 'text' string or 'messages'"),
    (lambda d: _bad(d, "j.jsonl", '[1, 2]\n'), load_documents, "j.jsonl:1: expected a JSON object"),
    (lambda d: _bad(d, "e.jsonl", "\n\n"), load_documents, "e.jsonl: holds no documents"),
    (lambda d: _bad(d, "l.json", '{"text": "x"}\n{"text": "y"}\n'), load_documents,
     "l.json: malformed JSON (Extra data at line 2); one object per line is JSON Lines: name it .jsonl"),
    (lambda d: _bad(d, "o.json", '{"text": "x"}'), load_documents,
     "o.json: a .json file must hold a list of objects, [{...}, ...]; it holds a dict"),
    (lambda d: _bad(d, "s.json", '[{"text": "x"}, "y"]'), load_documents, "s.json row 2: expected a JSON object"),
    (lambda d: _bad(d, "e.json", "[]"), load_documents, "e.json: holds no documents"),
    (lambda d: _bad(d, "e.txt", " \n"), load_documents, "e.txt: holds no documents"),
    (lambda d: _bad(d, "r.jsonl", json.dumps({"messages": [{"role": "tool", "content": "x"}]})),
     load_chats, "r.jsonl:1: message 0 has role 'tool'"),
    (lambda d: _bad(d, "r.jsonl", json.dumps({"messages": [{"role": "user"}]})),
     load_chats, "r.jsonl:1: message 0 needs a 'role' and a 'content' string"),
    (lambda d: _bad(d, "r.jsonl", json.dumps({"messages": [{"role": "user", "content": "x"}]})),
     load_chats, "r.jsonl:1: the chat has no assistant message"),
    (lambda d: _bad(d, "t.jsonl", json.dumps({"text": "x"})), load_chats,
     "t.jsonl:1: a chat record needs 'messages'"),
    (lambda d: _bad(d, "c.txt", "x"), load_chats, "c.txt: a .txt file holds documents, not chats"),
    (lambda d: d, load_documents, "a folder, but not a dataset saved"),
    (lambda d: "builtin:sudoku", load_documents,
     "unknown built-in task 'sudoku' (tasks: arithmetic, countdown)"),
    (lambda d: "builtin:arithmetic:lvl=2", load_chats, "bad option 'lvl=2'"),
    (lambda d: "builtin:arithmetic:level=9", load_chats, "level must be one of"),
])
def test_bad_data_gives_one_line_error(tmp_path, make, loader, message):
    with pytest.raises(DataError) as err:
        loader(make(tmp_path))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)


# ---------------------------------------------------------------- loaders
def _docs(n=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 30, (n,), generator=g).tolist()
    return [torch.randint(10, 100, (k,), generator=g).tolist() for k in lengths]


def _take(loader, k):
    return [loader.next_batch() for _ in range(k)]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x["input_ids"], y["input_ids"])
                                    and torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b))


def test_packed_loader_packs_shuffles_and_is_deterministic():
    docs = _docs()
    total = sum(len(d) + 1 for d in docs)
    loader = PackedLoader(docs, batch_size=3, seq_len=16, seed=5, eos_id=1)
    batch = loader.next_batch()
    assert batch["input_ids"].shape == (3, 16) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["input_ids"], batch["labels"])
    # one epoch's stream is every document once, each followed by eos, in shuffled order
    stream0 = loader._epoch_stream(0).tolist()
    pieces, current = [], []
    for t in stream0:  # doc tokens are 10..99, so 1 is always an eos
        if t == 1:
            pieces, current = pieces + [current], []
        else:
            current.append(t)
    assert current == [] and sorted(pieces) == sorted(docs)
    assert len(stream0) == total and stream0 != sum((d + [1] for d in docs), [])
    assert loader._epoch_stream(1).tolist() != stream0  # re-shuffled each epoch
    rows = torch.cat([b["input_ids"] for b in [batch] + _take(loader, 2)])
    assert rows.flatten().tolist()[:len(rows.flatten())] == stream0[:rows.numel()]
    a = _take(PackedLoader(docs, 3, 16, seed=5, eos_id=1), 20)  # cycles several epochs
    assert _same(a, _take(PackedLoader(docs, 3, 16, seed=5, eos_id=1), 20))
    assert not _same(a, _take(PackedLoader(docs, 3, 16, seed=6, eos_id=1), 20))
    with pytest.raises(ValueError, match="fewer than one row"):
        PackedLoader([[5, 6]], 1, 16)


@pytest.mark.parametrize("kind", ["packed", "sft"])
def test_loader_state_round_trip(kind):
    docs = _docs(11)
    if kind == "packed":
        make = lambda: PackedLoader(docs, batch_size=2, seq_len=8, seed=3, eos_id=1)  # noqa: E731
    else:
        examples = [(d, [i % 2 == 0 for i in range(len(d))]) for d in docs]
        make = lambda: SFTLoader(examples, batch_size=3, seq_len=12, seed=3, pad_id=2)  # noqa: E731
    original = make()
    _take(original, 13)  # past an epoch boundary
    state = json.loads(json.dumps(original.state_dict()))
    assert state["epoch"] >= 1 and set(state) >= {"seed", "epoch", "position"}
    expected = _take(original, 9)
    restored = make()
    _take(restored, 2)
    restored.load_state_dict(state)
    assert _same(expected, _take(restored, 9))
    fresh = make()
    fresh.load_state_dict(state)
    assert _same(expected, [next(fresh) for _ in range(9)])
    other = PackedLoader(docs[:-1], 2, 8) if kind == "packed" else SFTLoader(examples[:-1], 3, 12)
    with pytest.raises(ValueError, match="other data"):
        other.load_state_dict(state)


def test_ranks_split_the_global_batch():
    docs = _docs()
    whole = PackedLoader(docs, 4, 8, seed=1, eos_id=1).next_batch()["input_ids"]
    parts = [PackedLoader(docs, 2, 8, seed=1, eos_id=1, rank=r, world_size=2).next_batch()["input_ids"]
             for r in range(2)]
    assert torch.equal(torch.cat(parts), whole)


def test_sft_loss_mask_by_hand():
    tok = ChatTokenizer(byte_tokenizer(300))
    B, U, A, E, P = 0, 3, 4, 1, 2  # bos, <|User|>, <|Assistant|>, eos, pad

    def byte(c):
        return 9 + ord(c)

    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "<think>"}]
    ids, mask = tokenize_chat(tok, chat)
    assert ids == [B, byte("s"), U, byte("h"), byte("i"), A, byte("o"), byte("k"), E,
                   U, byte("q"), A, 5, E]
    assert mask == [False] * 6 + [True] * 3 + [False] * 3 + [True] * 2
    assert ids == tok.encode(apply_chat_template(chat))

    loader = SFTLoader([(ids, mask)], batch_size=1, seq_len=16, seed=0, pad_id=P)
    batch = loader.next_batch()
    assert batch["input_ids"][0].tolist() == ids + [P, P]
    labels = batch["labels"][0].tolist()
    assert [i for i, v in enumerate(labels) if v != IGNORE] == [6, 7, 8, 12, 13]
    assert [labels[i] for i in (6, 7, 8, 12, 13)] == [byte("o"), byte("k"), E, 5, E]

    short = SFTLoader([(ids, mask)], batch_size=2, seq_len=8, seed=0, pad_id=P).next_batch()
    assert short["input_ids"].shape == (2, 8)  # truncated; one example fills both rows
    assert short["labels"][0].tolist() == [IGNORE] * 6 + [byte("o"), byte("k")]
    with pytest.raises(ValueError, match="mask entries"):
        SFTLoader([([1, 2], [True])], 1, 4)


def test_builtin_data_to_batches_end_to_end(bpe):
    tok = ChatTokenizer(bpe)
    docs = tok.encode_batch(load_documents("builtin:arithmetic:n=50"))
    assert PackedLoader(docs, 2, 64, eos_id=tok.eos_id).next_batch()["input_ids"].max() < 600
    chats = load_chats("builtin:countdown:n=20")
    sft = SFTLoader([tokenize_chat(tok, c) for c in chats], 4, 128, pad_id=tok.pad_id)
    labels = sft.next_batch()["labels"]
    kept = [tok.decode([t for t in row.tolist() if t != IGNORE]) for row in labels]
    assert all(k.startswith("<think>\n") and k.endswith("</answer><|end_of_sentence|>") for k in kept)


@pytest.mark.parametrize("which", ["bpe", "bytes"])
def test_reasoning_tags_are_single_tokens_that_survive_skipping_specials(bpe, which, tmp_path):
    """As in DeepSeek-R1's tokenizer: <think>/<answer> are one token each but not special, so
    transformers / TRL / vLLM decoding with skip_special_tokens=True keeps them; the chat
    role tokens and EOS are special and are dropped."""
    tok = ChatTokenizer(bpe if which == "bpe" else byte_tokenizer(300))
    text = "<think>\n1+1</think> <answer>2</answer><|end_of_sentence|>"
    ids = tok.encode(text)
    for tag in TAG_TOKENS:
        assert tok.tokenizer.token_to_id(tag) in ids
    assert tok.tokenizer.decode(ids, skip_special_tokens=True) == "<think>\n1+1</think> <answer>2</answer>"
    assert tok.decode(ids) == text
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.decode(ids, skip_special_tokens=True) == "<think>\n1+1</think> <answer>2</answer>"
    assert hf.encode(text, add_special_tokens=False) == ids
