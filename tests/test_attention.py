"""speckv.attention: grouped-query heads folded onto the query axis, and packed rows attending to their own keys."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from speckv import attention
from speckv.attention import (
    ATTENTION,
    PackedRows,
    grouped_sdpa,
    packed_attention,
    padded_attention,
    speckv_attention,
    use_in,
)
from speckv.workers import LogitsCall, SessionLM
from tests.conftest import tiny_model

HEADS, KV_HEADS, DIM = 6, 2, 8


def reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Plain attention with the keys repeated per query head: query [B, H, L, D], visible [B or 1, L, S] bool."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    return scores.softmax(-1) @ value


def qkv(batch: int, length: int, keys: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, HEADS, length, DIM, generator=g), torch.randn(batch, KV_HEADS, keys, DIM, generator=g),
            torch.randn(batch, KV_HEADS, keys, DIM, generator=g))


def causal(length: int, keys: int) -> torch.Tensor:
    """[1, L, S]: query l sees keys up to its own position, the queries being the last L of the S keys."""
    return (torch.arange(length)[:, None] + keys - length >= torch.arange(keys)[None])[None]


@pytest.mark.parametrize("batch,length,keys", [(1, 1, 9), (3, 1, 12), (1, 4, 10), (2, 5, 5)])
def test_grouped_attention_without_a_mask_is_causal_attention_aligned_to_the_last_key(batch, length, keys):
    q, k, v = qkv(batch, length, keys)
    torch.testing.assert_close(grouped_sdpa(q, k, v, None, None), reference(q, k, v, causal(length, keys)))


def test_grouped_attention_takes_a_per_row_mask():
    """A padded batch's mask (row 0 padded on the left, row 1 not) applies per row, in every query head."""
    q, k, v = qkv(2, 3, 8)
    visible = causal(3, 8).repeat(2, 1, 1)
    visible[0, :, :2] = False
    torch.testing.assert_close(grouped_sdpa(q, k, v, visible[:, None], None), reference(q, k, v, visible))


