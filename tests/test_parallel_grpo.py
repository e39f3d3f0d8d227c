"""GRPO's learner on two gloo processes (parallel/grpo.py) against one process.

- The update: the same fixed rollouts (an odd number of sequences, so one rank gets a padding
  row) give the same loss, statistics, updated weights and expert bias on two ranks as in
  one process, for each loss type, with KL, mu = 2 and micro-batches, FSDP or replicated.
  Tolerances as in test_parallel.py: figures 1e-5 (float32); the optimizer is plain SGD, so a
  weight moves by exactly lr·g and may differ by at most mu·lr·1e-5; the bias moves by ±γ
  from integer loads and must be equal exactly. The decoding copy equals the trained
  weights exactly after the update.
- `torchrun -m nanoseek grpo --dp 2` end to end: step 1's completions are the one-process
  run's, token for token, at temperature 0.001 (all but greedy). Every run keeps its seed, but
  a rank decodes a smaller batch than one process does, which moves the float32 logits
  (a near-tie in the tiny model's routing or sampling then flips a token now and then at
  temperature 1). Metrics are written once, the final model is published, and a resume
  continues in one process.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

import nanoseek
from nanoseek.cli import main
from nanoseek.data.tokenizer import ChatTokenizer, byte_tokenizer
from nanoseek.parallel.grpo import ParallelGRPOTrainer, share
from nanoseek.parallel.mesh import ParallelConfig, ParallelError
from nanoseek.rl import trainer as rl_trainer
from nanoseek.rl.grpo import group_advantages
from nanoseek.rl.trainer import GRPOTrainer, grpo_config
from nanoseek.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
TOL, LR, G = 1e-5, 1e-2, 3
FIELDS = ("loss", "kl", "clip_fraction", "entropy", "ratio_mean", "grad_norm")
CASES = {
    "grpo+kl, mu 2, micro-batches": ({"loss_type": "grpo", "beta": 0.05, "mu": 2, "micro_batch": 2}, {}),
    "dapo": ({"loss_type": "dapo", "beta": 0.0}, {}),
    "dr_grpo+kl, replicated": ({"loss_type": "dr_grpo", "beta": 0.05, "scale": "none"}, {"fsdp": False}),
}


def rollouts() -> tuple[dict, torch.Tensor]:
    """3 groups of G = 3: 9 sequences of different prompt and completion lengths, one empty."""
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 1024, (int(n),), generator=g).tolist() for n in (5, 9, 7)]
    lengths = [6, 1, 11, 4, 0, 8, 3, 9, 5]
    batch = {"prompt_ids": [p for p in prompts for _ in range(G)],
             "completion_ids": [torch.randint(3, 1024, (n,), generator=g).tolist() for n in lengths]}
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.2, 0.9, 0.4])
    return batch, rewards


def trainer(kind, changes: dict, run_dir: Path, **kwargs) -> GRPOTrainer:
    torch.manual_seed(0)
    model = nanoseek.Transformer(nanoseek.preset("tiny"))
    cfg = grpo_config(group_size=G, prompts_per_step=3, lr=LR, grad_clip=1.0, **changes)
    t = kind(model, ChatTokenizer(byte_tokenizer(1024)), "arithmetic", cfg, run_dir, **kwargs)
    t.optimizer = torch.optim.SGD(t.model.parameters(), lr=LR)
    return t


def full_state(module) -> dict:
    return {k: t.full_tensor() if isinstance(t, DTensor) else t for k, t in module.state_dict().items()}


def compare_update(changes: dict, layout: dict, run_dir: Path) -> dict:
    batch, rewards = rollouts()
    advantages = group_advantages(rewards, G, changes.get("scale", "group"))
    one = trainer(GRPOTrainer, changes, run_dir / "one")
    want = one.learn(batch, advantages)
    two = trainer(ParallelGRPOTrainer, changes, run_dir / "two", parallel=ParallelConfig(dp=2, **layout))
    got = two.learn(batch, advantages)
    ref, new, plain = one.model.state_dict(), full_state(two.model), two.rollout_model.state_dict()
    bias = [k for k in ref if k.endswith("e_score_correction_bias")]
    return {"stats": max(abs(got[k] - want[k]) for k in FIELDS if k in want),
            "fields": sorted(got) == sorted(want),
            "weights": max((new[k] - ref[k]).abs().max().item() for k in ref if k not in bias),
            "bias_moved_equal": bool(bias) and all(torch.equal(new[k], ref[k]) for k in bias)
            and any(k for k in bias if ref[k].abs().sum() > 0),
            "plain_is_trained": all(torch.equal(plain[k], new[k]) for k in new),
            "skipped": got["skipped"] or want["skipped"]}


def worker(rank: int, init_file: str, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results = {name: compare_update(changes, layout, Path(out_dir) / f"rank{rank}" / str(i))
                   for i, (name, (changes, layout)) in enumerate(CASES.items())}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def test_two_ranks_update_like_one_process_on_the_same_rollouts(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "pg"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        for name, got in json.loads((tmp_path / f"rank{rank}.json").read_text()).items():
            where = f"{name} on rank {rank}: {got}"
            assert got["stats"] <= TOL and got["fields"] and not got["skipped"], where
            mu = CASES[name][0].get("mu", 1)
            assert got["weights"] <= mu * LR * TOL, where
            assert got["bias_moved_equal"] and got["plain_is_trained"], where


def test_share_splits_contiguously_and_evenly():
    assert [share(9, 2, r) for r in range(2)] == [slice(0, 5), slice(5, 9)]
    assert [share(2, 4, r) for r in range(4)] == [slice(0, 1), slice(1, 2), slice(2, 2), slice(2, 2)]


# ---------------------------------------------------------------------- end to end
RUNNER = textwrap.dedent("""
    import json, os, sys
    from nanoseek import cli
    from nanoseek.rl import trainer

    original = trainer.rollout_metrics

    def record(batch):  # the step's completions, gathered from every rank
        if os.environ.get("RANK", "0") == "0":
            with open(sys.argv[1], "a") as f:
                f.write(json.dumps(batch["completion_ids"]) + "\\n")
        return original(batch)

    trainer.rollout_metrics = record
    sys.exit(cli.main(sys.argv[2:]))
