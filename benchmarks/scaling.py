"""Scaling of nanoseek's parallel training over N processes of one host: data parallel (FSDP2),
expert parallel, both, and the two pipeline schedules, against one process.

    python benchmarks/scaling.py --gpus 1 2 4 --preset small              # on a host with 4 GPUs
    python benchmarks/scaling.py --gpus 1 2 4 --preset deepseek-v2-lite --layers 8
    python benchmarks/scaling.py --device cpu --smoke                      # gloo, tiny preset, N = 1 2

Every run is `nanoseek train` itself: N > 1 under `torchrun --nproc-per-node N`, N = 1 as one plain
process (today's single-device path). Each process enters through this script's `worker` mode,
which only observes the trainer: after every step it reads the device's peak memory, and rank 0
of an expert-parallel run profiles the last `--profile-steps` steps.

Configurations at N processes:
    DP            --dp N                 FSDP2 shards every weight over N
    EP            --dp N --ep N --replicate   routed experts split over N (all-to-all), the rest replicated
    EP+DP         --dp N --ep N          routed experts split over N, the rest FSDP2-sharded over N
    PP 1F1B       --pp N                 one stage per rank
    PP DualPipeV  --pp N --pp-schedule dualpipev   two stages per rank, V-shaped
    DualPipeV+EP  --pp 2 --dp N/2 --ep N/2 --pp-schedule dualpipev --overlap   (N >= 4) pairs'
                  all-to-alls overlapped with compute; "-no-overlap" has --no-overlap, the peer

Weak scaling: every GPU keeps `--batch-per-gpu` sequences, so the global batch is N times that.
A GPU's work per step then stays the same as N grows and tokens/s per GPU at N against N = 1 is
the efficiency the issue asks for; a fixed global batch would shrink each GPU's matmuls as N grows
and measure the matmuls' efficiency at small sizes as much as the parallelism.
Since `batch_size` is the global batch, a run's losses do not depend on the layout: each run's
per-step losses are compared with one process trained on the same global batch (one such
reference run per N, shared by all configurations).

Measured, per run (rank 0's metrics.jsonl unless said):
- tokens/s: the median over the steps after `--warmup-steps`, before the profiler starts; per GPU: / N.
- peak memory: the maximum over ranks of torch.cuda.max_memory_allocated (CPU: max RSS).
- pipeline bubble: 1 - T1 / (N * TN), T1 the one-process step time on the same global batch, TN
  the pipeline's: the fraction of each stage's time not spent on its share of the work, an upper
  bound on the schedule's bubble (communication and an uneven split count in it too).
- expert parallel: the all-to-all's time per step and the fraction of it that overlaps compute,
  from torch.profiler on rank 0 (GPU: NCCL send/recv kernels against the other kernels; CPU:
  gloo's all-to-all ops against aten ops outside them, coarse).

On CPU (`--smoke`) timings say nothing about GPU scaling: it checks that the command, the layouts
and the result file work, and that the losses match (float32, the parallel tests' 1e-5).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import environment, sliced_preset, write_json  # noqa: E402


def dualpipev_ep(n: int, overlap_flag: str) -> list | None:
    """2 pipeline ranks of n/2 data- and expert-parallel ones (none below 4 processes)."""
    return ["--pp", 2, "--dp", n // 2, "--ep", n // 2, "--pp-schedule", "dualpipev", overlap_flag] if n >= 4 else None


CONFIGS = {
    "DP": lambda n: ["--dp", n],
    "EP": lambda n: ["--dp", n, "--ep", n, "--replicate"],
    "EP+DP": lambda n: ["--dp", n, "--ep", n],
    "PP 1F1B": lambda n: ["--pp", n, "--pp-schedule", "1f1b"],
    "PP DualPipeV": lambda n: ["--pp", n, "--pp-schedule", "dualpipev"],
    # DualPipe's point: one micro-batch's EP all-to-all behind another's compute, and the peer
    # without it (from 4 processes: 2 pipeline ranks of N/2 expert-parallel ones)
    "DualPipeV+EP": lambda n: dualpipev_ep(n, "--overlap"),
    "DualPipeV+EP-no-overlap": lambda n: dualpipev_ep(n, "--no-overlap"),
}
# NVLink multicast stays off in every launched process (the device notes say why)
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
FP32_LOSS_TOL = 1e-5      # tests/test_parallel_train.py's tolerance between layouts in float32
# BF16 keeps 8 significant bits (ulp 2^-7 at 1): a different reduction order moves a step's loss by
# a few ulps, and training compounds it, so the budget is stated, not derived: two ulps, relative
BF16_LOSS_RTOL = 2 ** -6
SMOKE = {"preset": "tiny", "gpus": [1, 2], "steps": 6, "batch_per_gpu": 4, "seq": 32, "precision": "fp32",
         "warmup_steps": 1, "profile_steps": 2}
GPU = {"preset": "small", "gpus": [1, 2, 4], "steps": 100, "batch_per_gpu": 8, "seq": 512, "precision": "bf16",
       "warmup_steps": 5, "profile_steps": 3}
A2A_KERNEL = re.compile(r"SendRecv|AllToAll", re.I)       # NCCL's all_to_all_single kernels
A2A_OP = re.compile(r"all_?to_?all", re.I)                # gloo / c10d ops on the CPU


# ---------------------------------------------------------------------------- one process of a run
def worker(argv: list[str]) -> int:
    """`worker PROFILE_STEPS -- <nanoseek argv>`: nanoseek's own command, observed after each step."""
    import torch
    from nanoseek import cli
    from nanoseek.parallel.trainer import ParallelTrainer
    from nanoseek.train.trainer import Trainer

    profile_steps, train_argv = int(argv[0]), argv[2:]
    run_dir = Path(train_argv[train_argv.index("--out") + 1])
    steps = int(train_argv[train_argv.index("--steps") + 1])
    rank = int(os.environ.get("RANK", 0))
    cuda = torch.cuda.is_available()
    probe = {"peak_memory_bytes": 0, "peak_memory_kind": "cuda max allocated" if cuda else "cpu max rss"}
    prof = None
    if rank == 0 and profile_steps:
        from torch.profiler import ProfilerActivity, profile, schedule
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

        def summarise(p):
            probe["all_to_all"] = all_to_all_overlap(p.events(), cuda, profile_steps)
        # the last profile_steps steps, after every step that is timed
        prof = profile(activities=activities, on_trace_ready=summarise,
                       schedule=schedule(wait=steps - profile_steps - 1, warmup=1, active=profile_steps, repeat=1))

    def observed(step_fn):
        def train_step(self, batches):
            stats = step_fn(self, batches)
            if cuda:
                torch.cuda.synchronize()
            probe["peak_memory_bytes"] = peak_memory_bytes(cuda)
            if prof is not None:
                prof.step()
            return stats
        return train_step

    for cls in (Trainer, ParallelTrainer):
        cls.train_step = observed(cls.__dict__["train_step"])
    if prof is not None:
        prof.start()
    code = cli.main(train_argv)
    if prof is not None:
        prof.stop()
    (run_dir / f"probe.rank{rank}.json").write_text(json.dumps(probe))
    return code