def test_cpu_attention_reads_the_key_heads_as_they_are(monkeypatch):
    """On CPU every sdpa call gets the model's key/value heads, not copies per query head (transformers'
    repeat_kv) nor `enable_gqa` (both slow on CPU: the module docstring)."""
    seen = []
    real = F.scaled_dot_product_attention

    def record(query, key, value, **kwargs):
        seen.append((key.shape[1], kwargs.get("enable_gqa", False)))
        return real(query, key, value, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", record)
    module = torch.nn.Module()
    for length, mask in ((1, None), (4, None), (4, causal(4, 10)[:, None])):
        q, k, v = qkv(2, length, 10)
        out, _ = speckv_attention(module, q, k, v, mask)
        assert out.shape == (2, length, HEADS, DIM)
    assert seen == [(KV_HEADS, False)] * 3


def packed(rows: PackedRows, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    keys = sum(rows.cached) + sum(rows.fed)
    return (torch.randn(1, HEADS, sum(rows.fed), DIM, generator=g), torch.randn(1, KV_HEADS, keys, DIM, generator=g),
            torch.randn(1, KV_HEADS, keys, DIM, generator=g))


def test_each_packed_row_attends_to_its_own_cache_and_fed_tokens_only():
    rows = PackedRows(cached=(5, 0, 3), fed=(2, 4, 1))
    q, k, v = packed(rows)
    torch.testing.assert_close(packed_attention(q, k, v, rows, None), reference(q, k, v, rows.visible()[None]))
    # another row's keys changing leaves row 0's output as it was
    k2 = k.clone()
    k2[:, :, 5:8] += 1.0  # row 2's cache
    k2[:, :, 8 + 2:8 + 6] += 1.0  # row 1's fed tokens
    first = packed_attention(q, k, v, rows, None)[:, :, :2]
    torch.testing.assert_close(packed_attention(q, k2, v, rows, None)[:, :, :2], first)


def test_a_pass_builds_each_row_shapes_causal_mask_once_for_all_its_layers(monkeypatch):
    """A row of several queries needs a causal mask; every layer of the pass reads the one built at the first
    (built per row and layer, its small kernels were what such rows added to a launch-bound GPU's pass)."""
    built = []
    real = attention.causal_mask
    monkeypatch.setattr(attention, "causal_mask", lambda *a: built.append(a[:3]) or real(*a))
    rows = PackedRows(cached=(5, 0, 3, 5), fed=(2, 4, 1, 2))
    q, k, v = packed(rows, seed=5)
    first = packed_attention(q, k, v, rows, None)
    for _ in range(3):  # the pass's other layers
        torch.testing.assert_close(packed_attention(q, k, v, rows, None), first)
    assert sorted(built) == [(2, 7, HEADS // KV_HEADS), (4, 4, HEADS // KV_HEADS)]
    torch.testing.assert_close(first, reference(q, k, v, rows.visible()[None]))


def test_a_packed_call_it_cannot_take_as_it_is_runs_with_the_layouts_mask():
    """A call with a position bias goes to transformers' sdpa with `PackedRows.mask`: the same attention."""
    rows = PackedRows(cached=(4, 2), fed=(3, 1))
    q, k, v = packed(rows, seed=1)
    module = torch.nn.Module()
    module.num_key_value_groups = HEADS // KV_HEADS  # what transformers' sdpa reads to repeat the keys
    mine, _ = speckv_attention(module, q, k, v, None, packed_rows=rows)
    biased, _ = speckv_attention(module, q, k, v, None, packed_rows=rows,
                                 position_bias=torch.zeros(1, HEADS, sum(rows.fed), k.shape[2]))
    torch.testing.assert_close(biased, mine)


def own_caches(rows: PackedRows, key: torch.Tensor, value: torch.Tensor, layer: int = 1) -> PackedRows:
    """`rows` with each row's keys at `layer` in a cache of its own (as SessionsCache leaves them), taken from the
    concatenated layout; the other layers hold what no row may read."""
    caches = []
    for i in range(len(rows.fed)):
        k, v = rows.row_keys(i, key, value, None)
        layers = [SimpleNamespace(keys=torch.full_like(k, float("nan")), values=v) for _ in range(3)]
        layers[layer] = SimpleNamespace(keys=k, values=v)
        caches.append(SimpleNamespace(layers=layers))
    return PackedRows(rows.cached, rows.fed, caches=tuple(caches))


def test_packed_rows_read_their_keys_from_their_own_caches_where_they_keep_them():
    """Handed only the fed keys, each row reads the whole of its keys from its own cache, at the calling layer:
    the same attention as over the concatenated layout, through SpecKV's path and through transformers' sdpa
    (a call it cannot take as it is: the keys laid out again for `PackedRows.mask`)."""
    rows = PackedRows(cached=(5, 0, 3), fed=(2, 4, 1))
    q, k, v = packed(rows, seed=2)
    mine = own_caches(rows, k, v)
    fed_k, fed_v = k[:, :, sum(rows.cached):], v[:, :, sum(rows.cached):]
    want = reference(q, k, v, rows.visible()[None])
    torch.testing.assert_close(packed_attention(q, fed_k, fed_v, mine, None, layer=1), want)
    module = torch.nn.Module()
    module.layer_idx, module.num_key_value_groups = 1, HEADS // KV_HEADS
    out, _ = speckv_attention(module, q, fed_k, fed_v, None, packed_rows=mine)
    torch.testing.assert_close(out, want.transpose(1, 2))
    biased, _ = speckv_attention(module, q, fed_k, fed_v, None, packed_rows=mine,
                                 position_bias=torch.zeros(1, HEADS, sum(rows.fed), k.shape[2]))
    torch.testing.assert_close(biased, out)


@pytest.mark.parametrize("cached,fed", [((5, 0, 3), (2, 4, 1)), ((0, 9), (1, 1)), ((12, 1, 0, 4), (1, 9, 3, 1))])
def test_packed_rows_in_one_call_attend_as_row_by_row(cached, fed):
    """All rows in one padded call (padded_attention) is each row's queries over its own keys, as the per-row
    calls: from the concatenated layout and from the rows' own caches; padding slots change no row's output."""
    rows = PackedRows(cached, fed)
    q, k, v = packed(rows, seed=3)
    want = reference(q, k, v, rows.visible()[None])
    torch.testing.assert_close(padded_attention(q, k, v, rows, None), want)
    mine = own_caches(rows, k, v)
    fed_k, fed_v = k[:, :, sum(rows.cached):], v[:, :, sum(rows.cached):]
    torch.testing.assert_close(padded_attention(q, fed_k, fed_v, mine, None, layer=1), want)
    groups = HEADS // KV_HEADS
    grid = rows.padded(groups, q.device)
    assert grid.mask.shape == (len(fed), 1, groups * max(fed), max(c + f for c, f in zip(cached, fed)))
    assert rows.padded(groups, q.device) is grid  # built once a pass, read by every layer


def test_packed_passes_attend_in_one_call_on_the_devices_named_for_it(monkeypatch):
    """A packed pass makes one sdpa call per row; on the devices in ONE_CALL_DEVICES, one for the pass."""
    calls = []
    real = F.scaled_dot_product_attention

    def count(query, key, value, **kwargs):
        calls.append(query.shape[0])
        return real(query, key, value, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", count)
    rows = PackedRows(cached=(4, 0, 6), fed=(2, 3, 1))
    q, k, v = packed(rows, seed=4)
    per_row, _ = speckv_attention(torch.nn.Module(), q, k, v, None, packed_rows=rows)
    assert calls == [1, 1, 1]
    calls.clear()
    monkeypatch.setattr(attention, "ONE_CALL_DEVICES", frozenset({"cpu"}))
    one_call, _ = speckv_attention(torch.nn.Module(), q, k, v, None, packed_rows=rows)
    assert calls == [3]
    torch.testing.assert_close(one_call, per_row)


def test_session_lm_runs_its_model_through_speckv_attention_and_logits_stay_those_of_sdpa():
    """SessionLM switches an sdpa model to SpecKV's attention; a cached and a batched pass give sdpa's logits."""
    plain, mine = tiny_model(3), tiny_model(3)
    lm = SessionLM(mine)
    assert mine.config._attn_implementation == ATTENTION and plain.config._attn_implementation == "sdpa"
    ids = [[(7 * i + j) % 30 + 3 for j in range(n)] for i, n in enumerate((14, 9, 21))]
    for i, x in enumerate(ids):
        lm.logits(f"s{i}", x[:-3], 1)
    got = lm.logits_batch([LogitsCall(f"s{i}", x, 3) for i, x in enumerate(ids)] + [LogitsCall("new", ids[1], 2)])
    for x, logits in zip(ids + [ids[1]], got):
        with torch.no_grad():
            want = plain(input_ids=torch.tensor([x])).logits[0, -logits.shape[0]:]
        torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)


def test_flash_kernels_are_left_as_they_are():
    model = tiny_model(0)
    model.config._attn_implementation = "flash_attention_2"
    assert not use_in(model) and model.config._attn_implementation == "flash_attention_2"
