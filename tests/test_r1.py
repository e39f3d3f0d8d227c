"""`nanoseek r1` (rl/r1.py, rl/r1_report.py) on a tiny random model: each stage reads what the
one before it wrote, a re-run skips finished stages and resumes the unfinished one exactly,
and the report's table and curves carry the stages' figures.

A random model answers nothing right, so where a hand-off needs kept samples the rejection
sampler is scripted to give one right and one wrong answer per prompt (as in test_distill)."""

import json
import math
import shlex
import signal

import pytest

from nanoseek.cli import main
from nanoseek.data.tasks import format_chat, get_task
from nanoseek.loading import latest_checkpoint, resolve_model_dir
from nanoseek.rl import distill, r1_report
from nanoseek.rl.r1 import r1, r1_config
from nanoseek.rl.trainer import GRPOTrainer
from nanoseek.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("few_threads")  # conftest.py

TINY = dict(eval_n=2, max_new_tokens=6, cold_start_n=4, cold_start_steps=1, sft_steps=1, zero_steps=2,
            reasoning_steps=1, final_steps=1, group_size=2, prompts_per_step=1, curve_points=1,
            rejection_prompts=2, rejection_samples=2, batch_size=2, seq_len=96, save_every=1)
COLD = 3  # cold-start chats in the full run's file


@pytest.fixture(scope="module")
def base(tiny_dir):  # conftest.py: a random tiny model
    return tiny_dir


def trainer_state(run_dir):
    return json.loads((latest_checkpoint(run_dir) / "trainer_state.json").read_text())


@pytest.fixture(scope="module")
def full_run(base, tmp_path_factory):
    def scripted(model, tokenizer, rows, n=4, **kw):
        return [distill.Sample(i, f"<think>\nsum\n</think>\n<answer>{r['answer'] if j == 0 else 'x'}</answer>")
                for i, r in enumerate(rows) for j in range(n)]
    out = tmp_path_factory.mktemp("r1") / "full"
    cold = out.parent / "cold.jsonl"  # a --cold-start file: worked solutions of level 2
    distill.write_jsonl(cold, [{"messages": format_chat(e)} for e in get_task("arithmetic").generate(COLD, level=2)])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distill, "sample_engine", scripted)
        r1(base, out, "full", cold_start=str(cold), cfg=r1_config(gpu=False, **TINY), progress=False,
           say=lambda _: None)
    return out


def test_full_pipeline_hands_each_stage_output_to_the_next(base, full_run):
    out = full_run
    stage = {name: json.loads((out / name / "stage.json").read_text())
             for name in ("base", "cold_start", "reasoning_rl", "rejection", "sft", "final_rl")}
    # SFT stages start from the base; each RL stage from the SFT stage before it
    assert trainer_state(out / "cold_start")["base_model"] == str(resolve_model_dir(base))
    assert trainer_state(out / "reasoning_rl")["base_model"] == str(out / "cold_start" / "final")
    assert trainer_state(out / "sft")["base_model"] == str(resolve_model_dir(base))
    assert trainer_state(out / "final_rl")["base_model"] == str(out / "sft" / "final")
    # the rejection stage kept the right sample of each prompt, and the mix adds the cold-start chats
    kept = (out / "rejection" / "rejection.jsonl").read_text().splitlines()
    mix = (out / "rejection" / "sft_mix.jsonl").read_text().splitlines()
    assert stage["rejection"]["kept"] == len(kept) == TINY["rejection_prompts"]
    assert mix[:len(kept)] == kept and len(mix) == len(kept) + COLD
    assert trainer_state(out / "cold_start")["data"] == str(out.parent / "cold.jsonl")
    sft_state = trainer_state(out / "sft")
    assert sft_state["data"] == str(out / "rejection" / "sft_mix.jsonl")
    assert sft_state["loader"]["num_examples"] == len(mix)
    # each RL run's step 0 is the accuracy its starting stage measured
    for rl, start in (("reasoning_rl", "cold_start"), ("final_rl", "sft")):
        first = read_metrics(out / rl)[0]
        assert first["step"] == 0 and first["eval_accuracy"] == stage[start]["accuracy"]
        assert stage[rl]["curve"][-1]["step"] == TINY[f"{rl.split('_')[0]}_steps"]
    assert json.loads((out / "reasoning_rl" / "grpo_config.json").read_text())["prompt_format"] == "chat"


def test_report_table_has_each_stage_with_its_interval(full_run):
    report = (full_run / "report.md").read_text()
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r[0].lstrip("| ") for r in rows] == ["base model", "cold-start SFT", "reasoning RL",
                                                 "rejection sampling", "SFT of the base", "final RL"]
    for r in rows:
        name = {"base model": "base", "cold-start SFT": "cold_start", "reasoning RL": "reasoning_rl",
                "rejection sampling": "rejection", "SFT of the base": "sft", "final RL": "final_rl"}[r[0].lstrip("| ")]
        s = json.loads((full_run / name / "stage.json").read_text())
        if "accuracy" not in s:
            n = TINY["rejection_prompts"]
            assert f"kept {n} of {n * TINY['rejection_samples']} samples" in r[1]
            continue
        lo, hi = r1_report.wilson_interval(s["correct"], s["n"])
        assert r[3:] == [str(s["n"]), f"{100 * s['accuracy']:.1f}%", f"{100 * lo:.1f}% – {100 * hi:.1f}% |"]
    assert "(plots/reasoning_rl_rl.png)" in report and (full_run / "plots" / "final_rl_rl.png").is_file()


