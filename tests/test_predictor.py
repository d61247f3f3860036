"""The acceptance predictor and the adaptive policy: features, artifact round trip, training and replayed
evaluation on synthetic traces."""

from __future__ import annotations

import json

import numpy as np
import pytest

from speckv.adaptive import AdaptivePolicy
from speckv.cost_model import CostModel
from speckv.estimates import TierEstimates
from speckv.policy import StepContext
from speckv.predictor import FEATURES, AcceptancePredictor, features, load_predictor
from speckv.records import write_jsonl
from speckv.signals import SignalSummary
from speckv.tools.replay import trace_to_records
from speckv.tools.training import evaluate, load_collection, split_of, traces_by_split, train

from .conftest import GAMMA_MAX, predictor_with_token_acceptance, synthetic_trace


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """A `speckv collect`-shaped directory: records_<tier>.jsonl with traces, cost_<tier>.json."""
    out = tmp_path_factory.mktemp("collect")
    rng = np.random.default_rng(0)
    costs = {"fp16": CostModel(90, 220, 150), "nf4": CostModel(80, 1500, 150)}  # drafting loses / pays
    for tier, cost in costs.items():
        records = []
        for i in range(24):
            trace = synthetic_trace(rng, f"p{i}", 40, easy=0.9 if i % 2 else 0.3)
            records += trace_to_records(trace, tier, f"trace-{tier}-p{i}")
        write_jsonl(records, out / f"records_{tier}.jsonl")
        (out / f"cost_{tier}.json").write_text(json.dumps({"cost_model": cost.to_dict()}))
    return out


def test_split_is_stable_and_holds_out_about_a_third():
    ids = [f"q{i}" for i in range(300)]
    held = [split_of(i) == "test" for i in ids]
    assert 0.25 < sum(held) / len(ids) < 0.42
    assert held == [split_of(i) == "test" for i in ids]


def test_trace_records_round_trip(collection):
    records, costs = load_collection([collection])
    splits = traces_by_split(records)
    traces = {**splits["train"], **splits["test"]}
    assert len(traces) == 48 and set(costs) == {"fp16", "nf4"}
    assert all(t.gamma_max == GAMMA_MAX and t.n == 40 for t in traces.values())


def test_features_match_their_names():
    context = StepContext(step=3, position=10, context_len=30, prev_gamma=4, prev_accepted=4,
                          prev_signals=SignalSummary(mean_confidence=0.9, min_confidence=0.8),
                          prev_last_confidence=0.85,
                          drafted_total=8, accepted_total=6)
    x = dict(zip(FEATURES, features(context, "nf4")))
    assert x["prev_accept_rate"] == 1.0 and x["prev_all_accepted"] == 1.0 and x["run_accept_rate"] == 0.75
    assert x["tier_nf4"] == 1.0 and x["tier_fp16"] == 0.0 and len(x) == len(FEATURES)


def test_training_learns_and_the_policy_follows_the_cost_model(collection, tmp_path):
    artifact, summary = train([collection], tmp_path / "ctrl", hidden=16, epochs=300)
    # acceptance here follows confidence, so the learned predictors must beat chance by far on held-out prompts
    assert summary["test_corr"] > 0.3, summary
    assert summary["token_auc"] > 0.7, summary  # per drafted token, within a run (the draft stop rule's model)
    loaded = load_predictor(str(tmp_path / "ctrl" / "predictor.json"))
    assert loaded.version() == artifact.version()
    records, costs = load_collection([collection])
    held_out = traces_by_split(records)["test"]
    doc = evaluate(loaded, held_out, costs)
    fp16, nf4 = doc["tiers"]["fp16"], doc["tiers"]["nf4"]
    # fp16 here: a drafted token costs more than it can save, so adaptive drafts only one-token probes, spaced
    # so they cost at most 2% of throughput
    gammas = [g for r in fp16["policies"]["adaptive"]["per_prompt"] for g in r["gammas"]]
    assert set(gammas) <= {0, 1} and 0 < gammas.count(1) <= 0.02 * len(gammas) * 220 / 240 + 1
    tokens_per_s = {n: fp16["policies"][n]["tokens_per_s_geomean"] for n in ("adaptive", "none")}
    assert tokens_per_s["adaptive"] >= 0.98 * tokens_per_s["none"]
    # nf4: drafting pays; adaptive is faster than target-only and never faster than the oracle
    assert nf4["policies"]["adaptive"]["tokens_per_s_geomean"] > 1.5 * nf4["policies"]["none"]["tokens_per_s_geomean"]
    for tier in (fp16, nf4):
        for a, o in zip(tier["policies"]["adaptive"]["per_prompt"], tier["policies"]["oracle"]["per_prompt"]):
            assert a["tokens_per_s"] <= o["tokens_per_s"] + 1e-9
    # transformers' default drafting policy is replayed beside adaptive, and compared with it
    assert "hf-assisted" in nf4["policies"] and any(c["b"] == "hf-assisted" for c in nf4["comparisons"])
    # easy prompts get longer drafts than hard ones
    rows = nf4["policies"]["adaptive"]["per_prompt"]
    mean_gamma = {c: np.mean([g for r in rows if r["category"] == c for g in r["gammas"]]) for c in ("easy", "hard")}
    assert mean_gamma["easy"] > mean_gamma["hard"]


