"""Pipeline bubbles and activation memory: 1F1B, ZB1P and DualPipeV against DeepSeek-V3 Table 2.

Table 2 of the V3 report (P pipeline ranks; F, B, W the times of a forward, a full backward
and a backward-for-weights chunk of one stage; F&B two overlapped chunks):

    1F1B       bubble (P-1)(F+B)          activation P
    ZB1P       bubble (P-1)(F+B-2W)       activation P
    DualPipe   bubble (P/2-1)(F&B+B-3W)   activation P+1

DualPipeV (DualPipe folded into a V, what torch ships as ScheduleDualPipeV and nanoseek runs)
puts 2P stages on P ranks, so its P/2 becomes P (the formula's PP counts stages) and its
chunks are half a rank's layers. All figures below are per rank and in the units of one
rank's share of the layers (L/P): a DualPipeV chunk costs F/2, B/2, W/2, and its activation
formula 2P+1 chunks is P+1/2 such units.

Simulated: each rank runs its schedule's action list in order (DualPipeV's from
torch.distributed.pipelining's own generator; 1F1B's and ZB1P's (ZB-H1) written here),
an action starting once its rank is free and its inputs exist (communication free); the
bubble is a rank's idle time until the last rank ends, the activation peak the most
micro-batches whose activations it holds at once (kept from a forward to the end of its
backward for weights). An overlapped pair costs F&B = F + B unless --overlap says otherwise:
torch runs the pair one after the other unless a custom function overlaps them.

Measured (--measure): the real schedules on the tiny model, P processes (gloo on CPU, NCCL
with P GPUs): step time, time inside stage compute, bubble = the difference, and peak GPU
memory where there is one.

    python benchmarks/pipeline_bubble.py [--ranks 2 4 8] [--f 1 --b 2 --w 1] [--measure]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402

# action kinds: forward, full backward, backward for inputs, backward for weights, overlapped F+B
F, B, I, W, FB = "F", "B", "I", "W", "FB"


# ---------------------------------------------------------------------- schedules
def dualpipev_orders(ranks: int, microbatches: int) -> dict[int, list[tuple]]:
    """Each rank's compute actions in torch's ScheduleDualPipeV (its own generator): (kind,
    stage, mb), or (FB, (stage, mb), (stage, mb)) for an overlapped forward + backward."""
    from torch.distributed.pipelining import schedules as S
    kind = {S.FORWARD: F, S.FULL_BACKWARD: B, S.BACKWARD_INPUT: I, S.BACKWARD_WEIGHT: W}
    sched = S.ScheduleDualPipeV.__new__(S.ScheduleDualPipeV)
    sched.pp_group_size, sched._n_microbatches = ranks, microbatches
    raw = {r: sched._calculate_single_rank_operations(r) for r in range(ranks)}
    orders = {}
    for rank, actions in raw.items():
        out = []
        for a in actions:
            if a is None:
                continue
            if a.computation_type == S.OVERLAP_F_B:
                (fwd, bwd) = a.sub_actions
                out.append((FB, (fwd.stage_index, fwd.microbatch_index), (bwd.stage_index, bwd.microbatch_index)))
            elif a.computation_type in kind:
                out.append((kind[a.computation_type], a.stage_index, a.microbatch_index))
        orders[rank] = out
    return orders


def one_f_one_b_orders(ranks: int, microbatches: int) -> dict[int, list[tuple]]:
    """1F1B: rank r runs P-1-r forwards, then alternates a forward and a full backward."""
    orders = {}
    for r in range(ranks):
        warm = min(ranks - 1 - r, microbatches)
        actions = [(F, r, m) for m in range(warm)]
        for m in range(microbatches - warm):
            actions += [(F, r, warm + m), (B, r, m)]
        actions += [(B, r, m) for m in range(microbatches - warm, microbatches)]
        orders[r] = actions
    return orders


def zb1p_orders(ranks: int, microbatches: int) -> dict[int, list[tuple]]:
    """ZB-H1: 1F1B's forwards, each backward split into its input part (I) and its weight part
    (W); rank r holds back r weight parts, which fill the waits of its cool-down."""
    orders = {}
    for r in range(ranks):
        warm = min(ranks - 1 - r, microbatches)
        actions = [(F, r, m) for m in range(warm)]
        pending = []
        for b in range(microbatches):
            if warm + b < microbatches:
                actions.append((F, r, warm + b))
            actions.append((I, r, b))
            pending.append(b)
            if len(pending) > r:
                actions.append((W, r, pending.pop(0)))
        actions += [(W, r, m) for m in pending]
        orders[r] = actions
    return orders


# ---------------------------------------------------------------------- simulation
def simulate(orders: dict[int, list[tuple]], n_stages: int, cost: dict[str, float]) -> dict:
    """Run every rank's actions in order on a shared clock; returns per-rank bubble, busy time
    and activation peak (in chunks of one stage)."""
    done: dict[tuple, float] = {}          # (kind, stage, mb) -> finish time
    free = {r: 0.0 for r in orders}
    pos = {r: 0 for r in orders}
    live = {r: 0 for r in orders}
    peak = {r: 0 for r in orders}
    busy = {r: 0.0 for r in orders}
    freed_at: dict[int, list[tuple[float, int]]] = {r: [] for r in orders}

    def ready(kind, s, m):
        if kind == F:
            return [(F, s - 1, m)] if s > 0 else []
        if kind in (B, I):
            deps = [(F, s, m)]
            if s < n_stages - 1:
                deps.append(("grad", s + 1, m))
            return deps
        return [("grad", s, m)]              # W after its I

    def deps_of(action):
        if action[0] == FB:
            return ready(F, *action[1]) + ready(B, *action[2])
        return ready(*action)

    while any(pos[r] < len(orders[r]) for r in orders):
        best = None
        for r in orders:
            if pos[r] == len(orders[r]):
                continue
            action = orders[r][pos[r]]
            deps = deps_of(action)
            if all(d in done for d in deps):
                start = max([free[r]] + [done[d] for d in deps])
                if best is None or start < best[0]:
                    best = (start, r, action)
        if best is None:
            raise RuntimeError("the schedule deadlocks")
        start, r, action = best
        # activations freed by actions that ended before this one starts
        for t, n in [x for x in freed_at[r] if x[0] <= start]:
            live[r] -= n
        freed_at[r] = [x for x in freed_at[r] if x[0] > start]
        if action[0] == FB:
            duration = cost[FB]
            parts = [(F,) + action[1], (B,) + action[2]]
        else:
            duration = cost[action[0]]
            parts = [action]
        end = start + duration
        for kind, s, m in parts:
            if kind == F:
                live[r] += 1
            if kind in (B, I):
                done[("grad", s, m)] = end
            if kind in (B, W):
                freed_at[r].append((end, 1))
            done[(kind, s, m)] = end
        peak[r] = max(peak[r], live[r])
        busy[r] += duration
        free[r] = end
        pos[r] += 1
    makespan = max(free.values())        # a rank done early waits for the step's end
    return {"bubble": {r: makespan - busy[r] for r in orders}, "busy": busy, "peak": peak,
            "makespan": makespan}


def formulas(schedule: str, P: int, f: float, b: float, w: float, fb: float) -> tuple[float, float]:
    """(bubble, activation) of V3 Table 2 in units of one rank's layers (see the docstring)."""
    if schedule == "1f1b":
        return (P - 1) * (f + b), P
    if schedule == "zb1p":
        return (P - 1) * (f + b - 2 * w), P
    return (2 * P / 2 - 1) * (fb + b - 3 * w) / 2, (2 * P + 1) / 2


