"""Rewards, the code sandbox and the templates (nanoseek/rl/rewards.py, sandbox.py, templates.py)."""

import functools
import os
import socket
import threading

import pytest

from nanoseek.data import tasks
from nanoseek.data.tokenizer import ChatTokenizer, byte_tokenizer
from nanoseek.rl.rewards import (accuracy_reward, code_reward, combine_rewards, completion_text,
                                 extract_code, format_reward, language_consistency_reward,
                                 math_reward)
from nanoseek.rl.sandbox import run_python
from nanoseek.rl.templates import R1_ZERO_TEMPLATE, chat_prompt, r1_zero_prompt

# ---------------------------------------------------------------- completions


def test_completion_text_accepts_strings_and_chats():
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "first"},
            {"role": "assistant", "content": "last"}]
    assert completion_text("plain") == "plain"
    assert completion_text(chat) == "last"
    assert completion_text([{"role": "user", "content": "q"}]) == ""


# ---------------------------------------------------------------- accuracy


def test_accuracy_reward_on_builtin_tasks():
    arith = tasks.get_task("arithmetic").generate(1, level=1, seed=3)[0]
    count = tasks.get_task("countdown").generate(1, level=1, seed=3)[0]
    completions = [
        f"<think>work</think> <answer>{arith.answer}</answer>",  # right
        f"<answer>{int(arith.answer) + 1}</answer>",  # wrong
        [{"role": "assistant", "content": f"<answer>{count.answer}</answer>"}],  # right (chat)
        "<answer>1 + 1 + 1 + 1 + 1</answer>",  # wrong numbers
        "<answer>(((</answer>",  # malformed
    ]
    metas = [arith.meta, arith.meta, count.meta, count.meta, count.meta]
    assert accuracy_reward(None, completions, meta=metas) == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert accuracy_reward(None, ["5"], meta=[None]) == [None]
    with pytest.raises(ValueError, match="meta"):
        accuracy_reward(None, ["5"])


# ---------------------------------------------------------------- math


def test_math_reward_right_wrong_malformed():
    completions = ["So the answer is \\boxed{\\frac{3}{4}}.",  # LaTeX fraction, boxed
                   "<think>...</think><answer>0.75</answer>",  # a decimal in <answer>
                   "<answer>3/4</answer>",  # a plain fraction
                   "\\boxed{42}",  # right integer
                   "\\boxed{\\frac{2}{3}}",  # wrong
                   "\\boxed{\\frac{",  # malformed
                   "",  # empty
                   "$x^2 + 1$",  # right expression
                   "\\boxed{7}"]  # gold cannot be parsed
    golds = ["\\frac{3}{4}", "3/4", "$\\frac{3}{4}$", "42", "3/4", "3/4", "3/4", "x^2+1",
             "no answer here"]
    assert math_reward(None, completions, solution=golds) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0,
                                                               1.0, None]
    assert math_reward(None, ["\\boxed{5}"], answer=["5"]) == [1.0]  # the `answer` column


def test_math_reward_works_off_the_main_thread():
    out = []
    t = threading.Thread(target=lambda: out.append(math_reward(None, ["\\boxed{1/2}"],
                                                               solution=["0.5"])))
    t.start()
    t.join()
    assert out == [[1.0]]


# ---------------------------------------------------------------- format


@pytest.mark.parametrize("text, want", [
    ("<think>2 + 2 is 4</think> <answer>4</answer>", 1.0),
    ("\n<think>\nline\nline\n</think>\n\n<answer>4</answer>\n", 1.0),
    ("<think>x</think><answer>4</answer>", 1.0),
    ("<answer>4</answer>", 0.0),  # no reasoning
    ("<think>x</think>", 0.0),  # no answer
    ("<think>x</think> <answer>4</answer> and more", 0.0),  # text after
    ("preamble <think>x</think> <answer>4</answer>", 0.0),  # text before
    ("<think>a <think>b</think> c</think> <answer>4</answer>", 0.0),  # nested
    ("<think>x</think> <answer>4</answer> <answer>5</answer>", 0.0),  # duplicated
    ("<think>x</think> <think>y</think> <answer>4</answer>", 0.0),  # duplicated
    ("<answer>4</answer> <think>x</think>", 0.0),  # wrong order
    ("<think>x <answer>4</answer>", 0.0),  # unclosed
])
def test_format_reward(text, want):
    assert format_reward(None, [text]) == [want]


# ---------------------------------------------------------------- language


