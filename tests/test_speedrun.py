"""The speedrun's GRPO stage on a tiny random model: the task choice (first candidate in the
accuracy band, else the closest to the target), a budget so small that the loop stops at
its deadline after one step yet still evaluates, saves, shows its progress and resumes, and
the report and summary holding the accuracy before and after GRPO."""

import json

import pytest
import torch

from nanoseek.cli import main
from nanoseek.hf import from_pretrained
from nanoseek.rl.trainer import grpo
from nanoseek.speedrun import answer_budget, choose_grpo_task, grpo_stage, write_report
from nanoseek.train.checkpoint import latest_checkpoint
from nanoseek.train.metrics import read_metrics
from nanoseek.loading import tokenizer_for


pytestmark = pytest.mark.usefixtures("few_threads")  # conftest.py


def test_choose_grpo_task_first_in_band_else_closest():
    accs = {("a", 1): 0.99, ("a", 2): 0.05, ("a", 3): 0.3, ("c", 1): 0.4}
    asked = []

    def accuracy_of(task, level):
        asked.append((task, level))
        return accs[task, level]

    task, level, why, tried = choose_grpo_task(accuracy_of, list(accs))
    assert (task, level) == ("a", 3) and asked == [("a", 1), ("a", 2), ("a", 3)]  # c 1 never evaluated
    assert "30%" in why and [t["greedy_accuracy"] for t in tried] == [0.99, 0.05, 0.3]
    accs[("a", 3)] = accs[("c", 1)] = 0.0
    task, level, why, _ = choose_grpo_task(lambda t, l: accs[t, l], list(accs))
    assert (task, level) == ("a", 2) and "closest" in why  # 5% is nearer 35% than 99%


def test_grpo_stage_stops_at_its_deadline_then_reports_before_and_after(tmp_path, capsys):
    sft_dir = tmp_path / "sft"
    assert main(["init", "--preset", "tiny", "--out", str(sft_dir)]) == 0
    tok, model = tokenizer_for(sft_dir), from_pretrained(sft_dir)
    from nanoseek.data.tasks import format_chat, get_task
    longest = max(len(tok.encode(format_chat(e)[1]["content"]))
                  for e in get_task("arithmetic").generate(256, level=1, split="train", seed=1))
    assert longest + 1 <= answer_budget(tok, "arithmetic", 1) <= 1.25 * longest + 17  # reply + EOS fit
    said = []
    g = grpo_stage(model, tok, tmp_path, minutes=1e-3, gpu=False, say=said.append,
                   candidates=[("arithmetic", 1), ("countdown", 1)], eval_n=4,
                   group_size=2, prompts_per_step=2, max_new_tokens=8)
    assert [(t["task"], t["level"]) for t in g["candidates"]] == [("arithmetic", 1), ("countdown", 1)]
    assert g["steps"] == 1 and g["config"]["steps"] >= 2  # the deadline stopped it, not the step count
    # the stage's progress on stderr, a line as the log of `make run > log` shows it
    assert f"grpo 1/{g['config']['steps']} steps " in capsys.readouterr().err
    assert [p["step"] for p in g["curve"]] == [0, 1]  # before, and the final evaluation anyway
    logged = [r["eval_accuracy"] for r in read_metrics(tmp_path / "grpo" / "metrics.jsonl") if "eval_accuracy" in r]
    assert g["after"] == logged[-1]  # the report's "after" is the run's own last evaluation
    assert logged[0] == g["before"] and len(logged) == 2  # step 0: the task-choice evaluation, not redone
    assert g["seconds_per_step"] > 0 and g["rollout_tokens_per_s"] > 0
    run = tmp_path / "grpo"
    assert (run / "final" / "config.json").is_file() and (run / "plots" / "rl.png").is_file()
    assert latest_checkpoint(run).name == "step_00000001"
    assert not (tmp_path / ".calibrate_grpo").exists()

    # a resume goes on toward the configured steps
    from nanoseek.rl.trainer import grpo_config
    cfg = grpo_config(**{**g["config"], "steps": 2})
    trainer, records = grpo(sft_dir, g["task"], cfg, run, resume=True, progress=False)
    assert trainer.step == 2 and [r["step"] for r in read_metrics(run)] == [0, 1, 2]

    record = {"loss": 1.0, "tokens": 10, "tokens_per_s": 5.0}
    report = write_report(tmp_path, model.config, [record], [record], [], [],
                          {"pretrain_s": 1, "sft_s": 1, "grpo_s": 1, "total_s": 3}, "cpu", grpo=g)
    text = report.read_text()
    assert "## GRPO" in text and f"{g['task']} level {g['level']}" in text
    assert f"| {g['before']:.0%} | {g['after']:.0%} |" in text and "plots/grpo_rl.png" in text
    assert (tmp_path / "plots" / "grpo_rl.png").is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["grpo"]["before"] == g["before"] and summary["grpo"]["after"] == g["after"]


def test_speedrun_flags_are_checked(capsys):
    assert main(["speedrun", "--grpo-minutes", "-1"]) == 2
    assert "--grpo-minutes must be positive or 0" in capsys.readouterr().err