def simulated_rows(ranks: list[int], per_stage: list[int], f: float, b: float, w: float,
                   overlap: float) -> list[dict]:
    rows = []
    for P in ranks:
        for k in per_stage:
            m = k * 2 * P                      # the same micro-batches for every schedule
            for schedule in ("1f1b", "zb1p", "dualpipev"):
                if schedule == "dualpipev":   # chunks of half a rank's layers
                    scale, n_stages = 0.5, 2 * P
                    orders = dualpipev_orders(P, m)
                else:
                    scale, n_stages = 1.0, P
                    orders = (zb1p_orders if schedule == "zb1p" else one_f_one_b_orders)(P, m)
                fb_full = (f + b) * (1 - overlap) + max(f, b) * overlap
                cost = {F: f * scale, B: b * scale, W: w * scale, I: (b - w) * scale, FB: fb_full * scale}
                sim = simulate(orders, n_stages, cost)
                bubble_formula, act_formula = formulas(schedule, P, f, b, w, fb_full)
                rows.append({"schedule": schedule, "ranks": P, "microbatches": m,
                             "bubble_sim_max": max(sim["bubble"].values()),
                             "bubble_sim_mean": sum(sim["bubble"].values()) / P,
                             "bubble_formula": bubble_formula,
                             "activation_sim": max(sim["peak"].values()) * scale,
                             "activation_formula": act_formula,
                             "bubble_fraction": max(sim["bubble"].values()) / sim["makespan"]})
    return rows


