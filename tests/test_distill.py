"""The R1 recipe's data stages on a tiny random model: prompt rows from files (and the
one-line errors for bad ones), `nanoseek grpo --data` with dataset columns reaching the
rewards as keyword arguments, `nanoseek rejection-sample` and `nanoseek distill` (a local
checkpoint, and a live OpenAI-compatible `nanoseek serve`) writing SFT data that
`nanoseek sft` accepts.

A random model's text is gibberish, so correctness is steered where a test needs it: the
scripted teacher of test_serve returns a known right answer, and a reward that accepts
everything stands in for a correct policy."""

import copy
import json

import pytest
import torch

import nanoseek
from nanoseek.cli import main
from nanoseek.data.tokenizer import ChatTokenizer, byte_tokenizer
from nanoseek.rl import distill
from nanoseek.rl.trainer import GRPOTrainer, grpo_config
from nanoseek.train.checkpoint import latest_checkpoint
from nanoseek.train.metrics import read_metrics

ROWS = [{"prompt": "What is 1/2 + 1/4?", "answer": "3/4", "solution": "\\frac{3}{4}", "level": 1},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2^10?"}],
         "answer": "1024", "solution": "1024", "level": 2}]


pytestmark = pytest.mark.usefixtures("few_threads")  # conftest.py


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe") / "tiny"
    assert main(["init", "--preset", "tiny", "--out", str(out), "--seed", "0"]) == 0
    return out


