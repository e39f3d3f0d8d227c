"""train/checkpoint.py: exact resume (weights, router bias, AdamW state, RNGs), keep_last,
atomicity under a kill, clear errors for a corrupt checkpoint."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import nanoseek
from nanoseek.data.tokenizer import byte_tokenizer, save_tokenizer
from nanoseek.hf import CheckpointError
from nanoseek.train import checkpoint as ck
from nanoseek.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from nanoseek.train.optim import build_optimizer
from nanoseek.train.step import train_step

REPO = Path(__file__).resolve().parents[1]
CONFIG = nanoseek.preset("tiny")


def make(seed=0):
    torch.manual_seed(seed)
    model = nanoseek.Transformer(CONFIG)
    return model, build_optimizer(model, lr=3e-3)


def train(model, opt, n):
    """n steps on batches drawn from the global torch RNG (so a restored RNG redraws them)."""
    losses = []
    for _ in range(n):
        ids = torch.randint(0, CONFIG.vocab_size, (2, 16))
        stats = train_step(model, [{"input_ids": ids, "labels": ids}], opt)
        losses.append(stats["loss"])
    return losses


def snapshot(model, opt):
    sd = opt.state_dict()
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {i: {k: v.clone() for k, v in s.items()} for i, s in sd["state"].items()})


def assert_same_model(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def assert_same_opt_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for i in a:
        assert a[i].keys() == b[i].keys()
        for k in a[i]:
            assert a[i][k].dtype == b[i][k].dtype and torch.equal(a[i][k], b[i][k]), (i, k)


def routers_bias(model):
    return {i: r.e_score_correction_bias for i, r in model.routers().items()}


@pytest.fixture(scope="module")
def trained():
    model, opt = make(0)
    train(model, opt, 3)
    return model, opt


def test_round_trip_continues_bit_identically(tmp_path):
    model, opt = make(0)
    train(model, opt, 3)
    assert all(b.abs().sum() > 0 for b in routers_bias(model).values())  # the bias has moved
    tok_dir = tmp_path / "tok"
    save_tokenizer(byte_tokenizer(CONFIG.vocab_size), tok_dir)
    state = {"step": 3, "schedule": {"lr": 3e-3, "warmup": 2}, "loader": {"epoch": 0, "offset": 96},
             "tokens_seen": 96, "config": {"seq_len": 16}}
    random.seed(11)
    np.random.seed(12)
    ckpt = save_checkpoint(tmp_path / "run", 3, model, opt, state, tokenizer_dir=tok_dir)
    assert ckpt == tmp_path / "run" / "checkpoints" / "step_00000003"
    assert latest_checkpoint(tmp_path / "run") == ckpt
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(
        ["config.json", "model.safetensors", "optimizer.safetensors", "optimizer.json",
         "trainer_state.json", "rng.safetensors", "rng.json", "tokenizer.json", "tokenizer_config.json"])
    saved_model, saved_opt = snapshot(model, opt)
    saved_bias = {i: b.clone() for i, b in routers_bias(model).items()}

    # the original run goes on
    losses_a = train(model, opt, 4)
    draws_a = (random.random(), float(np.random.rand()))
    final_a = {k: v.clone() for k, v in model.state_dict().items()}

    # a fresh process-like start: other init, other RNG states, then resume
    model_b, opt_b = make(1)
    torch.manual_seed(999)
    random.seed(0)
    np.random.seed(0)
    got = load_checkpoint(tmp_path / "run", model_b, opt_b)
    assert got == state
    assert_same_model(saved_model, model_b.state_dict())
    for i, b in routers_bias(model_b).items():
        assert b.dtype == torch.float32 and torch.equal(b, saved_bias[i])
    assert_same_opt_state(saved_opt, {i: s for i, s in opt_b.state_dict()["state"].items()})
    assert opt_b.param_groups[0]["betas"] == opt.param_groups[0]["betas"]
    assert isinstance(opt_b.param_groups[0]["betas"], tuple)

    losses_b = train(model_b, opt_b, 4)
    assert losses_b == losses_a  # exact floats
    assert_same_model(final_a, model_b.state_dict())
    assert (random.random(), float(np.random.rand())) == draws_a


def test_checkpoint_is_an_hf_checkpoint_and_paths_resolve(tmp_path, trained):
    model, opt = trained
    ckpt = save_checkpoint(tmp_path, 7, model, opt, {"step": 7})
    hf = nanoseek.from_pretrained(ckpt)  # the model part loads on its own
    ids = torch.randint(0, CONFIG.vocab_size, (1, 8))
    model.eval()
    try:
        assert torch.equal(hf(ids).logits, model(ids).logits)
    finally:
        model.train()
    for where in (tmp_path, tmp_path / "checkpoints", ckpt):
        assert ck.resolve_checkpoint(where) == ckpt
    # weights only (no optimizer), rng untouched when asked
    m2, _ = make(2)
    rng = torch.get_rng_state()
    assert load_checkpoint(ckpt, m2, restore_rng=False) == {"step": 7}
    assert torch.equal(torch.get_rng_state(), rng)
    assert_same_model(model.state_dict(), m2.state_dict())


def test_optimizer_state_matched_by_name_not_position(tmp_path, trained):
    model, opt = trained
    save_checkpoint(tmp_path, 3, model, opt, {"step": 3})
    m2, _ = make(0)
    # the same groups with their parameters listed in reverse order
    groups = [{"params": list(reversed(g["params"])), "weight_decay": g["weight_decay"]}
              for g in build_optimizer(m2, lr=3e-3).param_groups]
    opt2 = torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95))
    load_checkpoint(tmp_path, m2, opt2)
    p1 = dict(model.named_parameters())
    p2 = dict(m2.named_parameters())
    for name in p1:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p1[name]][key], opt2.state[p2[name]][key]), (name, key)


def test_keep_last(tmp_path, trained):
    model, opt = trained
    for step in (10, 20, 30, 40, 50):
        save_checkpoint(tmp_path, step, model, None, {"step": step}, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000040", "step_00000050"]
    assert latest_checkpoint(tmp_path) == root / "step_00000050"
    # saving the same step again replaces it
    save_checkpoint(tmp_path, 50, model, None, {"step": 50, "again": True}, keep_last=2)
    assert json.loads((root / "step_00000050" / "trainer_state.json").read_text())["again"]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000040", "step_00000050"]


@pytest.mark.parametrize("where, work_first", [("_save_optimizer", True), ("_fsync_dir_tree", True),
                                               ("_rename_into_place", False), ("_point_latest", False)])
def test_save_failing_midway_keeps_previous(tmp_path, trained, monkeypatch, where, work_first):
    model, opt = trained
    first = save_checkpoint(tmp_path, 1, model, opt, {"step": 1})
    original = getattr(ck, where)

    def boom(*args, **kwargs):
        if work_first:
            original(*args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(ck, where, boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, model, opt, {"step": 2}, keep_last=1)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == first
    assert (first / "model.safetensors").exists() and (first / "optimizer.safetensors").exists()
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    m2, o2 = make(1)
    assert load_checkpoint(tmp_path, m2, o2) == {"step": 1}


KILLED_SAVE = textwrap.dedent("""
    import shutil, sys, time, torch, nanoseek
    from nanoseek.train import checkpoint as ck
    from nanoseek.train.optim import build_optimizer
    from nanoseek.train.step import train_step
    run_dir, phase, marker = sys.argv[1:4]
    torch.manual_seed(0)
    model = nanoseek.Transformer(nanoseek.preset("tiny"))
    opt = build_optimizer(model, lr=3e-3)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    train_step(model, [{"input_ids": ids, "labels": ids}], opt)
    ck.save_checkpoint(run_dir, 1, model, opt, {"step": 1})

    def stall(*args, **kwargs):
        open(marker, "w").close()
        time.sleep(120)

    if phase == "writing":     # killed with optimizer.safetensors half written
        def half_written(tensors, path, metadata=None):
            open(path, "wb").write(b"\\x00" * 100)
            stall()
        ck.save_file = half_written
    elif phase == "latest":    # killed after the rename, before latest moves
        ck._point_latest = stall
    elif phase == "pruning":   # killed while deleting the old checkpoint
        ck.shutil.rmtree = stall
    ck.save_checkpoint(run_dir, 2, model, opt, {"step": 2}, keep_last=1)
