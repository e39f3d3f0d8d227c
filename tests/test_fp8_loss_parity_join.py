"""benchmarks/fp8_loss_parity.py --join: FP8's final loss against BF16's, read against the
widest gap between BF16 runs (other seeds, or the same seed again)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETTING = {"preset": "small", "layers": None, "steps": 4, "batch": 8, "seq": 256, "lr": 2e-3,
           "data": "builtin:arithmetic", "tail": 2, "tokens": 8192}


def write(tmp: Path, name: str, precision: str, seed: int, losses: list[float]) -> Path:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps({**SETTING, "name": "fp8_loss_parity", "precision": precision, "seed": seed,
                                "curve": [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]}))
    return path


def join(tmp: Path, *paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "fp8_loss_parity.py"), "--join", *map(str, paths)],
                          capture_output=True, text=True, env={**os.environ, "OUT": str(tmp / "out"), "MPLBACKEND": "Agg"}, cwd=REPO)


def test_join_reads_fp8s_gap_against_the_widest_gap_between_bf16_runs(tmp_path):
    # tails (last 2 steps): bf16 1.0, fp8 0.99, bf16 seed 1 1.02, bf16 seed 0 again 0.97
    bf16 = write(tmp_path, "bf16", "bf16", 0, [5.0, 3.0, 1.1, 0.9])
    fp8 = write(tmp_path, "fp8", "fp8", 0, [5.0, 3.0, 1.0, 0.98])
    seed1 = write(tmp_path, "seed1", "bf16", 1, [5.0, 3.0, 1.0, 1.04])
    again = write(tmp_path, "again", "bf16", 0, [5.0, 3.0, 0.96, 0.98])
    done = join(tmp_path, bf16, fp8, seed1, again)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "out" / "fp8_loss_parity.json").read_text())
    assert result["final_loss"] == pytest.approx(
        {"bf16": 1.0, "fp8": 0.99, "bf16 seed 1": 1.02, "bf16 seed 0 rerun": 0.97}, abs=1e-12)
    assert result["relative_difference"] == pytest.approx(-0.01, abs=1e-12)
    assert result["bf16_spread"] == pytest.approx({"bf16 seed 1": 0.02, "bf16 seed 0 rerun": -0.03}, abs=1e-12)
    assert result["widest_bf16_gap"] == pytest.approx(0.05, abs=1e-12)  # seed 1 (+2%) against the rerun (-3%)
    assert result["within_bf16_spread"] is True and result["within_v3_claim"] is False
    assert (tmp_path / "out" / "fp8_loss_parity.png").stat().st_size > 0

    # yardsticks all below the reference: the widest gap still counts the reference (0 to -3%)
    below = write(tmp_path, "below", "bf16", 2, [5.0, 3.0, 0.98, 0.98])
    assert join(tmp_path, bf16, fp8, below, again).returncode == 0
    result = json.loads((tmp_path / "out" / "fp8_loss_parity.json").read_text())
    assert result["widest_bf16_gap"] == pytest.approx(0.03, abs=1e-12) and result["within_bf16_spread"] is True

    # one yardstick, closer than FP8: FP8's gap is beyond it
    close = write(tmp_path, "close", "bf16", 1, [5.0, 3.0, 1.0, 1.0])
    assert join(tmp_path, bf16, fp8, close).returncode == 0
    result = json.loads((tmp_path / "out" / "fp8_loss_parity.json").read_text())
    assert result["widest_bf16_gap"] == 0.0 and result["within_bf16_spread"] is False


def test_join_refuses_runs_that_do_not_pair(tmp_path):
    bf16 = write(tmp_path, "bf16", "bf16", 0, [1.0, 1.0])
    fp8_other_seed = write(tmp_path, "fp8", "fp8", 1, [1.0, 1.0])
    done = join(tmp_path, bf16, fp8_other_seed)
    assert done.returncode != 0 and "same setting" in done.stderr and "seed" in done.stderr
    fp8 = write(tmp_path, "fp8_0", "fp8", 0, [1.0, 1.0])
    done = join(tmp_path, fp8, bf16)  # the order is BF16 first, then FP8
    assert done.returncode != 0 and "--join takes a bf16 and an fp8 run" in done.stderr
