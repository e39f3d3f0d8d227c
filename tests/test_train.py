"""Training end to end on the CPU: the loss falls, metrics and plots, a killed run resumes to
the losses of an uninterrupted one (bit for bit), a kill during a save leaves a usable run,
Ctrl-C saves the step it finishes and the printed command resumes it exactly, non-finite
steps are skipped then stop the run, SFT learns only assistant tokens, every train field is
checked before any work, one-line errors, and `nanoseek eval` on a trained model.

Kills and Ctrl-Cs are signals (SIGKILL, SIGINT) a subprocess sends itself from a hooked
function (the hook only chooses the moment; the process gets them as from `kill -9` or a
terminal), so each lands at a known point.
"""

import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import nanoseek
from nanoseek.cli import main
from nanoseek.config import ConfigError
from nanoseek.data.datasets import load_chats
from nanoseek.data.loader import IGNORE, PackedLoader, SFTLoader, tokenize_chat
from nanoseek.train.checkpoint import LATEST, TMP_PREFIX, latest_checkpoint, step_dir_name
from nanoseek.train.metrics import read_metrics
from nanoseek.train.stages import pretrain, sft, train_config
from nanoseek.rl.trainer import GRPOConfig
from nanoseek.train.trainer import TrainConfig, Trainer, TrainingError

REPO = Path(__file__).resolve().parents[1]
DATA = "builtin:arithmetic:level=1:n=300"
RUN_ARGS = ["--preset", "tiny", "--data", DATA, "--steps", "12", "--save-every", "3",
            "batch_size=4", "seq_len=32"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose much when the cores are shared;
    runs compared bit for bit must use one thread count (subprocesses: OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def subprocess_env() -> dict:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)]


def steps(run_dir) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir)]


def tmp_entries(run_dir) -> list[str]:
    return [p.name for p in (Path(run_dir) / "checkpoints").iterdir() if p.name.startswith(TMP_PREFIX)]


# ---------------------------------------------------------------------- a short pretraining run
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """40 steps of the tiny model on arithmetic documents (shared by the loss, SFT and eval tests)."""
    out = tmp_path_factory.mktemp("pretrain")
    cfg = train_config(steps=40, batch_size=4, seq_len=64, lr=3e-3, warmup=5)
    trainer, tok, records = pretrain(nanoseek.preset("tiny"), cfg, "builtin:arithmetic:level=1:n=500",
                                     out, progress=False)
    return out, trainer, tok, records


def test_loss_falls_and_the_run_leaves_metrics_plots_and_a_loadable_model(trained):
    out, trainer, tok, records = trained
    loss = [r["loss"] for r in records]
    first, last = sum(loss[:5]) / 5, sum(loss[-5:]) / 5
    assert all(math.isfinite(v) for v in loss)
    assert last < first - 2.0 and last < 0.6 * first, (first, last)

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 41))
    assert [r["loss"] for r in lines] == loss
    moe_layers = {str(i) for i in trainer.model.routers()}
    assert moe_layers == {"1", "2", "3"}  # layers 1-2 and the MTP layer; layer 0 is dense
    for r in lines:
        assert set(r["maxvio"]) == moe_layers and all(v >= 0 for v in r["maxvio"].values())
        assert r["tokens"] == 4 * 64 and r["tokens_per_s"] > 0
        assert r["skipped"] is False and r["skipped_total"] == 0
        assert math.isfinite(r["main_loss"]) and math.isfinite(r["mtp_loss"])
    for name in ("loss.png", "maxvio.png"):
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the default save_every: every tenth of the run, the last keep_last=3 kept
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == [step_dir_name(s) for s in (32, 36, 40)]

    loaded = nanoseek.from_pretrained(out / "final")
    assert (out / "final" / "tokenizer.json").is_file()
    ids = torch.tensor([tok.encode("Question: What is 12 + 7?\nSolution:")])
    with torch.no_grad():
        want = trainer.model.eval()(ids).logits
        got = loaded(ids).logits
    assert torch.equal(got, want)


