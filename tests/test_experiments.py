"""`nanoseek experiment`: the CLI's listing and argument errors, the verdict rule, the width
search and the routing statistics (default tier); then each claim's experiment end to end at
a tiny scale (slow tier), asserting what must hold whatever the models learned."""

import json
import math

import pytest
import torch

from nanoseek.cli import main
from nanoseek.config import ModelConfig
from nanoseek.experiments import EXPERIMENTS
from nanoseek.experiments.routing import domain_shares, global_maxvio, specialization_bits
from nanoseek.experiments.runner import Bound, Compare, run_experiment, summarize, verdict
from nanoseek.experiments.scale import DOMAINS, SCALES, mla_trunk, v3_moe
from nanoseek.experiments.sizing import check_equal, fit_width
from nanoseek.info import model_info

TINY = SCALES["cpu"].replace(
    name="test", trunk=mla_trunk(300, 32, 1, 4, 8, q_lora_rank=24, intermediate_size=64), moe=v3_moe(8, 16, 2, 2, 1),
    gshard_width=128, batch_size=2, seq_len=32, warmup=1, docs_per_domain=40, heldout_docs_per_domain=8,
    heldout_rows=4, eval_problems=2, eval_max_tokens=8, decode_prompts=2, decode_tokens=6, steps=3)
SEEDS = [0, 1]

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# ---------------------------------------------------------------------------- the README
def test_readme_shows_the_codes_caveat_and_the_runs_own_conditions(tmp_path):
    """write_readme over committed results: the CPU mtp run gets the experiment's caveat, the
    GPU mtp run its own run_note (it shared the GPU), both in that claim's section."""
    import shutil
    from pathlib import Path
    from nanoseek.experiments.mtp import EXPERIMENT
    from nanoseek.experiments.report import write_readme
    claims = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "claims"
    for scale in ("gpu", "cpu"):
        shutil.copytree(claims / scale / "mtp", tmp_path / scale / "mtp")
    run_note = json.loads((tmp_path / "gpu" / "mtp" / "result.json").read_text())["run_note"]
    text = write_readme(tmp_path).read_text()
    section = text[text.index("## Claim 4"):text.index("## Claim 5")]
    assert f"*{run_note}*" in section and f"*{EXPERIMENT.notes['cpu']}*" in section
    assert "Not run yet." in text[text.index("## Claim 1"):text.index("## Claim 2")]


# ---------------------------------------------------------------------------- the CLI
def test_cli_lists_the_experiments_and_refuses_bad_arguments(capsys):
    assert main(["experiment", "--help"]) == 0
    listing = capsys.readouterr().out
    for name in EXPERIMENTS:
        assert f"  {name} " in listing
    bad = [(["experiment", "nope"], "invalid choice: 'nope'"),
           (["experiment", "moe", "--seeds", "0"], "argument --seeds: must be positive, got 0"),
           (["experiment", "moe", "--budget-minutes", "-1"], "--budget-minutes must be positive, got -1"),
           (["experiment", "moe", "--device", "tpu"], "invalid choice: 'tpu'")]
    if not torch.cuda.is_available():
        bad.append((["experiment", "moe", "--device", "cuda"], "device 'cuda' asked for, but this torch build sees no CUDA"))
    for argv, message in bad:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("nanoseek: error: ") and message in err and err.count("\n") == 1, err


# ---------------------------------------------------------------------------- verdicts
def test_verdict_needs_a_gap_beyond_the_seeds_range_and_binomial_noise():
    runs = [{"arm": "a", "seed": s, "loss": v, "acc": acc, "n": 50}
            for s, (v, acc) in enumerate([(1.00, 0.02), (1.02, 0.02)])]
    runs += [{"arm": "b", "seed": s, "loss": v, "acc": 0.0, "n": 50} for s, v in enumerate([1.10, 1.11])]
    summary = summarize(runs)
    assert summary["a"]["loss"]["values"] == [1.0, 1.02] and summary["a"]["loss"]["mean"] == pytest.approx(1.01)
    assert verdict(Compare("a beats b", "loss", "a", "b", "p"), summary)["verdict"] == "supports"
    assert verdict(Compare("b beats a", "loss", "b", "a", "p"), summary)["verdict"] == "contradicts"
    summary["b"]["loss"].update(min=1.0, max=1.2)  # a range of 0.2 > the gap of 0.095
    assert verdict(Compare("a beats b", "loss", "a", "b", "p"), summary)["verdict"] == "inconclusive"
    # 1 of 50 right in both seeds against 0: ranges are 0, but 2·sqrt(0.01·0.99/50) = 0.028 > 0.02
    acc = Compare("a more accurate", "acc", "a", "b", "p", lower_is_better=False)
    assert verdict(acc, summary)["verdict"] == "supports"
    acc.trials = "n"
    assert verdict(acc, summary)["verdict"] == "inconclusive"
    level = verdict(Bound("a's loss in [1.05, 2]", "loss", "a", 1.05, 2.0, "p"), summary)
    assert level["verdict"] == "below" and level["ours"] == pytest.approx(1.01) and level["spread"] == pytest.approx(0.02)