def _tamper_weights(directory):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(directory / "predictor.safetensors"))
    tensors["w2"] = tensors["w2"].copy()
    tensors["w2"][0, 0] += 1e-3
    save_file(tensors, str(directory / "predictor.safetensors"))


TAMPERINGS = {  # what a changed artifact file looks like -> the error its load must raise
    "weights": (_tamper_weights, "version"),
    "token weights": (lambda m: m["token_weights"].__setitem__(0, 9.0), "version"),
    "token weights length": (lambda m: m["token_weights"].pop(), "token_weights"),
    "feature order": (lambda m: m["features"].reverse(), "does not match this speckv"),
    "format": (lambda m: m.__setitem__("format_version", 1), "does not match this speckv"),
    "recorded version": (lambda m: m.__setitem__("version", "0" * 12), "version"),
    "missing weights file": (lambda m: m.__setitem__("weights", "gone.safetensors"), "incomplete"),
}


@pytest.mark.parametrize("what", sorted(TAMPERINGS))
def test_artifact_refuses_tampering(collection, tmp_path, what):
    train([collection], tmp_path / "ctrl", hidden=8, epochs=5)
    AcceptancePredictor.load(tmp_path / "ctrl")  # untouched, it loads
    change, error = TAMPERINGS[what]
    meta_path = tmp_path / "ctrl" / "predictor.json"
    if change is _tamper_weights:
        change(tmp_path / "ctrl")
    else:
        meta = json.loads(meta_path.read_text())
        change(meta)
        meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=error):
        AcceptancePredictor.load(meta_path)


def test_artifact_refuses_unknown_tiers_and_other_files(collection, tmp_path):
    artifact, _ = train([collection], tmp_path / "ctrl", hidden=8, epochs=5)
    with pytest.raises(ValueError, match="knows tiers"):
        AdaptivePolicy(artifact, "int4", TierEstimates.calibrated(CostModel(80, 200, 30)))
    with pytest.raises(ValueError, match="not a SpecKV"):
        (tmp_path / "x.json").write_text("{}")
        AcceptancePredictor.load(tmp_path / "x.json")


def test_format_2_artifacts_still_load_without_their_machine_settings(collection, tmp_path):
    """A format-2 artifact carried one machine's cost models, prices and stop thresholds beside its
    predictors: it loads, keeps the predictors (token weights from its stop rules) and drops the rest."""
    artifact, _ = train([collection], tmp_path / "ctrl", hidden=8, epochs=5)
    meta_path = tmp_path / "ctrl" / "predictor.json"
    meta = json.loads(meta_path.read_text())
    weights = meta.pop("token_weights")
    meta.update(format_version=2, version="old", cost_models={"fp16": CostModel(90, 220, 150).to_dict()},
                rate_tokens_per_ms={"fp16": 0.004}, max_gamma={"fp16": 0},
                draft_stop={"fp16": {"min_confidence": 0.0, "min_run_acceptance": 0.0, "token_weights": []},
                            "nf4": {"min_confidence": 0.0, "min_run_acceptance": 0.3, "token_weights": weights}})
    meta_path.write_text(json.dumps(meta))
    old = AcceptancePredictor.load(meta_path)
    assert old.token_weights == artifact.token_weights and old.version() == artifact.version()


