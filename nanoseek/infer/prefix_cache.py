"""Prefix caching: a prompt that begins like one already in the cache reads that part's latent
cache instead of recomputing it (vLLM's automatic prefix caching, over nanoseek's slots).

Prompts are cut into blocks of `block_size` tokens and each full block gets a hash chained
over all blocks before it (blake2b of the previous hash and the block's ids), so a block's
hash names the same tokens at the same positions wherever it appears, and the longest
cached prefix of a prompt is found with one dictionary lookup per block.

The engine's cache is `num_slots` rows of max_len positions. A slot's content is indexed by
block once it is written (a prompt after its prefill; prompt and output when its request
ends) and stays findable after the request leaves: a free slot keeps its blocks until it is
taken again. A new request takes the free slot that holds its longest prefix (nothing to
copy) or else a free slot holding nothing, or the least recently used one (eviction: its
blocks leave the index); when the prefix sits in another slot, a running one included, its
positions are copied into the new slot on the device before the prefill, which then computes
only the rest of the prompt. At least the prompt's last token is always computed (its logits
choose the first output token). So the prefix cache holds nothing beyond the engine's cache
budget: it is what the idle slots still contain.

The index only ever describes what a slot holds: taking a slot forgets its blocks past the
reused prefix first, and blocks are added after the positions were written.
"""

from __future__ import annotations

import hashlib
from array import array


class PrefixCache:
    def __init__(self, num_slots: int, block_size: int = 16):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.index: dict[bytes, set[int]] = {}              # block hash -> slots holding that prefix
        self.blocks: list[list[bytes]] = [[] for _ in range(num_slots)]  # per slot, its blocks' hashes
        self.last_used = [0] * num_slots
        self.clock = 0

    def hashes(self, ids: list[int]) -> list[bytes]:
        """The chained hashes of the full blocks of ids."""
        out, prev, B = [], b"", self.block_size
        for start in range(0, len(ids) - B + 1, B):
            prev = hashlib.blake2b(prev + array("q", ids[start: start + B]).tobytes(), digest_size=16).digest()
            out.append(prev)
        return out

    def longest(self, hashes: list[bytes], limit_tokens: int) -> tuple[int | None, int]:
        """(a slot holding the longest cached prefix, its length in tokens), at most
        limit_tokens; (None, 0) when no block is cached."""
        n = min(len(hashes), limit_tokens // self.block_size)
        for i in range(n - 1, -1, -1):  # chained: block i cached in a slot means blocks 0..i are too
            slots = self.index.get(hashes[i])
            if slots:
                return max(slots, key=self.last_used.__getitem__), (i + 1) * self.block_size
        return None, 0

    def choose(self, free: list[int], hashes: list[bytes], limit_tokens: int,
               protected: set[int]) -> tuple[int, int | None, int]:
        """For a request with these block hashes, among the free slots (none of `protected`,
        the sources of copies still to be made): (its slot, the slot to copy its prefix from
        or None, the prefix's length in tokens). Forgets the taken slot's blocks past it."""
        source, cached = self.longest(hashes, limit_tokens)
        candidates = [s for s in free if s not in protected]
        if source in candidates:
            slot = source
        else:
            slot = min(candidates, key=lambda s: (bool(self.blocks[s]), self.last_used[s]))
        keep = cached // self.block_size if slot == source else 0
        self.forget(slot, keep)
        self.touch(slot)
        if source is not None:
            self.touch(source)
        return slot, (source if cached and source != slot else None), cached

    def record(self, slot: int, ids: list[int]) -> None:
        """Index the blocks of `ids`, the tokens whose cache entries `slot` now holds from position 0."""
        hashes = self.hashes(ids)
        for h in hashes[len(self.blocks[slot]):]:
            self.index.setdefault(h, set()).add(slot)
        if len(hashes) > len(self.blocks[slot]):
            self.blocks[slot] = hashes

    def forget(self, slot: int, keep: int = 0) -> None:
        """Drop the slot's blocks from block `keep` on (it is about to be written there)."""
        for h in self.blocks[slot][keep:]:
            slots = self.index.get(h)
            if slots is not None:
                slots.discard(slot)
                if not slots:
                    del self.index[h]
        del self.blocks[slot][keep:]

    def touch(self, slot: int) -> None:
        self.clock += 1
        self.last_used[slot] = self.clock

    @property
    def cached_blocks(self) -> int:
        return sum(map(len, self.blocks))
