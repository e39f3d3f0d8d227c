"""A static per-layer cache the attention modules write into and read from.

The cache is a set of preallocated buffers, one group per layer, of shape [B, S, ...]. A
forward pass with `positions` [B, T] writes its T new entries of every sequence at those
positions and reads the whole buffer back; attention then lets query t see key s iff
s <= positions[b, t]. One rule therefore covers prefill, decode, and sequences of
different lengths in one batch, without a host sync.

A serving engine keeps one cache of fixed rows ("slots") and runs each forward over only
some of them: `cache.select(slot_ids, kv_len)` is a view with the same `update` protocol
that writes into those rows and reads back their first kv_len positions, so a prefill of
newly admitted requests or a decode of the running ones leaves every other slot alone.

What goes in depends on the attention: MLA stores only the normalised latent c_kv
(kv_lora_rank values) and the rotated RoPE key (qk_rope_head_dim values) per token;
the MHA/GQA baselines store full keys and values.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


def cache_entry_shapes(config: ModelConfig) -> list[tuple[int, ...]]:
    """Per-token shapes of what one layer caches."""
    if config.attention_type == "mla":
        return [(config.kv_lora_rank,), (config.qk_rope_head_dim,)]
    return [(config.kv_heads, config.attn_head_dim)] * 2


class StaticCache:
    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 num_layers: int | None = None):
        num_layers = num_layers or config.num_hidden_layers + config.num_nextn_predict_layers
        self.max_len = max_len
        self.layers = [[torch.zeros(batch_size, max_len, *shape, dtype=dtype, device=device)
                        for shape in cache_entry_shapes(config)] for _ in range(num_layers)]

    def update(self, layer_idx: int, positions: torch.Tensor,
               *entries: torch.Tensor) -> list[torch.Tensor]:
        """Write entries [B, T, ...] at positions [B, T]; return the full buffers [B, S, ...]."""
        return CacheView(self, slice(None), self.max_len).update(layer_idx, positions, *entries)

    def nbytes_per_token(self) -> int:
        return sum(b.element_size() * b[0, 0].numel() for layer in self.layers for b in layer)

    def nbytes(self) -> int:
        return sum(b.element_size() * b.numel() for layer in self.layers for b in layer)

    @property
    def num_slots(self) -> int:
        return self.layers[0][0].shape[0]

    def select(self, slot_ids: list[int], kv_len: int | None = None) -> CacheView:
        """A view of rows `slot_ids` whose reads cover positions [0, kv_len) (default: all)."""
        return CacheView(self, slot_ids, self.max_len if kv_len is None else kv_len)

    def copy_prefix(self, src_slot: int, dst_slot: int, n: int) -> None:
        """Positions [0, n) of row src_slot into row dst_slot, every layer (a prefix cache's reuse)."""
        for layer in self.layers:
            for buf in layer:
                buf[dst_slot, :n] = buf[src_slot, :n]

    def prefix(self, n: int) -> CacheView:
        """Rows [0, n), all positions: the static view a captured step reads (n may be symbolic
        under torch.compile, so no Python list of the rows is made)."""
        return CacheView(self, slice(0, n), self.max_len)


class CacheView:
    """Rows of a StaticCache, in the order given; `update` as StaticCache.update.

    A run of consecutive slots is a plain slice (no copy); any other set of rows is
    gathered after the write, which costs one read of what attention reads anyway."""

    def __init__(self, cache: StaticCache, slot_ids: list[int] | slice, kv_len: int):
        if not 0 < kv_len <= cache.max_len:
            raise ValueError(f"kv_len {kv_len} outside 1..{cache.max_len}")
        self.cache, self.kv_len = cache, kv_len
        device = cache.layers[0][0].device
        if not isinstance(slot_ids, slice):
            first, n = slot_ids[0], len(slot_ids)
            if list(slot_ids) == list(range(first, first + n)):
                slot_ids = slice(first, first + n)
        if isinstance(slot_ids, slice):  # reads: a plain slice of the buffers
            self.rows = slot_ids
            stop = cache.num_slots if slot_ids.stop is None else slot_ids.stop
            self.row_ids = torch.arange(slot_ids.start or 0, stop, device=device)[:, None]
        else:                            # reads: a gather of the rows
            self.row_ids = torch.tensor(slot_ids, device=device)[:, None]
            self.rows = self.row_ids[:, 0]

    def update(self, layer_idx: int, positions: torch.Tensor,
               *entries: torch.Tensor) -> list[torch.Tensor]:
        """Write entries [b, T, ...] at positions [b, T] of the selected rows; return those
        rows' buffers [b, kv_len, ...]. The write is an index_put_ on the whole buffer, not a
        scatter_ into a slice view: Inductor compiles a write into a view as a copy of the
        view, the write, and a copy back."""
        # one entry per row: index_put_ would broadcast a single row's entries to all of them
        torch._check(positions.shape[0] == self.row_ids.shape[0],
                     lambda: "CacheView.update: positions [b, T] need one row per row of the view")
        out = []
        for buf, new in zip(self.cache.layers[layer_idx], entries):
            buf.index_put_((self.row_ids, positions), new.to(buf.dtype))
            out.append(buf[self.rows, : self.kv_len])
        return out


def cache_mask(positions: torch.Tensor, max_len: int) -> torch.Tensor:
    """Boolean [B, 1, T, S]: query at positions[b, t] may attend to cache slot s <= it."""
    slots = torch.arange(max_len, device=positions.device)
    return (slots <= positions[..., None]).unsqueeze(1)
