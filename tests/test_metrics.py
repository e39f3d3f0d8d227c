"""train/metrics.py: JSONL written line by line, resume truncation, plots and their smoothed
lines, MFU, progress (a bar on a terminal, timed lines elsewhere)."""

import json
import math

import pytest
import torch

import nanoseek
from nanoseek.info import model_info
from nanoseek.train.metrics import (METRICS_FILE, MetricsLogger, ProgressBar, flatten, mfu, peak_flops,
                                    plot_metrics, plot_smoothed, progress_line, read_metrics, smoothed)


def lines(run_dir):
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def test_jsonl_flushed_per_line_nested_kept(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    log.log(1, loss=torch.tensor(2.5), lr=1e-3, maxvio={1: 0.5, 2: torch.tensor(0.25)})
    # readable before close: nothing is held in a buffer
    (rec,) = lines(tmp_path)
    assert rec["step"] == 1 and rec["loss"] == 2.5 and rec["lr"] == 1e-3
    assert rec["maxvio"] == {"1": 0.5, "2": 0.25}
    log.log(2, loss=float("nan"), skipped=True)
    assert len(lines(tmp_path)) == 2 and math.isnan(lines(tmp_path)[1]["loss"])
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert not (tmp_path / "tb").exists()
    assert flatten({"step": 1, "maxvio": {"3": 0.2}, "eval": {"loss": 2.0}}) == \
        {"step": 1, "maxvio/layer_3": 0.2, "eval/loss": 2.0}


def test_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    with MetricsLogger(tmp_path) as log:
        log.log(1, loss=3.0, maxvio={1: 0.5})
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert {"loss", "maxvio/layer_1"} <= set(acc.Tags()["scalars"])


def test_resume_truncates(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for s in range(1, 11):
            log.log(s, loss=10.0 - s)
    # explicit: resumed from a checkpoint at step 6 (steps 6.. are redone)
    with MetricsLogger(tmp_path, tensorboard=False, resume_from_step=6) as log:
        assert [r["step"] for r in lines(tmp_path)] == [1, 2, 3, 4, 5]
        for s in range(6, 9):
            log.log(s, loss=0.0)
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 9))
    # implicit: the first step logged is not past the last one in the file
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(4, loss=1.0)
        log.log(4, eval_loss=1.5)  # a second record for the same step is kept
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 4]
    # a line cut short by a kill is dropped at open, and the next line starts clean
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 5, "lo')
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(5, loss=0.5)
    assert [r["step"] for r in lines(tmp_path)] == [1, 2, 3, 4, 4, 5]