# ---------------------------------------------------------------------- measurement
def measure_worker(rank: int, world: int, init_file: str, schedule: str, microbatches: int, steps: int,
                   out: str) -> None:
    import json
    import time

    import torch
    import torch.distributed as dist

    from nanoseek import Transformer, preset
    from nanoseek.parallel.mesh import ParallelConfig, build_mesh, device_type
    from nanoseek.parallel.parallelize import parallelize
    from nanoseek.parallel.step import parallel_train_step
    from nanoseek.train.optim import build_optimizer

    torch.set_num_threads(1)
    cuda = device_type() == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    cfg = ParallelConfig(pp=world, schedule=schedule, microbatches=microbatches)
    torch.manual_seed(0)
    model_cfg = preset("small" if cuda else "tiny", num_hidden_layers=4 * world)
    mesh = build_mesh(cfg)
    pm = parallelize(Transformer(model_cfg), cfg, mesh, device)
    opt = build_optimizer(pm.view, 1e-4)
    spent = {"compute": 0.0, "schedule": 0.0}

    def timed(fn, what):
        def run(*args, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            result = fn(*args, **kwargs)
            if cuda:
                torch.cuda.synchronize()
            spent[what] += time.perf_counter() - t0
            return result
        return run

    # time inside the stages' compute and inside the whole schedule: the bubble is the rest
    stages = pm.schedule._stages if hasattr(pm.schedule, "_stages") else [pm.schedule._stage]
    for s in stages:
        for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
            setattr(s, name, timed(getattr(s, name), "compute"))
    pm.schedule.step = timed(pm.schedule.step, "schedule")
    rows, seq = microbatches * 2, 256 if cuda else 32
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, model_cfg.vocab_size, (rows, seq), generator=g).to(device)}
    batch["labels"] = batch["input_ids"]
    times, computes = [], []
    for i in range(steps + 2):
        spent.update(compute=0.0, schedule=0.0)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        dist.barrier()
        parallel_train_step(pm, mesh, [batch], opt, 1.0)
        if i >= 2:                           # the first steps infer shapes and warm up
            times.append(spent["schedule"])
            computes.append(spent["compute"])
    result = {"rank": rank, "step_s": sum(times) / len(times), "compute_s": sum(computes) / len(computes),
              "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    Path(out, f"{schedule}_{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def measured_rows(ranks: int, per_stage: int, steps: int) -> list[dict]:
    import json
    import tempfile

    import torch
    import torch.multiprocessing as mp
    if torch.cuda.is_available() and torch.cuda.device_count() < ranks:
        print(f"{ranks} ranks need {ranks} GPUs, this machine has {torch.cuda.device_count()}: measuring on CPU")
        os.environ["CUDA_VISIBLE_DEVICES"] = ""          # the spawned ranks see no GPU
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for schedule in ("1f1b", "dualpipev"):
            m = per_stage * 2 * ranks
            mp.spawn(measure_worker, args=(ranks, f"{tmp}/pg_{schedule}", schedule, m, steps, tmp), nprocs=ranks)
            per_rank = [json.loads(Path(tmp, f"{schedule}_{r}.json").read_text()) for r in range(ranks)]
            step = max(r["step_s"] for r in per_rank)
            rows.append({"schedule": schedule, "ranks": ranks, "microbatches": m, "step_s": step,
                         "bubble_fraction": max(1 - r["compute_s"] / r["step_s"] for r in per_rank),
                         "peak_mem_gib": max((r["peak_mem_gib"] or 0) for r in per_rank) or None})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--per-stage", type=int, nargs="+", default=[2, 4],
                   help="micro-batches per DualPipeV stage (m = k·2P for every schedule)")
    p.add_argument("--f", type=float, default=1.0, help="forward chunk time")
    p.add_argument("--b", type=float, default=2.0, help="full backward chunk time")
    p.add_argument("--w", type=float, default=1.0, help="backward-for-weights chunk time")
    p.add_argument("--overlap", type=float, default=0.0,
                   help="share of min(F, B) an overlapped pair hides (0: run one after the other)")
    p.add_argument("--measure", action="store_true", help="also run the schedules (2 processes; "
                                                          "NCCL on GPUs when there are 2)")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()

    rows = simulated_rows(args.ranks, args.per_stage, args.f, args.b, args.w, args.overlap)
    print(f"simulated, F={args.f} B={args.b} W={args.w} overlap={args.overlap} "
          "(times per rank, in one rank's-layers chunk units)")
    print(f"{'schedule':<10} {'P':>2} {'m':>4} {'bubble sim':>11} {'formula':>8} {'bubble %':>9} "
          f"{'act sim':>8} {'formula':>8}")
    for r in rows:
        print(f"{r['schedule']:<10} {r['ranks']:>2} {r['microbatches']:>4} {r['bubble_sim_max']:>11.2f} "
              f"{r['bubble_formula']:>8.2f} {100 * r['bubble_fraction']:>8.1f}% {r['activation_sim']:>8.1f} "
              f"{r['activation_formula']:>8.1f}")
    result = {"environment": environment(), "config": vars(args), "simulated": rows}
    if args.measure:
        measured = measured_rows(2, args.per_stage[0], args.steps)
        print("\nmeasured, 2 ranks")
        for r in measured:
            mem = f"{r['peak_mem_gib']:.2f} GiB" if r["peak_mem_gib"] else "-"
            print(f"{r['schedule']:<10} m={r['microbatches']:<3} step {1e3 * r['step_s']:8.1f} ms  "
                  f"bubble {100 * r['bubble_fraction']:5.1f}%  peak {mem}")
        result["measured"] = measured
    print(f"wrote {write_json(result, 'pipeline_bubble.json')}")


if __name__ == "__main__":
    main()
