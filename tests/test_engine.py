"""The speculation loop on tiny random models: cache cut-back, exactness in fp32, stops, sampling."""

from __future__ import annotations

import asyncio

import pytest
import torch

from speckv.engine import GenerationRequest, TextAssembler
from speckv.local import LocalEngine
from speckv.policy import FixedGamma, HeuristicGamma, make_policy
from speckv.records import RequestStats, StepRecord
from speckv.sampling import SamplingParams, logits_to_probs
from speckv.workers import SessionLM

from .conftest import EOS_ID, tiny_model

PROMPT = [5, 17, 33, 2, 40, 41, 8]


@pytest.fixture()
def engine(draft_model, target_model, tokenizer) -> LocalEngine:
    return LocalEngine(draft_model, target_model, tokenizer)


def test_cache_cut_back_equals_fresh_forward(target_model):
    """After caching a rejected continuation, continuing on another path equals a fresh forward."""
    lm = SessionLM(target_model)
    lm.logits("s", PROMPT + [1, 2, 3, 4], 5)  # cache holds the prompt and 4 tokens that get rejected
    continued = lm.logits("s", PROMPT + [1, 9, 9], 3)  # keep one, replace the rest
    fresh = SessionLM(target_model).logits("t", PROMPT + [1, 9, 9], 3)
    torch.testing.assert_close(continued, fresh, rtol=1e-4, atol=1e-4)
    assert lm.hits == 1 and lm.rebuilds == 1


def test_passes_that_keep_fewer_logits_than_they_feed_gather_rows(target_model):
    """A catch-up (or prefill) that feeds several tokens but needs one logit asks transformers for those
    rows by index, so the output layer runs on a fresh tensor, not on the strided view an int
    `logits_to_keep` gives (about 25x slower in CPU bf16); a verification keeps every fed row (an int).
    The logits are those of a pass that scores every token."""
    seen = []
    hook = target_model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["logits_to_keep"]), with_kwargs=True)
    try:
        lm = SessionLM(target_model)
        ids = list(PROMPT)
        lm.logits("s", ids, 1)  # prefill: 7 tokens fed, 1 kept
        caught_up = lm.logits("s", ids + [3, 4, 5], 1)  # catch-up: 3 fed, 1 kept
        lm.logits("s", ids + [3, 4, 5, 6, 7], 3)  # verify-like: 2 fed... after cut-back 3 fed, 3 kept
    finally:
        hook.remove()
    assert [k.tolist() if torch.is_tensor(k) else k for k in seen] == [[6], [2], 3]
    full = target_model(torch.tensor([ids + [3, 4, 5]])).logits[0, -1]
    torch.testing.assert_close(caught_up[0], full, rtol=1e-4, atol=1e-4)


def test_lost_session_is_rebuilt_from_token_ids(target_model):
    lm = SessionLM(target_model)
    a = lm.logits("s", PROMPT + [1, 2], 2)
    lm._sessions.clear()  # evicted (LRU or idle timeout)
    b = lm.logits("s", PROMPT + [1, 2], 2)
    torch.testing.assert_close(a, b)


def test_closed_session_is_not_reopened_by_a_late_call(target_model, monkeypatch):
    """A step still in flight when its request was cancelled must not rebuild the cache `close` dropped
    (nobody would close it again); closed ids are remembered within a bound."""
    import speckv.workers as workers

    lm = SessionLM(target_model)
    lm.logits("r", PROMPT, 1)
    assert lm.close("r") and not lm.has_session("r")
    with pytest.raises(workers.SessionClosedError, match="closed"):
        lm.logits("r", PROMPT + [1], 1)
    assert lm.stats().sessions == 0
    monkeypatch.setattr(workers, "CLOSED_SESSIONS_REMEMBERED", 2)
    for sid in "abc":
        lm.close(sid)
    lm.logits("a", PROMPT, 1)  # forgotten: the oldest of three closed ids past a bound of two
    with pytest.raises(workers.SessionClosedError):
        lm.logits("c", PROMPT, 1)


def test_session_lru_bound_and_idle_timeout(target_model):
    lm = SessionLM(target_model, max_sessions=2, idle_timeout_s=3600)
    for sid in "abc":
        lm.logits(sid, PROMPT, 1)
    assert lm.stats().sessions == 2 and not lm.has_session("a") and lm.evictions == 1
    lm.idle_timeout_s = 0.0
    lm.logits("d", PROMPT, 1)
    assert lm.stats().sessions == 1  # b and c were idle past the timeout


