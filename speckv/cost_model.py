"""What a step costs, in milliseconds: the model policies price γ with, and how it follows the live system.

A step drafts γ tokens (the draft's cost) and has the target score γ+1 tokens after the context (the
verify cost). `CostModel` is a calibration's result (speckv.calibration): a line fitted through the
measurements, and the measured verify curve itself where it was measured (real curves bend: caches, kernel
switches), so decisions use measured points and the line only beyond them. `LiveCost` scales a CostModel by
what the live steps take (contention, throttling, a neighbour, the hops of a served deployment), the verify
curve's level and its per-token part apart, learned online with bounded memory and robust to single outliers.

Batched passes. A pass may carry several requests (sequences); `sequences` and `other_tokens` (the tokens
the other sequences score in it) are inputs of the verify and draft costs. With one sequence the measured
single-sequence curve holds; a batched pass costs the single pass at γ = 0, plus `verify_ms_per_sequence`
per extra sequence, plus `batched_ms_per_token` per token scored beyond one per sequence (all measured at
calibration, speckv.calibration). `PassLoad` follows what the live passes carry.

Passes in float32. Where a model's half-precision layers switch to float32 from some pass size on
(SessionLM.float32_from: a CPU without bf16 hardware, whose emulated bf16 cost grows with the rows), a pass of
that many positions or more is priced on the float32 passes' line (`float32_from`, `float32_ms_per_token` for
the target; `draft_float32_*` for the draft, measured by the calibration's probe), not on the bf16 line that
grows by a whole emulated row per token: on an AVX2 EPYC the fp16 target's 8 × 3 pass cost 1.6 s in the live
loop, priced on the bf16 line at 4.5 s and so at 1.8 s. A batched verify pass that large costs what one sequence
scoring as many tokens does (the linear layers see rows either way; 8 × 1 measured within 11% of 1 × 8).

Catch-up. The draft reads only what it is asked to draft after: a request that has not drafted yet (its
prompt) or not for a while (target-only steps) has a draft cache that lacks part of its context, and its
next drafting step first feeds those tokens (in its first drafting pass, up to a chunk; chunk passes before it
for more: speckv.workers.DEFAULT_PREFILL_CHUNK). `catch_up_ms` prices that, from the calibrated time per token
of reading a context; the one or two tokens every drafting step feeds after a verification
are in `draft_ms_per_token` already.
"""

from __future__ import annotations

import math
import operator
import statistics
from collections import deque
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

CAUGHT_UP = 2  # tokens a drafting step feeds the draft after a verification (the recovered or bonus token and,
#                after a fully accepted run, its last drafted one): priced in draft_ms_per_token
CATCH_UP_TAUGHT = 64  # a lone draft call that first read at most this many tokens (the calibration's own prefill
#                       measurement) teaches the draft's factor, its read priced as calibrated (LiveCost.observe)


def _scalar(x: object) -> bool:
    """Whether a γ (or a count) is one number, not an array. A decision prices its step per request and pass
    (AdaptivePolicy._refresh, about 11 verify prices), and numpy's per-call overhead on one number was a third of
    the policy's host time a step at 8 sequences (scripts/policy_host_time.py), so one number takes the same
    formula in plain Python."""
    return isinstance(x, (int, float, np.integer, np.floating))


def measured_curve(points: list[tuple[int, float]]) -> tuple[float, ...]:
    """The verify curve over γ = 0..the largest γ measured, through measured (γ, ms) points: γ between two points
    interpolated linearly, γ below the first at its ms. Empty with fewer than two points (the line says as much).
    The curve, not the line, is what a pass costs where a kernel switches with the rows (fp32 on an AVX512-BF16
    EPYC: one token 365 ms, two 763, five 790; the line fitted through them charged one token 640)."""
    points = sorted(points)
    if len(points) < 2:
        return ()
    gammas = np.arange(points[-1][0] + 1)
    return tuple(float(v) for v in np.interp(gammas, [g for g, _ in points], [ms for _, ms in points]))


