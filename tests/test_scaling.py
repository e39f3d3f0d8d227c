"""benchmarks/scaling.py: its CPU smoke run (gloo, tiny preset, 1 and 2 processes) writes a result
file of the stated structure whose two-process losses are the one-process run's; and the
all-to-all overlap it reports is the measure of intervals it claims."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

REPO = Path(__file__).resolve().parents[1]
LOSS_TOL = 1e-5   # tests/test_parallel_train.py's float32 tolerance between layouts


def load_scaling():
    spec = importlib.util.spec_from_file_location("scaling", REPO / "benchmarks" / "scaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def event(name, start, end, device=DeviceType.CPU, parent=None):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), device_type=device,
                           cpu_parent=parent)


def test_all_to_all_overlap_is_the_measure_of_intervals():
    scaling = load_scaling()
    a2a = event("gloo:all_to_all", 10, 30)
    events = [a2a, event("aten::mm", 0, 15), event("aten::add", 12, 20),   # [0, 20) overlaps [10, 20)
              event("aten::copy_", 25, 28, parent=a2a),                     # inside the op: not compute
              event("c10d::alltoall_base_", 40, 50), event("aten::mm", 45, 60)]
    out = scaling.all_to_all_overlap(events, cuda=False, steps=2)
    assert out["ms_per_step"] == (20 + 10) / 2 / 1e3
    assert out["overlap_ms_per_step"] == (10 + 5) / 2 / 1e3
    assert out["overlap_fraction"] == 15 / 30

    cuda = [event("ncclDevKernel_SendRecv", 0, 10, DeviceType.CUDA), event("gemm", 5, 20, DeviceType.CUDA),
            event("ncclDevKernel_AllGather_RING", 8, 30, DeviceType.CUDA), event("aten::mm", 0, 100)]
    out = scaling.all_to_all_overlap(cuda, cuda=True, steps=1)
    assert (out["ms_per_step"], out["overlap_fraction"]) == (10 / 1e3, 0.5)


def test_a_batch_dualpipev_cannot_split_is_one_line(capsys):
    with pytest.raises(SystemExit):
        load_scaling().parse(["--device", "cpu", "--smoke", "--batch-per-gpu", "6"])
    assert "--batch-per-gpu 6: must be a multiple of 4" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.multigpu
def test_the_cpu_smoke_run_writes_two_process_losses_equal_to_one_process(tmp_path):
    result_file = tmp_path / "scaling_cpu_smoke.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, "benchmarks/scaling.py", "--device", "cpu", "--smoke", "--json",
                           str(result_file), "--runs", str(tmp_path / "runs")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(result_file.read_text())
    assert result["complete"] and result["label"].startswith("CPU smoke test")
    assert result["settings"]["gpus"] == [1, 2] and result["settings"]["precision"] == "fp32"
    assert set(result["one_process"]) == {"1", "2"}
    steps = result["settings"]["steps"]
    assert all(len(r["losses"]) == steps for r in result["one_process"].values())
    assert [(r["config"], r["n"]) for r in result["runs"]] == [
        ("DP", 2), ("EP", 2), ("EP+DP", 2), ("PP 1F1B", 2), ("PP DualPipeV", 2)]
    for run in result["runs"]:
        assert run["ok"], run.get("error")
        assert run["global_batch"] == 2 * result["settings"]["batch_per_gpu"]
        assert run["tokens_per_s_per_gpu"] == run["tokens_per_s"] / 2 > 0
        assert run["efficiency"] > 0 and run["peak_memory_bytes"] > 0
        losses = run["loss_vs_one_process"]
        assert losses["steps"] == steps and losses["within"] and losses["max_abs_diff"] <= LOSS_TOL
        assert max(abs(a - b) for a, b in zip(run["losses"], result["one_process"]["2"]["losses"])) <= LOSS_TOL
        assert ("bubble" in run) == run["config"].startswith("PP")
        assert ("all_to_all" in run) == run["config"].startswith("EP")
    assert all(0 <= r["all_to_all"]["overlap_fraction"] <= 1 for r in result["runs"] if "all_to_all" in r)
    assert (tmp_path / "plots" / "scaling_cpu_smoke.png").stat().st_size > 0