# ---------------------------------------------------------------------- kill and resume
RUNNER = textwrap.dedent("""
    import os, shutil, signal, sys
    from nanoseek import cli
    from nanoseek.train import checkpoint, metrics

    where, attr, when, signals = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
    owner = {"checkpoint": checkpoint, "MetricsLogger": metrics.MetricsLogger, "shutil": shutil}[where]
    original = getattr(owner, attr)

    def hooked(*args, **kwargs):
        if eval(when):
            for name in signals:
                os.kill(os.getpid(), getattr(signal, name))
        return original(*args, **kwargs)

    setattr(owner, attr, hooked)
    sys.exit(cli.main(sys.argv[5:]))
""")


def signalled_run(out: Path, where: str, attr: str, when: str, signals: str, *extra: str):
    """`nanoseek train RUN_ARGS` in a subprocess that sends itself `signals` (comma-joined
    names) when `owner.attr` is called with arguments that make the expression `when` true."""
    proc = subprocess.run([sys.executable, "-c", RUNNER, where, attr, when, signals, "train", *RUN_ARGS,
                           *extra, "--out", str(out)],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert not (out / "final").exists()
    return proc


def killed_run(out: Path, where: str, attr: str, when: str, *extra: str) -> None:
    proc = signalled_run(out, where, attr, when, "SIGKILL", *extra)
    assert proc.returncode == -9, proc.stderr[-2000:]  # killed, not finished nor failed


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert main(["train", *RUN_ARGS, "--out", str(out)]) == 0
    assert steps(out) == list(range(1, 13))
    return out


def test_sigkill_and_resume_equals_an_uninterrupted_run(tmp_path, uninterrupted, capsys):
    run = tmp_path / "run"
    # dies after step 9's update, before its metrics line and its checkpoint: steps 7-9 are lost
    killed_run(run, "MetricsLogger", "log", "args[1] == 9")
    assert latest_checkpoint(run).name == step_dir_name(6)
    assert steps(run) == list(range(1, 9))
    assert losses(run) == losses(uninterrupted)[:8]

    rc, out, err = cli(capsys, "train", *RUN_ARGS, "--out", run, "--resume")
    assert rc == 0, err
    assert "trained to step 12" in out
    assert steps(run) == list(range(1, 13))  # 7 and 8 were truncated, then logged again
    assert losses(run) == losses(uninterrupted)  # bit for bit
    a = nanoseek.from_pretrained(uninterrupted / "final").state_dict()
    b = nanoseek.from_pretrained(run / "final").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name, status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_ctrl_c_saves_the_step_it_finishes_and_the_printed_command_resumes_exactly(tmp_path, uninterrupted,
                                                                                   capsys, name, status):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's or `timeout`'s stop) while step 5 logs: the
    step finishes and is saved (save_every is 3), the process exits 128 + the signal's number
    (as a shell reports a command the signal ended) with one line naming the checkpoint and
    the command that continues the run; that command resumes bit for bit."""
    run = tmp_path / "run"
    proc = signalled_run(run, "MetricsLogger", "log", "args[1] == 5", name)
    assert proc.returncode == status and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"{name.replace('SIGINT', 'Ctrl-C')}: stopping after this step to save a checkpoint" in proc.stderr
    command = ["train", *RUN_ARGS, "--out", str(run), "--resume"]
    assert proc.stderr.splitlines()[-1] == (
        f"nanoseek: interrupted: pretrain stopped at step 5 of 12; checkpoint saved in "
        f"{run / 'checkpoints' / step_dir_name(5)}; continue with: nanoseek {shlex.join(command)}")
    assert latest_checkpoint(run).name == step_dir_name(5)
    assert steps(run) == [1, 2, 3, 4, 5] and losses(run) == losses(uninterrupted)[:5]

    rc, out, err = cli(capsys, *command)
    assert rc == 0, err
    assert "trained to step 12" in out
    assert losses(run) == losses(uninterrupted)  # bit for bit
    assert "pretrain 12/12 steps (100%): loss=" in err  # the progress line of a log, not a terminal


@pytest.mark.parametrize("signals", ["SIGINT,SIGINT", "SIGTERM,SIGINT"])
def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path, signals):
    run = tmp_path / "run"
    proc = signalled_run(run, "MetricsLogger", "log", "args[1] == 5", signals)
    assert proc.returncode == 130 and proc.stderr.splitlines()[-1] == "nanoseek: interrupted"
    assert "Traceback" not in proc.stderr
    assert latest_checkpoint(run).name == step_dir_name(3)  # step 5 was not saved


# (hooked function, kill condition, extra args, checkpoint `latest_checkpoint` names after the kill)
KILLS_DURING_SAVE = {
    # the model is in the temporary directory, the optimizer state is being written
    "writing": ("checkpoint", "save_file", "'step_00000006' in str(args[1])", (), 3),
    # every file written, the directory not yet renamed into place
    "before-rename": ("checkpoint", "_fsync_dir_tree", "'step_00000006' in str(args[0])", (), 3),
    # step_6 complete under its name, but `latest` still names step_3
    "before-latest": ("checkpoint", "_point_latest", "args[1] == 'step_00000006'", (), 3),
    # latest names step_6; step_3 was renamed aside and is being deleted
    "pruning": ("shutil", "rmtree", "'delete-step_00000003' in str(args[0])", ("keep_last=1",), 6),
}


@pytest.mark.parametrize("moment", KILLS_DURING_SAVE)
def test_a_kill_during_a_save_leaves_a_complete_checkpoint_to_resume(tmp_path, uninterrupted, capsys, moment):
    where, attr, when, extra, expect = KILLS_DURING_SAVE[moment]
    run = tmp_path / "run"
    killed_run(run, where, attr, when, *extra)
    latest = latest_checkpoint(run)
    assert latest.name == step_dir_name(expect)
    assert json.loads((latest / "trainer_state.json").read_text())["step"] == expect
    assert nanoseek.from_pretrained(latest) is not None  # complete: its weights load
    if moment in ("writing", "before-rename"):
        assert not (run / "checkpoints" / step_dir_name(6)).exists() and tmp_entries(run)
    if moment == "before-latest":
        assert (run / "checkpoints" / LATEST).read_text().strip() == step_dir_name(3)
    assert steps(run) == list(range(1, 7))

    rc, _, err = cli(capsys, "train", *RUN_ARGS, *extra, "--out", run, "--resume")
    assert rc == 0, err
    assert steps(run) == list(range(1, 13))
    assert losses(run) == losses(uninterrupted)
    assert latest_checkpoint(run).name == step_dir_name(12)
    assert tmp_entries(run) == []  # what the kill left was cleaned up
    kept = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert kept == ([step_dir_name(12)] if extra else [step_dir_name(s) for s in (6, 9, 12)])


# ---------------------------------------------------------------------- non-finite steps
def poisoned_trainer(tmp_path, bad_steps: set[int], steps_: int, max_bad_steps: int):
    """A tiny model whose embedding output turns NaN in the forward passes of `bad_steps`;
    records a copy of the weights and buffers before every forward."""
    torch.manual_seed(0)
    model = nanoseek.Transformer(nanoseek.preset("tiny", vocab_size=256))
    docs = [torch.randint(3, 256, (int(n),)).tolist() for n in torch.randint(20, 60, (60,))]
    loader = PackedLoader(docs, batch_size=4, seq_len=32)
    cfg = train_config(steps=steps_, batch_size=4, seq_len=32, warmup=2, max_bad_steps=max_bad_steps)
    snapshots = []

    def before(module, args):
        snapshots.append({k: v.clone() for k, v in module.state_dict().items()})

    def poison(module, args, output):
        if len(snapshots) in bad_steps:
            return output * float("nan")

    model.register_forward_pre_hook(before)
    model.model.embed_tokens.register_forward_hook(poison)
    return Trainer(model, loader, cfg, tmp_path), snapshots


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_steps_are_skipped_and_the_run_goes_on(tmp_path):
    bad = {3, 5, 6}
    trainer, snapshots = poisoned_trainer(tmp_path, bad, steps_=10, max_bad_steps=3)
    records = trainer.fit(progress=False)

    assert [r["step"] for r in records] == list(range(1, 11))
    assert [r["skipped"] for r in records] == [s in bad for s in range(1, 11)]
    assert [r["skipped_total"] for r in records] == [0, 0, 1, 1, 2, 3, 3, 3, 3, 3]
    assert [math.isnan(r["loss"]) for r in records] == [s in bad for s in range(1, 11)]
    assert read_metrics(tmp_path)[-1]["skipped_total"] == 3 and trainer.skipped_total == 3
    # snapshots[s - 1] is the state before step s: a skipped step changes nothing (weights,
    # router bias), a good one changes the weights
    for s in range(1, 10):
        assert same(snapshots[s - 1], snapshots[s]) == (s in bad), s
    adam_steps = {float(st["step"]) for st in trainer.optimizer.state.values()}
    assert adam_steps == {10.0 - len(bad)}
    state = json.loads((latest_checkpoint(tmp_path) / "trainer_state.json").read_text())
    assert state["skipped_total"] == 3 and state["bad_in_a_row"] == 0


def test_max_bad_steps_in_a_row_stop_the_run_naming_the_learning_rate(tmp_path):
    trainer, _ = poisoned_trainer(tmp_path, {2, 3, 4, 5, 6}, steps_=10, max_bad_steps=3)
    message = r"3 steps in a row .* \(last at step 4\).*Lower the learning rate"
    with pytest.raises(TrainingError, match=message):
        trainer.fit(progress=False)
    assert trainer.step == 4 and trainer.skipped_total == 3


def test_a_finite_loss_with_an_inf_gradient_skips_the_whole_step(tmp_path):
    """What an FP8 overflow in the backward looks like: the loss is finite, one gradient is
    not. The step must leave the weights, the router bias and AdamW's state as they were and
    drop its expert loads, so that the next bias update counts the next step's tokens only.
    A trainer that checked the loss alone would step on the poisoned gradient (clipping by an
    inf norm turns it into NaN weights) and update the bias from the bad step's loads."""
    torch.manual_seed(0)
    model = nanoseek.Transformer(nanoseek.preset("tiny", vocab_size=256))
    docs = [torch.randint(3, 256, (int(n),)).tolist() for n in torch.randint(20, 60, (60,))]
    trainer = Trainer(model, PackedLoader(docs, batch_size=4, seq_len=32),
                      train_config(steps=4, batch_size=4, seq_len=32, warmup=1), tmp_path)
    routers = list(model.routers().values())
    before = []  # before each step's forward: weights and buffers, AdamW state, routers' loads

    def snapshot(module, args):
        before.append(({k: v.clone() for k, v in module.state_dict().items()},
                       {id(p): {k: v.clone() for k, v in s.items()} for p, s in trainer.optimizer.state.items()},
                       [r.load.clone() for r in routers]))

    def poison(grad):  # one element of one weight's gradient, in step 2's backward only
        if trainer.step != 1:
            return grad
        grad = grad.clone()
        grad[0, 0] = float("inf")
        return grad

    model.register_forward_pre_hook(snapshot)
    model.model.layers[1].self_attn.q_a_proj.weight.register_hook(poison)
    records = trainer.fit(progress=False)

    assert [r["skipped"] for r in records] == [False, True, False, False]
    assert math.isfinite(records[1]["loss"]) and not math.isfinite(records[1]["grad_norm"])
    weights_2, adam_2, _ = before[1]
    weights_3, adam_3, loads_3 = before[2]
    assert same(weights_2, weights_3)  # weights and the router bias (a buffer) unchanged
    assert adam_2.keys() == adam_3.keys() and all(same(adam_2[p], adam_3[p]) for p in adam_2)
    assert all(not load.any() for load in loads_3)  # the bad step's loads were dropped
    assert not same(before[2][0], before[3][0])  # the next step updates again
    assert {float(s["step"]) for s in trainer.optimizer.state.values()} == {3.0}


