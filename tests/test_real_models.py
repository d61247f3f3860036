"""Brief checks on the embedded default pair (Qwen2.5-Coder 0.5B draft, 1.5B target)."""

from __future__ import annotations

import pytest

from speckv.local import LocalEngine
from speckv.text import encode_prompt

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def fp32_engine() -> LocalEngine:
    return LocalEngine.load(dtype="float32")


def test_default_pair_shares_tokenizer_and_eos(fp32_engine):
    from speckv.models import DEFAULT_DRAFT, load_tokenizer

    tok = fp32_engine.tokenizer
    # the converted tokenizer covers exactly the models' embedding rows, and the draft's is the same one
    assert len(tok) == tok.vocab_size == 151_936
    assert fp32_engine.target_model.config.vocab_size == fp32_engine.draft_model.config.vocab_size == len(tok)
    assert load_tokenizer(DEFAULT_DRAFT).get_vocab() == tok.get_vocab()
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == "<|im_end|>"


def test_fp32_greedy_speculation_is_exact_on_default_pair(fp32_engine):
    ids = encode_prompt(fp32_engine.tokenizer, "Write a Python function that checks whether a number is prime.",
                        chat=True)
    reference = fp32_engine.generate(ids, "none", 16)
    assert reference.new_tokens == 16 and "def" in reference.text
    for policy in ["fixed:4", "heuristic"]:
        result = fp32_engine.generate(ids, policy, 16)
        assert result.token_ids == reference.token_ids, policy
        assert result.stats.tokens_per_step > 1.5, policy  # the 0.5B draft predicts code well