@dataclass(frozen=True)
class CostModel:
    """Milliseconds per step: draft = draft_ms_per_token·γ; verify = verify_ms_base + verify_ms_per_token·γ +
    verify_ms_per_context_token·context_len, except where `verify_curve` holds a measurement: verify_curve[γ]
    is the measured verify time of γ+1 tokens at context `curve_context_len` (context term added relative to
    it; beyond the curve its last point is extended with the line's slope)."""

    draft_ms_per_token: float
    verify_ms_base: float
    verify_ms_per_token: float
    verify_ms_per_context_token: float = 0.0
    verify_curve: tuple[float, ...] = ()
    curve_context_len: int = 0
    verify_ms_per_sequence: float = 0.0  # what one more sequence adds to a pass (beyond its tokens)
    batched_ms_per_token: float | None = None  # per token beyond one per sequence in a batched pass (None: the line's)
    draft_ms_per_sequence: float = 0.0  # what one more sequence adds to a drafting pass (per drafted position)
    draft_prefill_ms_per_token: float = 0.0  # per token the draft's cache lacks (catch-up; 0: not priced)
    float32_from: int | None = None  # target passes of at least this many positions run in float32 (None: none)
    float32_ms_per_token: float = 0.0  # what a token more adds to such a pass
    draft_float32_from: int | None = None  # the draft's passes likewise
    draft_float32_ms: tuple[float, float] = (0.0, 0.0)  # such a drafting pass: ms fixed, ms per position

    def __post_init__(self) -> None:
        """Scoring more tokens in a pass never costs less: a dip in a measured curve is noise (a first call's
        warm-up, a neighbour), and priced as measured it makes drafting look cheaper than free (seen: 8.0 ms
        for one token, 2.5 ms for two, on a tiny model). The curve is replaced by its least-squares
        non-decreasing fit (isotonic regression), which leaves a monotone curve as it is."""
        if self.verify_curve and any(b < a for a, b in zip(self.verify_curve, self.verify_curve[1:])):
            from scipy.optimize import isotonic_regression

            fitted = tuple(float(x) for x in isotonic_regression(np.asarray(self.verify_curve)).x)
            object.__setattr__(self, "verify_curve", fitted)

    def verify_ms(self, gamma: int | np.ndarray, context_len: int = 0, sequences: int = 1,
                  other_tokens: float = 0.0) -> float | np.ndarray:
        """Time of a pass that scores γ+1 tokens after `context_len` cached tokens for one sequence, beside
        `sequences` − 1 others scoring `other_tokens` in all."""
        if sequences <= 1:
            return self._single_verify_ms(gamma, context_len)
        if self.float32_from is not None:  # the pass's positions decide what it computes in
            extra = max(other_tokens - (sequences - 1), 0.0)
            scalar = _scalar(gamma)
            positions = (round(sequences + gamma + extra) if scalar  # half to even, as np.rint
                         else np.rint(sequences + np.asarray(gamma) + extra).astype(int))
            wide = positions >= self.float32_from
            if scalar and wide:
                return self._single_verify_ms(positions - 1, context_len)
            if not scalar and np.any(wide):
                as_one = self._single_verify_ms(positions - 1, context_len)
                narrow = self._bf16_batched_ms(gamma, context_len, sequences, other_tokens)
                return np.where(wide, as_one, narrow)
        return self._bf16_batched_ms(gamma, context_len, sequences, other_tokens)

    def _bf16_batched_ms(self, gamma: int | np.ndarray, context_len: int, sequences: int,
                         other_tokens: float) -> float | np.ndarray:
        """A batched pass as measured in the loaded dtype: one more sequence, one more token, each at its price."""
        per_token = self.verify_ms_per_token if self.batched_ms_per_token is None else self.batched_ms_per_token
        scalar = _scalar(gamma)
        beyond = (gamma if scalar else np.asarray(gamma)) + max(other_tokens - (sequences - 1), 0.0)  # beyond one each
        out = (self._single_verify_ms(0, context_len) + self.verify_ms_per_sequence * (sequences - 1)
               + per_token * beyond)
        return float(out) if scalar else out

    def _single_verify_ms(self, gamma: int | np.ndarray, context_len: int) -> float | np.ndarray:
        if not self.verify_curve:
            return (self.verify_ms_base + self.verify_ms_per_token * gamma
                    + self.verify_ms_per_context_token * context_len)
        last, scalar = len(self.verify_curve) - 1, _scalar(gamma)
        if scalar:
            g = operator.index(gamma)  # an index into the curve, as in the array route (a float is an error)
            on_curve, past = self.verify_curve[min(g, last)], max(g - last, 0)
        else:
            g = np.asarray(gamma)
            on_curve, past = np.asarray(self.verify_curve)[np.minimum(g, last)], np.maximum(g - last, 0)
        beyond = (self.float32_ms_per_token if self.float32_from is not None and last + 1 >= self.float32_from
                  else self.verify_ms_per_token)  # the curve's end ran in float32: so do longer passes
        out = (on_curve + beyond * past + self.verify_ms_per_context_token * (context_len - self.curve_context_len))
        return float(out) if scalar else out

    def draft_ms(self, gamma: int | np.ndarray, sequences: int = 1) -> float | np.ndarray:
        """Time of drafting γ tokens, one pass per position, each carrying `sequences` requests."""
        return self.drafting_passes_ms(gamma, (gamma if _scalar(gamma) else np.asarray(gamma)) * max(sequences, 1))

    def drafting_passes_ms(self, passes: int | np.ndarray, rows: int | np.ndarray) -> float | np.ndarray:
        """Time of a batch's drafting passes: `passes` passes (its longest run) carrying `rows` sequence-positions
        in all (the sum of its runs); what a proposal's `compute_ms` measured (speckv.workers.Proposal)."""
        scalar = _scalar(passes) and _scalar(rows)
        p, r = (passes, rows) if scalar else (np.asarray(passes), np.asarray(rows))
        at_least = max if scalar else np.maximum
        out = self.draft_ms_per_token * p + self.draft_ms_per_sequence * at_least(r - p, 0)
        if self.draft_float32_from is not None:  # passes as wide as the switch run in float32
            base, per_position = self.draft_float32_ms
            in_float32 = p * base + per_position * r
            if scalar:
                out = in_float32 if p > 0 and r / p >= self.draft_float32_from else out
            else:
                out = np.where((p > 0) & (r / np.maximum(p, 1) >= self.draft_float32_from), in_float32, out)
        return float(out) if scalar else out

    def step_ms(self, gamma: int | np.ndarray, context_len: int = 0, sequences: int = 1,
                other_tokens: float = 0.0) -> float | np.ndarray:
        return self.draft_ms(gamma, sequences) + self.verify_ms(gamma, context_len, sequences, other_tokens)

    def catch_up_ms(self, behind: int) -> float:
        """What feeding the draft the `behind` tokens of the context its cache lacks costs before it can draft,
        beyond the one or two a drafting step always feeds (priced in draft_ms_per_token)."""
        return self.draft_prefill_ms_per_token * max(behind - CAUGHT_UP, 0)

    @classmethod
    def fit(cls, gammas: list[int], draft_ms: list[float], verify_ms: list[float],
            context_lens: list[int] | None = None) -> CostModel:
        """Least-squares fit of measured per-step draft and verify milliseconds against γ (and context length
        when more than one was measured), every coefficient non-negative (scipy's NNLS): a pass never costs
        less for scoring more, nor less than nothing. Unconstrained, three noisy points of a tiny model's ~1 ms
        passes (fresh-clone CI) gave a verify base of -0.4 ms."""
        from scipy.optimize import nnls

        g = np.asarray(gammas, dtype=float)
        d, v = np.asarray(draft_ms, dtype=float), np.asarray(verify_ms, dtype=float)
        drafted = g > 0
        per_token = float((d[drafted] / g[drafted]).mean()) if drafted.any() else 0.0
        ctx = np.asarray(context_lens if context_lens is not None else np.zeros_like(g), dtype=float)
        columns = [np.ones_like(g)]
        if len(set(gammas)) > 1:
            columns.append(g)
        if len(set(ctx.tolist())) > 1:
            columns.append(ctx)
        coef = nnls(np.stack(columns, 1), v)[0].tolist()
        base = coef.pop(0)
        slope = coef.pop(0) if len(set(gammas)) > 1 else 0.0
        per_ctx = coef.pop(0) if coef else 0.0
        return cls(per_token, float(base), float(slope), float(per_ctx))

    def to_dict(self) -> dict:
        out = {"draft_ms_per_token": self.draft_ms_per_token, "verify_ms_base": self.verify_ms_base,
               "verify_ms_per_token": self.verify_ms_per_token,
               "verify_ms_per_context_token": self.verify_ms_per_context_token}
        if self.verify_curve:
            out.update(verify_curve=list(self.verify_curve), curve_context_len=self.curve_context_len)
        out.update(verify_ms_per_sequence=self.verify_ms_per_sequence, batched_ms_per_token=self.batched_ms_per_token,
                   draft_ms_per_sequence=self.draft_ms_per_sequence,
                   draft_prefill_ms_per_token=self.draft_prefill_ms_per_token)
        if self.float32_from is not None:
            out.update(float32_from=self.float32_from, float32_ms_per_token=self.float32_ms_per_token)
        if self.draft_float32_from is not None:
            out.update(draft_float32_from=self.draft_float32_from, draft_float32_ms=list(self.draft_float32_ms))
        return out

    @classmethod
    def from_dict(cls, d: dict) -> CostModel:
        try:
            return cls(float(d["draft_ms_per_token"]), float(d["verify_ms_base"]), float(d["verify_ms_per_token"]),
                       float(d.get("verify_ms_per_context_token", 0.0)),
                       tuple(float(x) for x in d.get("verify_curve", ())), int(d.get("curve_context_len", 0)),
                       float(d.get("verify_ms_per_sequence", 0.0)),
                       None if d.get("batched_ms_per_token") is None else float(d["batched_ms_per_token"]),
                       float(d.get("draft_ms_per_sequence", 0.0)), float(d.get("draft_prefill_ms_per_token", 0.0)),
                       None if d.get("float32_from") is None else int(d["float32_from"]),
                       float(d.get("float32_ms_per_token", 0.0)),
                       None if d.get("draft_float32_from") is None else int(d["draft_float32_from"]),
                       tuple(float(x) for x in d.get("draft_float32_ms", (0.0, 0.0))))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a cost model: {d!r} ({e})") from None