def test_cli_too_high_learning_rate_is_one_error_line(tmp_path, capsys):
    # lr 1e30: step 1's update blows the weights up, every later forward overflows
    rc, _, err = cli(capsys, "train", "--preset", "tiny", "--data", DATA, "--steps", "8",
                     "--out", tmp_path, "batch_size=4", "seq_len=32", "lr=1e30", "max_bad_steps=2")
    assert rc == 2
    last = err.strip().splitlines()[-1]  # above it: the per-step "update skipped" notes
    assert last.startswith("nanoseek: error: 2 steps in a row had a non-finite loss")
    assert "Lower the learning rate (lr=1e+30)" in last
    assert [r["skipped"] for r in read_metrics(tmp_path)] == [False, True]


# ---------------------------------------------------------------------- SFT loss masking
def test_sft_learns_assistant_tokens_only(tmp_path, trained):
    base_run, _, _, _ = trained
    data = "builtin:arithmetic:level=1:n=50"
    cfg = train_config(steps=6, batch_size=4, seq_len=96, lr=1e-3, warmup=2)
    trainer, tok, records = sft(base_run, cfg, data, tmp_path, progress=False)
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) and not r["skipped"] for r in records)
    assert (tmp_path / "final" / "config.json").is_file()

    # the first batch the trainer saw, rebuilt the way sft() builds its loader
    src = base_run / "final"
    chats = load_chats(data)
    loader = SFTLoader([tokenize_chat(tok, c) for c in chats], 4, 96, seed=cfg.seed, pad_id=tok.pad_id)
    batch = loader.next_batch()
    ids, labels = batch["input_ids"], batch["labels"]
    answers = {c[-1]["content"] for c in chats}
    for row_ids, row_labels in zip(ids.tolist(), labels.tolist()):
        assert row_ids[:2] == [tok.bos_id, tok.user_id]
        start = row_ids.index(tok.assistant_id) + 1  # first assistant content token
        end = row_ids.index(tok.eos_id, start) + 1   # through the closing eos
        assert all(t == tok.pad_id for t in row_ids[end:]) and end < 96  # padded, not truncated
        assert row_labels[:start] == [IGNORE] * start  # bos, user turn, <|Assistant|>
        assert row_labels[start:end] == row_ids[start:end]
        assert row_labels[end:] == [IGNORE] * (96 - end)  # padding
        assert tok.decode(row_ids[start:end - 1]) in answers

    # the model's main loss on it = cross entropy over the assistant positions only, by hand
    model = nanoseek.from_pretrained(src)
    with torch.no_grad():
        out = model(ids, labels=labels)
    logp = F.log_softmax(out.logits[:, :-1].float(), dim=-1)
    target = labels[:, 1:]
    keep = target != IGNORE
    manual = -logp[keep].gather(1, target[keep][:, None]).mean()
    assert keep.sum() == (labels != IGNORE).sum() > 0
    assert torch.allclose(out.main_loss, manual, rtol=1e-5, atol=0)
    assert records[0]["main_loss"] == pytest.approx(float(manual), rel=1e-5)  # what step 1 logged
    every_token = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert abs(float(every_token) - float(manual)) > 0.1  # the mask matters


