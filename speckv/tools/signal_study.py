"""`speckv signals`: how much can the draft's own state say about acceptance, beyond its confidence?

The stop rule (speckv.signals.DraftStop) predicts, token by token, whether the target accepts a drafted
token given that the tokens before it in the run were accepted. Under greedy decoding that token is the
draft's greedy prediction after the target's own first q output tokens, whatever run it belongs to. So one
teacher-forced pass of the draft over prompt + target output shows, at every output position, all a stop
rule could read there (confidence, entropy, the second-best probability, the draft's final hidden state)
and whether the target accepts it (the draft's argmax equals the target's token). The study fits logistic
models on the train split of the prompts (speckv.tools.training.split_of) and reports held-out ROC AUC per
feature set: the question is whether any richer draft-side predictor (the hidden-state probe is the
SpecDec++ idea: a learned acceptance head on the draft) would let a stop rule get closer to the oracle.

A teacher-forced pass is a many-token pass; live drafting uses one-token passes, so in bf16 a few
confidences differ in the last digits (exact in fp32: tests/test_signal_study.py).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .bench import Prompt
from .training import auc, fit_logistic, fit_token_acceptance, split_of

SIGNAL_FEATURES = ("confidence_logit", "entropy", "log_second_prob", "log_position")
FEATURE_SETS = {  # name -> columns of SIGNAL_FEATURES; the hidden-state probe adds the hidden state to "signals"
    "confidence": (0,),
    "confidence+entropy": (0, 1),
    "signals": (0, 1, 2, 3),
}
PROBE_L2_GRID = (1.0, 10.0, 100.0, 1000.0, 10000.0)  # penalty on the standardised hidden-state weights


@dataclass
class TokenRows:
    """Per output position q of one prompt: what the draft saw predicting token q after the target's first q."""

    prompt_id: str
    hidden: np.ndarray  # [n, hidden_size] float32: the draft's final hidden state (after its last norm)
    signals: np.ndarray  # [n, len(SIGNAL_FEATURES)]
    accepted: np.ndarray  # [n] float: 1 where the draft's greedy token equals the target's


@torch.inference_mode()
def teacher_forced_rows(draft: torch.nn.Module, prompt_ids: list[int], output_ids: list[int],
                        prompt_id: str = "") -> TokenRows:
    """One draft pass over prompt + output: the draft's signals and hidden state at every output position."""
    if not prompt_ids or not output_ids:
        raise ValueError("teacher forcing needs a non-empty prompt and output")
    ids = torch.tensor([prompt_ids + output_ids], device=next(draft.parameters()).device)
    out = draft(input_ids=ids, output_hidden_states=True)
    start = len(prompt_ids) - 1  # the position whose logits predict output token 0
    logits = out.logits[0, start:-1].float()
    hidden = out.hidden_states[-1][0, start:-1].float()
    log_probs = logits.log_softmax(-1)
    probs = log_probs.exp()
    top2 = probs.topk(2, dim=-1).values
    entropy = -(probs * log_probs).nan_to_num().sum(-1)
    position = torch.arange(len(output_ids), dtype=torch.float32)
    signals = torch.stack([top2[:, 0].logit(eps=1e-6), entropy, top2[:, 1].clamp_min(1e-9).log(),
                           position.log1p()], dim=1)  # confidence as token_acceptance_features has it
    accepted = (logits.argmax(-1).cpu() == torch.tensor(output_ids)).float()
    return TokenRows(prompt_id, hidden.cpu().numpy(), signals.cpu().numpy(), accepted.numpy())


def fit_probe(hidden: np.ndarray, signals: np.ndarray, labels: np.ndarray, l2: float) -> tuple[np.ndarray, ...]:
    """L2-penalised logistic regression over the standardised hidden state plus the signals (unpenalised).
    Returns (mean, std, weights); score rows with `probe_scores`."""
    mean, std = hidden.mean(0), hidden.std(0) + 1e-6
    design = np.hstack([(hidden - mean) / std, signals, np.ones((len(labels), 1))])
    w = fit_logistic(design, labels, l2, np.arange(design.shape[1]) < hidden.shape[1], maxiter=500)
    return mean, std, w


def probe_scores(model: tuple[np.ndarray, ...], hidden: np.ndarray, signals: np.ndarray) -> np.ndarray:
    mean, std, w = model
    return np.hstack([(hidden - mean) / std, signals, np.ones((len(hidden), 1))]) @ w