@dataclass
class RobustScale:
    """A positive factor: the median of log(measured / predicted) over the last `window` observations.
    A step change in the true factor is followed once half the window has seen it; fewer outliers than
    that move it not at all. Constant memory."""

    window: int = 9
    recent: deque = field(default_factory=deque)
    log_value: float = 0.0
    count: int = 0

    @property
    def value(self) -> float:
        return math.exp(self.log_value)

    def observe(self, measured: float, predicted: float) -> None:
        if measured <= 0 or predicted <= 0 or not math.isfinite(measured):
            return
        self.recent.append(math.log(measured / predicted))
        if len(self.recent) > self.window:
            self.recent.popleft()
        self.log_value = statistics.median(self.recent)
        self.count += 1


RESOLVE = 0.5  # TokenFactor refits only where the window resolves ρ to within this standard error


@dataclass
class TokenFactor:
    """A factor ρ on the per-token part of a calibrated verify curve against its fixed part: a pass costs
    s·(fixed + ρ·tokens), `fixed` the calibrated pass scoring one token per sequence, `tokens` what the
    calibration says its drafted tokens add, s the level (RobustScale). Calibration at a tier whose pass takes
    seconds times one pass per point (nf4 on an AVX2 EPYC: single passes spread 8-20%, so the fitted slope
    lay anywhere in 66-148 ms a token), and a level factor alone makes the curve right at the γ it sees and
    wrong at every other: the marginal token, which is what decides γ, stays off by the calibration's error.

    Learned as a line through y = measured / fixed against x = tokens / fixed (y = s + s·ρ·x): its slope is the
    median of the slopes between steps at most `near` steps apart, each weighted by how far apart their x lie
    (a close pair's slope is mostly noise); its level the median of y − slope·x; ρ = slope / level. Pairs of
    near steps share the level, so a level that moves (a neighbour, throttling) teaches the shape nothing but
    in the few pairs that straddle the change. Refitted every `refit` steps (a fit over the window's pairs
    takes ~0.4 ms here); until `min_pairs` pairs with different x are in the window, or where every step scores
    alike, ρ stays as it was (1: the calibration's shape). Never below 0 (scoring more never costs less).
    Simulated (scripts/token_factor_noise.py: γ 0..8, 10% noise a pass, the level 1.5x for the last quarter):
    after 160 steps ρ is within [0.90, 1.20] of the truth (10th-90th percentile), after 32 within [0.7, 1.4];
    the level change leaves a bias of up to +9%.

    Under load every request of a pass reports the pass: it is one observation, however many report it (known by
    its time, which all of them report). And a window whose steps differ too little
    in tokens to tell the slope from the noise leaves ρ as it was: the fit stands only where the slope's standard
    error (the residuals' robust spread over the root of the x's summed squared deviations, as a line fit's) is at
    most RESOLVE of the level. Under load with target-only passes and a one-token probe every tenth, the x's differ
    by 3% of a pass and the noise is 15%: counted eight times a pass and fitted regardless, ρ (truly 1) was above 2
    in 42% of passes and above 8.9 in a tenth (the same script, `under_load`; now 1.00 throughout), and with the
    pass drafting 0-2 tokens together its 10th-90th percentiles were [0.50, 1.64] (now [0.82, 1.13]). Served int8
    at 8 streams on the AMX Xeon learned 4.1 in one refit and priced drafting together out (docs/serving_log.md,
    forty-fourth session)."""

    window: int = 128
    near: int = 8
    min_pairs: int = 16
    refit: int = 8
    recent: deque = field(default_factory=deque)  # (fixed ms, tokens ms, measured ms) per pass
    value: float = 1.0
    count: int = 0

    def observe(self, measured: float, fixed: float, tokens: float, shared: bool = False) -> None:
        """One pass: its time, its calibrated fixed part and its drafted tokens' part; `shared`: it carried other
        sequences, whose requests report it too (counted once: known by its time, since the requests' contexts,
        so `fixed`, may differ; a lone pass is never reported twice, and a replay's passes of one γ take the
        same time)."""
        if not (measured > 0 and fixed > 0 and tokens >= 0 and math.isfinite(measured)):
            return
        if shared and any(seen == measured for _, _, seen in self.recent):  # another request of the pass reported it
            return
        self.recent.append((fixed, tokens, measured))
        if len(self.recent) > self.window:
            self.recent.popleft()
        self.count += 1
        if self.count % self.refit == 0:
            self._fit()

    def _fit(self) -> None:
        fixed, tokens, measured = np.asarray(self.recent).T  # [n] each
        x, y = tokens / fixed, measured / fixed
        lags = range(1, min(self.near, len(x) - 1) + 1)  # pairs (i, j) at most `near` steps apart
        if not lags:
            return
        i = np.concatenate([np.arange(len(x) - lag) for lag in lags])
        j = np.concatenate([np.arange(lag, len(x)) for lag in lags])
        dx = x[j] - x[i]
        apart = np.abs(dx) > 1e-9
        if apart.sum() < self.min_pairs:
            return
        slope = float(np.quantile((y[j] - y[i])[apart] / dx[apart], 0.5, weights=np.abs(dx[apart]),
                                  method="inverted_cdf"))  # the weighted median
        level = float(np.median(y - slope * x))
        if level <= 0:
            return
        residuals = y - level - slope * x
        noise = 1.4826 * float(np.median(np.abs(residuals - np.median(residuals))))
        if noise > RESOLVE * level * float(np.sqrt(np.sum((x - x.mean()) ** 2))):
            return  # the window's steps do not differ enough in tokens to tell the slope from the noise
        self.value = max(slope / level, 0.0)