def test_sft_seq_len_shorter_than_every_prompt_is_one_line(tmp_path, trained, capsys):
    base_run = trained[0]
    rc, _, err = cli(capsys, "sft", "--model", base_run, "--data", "builtin:arithmetic:level=1:n=20",
                     "--steps", "4", "--out", tmp_path, "batch_size=4", "seq_len=8")
    assert rc == 2 and err.count("\n") == 1
    assert "seq_len=8 cuts every chat before its assistant reply" in err  # not "lower the lr"


# ---------------------------------------------------------------------- clear errors
def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_cli_bad_data_file_names_file_and_line(tmp_path, capsys):
    bad = write(tmp_path / "docs.jsonl", '{"text": "one"}\n{"text": "two"\n{"text": "three"}\n')
    table = write(tmp_path / "docs.csv", "text\none\n")
    missing = tmp_path / "nope.txt"
    cases = [(bad, f"{bad}:2: malformed JSON"), (missing, f"{missing}: no such file"),
             (table, f"{table}: unknown data format '.csv'")]
    for data, message in cases:
        rc, _, err = cli(capsys, "train", "--preset", "tiny", "--data", data, "--steps", "2",
                         "--out", tmp_path / "run")
        assert rc == 2 and err.count("\n") == 1 and err.startswith("nanoseek: error: "), err
        assert message in err
    assert not (tmp_path / "run").exists()  # nothing written before the data was read


