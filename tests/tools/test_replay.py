"""Exact replay and the oracle on hand-made traces."""

from __future__ import annotations

import numpy as np

from speckv.cost_model import CostModel
from speckv.signals import NO_STOP
from speckv.tools.replay import Trace, fixed, oracle, replay, stop_oracle


class Scripted:
    """A policy that plays back a list of γ choices."""

    name = "scripted"
    draft_stop = NO_STOP

    def __init__(self, gammas: list[int]) -> None:
        self.gammas = iter(gammas)

    def choose(self, context) -> int:
        return next(self.gammas)

    def observe(self, outcome) -> None:
        pass


def make_trace(accept_len: list[int], gamma_max: int = 4, prompt_len: int = 10) -> Trace:
    n = len(accept_len)
    ones = np.ones((n, gamma_max))
    return Trace("p", "c", prompt_len, np.asarray(accept_len), ones, ones, ones)


def test_fixed_replay_counts_steps_and_time():
    trace = make_trace([4, 0, 0, 0, 0, 2, 0, 0, 0, 0])
    cost = CostModel(draft_ms_per_token=10, verify_ms_base=100, verify_ms_per_token=5)
    r = replay(trace, fixed(2), cost)
    # p=0: γ2 accept2 -> p=3; p=3: γ2 accept0 -> p=4; p=4: acc0 -> 5; p=5: acc2 -> 8; p=8: γ capped to 1, acc0 -> 9;
    # p=9: γ0 -> 10
    assert r.gammas == [2, 2, 2, 2, 1, 0]
    assert r.tokens == 10 and r.steps == 6
    assert r.ms == 4 * (20 + 110) + (10 + 105) + 100


def test_none_is_one_token_per_step():
    trace = make_trace([3] * 8)
    r = replay(trace, fixed(0), CostModel(10, 100, 5))
    assert r.steps == 8 and r.ms == 800


def test_oracle_is_never_worse_than_any_fixed_gamma():
    rng = np.random.default_rng(0)
    for _ in range(20):
        trace = make_trace(list(rng.integers(0, 5, size=40)), prompt_len=int(rng.integers(2, 400)))
        # the draft's reading of what it has not read is priced too (replay charges it to every drafting policy)
        cost = CostModel(rng.uniform(5, 50), rng.uniform(50, 200), rng.uniform(0, 60),
                         draft_prefill_ms_per_token=rng.uniform(0, 4))
        best = oracle(trace, cost)
        for g in range(5):
            assert best.ms <= replay(trace, fixed(g), cost).ms + 1e-9
        # the oracle's own choices replay to its time
        assert abs(replay(trace, Scripted(best.gammas), cost).ms - best.ms) < 1e-9
        # the stop-rule bound is a policy too: never faster than the oracle, and its choices replay to its time
        stop = stop_oracle(trace, cost)
        assert best.ms <= stop.ms + 1e-9 and abs(replay(trace, Scripted(stop.gammas), cost).ms - stop.ms) < 1e-9


def test_oracle_pays_the_drafts_reading_of_a_long_prompt():
    """Where drafting pays only if the draft reads the prompt for free, the oracle does not draft; where the
    prompt is short, it does."""
    accept = [4, 0, 0, 0, 0] * 3
    cost = CostModel(draft_ms_per_token=10, verify_ms_base=100, verify_ms_per_token=5, draft_prefill_ms_per_token=2)
    # drafting saves at most 12 steps of 100 ms against 3 drafted runs of 4 tokens (3 x 60 ms)
    long_prompt, short_prompt = make_trace(accept, prompt_len=1000), make_trace(accept, prompt_len=10)
    assert oracle(long_prompt, cost).ms == replay(long_prompt, fixed(0), cost).ms == 1500
    short = oracle(short_prompt, cost)
    assert short.ms < 1500 and short.gammas[0] == 4
    assert abs(replay(short_prompt, Scripted(short.gammas), cost).ms - short.ms) < 1e-9