@dataclass
class RunningMedian:
    """The median of the last `window` values (0 before any): robust to outliers, constant memory."""

    window: int = 9
    recent: deque = field(default_factory=deque)
    value: float = 0.0

    def observe(self, x: float) -> None:
        if not math.isfinite(x):
            return
        self.recent.append(x)
        if len(self.recent) > self.window:
            self.recent.popleft()
        self.value = self._summary(self.recent)

    @staticmethod
    def _summary(values: deque) -> float:
        return statistics.median(values)


class RunningFloor(RunningMedian):
    """The smallest of the last `window` values (0 before any): the fixed part of a time whose excess over it is
    waiting. One observation at the floor brings it back down."""

    @staticmethod
    def _summary(values: deque) -> float:
        return min(values)


@dataclass
class LiveCost:
    """A calibrated CostModel followed online, per part of a step (draft, verify): a factor on the
    calibrated model time, and a fixed *hop* per call (wall time outside the models: handle hops,
    serialisation, queueing; ~0 in-process, a few ms served, a large share of a GPU step). The hop is
    learned apart from the factor because it does not grow with γ, and a step that does not draft skips
    the draft call and its hop. The hop is the floor of the recent calls' times outside the models, not their
    median: what a call spends above it is waiting (behind another request's pass on the replica's event
    loop, which a replica cannot see begin; for a router loop busy with other streams), which is the load's
    and priced as load (PassLoad, TierEstimates.sharing). Learned as a median, the waits of a loaded
    AVX512-BF16 EPYC made a 320 ms draft hop that outlived the load: target-only steps never call the draft,
    and five probes, 140 target-only steps apart, would have been needed to unlearn it; the floor needs one.
    The verify curve's level and its per-token part are learned apart (TokenFactor): a calibration's slope can
    be off where its passes are few and noisy, and one factor on the whole curve leaves the marginal token,
    which decides γ, as wrong as the calibration had it.
    Steps reported without model times (replay) teach the factors on wall time.
    `learning` off keeps the calibration as it is; `learn_shape` off learns the verify curve's level alone (for
    tests and ablations)."""

    base: CostModel
    learning: bool = True
    learn_shape: bool = True
    draft: RobustScale = field(default_factory=RobustScale)
    verify: RobustScale = field(default_factory=RobustScale)  # the verify curve's level
    verify_tokens: TokenFactor = field(default_factory=TokenFactor)  # its per-token part against its fixed part
    # the calibration's hop (none: it times the models alone) stays in the floor until a window of calls has
    # passed: a first call that waited behind a wave of prefills (13.9 s outside its pass, nf4 at 8 requests on
    # an AVX2 EPYC) set the hop alone, priced a target-only step at 16-54 s and every millisecond so cheap that
    # every request drafted 13-16 tokens
    draft_hop: RunningFloor = field(default_factory=lambda: RunningFloor(recent=deque([0.0])))
    verify_hop: RunningFloor = field(default_factory=lambda: RunningFloor(recent=deque([0.0])))

    def observe(self, gamma: int, draft_ms: float, verify_ms: float, context_len: int,
                draft_compute_ms: float | None = None, verify_compute_ms: float | None = None,
                sequences: int = 1, batch_tokens: int = 0, draft_behind: int = 0, draft_waited_ms: float = 0.0,
                verify_waited_ms: float = 0.0, draft_passes: int = 0, draft_rows: int = 0,
                verify_read: int = 0) -> None:
        """One live step (not the first of a request, which also reads the prompt): wall times, the time
        inside the models where known, the verify pass's batch (sequences, tokens scored in all) and how
        many tokens the draft read first. A draft call where a sequence caught up on more than CAUGHT_UP tokens
        teaches the draft only alone and within what the calibration's prefill measured (`teaches_draft`; its
        time is mostly that read, priced as calibrated). A verify pass that read context beyond the tokens it
        scored (`verify_read`: a new request's prompt riding in it, speckv.workers.DEFAULT_PREFILL_CHUNK) teaches
        nothing of verification. Counted, the prompts riding in the passes of 8 and 16 fp16 streams (AVX512-BF16
        EPYC) taught a draft 3.4x its cost and a verify pass whose drafted tokens cost nothing, and one stream
        after them drafted nothing.
        Time a call waited in its replica for a pass to begin is the load's, not the hop's: learned into the hop,
        waiting under load stayed in the price of every drafting step after the load was gone (180 ms on an
        AVX512-BF16 EPYC, so γ = 0 alone where fixed γ = 2 ran 1.5x faster), since target-only steps do not
        call the draft to unlearn it.
        The draft call is predicted as the drafting passes it ran (`draft_passes`, carrying `draft_rows`
        sequence-positions, as the draft worker reports them), not as γ passes carrying every sequence of the
        verify pass (0: not reported; then so): under load only some requests of a verify pass draft, and a
        probe's pass of one sequence, predicted as carrying all of them, taught a draft 40% cheaper than it is
        (the AMX Xeon's fp16 shape at 16 requests: a draft scale of 0.59), so drafting looked cheap to every
        request and all of them drafted where none should."""
        if not self.learning:
            return
        others = max(batch_tokens - (gamma + 1), 0)
        if gamma > 0 and self.teaches_draft(draft_behind, sequences):
            predicted = (self.base.drafting_passes_ms(draft_passes, draft_rows) if draft_passes
                         else self.base.draft_ms(gamma, sequences)) + self.base.catch_up_ms(draft_behind)
            self._observe(self.draft, self.draft_hop, draft_ms, draft_compute_ms, predicted, draft_waited_ms)
        if verify_read > 0:
            return
        fixed, tokens = self._verify_parts(gamma, context_len, sequences, others)
        if self.learn_shape:
            self.verify_tokens.observe(verify_ms if verify_compute_ms is None else verify_compute_ms, fixed, tokens,
                                       shared=sequences > 1)
        self._observe(self.verify, self.verify_hop, verify_ms, verify_compute_ms,
                      fixed + self.verify_tokens.value * tokens, verify_waited_ms)

    def teaches_draft(self, behind: int, sequences: int) -> bool:
        """Whether a drafting call that first read `behind` tokens teaches the draft's factor: caught up, or alone
        in its passes with a read no longer than the calibration measured (priced as calibrated). The probes that
        end a stretch of target-only steps read what the stretch emitted, so where only caught-up calls taught,
        nothing but consecutive drafting steps could correct a draft priced too dear: with a calibration measured
        beside a neighbour (a draft token 379 ms where 71 is true, AVX512-BF16 EPYC, bf16) `adaptive` ran 0.95x
        `fixed:2` (1.00x with this), and a variant that explored less stayed at γ = 0 after its first request
        (0.75x). In a pass of several, the others' reads are in its time."""
        if behind <= CAUGHT_UP:
            return True
        return sequences <= 1 and behind <= CATCH_UP_TAUGHT and self.base.draft_prefill_ms_per_token > 0

    def _verify_parts(self, gamma: int | np.ndarray, context_len: int, sequences: int,
                      other_tokens: float) -> tuple[float | np.ndarray, float | np.ndarray]:
        """The calibrated verify pass split in two: the pass scoring one token per sequence, and what the drafted
        tokens of all its sequences add (this one's γ, the others' beyond one each)."""
        fixed = self.base.verify_ms(0, context_len, sequences, sequences - 1)
        return fixed, self.base.verify_ms(gamma, context_len, sequences, other_tokens) - fixed

    @staticmethod
    def _observe(scale: RobustScale, hop: RunningFloor, wall: float, compute: float | None,
                 predicted: float, waited: float = 0.0) -> None:
        if compute is None:
            scale.observe(wall, predicted)
            return
        scale.observe(compute, predicted)
        hop.observe(max(wall - compute - waited, 0.0))

    def draft_ms(self, gamma: int | np.ndarray, sequences: int = 1) -> float | np.ndarray:
        return self.draft.value * self.base.draft_ms(gamma, sequences) + self.draft_hop.value * (
            gamma > 0 if _scalar(gamma) else np.asarray(gamma) > 0)

    def verify_ms(self, gamma: int | np.ndarray, context_len: int = 0, sequences: int = 1,
                  other_tokens: float = 0.0) -> float | np.ndarray:
        fixed, tokens = self._verify_parts(gamma, context_len, sequences, other_tokens)
        return self.verify.value * (fixed + self.verify_tokens.value * tokens) + self.verify_hop.value

    def step_ms(self, gamma: int | np.ndarray, context_len: int = 0, sequences: int = 1,
                other_tokens: float = 0.0) -> float | np.ndarray:
        return self.draft_ms(gamma, sequences) + self.verify_ms(gamma, context_len, sequences, other_tokens)

    def catch_up_ms(self, behind: int) -> float:
        """CostModel.catch_up_ms, scaled as the live draft calls are."""
        return self.draft.value * self.base.catch_up_ms(behind)

    def drafting_prices(self, gamma: int | np.ndarray, context_len: int = 0, sequences: int = 1,
                        other_tokens: float = 0.0) -> DraftingPrices:
        """What one sequence drafting γ tokens costs in a pass like this, its verify pass priced once: a decision
        prices its step and several leads from it (AdaptivePolicy._refresh, per request and step; each price
        computed apart, that was 120-150 µs of numpy at 8 sequences, a share of a GPU's host-bound step)."""
        return DraftingPrices(self, gamma, context_len, sequences, other_tokens,
                              self.verify_ms(gamma, context_len, sequences, other_tokens))

    def shared_ms(self, gamma: int | np.ndarray, context_len: int = 0, sequences: int = 1,
                  other_tokens: float = 0.0, led: int | None = None) -> float | np.ndarray:
        """DraftingPrices.shared of such a pass."""
        return self.drafting_prices(gamma, context_len, sequences, other_tokens).shared(led)

    def alone_ms(self, gamma: int | np.ndarray, context_len: int = 0, sequences: int = 1,
                 other_tokens: float = 0.0, led: int | None = None) -> float | np.ndarray:
        """DraftingPrices.alone of such a pass."""
        return self.drafting_prices(gamma, context_len, sequences, other_tokens).alone(led)

    def _positions_ms(self, gamma: int | np.ndarray, shared_ms: float, led: int | None) -> float | np.ndarray:
        """The drafting passes of γ positions as the requests waiting for the step see them: `shared_ms` each
        for the positions drafted along with the others of the pass (up to `led`; None: all), and a whole
        drafting pass of one sequence for each beyond, where the others have stopped and wait for it (the
        verify pass regroups: speckv.batching). `led` is the others' longest run (PassLoad.others_deepest_run),
        or one beyond it where the whole pass drafting one more position together would pay
        (AdaptivePolicy._shared_prices), so that runs can grow together, a position a step, while a lone long run pays
        for the passes the others wait through."""
        if _scalar(gamma):
            g, along = gamma, gamma if led is None else min(gamma, led)
        else:
            g = np.asarray(gamma)
            along = g if led is None else np.minimum(g, led)
        out = self.draft.value * (shared_ms * along + self.base.draft_ms_per_token * (g - along))
        return float(out) if _scalar(gamma) else out

    def to_dict(self) -> dict:
        """Current estimates, for /metrics and the response's `speculation` object."""
        return {"draft_ms_per_token": self.draft.value * self.base.draft_ms_per_token,
                "draft_prefill_ms_per_token": self.draft.value * self.base.draft_prefill_ms_per_token,
                "verify_ms_1_token": float(self.verify_ms(0)), "draft_scale": self.draft.value,
                "verify_scale": self.verify.value, "verify_token_factor": self.verify_tokens.value,
                "draft_hop_ms": self.draft_hop.value,
                "verify_hop_ms": self.verify_hop.value, "steps_observed": self.verify.count}


