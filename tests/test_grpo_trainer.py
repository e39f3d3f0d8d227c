"""The GRPO loop on a tiny model on the CPU: two steps update the weights and log what the
issue asks for, a checkpoint resumes to step 3, dynamic sampling drops groups whose
rewards are all equal, micro-batches sum to the full-batch loss, Ctrl-C saves the step it
finishes, config validation, and `nanoseek grpo` end to end (one step; a bad key is one error
line, exit 2).

The reward is `len(completion) % 3`: a random model's completions differ in length, so
rewards vary within a group and the advantages (hence the gradient) are not zero."""

import copy
import json
import signal

import pytest
import torch

import nanoseek
from nanoseek.cli import main
from nanoseek.data.tokenizer import ChatTokenizer, byte_tokenizer
from nanoseek.rl.trainer import GRPOTrainer, grpo_config, informative_groups, rollout_metrics
from nanoseek.train.trainer import TrainingInterrupted
from nanoseek.train.checkpoint import latest_checkpoint
from nanoseek.train.metrics import read_metrics


def len3(prompts, completions, **kwargs):
    return [float(len(c) % 3) for c in completions]


def constant(prompts, completions, **kwargs):
    return [1.0] * len(completions)


FUNCS = {"len3": len3, "constant": constant}


pytestmark = pytest.mark.usefixtures("few_threads")  # conftest.py


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return nanoseek.Transformer(nanoseek.preset("tiny")), ChatTokenizer(byte_tokenizer(1024))


def make(tiny, run_dir, **changes):
    model, tok = tiny
    fields = dict(group_size=4, prompts_per_step=2, max_new_tokens=12, lr=1e-3, steps=2,
                  rewards={"len3": 1.0, "accuracy": 0.5}, beta=0.01, mu=2)
    cfg = grpo_config(**{**fields, **changes})
    return GRPOTrainer(copy.deepcopy(model), tok, "arithmetic", cfg, run_dir, reward_funcs=FUNCS)


def test_two_steps_update_the_weights_log_and_resume_to_step_3(tiny, tmp_path):
    run = tmp_path / "run"
    trainer = make(tiny, run, eval_n=4, eval_every=1)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    records = trainer.fit(progress=False)
    after = trainer.model.state_dict()
    assert [r["step"] for r in records] == [1, 2]
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("layers.0.self_attn" in k for k in changed) and any("lm_head" in k for k in changed)
    assert trainer.ref_model is not None  # beta > 0: the frozen initial policy
    assert all(torch.equal(before[k], v) for k, v in trainer.ref_model.state_dict().items())

    logged = read_metrics(run)
    # step 0: the starting model's held-out accuracy, so the curves start where training does
    assert [r["step"] for r in logged] == [0, 1, 2]
    assert 0.0 <= logged[0]["eval_accuracy"] <= 1.0 and "loss" not in logged[0]
    logged = logged[1:]
    for name in ("loss", "reward", "reward_len3", "reward_accuracy", "accuracy", "response_length",
                 "response_length_incorrect", "kl", "clip_fraction", "entropy", "grad_norm",
                 "rollout_tokens_per_s", "step_time_s", "eval_accuracy", "groups_kept"):
        assert all(name in r for r in logged), name
    assert logged[0]["reward_std"] > 0 and logged[0]["groups_kept"] == 2
    assert logged[0]["kl"] >= 0 and 0 < logged[0]["entropy"] < 7.0  # ln(1024) = 6.93
    assert (run / "plots" / "rl.png").is_file()
    ckpt = latest_checkpoint(run)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert ckpt.name == "step_00000002" and state["step"] == 2 and state["grpo_config"]["mu"] == 2

    resumed = make(tiny, run, eval_n=4, eval_every=1, steps=3)
    more = resumed.fit(resume=True, progress=False)
    assert [r["step"] for r in more] == [3] and resumed.step == 3
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2, 3]
    assert latest_checkpoint(run).name == "step_00000003"
    # the resumed step 3 is the step 3 of an uninterrupted run (seeded rollouts, Adam state)
    straight = make(tiny, tmp_path / "straight", eval_n=4, eval_every=1, steps=3).fit(progress=False)
    for k in ("reward", "loss", "kl", "grad_norm", "eval_accuracy"):
        assert more[0][k] == pytest.approx(straight[2][k], rel=1e-5, abs=1e-7), k