def test_cli_bad_data_exits_2_from_a_real_process(tmp_path):
    bad = write(tmp_path / "docs.jsonl", '{"text": "one"}\nnot json\n')
    proc = subprocess.run([sys.executable, "-m", "nanoseek.cli", "train", "--preset", "tiny", "--data",
                           str(bad), "--steps", "2", "--out", str(tmp_path / "run")],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"nanoseek: error: {bad}:2: malformed JSON (Expecting value)\n"


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "argument --steps: must be positive, got 0"),
    (["--steps", "2", "bogus_field=1"], "unknown config field 'bogus_field'"),
    (["--steps", "2", "schedule=sideways"], "train field 'schedule' = 'sideways'"),
    (["--steps", "2", "seq_len=0"], "train field 'seq_len' = 0: must be a positive integer"),
])
def test_cli_bad_arguments_are_one_line(tmp_path, capsys, argv, message):
    rc, _, err = cli(capsys, "train", "--preset", "tiny", "--data", DATA, "--out", tmp_path / "run", *argv)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("nanoseek: error: "), err
    assert message in err


def wrong_type(field) -> object:
    """A value of another type than the field's annotation allows."""
    return 5 if field.type == "str" else [1] if field.type == "dict" else "abc"


@pytest.mark.parametrize("config", [TrainConfig, GRPOConfig])
def test_every_field_is_type_checked(config):
    for field in dataclasses.fields(config):
        with pytest.raises(ConfigError, match=rf"^{config.kind} field '{field.name}' = .*: must be "):
            config(**{field.name: wrong_type(field)})
    with pytest.raises(ConfigError, match="'lr' = inf: must be a finite number"):
        config(lr=float("inf"))
    with pytest.raises(ConfigError, match="'steps' = True: must be int"):  # a bool is no count
        config(steps=True)