def test_fit_width_finds_the_closest_count_and_check_equal_holds_the_tolerance():
    base = ModelConfig(**TINY.trunk)
    target = model_info(base, 32)["total_params"] + 10_000
    fitted = fit_width(base, "intermediate_size", "total_params", target, 32)
    width = fitted.intermediate_size

    def total(w):
        return model_info(base.replace(intermediate_size=w), 32)["total_params"]
    assert width % 8 == 0  # widths move in steps of 8
    assert abs(total(width) - target) <= min(abs(total(width - 8) - target), abs(total(width + 8) - target))
    per_step = 8 * 3 * base.hidden_size * base.num_hidden_layers  # gate, up and down rows of 8 FFN units
    assert total(width + 8) - total(width) == per_step and abs(total(width) - target) <= per_step / 2
    rows = {"a": {"total_params": 100}, "b": {"total_params": 97}}
    assert check_equal(rows, "total_params", ("a", "b"), 0.05) == pytest.approx(0.03)
    with pytest.raises(ValueError, match=r"total_params of a, b differ by 3.0% \(> 2%\)"):
        check_equal(rows, "total_params", ("a", "b"), 0.02)


def test_routing_statistics_by_hand():
    # layer 0: 4 experts, loads 6, 2, 0, 0 -> mean 2, MaxVio (6 - 2) / 2 = 2; layer 1 even -> 0
    counts = {0: torch.tensor([6, 2, 0, 0]), 1: torch.tensor([2, 2, 2, 2])}
    assert global_maxvio(counts) == pytest.approx(1.0)
    # two domains on disjoint experts: I = 1 bit; the same loads: 0 bits
    shares = domain_shares({"x": {0: torch.tensor([5, 5, 0, 0])}, "y": {0: torch.tensor([0, 0, 3, 1])}})
    assert shares[0].tolist() == [[0.5, 0.5, 0, 0], [0, 0, 0.75, 0.25]]
    assert specialization_bits(shares[0]) == pytest.approx(1.0)
    assert specialization_bits(torch.tensor([[0.25, 0.75], [0.25, 0.75]], dtype=torch.float64)) == pytest.approx(0.0)
    # partly shared: p(e|x) = (1, 0), p(e|y) = (1/2, 1/2), p(e) = (3/4, 1/4)
    # I = 1/2·log2(4/3) + 1/2·(1/2·log2(2/3) + 1/2·log2(2)) = 0.311278 bits
    partial = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    assert specialization_bits(partial) == pytest.approx(0.5 * math.log2(4 / 3) + 0.25 * math.log2(2 / 3) + 0.25)


# ---------------------------------------------------------------------------- the experiments, tiny
def run_tiny(name, out):
    from importlib import import_module
    exp = import_module(f"nanoseek.experiments.{name}").EXPERIMENT
    result = run_experiment(exp, TINY, SEEDS, 1.0, "cpu", out)
    folder = out / "test" / name
    on_disk = json.loads((folder / "result.json").read_text())
    assert on_disk["runs"] == json.loads(json.dumps(result["runs"]))
    assert len(result["runs"]) == len(result["arms"]) * len(SEEDS)
    assert {r["seed"] for r in result["runs"]} == set(SEEDS)
    for run in result["runs"]:  # equal tokens: every run the same steps
        assert run["curve"]["step"][-1] == TINY.steps and math.isfinite(run["val_loss"]) and run["val_loss"] > 0
        assert all(math.isfinite(x) for x in run["curve"]["main_loss"])
    assert result["scale"]["tokens_per_run"] == TINY.steps * TINY.batch_size * TINY.seq_len
    for image in result["files"]:
        assert (folder / image).stat().st_size > 10_000
    table = (folder / "table.md").read_text()
    assert all(f"| {arm['name']} |" in table for arm in result["arms"])
    assert len(result["verdicts"]) == len(exp.checks)
    assert all(v["verdict"].split()[0] in ("supports", "contradicts", "inconclusive", "within", "below", "above")
               for v in result["verdicts"])
    readme = (out / "README.md").read_text()
    assert f"## Claim {exp.claim}: {exp.title}" in readme and f"test/{name}/result.json" in readme
    for gap in result["equalities"]:
        figures = [next(a for a in result["arms"] if a["name"] == n)[gap["metric"]] for n in gap["arms"]]
        assert (max(figures) - min(figures)) / max(figures) == pytest.approx(gap["gap"]) and gap["gap"] <= exp.tolerance
    return result


def arm(result, name):
    return next(a for a in result["arms"] if a["name"] == name)