def test_rerun_skips_finished_stages_and_resumes_the_unfinished_one_exactly(base, tmp_path, monkeypatch):
    cfg = r1_config(gpu=False, **TINY)
    whole = tmp_path / "whole"
    r1(base, whole, "zero", cfg=cfg, progress=False, say=lambda _: None)

    step = GRPOTrainer.train_step

    def dies_at_step_2(self):
        if self.step == 1:
            raise KeyboardInterrupt  # the run is killed after step 1's checkpoint
        return step(self)
    monkeypatch.setattr(GRPOTrainer, "train_step", dies_at_step_2)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        r1(base, cut, "zero", cfg=cfg, progress=False, say=lambda _: None)
    assert (cut / "base" / "stage.json").is_file() and not (cut / "zero_rl" / "stage.json").exists()
    monkeypatch.setattr(GRPOTrainer, "train_step", step)
    said = []
    r1(base, cut, "zero", cfg=cfg, progress=False, say=said.append)
    assert "1/2 base model: finished before, skipped" in said[0]
    figures = [[(r["step"], r.get("reward"), r.get("loss"), r.get("eval_accuracy"))
                for r in read_metrics(d / "zero_rl")] for d in (whole, cut)]
    assert len(figures[0]) == 3 and figures[0] == figures[1]  # steps 0 (the base's accuracy), 1, 2
    # the zero pipeline prompts with the R1-Zero template and says whether length grew
    assert json.loads((cut / "zero_rl" / "grpo_config.json").read_text())["prompt_format"] == "r1_zero"
    assert "Did the response length grow over R1-Zero's RL" in (cut / "report.md").read_text()
    # other settings on the same directory are refused, not mixed in
    with pytest.raises(ValueError, match=r"other settings \(zero_steps: 2 -> 5\)"):
        r1(base, cut, "zero", cfg=r1_config(gpu=False, **{**TINY, "zero_steps": 5}), say=lambda _: None)


def test_cli_r1_stopped_by_sigterm_says_how_to_go_on_and_that_command_finishes(base, tmp_path, capsys,
                                                                                 monkeypatch):
    """SIGTERM (a scheduler's stop) during R1-Zero's first RL step: the step finishes and is
    saved, the command exits 143 with one line naming the checkpoint and the command that goes
    on, the stage is not marked done, and that command finishes the run."""
    step = GRPOTrainer.train_step

    def sigterm_in_step_1(self):
        if self.step == 0:
            signal.raise_signal(signal.SIGTERM)
        return step(self)
    monkeypatch.setattr(GRPOTrainer, "train_step", sigterm_in_step_1)
    out = tmp_path / "run"
    argv = ["r1", "--model", str(base), "--stages", "zero", "--out", str(out), "--level", "1",
            *(f"{k}={json.dumps(v)}" for k, v in TINY.items()), "device=\"cpu\""]
    assert main(argv) == 143
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("nanoseek: interrupted: grpo stopped at step 1 of 2; checkpoint saved in ")
    assert last.endswith("; continue with: nanoseek " + shlex.join(argv))
    assert not (out / "zero_rl" / "stage.json").exists()
    monkeypatch.setattr(GRPOTrainer, "train_step", step)
    assert main(argv) == 0
    assert [r["step"] for r in read_metrics(out / "zero_rl")] == [0, 1, 2]
    assert (out / "report.md").is_file()


def test_wilson_interval_against_its_closed_forms():
    """0 of n: [0, z²/(n + z²)]; n of n: its mirror; n/2 of n: 1/2 ± z / (2·sqrt(n + z²))."""
    z = r1_report.Z95
    for n in (10, 200):
        assert r1_report.wilson_interval(0, n) == pytest.approx((0.0, z * z / (n + z * z)), abs=1e-12)
        assert r1_report.wilson_interval(n, n) == pytest.approx((n / (n + z * z), 1.0), abs=1e-12)
        half = z / (2 * math.sqrt(n + z * z))
        assert r1_report.wilson_interval(n // 2, n) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-12)


def test_length_trend_decides_by_two_standard_errors():
    def records(first, last):  # 20 steps: quarters of 5, the middle ones at 0
        return [{"step": i + 1, "response_length": x} for i, x in enumerate(first + [0] * 10 + last)]
    grew = r1_report.length_trend(records([10, 12, 11, 11, 11], [20, 22, 21, 21, 21]))
    assert (grew["first"], grew["last"], grew["change"]) == (11.0, 21.0, 10.0)
    assert grew["se"] == pytest.approx(math.sqrt(0.5 / 5 + 0.5 / 5)) and grew["verdict"] == "grew"
    flat = r1_report.length_trend(records([10, 14, 12, 12, 12], [11, 15, 13, 13, 13]))  # 1 < 2 sqrt(2/5 + 2/5)
    assert flat["change"] == 1.0 and flat["verdict"] == "no clear change"
    assert r1_report.length_trend(records([30] * 5, [2, 4, 3, 3, 3]))["verdict"] == "shrank"
    assert r1_report.length_trend(records([1] * 4, [2] * 5)) is None  # 19 steps


def test_cli_r1_bad_inputs_are_one_line_errors(base, tmp_path, capsys):
    cases = ((["--model", str(tmp_path / "nope")], "not a checkpoint"),
             (["--model", str(base), "--stages", "zero", "--cold-start", "c.jsonl"],
              "cold-start file is for --stages full"),
             (["--model", str(base), "zero_stepz=3"], "unknown r1 field(s) zero_stepz"),
             (["--model", str(base), "eval_n=0"], "'eval_n' = 0: must be a positive integer"),
             (["--model", str(base), "grpo={\"betta\": 0}"], "unknown grpo field(s) betta"),
             (["--model", str(base), "--task", "sudoku"], "unknown task 'sudoku'"))
    for extra, message in cases:
        assert main(["r1", "--out", str(tmp_path / "run")] + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()  # nothing written before the inputs are checked