@pytest.mark.parametrize("changes", [
    dict(steps=0), dict(batch_size=0), dict(seq_len=0), dict(grad_accum=0), dict(max_bad_steps=0),
    dict(warmup=-1), dict(keep_last=-1), dict(seed=-1), dict(save_every=-1), dict(lr=0.0),
    dict(min_lr_ratio=1.5), dict(decay_frac=-0.1), dict(weight_decay=-0.1), dict(grad_clip=-1.0),
    dict(schedule="sideways"), dict(precision="fp16"),
])
def test_train_fields_are_range_checked(changes):
    [(name, value)] = changes.items()
    with pytest.raises(ConfigError, match=rf"^train field '{name}' = {value!r}: "):
        TrainConfig(**changes)


def test_sft_takes_train_fields_only(tmp_path, capsys):
    rc, _, err = cli(capsys, "sft", "--model", tmp_path, "--data", DATA, "--steps", "2",
                     "--out", tmp_path / "sft", "hidden_size=32")
    assert rc == 2 and "sft takes train fields only, not hidden_size=32" in err


def test_existing_run_without_resume_is_refused_and_left_intact(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--steps", "2", "--out", run, "batch_size=4", "seq_len=32"]
    assert cli(capsys, *args, "--data", DATA)[0] == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and "tb" not in p.parts}

    # other data (another tokenizer would be trained): refused before anything is written
    rc, _, err = cli(capsys, *args, "--data", "builtin:countdown:level=1:n=50")
    assert rc == 2 and err.count("\n") == 1
    assert f"{run} already holds checkpoints of a run: pass --resume" in err
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and "tb" not in p.parts}
    assert after == before
    # and the run can still be continued
    rc, _, err = cli(capsys, *args[:4], "4", *args[5:], "--data", DATA, "--resume")
    assert rc == 0, err
    assert steps(run) == [1, 2, 3, 4]