def peak_memory_bytes(cuda: bool) -> int:
    import torch
    if cuda:
        return torch.cuda.max_memory_allocated()
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # Linux reports KiB


def all_to_all_overlap(events, cuda: bool, steps: int) -> dict:
    """Milliseconds per step of the all-to-all (the union of its intervals) and the part of it
    during which compute ran."""
    from torch.autograd import DeviceType

    def inside_comm(e) -> bool:
        while e is not None:
            if A2A_OP.search(e.name):
                return True
            e = e.cpu_parent
        return False

    comm, compute = [], []
    for e in events:
        span = (e.time_range.start, e.time_range.end)
        if cuda:
            if e.device_type != DeviceType.CUDA:
                continue
            if A2A_KERNEL.search(e.name):
                comm.append(span)
            elif "nccl" not in e.name.lower():
                compute.append(span)
        elif A2A_OP.search(e.name):
            comm.append(span)
        elif e.name.startswith("aten::") and not inside_comm(e):
            compute.append(span)
    comm, compute = union(comm), union(compute)
    comm_us = sum(b - a for a, b in comm)
    overlap_us = sum(max(0, min(b, d) - max(a, c)) for a, b in comm for c, d in compute)
    return {"ms_per_step": comm_us / steps / 1e3, "overlap_ms_per_step": overlap_us / steps / 1e3,
            "overlap_fraction": overlap_us / comm_us if comm_us else None, "profiled_steps": steps,
            "source": "CUDA kernels (NCCL send/recv)" if cuda else "CPU ops (gloo), coarse"}