@pytest.mark.parametrize("policy", ["fixed:1", "fixed:3", "fixed:6", "heuristic", "adaptive"])
def test_fp32_greedy_output_identical_to_target_only(engine, policy):
    if policy == "adaptive":  # a controller certain of acceptance, so it drafts on any costs
        from speckv.cost_model import CostModel
        from speckv.estimates import TierEstimates

        from .conftest import certain_predictor

        engine = LocalEngine(engine.draft_model, engine.target_model, engine.tokenizer,
                             estimates=TierEstimates.calibrated(CostModel(0.01, 10.0, 0.001), learning=False))
        engine.predictor = certain_predictor()
    reference = engine.generate(PROMPT, "none", 40)
    result = engine.generate(PROMPT, policy, 40)
    if policy == "adaptive":  # runs up to twice the MLP's γmax, the last step cut by the token budget
        assert {r.gamma_chosen for r in result.records[:-1]} == {16}
        assert max(r.gamma for r in result.records) > 1
    assert result.token_ids == reference.token_ids
    assert result.text == reference.text
    assert result.stats.steps < reference.stats.steps  # the draft agrees often enough to save target passes
    assert result.stats.tokens_per_step > 1.0


def test_target_only_equals_plain_recomputation(engine, target_model):
    """`none` (KV-cached) matches argmax decoding that recomputes the whole sequence each token."""
    ids = list(PROMPT)
    for _ in range(12):
        logits = target_model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
        if ids[-1] == EOS_ID:
            break
    expected = [t for t in ids[len(PROMPT):] if t != EOS_ID]
    assert engine.generate(PROMPT, "none", 12).token_ids == expected


def test_every_step_is_recorded_with_signals(engine):
    result = engine.generate(PROMPT, "fixed:4", 20)
    assert sum(r.emitted for r in result.records) == result.new_tokens
    for r in result.records:
        assert r.gamma == len(r.confidence) == len(r.entropy) == len(r.chosen_prob)
        assert 0 <= r.accepted <= r.gamma
        assert all(0 < c <= 1 for c in r.confidence) and all(e >= 0 for e in r.entropy)
        summary = r.summary()
        assert summary.min_confidence <= summary.mean_confidence <= summary.max_confidence
        assert StepRecord.from_dict(r.to_dict()) == r and r.to_dict()["mean_entropy"] == summary.mean_entropy
        assert r.tier == "fp16" and r.policy == "fixed:4"
    assert result.stats.mean_accepted == pytest.approx(sum(r.accepted for r in result.records) / result.stats.steps)
    assert result.stats == RequestStats.of("fixed:4", result.records, result.stats.finish_reason)


def test_max_new_tokens_is_exact_and_gamma_capped(engine):
    result = engine.generate(PROMPT, "fixed:8", 5)
    assert result.new_tokens == 5 and result.stats.finish_reason == "length"
    assert all(r.gamma <= 4 for r in result.records)


def test_eos_stops_and_is_not_emitted(draft_model, tokenizer):
    target = tiny_model(0)
    with torch.no_grad():  # make EOS the target's favourite token everywhere after the prompt
        target.lm_head.bias = None
        target.lm_head.weight[EOS_ID] = target.model.norm.weight * 50
    engine = LocalEngine(draft_model, target, tokenizer)
    result = engine.generate(PROMPT, "fixed:3", 30)
    assert result.stats.finish_reason == "stop" and EOS_ID not in result.token_ids


def test_stop_string_truncates_text_and_streams_consistently(engine, tokenizer):
    full = engine.generate(PROMPT, "none", 30)
    assert len(full.text) > 6
    stop = full.text[4:6]
    result = engine.generate(PROMPT, "fixed:3", 30, stop=(stop,))
    assert result.stats.finish_reason == "stop"
    assert result.text == full.text[: full.text.find(stop)]


def test_text_assembler_holds_back_partial_stop_strings(tokenizer):
    asm = TextAssembler(tokenizer, stop=("XYZ",))
    deltas = [asm.push(tokenizer.encode(s))[0] for s in ["ab", "cX", "Y"]]
    assert deltas == ["ab", "c", ""]
    delta, stopped = asm.push(tokenizer.encode("Zq"))
    assert stopped and "".join(deltas) + delta == "abc" == asm.text


