"""Exact replay and the oracle on hand-made traces."""

from __future__ import annotations

import numpy as np

from speckv.replay import CostModel, Trace, fixed, oracle, replay


class Scripted:
    """A policy that plays back a list of γ choices."""

    name = "scripted"
    min_confidence = 0.0

    def __init__(self, gammas: list[int]) -> None:
        self.gammas = iter(gammas)

    def choose(self, context) -> int:
        return next(self.gammas)

    def observe(self, outcome) -> None:
        pass


def make_trace(accept_len: list[int], gamma_max: int = 4) -> Trace:
    n = len(accept_len)
    ones = np.ones((n, gamma_max))
    return Trace("p", "c", 10, np.asarray(accept_len), ones, ones, ones)


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
        trace = make_trace(list(rng.integers(0, 5, size=40)))
        cost = CostModel(rng.uniform(5, 50), rng.uniform(50, 200), rng.uniform(0, 60))
        best = oracle(trace, cost)
        for g in range(5):
            assert best.ms <= replay(trace, fixed(g), cost).ms + 1e-9
        # the oracle's own choices replay to its time
        assert abs(replay(trace, Scripted(best.gammas), cost).ms - best.ms) < 1e-9


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
    from speckv.replay import collect_trace
    from speckv.workers import DraftWorker, SessionLM

    engine = LocalEngine(draft_model, target_model, tokenizer)
    prompt = [5, 17, 33, 2, 40, 41, 8]
    reference = engine.generate(prompt, "none", 30)
    trace = collect_trace(DraftWorker(SessionLM(draft_model)), reference.token_ids, prompt, gamma_max=6)
    cost = CostModel(1.0, 10.0, 1.0)
    for gamma in (1, 3, 6):
        live = engine.generate(prompt, f"fixed:{gamma}", 30)
        replayed = replay(trace, fixed(gamma), cost)
        assert replayed.steps == live.steps, gamma
        assert replayed.gammas == [r.gamma for r in live.records], gamma
        assert sum(r.accepted for r in live.records) == replayed.tokens - replayed.steps


def test_paired_speedup_statistics():
    from speckv.stats import first_divergence, paired_speedup

    c = paired_speedup("a", [2.0, 4.0, 3.0, 5.0, 6.0], "b", [1.0, 2.0, 1.5, 2.5, 3.0])
    assert abs(c.speedup - 2.0) < 1e-9 and c.ci95[0] <= 2.0 <= c.ci95[1]
    assert c.p_value == 2 / 32  # all five ratios favour a: the smallest p a sign-flip test can give
    noisy = paired_speedup("a", [1.1, 0.9, 1.05, 0.95], "b", [1.0, 1.0, 1.0, 1.0])
    assert noisy.p_value > 0.5
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1 and first_divergence([1, 2], [1, 2, 3]) == 2