def union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


# ---------------------------------------------------------------------------- the runs
def launch(n: int, flags: list, global_batch: int, run_dir: Path, args, profile_steps: int) -> dict:
    """One `nanoseek train` on n processes; its metrics and probes, or its error."""
    from nanoseek.train.metrics import read_metrics

    train_argv = ["train", *model_args(args), "--data", args.data, "--steps", args.steps, "--save-every", 0,
                  "--precision", args.precision, "--out", run_dir, *flags,
                  f"batch_size={global_batch}", f"seq_len={args.seq}"]
    worker_argv = [__file__, "worker", profile_steps, "--", *train_argv]
    if n == 1:
        cmd = [sys.executable, *worker_argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *worker_argv]
    env = {**os.environ, **NO_MULTICAST, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    if args.device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    with subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=args.run_timeout)
        except BaseException as e:
            # SIGTERM, not run()'s SIGKILL: torchrun passes it on to its workers, which would
            # otherwise keep the GPUs busy after this script is gone
            proc.terminate()
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            if isinstance(e, subprocess.TimeoutExpired):
                return {"ok": False, "error": f"timed out after {args.run_timeout} s"}
            raise
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"ok": False, "error": (stderr.strip() or stdout.strip())[-1500:]}
    records = read_metrics(run_dir)
    probes = [json.loads(p.read_text()) for p in sorted(run_dir.glob("probe.rank*.json"))]
    # the profiler's own warm-up step is as slow as the profiled ones
    timed = records[args.warmup_steps:len(records) - profile_steps - bool(profile_steps)] or records
    out = {"ok": True, "wall_s": wall, "losses": [r["loss"] for r in records],
           "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
           "step_time_s": statistics.median(r["step_time_s"] for r in timed), "timed_steps": len(timed),
           "peak_memory_bytes": max(p["peak_memory_bytes"] for p in probes),
           "peak_memory_kind": probes[0]["peak_memory_kind"]}
    out["tokens_per_s_per_gpu"] = out["tokens_per_s"] / n
    for p in probes:
        if "all_to_all" in p:
            out["all_to_all"] = p["all_to_all"]
    return out


def model_args(args) -> list:
    if args.layers is None:
        return ["--preset", args.preset]
    cfg = sliced_preset(args.preset, args.layers)
    return ["--preset", args.preset, f"num_hidden_layers={cfg.num_hidden_layers}",
            f"num_nextn_predict_layers={cfg.num_nextn_predict_layers}",
            f"first_k_dense_replace={cfg.first_k_dense_replace}"]


def compare_losses(losses: list[float], reference: list[float], precision: str) -> dict:
    diffs = [abs(a - b) for a, b in zip(losses, reference)]
    rel = [d / abs(b) for d, b in zip(diffs, reference) if b]
    if precision == "fp32":
        tolerance, within = f"abs {FP32_LOSS_TOL}", max(diffs) <= FP32_LOSS_TOL
    else:
        tolerance, within = f"rel {BF16_LOSS_RTOL}", max(rel) <= BF16_LOSS_RTOL
    return {"steps": len(diffs), "max_abs_diff": max(diffs), "max_rel_diff": max(rel, default=0.0),
            "tolerance": tolerance, "within": within and len(losses) == len(reference)}