@pytest.mark.slow
def test_moe_experiment_tiny(tmp_path):
    result = run_tiny("moe", tmp_path)
    fine, gshard, dense = arm(result, "deepseekmoe"), arm(result, "gshard"), arm(result, "dense")
    assert (fine["config"]["n_routed_experts"], fine["config"]["num_experts_per_tok"],
            fine["config"]["n_shared_experts"]) == (63, 7, 1)
    assert (gshard["config"]["n_routed_experts"], gshard["config"]["num_experts_per_tok"],
            gshard["config"]["n_shared_experts"]) == (16, 2, 0)
    assert dense["config"]["n_routed_experts"] == 0
    assert abs(fine["total_params"] - gshard["total_params"]) / gshard["total_params"] <= 0.05
    activated = [fine["activated_params"], gshard["activated_params"], dense["activated_params"]]
    assert (max(activated) - min(activated)) / max(activated) <= 0.05
    for r in result["runs"]:  # the pooled accuracy is the mean of the three levels' own
        levels = [r[f"accuracy_L{level}"] for level in (1, 3, 5)]
        assert r["accuracy"] == pytest.approx(sum(levels) / 3) and r["accuracy_problems"] == 3 * TINY.eval_problems
        assert all(0 <= a <= 1 and round(a * TINY.eval_problems, 9).is_integer() for a in levels)


@pytest.mark.slow
def test_balancing_experiment_tiny(tmp_path):
    result = run_tiny("balancing", tmp_path)
    balancing = {a["name"]: (a["config"]["bias_update_speed"], a["config"]["aux_loss_alpha"], a["config"]["seq_aux"])
                 for a in result["arms"]}
    assert balancing == {"loss-free": (0.001, 0.0, True), "aux-seq-0.01": (0.0, 0.01, True),
                         "aux-seq-0.001": (0.0, 0.001, True), "aux-batch-0.001": (0.0, 0.001, False),
                         "none": (0.0, 0.0, True)}
    assert len({a["total_params"] for a in result["arms"]}) == 1  # one architecture
    worst = TINY.moe["n_routed_experts"] / TINY.moe["num_experts_per_tok"] - 1  # every slot on K experts
    for run in result["runs"]:
        assert 0 <= run["maxvio_global"] <= worst and 0 <= run["maxvio_batch"] <= worst


@pytest.mark.slow
def test_attention_experiment_tiny(tmp_path):
    result = run_tiny("attention", tmp_path)
    L, H, d_h = TINY.trunk["num_hidden_layers"], TINY.trunk["num_attention_heads"], TINY.trunk["head_dim"]
    expected = {"mla": (4 * d_h + d_h // 2) * L * 2, "mha": 2 * H * d_h * L * 2, "gqa": 2 * 2 * d_h * L * 2}
    for run in result["runs"]:
        assert run["kv_bytes"] == expected[run["arm"]] == arm(result, run["arm"])["kv_cache_bytes_per_token"]
        assert run["gqa_groups"] == {"mla": 2.25, "mha": H, "gqa": 2}[run["arm"]]
    totals = [a["total_params"] for a in result["arms"]]
    assert (max(totals) - min(totals)) / max(totals) <= 0.02
    assert {a["config"]["attention_type"] for a in result["arms"]} == {"mla", "mha", "gqa"}


@pytest.mark.slow
def test_mtp_experiment_tiny(tmp_path):
    result = run_tiny("mtp", tmp_path)
    assert arm(result, "mtp")["mtp_params"] > 0 == arm(result, "no-mtp")["mtp_params"]
    assert arm(result, "mtp")["activated_params"] == arm(result, "no-mtp")["activated_params"]
    for run in result["runs"]:
        if run["arm"] == "mtp":
            assert run["identical"] is True  # greedy speculation returns plain greedy decoding's tokens
            assert 0 <= run["acceptance"] <= 1 and run["speedup"] > 0
            # one draft per forward: tokens per forward = 1 + accepted / forwards = 1 + acceptance
            assert run["tokens_per_forward"] == pytest.approx(1 + run["acceptance"])
        else:
            assert "acceptance" not in run


@pytest.mark.slow
def test_specialization_experiment_tiny(tmp_path):
    result = run_tiny("specialization", tmp_path)
    assert result["files"] == ["specialization.png", "specialization_heatmap.png"]
    assert result["domains"] == list(DOMAINS)
    for run in result["runs"]:
        assert 0 <= run["specialization"] <= math.log2(len(DOMAINS))
        for shares in run["domain_shares"].values():
            assert len(shares) == len(DOMAINS)
            assert all(len(row) == TINY.moe["n_routed_experts"] and sum(row) == pytest.approx(1) for row in shares)


@pytest.mark.slow
def test_fp8_experiment_tiny(tmp_path):
    result = run_tiny("fp8", tmp_path)
    assert {a["name"]: a["train"]["precision"] for a in result["arms"]} == {"fp8": "fp8", "baseline": "fp32"}
    errors = result["summary"]["fp8"]
    assert len(errors["rel_error_train"]["values"]) == len(SEEDS)
    # same seed, same data: a zero gap would mean the FP8 GEMMs were never swapped in
    assert all(0 < e < 1 for e in errors["rel_error_train"]["values"] + errors["rel_error_heldout"]["values"])
