"""Shared fixtures: tiny random Qwen2 models built in the test and a character-level tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from speckv.tools.replay import Trace

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


GAMMA_MAX = 6  # draft run length of synthetic traces


def synthetic_trace(rng: np.random.Generator, prompt_id: str, n: int, easy: float, gamma_max: int = GAMMA_MAX):
    """Runs whose acceptance follows the draft's confidence: a token is accepted with probability equal to
    its confidence, and easy prompts have confident drafts."""
    conf = np.clip(rng.beta(8 * easy + 1, 8 * (1 - easy) + 1, size=(n, gamma_max)), 0.01, 0.99)
    accepted = rng.random((n, gamma_max)) < conf
    accept_len = np.array([int(np.argmin(row)) if not row.all() else gamma_max for row in accepted])
    accept_len = np.minimum(accept_len, n - 1 - np.arange(n))
    entropy = -np.log(conf)
    return Trace(prompt_id, "easy" if easy > 0.5 else "hard", 20, accept_len, conf, entropy, conf)


def uninformative_trace(rng: np.random.Generator, prompt_id: str, n: int, acceptance: float,
                        gamma_max: int = GAMMA_MAX):
    """Runs whose acceptance ignores the draft's signals: each token is accepted with `acceptance`, its confidence
    drawn uniformly (sampling at t = 0.7 at nf4 on an AVX2 EPYC came close: the step predictor's log-odds fitted
    with a slope of 0.03-0.15, docs/RESULTS.md)."""
    conf = rng.uniform(0.05, 0.99, size=(n, gamma_max))
    accepted = rng.random((n, gamma_max)) < acceptance
    accept_len = np.array([int(np.argmin(row)) if not row.all() else gamma_max for row in accepted])
    accept_len = np.minimum(accept_len, n - 1 - np.arange(n))
    return Trace(prompt_id, "uninformative", 20, accept_len, conf, -np.log(conf), conf)


def predictor_with_acceptance(logit: float):
    """The shipped acceptance predictor made to predict the same acceptance log-odds for every draft token,
    whatever the context."""
    import copy

    from speckv.predictor import shipped_predictor

    predictor = copy.copy(shipped_predictor())
    predictor.w2 = np.zeros_like(predictor.w2)
    predictor.b2 = np.full_like(predictor.b2, logit)
    return predictor


def predictor_with_token_acceptance(acceptance: float):
    """The shipped acceptance predictor made to predict that each draft token is accepted with `acceptance` given
    the ones before it were (P(first k accepted) = acceptance^k), whatever the context."""
    from speckv.predictor import shipped_predictor
    from speckv.tools.shapes import token_acceptance_predictor

    return token_acceptance_predictor(shipped_predictor(), acceptance)


def certain_predictor():
    """The shipped acceptance predictor made certain (every token accepted), so
    `adaptive` drafts on any step costs: tests of adaptive's drafting path, which the real predictor would
    only take where this machine's costs and the tiny test models' acceptance make drafting pay. The
    online acceptance bias is bounded (speckv.estimates.BIAS_LIMIT), so it never talks it out of drafting."""
    return predictor_with_acceptance(12.0)


@pytest.fixture(scope="session")
def hopeless_predictor(tmp_path_factory) -> Path:
    """A predictor sure that no draft token is ever accepted (optimism cannot talk it into drafting), saved."""
    out = tmp_path_factory.mktemp("hopeless-predictor")
    predictor_with_acceptance(-12.0).save(out)
    return out


@pytest.fixture(scope="session")
def drafting_predictor(tmp_path_factory) -> Path:
    """`certain_predictor()` saved as an artifact directory (for --predictor and the app's `predictor`)."""
    out = tmp_path_factory.mktemp("drafting-predictor")
    certain_predictor().save(out)
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


@pytest.fixture
def bf16_model():
    """The tiny target in bf16: plain half-precision linear layers (the fp16 tier on a CPU)."""
    return tiny_model(0, torch.bfloat16)


@pytest.fixture(params=["nf4", "bf16"])
def half_model(request):
    """A model whose linear layers multiply in half precision on the CPU, 4-bit or plain (SessionLM.half_layers)."""
    return request.getfixturevalue(f"{request.param}_model")


@pytest.fixture
def nf4_model(tmp_path):
    """The tiny target quantized to nf4 by bitsandbytes through `load_model`, multiplying in bf16 on the
    CPU. bitsandbytes' own kernel for CPUs with bf16 hardware is turned off, so its 4-bit layers dequantize
    and multiply as they do on one without (what SessionLM.half_layers finds) on any CPU."""
    from speckv.models import load_model

    tiny_model(0, torch.bfloat16).save_pretrained(tmp_path / "tiny")
    model = load_model(str(tmp_path / "tiny"), "nf4", dtype="bfloat16", device="cpu")
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