@dataclass(frozen=True)
class DraftingPrices:
    """What one sequence drafting γ tokens (each γ of `gamma`) costs in a pass of `sequences` beside others
    scoring `other_tokens`, at LiveCost's current prices; `verify` its verify pass (LiveCost.verify_ms)."""

    cost: LiveCost
    gamma: int | np.ndarray
    context_len: int
    sequences: int
    other_tokens: float
    verify: float | np.ndarray

    @cached_property
    def draft(self) -> float | np.ndarray:
        """Its drafting passes, one per position, each carrying the pass's sequences (LiveCost.draft_ms)."""
        return self.cost.draft_ms(self.gamma, self.sequences)

    @property
    def step(self) -> float | np.ndarray:
        """Its own step: its drafting passes and its verify pass (LiveCost.step_ms)."""
        return self.draft + self.verify

    @cached_property
    def drafted(self) -> float | np.ndarray:
        """What scoring its γ drafted tokens adds to its verify pass."""
        return self.verify - self.cost.verify_ms(0, self.context_len, self.sequences, self.other_tokens)

    def shared(self, led: int | None = None) -> float | np.ndarray:
        """What its drafting adds to the passes it shares (the verify pass scores its γ more tokens; each
        drafting pass carries one sequence more): what every other request in them waits more. 0 alone.
        Positions beyond `led` (None: no limit) are the sequence's alone: the verify pass waits for the
        sequences still drafting (speckv.batching, regrouping), so the others wait a whole drafting pass for
        each (LiveCost._positions_ms)."""
        if self.sequences <= 1:
            return np.zeros_like(np.asarray(self.gamma, dtype=float)) if np.ndim(self.gamma) else 0.0
        marginal = self.cost.base.draft_ms_per_sequence  # one more sequence in a drafting pass
        return self.drafted + self.cost._positions_ms(self.gamma, marginal, led)

    def alone(self, led: int | None = None) -> float | np.ndarray:
        """What its drafting adds to the time of the cores, for requests that share them but not its passes
        (they wait for the cores while its passes run): its share of the drafting passes (one per position,
        carrying `sequences` as the verify passes do), whole passes beyond `led`, and its γ more tokens in the
        verify pass."""
        base, n = self.cost.base, self.sequences
        share = (base.draft_ms_per_token + base.draft_ms_per_sequence * max(n - 1, 0)) / max(n, 1)
        return self.drafted + self.cost._positions_ms(self.gamma, share, led)


