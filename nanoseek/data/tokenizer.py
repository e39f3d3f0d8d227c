"""A byte-level tokenizer that covers any vocabulary size, for freshly initialised models.

Every byte is one token (a BPE with the 256 ByteLevel symbols and no merges), so any text
round-trips and nothing is out of vocabulary; it is the tokenizer `nanoseek init` writes
beside a random model, not one to train a serious model with (a trained BPE lives
elsewhere). Layout of the ids:

    0 .. 8          special tokens, bos = 0 and eos = 1 as ModelConfig's defaults
    9 .. 264        the 256 byte symbols (GPT-2's byte-to-unicode map)
    265 .. V-1      <|reserved_N|> special tokens, so that every id decodes

No BOS is added automatically: the data pipeline decides where sequences begin.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

BOS, EOS, PAD = "<|begin_of_sentence|>", "<|end_of_sentence|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, "<|User|>", "<|Assistant|>", "<think>", "</think>",
                  "<answer>", "</answer>"]
N_BYTES = 256
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + N_BYTES


def _byte_symbols() -> list[str]:
    """GPT-2's byte-to-unicode map (the ByteLevel alphabet) in byte order: printable bytes
    stand for themselves, the others are shifted to chr(256 + n)."""
    printable = (set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1))
                 | set(range(ord("®"), ord("ÿ") + 1)))
    symbols, shifted = [], 0
    for b in range(N_BYTES):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(N_BYTES + shifted))
            shifted += 1
    return symbols


BYTE_SYMBOLS = _byte_symbols()  # id of byte b: len(SPECIAL_TOKENS) + b


def byte_tokenizer(vocab_size: int) -> Tokenizer:
    """Special tokens, then 256 byte tokens, then reserved tokens up to exactly vocab_size."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size {vocab_size} is too small for the byte tokenizer: it needs "
                         f"at least {MIN_VOCAB_SIZE} ({len(SPECIAL_TOKENS)} special tokens + "
                         f"{N_BYTES} bytes)")
    reserved = [f"<|reserved_{i}|>" for i in range(vocab_size - MIN_VOCAB_SIZE)]
    specials = SPECIAL_TOKENS + reserved
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + BYTE_SYMBOLS + reserved)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)  # already in the vocab: they keep their ids
    assert tok.get_vocab_size() == vocab_size and tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1
    return tok


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    """tokenizer.json plus a tokenizer_config.json that `AutoTokenizer.from_pretrained` reads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