""")


def torchrun_grpo(tmp: Path, out: Path, *argv) -> subprocess.CompletedProcess:
    """`nanoseek grpo <argv>` on 2 gloo ranks; rank 0 appends each step's completions to
    out.rollouts.jsonl."""
    runner = tmp / "runner.py"
    runner.write_text(RUNNER)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(runner),
           str(out.parent / f"{out.name}.rollouts.jsonl"), "grpo", *map(str, argv), "--out", str(out)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_torchrun_grpo_rolls_out_like_one_process_and_writes_once(tmp_path, monkeypatch, one_thread):
    ckpt = tmp_path / "ckpt"
    assert main(["init", "--preset", "tiny", "--out", str(ckpt)]) == 0
    args = ["--model", ckpt, "--task", "arithmetic", "--steps", 2, "group_size=4", "prompts_per_step=3",
            "max_new_tokens=8", "temperature=0.001", "beta=0.01", "mu=2", "save_every=1"]
    two = torchrun_grpo(tmp_path, tmp_path / "two", *args, "--dp", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("GRPO to step 2") == 1                  # rank 0 prints, rank 1 is quiet
    read = [json.loads(line) for line in (tmp_path / "two.rollouts.jsonl").read_text().splitlines()]

    want, original = [], rl_trainer.rollout_metrics
    monkeypatch.setattr(rl_trainer, "rollout_metrics",
                        lambda batch: want.append(batch["completion_ids"]) or original(batch))
    assert main(["grpo", *map(str, args), "--steps", "1", "--out", str(tmp_path / "one")]) == 0
    monkeypatch.undo()
    assert len(read) == 2 and len(read[0]) == 12 and read[0] == want[0]
    assert [r["step"] for r in read_metrics(tmp_path / "two")] == [1, 2]
    assert (tmp_path / "two" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "two" / "checkpoints").is_dir()

    # no torchrun: --resume sees distributed checkpoints and goes on in one process
    assert main(["grpo", *map(str, args[:4]), "--steps", "3", *map(str, args[6:]), "--resume",
                 "--out", str(tmp_path / "two")]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "two")] == [1, 2, 3]


@pytest.mark.parametrize("flags, message", [
    (["--dp", "1", "--cpu-offload"], "grpo --cpu-offload is not supported (the rollout copy is refreshed from device "
                        "weights); drop it"),
    (["--ep", "2"], "--ep 2 must divide --dp 1: expert-parallel groups are made of data-parallel ranks"),
])
def test_bad_grpo_layouts_are_one_line(tmp_path, capsys, flags, message):
    ckpt = tmp_path / "ckpt"
    assert main(["init", "--preset", "tiny", "--out", str(ckpt)]) == 0
    capsys.readouterr()
    assert main(["grpo", "--model", str(ckpt), "--task", "arithmetic", "--out", str(tmp_path / "x"),
                 "--steps", "1", "max_new_tokens=4", *flags]) == 2
    assert capsys.readouterr().err == f"nanoseek: error: {message}\n"


@pytest.mark.parametrize("layout, changes, message", [
    ({"dp": 2, "ep": 2}, {}, "grpo --ep 2: GRPO's learner runs data parallel only"),
    ({"pp": 2}, {}, "grpo --pp 2: GRPO's learner runs data parallel only"),
    ({"dp": 2}, {"precision": "fp8"}, "precision=fp8 is not supported with grpo --dp"),
])
def test_unsupported_grpo_layouts_are_one_clear_error(tmp_path, layout, changes, message):
    with pytest.raises(ParallelError, match=message):
        trainer(ParallelGRPOTrainer, changes, tmp_path, parallel=ParallelConfig(**layout))
