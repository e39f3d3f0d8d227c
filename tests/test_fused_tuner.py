"""benchmarks/fused_decode.py's launch search (tune): coordinate descent over its candidates, with
step times stubbed (the real ones need a GPU), a time budget, and the best kept as it improves."""

import importlib.util
import sys
from pathlib import Path

from nanoseek import preset

REPO = Path(__file__).resolve().parents[1]


def load():
    sys.path.insert(0, str(REPO / "benchmarks"))  # fused_decode imports its siblings
    spec = importlib.util.spec_from_file_location("fused_decode", REPO / "benchmarks" / "fused_decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Cache:
    max_len = 640


class Model:
    config = preset("deepseek-v2-lite")


def test_tune_keeps_each_best_and_stops_at_its_budget(monkeypatch):
    """Steps time 100 µs less a µs per up row and 5 µs with PDL off: the search takes 64 up rows
    (its rule's warps for them), then PDL off; every new best is handed to keep, in order. With a
    budget spent before the first knob only the rule's launch is timed and kept; past a budget
    mid-knob no further trial starts. A launch that fails to build is skipped."""
    fd = load()
    clock = iter(range(1000))
    monkeypatch.setattr(fd.time, "monotonic", lambda: next(clock))  # a second per call

    def step_us(model, cache, launch, prompt):
        if launch["up_rows"] == 32 and not launch["up_dot"]:
            raise RuntimeError("does not compile")
        return 100.0 - launch["up_rows"] - 5 * (not launch["pdl"])
    monkeypatch.setattr(fd, "fused_step_us", step_us)
    monkeypatch.setattr(fd, "CANDIDATES", {"up_rows": [2, 4, 32, 64], "pdl": [True, False]})
    kept = []
    best, path = fd.tune(Model(), Cache(), 512, 1, keep=lambda b: kept.append(dict(b)))
    rule = fd.fused_module.fused_step_launch(Model.config, 640)
    assert (best["up_rows"], best["pdl"]) == (64, False)
    assert best["up_warps"] == fd.fused_module.fused_step_launch(Model.config, 640, {"up_rows": 64})["up_warps"]
    assert [(k["up_rows"], k["pdl"]) for k in kept] == [(rule["up_rows"], True)] + [
        (r, True) for r in (4, 64) if r > rule["up_rows"]] + [(64, False)]
    assert path[0]["us_per_step"] == 100.0 - rule["up_rows"] and len(path) == 1 + 2 + 1  # 32 rows failed
    kept.clear()
    best, path = fd.tune(Model(), Cache(), 512, 1, budget=0, keep=kept.append)
    assert best == rule and kept == [rule] and len(path) == 1
    best, path = fd.tune(Model(), Cache(), 512, 1, budget=3)  # the start, then one trial (4 rows)
    assert len(path) == 2
