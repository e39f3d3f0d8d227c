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
from nanoseek.rl import recipe
from nanoseek.rl.trainer import GRPOTrainer, grpo_config
from nanoseek.train.checkpoint import latest_checkpoint
from nanoseek.train.metrics import read_metrics

ROWS = [{"prompt": "What is 1/2 + 1/4?", "answer": "3/4", "solution": "\\frac{3}{4}", "level": 1},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2^10?"}],
         "answer": "1024", "solution": "1024", "level": 2}]


@pytest.fixture(scope="module", autouse=True)
def few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


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
    rows = recipe.load_prompt_rows(path)
    assert len(rows) == 2 and rows[0]["answer"] == "3/4"
    assert recipe.correctness_reward(rows) == "math"


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
    with pytest.raises(recipe.DataError, match="not '.txt'"):
        recipe.load_prompt_rows(tmp_path / "rows.txt")
    with pytest.raises(recipe.DataError, match="a list of objects"):
        recipe.load_prompt_rows(write_rows(tmp_path / "rows.json", {"prompt": "x"}))
    with pytest.raises(recipe.DataError, match="cannot check correctness"):
        recipe.correctness_reward([{"prompt": "x"}])
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
    from nanoseek.train.pipeline import tokenizer_for
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
    from nanoseek.train.pipeline import tokenizer_for
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
