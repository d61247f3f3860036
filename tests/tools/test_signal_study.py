"""The acceptance-signal study: teacher forcing sees what the draft saw live, and the study's fits hold out."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ..conftest import perturbed_copy


def test_teacher_forcing_sees_what_each_run_saw(target_model, tokenizer):
    """fp32 greedy: at every run token whose predecessors were accepted, the teacher-forced row at that
    output position has the trace's confidence and entropy, and its label is whether the token was accepted."""
    from speckv.local import LocalEngine
    from speckv.tools.replay import collect_trace
    from speckv.tools.signal_study import teacher_forced_rows
    from speckv.workers import DraftWorker, SessionLM

    draft_model = perturbed_copy(target_model, 0.1, 2)
    engine = LocalEngine(draft_model, target_model, tokenizer)
    prompt = [5, 17, 33, 2, 40, 41, 8]
    reference = engine.generate(prompt, "none", 30).token_ids
    trace = collect_trace(DraftWorker(SessionLM(draft_model)), reference, prompt, gamma_max=4)
    rows = teacher_forced_rows(draft_model, prompt, reference, "p")
    assert rows.hidden.shape == (len(reference), draft_model.config.hidden_size)
    checked = 0
    for p in range(trace.n - 1):
        for j in range(min(int(trace.accept_len[p]) + 1, trace.gamma_max, trace.n - p - 1)):
            q = p + j
            confidence = 1 / (1 + math.exp(-rows.signals[q, 0]))  # the row keeps its logit
            assert confidence == pytest.approx(trace.confidence[p, j], abs=1e-5)
            assert rows.signals[q, 1] == pytest.approx(trace.entropy[p, j], abs=1e-4)
            assert rows.accepted[q] == float(trace.accept_len[p] > j)
            checked += 1
    assert checked > trace.n and 0 < rows.accepted.mean() < 1  # runs of several tokens, both labels seen


def test_study_reports_held_out_auc_per_feature_set():
    """On synthetic rows where acceptance follows one hidden direction the confidence only hints at, the
    probe beats the signals on held-out prompts; ids in both splits are required."""
    from speckv.tools.signal_study import TokenRows, study
    from speckv.tools.training import split_of

    rng = np.random.default_rng(0)
    ids = [f"p{i}" for i in range(40)]
    assert {split_of(i) for i in ids} == {"train", "test"}
    rows = []
    for pid in ids:
        hidden = rng.normal(size=(60, 8)).astype(np.float32)
        logit = 3.0 * hidden[:, 0] + 1.0
        accepted = (rng.random(60) < 1 / (1 + np.exp(-logit))).astype(float)
        confidence_logit = logit / 3 + rng.normal(scale=1.5, size=60)  # a noisy view of the same thing
        signals = np.stack([confidence_logit, rng.random(60), rng.random(60), np.log1p(np.arange(60))], 1)
        rows.append(TokenRows(pid, hidden, signals, accepted))
    doc = study(rows)
    aucs = doc["test_auc"]
    assert aucs["signals+hidden_state_probe"] > aucs["confidence"] + 0.05
    assert 0.5 < aucs["confidence"] < 0.9
    assert doc["test_tokens"] + doc["train_tokens"] == 40 * 60
    with pytest.raises(ValueError, match="both the train and the test split"):
        study([r for r in rows if split_of(r.prompt_id) == "train"])