def test_stop_string_spanning_steps_streamed_and_whole(engine, tokenizer):
    """A stop string that begins in one step's tokens and ends in the next: the whole text ends before it,
    and the streamed deltas (one per step) add up to exactly that text, never showing a piece of it."""
    full = engine.generate(PROMPT, "fixed:2", 40)
    ends, n = [], 0
    for record in full.records:
        n += record.emitted
        ends.append(n)
    cut = next(e for e in ends[1:-1] if full.text.find(full.text[e - 2: e + 2]) == e - 2)
    stop = full.text[cut - 2: cut + 2]

    async def stream() -> list[str]:
        from speckv.engine import GenerationRequest, speculate

        request = GenerationRequest(PROMPT, 40, stop=(stop,), eos_token_ids=engine.eos)
        return [e.text async for e in speculate(request, engine.executor, make_policy("fixed:2"),
                                                 TextAssembler(tokenizer, (stop,)))]

    import asyncio

    deltas = asyncio.run(stream())
    assert "".join(deltas) == full.text[: cut - 2]
    whole = engine.generate(PROMPT, "fixed:2", 40, stop=(stop,))
    assert whole.text == full.text[: cut - 2] and whole.stats.finish_reason == "stop"


def test_several_stop_strings_the_earliest_wins(tokenizer):
    asm = TextAssembler(tokenizer, stop=("ab", "later"))
    first, stopped = asm.push(tokenizer.encode("xyzla"))
    assert (first, stopped) == ("xyz", False)  # "la" may begin "later": held back
    delta, stopped = asm.push(tokenizer.encode("ter ab"))
    assert stopped and asm.text == "xyz" == first + delta
    asm = TextAssembler(tokenizer, stop=("later", "ab"))
    delta, stopped = asm.push(tokenizer.encode("x ab later"))
    assert stopped and asm.text == "x " == delta


def test_partial_utf8_is_held_back_until_whole():
    """Byte-level tokens of a multi-byte character are not shown until the character is complete."""
    from speckv.models import DEFAULT_TARGET, load_tokenizer

    tok = load_tokenizer(DEFAULT_TARGET)
    text = "naïve 𝔘𝔫𝔦 鿿龘 ꙮ ok"  # characters this vocabulary splits into byte tokens
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces)  # some tokens are parts of a character on their own
    asm = TextAssembler(tok)
    deltas = [asm.push([i], final=k == len(ids) - 1)[0] for k, i in enumerate(ids)]
    assert all("\ufffd" not in d for d in deltas), deltas
    assert "".join(deltas) == text == asm.text


def test_sampling_is_reproducible_with_a_seed(engine):
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7)
    a = engine.generate(PROMPT, "fixed:3", 25, params)
    b = engine.generate(PROMPT, "fixed:3", 25, params)
    assert a.token_ids == b.token_ids
    c = engine.generate(PROMPT, "fixed:3", 25, SamplingParams(temperature=0.8, top_p=0.9, seed=8))
    assert c.token_ids != a.token_ids


def pooled_p_value(counts: dict, expected_probs: dict) -> float:
    """Chi-square p-value of observed counts against a distribution over the same keys, pooling the
    outcomes whose expected count is below 5 into one bin."""
    from scipy.stats import chisquare

    n = sum(counts.values())
    keys = set(counts) | set(expected_probs)
    big = [k for k in keys if expected_probs.get(k, 0.0) * n >= 5]
    obs = [counts.get(k, 0) for k in big] + [sum(counts.get(k, 0) for k in keys if k not in big)]
    exp = [expected_probs[k] * n for k in big] + [sum(expected_probs.get(k, 0.0) for k in keys if k not in big) * n]
    if exp[-1] == 0:
        if obs[-1]:
            return 0.0  # outcomes the distribution rules out were observed
        obs, exp = obs[:-1], exp[:-1]
    total = sum(exp)
    return float(chisquare(obs, [e * sum(obs) / total for e in exp]).pvalue)


@torch.inference_mode()
def exact_sequence_probs(model, params: SamplingParams, length: int) -> dict[tuple[int, ...], float]:
    """P(the first `length` new tokens) when `model` alone samples with `params` after PROMPT, by
    enumerating every prefix it can produce. A sequence that samples EOS ends there (EOS is kept as its last
    element, since the engine stops on it without emitting it)."""
    probs = {(): 1.0}
    for depth in range(length):
        open_ = [p for p in probs if len(p) == depth and (not p or p[-1] != EOS_ID)]
        if not open_:
            break
        dist = logits_to_probs(model(torch.tensor([PROMPT + list(p) for p in open_])).logits[:, -1], params)
        for prefix, row in zip(open_, dist.double()):
            base = probs.pop(prefix)
            for token in row.nonzero().flatten().tolist():
                probs[prefix + (token,)] = base * float(row[token])
    return probs


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.7, top_p=0.9),
                                    SamplingParams(temperature=1.3, top_k=12)], ids=["t0.7-top_p", "t1.3-top_k"])