def varied_contexts(n: int, seed: int = 0) -> list[StepContext]:
    """Contexts after 0-3 random steps: what a policy sees across requests."""
    from speckv.policy import RequestProgress
    from speckv.signals import DraftSignals

    rng = np.random.default_rng(seed)
    contexts = []
    for _ in range(n):
        progress = RequestProgress()
        for _ in range(int(rng.integers(0, 4))):
            g = int(rng.integers(1, 9))
            conf = rng.uniform(0.05, 1, g).tolist()
            progress.advance(DraftSignals(conf, conf, rng.uniform(0, 4, g).tolist()), int(rng.integers(0, g + 1)))
        contexts.append(progress.context(int(rng.integers(0, 50)), int(rng.integers(0, 200)), 100))
    return contexts


def test_controller_decides_fast_and_follows_the_context():
    """The decision path (MLP, acceptance bias, prices) over varied contexts whose decisions differ, on a
    cost model where drafting sometimes pays."""
    import time

    policy = AdaptivePolicy(load_predictor(), "fp16", TierEstimates.calibrated(CostModel(80, 250, 40)))
    policy.estimates.acceptance.intercept = -0.5  # a calibrated path, not the prior as trained
    micros, decisions = [], set()
    for context in varied_contexts(300):
        start = time.perf_counter()
        decisions.add(policy.choose(context))
        micros.append((time.perf_counter() - start) * 1e6)
    assert len(decisions) > 2  # the MLP ran: decisions follow the context
    assert np.median(micros) < 1000  # generous: the figure itself is measured by `speckv evaluate`


def test_live_records_give_censored_states():
    """A live fixed-γ run's records: states after the first step carry the previous step's signals; a
    fully accepted step only bounds A from below (labels past γ masked), a partial one fixes it."""
    from speckv.records import StepRecord
    from speckv.tools.training import live_states

    def record(step: int, gamma: int, accepted: int, conf: float) -> StepRecord:
        return StepRecord(request_id="r", tier="fp16", policy=f"fixed:{gamma}", step=step, position=step * 3,
                          context_len=10 + step * 3, gamma_chosen=gamma, gamma=gamma, accepted=accepted,
                          emitted=accepted + 1, draft_ms=1, verify_ms=1, draft_compute_ms=1, verify_compute_ms=1,
                          policy_us=1, confidence=[conf] * gamma, entropy=[0.1] * gamma, chosen_prob=[conf] * gamma)

    data = live_states([record(0, 3, 3, 0.9), record(1, 3, 1, 0.4), record(2, 3, 0, 0.2)], gamma_max=6)
    assert data.x.shape == (3, len(FEATURES)) and data.accept.tolist() == [3, 1, 0]
    assert data.mask[0].tolist() == [1, 1, 1, 0, 0, 0]  # censored: A >= 3 is all that is known
    assert data.mask[1].tolist() == [1] * 6 and data.labels[1].tolist() == [1, 0, 0, 0, 0, 0]
    second = dict(zip(FEATURES, data.x[1]))
    assert second["prev_all_accepted"] == 1.0 and abs(second["prev_mean_confidence"] - 0.9) < 1e-6


def test_artifacts_written_under_the_old_name_still_load(collection, tmp_path):
    """Artifacts from before the predictor had its own name are `controller.json` + `controller.safetensors`."""
    predictor, _ = train([collection], tmp_path / "ctrl", hidden=8, epochs=5)
    old = tmp_path / "old"
    old.mkdir()
    meta = json.loads((tmp_path / "ctrl" / "predictor.json").read_text())
    (old / "controller.json").write_text(json.dumps({**meta, "weights": "controller.safetensors"}))
    (old / "controller.safetensors").write_bytes((tmp_path / "ctrl" / "predictor.safetensors").read_bytes())
    assert load_predictor(old).version() == predictor.version()