def test_cost_model_fit_recovers_linear_costs():
    gammas = [0, 1, 2, 4, 8, 1, 2, 4]
    draft = [10.0 * g for g in gammas]
    verify = [100 + 20.0 * g for g in gammas]
    cm = CostModel.fit(gammas, draft, verify)
    assert abs(cm.draft_ms_per_token - 10) < 1e-9
    assert abs(cm.verify_ms_base - 100) < 1e-6 and abs(cm.verify_ms_per_token - 20) < 1e-6


def test_replay_of_a_collected_trace_matches_live_runs(draft_model, target_model, tokenizer):
    """fp32 greedy: replaying fixed γ over a trace reproduces the live engine's steps and γ sequence."""
    from speckv.local import LocalEngine
    from speckv.tools.replay import collect_trace
    from speckv.workers import DraftWorker, SessionLM

    engine = LocalEngine(draft_model, target_model, tokenizer)
    prompt = [5, 17, 33, 2, 40, 41, 8]
    reference = engine.generate(prompt, "none", 30)
    trace = collect_trace(DraftWorker(SessionLM(draft_model)), reference.token_ids, prompt, gamma_max=6)
    cost = CostModel(1.0, 10.0, 1.0)
    for gamma in (1, 3, 6):
        live = engine.generate(prompt, f"fixed:{gamma}", 30)
        replayed = replay(trace, fixed(gamma), cost)
        assert replayed.steps == live.stats.steps, gamma
        assert replayed.gammas == [r.gamma for r in live.records], gamma
        assert sum(r.accepted for r in live.records) == replayed.tokens - replayed.steps


def test_paired_speedup_statistics():
    from speckv.tools.stats import first_divergence, paired_speedup

    c = paired_speedup("a", [2.0, 4.0, 3.0, 5.0, 6.0], "b", [1.0, 2.0, 1.5, 2.5, 3.0])
    assert abs(c.speedup - 2.0) < 1e-9 and c.ci95[0] <= 2.0 <= c.ci95[1]
    assert c.p_value == 2 / 32  # all five ratios favour a: the smallest p a sign-flip test can give
    noisy = paired_speedup("a", [1.1, 0.9, 1.05, 0.95], "b", [1.0, 1.0, 1.0, 1.0])
    assert noisy.p_value > 0.5
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1 and first_divergence([1, 2], [1, 2, 3]) == 2


def test_draft_stop_rules():
    import math

    import pytest

    from speckv.signals import DraftStop

    stopper = DraftStop(min_confidence=0.5).stopper()
    assert [stopper.stop_after(c, 0.1) for c in (0.9, 0.6, 0.4)] == [False, False, True]
    every_token_08 = DraftStop(0.0, 0.5, (0.0, 0.0, 0.0, math.log(0.8 / 0.2)))  # P(accept) = 0.8 per token
    stopper = every_token_08.stopper()
    assert [stopper.stop_after(0.9, 0.1) for _ in range(4)] == [False, False, False, True]  # 0.8³ ≥ 0.5 > 0.8⁴
    by_confidence = DraftStop(0.0, 0.5, (1.0, 0.0, 0.0, 0.0))  # P(accept) = the token's confidence
    assert by_confidence.token_acceptance(0.7, 2.0, 5) == __import__("pytest").approx(0.7)
    assert DraftStop.from_dict(every_token_08.to_dict()) == every_token_08
    assert every_token_08.with_min_confidence(0.3).min_confidence == 0.3
    assert every_token_08.with_min_confidence(0.0) is every_token_08
    with pytest.raises(ValueError, match="token weights"):
        DraftStop(0.0, 0.5, ())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        DraftStop(1.5)