def test_speculative_sampling_keeps_the_target_distribution(draft_model, target_model, tokenizer, params):
    """Through `speculate` (the engine loop, workers and rule): the first three tokens sampled with γ = 2,
    which come from accepted draft tokens, recovered and bonus tokens, and span a step boundary, follow the
    target's own distribution of three-token continuations (chi-square over 2000 seeds, exact probabilities
    by enumeration); the same test rejects the draft's distribution."""
    import dataclasses

    engine = LocalEngine(draft_model, target_model, tokenizer)
    counts: dict[tuple[int, ...], int] = {}
    bonus = recovered = later_steps = 0
    for seed in range(2000):
        result = engine.generate(PROMPT, "fixed:2", 3, dataclasses.replace(params, seed=seed))
        seq = tuple(result.token_ids) + ((EOS_ID,) if result.stats.finish_reason == "stop" else ())
        counts[seq] = counts.get(seq, 0) + 1
        first = result.records[0]
        bonus += first.gamma > 0 and first.accepted == first.gamma
        recovered += first.accepted < first.gamma
        later_steps += len(result.records) > 1
    assert min(bonus, recovered, later_steps) >= 100, (bonus, recovered, later_steps)  # every path is exercised

    def p_values(exact: dict) -> list[float]:
        """The joint of the three tokens, and each position's marginal (more power where the joint is spread)."""
        tests = [(counts, exact)]
        for i in range(3):
            observed, expected = {}, {}
            for seq, n in counts.items():
                observed[seq[i: i + 1]] = observed.get(seq[i: i + 1], 0) + n
            for seq, p in exact.items():
                expected[seq[i: i + 1]] = expected.get(seq[i: i + 1], 0.0) + p
            tests.append((observed, expected))
        return [pooled_p_value(o, e) for o, e in tests]

    assert min(p_values(exact_sequence_probs(target_model, params, 3))) > 1e-3
    assert min(p_values(exact_sequence_probs(draft_model, params, 3))) < 1e-6  # the test has power


def test_a_tiny_temperature_is_greedy(engine):
    """Dividing logits by a subnormal temperature would overflow to inf (a crash in sampling); such
    temperatures mean greedy decoding."""
    greedy = engine.generate(PROMPT, "fixed:2", 12)
    for t in (3.1e-273, 1e-6):
        assert SamplingParams(temperature=t).greedy
        sampled = engine.generate(PROMPT, "fixed:2", 12, SamplingParams(temperature=t, seed=1))
        assert sampled.token_ids == greedy.token_ids
    assert not SamplingParams(temperature=1e-4).greedy


def test_policies_are_interchangeable_objects():
    h = make_policy("heuristic")
    assert isinstance(h, HeuristicGamma) and isinstance(make_policy("fixed:3"), FixedGamma)
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("fastest")
    with pytest.raises(ValueError, match=r"fixed γ must be in \[1, 24\]"):
        make_policy("fixed:0")


def test_policy_registry_feeds_the_api_the_config_and_the_cli():
    """A name added to or removed from speckv.policy.POLICIES is what every entry point accepts."""
    from pydantic import ValidationError

    from deployments.config import AppConfig
    from deployments.protocol import SpeculationOptions
    from speckv.cli import build_parser
    from speckv.policy import POLICIES, SERVED_POLICIES

    assert set(SERVED_POLICIES) == {"none", "fixed", "heuristic", "adaptive"}
    for name in SERVED_POLICIES:
        SpeculationOptions(policy=name, gamma=2 if POLICIES[name].takes_gamma else None)
    with pytest.raises(ValidationError):
        SpeculationOptions(policy="hf-assisted")  # transformers' own loop: in-process only
    with pytest.raises(ValidationError, match="not served"):
        AppConfig(default_policy="hf-assisted")
    with pytest.raises(ValidationError, match="unknown policy"):
        AppConfig(default_policy="fastest")
    assert AppConfig(default_policy=" fixed:03").default_policy == "fixed:3"
    gen = build_parser()._subparsers._group_actions[0].choices["generate"]
    assert all(n in gen.format_help() for n in POLICIES)