def test_decisions_from_the_prepared_table_equal_those_computed_in_choose():
    """`prepare` (run while a step is verified) fills a table from which `choose` only looks up its decision (no
    MLP row, no gain computed on the critical path); the decisions are the ones a policy never prepared
    computes itself, over a run whose estimates move."""
    from speckv.policy import RequestProgress, StepTiming
    from speckv.signals import DraftSignals

    rng = np.random.default_rng(1)

    def make() -> AdaptivePolicy:
        return AdaptivePolicy(load_predictor(), "fp16", TierEstimates.calibrated(CostModel(40, 250, 10)))

    plain, prepared = make(), make()
    computed_rows = []  # rows `prepared` computed inside choose (only before anything was prepared)
    rows = prepared._rows
    prepared._rows = lambda x: (computed_rows.append(len(x)) if len(x) == 1 else None) or rows(x)
    gains_in_choose, best, choosing = [], prepared._best, [False]
    prepared._best = lambda *a: (gains_in_choose.append(1) if choosing[0] else None) or best(*a)
    progress, position, chosen = RequestProgress(), 0, []
    for step in range(80):
        context = progress.context(step, position, 100 + position)
        choosing[0] = True
        chosen.append((plain.choose(context), prepared.choose(context)))
        choosing[0] = False
        g = max(chosen[-1][0], 1)
        conf = rng.uniform(0.3, 1, g).tolist()
        signals = DraftSignals(conf, conf, rng.uniform(0, 2, g).tolist())
        prepared.prepare(progress.previews(signals, step, position, 100 + position))
        accepted = int(rng.integers(0, g + 1))
        outcome = progress.advance(signals, accepted, StepTiming(30.0 * g, 260 + 12 * g, 100 + position,
                                                                 accepted + 1))
        plain.observe(outcome)
        prepared.observe(outcome)
        position += accepted + 1
    assert [a for a, _ in chosen] == [b for _, b in chosen]
    assert len({a for a, _ in chosen}) > 2 and computed_rows == [1]  # only step 0 was not prepared
    assert gains_in_choose == [1]
    # the estimates agree to rounding (a batched matmul sums in its own order)
    assert _flat(plain.report()) == pytest.approx(_flat(prepared.report()), rel=1e-9)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def test_optimism_tries_drafting_where_it_could_pay_and_nowhere_else():
    """Before a request has seen drafted tokens, acceptance is taken optimistically: a prior of 0.27 per token
    drafts where 0.5 would pay (the text may be easier than the average), never where even certain acceptance
    would not pay; and the optimism fades as the request sees its drafted tokens rejected."""
    import copy

    from speckv.policy import RequestProgress, StepTiming
    from speckv.signals import DraftSignals

    pessimist = copy.copy(load_predictor())
    pessimist.w2 = np.zeros_like(pessimist.w2)
    pessimist.b2 = np.full_like(pessimist.b2, -1.0)  # P(token accepted) = 0.27, whatever the context
    first = RequestProgress().context(0, 0, 100)
    pays_at_half = CostModel(draft_ms_per_token=25, verify_ms_base=100, verify_ms_per_token=25)  # 1 token: 50 ms
    never_pays = CostModel(draft_ms_per_token=60, verify_ms_base=100, verify_ms_per_token=60)  # 1 token: 120 ms
    assert AdaptivePolicy(pessimist, "fp16", TierEstimates.calibrated(pays_at_half)).choose(first) > 0
    assert AdaptivePolicy(pessimist, "fp16", TierEstimates.calibrated(never_pays)).choose(first) == 0

    policy = AdaptivePolicy(pessimist, "fp16", TierEstimates.calibrated(pays_at_half))
    progress, gammas = RequestProgress(), []
    for step in range(40):  # every drafted token rejected: the request learns its text is as hard as the prior says
        gamma = policy.choose(progress.context(step, step, 100 + step))
        gammas.append(gamma)
        signals = DraftSignals([0.3] * gamma, [0.3] * gamma, [2.0] * gamma)
        policy.observe(progress.advance(signals, 0, StepTiming(25.0 * gamma, 100 + 25.0 * gamma, 100 + step, 1)))
    assert gammas[0] > 0 and sum(g > 0 for g in gammas[20:]) <= 3  # only the probes