def test_language_consistency_reward_in_three_scripts():
    """Shares counted by hand: words are letter runs; a Han character is one word; digits and
    symbols are no words. Only the reasoning inside <think> counts when there is one."""
    english = ["<think>add the two numbers</think><answer>4</answer>",   # 4 of 4
               "<think>add 两个 numbers</think><answer>4</answer>",      # add, 两, 个, numbers: 2 of 4
               "<think>12 + 30 = 42</think>",                             # no words
               "plain english without tags"]                              # 4 of 4
    # no words: nothing in another language, as consistent as an all-English answer, so that the
    # reward does not pay for writing words (a worded and a digits-only answer sum alike)
    assert language_consistency_reward(None, english) == [1.0, 2 / 4, 1.0, 1.0]
    combined = combine_rewards([format_reward, language_consistency_reward], [0.1, 0.1])
    assert combined(None, ["<think>12 + 30 = 42</think><answer>42</answer>",
                           "<think>add 12 and 30</think><answer>42</answer>"])[0] == [0.2, 0.2]
    chinese = ["<think>先算个位，再算十位</think><answer>42</answer>",       # 8 of 8
               "<think>先算 ones 再进位</think>",                           # 先 算 ones 再 进 位: 5 of 6
               "<think>add the ones</think>"]                               # 0 of 3
    assert language_consistency_reward(None, chinese, language="zh") == [1.0, 5 / 6, 0.0]
    russian = ["<think>Сначала сложим единицы: 7 + 5 = 12</think>",          # 3 of 3
               "<think>Сначала сложим 7 и 5, then carry</think>",            # 3 of 5
               "<think>сложим 两个</think>"]                                # 1 of 3
    assert language_consistency_reward(None, russian, language="ru") == [1.0, 3 / 5, 1 / 3]
    # a script name works as a target, and a dataset column gives one target per sample
    assert language_consistency_reward(None, russian[1:2], language="Cyrillic") == [3 / 5]
    assert language_consistency_reward(None, [english[1], chinese[1], russian[1]],
                                       language=["en", "zh", "ru"]) == [2 / 4, 5 / 6, 3 / 5]
    with pytest.raises(ValueError, match="unknown language 'klingon'"):
        language_consistency_reward(None, ["x"], language="klingon")
    with pytest.raises(ValueError, match="column 'language' has 1 entries for 2"):
        language_consistency_reward(None, ["x", "y"], language=["en"])


# ---------------------------------------------------------------- combined


def test_combine_rewards_weights_and_breakdown():
    always_none = lambda prompts, completions, **kw: [None] * len(completions)  # noqa: E731
    fn = combine_rewards([format_reward, functools.partial(math_reward), always_none],
                         [0.5, 2.0, 1.0])
    totals, per = fn(["q1", "q2"], ["<think>x</think> <answer>4</answer>", "\\boxed{5}"],
                     solution=["4", "4"])
    assert totals == [0.5 * 1 + 2.0 * 1, 0.0]
    assert per == {"format_reward": [1.0, 0.0], "math_reward": [1.0, 0.0],
                   "<lambda>": [None, None]}
    with pytest.raises(ValueError, match="weights"):
        combine_rewards([format_reward], [1.0, 2.0])


# ---------------------------------------------------------------- code and its sandbox
TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\nassert add(2, 2) == 5"


def test_extract_code_takes_the_last_fenced_block():
    text = "try\n```python\nx = 1\n```\nbetter:\n```python\ndef f():\n    return 2\n```\ndone"
    assert extract_code(text) == "def f():\n    return 2\n"
    assert extract_code("def f(): pass") == "def f(): pass"


def test_code_reward_fraction_of_asserts():
    right = "Here:\n```python\ndef add(a, b):\n    return a + b\n```"
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    raises = "```python\nraise SystemExit(0)\n```"  # exiting early must not pass the tests
    malformed = "```python\ndef add(a, b)\n    return\n```"
    chat = [{"role": "assistant", "content": right}]
    out = code_reward(None, [right, wrong, raises, malformed, chat, right],
                      tests=[TESTS] * 5 + ["# no asserts"])
    # add(2, 2) == 5 fails on purpose, so the right solution passes 2 of 3; a - b passes none
    assert out == [pytest.approx(2 / 3), 0.0, 0.0, 0.0, pytest.approx(2 / 3), None]
    assert code_reward(None, ["def add(a, b): return a * b"], tests=["assert add(2, 2) == 4"],
                       max_workers=1) == [1.0]
    assert code_reward(None, [right], tests=["assert ("]) == [None]  # tests that do not parse