def test_a_run_without_resume_refuses_an_existing_run(tiny, tmp_path):
    make(tiny, tmp_path, steps=1).fit(progress=False)
    with pytest.raises(Exception, match="--resume"):
        make(tiny, tmp_path, steps=1).fit(progress=False)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_saves_the_step_in_flight_and_a_resume_goes_on(tiny, tmp_path, signum):
    """SIGINT (as a terminal sends it) or SIGTERM (as a scheduler does) during step 2's rewards,
    in this process: step 2 ends, is saved, and TrainingInterrupted says where and which
    signal; default save_every (a tenth of 10 steps) saved step 1 too. A resume trains on
    from step 3."""
    rewarded = []

    def interrupt_in_step_2(prompts, completions, **kwargs):
        rewarded.append(1)
        if len(rewarded) == 2:
            signal.raise_signal(signum)
        return len3(prompts, completions)

    model, tok = tiny
    cfg = grpo_config(group_size=2, prompts_per_step=2, max_new_tokens=6, beta=0.0, steps=10,
                      rewards={"interrupt": 1.0})
    trainer = GRPOTrainer(copy.deepcopy(model), tok, "arithmetic", cfg, tmp_path,
                          reward_funcs={"interrupt": interrupt_in_step_2})
    rewarded.clear()  # the constructor scored one row to check the reward's columns
    before = signal.getsignal(signum)  # Python's handler, or SIG_IGN under a background launcher
    with pytest.raises(TrainingInterrupted, match=r"^grpo stopped at step 2 of 10; checkpoint saved in ") as e:
        trainer.fit(progress=False)
    assert e.value.signum == signum
    assert signal.getsignal(signum) is before  # the signal is itself again
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000001",
                                                                                "step_00000002"]
    resumed = GRPOTrainer(copy.deepcopy(model), tok, "arithmetic", grpo_config(**{**vars(cfg), "steps": 3}),
                          tmp_path, reward_funcs={"interrupt": len3})
    assert [r["step"] for r in resumed.fit(resume=True, progress=False)] == [3]


def test_informative_groups_drop_all_equal_rewards():
    assert informative_groups([1, 1, 1, 0, 1, 0, 2, 2, 2], 3) == [False, True, False]
    assert informative_groups([0.5, 0.5], 2) == [False]
    with pytest.raises(ValueError):
        informative_groups([1, 2, 3], 2)


def test_dynamic_sampling_with_all_equal_rewards_makes_no_update(tiny, tmp_path):
    trainer = make(tiny, tmp_path, rewards={"constant": 1.0}, dynamic_sampling=True,
                   dynamic_sampling_tries=1, beta=0.0, mu=1)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    record = trainer.train_step()
    assert record["groups_kept"] == 0 and record["groups_dropped"] == 2 + 2  # N, then N refilled
    assert "loss" not in record
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert trainer.ref_model is None  # beta = 0: no reference model


