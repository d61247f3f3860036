"""The `adaptive` policy: γ per step from the learned acceptance predictor (speckv.predictor) and this
machine's run-time estimates (speckv.estimates).

Everything that depends on the machine and the moment is estimated at run time: the step costs (calibrated
when the models load, then followed online), an acceptance calibration (a log-odds slope and bias) on the step
predictor and on the within-run token model (per request and per tier, greedy and sampled apart:
speckv.estimates.LogitCalibration) and the decode rate R (tokens per ms) that prices a millisecond. With them:

    expected_tokens(γ) = 1 + Σ_{k ≤ γ} acceptance_probs[k-1]        (accepted tokens + the bonus/recovered one)
    γ* = argmax_γ expected_tokens(γ) − R · step_ms(γ),   γ ∈ 0..γmax  (0 = no speculation)

This is the long-run-rate (renewal-reward) criterion, with R the rate the request is reaching (Dinkelbach's
iteration toward the best achievable one); maximising each step's own tokens/ms instead under-drafts in
easy stretches. Within the run the draft stops after a token once P(every token so far is accepted) falls
below R · (the marginal ms of one more token): past it, a token costs more time than it is expected to
give. When γ* = γmax the run may go on to 2·γmax, ended by that rule, where the request is alone in its
passes. γ = 0 is never absorbing: after a stretch of target-only steps a one-token probe drafts again (and
once more at the next step where the first could not teach the draft's price: `_commit`), spaced so probes
cost at most 2% of throughput where drafting never pays, and what it shows updates the estimates.

Under load. A verify pass may carry other requests (batched serving). The step costs are then those of a
pass like the ones the tier runs now (PassLoad: sequences per pass and tokens scored, as the verifications
report them), and what a request's drafting adds to the passes it shares (its drafted tokens scored in the
verify pass, its sequence in each drafting pass: LiveCost.shared_ms) delays every other request in them,
so it is priced for each of them too: the decision maximises the goodput of the whole pass (its tokens
over its time), not the request's own. Its drafted positions are priced as shared with the others' only up
to the longest run the others of the pass draft (PassLoad.others_deepest_run, from the verifications) and only
where the whole pass drafting together would pay at all, and one beyond it where the whole pass drafting that
much together would, each at its share of the pass drafting together (the others decide alike and join, and
runs grow together a position a step; a run that nobody joins for LEAD_PATIENCE steps ends; `_shared_prices`):
beyond, the pass waits for its drafting passes
alone (the verify pass regroups, speckv.batching), each a whole pass for every request waiting
(LiveCost._positions_ms; nf4 at 8 streams on an AVX2 EPYC, lone runs of 7-16 tokens held every request's step;
fp16 at 8 requests on an AMX Xeon, lone one-token runs where drafting together did not pay). The within-run
stop prices one more token as the positions drafted along with the others cost on average. The verify pass
itself charges a long run by its tokens only: where rows' lengths differ that much it packs them into one
sequence rather than padding (speckv.workers.batched_forward).
Where the replicas share one machine's cores (TierEstimates.sharing, set by the server), the requests in
flight that are not in its passes wait for them too, for its share of each drafting pass and its tokens in
the verify pass (LiveCost.alone_ms): under load on one machine the
passes fragment, and priced by its own pass alone, a request's drafting looked free (γ rose with load).
As load rises, each drafted token costs more of what the pass could deliver and γ falls; it comes back as
the load drops.
Measured as it really ran. All of the above prices a call by its compute; what drafting under load costs where the
requests fall out of step (passes mixing drafting and target-only requests, runs ending apart, each waiting for
passes it is not in) shows only in the requests' whole step times. The tier keeps, per load level, the tokens over
those times in stretches that drafted and that did not (estimates.LoadedRates; steps whose passes also read a prompt
or a draft's catch-up left out of both, those being alike in either or priced here); where drafting delivered less,
waits included, it is held (probes only) for a while and then tried again (served fp16 at 8 streams on the AMX
Xeon: rounds priced ~1.6 s took ~2.8 s, 0.85-0.87x `none` in half the rounds). No batch-size table: both inputs are
measured (docs/SERVING.md compares this with vLLM's table and SmartSpec's rule).

One run for the pass. Under load the requests of a pass decide from the same estimates: their tier's running mean
of the predictor's rows (ModeEstimates.pass_row, fed by every decision), its acceptance calibration and its rate,
not each its own; and optimism (below) does not apply, exploring being the probes' and the tier's first look's. So
they choose one run and draft together (SmartSpec's batch-level γ, reached from per-request decisions), where each
deciding from its own estimates drafted 0 beside 1 or 16 in one pass: a request drafting where the others do not
holds them through its drafting passes and splits the verify pass (served int8 at 8 streams on an AVX2 EPYC: runs
of 0, 1-3 and 16 side by side, 0.93x `fixed:1`; simulated, GPU-like shape, 8 requests in a burst: 0.952 → 0.988 of
the best fixed γ, scripts/decode_together.py; served since, level or not shown either way within this machine's
drift, docs/serving_log.md, twenty-fifth session). Alone, a request follows its own estimates (the text at hand). A
request's own catch-up still decides whether it joins.

The draft's catch-up. Drafting needs the draft to have read the context: a new request's prompt, and the
tokens of every target-only step since it last drafted (speckv.policy.RequestProgress follows how much it
lacks). Reading them rides in its first drafting pass (CostModel.catch_up_ms, calibrated; waited for by the
requests of its pass or, where the replicas share the cores, by every request on them), paid once, after which every
drafting step left in the request benefits: a step is charged its share, the catch-up over the steps the
request's remaining tokens make. So a long prompt with a short answer is not drafted for where the draft's
prefill would cost more than drafting saves, and a probe's spacing counts its catch-up too. The share decides
whether to draft, never how long (`_gain_argmax`): each token the request emits carries the same share, drafted
now or later.

Optimism while unsure. The predictor is an average over texts; the text at hand may be far easier (code,
repetition) or harder. Where the learned acceptance picks γ* = 0, a decision adds OPTIMISM/√(1 + n) log-odds
to it, n the drafted tokens this request has seen (an upper-confidence-bound rule): early in a request it tries
drafting wherever drafting could pay, and what it sees replaces the optimism as n grows. Optimism decides
whether to draft, not how long: where the learned acceptance drafts, its γ* stands (runs priced at the
optimistic acceptance were 14-16 tokens where 5 paid); where it does not, the run is the one it would draft
given that the step drafts (`_best_run`; optimism's own runs of 4-7 tokens, where a draft token cost 70% of a
target pass, cost a 32-token request 6% against `fixed:1`: the H200's nf4 shape, scripts/decode_together.py),
but at least the shortest run that pays if the optimism is right: the exploration tests whether drafting pays,
and a run that could not pay even with every token accepted only spends (float32 on an AVX512-BF16 EPYC, where
scoring two tokens cost twice one: one-token runs, then 0.95x `none` over 24 held-out prompts replayed, 0.96x
now; int8 there 0.96x, 0.99x now). The rest of its price where drafting rarely pays is kept on purpose:
exploring only where the optimistic run was a fair bet recovered it in replay but, live, left a request priced
out of drafting by a stale calibration with nothing to correct it (0.75x `fixed:2`, bf16, the thirty-second
session; docs/RESULTS.md). Where drafting cannot pay even if every token were accepted, optimism
changes nothing (the probes above are all the drafting there). Nor does it apply in a pass of several, or buy a
catch-up that other requests wait through on shared cores: exploring there costs every one of them, and is the
probes' to do, but for a tier's first look: while the tier has seen fewer than FIRST_LOOK drafted tokens, its
pass drafts a short run together at an optimism that shrinks with the tier's evidence, where the catch-up that
buys is cheap (`_first_look`). The tier's acceptance is learned only from drafted tokens; without the look,
whether a burst ever drafted hung on its first steps' prices.

Off the critical path. A decision is made between a verification's result and the next draft call, so it
is latency. The engine calls `prepare` while a step's verification is in flight (served: the target is a
replica; in-process the pass runs on the loop's thread and `prepare` follows it, speckv.local), with the next step's
context for every accepted count the verification may return; the policy folds in what the previous steps
taught its estimates, runs its MLP for all of them in one batch and decides γ for each then. `choose` is then
a table lookup and the probe count (numpy's per-call dispatch, cold after a forward pass, cost ~100 µs per
decision; with the gain's loop over γmax numbers left in `choose`, adaptive's live decision took 27 µs more
than `none`'s on an AVX2-only EPYC, 40 µs p50 in all). So a
decision uses the estimates as of the step before last, in every mode: without `prepare` (replay, a
colocated replica) `choose` decides now and folds the new evidence in itself, after deciding. A request is
first priced at its first decision, with the load as it is then (a server makes the policy before counting
the request in flight); before any verification has reported a pass, a pass is priced as carrying every request
in flight on the tier (TierEstimates.in_flight: a burst's first steps). A burst reaches a server over tens of
milliseconds, so a served request whose first step would draft waits a little (`settle_s`) for the requests
that arrived with it to be counted before it decides.
"""

