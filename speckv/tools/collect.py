"""`speckv collect`: profile the engine over prompts and tiers into step records and per-tier cost models.

For each tier it writes, under the output directory:
- `cost_<tier>.json`: the tier's measured cost model (speckv.tools.costs) on this machine;
- `records_<tier>.jsonl`: step records in the engine's one schema, per prompt: the target-only greedy run
  (policy `none`), the prompt's trace (policy `trace:γmax`, one record per output position; see
  speckv.tools.replay) and, for each `--gammas` value, a live fixed-γ run.

Collection is resumable: a prompt whose records are already in the file is skipped, and each prompt's
records are appended only once all of them exist, so an interrupted run loses at most one prompt.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ..records import read_jsonl, write_jsonl
from .bench import Prompt


@dataclass
class CollectConfig:
    draft: str
    target: str
    tiers: list[str]
    dtype: str
    gamma_max: int
    max_new_tokens: int
    gammas: list[int]  # live fixed-γ runs besides the trace (may be empty)
    cost_gammas: tuple[int, ...] = (0, 1, 2, 4, 8)
    cost_context_lens: tuple[int, ...] = (64, 512)
    cost_repeats: int = 2
    device: str | None = None


def done_prompts(path: Path) -> set[str]:
    """Prompt ids whose trace is already in a records file."""
    if not path.exists():
        return set()
    return {r.prompt_id for r in read_jsonl(path) if r.policy.startswith("trace:")}


def collect(config: CollectConfig, prompts: list[Prompt], out: Path, log=lambda s: print(s, file=sys.stderr)) -> None:
    from tqdm import tqdm

    from ..local import LocalEngine
    from ..text import encode_prompt
    from .costs import measure_loaded_costs
    from .replay import collect_trace, trace_to_records

    out.mkdir(parents=True, exist_ok=True)
    for tier in config.tiers:
        records_path = out / f"records_{tier}.jsonl"
        cost_path = out / f"cost_{tier}.json"
        todo = [p for p in prompts if p.question_id not in done_prompts(records_path)]
        if not todo and cost_path.exists():
            log(f"{tier}: all {len(prompts)} prompts already collected")
            continue
        engine = LocalEngine.load(config.draft, config.target, tier, config.dtype, device=config.device)
        if not cost_path.exists():
            log(f"{tier}: measuring the cost model")
            doc = measure_loaded_costs(engine.draft_worker.lm, engine.target_worker.lm, list(config.cost_gammas),
                                       list(config.cost_context_lens), config.cost_repeats)
            doc.update(tier=tier, dtype=config.dtype, draft=config.draft, target=config.target)
            cost_path.write_text(json.dumps(doc, indent=1))
        for prompt in tqdm(todo, desc=f"collect {tier}", file=sys.stderr):
            ids = encode_prompt(engine.tokenizer, prompt.text, chat=True)
            reference = engine.generate(ids, "none", config.max_new_tokens, prompt_id=prompt.question_id,
                                        category=prompt.category)
            rows = list(reference.records)
            trace = collect_trace(engine.draft_worker, reference.token_ids, ids, config.gamma_max,
                                  prompt.question_id, prompt.category)
            rows += trace_to_records(trace, tier, request_id=f"trace-{tier}-{prompt.question_id}")
            for gamma in config.gammas:
                live = engine.generate(ids, f"fixed:{gamma}", config.max_new_tokens, prompt_id=prompt.question_id,
                                       category=prompt.category)
                rows += live.records
            write_jsonl(rows, records_path, append=True)
