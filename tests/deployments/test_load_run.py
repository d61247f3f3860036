"""deployments/load_run.py's accounting of answers that differ from their single-request reference."""

from __future__ import annotations

import json

import pytest

from deployments import load_run


def serve_answers(monkeypatch, answers: list[str]) -> None:
    """Each request to the fake server answers the next text in `answers` (the first: the reference)."""
    texts = iter(answers)

    async def complete(client, url, body, headers):
        try:
            return "ok", next(texts)
        except StopIteration:
            return "http_503", None

    monkeypatch.setattr(load_run, "complete", complete)


@pytest.mark.parametrize("tolerate", [False, True])
def test_diverging_and_cut_short_answers_are_counted_and_located(monkeypatch, tmp_path, tolerate):
    serve_answers(monkeypatch, ["hello world", "hello world", "hello there", "hello"])
    out = tmp_path / "run.json"
    rc = load_run.main(["--clients", "1", "--duration", "0.2", "--prompt", "p", "--out", str(out)]
                       + (["--tolerate-divergence"] if tolerate else []))
    doc = json.loads(out.read_text())
    assert doc["answers_by_kind"]["ok"] == 3 and doc["mismatches"] == 2
    assert doc["mismatch_share"] == pytest.approx(2 / 3)
    assert doc["first_difference_chars"] == [5, 6]  # "hello" cut short at 5; "hello there" differs at 6
    assert doc["cut_short"] == 1 and doc["reference_chars"] == {"p": 11}
    assert rc == 1  # an answer cut short fails the run, tolerated divergence or not


def test_tolerated_divergence_alone_passes_the_run(monkeypatch, tmp_path):
    serve_answers(monkeypatch, ["hello world", "hello there", "hello world"])
    args = ["--clients", "1", "--duration", "0.2", "--prompt", "p", "--out", str(tmp_path / "run.json")]
    assert load_run.main(args) == 1
    serve_answers(monkeypatch, ["hello world", "hello there", "hello world"])
    assert load_run.main(args + ["--tolerate-divergence"]) == 0
    doc = json.loads((tmp_path / "run.json").read_text())
    assert doc["mismatches"] == 1 and doc["cut_short"] == 0 and doc["first_difference_chars"] == [6]