def test_plots(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for s in range(1, 31):
            extra = {"eval_loss": 6.0 - s / 10} if s % 10 == 0 else {}
            log.log(s, loss=7.0 - s / 10, main_loss=5.0 - s / 20, mtp_loss=2.0 - s / 20,
                    balance_loss=1e-4 * s, lr=1e-3 * min(s / 5, 1.0), tokens_per_s=1000.0 + s,
                    mfu=0.3, maxvio={1: 1.0 / s, 2: 0.5 / s, 3: 2.0 / s}, **extra)
    out = plot_metrics(tmp_path / METRICS_FILE, tmp_path / "plots")
    assert sorted(p.name for p in out) == ["loss.png", "lr.png", "maxvio.png", "throughput.png"]
    for p in out:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # only what was logged is drawn
    (tmp_path / "b").mkdir()
    with MetricsLogger(tmp_path / "b", tensorboard=False) as log:
        log.log(1, loss=1.0)
        log.log(2, loss=0.5)
    assert [p.name for p in plot_metrics(tmp_path / "b", tmp_path / "b")] == ["loss.png"]


def test_mfu():
    flops = model_info(nanoseek.preset("tiny"), context_length=16)["train_flops_per_token"]
    assert flops > 0
    assert mfu(1e6, flops, "NVIDIA H100 80GB HBM3") == pytest.approx(1e6 * flops / 989e12)
    assert mfu(2e6, flops, "NVIDIA H200", num_devices=2) == pytest.approx(1e6 * flops / 989e12)
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA L4") == 121e12 and peak_flops("NVIDIA L40S") == 362e12
    assert peak_flops("NVIDIA A10") == 125e12 and peak_flops("NVIDIA A10G") is None
    assert mfu(1e6, flops, "cpu") is None and mfu(1e6, flops, torch.device("cpu")) is None
    assert mfu(1e6, flops, "Some Unknown Accelerator") is None


def test_progress_line_holds_the_figures_elapsed_time_and_eta():
    # 120 steps done in 42 s by this process: the 1,880 left take 658 s at that pace
    line = progress_line("pretrain", 120, 2000, "step", {"loss": "2.1000", "tok/s": "9,500"}, 42.0, 120)
    assert line == "pretrain 120/2000 steps (6%): loss=2.1000, tok/s=9,500; 00:42 elapsed, ETA 10:58"
    # a resumed run: only the 20 steps of this process set the pace
    assert progress_line("sft", 120, 200, "step", {}, 10.0, 20).endswith("00:10 elapsed, ETA 00:40")
    assert progress_line("eval", 0, 8, "answer", {}, 0.0, 0) == "eval 0/8 answers (0%); 00:00 elapsed, ETA ?"


def test_progress_off_a_terminal_is_a_line_every_interval_and_one_at_the_end(capsys):
    with ProgressBar(10, disable=True) as bar:
        bar.update(1, loss=2.0, tokens_per_s=1e4, lr=1e-3)
    assert capsys.readouterr().err == ""
    with ProgressBar(10, initial=2, interval=3600) as bar:  # stderr is captured: not a terminal
        bar.update(3, loss=2.0, tokens_per_s=12345.0, lr=1e-3)  # the first update: a line
        bar.update(4, loss=1.5, tokens_per_s=12345.0, lr=1e-3)  # within the interval: none
        bar.update(5, loss=1.0, tokens_per_s=12345.0, lr=1e-3, reward=0.25, skipped=None)
    err = capsys.readouterr().err.splitlines()
    assert [line.split(";")[0] for line in err] == [  # then the end: a line
        "train 3/10 steps (30%): loss=2.0000, tok/s=12,345, lr=1.00e-03",
        "train 5/10 steps (50%): loss=1.0000, tok/s=12,345, lr=1.00e-03, reward=0.25"]
    with ProgressBar(4, interval=0, unit="answer", desc="eval") as bar:
        for n in range(1, 5):
            bar.update(n)
    assert [line.split(";")[0] for line in capsys.readouterr().err.splitlines()] == [
        f"eval {n}/4 answers ({25 * n}%)" for n in range(1, 5)]


def test_smoothed_is_a_debiased_moving_average():
    # weight 1/2 on each new value; the average divided by the weight gathered so far
    assert smoothed([0.0, 1.0, 1.0], 2) == pytest.approx([0.0, (0.5) / 0.75, (0.75) / 0.875], rel=1e-15, abs=0)
    assert smoothed([3.0] * 5, 4) == pytest.approx([3.0] * 5, rel=1e-15)


def test_a_long_series_is_drawn_faint_with_its_smoothed_line_over_it():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    xs, ys = list(range(1, 41)), [float(s % 3) for s in range(1, 41)]
    plot_smoothed(ax, xs, ys, "reward")
    raw, smooth = ax.get_lines()
    assert list(raw.get_ydata()) == ys and raw.get_alpha() == 0.3 and raw.get_label().startswith("_")
    assert list(smooth.get_ydata()) == smoothed(ys, 4.0) and smooth.get_label() == "reward (smoothed)"
    assert smooth.get_color() == raw.get_color()
    fig, ax = plt.subplots()
    plot_smoothed(ax, xs[:10], ys[:10], "reward")  # too few points to average: drawn as they are
    [line] = ax.get_lines()
    assert list(line.get_ydata()) == ys[:10] and line.get_label() == "reward"
    plt.close("all")