def test_resized_trace_equals_a_trace_collected_with_longer_runs(target_model, tokenizer):
    """Chaining γmax-token runs (resize) gives exactly what collecting with longer runs gives (fp32)."""
    from speckv.local import LocalEngine

    from ..conftest import perturbed_copy

    draft_model = perturbed_copy(target_model, 0.1, 2)  # close enough that many runs are accepted whole
    from speckv.tools.replay import collect_trace, resize
    from speckv.workers import DraftWorker, SessionLM

    engine = LocalEngine(draft_model, target_model, tokenizer)
    prompt = [5, 17, 33, 2, 40, 41, 8]
    reference = engine.generate(prompt, "none", 30).token_ids
    short = collect_trace(DraftWorker(SessionLM(draft_model)), reference, prompt, gamma_max=2)
    long = collect_trace(DraftWorker(SessionLM(draft_model)), reference, prompt, gamma_max=6)
    chained = resize(short, 6)
    assert chained.accept_len.tolist() == long.accept_len.tolist()
    assert (long.accept_len > 2).any()  # some runs really are chained
    for p in range(long.n):
        known = min(long.accept_len[p] + 1, 6, long.n - p)  # tokens up to the first rejected one are defined
        np.testing.assert_allclose(chained.confidence[p, :known], long.confidence[p, :known], rtol=1e-4, atol=1e-5)
    cut = resize(long, 2)
    assert cut.accept_len.tolist() == short.accept_len.tolist() and cut.gamma_max == 2


def test_stop_rule_replays_like_the_live_draft_worker(draft_model, target_model, tokenizer):
    """A run-acceptance stop rule ends runs at the same tokens live (DraftWorker) and in replay (fp32)."""
    import asyncio

    from speckv.engine import GenerationRequest, run_to_completion
    from speckv.local import LocalEngine
    from speckv.policy import FixedGamma
    from speckv.signals import DraftStop
    from speckv.tools.replay import collect_trace
    from speckv.workers import DraftWorker, SessionLM

    engine = LocalEngine(draft_model, target_model, tokenizer)
    prompt = [5, 17, 33, 2, 40, 41, 8]
    reference = engine.generate(prompt, "none", 30).token_ids
    trace = collect_trace(DraftWorker(SessionLM(draft_model)), reference, prompt, gamma_max=6)
    rule = DraftStop(0.0, 0.5, (1.0, 0.0, 0.0, 2.0))  # acceptance rises with confidence
    live = asyncio.run(run_to_completion(GenerationRequest(prompt, 30), engine.executor,
                                         FixedGamma(6, draft_stop=rule), tokenizer))
    replayed = replay(trace, FixedGamma(6, draft_stop=rule), CostModel(1.0, 10.0, 1.0))
    assert live.token_ids == reference
    assert replayed.gammas == [r.gamma for r in live.records]
    assert len(set(replayed.gammas[:-1])) > 1  # the rule really ends runs at different lengths


def test_live_steps_compared_with_the_profile(draft_model, target_model, tokenizer):
    """`speckv cost --check-live`: live step times over what the profile predicts, per part; a profile that
    claims the models are far faster than they are gets both parts flagged, one that does not, neither."""
    from speckv.local import LocalEngine
    from speckv.tools.costs import live_vs_profile

    engine = LocalEngine(draft_model, target_model, tokenizer)
    prompts = [[5, 17, 33, 2, 40, 41, 8], [9, 9, 30, 31, 32]]
    doc = live_vs_profile(engine, CostModel(1e-6, 1e-6, 0.0), prompts, "fixed:2", 12)
    assert doc["flagged"] == ["draft", "verify"] and doc["parts"]["draft"]["steps"] >= 2
    assert doc["parts"]["verify"]["steps"] >= doc["parts"]["draft"]["steps"] and doc["prefill_ms"] > 0
    doc = live_vs_profile(engine, CostModel(1e3, 1e4, 1e3), prompts, "fixed:2", 12)
    assert doc["flagged"] == [] and doc["parts"]["verify"]["median_live_over_profile"] < 1.5
