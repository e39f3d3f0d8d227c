"""Dense transformers students (train/hf_student.py): tiny random Qwen2 and Llama models built
with transformers' own classes, each with a small byte-level tokenizer and its family's chat
template saved beside it (no downloads), trained by nanoseek's SFT loop and loaded back in
transformers."""

import json
import math
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402

from nanoseek.cli import main  # noqa: E402
from nanoseek.data.loader import IGNORE  # noqa: E402
from nanoseek.data.tokenizer import BYTE_SYMBOLS  # noqa: E402
from nanoseek.train.hf_student import HFChatTokenizer, HFStudent, is_transformers_model  # noqa: E402
from nanoseek.train.metrics import read_metrics  # noqa: E402
from nanoseek.train.stages import sft, train_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("few_threads")  # conftest.py

# (special tokens, eos, pad, chat template) of each family, as their hubs' tokenizers have them
FAMILIES = {
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>", "<|endoftext|>",
              "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "llama": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>",
              "<|eot_id|>",
              "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
              " + m['content'] + '<|eot_id|>' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>2+2</think><answer>4</answer>"},
        {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"}]


def build_student(family: str, path):
    """A random 2-layer model of the family and its byte-level tokenizer, saved in `path`."""
    specials, eos, pad, template = FAMILIES[family]
    vocab = {t: i for i, t in enumerate(specials + BYTE_SYMBOLS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    bos = specials[0] if family == "llama" else None
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad,
                                                  bos_token=bos, chat_template=template)
    hf_tok.save_pretrained(path)
    shape = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                 eos_token_id=vocab[eos], pad_token_id=vocab[pad])
    config = (transformers.Qwen2Config(tie_word_embeddings=True, **shape) if family == "qwen2"
              else transformers.LlamaConfig(bos_token_id=vocab[bos], **shape))
    torch.manual_seed(0)
    model = (transformers.Qwen2ForCausalLM if family == "qwen2" else transformers.LlamaForCausalLM)(config)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def student(request, tmp_path_factory):
    return request.param, build_student(request.param, tmp_path_factory.mktemp(request.param) / "student")


@pytest.fixture(scope="module")
def teacher(tiny_dir):  # conftest.py: a random tiny model
    return tiny_dir


def test_tokenize_chat_marks_each_assistant_turn_as_the_template_renders_it(student):
    family, path = student
    tok = HFChatTokenizer(transformers.AutoTokenizer.from_pretrained(path))
    ids, mask = tok.tokenize_chat(CHAT)
    assert tok.decode(ids) == tok.render(CHAT)  # the whole chat, as the template renders it
    learned = [tok.decode([i for i, m in zip(ids, mask) if m])]
    end = {"qwen2": "<|im_end|>\n", "llama": "<|eot_id|>"}[family]
    assert learned == ["<think>2+2</think><answer>4</answer>" + end + "6" + end]
    # the mask's runs are the two replies: nothing of the prompts, roles or headers
    runs = [(a, b) for a, b in zip([False] + mask, mask + [False]) if a != b]
    assert len(runs) == 4


def test_templates_the_masks_cannot_follow_are_refused_clearly(student, tmp_path, monkeypatch, capsys):
    _, path = student
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    hf_tok.chat_template = "{{ messages | length }}" + hf_tok.chat_template  # re-renders the start each turn
    with pytest.raises(ValueError, match="renders earlier turns differently"):
        HFChatTokenizer(hf_tok).tokenize_chat(CHAT)
    hf_tok.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        HFChatTokenizer(hf_tok)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    argv = ["sft", "--model", str(path), "--data", "builtin:arithmetic", "--steps", "1", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'nanoseek[hf]'" in err


def test_student_loss_follows_nanoseeks_convention(student):
    """Labels shifted inside, -100 ignored: the mean CE of the counted positions, computed here
    in float64 from the model's own logits; 0 (not NaN) for a fully masked batch."""
    _, path = student
    model = HFStudent(transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64))
    ids = torch.randint(0, 200, (2, 9))
    labels = ids.clone()
    labels[0, :5] = IGNORE
    labels[1, 3:] = IGNORE
    out = model(ids, labels=labels)
    logp = torch.log_softmax(model.hf(input_ids=ids).logits, -1)
    counted = [(b, t) for b in range(2) for t in range(8) if labels[b, t + 1] != IGNORE]
    want = -sum(logp[b, t, labels[b, t + 1]] for b, t in counted) / len(counted)
    assert out.loss.dtype == torch.float32  # as nanoseek's: the CE in float32
    # float32 rounding: ~eps per logit and log-sum-exp term (log V of them), ~eps per summed position
    tol = (len(counted) + 2 * math.log(logp.shape[-1])) * torch.finfo(torch.float32).eps
    assert out.loss.double().item() == pytest.approx(want.item(), rel=tol)
    assert model(ids, labels=torch.full_like(ids, IGNORE)).loss.item() == 0.0


def test_distill_into_a_transformers_student_saves_it_back_for_transformers(student, teacher, tmp_path, capsys):
    family, path = student
    traces, run = tmp_path / "traces.jsonl", tmp_path / "run"
    assert is_transformers_model(path) and not is_transformers_model(teacher)
    assert main(["distill", "--teacher", str(teacher), "--task", "arithmetic", "--num-prompts", "3", "--n", "1",
                 "--max-tokens", "8", "--out", str(traces), "--student", str(path), "--sft-out", str(run),
                 "--sft-steps", "2", "batch_size=2", "seq_len=128"]) == 0
    assert "student SFT to step 2" in capsys.readouterr().out
    final = run / "final"
    assert json.loads((final / "config.json").read_text())["model_type"] == family
    loaded = transformers.AutoModelForCausalLM.from_pretrained(final)
    before = transformers.AutoModelForCausalLM.from_pretrained(path)
    changed = [n for n, p in loaded.state_dict().items() if not torch.equal(p, before.state_dict()[n])]
    assert changed, "SFT did not change the student"
    tok = transformers.AutoTokenizer.from_pretrained(final)
    assert tok.chat_template == FAMILIES[family][3]  # its own chat template, not nanoseek's
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 1 + 2?"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    assert loaded.generate(**prompt, max_new_tokens=3, do_sample=False).shape[1] > prompt["input_ids"].shape[1]
    assert len(read_metrics(run / "metrics.jsonl")) == 2


def test_student_sft_resumes_exactly(student, tmp_path):
    """Two steps in one run equal one step, then a resume that trains only the second: weights
    and optimizer state come back from the student's checkpoint."""
    _, path = student
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": CHAT[1 + i % 2 * 2:3 + i % 2 * 2]}) + "\n" for i in range(4)))
    fields = dict(batch_size=2, seq_len=64, schedule="constant", warmup=0, lr=1e-2)
    whole = sft(path, train_config(steps=2, **fields), str(chats), tmp_path / "whole", progress=False)[2]
    sft(path, train_config(steps=1, **fields), str(chats), tmp_path / "cut", progress=False)
    resumed = sft(path, train_config(steps=2, **fields), str(chats), tmp_path / "cut", resume=True,
                  progress=False)[2]
    assert [r["step"] for r in resumed] == [2]
    assert resumed[0]["loss"] == whole[1]["loss"]
    assert [r["loss"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")] == [r["loss"] for r in whole]
