"""nanoseek.parallel on the CPU with gloo: FSDP2, expert parallelism (all-to-all), pipelines
(1F1B, DualPipeV), their combinations, and distributed checkpoints, each against one process
running the same global batch.

Processes are spawned by torch.multiprocessing; a worker runs several layouts in a row (each
with its own DeviceMesh) and writes what it measured to a JSON file that the test reads.

Tolerances. Losses: the issue's 1e-5 (float32). Gradients: 1e-5 as well, absolute, since the
step clips them to a global norm of 1. Weights: the steps here are plain SGD, so that a weight
moves by exactly lr·g and may differ by at most steps·lr·1e-5 (Adam would divide near-zero
gradients by their own size and turn rounding into lr-sized moves). Expert loads are integer
counts: MaxVio and the balance bias (±γ per step) must be equal exactly.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from nanoseek import Transformer, preset
from nanoseek.hf import from_pretrained, save_pretrained
from nanoseek.parallel.checkpoint import load_distributed, load_full_model, save_distributed
from nanoseek.parallel.expert_parallel import ranks_per_token
from nanoseek.parallel.mesh import ParallelConfig, ParallelError, build_mesh
from nanoseek.parallel.parallelize import parallelize
from nanoseek.parallel.stage import ModelStage, denominators, split_layers
from nanoseek.parallel.step import clip_grad_norm, parallel_train_step
from nanoseek.train.optim import build_optimizer
from nanoseek.train.step import train_step

LOSS_TOL = GRAD_TOL = 1e-5
LR, STEPS, BATCH, SEQ = 1e-2, 3, 8, 16
FIELDS = ("loss", "main_loss", "mtp_loss", "balance_loss", "grad_norm")


# ---------------------------------------------------------------------- shared by the workers
def batches(n: int = STEPS, rows: int = BATCH) -> list[dict]:
    """Random tokens with a third of the labels ignored, so that ranks count different tokens."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 1024, (rows, SEQ), generator=g)
        labels = ids.where(torch.rand(rows, SEQ, generator=g) > 0.3, -100)
        out.append({"input_ids": ids, "labels": labels})
    return out


def fresh_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny"))


def reference() -> dict:
    """One process on the global batches: per-step stats, first-step gradients, final weights."""
    model = fresh_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    first = batches()[0]
    model(first["input_ids"], labels=first["labels"]).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.zero_grad(set_to_none=True)
    for r in model.routers().values():      # drop the loads this extra forward counted
        r.load.zero_()
    stats = [train_step(model, [b], opt, 1.0) for b in batches()]
    return {"stats": stats, "grads": grads, "state": model.state_dict()}


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def my_rows(batch: dict, mesh, dp: int) -> dict:
    r, b = mesh.dp.get_local_rank(), len(batch["input_ids"]) // dp
    return {k: v[r * b:(r + 1) * b] for k, v in batch.items()}


def compare_layout(cfg: ParallelConfig, ref: dict) -> dict:
    """Largest differences from the one-process reference of a layout's first-step gradients,
    per-step stats and final weights, and whether MaxVio and the bias matched exactly."""
    mesh = build_mesh(cfg)
    pm = parallelize(fresh_model(), cfg, mesh, torch.device("cpu"))
    opt = torch.optim.SGD(pm.view.parameters(), lr=LR)
    data = [my_rows(b, mesh, cfg.dp) for b in batches()]
    # first step's gradients, clipped as the step clips them
    for stage in pm.stages:
        den = denominators(data[0]["labels"], pm.config.num_nextn_predict_layers)
        dist.all_reduce(den, group=mesh.dp.get_group())
        stage.set_denominators(den.float())
    pm.forward_backward(data[0]["input_ids"], data[0]["labels"])
    clip_grad_norm(pm.view.parameters(), 1.0, mesh)
    grad_diff = max((full(p.grad) - ref["grads"][n]).abs().max().item()
                    for n, p in pm.view.named_parameters())
    opt.zero_grad(set_to_none=True)
    for r in pm.routers().values():
        r.load.zero_()

    stats = [parallel_train_step(pm, mesh, [b], opt, 1.0) for b in data]
    stat_diff = max(abs(s[k] - t[k]) for s, t in zip(stats, ref["stats"]) for k in FIELDS)
    weight_diff, buffers_equal = 0.0, True
    for name, t in pm.view.state_dict().items():
        t = full(t)
        if name.endswith("e_score_correction_bias"):
            buffers_equal &= torch.equal(t, ref["state"][name])
        else:
            weight_diff = max(weight_diff, (t - ref["state"][name]).abs().max().item())
    maxvio_equal = all(s["maxvio"] == t["maxvio"] for s, t in zip(stats, ref["stats"]))
    return {"grad": grad_diff, "stats": stat_diff, "weights": weight_diff,
            "bias_equal": buffers_equal, "maxvio_equal": maxvio_equal}