@dataclass
class PassLoad:
    """What the live verify passes of a tier carry: running medians over recent passes of the sequences in
    a pass and of the tokens it scores, as the verifications report them. The policy prices a request's γ
    in a pass like the ones the others are running now."""

    sequences: RunningMedian = field(default_factory=RunningMedian)
    tokens: RunningMedian = field(default_factory=RunningMedian)
    others_deepest: RunningMedian = field(default_factory=RunningMedian)  # the others' longest draft run in a pass

    def observe(self, sequences: int, tokens: int, others_deepest: int = 0) -> None:
        if sequences >= 1 and tokens >= sequences:
            self.sequences.observe(float(sequences))
            self.tokens.observe(float(tokens))
            self.others_deepest.observe(float(others_deepest))

    def others_deepest_run(self) -> int:
        """The longest draft run among the others of a pass, as recent passes had it (0: they did not draft)."""
        return round(self.others_deepest.value)

    def now(self, in_flight: int = 1) -> tuple[int, float]:
        """(sequences in a pass, tokens the others in it score); before any pass was seen, a pass of the
        `in_flight` requests, one token each."""
        if not self.sequences.recent:
            n = max(in_flight, 1)
            return n, float(n - 1)
        sequences = max(1, round(self.sequences.value))
        if sequences == 1:
            return 1, 0.0
        per_sequence = self.tokens.value / max(self.sequences.value, 1.0)
        return sequences, per_sequence * (sequences - 1)

    def to_dict(self) -> dict:
        return {"sequences_per_pass": self.sequences.value, "tokens_per_pass": self.tokens.value,
                "others_deepest_run": self.others_deepest.value}