def _stack(rows: list[TokenRows]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    groups = np.concatenate([[i] * len(r.accepted) for i, r in enumerate(rows)])
    return (np.vstack([r.hidden for r in rows]), np.vstack([r.signals for r in rows]),
            np.concatenate([r.accepted for r in rows]), groups)


def choose_probe_l2(rows: list[TokenRows], folds: int = 3) -> dict[float, float]:
    """Mean held-out AUC of the probe per L2 penalty, cross-validated over the training prompts (grouped by
    prompt, so no prompt is in both halves of a fold)."""
    hidden, signals, labels, groups = _stack(rows)
    scores: dict[float, float] = {}
    for l2 in PROBE_L2_GRID:
        aucs = []
        for k in range(folds):
            held = groups % folds == k
            if labels[held].min() == labels[held].max() or labels[~held].min() == labels[~held].max():
                continue
            model = fit_probe(hidden[~held], signals[~held], labels[~held], l2)
            aucs.append(auc(probe_scores(model, hidden[held], signals[held]), labels[held]))
        scores[l2] = float(np.mean(aucs)) if aucs else math.nan
    return scores


def check_splits(prompt_ids: list[str]) -> None:
    """The study fits on train-split prompts and scores test-split ones: it needs some of each."""
    if {split_of(i) for i in prompt_ids} != {"train", "test"}:
        raise ValueError("the study needs prompts in both the train and the test split (speckv.tools.training.split_of "
                         "puts about one prompt id in three in the test split); give it more prompts")


def study(rows: list[TokenRows]) -> dict:
    """Held-out AUC of acceptance predicted from each feature set (fitted on the train split's prompts)."""
    check_splits([r.prompt_id for r in rows])
    split = {s: [r for r in rows if split_of(r.prompt_id) == s] for s in ("train", "test")}
    tr_hidden, tr_signals, tr_labels, _ = _stack(split["train"])
    te_hidden, te_signals, te_labels, _ = _stack(split["test"])
    if tr_labels.min() == tr_labels.max():
        raise ValueError("the training prompts need both accepted and rejected tokens")
    result: dict = {
        "train_prompts": len(split["train"]), "test_prompts": len(split["test"]),
        "train_tokens": int(len(tr_labels)), "test_tokens": int(len(te_labels)),
        "train_acceptance": float(tr_labels.mean()), "test_acceptance": float(te_labels.mean()),
        "signal_features": list(SIGNAL_FEATURES), "test_auc": {},
    }
    for name, cols in FEATURE_SETS.items():
        weights = np.asarray(fit_token_acceptance(tr_signals[:, cols], tr_labels))
        result["test_auc"][name] = auc(te_signals[:, cols] @ weights[:-1], te_labels)
    cv = choose_probe_l2(split["train"])
    l2 = max(cv, key=lambda k: -math.inf if math.isnan(cv[k]) else cv[k])
    held_out = {k: auc(probe_scores(fit_probe(tr_hidden, tr_signals, tr_labels, k), te_hidden, te_signals), te_labels)
                for k in PROBE_L2_GRID}
    result["test_auc"]["signals+hidden_state_probe"] = held_out[l2]  # the penalty cross-validation chose
    result["test_auc_probe_by_l2"] = {str(k): v for k, v in held_out.items()}  # for the record: every penalty
    result["probe_l2"] = l2
    result["probe_cv_auc_by_l2"] = {str(k): v for k, v in cv.items()}
    result["hidden_size"] = int(tr_hidden.shape[1])
    return result


def collect_rows(engine, prompts: list[Prompt], max_new_tokens: int,
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> tuple[list[TokenRows], dict]:
    """Greedy target-only output for each prompt (the engine's `none` run), then the draft teacher-forced on it."""
    from tqdm import tqdm

    from ..text import encode_prompt

    rows, outputs = [], {}
    for prompt in tqdm(prompts, desc="signals", file=sys.stderr):
        ids = encode_prompt(engine.tokenizer, prompt.text, chat=True)
        reference = engine.generate(ids, "none", max_new_tokens, prompt_id=prompt.question_id, category=prompt.category)
        if not reference.token_ids:
            log(f"{prompt.question_id}: the target produced no tokens; skipped")
            continue
        outputs[prompt.question_id] = {"category": prompt.category, "output_ids": reference.token_ids}
        rows.append(teacher_forced_rows(engine.draft_model, ids, reference.token_ids, prompt.question_id))
    return rows, outputs