def dcp_run(run_dir: Path, cfg: ParallelConfig) -> list[float]:
    """AdamW steps 1-3 of a layout, saving a distributed checkpoint after step 1; returns the
    losses of steps 2 and 3."""
    mesh = build_mesh(cfg)
    pm = parallelize(fresh_model(), cfg, mesh, torch.device("cpu"))
    opt = build_optimizer(pm.view, LR)
    losses = []
    for step, batch in enumerate(batches(), start=1):
        losses.append(parallel_train_step(pm, mesh, [my_rows(batch, mesh, cfg.dp)], opt, 1.0)["loss"])
        if step == 1:
            save_distributed(run_dir, step, pm.view, opt, pm.config, {"step": step, "stage": "test"})
    return losses[1:]


def worker(rank: int, world: int, init_file: str, out_dir: str, layouts: dict, dcp_layout: dict | None):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ref = reference()
        results = {name: compare_layout(ParallelConfig(**kw), ref) for name, kw in layouts.items()}
        if dcp_layout is not None:
            results["dcp_losses"] = dcp_run(Path(out_dir) / "run", ParallelConfig(**dcp_layout))
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def spawn(tmp_path: Path, world: int, layouts: dict, dcp_layout: dict | None = None) -> list[dict]:
    mp.spawn(worker, args=(world, str(tmp_path / "pg"), str(tmp_path), layouts, dcp_layout), nprocs=world)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def check_layouts(results: list[dict], layouts: dict) -> None:
    for rank, res in enumerate(results):
        for name in layouts:
            got = res[name]
            where = f"{name} on rank {rank}: {got}"
            assert got["grad"] <= GRAD_TOL, where
            assert got["stats"] <= LOSS_TOL, where
            assert got["weights"] <= STEPS * LR * GRAD_TOL, where
            assert got["bias_equal"] and got["maxvio_equal"], where


# ---------------------------------------------------------------------- 2 processes
TWO_RANK_LAYOUTS = {
    "fsdp": {"dp": 2},
    "ep": {"dp": 2, "ep": 2, "fsdp": False},
    "ep+fsdp": {"dp": 2, "ep": 2},
    "pp-1f1b": {"pp": 2},
    "pp-dualpipev": {"pp": 2, "schedule": "dualpipev"},
}
DCP_LAYOUT = {"dp": 2, "ep": 2}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_ranks")
    return tmp, spawn(tmp, 2, TWO_RANK_LAYOUTS, DCP_LAYOUT)


def test_every_layout_on_two_ranks_matches_one_process(two_ranks):
    """FSDP, EP, EP+FSDP, 1F1B and DualPipeV: same gradients, losses, weights and bias."""
    _, results = two_ranks
    check_layouts(results, TWO_RANK_LAYOUTS)


def test_a_two_rank_checkpoint_resumes_in_one_process(two_ranks):
    """The distributed checkpoint after step 1 (EP+FSDP on two ranks) loads into one plain
    process, which continues with the losses the two ranks had."""
    tmp, results = two_ranks
    cfg = ParallelConfig()
    pm = parallelize(fresh_model(), cfg, None, torch.device("cpu"))
    opt = build_optimizer(pm.view, LR)
    state = load_distributed(tmp / "run", pm.view, opt, stage="test")
    assert state["step"] == 1
    got = [parallel_train_step(pm, None, [b], opt, 1.0)["loss"] for b in batches()[1:]]
    want = results[0]["dcp_losses"]
    assert max(abs(a - b) for a, b in zip(got, want)) <= LOSS_TOL, (got, want)


def test_a_distributed_checkpoint_exports_to_the_hf_layout(two_ranks, tmp_path):
    tmp, _ = two_ranks
    model = load_full_model(tmp / "run")
    save_pretrained(model, tmp_path / "hf")
    again = from_pretrained(tmp_path / "hf")
    want = model.state_dict()
    assert again.state_dict().keys() == want.keys()
    assert all(torch.equal(again.state_dict()[k], want[k]) for k in want)
    plain = parallelize(fresh_model(), ParallelConfig(), None, torch.device("cpu"))
    load_distributed(tmp / "run", plain.view, None, restore_rng_states=False)
    assert all(torch.equal(t, want[k]) for k, t in plain.view.state_dict().items())


# ---------------------------------------------------------------------- 4 processes
FOUR_RANK_LAYOUTS = {
    "ep2+fsdp4": {"dp": 4, "ep": 2},                       # experts also FSDP-sharded in pairs
    "pp2-1f1b+fsdp2": {"dp": 2, "pp": 2, "microbatches": 4},
    "pp2-dualpipev+ep2+fsdp2": {"dp": 2, "ep": 2, "pp": 2, "schedule": "dualpipev", "microbatches": 4},
}


@pytest.mark.slow
@pytest.mark.multigpu
def test_every_layout_on_four_ranks_matches_one_process(tmp_path):
    check_layouts(spawn(tmp_path, 4, FOUR_RANK_LAYOUTS), FOUR_RANK_LAYOUTS)