def test_request_validation():
    with pytest.raises(ValueError, match="empty"):
        GenerationRequest(prompt_ids=[], max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationRequest(prompt_ids=[1], max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_in_process_passes_run_on_the_loops_thread(engine):
    """In-process, the draft's and the target's passes run on the event loop's thread, not in a worker thread:
    verified in a thread, the same nf4 requests took 1.16x as long (docs/RESULTS.md, run 3)."""
    import threading

    threads: list[int] = []
    hooks = [m.register_forward_hook(lambda *_: threads.append(threading.get_ident()))
             for m in (engine.draft_model, engine.target_model)]
    try:
        result = engine.generate(PROMPT, "fixed:3", 12)
    finally:
        for hook in hooks:
            hook.remove()
    assert result.stats.steps > 1 and len(threads) > result.stats.steps
    assert set(threads) == {threading.get_ident()}  # asyncio.run runs the loop on this thread


def test_the_policy_prepares_while_a_remote_step_is_verified(engine):
    """Where the verification runs elsewhere (a target replica, reached by an awaitable call), the loop hands
    the policy the next step's possible contexts while it is in flight, and the context it then chooses for is
    one of them."""
    import threading
    import time

    from speckv.engine import SplitExecutor, run_to_completion
    from speckv.signals import NO_STOP

    verifying: list[tuple[float, float]] = []

    async def propose(inputs):
        return engine.draft_worker.propose(inputs)

    async def remote_verify(inputs, drafted):  # a handle call: in flight while the loop runs other work
        start = time.perf_counter()
        await asyncio.sleep(0.05)
        out = engine.target_worker.verify(inputs, drafted)
        verifying.append((start, time.perf_counter()))
        return out

    async def close(session_id):
        engine.draft_worker.lm.close(session_id)
        engine.target_worker.lm.close(session_id)

    executor = SplitExecutor(propose, remote_verify, close)

    class Preparing:
        name, draft_stop = "preparing", NO_STOP

        def __init__(self) -> None:
            self.seen, self.prepared = [], []

        def choose(self, context):
            self.seen.append(context)
            return 3

        def observe(self, outcome) -> None:
            pass

        def prepare(self, contexts) -> None:
            self.prepared.append((time.perf_counter(), threading.get_ident(), contexts))

    policy = Preparing()
    request = GenerationRequest(prompt_ids=PROMPT, max_new_tokens=20)
    result = asyncio.run(run_to_completion(request, executor, policy, engine.tokenizer))
    steps = result.stats.steps
    assert steps > 2 and len(policy.prepared) == steps == len(verifying)
    for s in range(1, steps):
        assert policy.seen[s] in policy.prepared[s - 1][2]
    for (at, _, _), (_, end) in zip(policy.prepared, verifying):
        assert at < end  # while its verification (sent before) was still running


def test_the_work_overlapped_with_a_verification_waits_for_the_other_requests_calls():
    """Requests on one event loop whose verifications come back together (one batched pass) each send their
    next call before any runs the work it overlaps with its verification: run at once, each request's work held
    the loop before the next could send its call, and the pass, which waits for all of them, began that much
    later (8 streams served at fp16 on an AVX512-BF16 EPYC: 21 ms more a step than `none`)."""
    import time

    from speckv.engine import SplitExecutor
    from speckv.sampling import SamplingParams
    from speckv.signals import DraftSignals
    from speckv.workers import Proposal, StepInputs, Verification

    log: list[str] = []

    async def verify(inputs, drafted):
        log.append(f"call {inputs.session_id}")
        await asyncio.sleep(0.05)
        return Verification([1], None)

    async def propose(inputs):
        return Proposal([], None, DraftSignals(), 0.0)

    async def close(session_id):
        pass

    executor = SplitExecutor(propose, verify, close)

    def overlapped(session: str):
        def work(proposal) -> None:
            log.append(f"work {session}")
            time.sleep(0.005)  # holds the loop, as a policy's preparation does
        return work

    async def run() -> None:
        await asyncio.gather(*(executor.run_step(StepInputs(s, [1, 2], 0, SamplingParams(), 0, 0), overlapped(s))
                               for s in "abc"))

    asyncio.run(run())
    assert log[:3] == ["call a", "call b", "call c"] and sorted(log[3:]) == ["work a", "work b", "work c"]


def test_the_overlapped_work_waits_for_calls_sent_after_each_requests_own_work_on_its_result():
    """Served, each request's work on its result (accepting, streaming, deciding its next step) holds the
    router's loop for a few ms before it sends its next call, and the replies of a pass reach it one by one, so
    the eight calls of the next pass go out over tens of ms. The overlapped work waits a share of the request's
    last verification, not a fixed 5 ms: with 5 ms the first requests' work ran before the last ones had sent
    their calls, and the pass, which waits for all of them, began that much later (fp16, 8 streams, AMX Xeon:
    4-7 ms more between passes than `none`'s)."""
    import time

    from speckv.engine import SplitExecutor
    from speckv.sampling import SamplingParams
    from speckv.signals import DraftSignals
    from speckv.workers import Proposal, StepInputs, Verification

    log: list[str] = []

    async def verify(inputs, drafted):
        log.append(f"call {inputs.session_id} {inputs.step}")
        await asyncio.sleep(0.4 + 0.005 * "abcdefgh".index(inputs.session_id))  # the pass; replies come one by one
        return Verification([1], None)

    async def propose(inputs):
        return Proposal([], None, DraftSignals(), 0.0)

    async def close(session_id):
        pass

    def overlapped(session: str, step: int):
        return lambda proposal: log.append(f"work {session} {step}")

    async def request(session: str) -> None:
        executor = SplitExecutor(propose, verify, close)  # one a request, as the router makes them
        for step in range(2):
            await executor.run_step(StepInputs(session, [1, 2], 0, SamplingParams(), 0, step),
                                    overlapped(session, step))
            time.sleep(0.003)  # its work on the result, holding the loop

    async def run() -> None:
        await asyncio.gather(*(request(s) for s in "abcdefgh"))

    asyncio.run(run())
    second = [entry for entry in log if entry.endswith(" 1")]
    assert second[:8] == [f"call {s} 1" for s in "abcdefgh"], second


def _timings_of_one_draft_step(tokenizer, proposal, verification, decide_s: float = 0.0) -> list:
    """Run a request whose every step drafts one token, the calls returning `proposal` and `verification` and
    each decision taking `decide_s`; the StepTimings its policy was told (from its second step)."""
    import time

    from speckv.engine import SplitExecutor, run_to_completion
    from speckv.signals import NO_STOP

    async def propose(inputs):
        return proposal

    async def verify(inputs, drafted):
        return verification

    async def close(session_id):
        pass

    class Recording:
        name, draft_stop = "recording", NO_STOP

        def __init__(self) -> None:
            self.timings = []

        def choose(self, context):
            time.sleep(decide_s)
            return 1

        def observe(self, outcome) -> None:
            self.timings.append(outcome.timing)

    policy = Recording()
    request = GenerationRequest(prompt_ids=PROMPT, max_new_tokens=8)
    asyncio.run(run_to_completion(request, SplitExecutor(propose, verify, close), policy, tokenizer))
    return [t for t in policy.timings if t is not None]


def test_a_steps_timing_carries_what_its_passes_read_for_other_requests(tokenizer):
    """The policy learns a step's costs from its timing: a drafting pass where another request's prompt rode
    (Proposal.most_read) counts as a catch-up, and a verify pass that read a prompt says how much
    (Verification.read_tokens), so neither is learned as drafting or verification (LiveCost.observe)."""
    from speckv.signals import DraftSignals
    from speckv.workers import Proposal, Verification

    later = _timings_of_one_draft_step(
        tokenizer, Proposal([5], None, DraftSignals([0.0], [0.9], [1.0]), 10.0, 2, passes=1, rows=2, most_read=40),
        Verification([5, 6], None, 30.0, 2, 2 + 1 + 40, read_tokens=40))
    assert later and {(t.draft_behind, t.verify_read) for t in later} == {(40, 40)}


def test_a_steps_whole_time_counts_what_it_waited_outside_its_calls(tokenizer):
    """StepTiming.wall_ms runs from the end of the request's previous step to the end of this one, so a request's
    steps tile its time: a wait outside its calls (here its decision, 30 ms; served, anything that held it) is in
    it, where draft_ms + verify_ms miss it. `adaptive` judges drafting under load on it (estimates.LoadedRates)."""
    import time

    from speckv.signals import DraftSignals
    from speckv.workers import Proposal, Verification

    start = time.perf_counter()
    later = _timings_of_one_draft_step(tokenizer, Proposal([5], None, DraftSignals([0.0], [0.9], [1.0]), 1.0, 2),
                                       Verification([5, 6], None, 1.0, 2), decide_s=0.03)
    elapsed_ms = (time.perf_counter() - start) * 1e3
    assert len(later) >= 2
    assert all(t.wall_ms >= 30.0 > t.draft_ms + t.verify_ms for t in later)
    assert sum(t.wall_ms for t in later) <= elapsed_ms
