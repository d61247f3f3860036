"""Prometheus metrics of the served path, through ray.serve.metrics (exported on Ray's metrics port).

Names (Ray prefixes each with `ray_`): see docs/SERVING.md.
"""

from __future__ import annotations

from ray.serve import metrics

from speckv.estimates import TierEstimates
from speckv.records import StepRecord

MS_BOUNDARIES = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
GAMMA_BOUNDARIES = [0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 8.5, 12.5, 16.5]


class ServeMetrics:
    def __init__(self) -> None:
        tags = ("tier",)
        self.draft_tokens = metrics.Counter("speckv_draft_tokens", "draft tokens proposed", tag_keys=tags)
        self.accepted_tokens = metrics.Counter("speckv_accepted_tokens", "draft tokens accepted", tag_keys=tags)
        self.generated_tokens = metrics.Counter("speckv_generated_tokens", "tokens returned", tag_keys=tags)
        self.steps = metrics.Counter("speckv_steps", "speculation steps (target passes)", tag_keys=tags)
        self.gamma = metrics.Histogram("speckv_gamma", "draft length per step", GAMMA_BOUNDARIES, tag_keys=tags)
        self.draft_ms = metrics.Histogram("speckv_step_draft_ms", "draft time per step", MS_BOUNDARIES, tag_keys=tags)
        self.verify_ms = metrics.Histogram("speckv_step_verify_ms", "verify time per step", MS_BOUNDARIES,
                                           tag_keys=tags)
        self.hop_ms = metrics.Histogram("speckv_step_hop_ms", "handle-hop time per step (wall minus compute)",
                                        MS_BOUNDARIES, tag_keys=tags)
        self.ttft_ms = metrics.Histogram("speckv_time_to_first_token_ms", "time to first token", MS_BOUNDARIES,
                                         tag_keys=tags)
        self.tokens_per_s = metrics.Gauge("speckv_tokens_per_s", "tokens/s of the last finished request",
                                          tag_keys=tags)
        self.retries = metrics.Counter("speckv_step_retries", "model calls retried after a replica went away",
                                       tag_keys=tags)
        self.requests = metrics.Counter("speckv_requests", "finished requests by outcome", tag_keys=("tier", "outcome"))
        # what `adaptive` currently estimates (speckv.estimates), per tier
        self.cost_ms = metrics.Gauge("speckv_estimated_cost_ms", "estimated ms: draft per token, verify of one token, "
                                     "and each call's hop (part draft_hop, verify_hop)",
                                     tag_keys=("tier", "part"))
        self.cost_scale = metrics.Gauge("speckv_cost_scale", "live step time over the calibration's (part draft, "
                                        "verify: the verify curve's level, verify_tokens: its per-token part "
                                        "against its fixed part)", tag_keys=("tier", "part"))
        self.acceptance_bias = metrics.Gauge("speckv_acceptance_bias", "log-odds bias of the online calibration of "
                                             "predicted acceptance (model step: the step predictor; token: the "
                                             "within-run token model)", tag_keys=("tier", "mode", "model"))
        self.acceptance_slope = metrics.Gauge("speckv_acceptance_slope", "log-odds slope of the online calibration "
                                              "of predicted acceptance (1: as trained; near 0: uninformative)",
                                              tag_keys=("tier", "mode", "model"))
        self.pass_load = metrics.Gauge("speckv_pass_load", "what the tier's verify passes carry now (median of "
                                       "recent passes): part sequences, tokens", tag_keys=("tier", "part"))
        self.rate = metrics.Gauge("speckv_estimated_tokens_per_s", "decode rate that prices a millisecond",
                                  tag_keys=("tier", "mode"))
        self.drafting_under_load = metrics.Gauge(
            "speckv_drafting_under_load", "per load level (sequences: its most sequences on the cores), tokens per "
            "wall ms over target-only passes' as priced, waits included, in stretches that drafted and that did "
            "not (part drafting, target_only), and whether drafting is held (part held: 1)",
            tag_keys=("tier", "sequences", "part"))

    def step(self, record: StepRecord) -> None:
        tags = {"tier": record.tier}
        self.steps.inc(1, tags)
        for counter, value in ((self.draft_tokens, record.gamma), (self.accepted_tokens, record.accepted),
                               (self.generated_tokens, record.emitted)):
            if value > 0:  # Ray counters reject increments of 0
                counter.inc(value, tags)
        self.gamma.observe(record.gamma, tags)
        self.draft_ms.observe(record.draft_ms, tags)
        self.verify_ms.observe(record.verify_ms, tags)
        self.hop_ms.observe(record.hop_ms, tags)

    def estimates(self, tier: str, estimates: TierEstimates) -> None:
        doc = estimates.to_dict()
        cost = doc["cost"]
        for part in ("draft", "verify"):
            self.cost_scale.set(cost[f"{part}_scale"], {"tier": tier, "part": part})
        self.cost_scale.set(cost["verify_token_factor"], {"tier": tier, "part": "verify_tokens"})
        self.cost_ms.set(cost["draft_ms_per_token"], {"tier": tier, "part": "draft"})
        self.cost_ms.set(cost["verify_ms_1_token"], {"tier": tier, "part": "verify"})
        for part in ("draft", "verify"):
            self.cost_ms.set(cost[f"{part}_hop_ms"], {"tier": tier, "part": f"{part}_hop"})
        self.pass_load.set(doc["load"]["sequences_per_pass"], {"tier": tier, "part": "sequences"})
        self.pass_load.set(doc["load"]["tokens_per_pass"], {"tier": tier, "part": "tokens"})
        for sequences, level in doc["load"]["drafting_under_load"].items():
            tags = {"tier": tier, "sequences": sequences}
            for part in ("drafting", "target_only"):
                if level[f"{part}_efficiency"] is not None:
                    self.drafting_under_load.set(level[f"{part}_efficiency"], {**tags, "part": part})
            self.drafting_under_load.set(float(level["drafting_held"]), {**tags, "part": "held"})
        for mode in ("greedy", "sampled"):
            for model, prefix in (("step", "acceptance"), ("token", "token_acceptance")):
                tags = {"tier": tier, "mode": mode, "model": model}
                self.acceptance_bias.set(doc[mode][f"{prefix}_bias"], tags)
                self.acceptance_slope.set(doc[mode][f"{prefix}_slope"], tags)
            self.rate.set(doc[mode]["tokens_per_s"], {"tier": tier, "mode": mode})