def summarise(result: dict, args) -> None:
    """Fill in what compares a run with the one-process runs (efficiency, losses, bubble)."""
    refs = result["one_process"]
    base = refs.get("1", {})
    for run in result["runs"]:
        ref = refs.get(str(run["n"]), {})
        if not (run["ok"] and base.get("ok") and ref.get("ok")):
            continue
        run["efficiency"] = run["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]
        run["loss_vs_one_process"] = compare_losses(run["losses"], ref["losses"], args.precision)
        if run["config"].startswith("PP"):
            run["bubble"] = 1 - ref["step_time_s"] / (run["n"] * run["step_time_s"])


def table(result: dict) -> str:
    lines = [f"{'config':24} {'N':>2} {'tok/s/GPU':>10} {'eff':>6} {'peak MiB':>9} {'loss diff':>10} "
             f"{'bubble':>7} {'a2a ms':>7} {'overlap':>7}"]
    base = result["one_process"].get("1", {})
    rows = [{"config": "one process", "n": 1, **base}] + result["runs"]
    for r in rows:
        if not r.get("ok"):
            lines.append(f"{r['config']:24} {r['n']:>2} failed: {r.get('error', '').splitlines()[-1:]}")
            continue
        a2a = r.get("all_to_all", {})
        lines.append(f"{r['config']:24} {r['n']:>2} {r['tokens_per_s_per_gpu']:>10,.0f} "
                     f"{fmt(r.get('efficiency'), '>6.1%')} {r['peak_memory_bytes'] / 2**20:>9,.0f} "
                     f"{fmt(r.get('loss_vs_one_process', {}).get('max_abs_diff'), '>10.2e')} "
                     f"{fmt(r.get('bubble'), '>7.1%')} {fmt(a2a.get('ms_per_step'), '>7.2f')} "
                     f"{fmt(a2a.get('overlap_fraction'), '>7.1%')}")
    return "\n".join(lines)


def fmt(value, spec: str) -> str:
    """`value` in a table column of format `spec` (">W..."), or "-" as wide when there is none."""
    return format(value, spec) if value is not None else format("-", re.match(r"\D*\d*", spec).group())


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = result["one_process"].get("1", {})
    if not base.get("ok"):
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ns = sorted({r["n"] for r in result["runs"]} | {1})
    ax.plot(ns, [base["tokens_per_s_per_gpu"]] * len(ns), "k--", lw=1, label="ideal (one process)")
    for config in CONFIGS:
        points = [(1, base["tokens_per_s_per_gpu"])] + [(r["n"], r["tokens_per_s_per_gpu"]) for r in result["runs"]
                                                         if r["config"] == config and r["ok"]]
        if len(points) > 1:
            ax.plot(*zip(*points), "o-", label=config)
    ax.set_xticks(ns)
    ax.set_xlabel("processes (GPUs)")
    ax.set_ylabel("tokens/s per GPU")
    ax.set_ylim(bottom=0)
    settings = result["settings"]
    ax.set_title(f"{result['label']}\nweak scaling: {settings['batch_per_gpu']} sequences of {settings['seq']} "
                 "tokens per GPU", fontsize=9)
    ax.legend(fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: dict, args, final: bool) -> None:
    """Written after every run, so a run cut short by its time limit leaves what it measured."""
    result["complete"] = final
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, json_path.parent / "plots" / f"{json_path.stem}.png")
    if os.environ.get("OUT"):
        write_json(result, json_path.name)
        plot(result, Path(os.environ["OUT"]) / f"{json_path.stem}.png")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: gloo processes")
    p.add_argument("--smoke", action="store_true", help="tiny preset, N = 1 2, a few steps (a CPU check)")
    p.add_argument("--gpus", type=int, nargs="+", help="process counts N (default 1 2 4; smoke: 1 2)")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--preset", help="model preset (default small; smoke: tiny)")
    p.add_argument("--layers", type=int, help="keep the preset's first L layers (its real layer shapes)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-per-gpu", type=int, help="sequences per GPU per step (global batch: N times this)")
    p.add_argument("--seq", type=int, help="tokens per sequence")
    p.add_argument("--precision", choices=("bf16", "fp32"), help="default bf16 (smoke: fp32); the parallel "
                   "trainer refuses fp8")
    p.add_argument("--warmup-steps", type=int, help="first steps left out of the throughput")
    p.add_argument("--profile-steps", type=int, help="last steps profiled on rank 0 of EP runs (0: none)")
    p.add_argument("--data", default="builtin:arithmetic:level=2:n=2000")
    p.add_argument("--run-timeout", type=int, default=300, help="seconds one run may take")
    p.add_argument("--runs", help="where the run directories go (default: a temporary directory)")
    p.add_argument("--json", help="result file (default benchmarks/results/scaling_<preset>[_L<layers>].json, "
                                  "smoke: scaling_cpu_smoke.json); its plot goes to plots/ beside it")
    args = p.parse_args(argv)
    for key, value in (SMOKE if args.smoke else GPU).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < args.warmup_steps + args.profile_steps + 2:     # + the profiler's warm-up step
        p.error(f"--steps {args.steps} leaves no timed step after {args.warmup_steps} warm-up and "
                f"{args.profile_steps} profiled steps; raise --steps")
    if args.batch_per_gpu % 4:
        p.error(f"--batch-per-gpu {args.batch_per_gpu}: must be a multiple of 4, so that DualPipeV's "
                "4 micro-batches per rank split it evenly")
    if args.device == "cuda":
        import torch
        have = torch.cuda.device_count()
        if max(args.gpus) > have:
            p.error(f"--gpus {max(args.gpus)} but this machine has {have} GPUs; lower --gpus or use --device cpu")
    cpu = args.device == "cpu"
    name = "cpu_smoke" if args.smoke else f"{'cpu_' * cpu}{args.preset}{f'_L{args.layers}' if args.layers else ''}"
    args.json = args.json or str(RESULTS / f"scaling_{name}.json")
    model = f"{args.preset}{f' ({args.layers} layers)' if args.layers else ''}, {args.precision}"
    args.label = (f"CPU {'smoke test ' * args.smoke}(gloo), {model}: timings say nothing about GPU scaling"
                  if cpu else model)
    return args