def overlap_worker(rank: int, world: int, init_file: str, out_dir: str):
    """DualPipeV with EP over 4 ranks, its pairs run in turn, overlapped, and as by default (on
    the CPU: in turn): two steps each from the same model (7 layers, so that the stages hold 1-2
    MoE layers), same batches."""
    from nanoseek.parallel import overlap
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        data = batches(2, rows=16)
        out = {}
        for overlapped in (False, True, None):      # None: the default, on GPUs only
            cfg = ParallelConfig(dp=2, ep=2, pp=2, schedule="dualpipev", microbatches=8, overlap=overlapped)
            mesh = build_mesh(cfg)
            torch.manual_seed(0)
            pm = parallelize(Transformer(preset("tiny", num_hidden_layers=7)), cfg, mesh, torch.device("cpu"))
            opt = torch.optim.SGD(pm.view.parameters(), lr=LR)
            held = sum(overlap.TURNS.held.values())
            losses = [parallel_train_step(pm, mesh, [my_rows(b, mesh, 2)], opt, 1.0)["loss"] for b in data]
            out[str(overlapped)] = {"losses": losses, "meetings": sum(overlap.TURNS.held.values()) - held}
            torch.save({k: full(t) for k, t in pm.view.state_dict().items()}, Path(out_dir) / f"rank{rank}_{overlapped}.pt")
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


@pytest.mark.multigpu
def test_dualpipev_overlapping_ep_all_to_alls_trains_bit_for_bit_as_in_turn(tmp_path):
    """The overlapped pairs (parallel/overlap.py) take turns at every rank's MoE layers and
    give the very same losses and weights as the pairs run one after the other."""
    mp.spawn(overlap_worker, args=(4, str(tmp_path / "pg"), str(tmp_path)), nprocs=4)
    for rank in range(4):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["True"]["losses"] == got["False"]["losses"], rank
        assert got["False"]["meetings"] == 0 and got["True"]["meetings"] > 0, (rank, got)
        assert got["None"]["meetings"] == 0 and got["None"]["losses"] == got["False"]["losses"]  # CPU
        in_turn, overlapped = (torch.load(tmp_path / f"rank{rank}_{o}.pt") for o in (False, True))
        assert in_turn.keys() == overlapped.keys()
        assert all(torch.equal(in_turn[k], overlapped[k]) for k in in_turn), rank


# ---------------------------------------------------------------------- one process
def test_split_layers_puts_mtp_on_the_last_stage():
    assert split_layers(3, 1, 2) == [range(0, 2), range(2, 3)]
    assert split_layers(3, 1, 4) == [range(0, 1), range(1, 2), range(2, 3), range(3, 3)]
    assert split_layers(61, 1, 8) == [range(0, 8), range(8, 16), range(16, 24), range(24, 32),
                                      range(32, 40), range(40, 48), range(48, 55), range(55, 61)]
    with pytest.raises(ParallelError, match="lower --pp"):
        split_layers(3, 1, 5)


def test_one_stage_loss_is_the_model_loss_term_by_term():
    model = fresh_model()
    batch = batches(1)[0]
    want = model(batch["input_ids"], labels=batch["labels"])
    stage = ModelStage(model, range(model.config.num_hidden_layers), 0, 1)
    stage.set_denominators(denominators(batch["labels"], 1).float())
    stage.loss(stage(batch["input_ids"]), batch["labels"])
    main, mtp, balance = stage.stats.tolist()
    assert (main, mtp, balance) == (want.main_loss.item(), want.mtp_loss.item(), want.balance_loss.item())


@pytest.mark.parametrize("kwargs, message", [
    ({"dp": 2, "ep": 4}, "--ep 4 must divide --dp 2"),
    ({"pp": 2, "schedule": "gpipe"}, "choose one of 1f1b, dualpipev"),
    ({"dp": 0}, "--dp = 0: must be a positive integer"),
])
def test_bad_layouts_are_one_clear_error(kwargs, message):
    with pytest.raises(ParallelError, match=message):
        ParallelConfig(**kwargs)


def test_world_size_must_match_the_layout():
    with pytest.raises(ParallelError, match="torchrun --nproc-per-node 4"):
        ParallelConfig(dp=2, pp=2).check_world(2)


def test_group_limited_routing_bounds_the_ranks_a_token_reaches():
    v3 = preset("deepseek-v3")              # 8 groups, 4 chosen, 8 experts of 256 per token
    assert ranks_per_token(v3, 8) == 4      # a group per rank: at most topk_group ranks
    assert ranks_per_token(v3, 64) == 8     # 8 ranks per group: K = 8 bounds first
    assert ranks_per_token(preset("deepseek-v2-lite"), 4) == 4   # greedy top-6: any 4 ranks
    assert ranks_per_token(preset("small"), 4) == 2          # 4 groups, 2 chosen: 2 of 4 ranks


def test_checkpoint_of_one_process_is_not_taken_for_a_distributed_one(tmp_path):
    from nanoseek.hf import CheckpointError
    from nanoseek.train.checkpoint import save_checkpoint
    model = fresh_model()
    save_checkpoint(tmp_path, 1, model, None, {"step": 1, "stage": "test"})
    pm = parallelize(fresh_model(), ParallelConfig(), None, torch.device("cpu"))
    with pytest.raises(CheckpointError, match="single-process checkpoint"):
        load_distributed(tmp_path, pm.view, None)

