"""A rejected change, kept so it can be rerun: `adaptive` as shipped against `adaptive` whose run ceiling is the
run cap (2·γmax) whenever it drafts, so the in-run stop rule alone ends its runs (as hf-assisted's confidence
cut ends its runs of up to 20), and against hf-assisted; interleaved per prompt, paired by prompt.

    python scripts/run_extension_ab.py --tier nf4 --prompts docs/results/avx2/short_prompts.jsonl \\
        --out docs/results/avx2/run_extension_ab_rerun.json

Each run's steps are printed as (γ chosen, drafted, accepted). On an AVX2 EPYC at nf4 the extended runs
drafted 9-16 tokens with none accepted at many steps: the stop rule's per-token model does not see the
draft being confidently wrong, and the MLP's γ* is the better ceiling (docs/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import speckv.adaptive as adaptive
from speckv.local import LocalEngine
from speckv.text import encode_prompt
from speckv.tools.bench import load_prompts
from speckv.tools.stats import paired_speedup

SHIPPED_BEST = adaptive.AdaptivePolicy._best


def extended_best(self, logits, catch_up_ms=0.0, remaining=None):
    """The shipped choice of whether to draft; where it drafts, runs up to the run cap."""
    best = SHIPPED_BEST(self, logits, catch_up_ms, remaining)
    return self.run_cap if best and self._stop.min_run_acceptance > 0 else best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tier", default="nf4")
    parser.add_argument("--prompts", type=Path, default=Path("docs/results/avx2/short_prompts.jsonl"))
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    engine = LocalEngine.load(tier=args.tier)
    prompts = load_prompts(args.prompts)
    encoded = [encode_prompt(engine.tokenizer, p.text, chat=True) for p in prompts]
    engine.generate(encoded[0], "fixed:2", 4)  # warm-up
    variants = ["adaptive", "extended", "hf-assisted"]
    tokens_per_s: dict[str, list[float]] = {v: [] for v in variants}
    runs = []
    for i, (prompt, ids) in enumerate(zip(prompts, encoded)):
        for variant in variants[i % 3:] + variants[:i % 3]:
            adaptive.AdaptivePolicy._best = extended_best if variant == "extended" else SHIPPED_BEST
            try:
                result = engine.generate(ids, "hf-assisted" if variant == "hf-assisted" else "adaptive",
                                         args.max_tokens)
            finally:
                adaptive.AdaptivePolicy._best = SHIPPED_BEST
            tokens_per_s[variant].append(result.new_tokens / result.seconds)
            steps = [(r.gamma_chosen, r.gamma, r.accepted) for r in result.records]
            runs.append({"question_id": prompt.question_id, "variant": variant, "seconds": result.seconds,
                         "steps": result.stats.steps, "steps_gamma_chosen_drafted_accepted": steps})
            print(prompt.question_id, variant, f"{result.seconds:.1f}s", steps, flush=True)
    comparisons = [paired_speedup(a, tokens_per_s[a], b, tokens_per_s[b]).to_dict()
                   for a, b in (("extended", "adaptive"), ("extended", "hf-assisted"), ("adaptive", "hf-assisted"))]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"tier": args.tier, "runs": runs, "comparisons": comparisons}, indent=1))
    for c in comparisons:
        print(c)


if __name__ == "__main__":
    main()