def test_sandbox_ends_an_infinite_loop():
    r = run_python("while True:\n    pass", "assert True", time_limit=1.0)
    assert r.status == "timeout" and r.passed == 0
    assert code_reward(None, ["while True: pass"], tests=["assert True"], time_limit=1.0) == [0.0]


def test_sandbox_ends_a_memory_bomb():
    r = run_python("a = []\nwhile True:\n    a.append(bytearray(10**7))", "assert True",
                   time_limit=10.0, memory_mb=256)
    assert r.passed == 0 and not r.solution_ok and r.status in ("ok", "crashed")
    assert r.status == "crashed" or "MemoryError" in r.error


def test_sandbox_blocks_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        code = (f"import socket\n"
                f"try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2); py = 'connected'\n"
                f"except OSError as e:\n    py = type(e).__name__\n"
                f"import _socket\n"  # past the Python guard: only the namespace stops this one
                f"s = _socket.socket()\ns.settimeout(2)\n"
                f"try:\n    s.connect(('127.0.0.1', {port})); raw = 'connected'\n"
                f"except OSError as e:\n    raw = type(e).__name__\n")
        r = run_python(code, "assert py != 'connected'\nassert raw != 'connected'")
        if r.isolation["net"] == "netns":
            assert r.passed == 2, r
        else:  # no namespaces here: only the Python-level guard holds
            assert r.passed >= 1, r
    finally:
        server.close()


def test_sandbox_confines_writes_and_removes_its_directory(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    code = (f"import os, _io\n"
            f"open('inside.txt', 'w').write('ok')\n"
            f"os.mkdir('sub')\n"
            f"print(os.getcwd())\n"
            f"def attempt(fn):\n"
            f"    try:\n        fn()\n        return 'wrote'\n"
            f"    except OSError as e:\n        return type(e).__name__\n"
            f"py = attempt(lambda: open({str(outside / 'a')!r}, 'w'))\n"
            f"mk = attempt(lambda: os.mkdir({str(outside / 'd')!r}))\n"
            f"raw = attempt(lambda: _io.FileIO({str(outside / 'b')!r}, 'w'))\n"
            f"import subprocess\n"
            f"shell = subprocess.run(['sh', '-c', 'echo x > {outside / 'c'}']).returncode\n")
    tests = ("assert open('inside.txt').read() == 'ok'\nassert os.path.isdir('sub')\n"
             "assert py != 'wrote'\nassert mk != 'wrote'")
    r = run_python(code, tests)
    assert r.solution_ok and r.passed == 4, r
    if r.isolation["fs"] == "readonly-mounts":  # the kernel, not only the Python guard
        assert os.listdir(outside) == []
    else:
        assert not (outside / "a").exists() and not (outside / "d").exists()
    workdir = r.stdout.strip().splitlines()[0]
    assert workdir == os.path.realpath(r.workdir)
    assert not os.path.exists(r.workdir)  # the throwaway directory is gone


def test_python_level_backstop_without_namespaces(tmp_path):
    """isolate=False keeps only the in-process guards (what remains without CAP_SYS_ADMIN)."""
    code = (f"import socket\n"
            f"try:\n    socket.socket(); net = 'open'\nexcept PermissionError:\n    net = 'blocked'\n"
            f"try:\n    open({str(tmp_path / 'x')!r}, 'a'); fs = 'open'\n"
            f"except PermissionError:\n    fs = 'blocked'\n")
    r = run_python(code, "assert net == 'blocked'\nassert fs == 'blocked'", isolate=False)
    assert r.isolation == {"net": "python", "fs": "python"} and r.passed == 2, r
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- templates


def test_r1_zero_template_verbatim():
    assert R1_ZERO_TEMPLATE == (
        "A conversation between User and Assistant. The user asks a question, and the "
        "Assistant solves it. The assistant first thinks about the reasoning process in the "
        "mind and then provides the user with the answer. The reasoning process and answer "
        "are enclosed within <think> </think> and <answer> </answer> tags, respectively, "
        "i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
        "User: {prompt}. Assistant:")
    assert r1_zero_prompt("What is 2 + 3").endswith("User: What is 2 + 3. Assistant:")


def test_chat_prompt_uses_the_tokenizer_template():
    tok = ChatTokenizer(byte_tokenizer(512))
    assert chat_prompt(tok, "What is 2 + 3?") == \
        "<|begin_of_sentence|><|User|>What is 2 + 3?<|Assistant|>"
    assert chat_prompt(tok, "q", system="Be brief.", think=True) == \
        "<|begin_of_sentence|>Be brief.<|User|>q<|Assistant|><think>\n"