from __future__ import annotations

import math

import numpy as np

from .cost_model import CAUGHT_UP
from .estimates import RequestEstimates, TierEstimates
from .policy import MAX_GAMMA, GammaPolicy, RequestProgress, StepContext, StepOutcome
from .predictor import TIERS, AcceptancePredictor, features, shipped_predictor
from .signals import NO_STOP, DraftStop, token_acceptance

OPTIMISM = 2.0  # log-odds added to acceptance before this request has seen any drafted token (÷ √(1 + seen))
FIRST_LOOK = 16  # drafted tokens a tier sees before a pass of several stops looking together (`_first_look`)
LOOK_SHARE = 0.05  # a first look buys a catch-up only where it costs at most this share of a request's tokens left
PROBE_SHARE = 0.02  # where drafting never pays, probes cost at most this share of throughput
MIN_PROBE_EVERY = 8  # target-only steps between probes, at least
LEAD_PATIENCE = 2  # drafting steps in a row that nobody else in the pass drafted, before a request stops leading
SETTLE_SHARE = 0.25  # a served first step that would draft waits this share of its draft's prompt reading (`settle_s`)


class AdaptivePolicy:
    """γ per step from the learned acceptance predictor and the run-time estimates (module docstring).

    Per request. Terms: a *row* is the predictor's output for one context as the log-odds of each draft
    token's acceptance given the ones before it (`logits`, [γmax]) and those probabilities (`conditional`);
    the *table* holds the rows `prepare` computed for the next step, by the previous step's accepted count."""

    def __init__(self, predictor: AcceptancePredictor, tier: str, estimates: TierEstimates,
                 greedy: bool = True) -> None:
        if tier not in TIERS:
            raise ValueError(f"the predictor knows tiers {', '.join(TIERS)}, not {tier!r}")
        self.name = "adaptive"
        self.tier = tier
        self.predictor = predictor
        estimates.calibrate_for(predictor)
        self.estimates = RequestEstimates(estimates, greedy)
        gmax = predictor.gamma_max
        self.run_cap = min(2 * gmax, MAX_GAMMA) if predictor.token_weights else gmax
        w1, b1, mean, std = (np.asarray(x, dtype=np.float64) for x in
                             (predictor.w1, predictor.b1, predictor.feature_mean, predictor.feature_std))
        # the normalisation folds into the first layer
        self._w1 = np.ascontiguousarray(w1 / std[:, None])  # [F, H]
        self._b1 = b1 - (mean / std) @ w1  # [H]
        self._w2 = np.ascontiguousarray(np.asarray(predictor.w2, dtype=np.float64))
        self._b2 = np.asarray(predictor.b2, dtype=np.float64)
        self._gammas = np.arange(gmax + 1)
        # (step, prev accepted) -> (row's logits, conditional, catch-up ms, the run `_best` picks or None)
        self._table: dict[tuple[int, int], tuple[list[float], list[float], float, int | None]] = {}
        self._prior: list[float] = []  # `conditional` of the row the last choice used (observe learns from it)
        self._logits: list[float] = []  # the row's logits, likewise (its tier's running mean learns from it)
        # (outcome, its prior, its logits) not yet folded in
        self._queue: list[tuple[StepOutcome, list[float], list[float]]] = []
        self._overlapped = False  # `prepare` is called (the engine overlaps it with verification)
        self._prior_rate: float | None = None  # before anything is measured (set by the first choice)
        self._priced = False  # `_refresh` runs first at its first decision, with the load as it is then
        self._held = False  # drafting is held at this load: measured, it lost to target-only decoding (`_best`)
        self._unfollowed = 0  # its drafting steps in a row in passes where no other sequence drafted (`_shared_prices`)
        self._follow_up = False  # its last step was a probe that taught nothing: the next one probes again (`_commit`)
        self.draft_stop = NO_STOP

    # ----------------------------------------------------------------- off the critical path

    def prepare(self, contexts: list[StepContext]) -> None:
        """While a verification is in flight: fold in what earlier steps taught, and decide the next step for
        each context it may lead to (one per accepted count): its row and the run `_best` picks."""
        self._overlapped = True
        self._fold_in()
        if contexts:
            rows = self._rows(np.array([features(c, self.tier) for c in contexts]))
            pass_logits = self._pass_logits()  # the same for every context
            self._table = {}
            for c, (logits, cond) in zip(contexts, rows):
                catch_up = self._catch_up_ms(c.draft_behind)
                best = self._best(logits, catch_up, c.remaining, pass_logits) if self._rate is not None else None
                self._table[(c.step, c.prev_accepted)] = (logits, cond, catch_up, best)

    def _rows(self, x: np.ndarray) -> list[tuple[list[float], list[float]]]:
        """[N, F] features -> N rows (logits, conditional), each [γmax]."""
        h = x @ self._w1 + self._b1
        np.maximum(h, 0.0, out=h)
        probs = np.minimum.accumulate(1.0 / (1.0 + np.exp(-(h @ self._w2 + self._b2))), axis=1)  # P(first k)
        cond = probs.copy()
        cond[:, 1:] /= probs[:, :-1]  # P(k-th | the ones before)
        logits = np.log(cond / np.maximum(1.0 - cond, 1e-9))
        return list(zip(logits.tolist(), cond.tolist()))

    def _row(self, context: StepContext) -> tuple[list[float], list[float]]:
        """One context's row (logits, conditional), computed now: a decision `prepare` did not make."""
        return self._rows(np.array([features(context, self.tier)]))[0]

    def _fold_in(self) -> None:
        """Fold the queued outcomes into the estimates; then recompute what depends on them."""
        for outcome, prior, logits in self._queue:
            if logits:
                self.estimates.shared.observe_row(logits)
            if outcome.gamma and prior:  # each drafted token's acceptance event, until a rejection
                seen = min(outcome.accepted + 1, outcome.gamma, len(prior))
                tokens, weights = outcome.tokens, self.predictor.token_weights
                by_token = ([token_acceptance(weights, tokens.confidence[k], tokens.entropy[k], k) for k in range(seen)]
                            if weights and tokens is not None and len(tokens) >= seen else None)
                self.estimates.observe_acceptance(prior[:seen], [k < outcome.accepted for k in range(seen)], by_token)
            if outcome.timing is not None:
                self.estimates.observe_step(outcome.gamma, outcome.timing)
                if outcome.timing.others_deepest:  # another sequence of its pass drafted
                    self._unfollowed = 0
                elif outcome.gamma and outcome.timing.batch_size > 1:
                    self._unfollowed += 1
        if self._queue:
            self._queue.clear()
            self._refresh()

    def _refresh(self) -> None:
        """Step prices, the rate, the stop rule and the probe spacing from the current estimates and load."""
        cost = self.estimates.tier.cost
        load = self.estimates.tier.load
        sequences, others = load.now(self.estimates.tier.in_flight)
        deepest = load.others_deepest_run()
        prices = cost.drafting_prices(self._gammas, 0, sequences, others)  # its verify pass priced once
        price = np.asarray(prices.step, dtype=np.float64)  # [γmax+1]
        outside = self.estimates.tier.sharing - sequences  # requests on the same cores, not in its passes

        def extra_ms(led: int) -> np.ndarray:
            """[γmax] what drafting γ costs, all told, with `led` positions drafted along with the others."""
            extra = price[1:] - price[0] + (sequences - 1) * np.asarray(prices.shared(led), dtype=np.float64)[1:]
            if outside > 0:
                extra = extra + outside * np.asarray(prices.alone(led))[1:]
            return extra

        # the lead's price: one position beyond the others' runs priced as shared by the pass, this request paying
        # its own wait for the whole drafting pass. Alone it is every decision's price; in a pass the decisions
        # are priced by `_extra_growing` (`_shared_prices`) and the lead's price is left to the within-run stop
        # and the prior rate
        extra = extra_ms(deepest + 1)
        self._extra_leading = extra.tolist()
        if sequences > 1:
            self._extra_lone = extra_ms(deepest).tolist()
            self._extra_unshared = extra_ms(0).tolist() if deepest else self._extra_lone
            # every sequence drafting γ: γ drafting passes of all, and a verify pass scoring γ more tokens for each
            together = (np.asarray(prices.draft)  # the same drafting passes; the verify pass scores everyone's γ
                        + np.asarray(cost.verify_ms(sequences * self._gammas, 0, sequences, sequences - 1)))
            self._extra_together = ((together[1:] - together[0]) * max(self.estimates.tier.sharing, sequences)
                                    / sequences).tolist()  # per request: every one drafts γ, all wait
            # runs grow together a position a step: up to one beyond the others' longest run at the pass's price,
            # further as drafted alone
            self._extra_growing = self._extra_together[:deepest + 1] + self._extra_lone[deepest + 1:]
        else:
            self._extra_lone = self._extra_unshared = self._extra_together = self._extra_growing = None
        self._price0 = float(price[0])
        own, tier_rate = self.estimates.rate.value, self.estimates.shared.rate.value
        # in a pass, the pass's rate (the tier's): every request of it prices a millisecond the same
        rate = ((tier_rate or own) if sequences > 1 else (own or tier_rate)) or self._prior_rate
        # never below what target-only decoding reaches: a run of bad steps must not make drafting look cheap. Under
        # load that is a pass of every request on the cores scoring one token each, not a pass like the current one:
        # that one carries the others' drafted tokens, so the more they drafted, the slower target-only decoding
        # looked, the cheaper a millisecond and the longer the runs (served fp16 at 8 streams on the AMX Xeon, runs
        # grew to 11-16 as the passes split; priced for such a pass, the floor was 0.0028 tokens/ms where eight
        # sequences scoring one token each give 0.0041: tests/test_adaptive.py)
        everyone = max(sequences, self.estimates.tier.sharing)
        target_only_ms = float(price[0]) if everyone == 1 else float(cost.verify_ms(0, 0, everyone, everyone - 1))
        self._rate = max(rate, 1.0 / target_only_ms) if rate else None
        # drafting at this load delivered less than target-only decoding, every wait in (estimates.LoadedRates)
        self._held = self.estimates.tier.loaded.holds(everyone)
        # a probe is one token drafted along with the others' runs where they draft, else a drafting pass of its
        # own that the whole pass waits for: priced as a shared position (the lead's price), probes under load were
        # spaced as if nearly free (AMX fp16 shape, 8-16 requests where `none` is best: 0.96-0.97x of it).
        # Under load the tier's probes cost PROBE_SHARE / sequences of throughput (`_probe_spacing`): what a probe
        # teaches (the tier's acceptance and draft cost) serves every request of the tier, and the passes report
        # the load without one; at the full share, probes were the 2% by which `adaptive` trailed `none` at fp16,
        # 8 streams, on an AVX2 EPYC (p = 0.028)
        self._probe_extra = float((self._extra_lone if sequences > 1 else extra)[0])
        self._sequences = sequences
        # the draft's catch-up, per token beyond what a drafting step feeds, waited for by the whole pass and,
        # where the replicas share the cores, by every request on them (a prefill pass holds the cores)
        waiting = max(sequences, self.estimates.tier.sharing)
        self._catch_up_per_token = waiting * float(cost.catch_up_ms(CAUGHT_UP + 1))
        self._catch_up_shared = waiting > 1
        self._stop = NO_STOP
        if self.predictor.token_weights and self._rate:
            *w, b = self.predictor.token_weights
            c = self.estimates.token_acceptance  # its calibration folds into the weights
            # ms of one more drafted token: the mean over the positions drafted along with the others (alone: all);
            # over every position, those priced as lone drafting passes made a threshold that ended two-token
            # runs after the first (GPU-like shape, 8 requests in a steady load: runs of 1.0 where 2 were chosen)
            along = len(extra) if sequences == 1 and outside <= 0 else min(deepest + 1, len(extra))
            marginal = float(extra[along - 1]) / along
            self._stop = DraftStop(0.0, min(1.0, self._rate * marginal),
                                   (*(c.slope * wi for wi in w), c.slope * b + c.intercept))

    # ----------------------------------------------------------------- on it

    def choose(self, context: StepContext) -> int:
        """The prepared decision for this context (a lookup), else decided now (the first step; replay)."""
        # the table's other rows are left for `prepare` to drop: freeing them here is ~100 objects on the
        # critical path, and a later step never matches their keys
        entry = self._table.pop((context.step, context.prev_accepted), None)
        if not self._priced:
            # not when it was made: a server makes it before counting it (and those that arrived with it) in
            # flight, and a request arriving after the first wave priced its first step (the draft reading its
            # whole prompt) as if the load were what it was before it came
            self._priced = True
            self._refresh()
        if entry is not None:
            logits, self._prior, catch_up, best = entry
        else:
            logits, self._prior = self._row(context)
            catch_up, best = self._catch_up_ms(context.draft_behind), None
        self._logits = logits
        if best is None:
            best = self._best(logits, catch_up, context.remaining)
        gamma = self._commit(best, catch_up, context)
        if not self._overlapped:
            self._fold_in()
        return gamma

    def settle_s(self, prompt_len: int, max_new_tokens: int) -> float:
        """Seconds a served request waits, before its first decision, for the requests that arrived with it to be
        counted in flight: SETTLE_SHARE of what its draft's reading of the prompt costs the requests waiting for it
        now, where its first step, priced with the load as it is now, would draft; else 0. Side-effect free: the
        first `choose` prices the step again, with the load as it is then.

        A burst reaches a server over tens of milliseconds (GuideLLM's 16 streams: 86 ms), and deciding at once,
        its first requests priced the reading for the few already counted and drafted; every request of the
        burst then waited for their drafts' prompt readings on the shared cores (int8, 16 streams, AVX2 EPYC:
        first tokens at 97.6 s against `none`'s 68.3 s). Alone, a request that waits loses at most this share
        of the reading it then pays anyway."""
        context = RequestProgress(max_new_tokens=max_new_tokens).context(0, 0, prompt_len)
        if context.draft_behind <= CAUGHT_UP:
            return 0.0
        prior_rate = self._prior_rate
        self._refresh()
        catch_up = self._catch_up_ms(context.draft_behind)
        drafts = self._best(self._row(context)[0], catch_up, context.remaining) > 0
        self._prior_rate = prior_rate  # `_best` sets it from this load when nothing is measured yet
        return SETTLE_SHARE * catch_up / 1e3 if drafts else 0.0

    def _catch_up_ms(self, behind: int) -> float:
        """What reading the `behind` tokens its draft lacks costs the pass: the catch-up (fed in the drafting
        pass, or in chunk passes before it where longer than a chunk), waited for by every request in the pass."""
        return self._catch_up_per_token * (behind - CAUGHT_UP) if behind > CAUGHT_UP else 0.0

    def _pass_logits(self) -> list[float]:
        """In a pass of several, what its requests decide from: the tier's row under the tier's calibration ("One
        run for the pass"); [] alone or before any row."""
        mode = self.estimates.shared
        if self._extra_together is None or mode.pass_row is None:
            return []
        return [mode.acceptance.logit(z) for z in mode.pass_row]

    def _best(self, logits: list[float], catch_up_ms: float = 0.0, remaining: int | None = None,
              pass_logits: list[float] | None = None) -> int:
        """The run to draft (0 = none): γ* of the learned acceptance (`_gain_argmax`), and where that is 0 and
        the optimistic acceptance drafts (module docstring: it tries drafting wherever drafting could pay), the
        learned acceptance's best run given a step drafts (`_best_run`), at least the shortest run that pays under
        the optimistic acceptance. Optimism decides whether to draft, not how long, beyond that floor; the run cap
        beyond γmax only where the learned acceptance itself picks γmax. Long optimistic runs
        opened every request on the AVX2 EPYC at nf4 (14-16 tokens, each ~10% of a pass) where the learned
        estimate picked 5. Pure but for the first call, which sets the prior rate (from the learned acceptance:
        the rate the request may reach, not an optimistic one).
        In a pass it decides from its tier's row, calibration and rate, and without optimism ("One run for the
        pass", module docstring). Optimism does not buy a catch-up that others wait through: eight nf4 requests started
        together (AVX2 EPYC, in-process), the learned acceptance drafted none, the optimistic one five, their
        drafts read their prompts (5 s the eight waited through) and two to four steps later all five stopped
        (0.94x `none`). `pass_logits`: `_pass_logits()` where the caller has it (None: computed here)."""
        learned = self.estimates.acceptance  # its events are the drafted tokens seen (none with learning off)
        in_a_pass = self._extra_together is not None
        if in_a_pass:  # one run for the pass: its requests decide from the tier's row and calibration (docstring)
            shared = self._pass_logits() if pass_logits is None else pass_logits
            logits = (shared if len(shared) == len(logits)
                      else [self.estimates.shared.acceptance.logit(z) for z in logits])
        else:
            logits = [learned.logit(z) for z in logits]
        if self._rate is None:  # nothing measured yet: the best one-step rate under the prior
            self._prior_rate = _best_one_step_rate(logits, 0.0, self._extra_leading, self._price0)
            self._refresh()
        if self._held:  # measured with its waits, drafting at this load lost to target-only decoding: probes only
            return 0
        extra = self._shared_prices(logits, catch_up_ms, remaining)
        best = self._gain_argmax(logits, 0.0, catch_up_ms, remaining, extra)
        if best:
            # past γmax only alone: in a pass the others wait for every drafting pass of its run, and the prices
            # of drafting together stop at γmax (served fp16 at 8 streams on the AMX Xeon: runs of 9-16 in passes
            # of five to eight)
            return self.run_cap if best == len(logits) and not in_a_pass else best
        if in_a_pass:
            return self._first_look(logits, catch_up_ms, remaining)
        if catch_up_ms and self._catch_up_shared:
            return 0  # optimism does not buy drafting that others wait through (docstring)
        shortest = self._gain_argmax(logits, OPTIMISM / math.sqrt(1.0 + learned.events), catch_up_ms, remaining,
                                     extra, shortest=True)
        # how long: the learned acceptance's run given it drafts, at least the shortest that pays if optimism is right
        return max(shortest, _best_run(logits, self._rate, extra)) if shortest else 0

    def _first_look(self, logits: list[float], catch_up_ms: float, remaining: int | None) -> int:
        """In a pass of several, where the learned acceptance does not draft: a one-token-or-so run that the pass
        drafts together while its tier has seen fewer than FIRST_LOOK drafted tokens (in this sampling mode), at
        the optimistic acceptance OPTIMISM / √(1 + the tier's drafted tokens seen), the shortest run that pays at
        it; else 0. The requests of a pass decide from the same row, calibration and bias, so they look together
        and one pass teaches the tier eight events, where each request's own optimism split the pass.
        Not where the drafts' catch-up the look buys costs its request more than LOOK_SHARE of its remaining
        tokens (all who wait for it, told), nor once a lead went unfollowed, nor with acceptance learning off.

        Why: the tier's acceptance is learned only from drafted tokens, and under load the predictor alone
        decides whether any are drafted. Eight requests started together on the AMX Xeon at fp16 (in-process,
        96 tokens, short prompts, fresh processes) drafted at `fixed:2`'s speed in 2 runs of 6 and never drafted,
        at `none`'s, in the other 4: their first steps' prices straddle the line. With the look they drafted in 6
        of 6 (scripts/first_look_ab.py). Where the catch-up is as dear as what drafting could save (32-token
        answers to 64-token prompts on the AMX Xeon's shape: 11% of a request; a look cost 5-12% there, simulated),
        the look is left to the probes."""
        seen = self.estimates.shared.acceptance.events
        if (seen >= FIRST_LOOK or self._unfollowed >= LEAD_PATIENCE or not self.estimates.tier.learn_acceptance
                or (catch_up_ms and (not remaining or self._rate * catch_up_ms > LOOK_SHARE * remaining))):
            return 0
        return self._gain_argmax(logits, OPTIMISM / math.sqrt(1.0 + seen), catch_up_ms, remaining,
                                 self._extra_together, shortest=True)

    def _shared_prices(self, logits: list[float], catch_up_ms: float, remaining: int | None) -> list[float]:
        """[γmax] what drafting γ costs, in a pass of several: the run that every request of the pass drafting
        together would pick (the tier's acceptance standing for every request's, `_extra_together`) decides.
        - Where drafting together pays, each request pays its share of the pass drafting together for the
          positions up to one beyond the others' longest run (`_extra_growing`): the requests of a pass decide
          from the same estimates ("One run for the pass"), so they start in the same step and their runs grow
          together a position a step; positions further out are priced as drafted alone. Priced as a lead
          instead (its own wait for the whole drafting pass plus what it adds to the others', as if they had not
          joined), drafting together never started where a drafting pass's fixed cost is large: the H200's int8
          shape (docs/results/gpu/h200_batched), 8 requests in a steady load, `adaptive` drafted nothing at
          0.93x `fixed:1` (tests/test_adaptive.py).
        - The together run is a bet that the others join: after LEAD_PATIENCE drafting steps in passes where no
          other sequence drafted, nothing is priced as shared until another sequence of its pass drafts (its own
          verifications say so). The others may not join for reasons its check cannot see (their drafts must
          first read what they lack; their policy is not `adaptive`): the AMX Xeon's fp16 shape, 8 requests in
          a steady load, one request at a time drafting alone for 8-14 steps while the others waited for its
          drafting passes (0.93x `none`).
        - Where drafting together does not pay, nothing is priced as shared: the others' drafting is then a
          probe or a run that stops, and each request joining it because riding along costs little at the
          margin made a state, everyone drafting, slower than none."""
        if self._extra_together is None:  # alone in its passes: nothing to share
            return self._extra_leading
        if self._unfollowed >= LEAD_PATIENCE:
            return self._extra_unshared
        together = self._gain_argmax(logits, 0.0, catch_up_ms, remaining, self._extra_together)
        return self._extra_growing if together else self._extra_unshared

    def _gain_argmax(self, logits: list[float], bias: float, catch_up_ms: float, remaining: int | None,
                     extra: list[float], shortest: bool = False) -> int:
        """Whether to draft, and how long. γ* = argmax Σ_{k≤γ} P(first k accepted) − R·extra_ms(γ), in plain
        Python over γmax numbers, acceptance shifted by `bias` log-odds, drafted only where some γ pays its share
        of the draft's catch-up too (`shortest`: the shortest γ that pays it, 0 where none does). The catch-up is
        paid once and serves the drafting steps left in the request (`remaining` tokens over 1 + Σ P per step), so
        a step is charged its tokens' share; all of it where `remaining` is not known. The share decides whether,
        never how long: every token the request emits carries the same share, drafted now or later, so it does not
        move the marginal token's worth (charged by γ, it cut the first run of every request at nf4, t = 0.7 on the
        model-1 EPYC, to 1-3 tokens)."""
        rate, exp = self._rate, math.exp
        # charged gain(γ) = total − R·(extra + share of the catch-up) = weight·total − R·extra − fixed, where the
        # share is catch_up_ms·(1 + total)/remaining (the step's tokens' part of it), or all of it
        share = rate * catch_up_ms / remaining if remaining else 0.0
        weight, fixed = 1.0 - share, share if remaining else rate * catch_up_ms
        p, total, best, best_gain, pays = 1.0, 0.0, 0, 0.0, False
        for k, z in enumerate(logits):
            p *= 1.0 / (1.0 + exp(-(z + bias)))
            total += p
            gain = total - rate * extra[k]
            if gain > best_gain:
                best, best_gain = k + 1, gain
            if not pays and weight * total - rate * extra[k] - fixed > 0:
                if shortest:
                    return k + 1
                pays = True
        return best if pays else 0

    def _commit(self, run: int, catch_up_ms: float, context: StepContext) -> int:
        """The run `_best` picked; where it is 0, a one-token probe once target-only steps reach the probe
        spacing (γ = 0 is never absorbing). Counts the tier's target-only steps and sets the run's stop rule.

        A probe that teaches nothing of the draft's price (a request's first step, whose timing also holds the
        prompt's reading; a draft that must first read more than its call can teach from, LiveCost.teaches_draft:
        the prompt it never read, a long stretch, or in a pass of several) is followed by a second one-token
        probe at the next step, caught up, which does teach: the draft's price is what decides
        γ = 0, and a price measured beside a neighbour (the draft calibrated beside the int8 target's load on
        the AMX Xeon: 5-8x its passes) could otherwise never be corrected where no request's draft read its prompt
        (`adaptive` drafted 1 token in 342 steps served, 0.73x fixed:2). The spacing prices both."""
        tier = self.estimates.tier
        tier.loaded.decided(bool(run))
        if run:
            tier.target_only_steps = 0
            self._follow_up = False
            self.draft_stop = self._stop
            return run
        if self._follow_up:
            self._follow_up = False
            self.draft_stop = NO_STOP
            return 1
        tier.target_only_steps += 1
        cost = tier.cost
        untaught = cost.learning and not (context.step and cost.teaches_draft(context.draft_behind, self._sequences))
        if tier.target_only_steps >= self._probe_spacing(self._probe_extra * (1 + untaught) + catch_up_ms):
            tier.target_only_steps = 0
            self._follow_up = untaught
            self.draft_stop = NO_STOP
            return 1
        return 0

    def _probe_spacing(self, probe_ms: float) -> int:
        """Target-only tier steps between probes that cost `probe_ms` (all who wait for it, told): PROBE_SHARE
        of throughput alone, PROBE_SHARE / sequences under load (a pass is `sequences` tier steps)."""
        return max(MIN_PROBE_EVERY, math.ceil(probe_ms * self._sequences / (PROBE_SHARE * self._price0)))

    def observe(self, outcome: StepOutcome) -> None:
        """Queue the step's outcome (with the prior its choice used); it is folded in off the critical path."""
        self._queue.append((outcome, self._prior, self._logits))

    def report(self) -> dict:
        """This request's current estimates (the response's `speculation.estimates`)."""
        self._fold_in()
        return self.estimates.to_dict()