# ---------------------------------------------------------------------- eval
def test_cli_eval_prints_greedy_accuracy(trained, capsys):
    run, _, _, _ = trained
    rc, out, err = cli(capsys, "eval", "--model", run, "--task", "arithmetic", "--level", "1", "--n", "8")
    assert rc == 0, err
    assert "eval arithmetic level 1 8/8 answers (100%): correct=" in err  # progress
    result = json.loads(out)
    assert result["task"] == "arithmetic" and result["level"] == 1 and result["n"] == 8
    assert 0.0 <= result["greedy_accuracy"] <= 1.0
    assert (result["greedy_accuracy"] * 8).is_integer()


def test_resume_without_a_checkpoint_starts_a_seeded_fresh_run(tmp_path):
    """--resume on an empty run directory is a fresh run: seeded, and equal to one."""
    from nanoseek import preset
    from nanoseek.train.stages import pretrain, train_config
    cfg = train_config(steps=3, batch_size=2, seq_len=32, warmup=1)
    data = "builtin:arithmetic:level=1:n=50"
    torch.manual_seed(123)  # disturbed global RNG: the run must seed itself either way
    _, _, fresh = pretrain(preset("tiny"), cfg, data, tmp_path / "a", progress=False)
    torch.manual_seed(456)
    _, _, resumed = pretrain(preset("tiny"), cfg, data, tmp_path / "b", resume=True, progress=False)
    assert [r["loss"] for r in fresh] == [r["loss"] for r in resumed]


def test_resume_refuses_a_checkpoint_of_another_kind_of_run(tmp_path):
    """Trainer and GRPOTrainer share save/resume (train.trainer.Checkpointed): a run
    directory holding another stage's checkpoint is refused, naming both stages, before
    anything of it is loaded."""
    from nanoseek import preset
    from nanoseek.data.tokenizer import ChatTokenizer, byte_tokenizer
    from nanoseek.rl.trainer import GRPOTrainer, grpo_config
    from nanoseek.train.stages import pretrain, train_config
    from nanoseek.hf import CheckpointError
    trainer, _, _ = pretrain(preset("tiny"), train_config(steps=1, batch_size=2, seq_len=32, warmup=1),
                             "builtin:arithmetic:level=1:n=20", tmp_path, progress=False)
    trainer.stage, trainer.step = "sft", 0  # a refused resume leaves both as they are
    with torch.no_grad():
        trainer.model.lm_head.weight.fill_(0.5)
    with pytest.raises(CheckpointError, match="holds a 'pretrain' run, not a 'sft' run"):
        trainer.resume()
    assert (trainer.model.lm_head.weight == 0.5).all() and trainer.step == 0
    grpo = GRPOTrainer(trainer.model, ChatTokenizer(byte_tokenizer(trainer.model.config.vocab_size)),
                       "arithmetic", grpo_config(steps=1, beta=0.0), tmp_path)
    with pytest.raises(CheckpointError, match="not a 'grpo' run"):
        grpo.resume()
    assert (trainer.model.lm_head.weight == 0.5).all()
    trainer.stage = "pretrain"
    assert trainer.resume() and trainer.step == 1
