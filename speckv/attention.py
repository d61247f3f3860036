"""Attention for the passes SessionLM runs, registered with transformers as `ATTENTION` (`use_in(model)`).

It is torch's scaled_dot_product_attention, as transformers' "sdpa", with three changes:

- **Grouped-query heads folded onto the query axis.** Where G query heads share a key/value head (the 1.5B
  target: 12 on 2), transformers calls CPU sdpa with `enable_gqa` (no mask) or copies the keys G times
  (`repeat_kv`, a mask and several queries); both are slow on CPU. Attending a group's G heads as G × L
  queries of one head reads the keys as they are (AVX512-BF16 EPYC, one layer's attention, bf16, 1000 keys:
  one query 1.32 → 0.12 ms, nine 1.20 → 0.57, eight rows' one query 10.7 → 0.85; `scripts/attention_paths.py`).
  On other devices sdpa's own kernels take GQA and plain calls go to transformers' sdpa unchanged.
- **Packed rows attend to their own keys only.** A pass over several sessions laid out as one sequence
  (`speckv.workers.packed_forward`) passes `packed_rows`: each row's queries attend to its own cached keys and
  its own earlier fed tokens, one sdpa call per row, so a 256-token prompt riding beside seven 1000-token
  contexts pays its own attention, not the whole batch's (a 4-D mask over every row's keys made that pass cost
  5.6 s against 2.6 s for the verify pass and the prompt apart, fp16; now 2.4 s; `scripts/prompt_riding.py`).
  Where the rows keep their own caches through the pass (`PackedRows.caches`, `speckv.sessions_cache`), each
  row's keys are read from its own cache, so no pass copies the sessions' caches into one.
- **Masks built once a pass.** A row of several queries needs a causal mask; every layer reads the one its first
  layer built (`PackedRows.row_mask`), already repeated over a group's heads. Built per row and layer, its small
  kernels were more than half of what a second token a row added to a pass of eight rows where a pass is bound by
  its calls (a stand-in for a launch-bound GPU host, AMX Xeon with avx512_bf16 and amx_bf16: 9.3-9.4 → 3.8-4.5 ms;
  `scripts/packed_attention_calls.py`), and the likely cause, read from the code and not profiled there, of an
  H100's pass of eight rows scoring two tokens each costing 80 ms against 32 for one each (docs/RESULTS.md, "Third
  lease"). The rows may also attend in one call, padded into one batch under one mask (`padded_attention`,
  `PaddedRows`), on the device types named in `ONE_CALL_DEVICES`: none, for on the CPU it is slower (it copies
  every row's keys at every layer: 1.03-1.19x the per-row calls, same stand-in) and on a GPU it has not been
  measured (`speckv.tools.arch_costs --attention both` measures the two back to back on one).

Calls this cannot take as they are (soft-capped logits, attention sinks, position biases, sliding windows in a
packed pass) go to transformers' sdpa, a packed pass with the 4-D mask `PackedRows.mask` builds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache, cached_property
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

ATTENTION = "speckv_sdpa"
ONE_CALL_DEVICES: frozenset[str] = frozenset()  # device types whose packed passes attend in one call, not per row


@contextmanager
def one_call_on(devices: frozenset[str]) -> Iterator[None]:
    """Packed passes attend in one call on `devices` (ONE_CALL_DEVICES) inside the block, as before it after:
    what the tools that time both paths switch."""
    global ONE_CALL_DEVICES
    before, ONE_CALL_DEVICES = ONE_CALL_DEVICES, devices
    try:
        yield
    finally:
        ONE_CALL_DEVICES = before


@dataclass(frozen=True)
class PaddedRows:
    """A packed pass laid out as a batch for one attention call: row i's queries in slots [i, :fed[i]] of a
    [rows, `fed`] grid, its keys at [i, :cached[i] + fed[i]] of a [rows, `keys`] grid (`padded_attention`)."""

    queries: torch.Tensor  # [rows · fed] long: the packed query in each slot (a padding slot repeats its row's last)
    outputs: torch.Tensor  # [sum(fed)] long: the grid slot of each packed query, in packed order
    mask: torch.Tensor  # [rows, 1, G·fed, keys] bool, True = attend (a padding slot sees its row's first key only),
    # repeated over the G heads of a group (grouped_sdpa)
    fed: int  # the grid's width: the longest row's fed tokens

    @classmethod
    def of(cls, cached: tuple[int, ...], fed: tuple[int, ...], groups: int, device: torch.device) -> PaddedRows:
        if min(fed) < 1:
            raise ValueError(f"every packed row feeds a token at least, got {fed}")
        f, s = max(fed), max(c + n for c, n in zip(cached, fed))  # the grid: slots a row, keys a row
        c, n = torch.tensor(cached)[:, None, None], torch.tensor(fed)[:, None, None]  # [R, 1, 1]
        slot, key = torch.arange(f)[None, :, None], torch.arange(s)[None, None, :]
        real = slot < n  # [R, F, 1]
        mask = (real & (key <= c + slot)) | (~real & (key == 0))  # no query slot sees nothing (sdpa: NaN)
        start = torch.tensor(list(accumulate(fed, initial=0))[:-1])[:, None]  # [R, 1]
        queries = (start + torch.minimum(slot[..., 0], n[..., 0] - 1)).flatten()
        outputs = torch.cat([i * f + torch.arange(m) for i, m in enumerate(fed)])
        folded = mask.repeat(1, groups, 1)[:, None]  # as grouped_sdpa folds a group's heads onto the queries
        return cls(queries.to(device), outputs.to(device), folded.to(device), f)


@dataclass(frozen=True)
class PackedRows:
    """Where the rows of a packed pass sit. Queries: the fed tokens side by side (row i's `fed[i]` from
    `fed_at[i]`). Keys: where `caches` is None, every row's cached tokens side by side (row i's `cached[i]` from
    `cache_at[i]`), then every row's fed tokens side by side, so row i's fed keys sit at `sum(cached) + fed_at[i]`;
    where `caches` holds each row's own transformers cache, row i's keys are that cache's layer (its `cached[i]`
    tokens, then its fed ones, which the pass's cache appended: `speckv.sessions_cache.SessionsCache`)."""

    cached: tuple[int, ...]
    fed: tuple[int, ...]
    caches: tuple | None = field(default=None, compare=False)
    _built: dict = field(default_factory=dict, compare=False, repr=False)  # masks and layouts, once a pass

    def _once(self, key: tuple, build: Callable[[], object]):
        """What `build` makes for `key`, built at the pass's first layer and read by every other."""
        if key not in self._built:
            self._built[key] = build()
        return self._built[key]

    def padded(self, groups: int, device: torch.device) -> PaddedRows:
        """This pass as one batch on `device`, its mask repeated over `groups` heads (PaddedRows), once a pass."""
        return self._once(("padded", groups, device), lambda: PaddedRows.of(self.cached, self.fed, groups, device))

    def row_mask(self, fed: int, keys: int, groups: int, device: torch.device) -> torch.Tensor | None:
        """The causal mask of a row feeding `fed` tokens among `keys` (causal_mask; None for one token, which sees
        every key), built once a pass for each shape and read by every layer: built per row and layer, its
        small kernels were more than half of what a second token a row added where a pass is bound by its calls
        (the module docstring)."""
        if fed == 1:
            return None
        return self._once(("row", fed, keys, groups, device), lambda: causal_mask(fed, keys, groups, device))

    def row_keys(self, i: int, key: torch.Tensor, value: torch.Tensor,
                 layer: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Row i's keys and values ([1, KV heads, cached[i] + fed[i], D]) at `layer`, from its own cache or from
        the pass's concatenated `key`/`value`."""
        if self.caches is not None:
            own = self.caches[i].layers[layer]
            return own.keys, own.values
        k, f, total_cached = self.cached[i], self.fed[i], sum(self.cached)
        own = slice(total_cached + self.fed_at[i], total_cached + self.fed_at[i] + f)
        if not k:
            return key[:, :, own], value[:, :, own]
        cached = slice(self.cache_at[i], self.cache_at[i] + k)
        return (torch.cat([key[:, :, cached], key[:, :, own]], dim=2),
                torch.cat([value[:, :, cached], value[:, :, own]], dim=2))

    def concatenated(self, key: torch.Tensor, value: torch.Tensor,
                     layer: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values laid out as `mask` expects them (every row's cached ones, then every row's fed
        ones), for attention that cannot read the rows' own caches."""
        if self.caches is None:
            return key, value
        rows = [self.row_keys(i, key, value, layer) for i in range(len(self.fed))]
        parts = [(k[:, :, :n], v[:, :, :n]) for (k, v), n in zip(rows, self.cached)]
        parts += [(k[:, :, n:], v[:, :, n:]) for (k, v), n in zip(rows, self.cached)]
        return torch.cat([k for k, _ in parts], dim=2), torch.cat([v for _, v in parts], dim=2)

    @cached_property
    def cache_at(self) -> list[int]:  # read by every layer of the pass
        return list(accumulate(self.cached, initial=0))

    @cached_property
    def fed_at(self) -> list[int]:
        return list(accumulate(self.fed, initial=0))

    def visible(self) -> torch.Tensor:
        """[sum(fed), sum(cached) + sum(fed)] bool: which keys each query attends to."""
        total_cached, cache_at, fed_at = sum(self.cached), self.cache_at, self.fed_at
        seen = torch.zeros(sum(self.fed), total_cached + sum(self.fed), dtype=torch.bool)
        for i, (k, f) in enumerate(zip(self.cached, self.fed)):
            q = slice(fed_at[i], fed_at[i] + f)
            seen[q, cache_at[i]:cache_at[i] + k] = True
            seen[q, total_cached + fed_at[i]:total_cached + fed_at[i] + f] = torch.ones(f, f, dtype=torch.bool).tril()
        return seen

    def mask(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The additive 4-D mask [1, 1, queries, keys] for attention implementations that take no `packed_rows`."""
        seen = self.visible()
        return torch.zeros(seen.shape, dtype=dtype).masked_fill_(~seen, torch.finfo(dtype).min)[None, None].to(device)


def causal_mask(length: int, keys: int, groups: int, device: torch.device) -> torch.Tensor:
    """[1, 1, G·L, S] bool: L queries, the last L of S keys, each seeing the keys up to its own, repeated over
    the G heads of a group as grouped_sdpa folds them (query g·L + l is query l)."""
    query = torch.arange(groups * length, device=device) % length
    return (query[:, None] + (keys - length) >= torch.arange(keys, device=device)[None])[None, None]


def grouped_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                 scaling: float | None, causal: bool = True) -> torch.Tensor:
    """Attention with the query heads of a key/value group folded onto the query axis.

    query [B, H, L, D]; key, value [B, Hkv, S, D] (H a multiple of Hkv, G = H / Hkv); mask [B or 1, 1, L, S]
    or already repeated over a group's heads [B or 1, 1, G·L, S] (bool, True = attend, or additive) or None:
    every query sees every key where L is 1 or not `causal`, else causal, aligned to the last key.
    Returns [B, H, L, D]."""
    b, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    if mask is None and length > 1 and causal:
        mask = causal_mask(length, key.shape[2], groups, query.device)
    folded = query.reshape(b, key.shape[1], groups * length, dim)  # head h = kv * G + g -> query g * L + l
    if mask is not None and groups > 1 and mask.shape[-2] != groups * length:
        mask = mask.repeat(1, 1, groups, 1)
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, heads, length, value.shape[-1])


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows: PackedRows,
                     scaling: float | None, layer: int | None = None) -> torch.Tensor:
    """Each packed row's queries over its own cached keys and its own fed tokens (causal among those).
    query [1, H, sum(fed), D]; key, value [1, Hkv, sum(cached) + sum(fed), D], or only the fed ones where the
    rows keep their own caches (`rows.caches`, read at `layer`). Returns [1, H, sum(fed), D]."""
    fed_at = rows.fed_at
    out = []
    for i, f in enumerate(rows.fed):
        keys, values = rows.row_keys(i, key, value, layer)
        mask = rows.row_mask(f, keys.shape[2], query.shape[1] // keys.shape[1], query.device)
        out.append(grouped_sdpa(query[:, :, fed_at[i]:fed_at[i] + f], keys, values, mask, scaling))
    return torch.cat(out, dim=2)


def padded_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows: PackedRows,
                     scaling: float | None, layer: int | None = None) -> torch.Tensor:
    """packed_attention in one sdpa call: every row's queries and keys padded to the longest row's and a mask
    keeping each row to its own (`PackedRows.padded`). Same shapes as packed_attention. A layer's launches no
    longer grow with the rows but for copying their keys (in pad_sequence's C++ loop); the padding's attention is
    computed and thrown away. Slower than the per-row calls on CPU; for devices where it is measured faster."""
    n = len(rows.fed)
    own = [rows.row_keys(i, key, value, layer) for i in range(n)]
    grid = rows.padded(query.shape[1] // own[0][0].shape[1], query.device)
    keys = pad_sequence([k[0].transpose(0, 1) for k, _ in own], batch_first=True).transpose(1, 2)  # [R, Hkv, S, D]
    values = pad_sequence([v[0].transpose(0, 1) for _, v in own], batch_first=True).transpose(1, 2)
    q = query[0].index_select(1, grid.queries).unflatten(1, (n, grid.fed)).transpose(0, 1)  # [R, H, F, D]
    out = grouped_sdpa(q, keys, values, grid.mask, scaling)  # [R, H, F, Dv]
    return out.transpose(0, 1).flatten(1, 2).index_select(1, grid.outputs)[None]


def speckv_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     packed_rows: PackedRows | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: (attention output [B, L, H, D], no weights)."""
    plain = (dropout == 0.0 and not kwargs.get("softcap") and kwargs.get("position_bias") is None
             and kwargs.get("s_aux") is None and kwargs.get("cache") is None and query.shape[1] % key.shape[1] == 0
             and (attention_mask is None or attention_mask.shape[1] == 1))
    if packed_rows is not None:
        layer = getattr(module, "layer_idx", None)
        if plain and kwargs.get("sliding_window") is None:
            attend = padded_attention if query.device.type in ONE_CALL_DEVICES else packed_attention
            out = attend(query, key, value, packed_rows, scaling, layer)
            return out.transpose(1, 2).contiguous(), None
        key, value = packed_rows.concatenated(key, value, layer)
        attention_mask = packed_rows.mask(query.dtype, query.device)
    elif plain and query.device.type == "cpu":
        out = grouped_sdpa(query, key, value, attention_mask, scaling, causal=getattr(module, "is_causal", True))
        return out.transpose(1, 2).contiguous(), None
    return _transformers_sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                **kwargs)


@cache
def _transformers_sdpa() -> Callable:
    """transformers' own sdpa attention, imported once (not per layer call; lazily: the router imports this
    module through speckv.workers and never loads transformers)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def use_in(model: torch.nn.Module) -> bool:
    """Run `model`'s attention through `speckv_attention` where it runs transformers' sdpa or eager attention
    (flash and flex kernels are left as they are; a packed pass then builds its mask). Returns whether it does."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", "eager", ATTENTION):
        return False
    AttentionInterface.register(ATTENTION, speckv_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    if config._attn_implementation != ATTENTION:
        model.set_attn_implementation(ATTENTION)
    return True