def test_optimism_decides_whether_to_draft_never_how_long():
    """Where the learned acceptance already drafts (0.7 per token, the AVX2 EPYC's nf4 costs: γ* = 4), the first
    step drafts what it picks; the optimistic acceptance would pick γmax and the doubled run cap (16 tokens at
    ~10% of a pass each, which opened every request there). The prior rate is the learned one's too."""
    from speckv.adaptive import OPTIMISM, _best_one_step_rate
    from speckv.policy import RequestProgress

    predictor = predictor_with_token_acceptance(0.7)
    policy = AdaptivePolicy(predictor, "nf4", TierEstimates.calibrated(CostModel(66.0, 1588.0, 94.0)))
    gamma = policy.choose(RequestProgress().context(0, 0, 100))
    logits = [float(np.log(0.7 / 0.3))] * predictor.gamma_max
    assert policy._gain_argmax(logits, OPTIMISM, 0.0, None, policy._extra_leading) == predictor.gamma_max  # optimism's
    assert gamma == 4 < policy.run_cap
    assert policy._prior_rate == pytest.approx(_best_one_step_rate(logits, 0.0, policy._extra_leading, policy._price0))


def test_optimism_drafts_the_run_the_learned_acceptance_would_given_it_drafts():
    """Where the learned acceptance (0.6 a token) drafts nothing and the optimistic one would draft four (a draft
    token costs 70% of a target pass: the H200's nf4 shape, flat verify), optimism opens a one-token run, the best
    run at the learned acceptance given that the step drafts. Its four-token runs cost every short request there
    6% against `fixed:1` (scripts/decode_together.py, one request a burst)."""
    from speckv.adaptive import OPTIMISM
    from speckv.policy import RequestProgress

    predictor = predictor_with_token_acceptance(0.6)
    policy = AdaptivePolicy(predictor, "nf4", TierEstimates.calibrated(CostModel(25.0, 37.6, 1.3)))
    gamma = policy.choose(RequestProgress().context(0, 0, 100))
    logits = [float(np.log(0.6 / 0.4))] * predictor.gamma_max
    assert policy._gain_argmax(logits, 0.0, 0.0, None, policy._extra_leading) == 0  # learned: no run pays
    assert policy._gain_argmax(logits, OPTIMISM, 0.0, None, policy._extra_leading) >= 4  # optimism's own run
    assert gamma == 1


def test_optimism_explores_with_the_shortest_run_that_pays_if_it_is_right():
    """Where no one-token run can pay even if its token is accepted (float32 on the AVX512-BF16 EPYC: a draft token
    143 ms, verify 364 ms for one token, 717 for two, ~865 for three to eight), the learned acceptance (0.6) drafts
    nothing, and the optimistic one (0.92) pays from four tokens on: optimism opens that four-token run, not the
    one-token run the learned acceptance prefers given a step drafts, which costs a step and a half for at most
    one token (2-4% against `none` replayed, float32 and int8 there)."""
    from speckv.adaptive import OPTIMISM, _best_run
    from speckv.policy import RequestProgress

    predictor = predictor_with_token_acceptance(0.6)
    curve = (364.0, 717.0, 865.0, 865.0, 865.0, 865.0, 865.0, 865.0, 896.0)
    policy = AdaptivePolicy(predictor, "fp16", TierEstimates.calibrated(
        CostModel(143.0, 634.0, 39.6, verify_curve=curve, curve_context_len=100)))
    gamma = policy.choose(RequestProgress().context(0, 0, 100))
    logits = [float(np.log(0.6 / 0.4))] * predictor.gamma_max
    extra = policy._extra_leading
    assert policy._gain_argmax(logits, 0.0, 0.0, None, extra) == 0  # learned: no run pays
    assert _best_run(logits, policy._rate, extra) == 1  # the learned acceptance's run, given a step drafts
    assert policy._gain_argmax(logits, OPTIMISM, 0.0, None, extra, shortest=True) == 4
    assert gamma == 4
