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
from nanoseek.speedrun import (accuracy_text, answer_budget, choose_grpo_task, difference_text, grpo_stage,
                               stage_lines, write_report)
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
    assert f"| {accuracy_text(g['before'], g['before_interval'])} | {accuracy_text(g['after'], g['after_interval'])} |" in text
    assert "plots/grpo_rl.png" in text and text.rstrip().splitlines()[-1] == "Reproduce: `nanoseek speedrun`"
    # the change is the paired difference on the same 4 problems
    assert g["change"]["n"] == 4 and g["change"]["difference"] == pytest.approx(g["after"] - g["before"], abs=1e-12)
    assert (tmp_path / "plots" / "grpo_rl.png").is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["grpo"]["before"] == g["before"] and summary["grpo"]["after"] == g["after"]
    # R1's sampled pass@1 before and after, on the same 4 problems, and its paired change
    sp = g["sampled"]
    assert sp["samples"] == 2 and sp["temperature"] == 0.6 and sp["change"]["n"] == 4
    assert sp["change"]["difference"] == pytest.approx(sp["after"] - sp["before"], abs=1e-12)
    assert (f"| R1's sampled pass@1 (2 samples at T 0.6 per problem) | {accuracy_text(sp['before'], sp['before_interval'])} | "
            f"{accuracy_text(sp['after'], sp['after_interval'])} |") in text


def test_speedrun_flags_are_checked(capsys):
    assert main(["speedrun", "--grpo-minutes", "-1"]) == 2
    assert "--grpo-minutes must be positive or 0" in capsys.readouterr().err


def test_stage_lines_say_whether_each_stage_helped():
    n = 200
    pre = {"task": "arithmetic", "level": 1, "greedy_accuracy": 0.1, "greedy_interval": (0.066, 0.149),
           "greedy_correct": [True] * 20 + [False] * 180}
    # SFT: 20 right before stay right, 40 more right; GRPO (below): 30 gained, 10 lost
    sft = {"task": "arithmetic", "level": 1, "greedy_accuracy": 0.3, "greedy_interval": (0.240, 0.367),
           "greedy_correct": [True] * 60 + [False] * 140}
    change = {"difference": 0.1, "interval": (0.04, 0.16), "gains": 30, "losses": 10, "n": n}
    grpo = {"steps": 50, "task": "arithmetic", "level": 1, "before": 0.3, "after": 0.4,
            "after_interval": (0.334, 0.469), "change": change}
    pretrain_line, sft_line, grpo_line = stage_lines([{}] * 7, [pre], [sft], grpo)
    assert "7 steps" in pretrain_line and "10% [7, 15]: helped" in pretrain_line
    # 40 gained of 40 discordant: Wilson's lower end 40 / (40 + z^2) = 0.912, so the change's
    # interval is 0.2 * (2 * 0.912 - 1) = +16.5 to +20 points
    assert "30% [24, 37], +20 points [+16, +20] (40 gained, 0 lost) against pretraining: helped" in sft_line
    assert "greedy 30% -> 40% [33, 47], +10 points [+4, +16] (30 gained, 10 lost): helped." in grpo_line
    sampled = {"before": 0.25, "after": 0.4, "after_interval": (0.35, 0.45),
               "change": {"difference": 0.15, "interval": (0.1, 0.2), "n": n}}
    line = stage_lines([], [], [], dict(grpo, sampled=sampled))[0]
    assert line.endswith("helped; R1's sampled pass@1 25% -> 40% [35, 45], +15 points [+10, +20]: helped.")
    worse = dict(change, difference=-0.1, interval=(-0.16, -0.04))
    assert stage_lines([], [], [], dict(grpo, change=worse))[0].endswith("made it worse.")
    noise = dict(change, interval=(-0.01, 0.2))
    assert difference_text(noise) == "+10 points [-1, +20] (30 gained, 10 lost)"
    assert stage_lines([], [], [], dict(grpo, change=noise))[0].endswith("no change beyond noise.")


def test_grpo_stage_needs_steps_or_minutes(tmp_path):
    with pytest.raises(ValueError, match="either minutes .* or steps"):
        grpo_stage(None, None, tmp_path, gpu=False)


def test_stage_clock_scales_the_time_left_by_the_pace_so_far(monkeypatch, capsys):
    import nanoseek.speedrun as speedrun
    now = [1000.0]
    monkeypatch.setattr(speedrun.time, "time", lambda: now[0])
    clock = speedrun.StageClock({"pretrain": 60.0, "sft": 30.0, "grpo": 90.0})
    clock.start("pretrain", "pretrain")
    now[0] += 120.0  # twice the plan: the stages left should take twice theirs, 240 s
    clock.start("sft", "sft")
    out = capsys.readouterr().out.splitlines()
    assert out == ["[speedrun     0s] pretrain (about 3.0 min left)", "[speedrun   120s] sft (about 4.0 min left)"]
