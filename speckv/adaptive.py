"""The `adaptive` policy: γ per step from the learned acceptance predictor (speckv.predictor) and this
machine's run-time estimates (speckv.estimates).

Everything that depends on the machine and the moment is estimated at run time: the step costs (calibrated
when the models load, then followed online), an acceptance bias on the predictor (per request and per tier,
greedy and sampled apart) and the decode rate R (tokens per ms) that prices a millisecond. With them:

    expected_tokens(γ) = 1 + Σ_{k ≤ γ} acceptance_probs[k-1]        (accepted tokens + the bonus/recovered one)
    γ* = argmax_γ expected_tokens(γ) − R · step_ms(γ),   γ ∈ 0..γmax  (0 = no speculation)

This is the long-run-rate (renewal-reward) criterion, with R the rate the request is reaching (Dinkelbach's
iteration toward the best achievable one); maximising each step's own tokens/ms instead under-drafts in
easy stretches. Within the run the draft stops after a token once P(every token so far is accepted) falls
below R · (the marginal ms of one more token): past it, a token costs more time than it is expected to
give. When γ* = γmax the run may go on to 2·γmax, ended by that rule. γ = 0 is never absorbing: after a
stretch of target-only steps a one-token probe drafts again, spaced so probes cost at most 2% of
throughput where drafting never pays, and what it shows updates the estimates.
"""

from __future__ import annotations

import math

import numpy as np

from .estimates import RequestEstimates, TierEstimates
from .policy import MAX_GAMMA, GammaPolicy, StepContext, StepOutcome
from .predictor import TIERS, AcceptancePredictor, features, shipped_predictor
from .signals import NO_STOP, DraftStop

PROBE_SHARE = 0.02  # where drafting never pays, probes cost at most this share of throughput
MIN_PROBE_EVERY = 8  # target-only steps between probes, at least


class AdaptivePolicy:
    """γ per step from the learned acceptance predictors and the run-time estimates (module docstring).

    Per request. `choose` is a handful of numpy calls on tiny arrays; whatever depends only on the
    estimates (step prices, the stop rule, the probe spacing) is recomputed in `observe`, once per step."""

    def __init__(self, predictor: AcceptancePredictor, tier: str, estimates: TierEstimates,
                 greedy: bool = True) -> None:
        if tier not in TIERS:
            raise ValueError(f"the predictor knows tiers {', '.join(TIERS)}, not {tier!r}")
        self.name = "adaptive"
        self.tier = tier
        self.predictor = predictor
        self.estimates = RequestEstimates(estimates, greedy)
        gmax = predictor.gamma_max
        self.run_cap = min(2 * gmax, MAX_GAMMA) if predictor.token_weights else gmax
        w1, b1, mean, std = (np.asarray(x, dtype=np.float64) for x in
                             (predictor.w1, predictor.b1, predictor.feature_mean, predictor.feature_std))
        # the normalisation and the first bias fold into one matrix over [features, 1]
        self._w1 = np.ascontiguousarray(np.vstack([w1 / std[:, None], b1 - (mean / std) @ w1]))  # [F+1, H]
        self._w2 = np.ascontiguousarray(np.asarray(predictor.w2, dtype=np.float64))
        self._b2 = np.asarray(predictor.b2, dtype=np.float64)
        self._gammas = np.arange(gmax + 1)
        self._prior: np.ndarray | None = None  # the MLP's acceptance_probs at the last choice
        self._prior_rate: float | None = None  # before anything is measured (set by the first choice)
        self.draft_stop = NO_STOP
        self._refresh()

    def _refresh(self) -> None:
        """Step prices, the rate, the stop rule and the probe spacing from the current estimates."""
        cost = self.estimates.tier.cost
        price = np.asarray(cost.step_ms(self._gammas, 0), dtype=np.float64)  # [γmax+1]
        self._extra_ms = price[1:] - price[0]  # [γmax] what drafting γ adds to a step
        self._rate = (self.estimates.rate.value or self.estimates.tier.mode(self.estimates.greedy).rate.value
                      or self._prior_rate)
        self._probe_every = max(MIN_PROBE_EVERY, math.ceil(float(self._extra_ms[0]) / (PROBE_SHARE * price[0])))
        self._stop = NO_STOP
        if self.predictor.token_weights and self._rate:
            *w, b = self.predictor.token_weights
            marginal = float(self._extra_ms[-1]) / len(self._extra_ms)  # ms of one more drafted token
            self._stop = DraftStop(0.0, min(1.0, self._rate * marginal), (*w, b + self.estimates.bias.value))

    def _acceptance(self, x: list[float]) -> np.ndarray:
        """[γmax] P(first k tokens accepted): the MLP's prior (kept for `observe`), this request's bias applied
        to each token's conditional acceptance."""
        x = [*x, 1.0]
        h = np.dot(x, self._w1)
        np.maximum(h, 0.0, out=h)
        z = np.dot(h, self._w2)
        z += self._b2
        probs = np.minimum.accumulate(1.0 / (1.0 + np.exp(-z)))
        self._prior = probs
        bias = self.estimates.bias.value
        if bias == 0.0:
            return probs
        odds = _conditional(probs) / np.maximum(1.0 - _conditional(probs), 1e-9) * math.exp(bias)
        return np.cumprod(odds / (1.0 + odds))

    def choose(self, context: StepContext) -> int:
        accepted = self._acceptance(features(context, self.tier))
        if self._rate is None:  # nothing measured yet: the best one-step rate under the prior
            price0 = float(self.estimates.tier.cost.step_ms(0))
            self._prior_rate = float(max(1.0 / price0, ((1.0 + np.cumsum(accepted)) / (price0 + self._extra_ms)).max()))
            self._refresh()
        gain = np.cumsum(accepted)
        gain -= self._rate * self._extra_ms
        best = int(gain.argmax())
        tier = self.estimates.tier
        if gain[best] > 0.0:
            tier.target_only_steps = 0
            self.draft_stop = self._stop
            return self.run_cap if best + 1 == len(gain) else best + 1
        tier.target_only_steps += 1
        if tier.target_only_steps >= self._probe_every:  # γ = 0 is never absorbing
            tier.target_only_steps = 0
            self.draft_stop = NO_STOP
            return 1
        return 0

    def observe(self, outcome: StepOutcome) -> None:
        if outcome.gamma and self._prior is not None:  # each drafted token's acceptance event, until a rejection
            seen = min(outcome.accepted + 1, outcome.gamma, len(self._prior))
            self.estimates.observe_acceptance(_conditional(self._prior)[:seen].tolist(),
                                              [k < outcome.accepted for k in range(seen)])
        if outcome.timing is not None:
            t = outcome.timing
            self.estimates.observe_step(outcome.gamma, t.emitted, t.draft_ms, t.verify_ms, t.context_len)
        self._refresh()

    def report(self) -> dict:
        """This request's current estimates (the response's `speculation.estimates`)."""
        return self.estimates.to_dict()


def _conditional(probs: np.ndarray) -> np.ndarray:
    """[γmax] P(token k accepted | tokens 1..k-1 were) from P(first k all accepted)."""
    return probs / np.concatenate(([1.0], probs[:-1]))


def make_adaptive_policy(tier: str, estimates: TierEstimates, predictor: AcceptancePredictor | None = None,
                         greedy: bool = True) -> GammaPolicy:
    """A fresh per-request adaptive policy for a tier from its estimates and a predictor (default: the shipped
    one)."""
    return AdaptivePolicy(predictor or shipped_predictor(), tier, estimates, greedy)
