"""`torchrun -m nanoseek train --dp/--ep/--pp` end to end on the CPU (gloo): its losses are the
one-process run's, metrics and the HF export are written once, and a run killed mid-training
resumes, on one process or on two, to the losses of an uninterrupted run; a SIGTERM that
reaches one rank stops every rank after the same step, saved.

The kill is a SIGKILL that rank 0 sends itself from a hooked `MetricsLogger.log` (as in
test_train.py), so it lands at a known step; torchrun then stops the other rank.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek.cli import main
from nanoseek.loading import latest_checkpoint, step_dir_name
from nanoseek.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
RUN_ARGS = ["--preset", "tiny", "--data", "builtin:arithmetic:level=1:n=300", "--steps", "6",
            "--save-every", "2", "batch_size=4", "seq_len=32"]
LOSS_TOL = 1e-5   # the float32 tolerance between layouts; a layout against itself: exact

RUNNER = textwrap.dedent("""
    import os, signal, sys
    from nanoseek import cli
    from nanoseek.train import metrics

    kill_at = int(sys.argv[1])
    original = metrics.MetricsLogger.log

    def log(self, step, **values):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, step, **values)

    metrics.MetricsLogger.log = log
    sys.exit(cli.main(sys.argv[2:]))
""")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torchrun(tmp: Path, nproc: int, *argv, kill_at: int = 0) -> subprocess.CompletedProcess:
    """`nanoseek <argv>` on `nproc` gloo ranks; with kill_at, rank 0 dies as it logs that step."""
    runner = tmp / "runner.py"
    runner.write_text(RUNNER)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(runner), str(kill_at), *map(str, argv)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


TERM_RUNNER = textwrap.dedent("""
    import os, signal, sys
    from nanoseek import cli
    from nanoseek.train import trainer

    term_at = int(sys.argv[1])
    original = trainer.lr_multiplier  # called by every rank as each step starts

    def lr_multiplier(step, *args, **kwargs):
        if step + 1 == term_at and os.environ["RANK"] == "1":
            os.kill(os.getpid(), signal.SIGTERM)
        return original(step, *args, **kwargs)

    trainer.lr_multiplier = lr_multiplier
    sys.exit(cli.main(sys.argv[2:]))
""")


def test_a_sigterm_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """SIGTERM reaches rank 1 alone as step 3 starts: rank 0 learns of it after that step, so
    both save step 3 together and stop, each exiting 143, with nothing lost. A rank-local stop
    would leave rank 0 in step 4's collectives while rank 1 saved."""
    (tmp_path / "runner.py").write_text(TERM_RUNNER)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(tmp_path / "runner.py"), "3", "train", *map(str, RUN_ARGS), "--dp", "2", "--ep", "2",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)  # ~10 s; ranks that disagree wait in collectives until this
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert proc.stderr.count("nanoseek: interrupted: pretrain stopped at step 3 of 6") == 2, proc.stderr[-3000:]
    assert steps(out) == [1, 2, 3]
    assert latest_checkpoint(out).name == step_dir_name(3)
    assert (latest_checkpoint(out) / "dcp" / ".metadata").is_file()


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)]


