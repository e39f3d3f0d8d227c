"""Batches for training: packed documents for pretraining, loss-masked chats for SFT.

Both loaders are infinite (they cycle epochs, each in a fresh seeded order), deterministic
given their seed, and resumable: `state_dict()` is a small JSON-able dict, and a loader that
`load_state_dict`s it yields exactly the batches the original would have yielded next.

A batch is {"input_ids": LongTensor[B, T], "labels": LongTensor[B, T]}, labels aligned with
input_ids: the model shifts them (logits at t predict labels[t+1], the HF convention), and
-100 marks positions that take no loss. With `world_size` > 1 each step draws
B * world_size rows and rank r keeps rows [r*B, (r+1)*B), so ranks never see the same rows
and the state is the same on every rank.
"""

from __future__ import annotations

import hashlib
from itertools import chain

import torch

IGNORE = -100  # label of positions without loss (F.cross_entropy's ignore_index)


def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    s = int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:8], "big") >> 1
    return torch.randperm(n, generator=torch.Generator().manual_seed(s))


class _Cycler:
    """Shared bookkeeping: `position` counts units (rows or examples) into epoch `epoch`."""

    def __init__(self, batch_size: int, seed: int, rank: int, world_size: int):
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got "
                             f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.epoch, self.position = 0, 0

    def _units_per_epoch(self) -> int:
        raise NotImplementedError

    def _unit(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _fingerprint(self) -> dict:
        raise NotImplementedError

    def next_batch(self) -> dict[str, torch.Tensor]:
        rows = []
        for _ in range(self.batch_size * self.world_size):
            rows.append(self._unit(self.epoch, self.position))
            self.position += 1
            if self.position == self._units_per_epoch():
                self.epoch, self.position = self.epoch + 1, 0
        mine = rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return {"input_ids": torch.stack([r[0] for r in mine]),
                "labels": torch.stack([r[1] for r in mine])}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position,
                **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        for key, value in self._fingerprint().items():
            if state.get(key) != value:
                raise ValueError(f"loader state is for other data or shapes: {key} is "
                                 f"{state.get(key)!r} there, {value!r} here")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]


class PackedLoader(_Cycler):
    """Pretraining batches: each epoch joins all documents, each followed by eos, in a
    seeded shuffled order into one stream and cuts it into rows of seq_len tokens (the
    incomplete last row of an epoch is dropped). labels == input_ids."""

    def __init__(self, token_docs: list[list[int]], batch_size: int, seq_len: int, seed: int = 0,
                 eos_id: int = 1, rank: int = 0, world_size: int = 1):
        super().__init__(batch_size, seed, rank, world_size)
        self.seq_len = seq_len
        self.lengths = torch.tensor([len(d) + 1 for d in token_docs], dtype=torch.long)
        self.starts = torch.cumsum(self.lengths, 0) - self.lengths
        self.tokens = torch.tensor(list(chain.from_iterable(d + [eos_id] for d in token_docs)),
                                   dtype=torch.long)
        if len(self.tokens) < seq_len:
            raise ValueError(f"the data holds {len(self.tokens)} tokens (with eos), fewer than "
                             f"one row of seq_len={seq_len}")
        self._cached_epoch, self._stream = None, None

    def _units_per_epoch(self) -> int:
        return len(self.tokens) // self.seq_len

    def _epoch_stream(self, epoch: int) -> torch.Tensor:
        if self._cached_epoch != (self.seed, epoch):
            order = _permutation(len(self.lengths), self.seed, epoch)
            lengths, starts = self.lengths[order], self.starts[order]
            new_starts = torch.cumsum(lengths, 0) - lengths
            # token i of the shuffled stream comes from tokens[i + (old start - new start)]
            shift = torch.repeat_interleave(starts - new_starts, lengths)
            self._stream = self.tokens[torch.arange(len(self.tokens)) + shift]
            self._cached_epoch = (self.seed, epoch)
        return self._stream

    def _unit(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self._epoch_stream(epoch)[index * self.seq_len:(index + 1) * self.seq_len]
        return row, row.clone()

    def _fingerprint(self) -> dict:
        return {"num_docs": len(self.lengths), "num_tokens": len(self.tokens),
                "seq_len": self.seq_len}


def tokenize_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered chat (equal to encoding `apply_chat_template`'s text) and
    a mask that is True on assistant content and its closing eos: the tokens to learn.
    bos, system and user turns and the <|Assistant|> tokens themselves are False."""
    if tokenizer.user_id is None or tokenizer.assistant_id is None:
        raise ValueError("the tokenizer has no <|User|>/<|Assistant|> tokens for chats")
    ids, mask = [tokenizer.bos_id], [False]
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "assistant":
            body = tokenizer.encode(content) + [tokenizer.eos_id]
            ids += [tokenizer.assistant_id] + body
            mask += [False] + [True] * len(body)
        elif role in ("user", "system"):
            prefix = [tokenizer.user_id] if role == "user" else []
            body = prefix + tokenizer.encode(content)
            ids += body
            mask += [False] * len(body)
        else:
            raise ValueError(f"unknown chat role {role!r} (expected system, user or assistant)")
    return ids, mask


class SFTLoader(_Cycler):
    """SFT batches: one chat per row, in a seeded shuffled order per epoch, truncated or
    padded (pad_id) to seq_len; labels are the ids where the mask is True, else -100."""

    def __init__(self, examples: list[tuple[list[int], list[bool]]], batch_size: int,
                 seq_len: int, seed: int = 0, pad_id: int = 2, rank: int = 0, world_size: int = 1):
        super().__init__(batch_size, seed, rank, world_size)
        if not examples:
            raise ValueError("SFTLoader needs at least one example")
        for i, (ids, mask) in enumerate(examples):
            if len(ids) != len(mask):
                raise ValueError(f"example {i}: {len(ids)} ids but {len(mask)} mask entries")
        self.examples, self.seq_len, self.pad_id = examples, seq_len, pad_id
        self._cached_epoch, self._order = None, None

    def _units_per_epoch(self) -> int:
        return len(self.examples)

    def _unit(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cached_epoch != (self.seed, epoch):
            self._order = _permutation(len(self.examples), self.seed, epoch).tolist()
            self._cached_epoch = (self.seed, epoch)
        ids, mask = self.examples[self._order[index]]
        ids, mask = ids[:self.seq_len], mask[:self.seq_len]
        pad = self.seq_len - len(ids)
        input_ids = torch.tensor(ids + [self.pad_id] * pad, dtype=torch.long)
        labels = torch.tensor([t if m else IGNORE for t, m in zip(ids, mask)] + [IGNORE] * pad,
                              dtype=torch.long)
        return input_ids, labels

    def _fingerprint(self) -> dict:
        return {"num_examples": len(self.examples), "seq_len": self.seq_len}
