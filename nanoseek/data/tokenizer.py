"""Tokenizers: a byte-level one of any vocabulary size, a trained BPE, and the chat format.

`byte_tokenizer`: every byte is one token (a BPE with the 256 ByteLevel symbols and no
merges), so any text round-trips and nothing is out of vocabulary; it is the tokenizer
`nanoseek init` writes beside a random model, not one to train a serious model with (that
is `train_bpe`). Layout of the ids:

    0 .. 8          special tokens, bos = 0 and eos = 1 as ModelConfig's defaults
    9 .. 264        the 256 byte symbols (GPT-2's byte-to-unicode map)
    265 .. V-1      <|reserved_N|> special tokens, so that every id decodes

No BOS is added automatically: the data pipeline decides where sequences begin.

`train_bpe` trains a real byte-level BPE with the same special tokens (digits are always
single tokens, which arithmetic needs). `ChatTokenizer` (from `load_tokenizer`) wraps any
tokenizer.json, ours or an official DeepSeek one, with encode/decode, the special ids and
the chat format. The chat format is DeepSeek-R1's:

    <|begin_of_sentence|>{system}<|User|>{user}<|Assistant|>{assistant}<|end_of_sentence|>...

rendered by `apply_chat_template` here and by the identical Jinja `CHAT_TEMPLATE` that
`save_tokenizer` writes into tokenizer_config.json for `transformers`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS, EOS, PAD = "<|begin_of_sentence|>", "<|end_of_sentence|>", "<|pad|>"
USER, ASSISTANT = "<|User|>", "<|Assistant|>"
# The reasoning tags are single tokens but, as in DeepSeek-R1's tokenizer, not "special":
# decoders that skip special tokens (transformers' decode, TRL, vLLM) keep them in the text.
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT, *TAG_TOKENS]
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
_BYTE_OF_SYMBOL = {c: b for b, c in enumerate(BYTE_SYMBOLS)}


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
    tok = _tags_not_special(tok)
    assert tok.get_vocab_size() == vocab_size and tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1
    return tok


def _tags_not_special(tok: Tokenizer) -> Tokenizer:
    """Mark TAG_TOKENS as added tokens that are not special (the trainer marks every token it
    is given special); ids, matching and decoding with skip_special_tokens=False unchanged."""
    data = json.loads(tok.to_str())
    for added in data["added_tokens"]:
        if added["content"] in TAG_TOKENS:
            added["special"] = False
    return Tokenizer.from_str(json.dumps(data))


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE trained on `texts`: ids 0..8 are SPECIAL_TOKENS, the 256 byte symbols
    are always in (so any text encodes), digits are split one per token, and the vocabulary
    is padded with <|reserved_N|> tokens to exactly `vocab_size` if the merges run out."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE: it needs "
                         f"at least {MIN_VOCAB_SIZE} ({len(SPECIAL_TOKENS)} special tokens + "
                         f"{N_BYTES} bytes)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(vocab_size - tok.get_vocab_size())])
    tok = _tags_not_special(tok)
    assert tok.get_vocab_size() == vocab_size and tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1
    return tok


# ------------------------------------------------------------------ chat format
def chat_template(user: str = USER, assistant: str = ASSISTANT) -> str:
    """The Jinja twin of `apply_chat_template`, for tokenizer_config.json."""
    assert "'" not in user + assistant
    return ("{{ bos_token }}{% for message in messages %}"
            "{% if message['role'] == 'system' %}{{ message['content'] }}"
            f"{{% elif message['role'] == 'user' %}}{{{{ '{user}' + message['content'] }}}}"
            "{% elif message['role'] == 'assistant' %}"
            f"{{{{ '{assistant}' + message['content'] + eos_token }}}}"
            "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
            f"{{% endfor %}}{{% if add_generation_prompt %}}{{{{ '{assistant}' }}}}{{% endif %}}")


CHAT_TEMPLATE = chat_template()


def apply_chat_template(messages: list[dict], add_generation_prompt: bool = False, *,
                        bos: str = BOS, eos: str = EOS, user: str = USER,
                        assistant: str = ASSISTANT) -> str:
    """bos, then per turn: system content as is, <|User|>content, or
    <|Assistant|>content<|end_of_sentence|>; a generation prompt appends <|Assistant|>."""
    parts = [bos]
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "system":
            parts.append(content)
        elif role == "user":
            parts.append(user + content)
        elif role == "assistant":
            parts.append(assistant + content + eos)
        else:
            raise ValueError(f"unknown chat role {role!r} (expected system, user or assistant)")
    if add_generation_prompt:
        parts.append(assistant)
    return "".join(parts)


def save_tokenizer(tok: Tokenizer, path: str | Path, *, bos: str = BOS, eos: str = EOS,
                   pad: str = PAD, user: str = USER, assistant: str = ASSISTANT) -> None:
    """tokenizer.json plus a tokenizer_config.json (with the chat template) that
    `AutoTokenizer.from_pretrained` reads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
        "chat_template": chat_template(user, assistant),
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# ------------------------------------------------------------------ loading
def _canonical(token: str) -> str:
    """'<｜begin▁of▁sentence｜>' (DeepSeek's spelling) and '<|begin_of_sentence|>' agree."""
    return token.replace("｜", "|").replace("▁", "").replace("_", "").lower()


class ChatTokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens the chat format needs.

    `encode` never adds bos/eos (the data pipeline places them); special-token strings in
    the text become their single ids. `pad_id` falls back to `eos_id` when there is no pad
    token (padding is masked out of the loss anyway)."""

    def __init__(self, tokenizer: Tokenizer, bos: str = BOS, eos: str = EOS, pad: str | None = PAD,
                 user: str | None = USER, assistant: str | None = ASSISTANT):
        self.tokenizer = tokenizer
        for name, token in (("bos", bos), ("eos", eos)):
            if token is None or tokenizer.token_to_id(token) is None:
                raise ValueError(f"the tokenizer has no {name} token {token!r}")
        self.bos, self.eos = bos, eos
        self.pad = pad if pad is not None and tokenizer.token_to_id(pad) is not None else eos
        self.user, self.assistant = user, assistant
        self.bos_id = tokenizer.token_to_id(bos)
        self.eos_id = tokenizer.token_to_id(eos)
        self.pad_id = tokenizer.token_to_id(self.pad)
        self.user_id = tokenizer.token_to_id(user) if user else None
        self.assistant_id = tokenizer.token_to_id(assistant) if assistant else None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for: a byte-level piece mapped back through the byte
        alphabet, an added token's own text (a token may hold part of a character)."""
        piece = self.tokenizer.id_to_token(token_id) or ""
        if token_id in self._added or not all(c in _BYTE_OF_SYMBOL for c in piece):
            return piece.encode()
        return bytes(_BYTE_OF_SYMBOL[c] for c in piece)

    @cached_property
    def _added(self) -> set[int]:
        return set(self.tokenizer.get_added_tokens_decoder())

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if self.user_id is None or self.assistant_id is None:
            raise ValueError("this tokenizer has no <|User|>/<|Assistant|> tokens for chats")
        return apply_chat_template(messages, add_generation_prompt, bos=self.bos, eos=self.eos,
                                   user=self.user, assistant=self.assistant)

    def save(self, path: str | Path) -> None:
        save_tokenizer(self.tokenizer, path, bos=self.bos, eos=self.eos, pad=self.pad,
                       user=self.user or USER, assistant=self.assistant or ASSISTANT)


def load_tokenizer(path: str | Path) -> ChatTokenizer:
    """A directory with tokenizer.json (and optionally tokenizer_config.json), or the
    tokenizer.json itself. Special tokens come from tokenizer_config.json when it names
    them, else from the added tokens whose names match ours (DeepSeek's '<｜User｜>' too)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such tokenizer file")
    tok = Tokenizer.from_file(str(file))
    config_file = file.parent / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    added = {_canonical(t.content): t.content for t in tok.get_added_tokens_decoder().values()}

    def find(role: str, ours: str) -> str | None:
        named = config.get(f"{role}_token")
        if isinstance(named, dict):  # {"__type": "AddedToken", "content": ...}
            named = named.get("content")
        if named and tok.token_to_id(named) is not None:
            return named
        return added.get(_canonical(ours))

    return ChatTokenizer(tok, bos=find("bos", BOS), eos=find("eos", EOS), pad=find("pad", PAD),
                         user=find("user", USER), assistant=find("assistant", ASSISTANT))
