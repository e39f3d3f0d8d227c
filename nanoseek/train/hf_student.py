"""Dense students from the ecosystem: any `transformers` causal LM as the model SFT trains.

DeepSeek-R1's distilled models (§2.4) are dense Qwen2.5 and Llama 3 models fine-tuned on
R1's reasoning traces. `nanoseek sft --model HF_DIR` and `nanoseek distill --student HF_DIR`
take such a model directory (config.json with a model_type nanoseek does not build itself,
the weights, and its tokenizer with a chat template) and train it with nanoseek's own SFT
loop; the result is saved back in the student's format and loads in transformers.

The seam is two small adapters:

    HFStudent     wraps an `AutoModelForCausalLM` in what the trainer drives: model(input_ids,
                  labels=) -> .logits, .loss (nanoseek's convention: labels shifted inside,
                  -100 ignored, a fully masked batch has loss 0, where transformers' mean gives
                  NaN), no expert bias to update, and its own save/load in its HF layout
                  (checkpoints and `final/`).
    HFChatTokenizer
                  an `AutoTokenizer` whose chat template renders the chats; `tokenize_chat`
                  marks the tokens to learn: each assistant turn as the template renders it
                  (its content and end-of-turn text).

transformers is an optional dependency (`pip install 'nanoseek[hf]'`).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from ..loading import resolve_model_dir
from ..model.transformer import ModelOutput, shifted_cross_entropy

# config.json model_type of the models nanoseek builds itself (ModelConfig.hf_model_type)
NANOSEEK_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "nanoseek")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ValueError("a transformers model as the student needs the transformers package: "
                         "pip install 'nanoseek[hf]'") from None
    return transformers


@contextlib.contextmanager
def _quiet():
    """transformers' per-file progress bars off while it loads or saves (a checkpoint each time)."""
    logging = _transformers().utils.logging
    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def is_transformers_model(model_dir: str | Path) -> bool:
    """Whether the checkpoint (or run directory) holds a model nanoseek does not build itself,
    i.e. one for transformers (model_type qwen2, llama, ...)."""
    config = json.loads((resolve_model_dir(model_dir) / "config.json").read_text())
    return config.get("model_type") not in NANOSEEK_MODEL_TYPES


class HFStudent(nn.Module):
    """A transformers causal LM behind the interface of nanoseek's Trainer."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model
        self.config = hf_model.config

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        logits_BTV = self.hf(input_ids=input_ids).logits
        out = ModelOutput(logits=logits_BTV)
        if labels is not None:
            out.loss = out.main_loss = shifted_cross_entropy(logits_BTV, labels, 0)
        return out

    def update_expert_bias(self) -> dict:
        return {}  # a dense model: no routers, no loads

    def routers(self) -> dict:
        return {}

    def train_flops_per_token(self, seq_len: int) -> float:
        """6N (forward and backward over the non-embedding weights) + attention's 6·L·T·d, the
        usual estimate (Kaplan et al. 2020), for MFU."""
        c = self.config
        embedding = self.hf.get_input_embeddings().weight.numel()
        n = sum(p.numel() for p in self.parameters()) - embedding
        return 6 * n + 6 * c.num_hidden_layers * seq_len * c.hidden_size

    def save_pretrained(self, path: str | Path) -> None:
        """config.json and safetensors weights in the model's own transformers layout."""
        with _quiet():
            self.hf.save_pretrained(Path(path))

    @torch.no_grad()
    def load_pretrained_weights(self, path: str | Path) -> None:
        """The weights of a directory save_pretrained wrote, copied into this model's tensors
        (in place: an optimizer built on them stays valid). transformers reads the files, so
        its own conventions (tied embeddings, shards) hold."""
        with _quiet():
            loaded = type(self.hf).from_pretrained(Path(path), dtype=self.hf.dtype)
        mine, theirs = self.hf.state_dict(), loaded.state_dict()
        if mine.keys() != theirs.keys():
            raise ValueError(f"{path} holds weights of another architecture than the student's")
        for name, tensor in mine.items():
            tensor.copy_(theirs[name])


class HFChatTokenizer:
    """An AutoTokenizer with what nanoseek's SFT stage needs: pad and eos ids, the chat
    template's rendering of a chat with the assistant tokens marked, and save()."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        if not tokenizer.chat_template:
            raise ValueError(f"the tokenizer of {tokenizer.name_or_path} has no chat template; a "
                             "student needs one to render the chats (set chat_template in its "
                             "tokenizer_config.json or chat_template.jinja)")
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def tokenize_chat(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        """Token ids of the rendered chat and a mask, True on the tokens to learn: each assistant
        turn as the template renders it, from after its generation prompt to the end of the turn
        (content and end-of-turn marker). The spans are found by rendering the chat up to each
        assistant turn; a template that re-renders earlier turns once later ones follow (e.g. one
        that drops reasoning from the history) is refused, since the spans would not line up."""
        full = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            if i == 0:
                raise ValueError("a chat for a transformers student must open with a user (or system) "
                                 "turn before the assistant's")
            start = self.render(messages[:i], add_generation_prompt=True)
            end = self.render(messages[:i + 1])
            if not (end.startswith(start) and full.startswith(end)):
                raise ValueError(f"the chat template of {self.tokenizer.name_or_path} renders earlier turns "
                                 "differently once later ones follow, so the assistant tokens cannot be "
                                 "located; train on chats that end with their only assistant turn")
            spans.append((len(start), len(end)))
        ids, mask, at = [], [], 0
        for start, end in spans + [(len(full), len(full))]:
            for text, learn in ((full[at:start], False), (full[start:end], True)):
                if text:
                    piece = self.encode(text)
                    ids += piece
                    mask += [learn] * len(piece)
            at = end
        return ids, mask

    def save(self, path: str | Path) -> None:
        self.tokenizer.save_pretrained(Path(path))


def load_student(model_dir: str | Path, out: Path) -> tuple[Path, HFChatTokenizer, Path, HFStudent]:
    """What the SFT stage starts from when the model is a transformers one (stages.load_base's
    twin): the checkpoint, its tokenizer (saved to out/tokenizer), the wrapped model with
    float32 master weights."""
    transformers = _transformers()
    src = resolve_model_dir(model_dir)
    with _quiet():
        tokenizer = HFChatTokenizer(transformers.AutoTokenizer.from_pretrained(src))
        model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tok_dir = out / "tokenizer"
    tokenizer.save(tok_dir)
    return src, tokenizer, tok_dir, HFStudent(model)