def write_rows(path, rows):
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------ prompt rows
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_prompt_rows_from_each_format(tmp_path, suffix):
    path = tmp_path / f"rows{suffix}"
    if suffix == ".parquet":
        pq = pytest.importorskip("pyarrow.parquet")
        import pyarrow as pa
        pq.write_table(pa.Table.from_pylist([{"prompt": r["prompt"] if isinstance(r["prompt"], str) else "q",
                                              "answer": r["answer"]} for r in ROWS]), path)
    else:
        write_rows(path, ROWS)
    rows = distill.load_prompt_rows(path)
    assert len(rows) == 2 and rows[0]["answer"] == "3/4"
    assert distill.correctness_reward(rows) == "math"


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ('{"question": "x", "answer": "1"}\n', "rows.jsonl:1: a row needs a 'prompt'"),
    ('{"prompt": "  "}\n', "the prompt is empty"),
    ('{"prompt": [{"role": "bot", "content": "x"}]}\n', "list of {role: system|user|assistant"),
    ('{"prompt": "x"\n', "rows.jsonl:1: malformed JSON"),
    ("", "holds no rows"),
])
def test_bad_prompt_rows_are_one_line_errors(tmp_path, capsys, ckpt, content, message):
    path = tmp_path / "rows.jsonl"
    if content is not None:
        path.write_text(content)
    assert main(["grpo", "--model", str(ckpt), "--data", str(path), "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_other_bad_inputs(tmp_path, capsys, ckpt):
    (tmp_path / "rows.txt").write_text("What is 2+2?")
    with pytest.raises(distill.DataError, match="not '.txt'"):
        distill.load_prompt_rows(tmp_path / "rows.txt")
    with pytest.raises(distill.DataError, match="a list of objects"):
        distill.load_prompt_rows(write_rows(tmp_path / "rows.json", {"prompt": "x"}))
    with pytest.raises(distill.DataError, match="cannot check correctness"):
        distill.correctness_reward([{"prompt": "x"}])
    data = write_rows(tmp_path / "rows.jsonl", ROWS)
    argv = ["grpo", "--model", str(ckpt), "--out", str(tmp_path / "g")]
    for extra, message in ((["--task", "arithmetic", "--data", str(data)], "not allowed with argument"),
                           (["--data", str(data), "--level", "2"], "does not apply to --data"),
                           (["--data", str(data), 'rewards={"accuracy": 1}'], "needs the dataset column 'meta'"),
                           (["--data", str(data), "prompt_format=r1_zero"], "use prompt_format=chat")):
        assert main(argv + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


# ------------------------------------------------------------------ grpo --data
def test_dataset_columns_reach_the_rewards_as_keyword_arguments(ckpt, tmp_path):
    from nanoseek.hf import from_pretrained
    from nanoseek.loading import tokenizer_for
    seen = []

    def spy(prompts, completions, **columns):
        seen.append((prompts, columns))
        return [float(len(c) % 2) for c in completions]

    cfg = grpo_config(group_size=2, prompts_per_step=2, max_new_tokens=6, steps=1, beta=0.0,
                      rewards={"spy": 1.0, "math": 1.0})
    trainer = GRPOTrainer(from_pretrained(ckpt), tokenizer_for(ckpt), ROWS, cfg, tmp_path, reward_funcs={"spy": spy})
    record = trainer.train_step()
    prompts, columns = seen[-1]
    assert set(columns) == {"answer", "solution", "level"} and len(prompts) == 4
    for p, a, s, lv in zip(prompts, columns["answer"], columns["solution"], columns["level"]):
        row = next(r for r in ROWS if r["prompt"] == p)  # each column entry belongs to its prompt
        assert (a, s, lv) == (row["answer"], row["solution"], row["level"])
    assert record["reward_math"] == 0.0 and "reward_spy" in record


def test_math_reward_against_answer_through_the_trainer(ckpt, tmp_path):
    from nanoseek.hf import from_pretrained
    from nanoseek.loading import tokenizer_for
    rows = [{"prompt": "What is 1/2 + 1/4?", "answer": "3/4"}]
    cfg = grpo_config(group_size=2, prompts_per_step=1, max_new_tokens=4, steps=1, rewards={"math": 1.0})
    trainer = GRPOTrainer(from_pretrained(ckpt), tokenizer_for(ckpt), rows, cfg, tmp_path)
    batch = {"rows": rows * 3, "completions": ["<think>add</think> <answer>\\frac{3}{4}</answer>",
                                                "so it is 0.75", "<answer>1/2</answer>"]}
    totals, per_fn = trainer.score(batch)
    assert totals == [1.0, 1.0, 0.0] and per_fn["math"] == [1.0, 1.0, 0.0]


def test_cli_grpo_data_one_step(ckpt, tmp_path, capsys):
    data = write_rows(tmp_path / "rows.jsonl", ROWS)
    out = tmp_path / "g"
    argv = ["grpo", "--model", str(ckpt), "--data", str(data), "--out", str(out), "--steps", "1",
            "group_size=2", "prompts_per_step=2", "max_new_tokens=6"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert 'rewards: {"math": 1.0}' in printed and "GRPO to step 1" in printed
    (record,) = read_metrics(out)
    assert "reward_math" in record and "eval_accuracy" not in record
    state = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())
    assert state["data"] == str(data) and "task" not in state
    assert (out / "final" / "config.json").is_file()


def test_eval_rows_are_answered_greedily_and_scored_by_the_rewards(ckpt, tmp_path, monkeypatch):
    """A dataset run's held-out evaluation: eval_n rows, greedy (temperature 0), scored by
    the configured rewards: the weighted total and each function's mean."""
    from nanoseek.hf import from_pretrained
    from nanoseek.loading import tokenizer_for
    from nanoseek.rl import trainer as rl_trainer
    held_out = [{"prompt": "What is 1/2 + 1/4?", "answer": "3/4"}, {"prompt": "What is 2 + 2?", "answer": "4"},
                {"prompt": "What is 3 * 3?", "answer": "9"}]
    cfg = grpo_config(group_size=2, prompts_per_step=1, max_new_tokens=4, steps=1, eval_n=2,
                      rewards={"math": 1.0, "format": 0.5})
    trainer = GRPOTrainer(from_pretrained(ckpt), tokenizer_for(ckpt), ROWS, cfg, tmp_path, eval_rows=held_out)
    asked = []

    def scripted(model, tokenizer, prompts, params, *args, **kwargs):  # right, then well-formed but wrong
        asked.append((prompts, params.temperature))
        texts = ["<answer>3/4</answer>", "<think>\nhm\n</think>\n<answer>5</answer>"]
        return None, [type("Out", (), {"text": t})() for t in texts[: len(prompts)]], None
    monkeypatch.setattr(rl_trainer, "generate_repeated", scripted)
    r = trainer.evaluate()
    assert asked == [([r["prompt"] for r in held_out[:2]], 0.0)]  # eval_n rows, greedy
    assert r["eval_reward_math"] == 0.5 and r["eval_reward_format"] == 0.5
    assert r["eval_reward"] == pytest.approx((1.0 + 0.5) / 2)
    with pytest.raises(ValueError, match="eval_rows are for a dataset run"):
        GRPOTrainer(from_pretrained(ckpt), tokenizer_for(ckpt), "arithmetic", cfg, tmp_path / "t", eval_rows=held_out)


def test_cli_grpo_eval_data(ckpt, tmp_path, capsys):
    data = write_rows(tmp_path / "rows.jsonl", ROWS)
    held_out = write_rows(tmp_path / "held_out.jsonl", ROWS[:1])
    out = tmp_path / "g"
    assert main(["grpo", "--model", str(ckpt), "--data", str(data), "--eval-data", str(held_out), "--out", str(out),
                 "--steps", "1", "group_size=2", "prompts_per_step=2", "max_new_tokens=6"]) == 0
    start, record = read_metrics(out)  # step 0: the starting model's held-out rewards
    assert [start["step"], record["step"]] == [0, 1]
    for r in (start, record):
        assert r["eval_reward"] == r["eval_reward_math"] and 0.0 <= r["eval_reward"] <= 1.0
    assert main(["grpo", "--model", str(ckpt), "--task", "arithmetic", "--eval-data", str(held_out),
                 "--out", str(tmp_path / "x")]) == 2
    assert "--eval-data goes with --data" in capsys.readouterr().err


# ------------------------------------------------------------------ judging
def test_judge_and_select_keep_correct_well_formed_and_drop_repeats():
    rows = distill.task_rows("arithmetic", level=1, n=2, seed=3)
    right = [f"<think>\nadd\n</think>\n<answer>{r['answer']}</answer>" for r in rows]
    samples = [distill.Sample(0, right[0]), distill.Sample(0, right[0]),           # right, and its repeat
               distill.Sample(0, f"the answer is {rows[0]['answer']}"),        # right, not well-formed
               distill.Sample(1, "<think>\nx\n</think>\n<answer>-1</answer>"),  # well-formed, wrong
               distill.Sample(1, right[1])]
    judged = distill.judge(rows, samples)
    assert [(j.correct, j.well_formed) for j in judged] == [
        (True, True), (True, True), (True, False), (False, True), (True, True)]
    records, stats = distill.select(rows, judged, n=3, require_correct=True, require_format=True)
    assert [r["messages"][1]["content"] for r in records] == [right[0], right[1]]
    assert records[0]["messages"][0] == {"role": "user", "content": rows[0]["prompt"]}
    assert stats["kept"] == 2 and stats["repeats_dropped"] == 1 and stats["correct"] == 4
    assert [p["pass_rate"] for p in stats["per_prompt"]] == [2 / 3, 1 / 3]
    assert stats["pass_rate_histogram"] == "1/3: 1, 2/3: 1"


def test_trace_text_puts_reasoning_back_inside_think():
    assert distill.trace_text({"content": " 4 ", "reasoning_content": "2+2"}) == "<think>\n2+2\n</think>\n4"
    assert distill.trace_text({"content": "4", "reasoning": "2+2"}) == "<think>\n2+2\n</think>\n4"
    assert distill.trace_text({"content": "<think>a</think>4", "reasoning_content": None}) == "<think>a</think>4"
    assert distill.endpoint_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert distill.endpoint_url("https://api.x.com/v1/") == "https://api.x.com/v1/chat/completions"


# ------------------------------------------------------------------ rejection-sample
def test_rejection_sample_through_the_engine(ckpt, tmp_path, capsys):
    out = tmp_path / "rs.jsonl"
    argv = ["rejection-sample", "--model", str(ckpt), "--task", "arithmetic", "--num-prompts", "3",
            "--n", "2", "--max-tokens", "8", "--out", str(out)]
    assert main(argv) == 0
    printed, err = capsys.readouterr()
    assert "sampling 6/6 samples (100%)" in err  # progress, as lines off a terminal
    stats = json.loads(out.with_suffix(".stats.json").read_text())
    assert stats["samples"] == 6 and stats["prompts"] == 3 and stats["correctness_checked"] and len(stats["per_prompt"]) == 3
    assert f"kept {stats['kept']}/6 samples" in printed and "per-prompt pass rate" in printed
    assert len(out.read_text().splitlines()) == stats["kept"]  # a random model: most likely none
    # the same seeds give the same samples
    assert main(argv[:-1] + [str(tmp_path / "again.jsonl")]) == 0
    assert json.loads((tmp_path / "again.stats.json").read_text()) == stats


def test_rejection_sample_output_trains_with_sft(ckpt, tmp_path, monkeypatch, capsys):
    """The engine's text replaced by one right and one wrong answer per prompt: the right
    ones are written, and `nanoseek sft --data` trains on the file."""
    def scripted(model, tokenizer, rows, n=4, **kw):
        return [distill.Sample(i, f"<think>\nsum\n</think>\n<answer>{r['answer'] if j == 0 else 'x'}</answer>")
                for i, r in enumerate(rows) for j in range(n)]
    monkeypatch.setattr(distill, "sample_engine", scripted)
    out = tmp_path / "rs.jsonl"
    assert main(["rejection-sample", "--model", str(ckpt), "--task", "countdown", "--num-prompts", "4",
                 "--n", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "kept 4/8 samples" in printed and "prompts by passes: 1/2: 4" in printed
    chats = [json.loads(line) for line in out.read_text().splitlines()]
    assert [m["role"] for m in chats[0]["messages"]] == ["user", "assistant"]
    assert main(["sft", "--model", str(ckpt), "--data", str(out), "--steps", "1", "--out",
                 str(tmp_path / "sft"), "batch_size=2", "seq_len=256"]) == 0
    assert (tmp_path / "sft" / "final" / "config.json").is_file()


def test_rejection_sample_bad_inputs(ckpt, tmp_path, capsys):
    rows = write_rows(tmp_path / "rows.jsonl", [{"prompt": "hi"}])
    for extra, message in ((["--data", str(rows)], "cannot check correctness"),
                           (["--task", "arithmetic", "--n", "0"], "--n: must be positive, got 0"),
                           (["--task", "arithmetic", "--num-prompts", "0"], "--num-prompts must be positive"),
                           (["--task", "sudoku"], "unknown task 'sudoku'"),
                           (["--task", "arithmetic", "--max-tokens", "100000"], "lower --max-tokens")):
        assert main(["rejection-sample", "--model", str(ckpt), "--out", str(tmp_path / "o.jsonl")] + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert main(["rejection-sample", "--model", str(tmp_path / "nope"), "--task", "arithmetic",
                 "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "not a checkpoint" in capsys.readouterr().err
    assert main(["rejection-sample", "--model", str(ckpt), "--task", "arithmetic",
                 "--out", str(tmp_path / "o.txt")]) == 2
    assert "name it FILE.jsonl" in capsys.readouterr().err


# ------------------------------------------------------------------ distill
def test_distill_from_a_local_checkpoint_then_sft_of_the_student(ckpt, tmp_path, capsys):
    out, student_run = tmp_path / "traces.jsonl", tmp_path / "student"
    assert main(["distill", "--teacher", str(ckpt), "--task", "arithmetic", "--num-prompts", "3", "--n", "2",
                 "--max-tokens", "8", "--out", str(out), "--student", str(ckpt), "--sft-out", str(student_run),
                 "--sft-steps", "1", "batch_size=2", "seq_len=128"]) == 0
    printed = capsys.readouterr().out
    chats = [json.loads(line) for line in out.read_text().splitlines()]
    stats = json.loads(out.with_suffix(".stats.json").read_text())
    assert stats["samples"] == 6 and stats["correctness_checked"]
    assert len(chats) == stats["kept"] == 6 - stats["repeats_dropped"]  # no filter: every distinct trace
    assert "student SFT to step 1" in printed and (student_run / "final" / "config.json").is_file()


def test_distill_bad_inputs(ckpt, tmp_path, capsys):
    base = ["distill", "--teacher", str(ckpt), "--task", "arithmetic", "--out", str(tmp_path / "t.jsonl")]
    for extra, message in ((["--student", str(ckpt)], "--student and --sft-out go together"),
                           (["--student", str(tmp_path / "nope"), "--sft-out", str(tmp_path / "s")], "not a checkpoint"),
                           (["--student", str(ckpt), "--sft-out", str(tmp_path / "s"), "lrr=1"], "lrr"),
                           (["lr=1"], "without --student"),
                           (["--api-key-file", "k"], "for a URL teacher"),
                           (["--concurrency", "0"], "--concurrency: must be positive, got 0")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    rows = write_rows(tmp_path / "rows.jsonl", [{"prompt": "hi"}])
    assert main(["distill", "--teacher", str(ckpt), "--data", str(rows), "--only-correct",
                 "--out", str(tmp_path / "t.jsonl")]) == 2
    assert "cannot check correctness" in capsys.readouterr().err


# the URL teacher: a live `nanoseek serve` app, from test_serve's helpers
serve = pytest.importorskip("test_serve", reason="needs fastapi, uvicorn, httpx, openai")

REASONER = ["<think>", "ones: 2 + 4 = 6", "\ntens: 1 + 3 = 4", "</think>", "<answer>46</answer>"]


def test_distill_from_a_live_reasoning_endpoint(ckpt, tmp_path, monkeypatch, capsys):
    """The server returns the chain apart (reasoning_content); the trace puts it back in
    <think>; --only-correct keeps the row whose answer is 46, drops the one whose answer is 7."""
    from nanoseek.serve.app import Settings, create_app
    from nanoseek.loading import tokenizer_for
    rows = write_rows(tmp_path / "rows.jsonl", [{"prompt": "What is 12 + 34?", "answer": "46"},
                                                {"prompt": "What is 3 + 4?", "answer": "7"}])
    app = create_app(serve.ScriptedEngine(REASONER), tokenizer_for(ckpt), "r1", Settings(api_keys=[serve.KEY]))
    out = tmp_path / "traces.jsonl"
    with serve.live(app) as url:
        argv = ["distill", "--teacher", url + "/v1", "--data", str(rows), "--out", str(out), "--only-correct"]
        monkeypatch.delenv("NANOSEEK_TEACHER_API_KEY", raising=False)
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "HTTP 401" in err and "NANOSEEK_TEACHER_API_KEY" in err

        monkeypatch.setenv("NANOSEEK_TEACHER_API_KEY", serve.KEY)
        assert main(argv + ["--n", "2"]) == 0
        printed, err = capsys.readouterr()
        assert "sampling 4/4 samples (100%)" in err
        assert "2 correct" in printed and "1 repeats dropped" in printed and serve.KEY not in printed
        (chat,) = [json.loads(line) for line in out.read_text().splitlines()]
        assert chat["messages"] == [
            {"role": "user", "content": "What is 12 + 34?"},
            {"role": "assistant", "content": "<think>\nones: 2 + 4 = 6\ntens: 1 + 3 = 4\n</think>\n<answer>46</answer>"}]

        monkeypatch.delenv("NANOSEEK_TEACHER_API_KEY")
        key_file = tmp_path / "key"
        key_file.write_text(serve.KEY + "\n")
        assert main(["distill", "--teacher", url, "--teacher-model", "r1", "--api-key-file", str(key_file),
                     "--data", str(rows), "--out", str(tmp_path / "t2.jsonl")]) == 0  # bare host: /v1 added
        assert len((tmp_path / "t2.jsonl").read_text().splitlines()) == 2  # no filter: both traces
        assert main(["distill", "--teacher", url, "--teacher-model", "nope", "--api-key-file", str(key_file),
                     "--data", str(rows), "--out", str(tmp_path / "t3.jsonl")]) == 2
        assert "HTTP 404" in capsys.readouterr().err


def test_distill_from_a_live_nanoseek_serve_of_a_model(ckpt, tmp_path, capsys):
    """A real engine behind the server: one trace per prompt, in order, unfiltered."""
    out = tmp_path / "traces.jsonl"
    with serve.live(serve.tiny_app(ckpt, "tiny")) as url:
        assert main(["distill", "--teacher", url + "/v1", "--task", "arithmetic", "--num-prompts", "3",
                     "--max-tokens", "6", "--temperature", "0", "--out", str(out)]) == 0
    chats = [json.loads(line) for line in out.read_text().splitlines()]
    prompts = [r["prompt"] for r in distill.task_rows("arithmetic", 1, 3)]
    assert [c["messages"][0]["content"] for c in chats] == prompts
    assert json.loads(out.with_suffix(".stats.json").read_text())["samples"] == 3