""")


def test_killed_save_leaves_previous_checkpoint(tmp_path):
    script = tmp_path / "save.py"
    script.write_text(KILLED_SAVE)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    procs = {}
    for phase in ("writing", "latest", "pruning"):
        run, marker = tmp_path / phase, tmp_path / f"{phase}.marker"
        procs[phase] = subprocess.Popen([sys.executable, str(script), str(run), phase, str(marker)],
                                        env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    for phase, proc in procs.items():
        while not (tmp_path / f"{phase}.marker").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, f"{phase}: never reached the kill point"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def tmp_entries(run):
        return [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]

    root = tmp_path / "writing" / "checkpoints"
    assert latest_checkpoint(tmp_path / "writing") == root / "step_00000001"
    assert not (root / "step_00000002").exists() and tmp_entries(tmp_path / "writing")
    # kill after the rename: latest still names step 1, which is complete
    assert latest_checkpoint(tmp_path / "latest") == tmp_path / "latest" / "checkpoints" / "step_00000001"
    # kill while pruning: latest already names step 2; step 1 is out of sight in a .tmp- dir
    root = tmp_path / "pruning" / "checkpoints"
    assert latest_checkpoint(tmp_path / "pruning") == root / "step_00000002"
    assert not (root / "step_00000001").exists() and tmp_entries(tmp_path / "pruning")

    for phase in procs:
        model, opt = make(1)
        state = load_checkpoint(tmp_path / phase, model, opt)  # complete, and loads
        assert state["step"] in (1, 2)
    # a load removes what a dead writer left behind
    assert not tmp_entries(tmp_path / "pruning")
    # the next save removes it too, and goes on normally
    (tmp_path / "writing" / "checkpoints" / ".tmp-step_00000002-host=x-pid=1-abc").mkdir()
    save_checkpoint(tmp_path / "writing", 3, model, opt, {"step": 3}, keep_last=1)
    assert not tmp_entries(tmp_path / "writing")
    assert sorted(p.name for p in (tmp_path / "writing" / "checkpoints").iterdir()) == \
        ["latest", "step_00000003"]


def test_load_cleanup_spares_a_live_writer(tmp_path, trained):
    model, opt = trained
    save_checkpoint(tmp_path, 1, model, None, {"step": 1})
    live = tmp_path / "checkpoints" / f".tmp-step_00000002-host={ck.socket.gethostname()}-pid={os.getppid()}-x"
    live.mkdir()
    load_checkpoint(tmp_path, make(1)[0])
    assert live.exists()


def corrupt_garbage(path):
    path.write_bytes(b"this is not a safetensors file at all")


def corrupt_truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name, corrupt", [
    ("optimizer.safetensors", corrupt_garbage),
    ("optimizer.safetensors", corrupt_truncate),
    ("optimizer.json", lambda p: p.write_text("{not json")),
    ("optimizer.safetensors", Path.unlink),
    ("model.safetensors", corrupt_truncate),
    ("trainer_state.json", lambda p: p.write_text("[1, 2")),
    ("rng.safetensors", corrupt_garbage),
])
def test_corrupt_checkpoint_names_the_file(tmp_path, trained, name, corrupt):
    model, opt = trained
    ckpt = save_checkpoint(tmp_path, 3, model, opt, {"step": 3})
    corrupt(ckpt / name)
    m2, o2 = make(1)
    before = {k: v.clone() for k, v in m2.state_dict().items()}
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_checkpoint(tmp_path, m2, o2)
    if name != "model.safetensors":  # checked before anything is touched
        assert_same_model(before, m2.state_dict())
        assert not o2.state


def test_missing_checkpoint_and_mismatched_optimizer(tmp_path, trained):
    model, opt = trained
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nothing", model)
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert latest_checkpoint(tmp_path / "empty") is None
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(tmp_path / "empty", model)
    save_checkpoint(tmp_path / "run", 3, model, opt, {"step": 3})
    m2, _ = make(1)
    one_group = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    with pytest.raises(CheckpointError, match="param groups"):
        load_checkpoint(tmp_path / "run", m2, one_group)
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path / "run", 4, model, opt, {"step": torch.tensor(4)})
    assert latest_checkpoint(tmp_path / "run").name == "step_00000003"


def test_config_difference_warns_and_mixed_dtypes_refused(tmp_path, trained):
    model, opt = trained
    save_checkpoint(tmp_path, 3, model, opt, {"step": 3})
    other = nanoseek.Transformer(CONFIG.replace(bias_update_speed=0.01))
    with pytest.warns(UserWarning, match="bias_update_speed"):
        load_checkpoint(tmp_path, other)
    mixed, _ = make(1)
    mixed.model.embed_tokens.to(torch.bfloat16)
    with pytest.raises(ValueError, match="mixes floating dtypes"):
        save_checkpoint(tmp_path, 4, mixed, None, {"step": 4})
    assert latest_checkpoint(tmp_path).name == "step_00000003"
