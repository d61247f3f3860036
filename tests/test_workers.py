"""Batched passes (speckv.workers, speckv.batching): several sessions with different cached and fed lengths in
one forward pass give what each gives alone; concurrent requests through the batched path are lossless."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import time
from types import SimpleNamespace

import pytest
import torch

from speckv import attention, workers
from speckv.batching import BatchSettings
from speckv.cost_model import CostModel
from speckv.estimates import TierEstimates
from speckv.local import LocalEngine
from speckv.sampling import SamplingParams
from speckv.workers import (
    KVCapacityError,
    LogitsCall,
    SessionLM,
    computing_in,
    half_precision_layers,
    keep_float32_copies,
    kv_bytes_per_token,
    multiplies_in,
)

from .conftest import EOS_ID, certain_predictor
from .test_engine import PROMPT, exact_sequence_probs, pooled_p_value


def _sequences(*lengths: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, EOS_ID, (n,), generator=g).tolist() for n in lengths]


LAYOUTS = ["own caches", "own caches, one call", "side by side", "padded"]


def use_layout(monkeypatch, layout: str) -> None:
    """Make every batched pass run in `layout`: packed, each row's keys in its own cache (SpecKV's attention), its
    rows attending one call each or all in one call (speckv.attention.padded_attention);
    packed, the caches copied side by side with a 4-D mask (attention that takes no rows); padded."""
    monkeypatch.setattr(workers, "_packs", lambda model, rows: layout != "padded")
    monkeypatch.setattr(workers, "reads_own_caches", lambda model: layout.startswith("own caches"))
    if layout.endswith("one call"):
        monkeypatch.setattr(attention, "ONE_CALL_DEVICES", frozenset({"cpu"}))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_batched_pass_gives_each_session_what_it_gets_alone(target_model, monkeypatch, layout):
    """Rows with a warm cache cut back, a new session, different fed lengths and logits kept; then a second
    pass on the caches the batched one left behind. In every layout of a pass."""
    use_layout(monkeypatch, layout)
    alone, batched = SessionLM(target_model), SessionLM(target_model)
    seqs = _sequences(5, 17, 40, 3)
    for lm in (alone, batched):
        for i, s in enumerate(seqs[:3]):
            lm.logits(f"s{i}", s[:-2] + [7, 7], 1)  # cached, with two tokens the next call does not share
    for extra, keep in (([], (1, 3, 2, 3)), ([1, 2, 3], (4, 1, 4, 2))):
        calls = [LogitsCall(f"s{i}", s + extra, n) for i, (s, n) in enumerate(zip(seqs, keep))]
        expected = [alone.logits(c.session_id, c.token_ids, c.num_logits) for c in calls]
        got = batched.logits_batch(calls)
        for e, g in zip(expected, got):
            assert g.shape == e.shape
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    assert batched.stats().sessions == 4


def test_a_pass_that_fails_part_way_leaves_caches_that_are_rebuilt_not_used_half_written(target_model):
    """A batched pass appends to its rows' own caches layer by layer; one that raises in a middle layer has
    written some layers and not others. Its sessions are then rebuilt from the next call's tokens, which gives
    what a session that never failed gives."""
    failing, alone = SessionLM(target_model), SessionLM(target_model)
    seqs = _sequences(9, 14, seed=5)
    for lm in (failing, alone):
        for i, s in enumerate(seqs):
            lm.logits(f"s{i}", s, 1)
    calls = [LogitsCall(f"s{i}", s + [4, 5], 2) for i, s in enumerate(seqs)]

    def fail(*_):
        raise RuntimeError("a layer failed")

    hook = target_model.model.layers[1].register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="a layer failed"):
            failing.logits_batch(calls)
    finally:
        hook.remove()
    assert failing.missing("s0", seqs[0]) == len(seqs[0])
    for got, want in zip(failing.logits_batch(calls), alone.logits_batch(calls)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_feeds_a_long_prompt_a_chunk_at_a_time(target_model):
    chunked, whole = SessionLM(target_model), SessionLM(target_model)
    (prompt,) = _sequences(300)
    assert chunked.prefill("a", prompt, chunk_tokens=64) == 4  # 64+64+64+64; the last 44 ride in the next pass
    assert chunked.missing("a", prompt) == 44
    assert chunked.prefill("a", prompt + [1] * 20, chunk_tokens=64) == 0  # a chunk's worth goes in the shared pass
    assert chunked.prefill("a", prompt + [1] * 21, chunk_tokens=64) == 1
    torch.testing.assert_close(chunked.logits("a", prompt + [3], 2), whole.logits("a", prompt + [3], 2),
                               atol=1e-5, rtol=1e-5)


def test_a_short_prompt_rides_in_the_verify_pass_of_the_running_requests(target_model):
    """A new request's prompt of at most a chunk is fed in the shared verify pass itself, packed beside the
    running requests' rows, not in a prefill pass of its own (which paid a pass's fixed cost for each prompt read
    alone): one forward call for the whole pass, the output layer scoring only the rows wanted, and every request
    gets what it gets alone."""
    from speckv.workers import StepInputs, TargetWorker

    running = _sequences(20, 27, seed=11)
    (prompt,) = _sequences(50, seed=12)
    batched, alone = TargetWorker(SessionLM(target_model)), TargetWorker(SessionLM(target_model))
    for worker in (batched, alone):
        for i, context in enumerate(running):
            worker.lm.logits(f"r{i}", context, 1)
    steps = [StepInputs(f"r{i}", context + [5], 1, SamplingParams(), 0, 3) for i, context in enumerate(running)]
    new = StepInputs("new", prompt, 2, SamplingParams(), 0, 0)
    assert not batched.needs_prefill(new)
    passes, scored = [], []
    hooks = [target_model.register_forward_hook(lambda *_: passes.append(1)),
             target_model.get_output_embeddings().register_forward_hook(
                 lambda module, args, out: scored.append(args[0].shape[-2] * args[0].shape[0]))]
    try:
        got = batched.verify_batch([(s, [9]) for s in steps] + [(new, [3, 4])])
    finally:
        for hook in hooks:
            hook.remove()
    assert len(passes) == 1 and scored == [2 + 2 + 3] and got[0].batch_tokens == 2 + 2 + 52
    assert {g.read_tokens for g in got} == {49}  # the prompt but its last token, which the pass scores
    expected = [alone.verify(s, [9]) for s in steps] + [alone.verify(new, [3, 4])]
    assert [g.target_token_ids for g in got] == [e.target_token_ids for e in expected]


def test_a_drafting_pass_reports_the_most_a_sequence_read_before_drafting(draft_model):
    """A new request's prompt rides in the first drafting pass of the running ones: every proposal of the batch
    says how much one sequence read there, so the cost model does not learn that read as drafting
    (speckv.cost_model.LiveCost.observe); after a verification a drafting step reads one or two tokens."""
    from speckv.workers import DraftWorker, StepInputs

    draft = DraftWorker(SessionLM(draft_model))
    running, prompt = _sequences(20, 30, seed=13)
    draft.lm.logits("r", running, 1)
    steps = [StepInputs("r", running + [4], 2, SamplingParams(), 0, 3),
             StepInputs("new", prompt, 2, SamplingParams(), 0, 0)]
    assert {p.most_read for p in draft.propose_batch(steps)} == {30}
    (alone,) = draft.propose_batch([StepInputs("r", running + [4, 5], 1, SamplingParams(), 0, 4)])
    assert alone.most_read <= 2


def test_a_pass_packs_where_its_rows_keep_their_caches_or_padding_would_run_or_score_what_nobody_wants(
        target_model):
    """With SpecKV's attention, a pass always runs packed, each row's keys in its own cache. Elsewhere packing
    copies the caches, and a padded pass runs every row as long as the longest and scores every row from the
    earliest wanted position on; where either wastes more than PADDING_WASTE of the real tokens, it runs packed."""
    def rows(*spec: tuple[int, int]) -> list:
        return [workers._Row(None, LogitsCall(str(i), [1] * fed, n)) for i, (fed, n) in enumerate(spec)]

    flash = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2", layer_types=None))
    assert workers.reads_own_caches(target_model) and not workers.reads_own_caches(flash)
    sliding = copy.deepcopy(target_model.config)
    sliding.layer_types = ["sliding_attention"] * len(sliding.layer_types)
    assert not workers.reads_own_caches(SimpleNamespace(config=sliding))
    assert not workers._packs(flash, rows(*[(3, 3)] * 8))  # a verify pass of equal runs
    assert workers._packs(target_model, rows(*[(3, 3)] * 8))
    assert workers._packs(flash, rows(*[(2, 2)] * 7, (4, 4)))  # one longer run: padding
    assert not workers._packs(flash, rows((40, 1), (38, 1), (36, 1)))  # prompts of about one length: 12 too many
    assert workers._packs(flash, rows((40, 1), (40, 1), (40, 1), (36, 36)))  # one scores all: 121 too many
    assert workers.pass_positions(flash, rows((40, 1), (40, 1), (40, 1), (36, 36))) == 156
    assert workers.pass_positions(flash, rows(*[(3, 3)] * 7, (2, 2))) == 24
    assert workers.pass_positions(target_model, rows(*[(3, 3)] * 7, (2, 2))) == 23


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_prefill_pass_scores_no_row_and_leaves_the_caches_reading_alone_would(target_model, monkeypatch, layout):
    """Prompts of different lengths, a chunk of each read in one prefill pass (both layouts): nobody reads a
    chunk's logits, so the output layer runs on no row (padded, it scored every row from the shortest prompt's
    end on: 254 rows of the 151936-wide output layer for eight drafts' prompts); the caches it leaves give what
    reading alone would."""
    use_layout(monkeypatch, layout)
    prompts = _sequences(40, 36, 33, 30)  # each lacks more than a chunk of 16: one chunk each, in one pass
    batched, alone = SessionLM(target_model), SessionLM(target_model)
    scored = []
    hook = target_model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: scored.append(args[0].shape[-2] * args[0].shape[0]))
    try:
        assert batched.prefill_step([(f"p{i}", p) for i, p in enumerate(prompts)], chunk_tokens=16) == len(prompts)
    finally:
        hook.remove()
    assert scored == [0]
    for i, p in enumerate(prompts):
        torch.testing.assert_close(batched.logits(f"p{i}", p + [3], 2), alone.logits(f"p{i}", p + [3], 2),
                                   atol=1e-5, rtol=1e-5)


def test_a_half_precision_models_passes_compute_in_float32_from_the_chosen_size(half_model):
    """SessionLM.float32_from: a pass of at least that many token positions (a prompt's, or several sessions'
    single tokens) multiplies its half-precision layers (4-bit or plain bf16) in float32, a smaller one as
    loaded (bf16), and what they multiply in is restored after each; the output embedding switches by the rows
    it scores. The same prompt read either way continues alike. Float32 copies live only while chosen."""
    lm = SessionLM(half_model)
    assert lm.half_layers and {multiplies_in(layer) for layer in lm.half_layers} == {torch.bfloat16}
    assert lm.output_layer is half_model.get_output_embeddings()
    body: list[torch.dtype] = []
    head: list[torch.dtype] = []
    hooks = [lm.half_layers[0].register_forward_pre_hook(lambda module, args: body.append(multiplies_in(module))),
             lm.output_layer.register_forward_pre_hook(lambda module, args: head.append(multiplies_in(module)))]
    prompt = _sequences(40)[0]
    try:
        lm.logits("as loaded", prompt, 1)
        assert lm.compute_in_float32_from(4) == lm.float32_copy_bytes() > 0
        for session in ("in float32", "s0", "s1"):
            lm.logits(session, prompt, 1)
        assert body == [torch.bfloat16] + 3 * [torch.float32] and set(head) == {torch.bfloat16}  # 40 tokens, 1 row
        del body[:], head[:]
        steps = [lm.logits(s, prompt + [5, 6], 3) for s in ("as loaded", "in float32")]  # 3 positions each
        lm.logits_batch([LogitsCall(f"s{i}", prompt + [5, 6], 1) for i in range(2)])  # 2 x 2 positions, 2 scored
        lm.logits_batch([LogitsCall(f"s{i}", prompt + [5, 6, 7], 2) for i in range(2)])  # 2 x 2 positions, 4 scored
    finally:
        for hook in hooks:
            hook.remove()
    assert body == 2 * [torch.bfloat16] + 2 * [torch.float32]
    assert head == 3 * [torch.bfloat16] + [torch.float32]
    assert {multiplies_in(layer) for layer in [*lm.half_layers, lm.output_layer]} == {torch.bfloat16}
    assert steps[0].argmax(-1).tolist() == steps[1].argmax(-1).tolist()
    lm.compute_in_float32_from(None)
    assert lm.float32_copy_bytes() == 0 and lm.float32_from is None
    with pytest.raises(ValueError, match="at least 1"):
        lm.compute_in_float32_from(0)


def test_plain_layers_in_float32_multiply_their_float32_copies(bf16_model):
    """Inside computing_in(float32) a plain bf16 layer's output is its float32 product rounded to bf16 (not the
    bf16 product); outside, as loaded; without its float32 copy it refuses rather than converting every pass."""
    layer = half_precision_layers(bf16_model)[0]
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    exact = torch.nn.functional.linear(x.float(), layer.weight.float(),
                                       None if layer.bias is None else layer.bias.float()).to(torch.bfloat16)
    with pytest.raises(ValueError, match="keep_float32_copies"), computing_in([layer], torch.float32):
        pass
    keep_float32_copies([layer])
    with computing_in([layer], torch.float32):
        torch.testing.assert_close(layer(x), exact, atol=0, rtol=0)
    assert layer(x).dtype == torch.bfloat16 and "forward" not in vars(layer)
    assert bf16_model.get_output_embeddings() not in half_precision_layers(bf16_model)


def _engine(draft_model, target_model, tokenizer, batching: BatchSettings | None) -> LocalEngine:
    """A pair whose `adaptive` drafts on any costs (a predictor certain of acceptance)."""
    engine = LocalEngine(draft_model, target_model, tokenizer, batching=batching,
                         estimates=TierEstimates.calibrated(CostModel(0.01, 10.0, 0.001), learning=False))
    engine.predictor = certain_predictor()
    return engine


@pytest.mark.parametrize("policy,layout", [("fixed:3", "own caches"), ("adaptive", "own caches"),
                                           ("none", "own caches"), ("fixed:3", "own caches, one call")])
def test_fp32_greedy_requests_in_batches_equal_each_alone(draft_model, target_model, tokenizer, policy, layout,
                                                          monkeypatch):
    """Requests of different prompt lengths and budgets join and leave mid-run (staggered starts), sharing
    draft and verify passes; each request's tokens are those it gets alone. With the rows of a pass attending
    one call each and all in one call."""
    use_layout(monkeypatch, layout)
    alone = _engine(draft_model, target_model, tokenizer, None)
    batched = _engine(draft_model, target_model, tokenizer, BatchSettings(max_batch_size=4))
    prompts = [PROMPT] + _sequences(3, 30, 12, 50, 7, seed=1)
    budgets = [40, 12, 30, 25, 18, 35]
    requests = [batched.request(p, n) for p, n in zip(prompts, budgets)]
    results = asyncio.run(batched.generate_many(requests, policy, starts_s=[0, 0, 0.05, 0.1, 0.3, 0.3]))
    for request, result in zip(requests, results):
        assert result.token_ids == alone.generate(request.prompt_ids, policy, request.max_new_tokens).token_ids
    sizes = [r.batch_size for result in results for r in result.records]
    assert max(sizes) > 1 and min(sizes) < max(sizes), sizes  # passes were shared, and the batch changed


def test_regrouped_passes_are_lossless_and_never_wait_for_an_ended_request(draft_model, target_model, tokenizer):
    """With regrouping (a verify pass waits for the sessions of the last one, speckv.batching.Batcher) the
    requests keep their tokens, and a request that ended is not waited for: with a 10 s regroup bound the
    requests left after the short ones end are not held up."""
    alone = _engine(draft_model, target_model, tokenizer, None)
    batched = _engine(draft_model, target_model, tokenizer, BatchSettings(max_batch_size=4, regroup_s=10.0))
    prompts = _sequences(5, 30, 12, seed=2)
    requests = [batched.request(p, n) for p, n in zip(prompts, [3, 30, 8])]
    start = time.monotonic()
    results = asyncio.run(batched.generate_many(requests, "adaptive"))
    assert time.monotonic() - start < 8.0
    for request, result in zip(requests, results):
        assert result.token_ids == alone.generate(request.prompt_ids, "adaptive", request.max_new_tokens).token_ids
    assert max(r.batch_size for r in results[1].records) == 3


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.7, top_p=0.9)], ids=["t0.7-top_p"])
def test_sampling_through_batched_passes_keeps_the_target_distribution(draft_model, target_model, tokenizer,
                                                                       params):
    """As test_engine's distribution test, with requests verified in shared passes beside requests of other
    lengths (so their rows are padded): the first three tokens follow the target's own distribution
    (chi-square over 2000 seeds against exact probabilities)."""
    engine = LocalEngine(draft_model, target_model, tokenizer, batching=BatchSettings(max_batch_size=10))
    counts: dict[tuple[int, ...], int] = {}
    sizes = []
    for first_seed in range(0, 2000, 8):
        requests = [engine.request(PROMPT, 3, dataclasses.replace(params, seed=s))
                    for s in range(first_seed, first_seed + 8)]
        others = [engine.request(p, 4, params) for p in _sequences(2, 15, seed=first_seed)]
        for result in asyncio.run(engine.generate_many(requests + others, "fixed:2"))[:8]:
            seq = tuple(result.token_ids) + ((EOS_ID,) if result.stats.finish_reason == "stop" else ())
            counts[seq] = counts.get(seq, 0) + 1
            sizes += [r.batch_size for r in result.records]
    assert sorted(sizes)[len(sizes) // 2] > 1  # most steps were verified in a shared pass
    exact = exact_sequence_probs(target_model, params, 3)
    assert pooled_p_value(counts, exact) > 1e-3
    assert pooled_p_value(counts, exact_sequence_probs(draft_model, params, 3)) < 1e-6  # the test has power


def test_kv_bytes_per_token_follow_the_architecture(target_model):
    # 2 layers x (keys, values) x 2 KV heads x head size 64/4 x 4 bytes (float32)
    assert kv_bytes_per_token(target_model) == 2 * 2 * 2 * 16 * 4
    lm = SessionLM(target_model)
    lm.logits("a", _sequences(30)[0], 1)
    assert lm.stats().kv_bytes == 30 * lm.bytes_per_token


def test_the_kv_byte_bound_turns_new_requests_away_and_never_running_ones(target_model):
    """Room for 100 tokens: a second request of 60 waits (KVCapacityError, the router's 503) while the first
    is running; a running request growing past the bound drops the others' idle caches instead of failing;
    once the first is idle, the new one gets its room, and the first still gets the same logits when it comes
    back (its cache is rebuilt from its token ids)."""
    lm = SessionLM(target_model, max_kv_bytes=100 * kv_bytes_per_token(target_model), active_s=60.0)
    a, b = _sequences(60, 60, seed=3)
    before = lm.logits("a", a, 2)
    with pytest.raises(KVCapacityError, match="retry later"):
        lm.prefill("b", b)
    assert not lm.has_session("b") or lm.stats().kv_bytes == 60 * lm.bytes_per_token
    lm.logits("a", a + [1] * 30, 1)  # the running request grows to 90 tokens: fine
    lm.active_s = 0.0  # now "a" counts as idle
    lm.prefill("b", b)
    lm.logits("b", b, 1)
    assert not lm.has_session("a") and lm.stats().kv_bytes <= 100 * lm.bytes_per_token
    torch.testing.assert_close(lm.logits("a", a, 2), before, atol=1e-5, rtol=1e-5)
    assert lm.stats().kv_bytes <= 100 * lm.bytes_per_token


def test_a_closed_session_fails_alone_in_a_shared_pass(draft_model, target_model):
    """A call still in flight for a request that has ended (its client went away) shares a pass with running
    requests: it gets SessionClosedError, they get their results."""
    from speckv.sampling import SamplingParams
    from speckv.workers import DraftWorker, SessionClosedError, StepInputs, TargetWorker

    a, b = _sequences(12, 20, seed=5)
    steps = [StepInputs(sid, ids, 3, SamplingParams(), 0, 1) for sid, ids in (("a", a), ("b", b))]
    target, draft = TargetWorker(SessionLM(target_model)), DraftWorker(SessionLM(draft_model))
    alone = [target.verify(s, [1, 2]) for s in steps]
    target.lm.close("a")
    draft.lm.close("a")
    failed, served = target.verify_batch([(s, [1, 2]) for s in steps])
    assert isinstance(failed, SessionClosedError) and served.target_token_ids == alone[1].target_token_ids
    failed, proposal = draft.propose_batch(steps)
    assert isinstance(failed, SessionClosedError) and len(proposal.token_ids) == 3
    with pytest.raises(SessionClosedError):
        target.verify(steps[0], [1])
    long = StepInputs("a", _sequences(300)[0], 3, SamplingParams(), 0, 1)  # would need a prefill: it must not spin
    assert not target.needs_prefill(long)
    with pytest.raises(SessionClosedError):
        target.lm.prefill("a", long.context_ids)


def test_a_batched_proposal_reports_the_drafting_passes_it_timed(draft_model):
    """Runs of 3, 1 and 0 tokens drafted together: three drafting passes carrying four sequence-positions,
    which is what each proposal's `compute_ms` timed (the policy learns the draft's cost against them)."""
    from speckv.sampling import SamplingParams
    from speckv.workers import DraftWorker, StepInputs

    draft = DraftWorker(SessionLM(draft_model))
    steps = [StepInputs(sid, ids, gamma, SamplingParams(), 0, 1)
             for sid, ids, gamma in zip("abc", _sequences(12, 20, 9, seed=3), (3, 1, 0))]
    proposals = draft.propose_batch(steps)
    assert [len(p.token_ids) for p in proposals] == [3, 1, 0]
    assert {(p.passes, p.rows, p.batch_size) for p in proposals} == {(3, 4, 3)}


def test_common_prefix_len_agrees_with_the_definition_at_every_chunk_boundary():
    import random

    from speckv.workers import common_prefix_len

    rng = random.Random(0)
    for _ in range(500):
        a = [rng.randrange(3) for _ in range(rng.randrange(0, 40))]
        b = a[:rng.randrange(0, len(a) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(0, 10))]
        expected = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        for chunk in (1, 3, 8, 256):
            assert common_prefix_len(a, b, chunk) == expected == common_prefix_len(b, a, chunk), (a, b, chunk)


def test_a_forked_session_continues_as_its_source_would(target_model):
    """Calibration's batched probes fork one cached context into several sessions: each then gives the
    logits a session that read the context itself gives, and the source is left as it was."""
    from speckv.workers import LogitsCall, SessionLM

    lm, fresh = SessionLM(target_model), SessionLM(target_model)
    context, more = list(range(5, 25)), [7, 8, 9]
    lm.logits("a", context, 1)
    lm.fork("a", "b")
    assert lm.missing("b", context) == 0
    forked = lm.logits_batch([LogitsCall("b", context + more, 3)])[0]
    alone = fresh.logits("x", context + more, 3)
    assert torch.allclose(forked, alone, atol=1e-4)
    assert torch.allclose(lm.logits("a", context + more[:1], 1), alone[:1], atol=1e-4)


def test_a_verification_reports_the_longest_draft_run_of_the_others_in_its_pass(target_model):
    """What `adaptive` learns the others' drafting from (PassLoad.others_deepest_run): each row gets the longest
    run among the other rows of its pass, not its own; and the positions the pass ran (this one packs: its rows'
    fed lengths differ too much to pad)."""
    from speckv.workers import StepInputs, TargetWorker

    worker = TargetWorker(SessionLM(target_model))
    prompts = _sequences(5, 9, 7, seed=3)
    runs = [[], [1, 2, 3], [4]]
    batch = [(StepInputs(f"s{i}", p, len(r), SamplingParams(), 0, 0), r) for i, (p, r) in enumerate(zip(prompts, runs))]
    verifications = worker.verify_batch(batch)
    assert [v.others_deepest for v in verifications] == [3, 1, 3]
    fed = [len(p) + len(r) for p, r in zip(prompts, runs)]  # no cache yet: prompt and drafted tokens, 5, 12, 8
    assert [v.batch_tokens for v in verifications] == [sum(fed)] * 3  # packed; padded, 3 rows of 12


def test_requests_started_together_each_price_their_first_step_for_all_of_them(draft_model, target_model,
                                                                               tokenizer):
    """Requests that arrive together are all in flight when the first of them decides its first step (where the
    draft reads the whole prompt, the dearest drafting a request makes): counted one by one as each decided,
    the first of eight requests priced it as if alone (TierEstimates.sharing 1). One that arrives after they
    ended is alone."""
    engine = _engine(draft_model, target_model, tokenizer, BatchSettings(max_batch_size=4))
    seen: list[int] = []
    make = engine.policy

    def policy(spec: str, sampling: SamplingParams = SamplingParams()):
        made = make(spec, sampling)
        choose = made.choose

        def first_step_sharing(context):
            if context.step == 0:
                seen.append(engine.estimates.sharing)
            return choose(context)
        made.choose = first_step_sharing
        return made

    engine.policy = policy
    requests = [engine.request(p, n) for p, n in zip(_sequences(5, 9, 7, 4, seed=3), [6, 6, 6, 3])]
    asyncio.run(engine.generate_many(requests, "adaptive", starts_s=[0, 0, 0, 5.0]))
    assert seen == [3, 3, 3, 1]
