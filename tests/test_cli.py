"""The `nanoseek` command: info figures and table, one-line errors, init's checkpoint and tokenizer."""

import json
import subprocess
import sys

import pytest
import torch

import nanoseek
from nanoseek.cli import main
from nanoseek.config import preset
from nanoseek.data.tokenizer import MIN_VOCAB_SIZE, SPECIAL_TOKENS, byte_tokenizer
from nanoseek.info import model_info
from nanoseek.model import Transformer


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_info_json_deepseek_v3(capsys):
    rc, out, err = run(capsys, "info", "--preset", "deepseek-v3", "--json")
    assert rc == 0 and err == ""
    i = json.loads(out)
    assert abs(i["total_params"] - 671e9) < 0.01 * 671e9
    assert i["kv_cache_bytes_per_token"] == 70_272
    assert i["expert_combinations"] == 409_663_695_276_000  # C(256, 8)


def test_info_json_takes_overrides_and_context(capsys):
    rc, out, _ = run(capsys, "info", "--preset", "tiny", "--json", "--context", "128",
                     "n_routed_experts=16", "q_lora_rank=null")
    i = json.loads(out)
    assert rc == 0 and i["n_routed_experts"] == 16 and i["q_lora_rank"] is None
    assert i["context_length"] == 128 and i["expert_combinations"] == 120  # C(16, 2)


def test_info_table_for_tiny(capsys):
    rc, out, _ = run(capsys, "info", "--preset", "tiny")
    i = model_info(preset("tiny"))
    assert rc == 0
    for figure in (i["total_params"], i["activated_params"], i["mtp_params"],
                   i["train_flops_per_token"], i["decode_flops_per_token"]):
        assert f"{figure:,}" in out
    assert "335.54K" in out and f"{i['kv_cache_bytes_per_token']:,} B" in out


def test_info_reads_a_config_file(tmp_path, capsys):
    preset("tiny", n_shared_experts=2).to_json(tmp_path / "config.json")
    for target in (tmp_path, tmp_path / "config.json"):
        _, out, _ = run(capsys, "info", "--config", str(target), "--json")
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
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.startswith("nanoseek: error: ") and err.count("\n") == 1, err
    assert names in err


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
    rc, stdout, err = run(capsys, "init", "--preset", "tiny", "--out", str(out), "--seed", "3")
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

    rc, _, err = run(capsys, "init", "--preset", "tiny", "--out", str(out))
    assert rc == 2 and "not an empty directory" in err  # never overwrites a checkpoint
