"""The speculation loop on tiny random models: cache cut-back, exactness in fp32, stops, sampling."""

from __future__ import annotations


import pytest
import torch

from speckv.engine import GenerationRequest, TextAssembler
from speckv.local import LocalEngine
from speckv.policy import FixedGamma, HeuristicGamma, make_policy
from speckv.records import StepRecord
from speckv.sampling import SamplingParams, logits_to_probs
from speckv.workers import DraftWorker, SessionLM, TargetWorker

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


def test_lost_session_is_rebuilt_from_token_ids(target_model):
    lm = SessionLM(target_model)
    a = lm.logits("s", PROMPT + [1, 2], 2)
    lm.release("s")
    b = lm.logits("s", PROMPT + [1, 2], 2)
    torch.testing.assert_close(a, b)


def test_closed_session_is_not_reopened_by_a_late_call(target_model, monkeypatch):
    """A step still in flight when its request was cancelled must not rebuild the cache `close` dropped
    (nobody would release it again); plain `release` keeps the id usable, and closed ids are remembered
    within a bound."""
    import speckv.workers as workers

    lm = SessionLM(target_model)
    lm.logits("r", PROMPT, 1)
    assert lm.close("r") and not lm.has_session("r")
    with pytest.raises(workers.SessionClosedError, match="closed"):
        lm.logits("r", PROMPT + [1], 1)
    assert lm.stats().sessions == 0
    lm.logits("x", PROMPT, 1)
    lm.release("x")
    lm.logits("x", PROMPT, 1)
    assert lm.has_session("x")
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
    if policy == "adaptive":  # a controller that drafts here (the shipped one never does at fp16 on this CPU)
        from speckv.controller import ControllerSnapshot

        from .conftest import drafting_artifact

        engine = LocalEngine(engine.draft_model, engine.target_model, engine.tokenizer)
        engine.controller = ControllerSnapshot("test", drafting_artifact())
    reference = engine.generate(PROMPT, "none", 40)
    result = engine.generate(PROMPT, policy, 40)
    if policy == "adaptive":
        assert {r.gamma_chosen for r in result.records[:-1]} == {12}  # the last step is cut by the token budget
        assert max(r.gamma for r in result.records) == 6
    assert result.token_ids == reference.token_ids
    assert result.text == reference.text
    assert result.steps < reference.steps  # the draft agrees often enough to save target passes
    assert result.tokens_per_step > 1.0


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
    assert result.mean_accepted == pytest.approx(sum(r.accepted for r in result.records) / result.steps)


def test_max_new_tokens_is_exact_and_gamma_capped(engine):
    result = engine.generate(PROMPT, "fixed:8", 5)
    assert result.new_tokens == 5 and result.finish_reason == "length"
    assert all(r.gamma <= 4 for r in result.records)


def test_eos_stops_and_is_not_emitted(draft_model, tokenizer):
    target = tiny_model(0)
    with torch.no_grad():  # make EOS the target's favourite token everywhere after the prompt
        target.lm_head.bias = None
        target.lm_head.weight[EOS_ID] = target.model.norm.weight * 50
    engine = LocalEngine(draft_model, target, tokenizer)
    result = engine.generate(PROMPT, "fixed:3", 30)
    assert result.finish_reason == "stop" and EOS_ID not in result.token_ids


def test_stop_string_truncates_text_and_streams_consistently(engine, tokenizer):
    full = engine.generate(PROMPT, "none", 30)
    assert len(full.text) > 6
    stop = full.text[4:6]
    result = engine.generate(PROMPT, "fixed:3", 30, stop=(stop,))
    assert result.finish_reason == "stop"
    assert result.text == full.text[: full.text.find(stop)]


def test_text_assembler_holds_back_partial_stop_strings(tokenizer):
    asm = TextAssembler(tokenizer, stop=("XYZ",))
    deltas = [asm.push(tokenizer.encode(s))[0] for s in ["ab", "cX", "Y"]]
    assert deltas == ["ab", "c", ""]
    delta, stopped = asm.push(tokenizer.encode("Zq"))
    assert stopped and "".join(deltas) + delta == "abc" == asm.text


def test_sampling_is_reproducible_with_a_seed(engine):
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7)
    a = engine.generate(PROMPT, "fixed:3", 25, params)
    b = engine.generate(PROMPT, "fixed:3", 25, params)
    assert a.token_ids == b.token_ids
    c = engine.generate(PROMPT, "fixed:3", 25, SamplingParams(temperature=0.8, top_p=0.9, seed=8))
    assert c.token_ids != a.token_ids


def test_speculative_sampling_matches_target_distribution_of_first_tokens(draft_model, target_model):
    """End to end through the workers: with γ=3 the first sampled token follows the target's distribution
    (chi-square over 800 seeds), and the same test rejects the draft's distribution."""
    params = lambda s: SamplingParams(temperature=1.0, seed=s)
    drafter, verifier = DraftWorker(SessionLM(draft_model)), TargetWorker(SessionLM(target_model))
    from speckv.acceptance import speculative_accept
    from speckv.sampling import step_generator

    def first_token(seed: int, gamma: int) -> int:
        prop = drafter.propose(str(seed), PROMPT, gamma, params(seed), seed, 0)
        ver = verifier.verify(str(seed), PROMPT, prop.token_ids, params(seed))
        dp = prop.draft_probs if gamma else torch.zeros((0, ver.target_probs.shape[-1]))
        r = speculative_accept(torch.tensor([prop.token_ids], dtype=torch.long), dp[None], ver.target_probs[None],
                               step_generator(seed, 0, 1))
        return r.row_tokens()[0]

    from scipy.stats import chisquare

    def pooled_p_value(counts: torch.Tensor, dist: torch.Tensor) -> float:
        """Chi-square p-value, pooling tokens whose expected count is below 5 into one bin."""
        expected = dist.double() * counts.sum()
        big = expected >= 5
        obs = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)]).double()
        exp = torch.cat([expected[big], expected[~big].sum(0, keepdim=True)])
        exp = exp * obs.sum() / exp.sum()
        return float(chisquare(obs.numpy(), exp.numpy()).pvalue)

    target_dist = logits_to_probs(target_model(torch.tensor([PROMPT])).logits[0, -1], SamplingParams(1.0))
    draft_dist = logits_to_probs(draft_model(torch.tensor([PROMPT])).logits[0, -1], SamplingParams(1.0))
    n = 800
    counts = torch.bincount(torch.tensor([first_token(s, 3) for s in range(n)]), minlength=target_dist.numel())
    assert pooled_p_value(counts, target_dist) > 1e-3
    assert pooled_p_value(counts, draft_dist) < 1e-6  # the test has the power to tell draft from target


def test_policies_are_interchangeable_objects():
    h = make_policy("heuristic")
    assert isinstance(h, HeuristicGamma) and isinstance(make_policy("fixed:3"), FixedGamma)
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("fastest")
    with pytest.raises(ValueError, match=r"fixed γ must be in \[1, 24\]"):
        make_policy("fixed:0")


def test_request_validation():
    with pytest.raises(ValueError, match="empty"):
        GenerationRequest(prompt_ids=[], max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationRequest(prompt_ids=[1], max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