def steps(run_dir) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    assert main(["train", *RUN_ARGS, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """EP+FSDP on two ranks, killed as it logs step 5: checkpoints of steps 2 and 4 remain."""
    out = tmp_path_factory.mktemp("killed") / "run"
    proc = torchrun(out.parent, 2, "train", *RUN_ARGS, "--dp", 2, "--ep", 2, "--out", out, kill_at=5)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Signal 9" in proc.stderr or "SIGKILL" in proc.stderr, proc.stderr[-3000:]
    return out


def test_a_killed_two_rank_run_resumes_on_one_process(killed, one_process, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(killed, run)
    assert latest_checkpoint(run).name == step_dir_name(4)
    assert (latest_checkpoint(run) / "dcp" / ".metadata").is_file()
    assert steps(run) == [1, 2, 3, 4]          # one writer: each step once
    want = losses(one_process)
    assert max(abs(a - b) for a, b in zip(losses(run), want)) <= LOSS_TOL

    # no torchrun, no flags: --resume sees distributed checkpoints and continues in one process
    assert main(["train", *RUN_ARGS, "--out", str(run), "--resume"]) == 0
    assert "trained to step 6" in capsys.readouterr().out
    assert steps(run) == list(range(1, 7))
    assert max(abs(a - b) for a, b in zip(losses(run), want)) <= LOSS_TOL
    a = nanoseek.from_pretrained(one_process / "final").state_dict()
    b = nanoseek.from_pretrained(run / "final").state_dict()
    assert a.keys() == b.keys()


@pytest.mark.slow
@pytest.mark.multigpu
def test_a_killed_two_rank_run_resumes_on_two_ranks_bit_for_bit(killed, tmp_path):
    uninterrupted = tmp_path / "uninterrupted"
    proc = torchrun(tmp_path, 2, "train", *RUN_ARGS, "--dp", 2, "--ep", 2, "--out", uninterrupted)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    shutil.copytree(killed, run)
    proc = torchrun(tmp_path, 2, "train", *RUN_ARGS, "--dp", 2, "--ep", 2, "--out", run, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained to step 6") == 1       # rank 0 prints, rank 1 is quiet
    assert steps(run) == list(range(1, 7))
    assert losses(run) == losses(uninterrupted)


@pytest.mark.slow
@pytest.mark.multigpu
@pytest.mark.parametrize("layout", [("--pp", 2), ("--pp", 2, "--pp-schedule", "dualpipev", "--microbatches", 4),
                                    ("--dp", 2, "--replicate")])
def test_torchrun_layouts_train_like_one_process(layout, one_process, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(tmp_path, 2, "train", *RUN_ARGS, *layout, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max(abs(a - b) for a, b in zip(losses(out), losses(one_process))) <= LOSS_TOL
    assert steps(out) == list(range(1, 7))
    assert json.loads((out / "final" / "config.json").read_text())["num_hidden_layers"] == 3


@pytest.mark.slow
@pytest.mark.multigpu
def test_torchrun_dualpipev_with_overlapped_expert_parallelism_trains_like_one_process(tmp_path):
    """4 ranks: 2 pipeline ranks of 2 data- and expert-parallel ones, DualPipeV with its pairs'
    all-to-alls overlapped (`--overlap`: by default only on GPUs) through the real command line;
    4 micro-batches of each data-parallel rank's 4 rows of a global batch of 8."""
    args = [*RUN_ARGS, "batch_size=8"]          # the last of a repeated field wins
    assert main(["train", *args, "--out", str(tmp_path / "one")]) == 0
    out = tmp_path / "run"
    proc = torchrun(tmp_path, 4, "train", *args, "--pp", 2, "--dp", 2, "--ep", 2, "--pp-schedule", "dualpipev",
                    "--microbatches", 4, "--overlap", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max(abs(a - b) for a, b in zip(losses(out), losses(tmp_path / "one"))) <= LOSS_TOL
    assert steps(out) == list(range(1, 7))


def test_a_layout_that_does_not_fit_the_processes_is_one_line(tmp_path, capsys):
    assert main(["train", *RUN_ARGS, "--pp", "2", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == "nanoseek: error: --pp 2 must be a positive divisor of the 1 processes started\n"


@pytest.mark.slow
@pytest.mark.multigpu
def test_torchrun_sft_on_masked_chats_matches_one_process(one_process, tmp_path):
    """Chats leave a different number of assistant tokens on each rank: the loss is still the
    one-process loss of the global batch."""
    sft_args = ["sft", "--model", one_process, "--data", "builtin:arithmetic:level=1:n=50", "--steps", 3,
                "batch_size=4", "seq_len=96"]
    assert main([str(a) for a in sft_args] + ["--out", str(tmp_path / "one")]) == 0
    proc = torchrun(tmp_path, 2, *sft_args, "--dp", 2, "--ep", 2, "--out", tmp_path / "two")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max(abs(a - b) for a, b in zip(losses(tmp_path / "two"), losses(tmp_path / "one"))) <= LOSS_TOL
    assert (tmp_path / "two" / "final" / "model.safetensors").is_file()
