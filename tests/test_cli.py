"""The `nanoseek` command: info figures and table, one-line errors (exit 2) for every bad input,
before any work; no traceback when the reader of the output goes away; the command list, the
defaults in --help and the key=value fields; init's checkpoint and tokenizer."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

import nanoseek
from nanoseek.cli import COMMANDS, main
from nanoseek.config import preset
from nanoseek.rl.trainer import GRPOConfig
from nanoseek.train import stages
from nanoseek.train.trainer import TrainConfig
from nanoseek.data.tokenizer import MIN_VOCAB_SIZE, SPECIAL_TOKENS, byte_tokenizer
from nanoseek.info import model_info
from nanoseek.model import Transformer


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_info_json_deepseek_v3(capsys):
    rc, out, err = run_cli(capsys, "info", "--preset", "deepseek-v3", "--json")
    assert rc == 0 and err == ""
    i = json.loads(out)
    assert abs(i["total_params"] - 671e9) < 0.01 * 671e9
    assert i["kv_cache_bytes_per_token"] == 70_272
    assert i["expert_combinations"] == 409_663_695_276_000  # C(256, 8)


def test_info_json_takes_overrides_and_context(capsys):
    rc, out, _ = run_cli(capsys, "info", "--preset", "tiny", "--json", "--context", "128",
                     "n_routed_experts=16", "q_lora_rank=null")
    i = json.loads(out)
    assert rc == 0 and i["n_routed_experts"] == 16 and i["q_lora_rank"] is None
    assert i["context_length"] == 128 and i["expert_combinations"] == 120  # C(16, 2)


def test_info_table_for_tiny(capsys):
    rc, out, _ = run_cli(capsys, "info", "--preset", "tiny")
    i = model_info(preset("tiny"))
    assert rc == 0
    for figure in (i["total_params"], i["activated_params"], i["mtp_params"],
                   i["train_flops_per_token"], i["decode_flops_per_token"]):
        assert f"{figure:,}" in out
    assert "335.54K" in out and f"{i['kv_cache_bytes_per_token']:,} B" in out


def test_info_reads_a_config_file(tmp_path, capsys):
    preset("tiny", n_shared_experts=2).to_json(tmp_path / "config.json")
    for target in (tmp_path, tmp_path / "config.json"):
        _, out, _ = run_cli(capsys, "info", "--config", str(target), "--json")
        assert json.loads(out)["n_shared_experts"] == 2


@pytest.mark.parametrize("argv, names", [
    (["info", "--preset", "nope"], "unknown preset 'nope'"),
    (["info", "--preset", "tiny", "n_experts=4"], "unknown config field 'n_experts'"),
    (["info", "--preset", "tiny", "n_routed_experts"], "must look like key=value"),
    (["info", "--preset", "tiny", "scoring_func=relu"], "'scoring_func' = 'relu'"),
    (["info", "--preset", "tiny", "kv_lora_rank=abc"], "'kv_lora_rank' = 'abc': must be int"),
    (["info", "--config", "/nonexistent/ckpt"], "no config file at /nonexistent/ckpt"),
    (["info"], "--preset --config is required"),
    (["init", "--preset", "tiny", "--out", "unused", "vocab_size=100"], "vocab_size 100 is too small"),
])
def test_errors_are_one_line_and_exit_2(capsys, argv, names):
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.startswith("nanoseek: error: ") and err.count("\n") == 1, err
    assert names in err


def one_error_line(rc: int, out: str, err: str) -> str:
    assert rc == 2 and out == "", (rc, out, err)
    assert err.startswith("nanoseek: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("field", ["lr", "grad_clip", "weight_decay"])
def test_a_train_field_of_the_wrong_type_fails_before_the_tokenizer(tmp_path, capsys, monkeypatch, field):
    monkeypatch.setattr(stages, "train_bpe", lambda *a, **k: pytest.fail("a tokenizer was trained"))
    run = tmp_path / "run"
    err = one_error_line(*run_cli(capsys, "train", "--preset", "tiny", "--data", "builtin:arithmetic:n=20",
                                  "--steps", "2", "--out", run, f"{field}=abc"))
    assert f"train field '{field}' = 'abc': must be float" in err
    assert not run.exists()  # no half-made run directory


@pytest.mark.parametrize("n", ["0", "-3"])
def test_eval_needs_a_positive_number_of_problems(capsys, n):
    err = one_error_line(*run_cli(capsys, "eval", "--model", "/nonexistent", "--n", n))
    assert f"argument --n: must be positive, got {n}" in err


# every command that takes a device, on a model that does not exist: the device is refused first
DEVICE_COMMANDS = {
    "generate": ["generate", "--model", "/nonexistent", "--prompt", "hi", "--device", "{}"],
    "chat": ["chat", "--model", "/nonexistent", "--device", "{}"],
    "eval": ["eval", "--model", "/nonexistent", "--device", "{}"],
    "rejection-sample": ["rejection-sample", "--model", "/nonexistent", "--task", "arithmetic",
                         "--out", "{out}/rs.jsonl", "--device", "{}"],
    "distill": ["distill", "--teacher", "/nonexistent", "--task", "arithmetic", "--out", "{out}/d.jsonl",
                "--device", "{}"],
    "train": ["train", "--preset", "tiny", "--data", "builtin:arithmetic:n=20", "--steps", "2",
              "--out", "{out}/run", "device={}"],
    "sft": ["sft", "--model", "/nonexistent", "--data", "builtin:arithmetic:n=20", "--steps", "2",
            "--out", "{out}/run", "device={}"],
    "grpo": ["grpo", "--model", "/nonexistent", "--task", "arithmetic", "--out", "{out}/run", "device={}"],
}


@pytest.mark.parametrize("device, message", [
    ("cuda", "device 'cuda' asked for, but this torch build sees no CUDA GPU"),
    ("nosuch", "unknown device 'nosuch'; use auto, cpu, cuda or cuda:N"),
])
@pytest.mark.parametrize("command", DEVICE_COMMANDS)
def test_a_device_this_machine_lacks_is_refused_before_any_work(tmp_path, capsys, monkeypatch, command,
                                                                device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU build, whatever runs this
    argv = [a.replace("{}", device).replace("{out}", str(tmp_path)) for a in DEVICE_COMMANDS[command]]
    assert message in one_error_line(*run_cli(capsys, *argv))
    assert list(tmp_path.iterdir()) == []


def test_a_closed_output_pipe_ends_quietly():
    """`nanoseek info --json | head`: the reader has gone before the JSON is written. No
    traceback; status 141 (128 + SIGPIPE), as a shell reports a tool killed by SIGPIPE."""
    p = subprocess.Popen([sys.executable, "-m", "nanoseek.cli", "info", "--preset", "tiny", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()  # long before the interpreter has imported torch
    err = p.stderr.read()
    assert p.wait(timeout=120) == 141 and err == ""


def test_bare_nanoseek_lists_the_commands(capsys):
    rc, out, err = run_cli(capsys)
    assert rc == 0 and err == ""
    for name, (_, _, help_) in COMMANDS.items():
        assert name in out and help_.split()[0] in out
    assert "COMMAND --help" in out


def test_help_shows_the_defaults(capsys):
    rc, out, _ = run_cli(capsys, "eval", "--help")
    assert rc == 0
    text = " ".join(out.split())
    for default in ("held-out problems (default: 100)", "task difficulty (default: 1)",
                    "(default: arithmetic)", "(default: auto)", "(default: 0.8)"):
        assert default in text
    rc, out, _ = run_cli(capsys, "generate", "--help")
    assert "tokens to generate at most (default: 256)" in " ".join(out.split())


@pytest.mark.parametrize("command, config", [("train", TrainConfig), ("sft", TrainConfig),
                                             ("distill", TrainConfig), ("grpo", GRPOConfig)])
def test_list_fields_prints_every_field_with_its_default(capsys, command, config):
    rc, out, err = run_cli(capsys, command, "--list-fields")  # no other argument needed
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"{config.kind} fields (key=value, JSON values):"
    defaults = config()
    for f in dataclasses.fields(config):
        [line] = [ln for ln in lines if ln.startswith(f"  {f.name}=")]
        assert line.startswith(f"  {f.name}={json.dumps(getattr(defaults, f.name))} ")
        assert line.endswith(f" {f.metadata['help']}")
    assert ("model config field" in out) == (command == "train")


def test_module_entry_point_exits_2_without_traceback():
    p = subprocess.run([sys.executable, "-m", "nanoseek.cli", "info", "--preset", "tiny",
                        "scoring_func=relu"], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [
        "nanoseek: error: config field 'scoring_func' = 'relu': must be one of sigmoid, softmax"]


# ---------------------------------------------------------------- tokenizer
def test_byte_tokenizer_covers_exactly_the_vocabulary():
    tok = byte_tokenizer(1024)
    assert tok.get_vocab_size() == 1024
    assert tok.token_to_id("<|begin_of_sentence|>") == 0 and tok.token_to_id("<|end_of_sentence|>") == 1
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.id_to_token(1023) == f"<|reserved_{1023 - MIN_VOCAB_SIZE}|>"
    assert all(tok.decode([i], skip_special_tokens=False) for i in range(1024))
    assert byte_tokenizer(MIN_VOCAB_SIZE).get_vocab_size() == MIN_VOCAB_SIZE
    with pytest.raises(ValueError, match="at least 265"):
        byte_tokenizer(MIN_VOCAB_SIZE - 1)


def test_byte_tokenizer_round_trips_text_and_specials():
    tok = byte_tokenizer(1024)
    text = ("<|begin_of_sentence|><|User|>What is 2+2?  Ünïcødé 🙂\n\t<|Assistant|><think>four"
            "</think><answer>4</answer><|reserved_7|><|end_of_sentence|><|pad|>")
    enc = tok.encode(text)
    assert tok.decode(enc.ids, skip_special_tokens=False) == text
    for s in SPECIAL_TOKENS + ["<|reserved_7|>"]:
        assert tok.encode(s).ids == [tok.token_to_id(s)]  # one token, never split into bytes
    assert tok.encode("A").ids == [len(SPECIAL_TOKENS) + ord("A")]  # byte b has id 9 + b
    assert len(tok.encode("🙂").ids) == 4  # one token per UTF-8 byte


# ---------------------------------------------------------------- init
def test_init_writes_a_checkpoint_and_tokenizer(tmp_path, capsys):
    pytest.importorskip("nanoseek.hf")  # save_pretrained / from_pretrained
    out = tmp_path / "ckpt"
    rc, stdout, err = run_cli(capsys, "init", "--preset", "tiny", "--out", str(out), "--seed", "3")
    assert rc == 0, err
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= \
        {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 1024

    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 1024 and (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    text = "<|User|>hi<|Assistant|><think>ok</think>"
    assert tok.decode(tok(text)["input_ids"]) == text

    torch.manual_seed(3)
    ref = Transformer(preset("tiny")).eval()
    loaded = nanoseek.from_pretrained(out)
    ids = torch.randint(0, 1024, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref(ids).logits, rtol=0, atol=0)

    rc, _, err = run_cli(capsys, "init", "--preset", "tiny", "--out", str(out))
    assert rc == 2 and "not an empty directory" in err  # never overwrites a checkpoint
