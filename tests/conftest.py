"""Shared fixtures: tiny random Qwen2 models built in the test and a character-level tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VOCAB = 96  # printable ASCII from 32, plus EOS at the end
EOS_ID = VOCAB - 1


class CharTokenizer:
    """token id i <-> chr(32 + i); the last id is EOS (decodes to nothing)."""

    eos_token_id = EOS_ID

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(32 + i) for i in ids if i != EOS_ID)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [min(max(ord(c) - 32, 0), EOS_ID - 1) for c in text]

    def get_vocab(self) -> dict[str, int]:
        return {chr(32 + i): i for i in range(VOCAB)}


def tiny_model(seed: int, dtype: torch.dtype = torch.float32, layers: int = 2, hidden: int = 64):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config).to(dtype).eval()
    # sharpen the output so greedy paths are not near-ties and the draft agrees with the target often
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.requires_grad_(False)
    return model


def perturbed_copy(model, scale: float, seed: int):
    """A draft that mostly agrees with `model`: its weights plus relative noise."""
    import copy

    torch.manual_seed(seed)
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * p.abs().mean() * scale)
    return draft


def drafting_artifact(tier: str = "fp16"):
    """The shipped controller with time at `tier` priced at ~0, so `adaptive` really drafts there.

    The shipped controller never drafts at fp16 (on the CPU it was measured on speculation cannot pay
    there), so tests of adaptive's drafting path use this copy: it always drafts runs capped at 12, ended by
    a run-acceptance stop rule (every token predicted accepted with p = sigmoid(2) ≈ 0.88, so a run ends
    after its 6th token, 0.88^6 < 0.5)."""
    import copy

    from speckv.controller import shipped_snapshot
    from speckv.signals import DraftStop

    artifact = copy.copy(shipped_snapshot().artifact)
    artifact.rate = {**artifact.rate, tier: 1e-9}
    artifact.draft_stop = {**artifact.draft_stop, tier: DraftStop(0.0, 0.5, (0.0, 0.0, 0.0, 2.0))}
    artifact.max_gamma = {**artifact.max_gamma, tier: 12}
    return artifact


@pytest.fixture(scope="session")
def drafting_controller(tmp_path_factory) -> Path:
    """`drafting_artifact()` saved as a controller artifact directory (for --controller and Serve configs)."""
    out = tmp_path_factory.mktemp("drafting-controller")
    drafting_artifact().save(out)
    return out


@pytest.fixture(scope="session")
def tokenizer() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture(scope="session")
def target_model():
    return tiny_model(0)


@pytest.fixture(scope="session")
def draft_model(target_model):
    return perturbed_copy(target_model, 0.3, 1)


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