def test_dynamic_sampling_keeps_informative_groups(tiny, tmp_path):
    trainer = make(tiny, tmp_path, dynamic_sampling=True, beta=0.0, mu=1)
    record = trainer.train_step()
    assert record["groups_kept"] == 2 and "loss" in record


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_micro_batches_sum_to_the_full_batch_loss(tiny, tmp_path, loss_type):
    whole = make(tiny, tmp_path / "a", loss_type=loss_type, mu=1).train_step()
    split = make(tiny, tmp_path / "b", loss_type=loss_type, mu=1, micro_batch=3).train_step()
    assert split["reward"] == whole["reward"]  # the same seeded rollouts
    for k in ("loss", "kl", "entropy", "clip_fraction"):
        assert split[k] == pytest.approx(whole[k], rel=1e-4, abs=1e-6), k
    assert split["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-3)


def test_dr_grpo_divides_by_the_completion_budget_not_the_padded_sequence(tiny, tmp_path, monkeypatch):
    """Dr. GRPO's constant T is the maximum completion length (max_new_tokens), whatever the
    prompts' lengths in the batch. With mu=1 the ratio is 1 and beta=0 drops the KL, so each
    completion token's loss is -A: the step's loss is -sum_b A_b |o_b| / (B * max_new_tokens),
    computed here from the rollouts' rewards and lengths. The tiny model's rollouts all run to the budget, so
    the rollouts are cut to unequal lengths (with equal ones the advantages sum to 0)."""
    from nanoseek.rl import trainer as rl_trainer
    t = make(tiny, tmp_path, loss_type="dr_grpo", scale="none", beta=0.0, mu=1)
    rollout, rollouts, padded = t.rollout, [], []

    def cut_rollout(rows, attempt=0):
        batch = rollout(rows, attempt)
        batch["completion_ids"] = [c[:len(c) - (k % 4) ** 2]  # lengths 12, 11, 8, 3 per group
                                   for k, c in enumerate(batch["completion_ids"])]
        batch["completions"] = [t.tokenizer.decode(c) for c in batch["completion_ids"]]
        rollouts.append(batch)
        return batch

    monkeypatch.setattr(t, "rollout", cut_rollout)
    real = rl_trainer.grpo_loss
    monkeypatch.setattr(rl_trainer, "grpo_loss", lambda *a, **kw: padded.append(a[4].shape[1])
                        or real(*a, **kw))
    record = t.train_step()

    [batch] = rollouts
    rewards, _ = t.score(batch)
    lengths = [len(c) for c in batch["completion_ids"]]
    G, B, T = t.cfg.group_size, len(rewards), t.cfg.max_new_tokens
    advantages = [r - sum(rewards[g:g + G]) / G for g in range(0, B, G) for r in rewards[g:g + G]]
    token_sum = -sum(a * n for a, n in zip(advantages, lengths))
    assert len(padded) == 1 and padded[0] > T  # the padded sequence is longer than the budget
    assert abs(token_sum) > 0.1  # so dividing by it instead would change the loss
    assert record["loss"] == pytest.approx(token_sum / (B * T), rel=1e-5)


@pytest.mark.parametrize("changes, message", [
    (dict(group_size=1), "group_size"), (dict(temperature=0.0), "temperature"),
    (dict(loss_type="ppo"), "loss_type"), (dict(scale="batch"), "scale"),
    (dict(clip_eps=0.2, clip_eps_high=0.1), "clip_eps_high"), (dict(rewards={}), "rewards"),
    (dict(prompt_format="plain"), "prompt_format"), (dict(grup_size=4), "unknown grpo field"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(top_p=0.0), "top_p"), (dict(lr=0.0), "lr"),
    (dict(beta=-1.0), "beta"), (dict(grad_clip=-1.0), "grad_clip"), (dict(clip_eps=0.0), "clip_eps"),
    (dict(micro_batch=-1), "micro_batch"), (dict(save_every=-1), "save_every"),
    (dict(rewards={"accuracy": True}), "rewards"), (dict(steps=0), "steps"),
])
def test_config_validation(changes, message):
    with pytest.raises(ValueError, match=message):
        grpo_config(**changes)


def test_an_unknown_reward_is_named(tiny, tmp_path):
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        make(tiny, tmp_path, rewards={"nope": 1.0})


def test_cli_grpo_one_step_and_a_bad_key(tmp_path, capsys):
    ckpt = tmp_path / "init"
    assert main(["init", "--preset", "tiny", "--out", str(ckpt)]) == 0
    out = tmp_path / "grpo"
    argv = ["grpo", "--model", str(ckpt), "--task", "arithmetic", "--out", str(out), "--steps", "1",
            "group_size=2", "prompts_per_step=2", "max_new_tokens=8", "prompt_format=r1_zero",
            "eval_n=2", 'rewards={"accuracy": 1, "format": 0.2}']
    assert main(argv) == 0
    assert "GRPO to step 1" in capsys.readouterr().out
    assert (out / "final" / "config.json").is_file() and (out / "final" / "tokenizer.json").is_file()
    start, record = read_metrics(out)  # step 0: the starting model's held-out accuracy
    assert start["step"] == 0 and 0.0 <= start["eval_accuracy"] <= 1.0 and "reward_format" not in start
    assert "reward_format" in record and "eval_accuracy" in record

    assert main(["grpo", "--model", str(ckpt), "--task", "arithmetic", "--out", str(tmp_path / "x"),
                 "grup_size=4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown grpo field(s) grup_size" in err
    assert main(["grpo", "--model", str(ckpt), "--task", "arithmetic", "--out", str(tmp_path / "y"),
                 "beta=-1"]) == 2
    assert "beta" in capsys.readouterr().err


def test_generate_repeated_decodes_through_max_batch_slots(tiny):
    """A sampler over many prompts x runs (rejection-sample, distill) holds max_batch cache
    slots, not one per run; the runs beyond wait for a slot and come out the same."""
    from nanoseek.infer.sampling import SamplingParams
    from nanoseek.rl.trainer import generate_repeated
    model, tok = tiny
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=3, ignore_eos=True)
    ids, few, engine = generate_repeated(model, tok, ["1+1=", "2+3="], params, repeat=3, max_new_tokens=6,
                                         max_batch=2)
    assert len(ids) == len(few) == 6 and engine.num_slots == 2
    _, all_at_once, engine = generate_repeated(model, tok, ["1+1=", "2+3="], params, repeat=3, max_new_tokens=6)
    assert engine.num_slots == 6 and [o.token_ids for o in few] == [o.token_ids for o in all_at_once]


def test_a_reward_that_skips_samples_logs_the_share_it_scored():
    # 3 of 4 samples unscored (None, summed as 0): the mean over the scored one reads 1.0, so the
    # share beside it is what shows that the reward moved the total for one sample in four
    batch = {"rewards": [1.1, 1.0, 0.0, 0.0], "completion_ids": [[1, 2], [1], [1, 2, 3], [4]],
             "per_fn": {"accuracy": [1.0, 1.0, 0.0, 0.0], "language": [1.0, None, None, None]}}
    rec = rollout_metrics(batch)
    assert rec["reward_language"] == 1.0 and rec["reward_language_applies"] == 0.25
    assert "reward_accuracy_applies" not in rec and rec["accuracy"] == 0.5
    assert rec["reward"] == pytest.approx(0.525) and rec["response_length"] == 1.75