def _expected_accepted(logits: list[float], bias: float = 0.0) -> list[float]:
    """[γmax] Σ_{k≤γ} P(first k accepted) for γ = 1..γmax, acceptance shifted by `bias` log-odds (the per-step
    decision inlines the same sum in `_gain_argmax`, its hot loop)."""
    p, total, totals = 1.0, 0.0, []
    for z in logits:
        p *= 1.0 / (1.0 + math.exp(-(z + bias)))
        total += p
        totals.append(total)
    return totals


def _best_one_step_rate(logits: list[float], bias: float, extra: list[float], price0: float) -> float:
    """max over γ of (1 + Σ_{k≤γ} P(first k accepted)) / step_ms(γ): tokens per ms of the best single step."""
    return max([1.0 / price0] + [(1.0 + t) / (price0 + e) for t, e in zip(_expected_accepted(logits, bias), extra)])


def _best_run(logits: list[float], rate: float, extra: list[float]) -> int:
    """argmax over γ ≥ 1 of Σ_{k≤γ} P(first k accepted) − rate·extra_ms(γ): the run to draft, given that a step
    drafts (even where no run pays at this acceptance)."""
    gains = [t - rate * e for t, e in zip(_expected_accepted(logits), extra)]
    return 1 + gains.index(max(gains))


def make_adaptive_policy(tier: str, estimates: TierEstimates, predictor: AcceptancePredictor | None = None,
                         greedy: bool = True) -> GammaPolicy:
    """A fresh per-request adaptive policy for a tier from its estimates and a predictor (default: the shipped
    one)."""
    return AdaptivePolicy(predictor or shipped_predictor(), tier, estimates, greedy)