def main(argv=None) -> None:
    args = parse(argv)
    # a time limit's SIGTERM unwinds through launch(), which stops the run in flight
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    runs_root = Path(args.runs or tempfile.mkdtemp(prefix="scaling_"))
    settings = {k: getattr(args, k) for k in ("device", "preset", "layers", "gpus", "configs", "steps",
                                              "batch_per_gpu", "seq", "precision", "warmup_steps",
                                              "profile_steps", "data")}
    result = {"label": args.label, "environment": environment(), "settings": settings,
              "scaling": "weak: batch_per_gpu sequences per GPU, global batch N x batch_per_gpu",
              "bubble_method": "1 - T1 / (N * TN), T1 one process's step time on the same global batch",
              "env": NO_MULTICAST, "one_process": {}, "runs": []}
    # one process on each N's global batch: N = 1's throughput baseline and each N's loss reference
    for n in sorted(set(args.gpus) | {1}):
        print(f"one process, global batch {n * args.batch_per_gpu} ...", flush=True)
        result["one_process"][str(n)] = {"global_batch": n * args.batch_per_gpu, **launch(
            1, [], n * args.batch_per_gpu, runs_root / f"one_process_b{n * args.batch_per_gpu}", args, 0)}
        result["one_process"][str(n)].pop("all_to_all", None)
        write(result, args, final=False)
    for n in sorted(n for n in args.gpus if n > 1):
        for config in args.configs:
            flags = CONFIGS[config](n)
            if flags is None:       # not a layout at this N
                continue
            print(f"{config} on {n} ...", flush=True)
            profile_steps = args.profile_steps if "--ep" in flags else 0
            run = launch(n, flags, n * args.batch_per_gpu, runs_root / f"{config.replace(' ', '_')}_{n}", args,
                         profile_steps)
            result["runs"].append({"config": config, "n": n, "flags": [str(f) for f in flags],
                                   "global_batch": n * args.batch_per_gpu, **run})
            summarise(result, args)
            write(result, args, final=False)
    summarise(result, args)
    write(result, args, final=True)
    print(result["label"])
    print(table(result))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        sys.exit(worker(sys.argv[2:]))
    main()
