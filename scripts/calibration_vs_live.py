"""Does calibration time a verify pass as the live loop runs it? In one process, alternating: the calibration's
own measurement (`speckv.calibration.time_call`: one untimed call, then timed ones) and a live-like pass (the
same number of tokens fed after the same cached context, through `SessionLM.logits_batch`), per number of
tokens scored, over several rounds. Their medians agree where the method is sound; the spread across rounds
is what one timed pass per point (at nf4, where a pass exceeds ENOUGH_TIMED_MS) leaves in a calibration.

    python scripts/calibration_vs_live.py --tier nf4 --rounds 3 --out docs/results/avx2/calibration_vs_live_nf4.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from speckv.calibration import hardware_id, synthetic_ids, time_call
from speckv.local import LocalEngine
from speckv.workers import LogitsCall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tier", default="nf4")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", default="1,4,9", help="tokens scored per pass (γ + 1)")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    engine = LocalEngine.load(tier=args.tier)
    lm = engine.target_worker.lm
    vocab = int(lm.model.config.vocab_size)
    context = synthetic_ids(args.context, vocab)
    lm.logits_batch([LogitsCall("live", context, 1)])  # the live-like session's cached context
    rows = []
    for r in range(args.rounds):
        for tokens in (int(t) for t in args.tokens.split(",")):
            calibration_ms = time_call(lm, context, tokens, tokens, repeats=1, session="calibration")
            fed = context + synthetic_ids(tokens, vocab, salt=100 + r)
            start = time.perf_counter()
            lm.logits_batch([LogitsCall("live", fed, tokens)])
            live_ms = (time.perf_counter() - start) * 1e3
            rows.append({"round": r, "tokens": tokens, "calibration_ms": calibration_ms, "live_like_ms": live_ms})
            print(json.dumps(rows[-1]), flush=True)
    by_tokens: dict[int, list[dict]] = {}
    for row in rows:
        by_tokens.setdefault(row["tokens"], []).append(row)
    summary = {}
    for tokens, group in sorted(by_tokens.items()):
        calibration = [x["calibration_ms"] for x in group]
        summary[tokens] = {"calibration_median_ms": statistics.median(calibration),
                           "live_like_median_ms": statistics.median(x["live_like_ms"] for x in group),
                           "calibration_range_ms": [min(calibration), max(calibration)]}
    doc = {"tier": args.tier, "context": args.context, "hardware": hardware_id(lm.device), "rows": rows,
           "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
