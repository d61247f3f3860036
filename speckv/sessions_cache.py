"""The cache of a packed pass whose rows keep their own caches (`speckv.workers.packed_forward`).

A packed pass feeds several sessions' tokens as one sequence. Its attention needs each row's keys: its session's
cached ones and its own fed ones. Copying every session's cache into one batched cache for the pass and each
row's columns back out after it (and transformers' own cache growing the batched one by concatenation) copied all
the rows' keys and values four times a pass. Here each layer's new keys and values are split by row and appended
to that row's own cache, as a pass of one row appends them, and attention reads every row's keys from there
(`speckv.attention.PackedRows.caches`): on the AVX512-BF16 EPYC, eight 1.5B sessions after ~512 tokens of context
pass in 0.82-0.91x the time at bf16 (`scripts/batched_pass_shape.py --context 512`, docs/SERVING.md). Imported
lazily: it needs transformers, which the router never loads.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .attention import PackedRows


class SessionsCache(DynamicCache):
    """A pass's stand-in cache over `rows.caches`. It holds nothing itself: `update` appends each row's slice of
    the fed keys and values ([1, KV heads, sum(fed), head dim]) to that row's cache and hands the fed ones back
    unchanged (attention takes every row's whole keys from its own cache). Seen from the model it is empty, so
    the model's causal mask covers the fed tokens only, which packed attention does not read."""

    def __init__(self, config, rows: PackedRows) -> None:
        super().__init__(config=config)
        assert rows.caches is not None and len(rows.caches) == len(rows.fed)
        self.rows = rows

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        for cache, start, length in zip(self.rows.caches, self.rows.fed_at, self.rows.fed):
            cache.update(key_states[:, :, start:start + length], value_states[:, :, start:start + length], layer_idx)
        return key_states, value_states
