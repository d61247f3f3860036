"""The acceptance rule on stub distributions: exact cases, then a statistical test of losslessness."""

from __future__ import annotations

import pytest
import torch

from speckv.acceptance import PLACEHOLDER_TOKEN_ID, greedy_accept, speculative_accept

V = 5


def one_hot(ids: list[int]) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(ids), V).float()


def test_greedy_all_accepted_emits_bonus():
    r = greedy_accept(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 2, 3, 4]]))
    assert r.num_accepted.tolist() == [3]
    assert r.row_tokens() == [1, 2, 3, 4]  # 4 is the bonus token


def test_greedy_partial_emits_target_token_at_first_mismatch():
    r = greedy_accept(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 0, 3, 4]]))
    assert r.num_accepted.tolist() == [1]
    assert r.output_token_ids.tolist() == [[1, 0, PLACEHOLDER_TOKEN_ID, PLACEHOLDER_TOKEN_ID]]


def test_greedy_none_accepted_and_batch_rows_independent():
    r = greedy_accept(torch.tensor([[1, 2], [3, 4]]), torch.tensor([[0, 2, 2], [3, 4, 1]]))
    assert r.num_accepted.tolist() == [0, 2]
    assert r.row_tokens(0) == [0]
    assert r.row_tokens(1) == [3, 4, 1]


def test_greedy_zero_gamma_is_plain_decoding():
    r = greedy_accept(torch.zeros((1, 0), dtype=torch.long), torch.tensor([[3]]))
    assert r.num_accepted.tolist() == [0] and r.row_tokens() == [3]


def test_shapes_are_asserted():
    with pytest.raises(AssertionError):
        greedy_accept(torch.tensor([[1, 2]]), torch.tensor([[1, 2]]))
    with pytest.raises(AssertionError):
        speculative_accept(torch.tensor([[1]]), one_hot([1])[None], one_hot([1])[None], None)


def test_sampling_always_accepts_when_target_covers_draft():
    draft_ids = torch.tensor([[1, 2]])
    draft_probs = one_hot([1, 2])[None]
    target_probs = torch.cat([one_hot([1, 2]), one_hot([4])])[None]
    for seed in range(20):
        r = speculative_accept(draft_ids, draft_probs, target_probs, torch.Generator().manual_seed(seed))
        assert r.row_tokens() == [1, 2, 4]  # both accepted, bonus from target_probs[2]


def test_sampling_never_accepts_a_token_the_target_rules_out_and_recovers_from_residual():
    draft_ids = torch.tensor([[1, 2]])
    draft_probs = one_hot([1, 2])[None]
    target_probs = torch.tensor([[[0.0, 0.0, 0.5, 0.5, 0.0]] * 3])  # token 1 has target prob 0
    for seed in range(50):
        r = speculative_accept(draft_ids, draft_probs, target_probs, torch.Generator().manual_seed(seed))
        assert r.num_accepted.tolist() == [0]
        assert r.row_tokens()[0] in (2, 3)  # recovered from max(0, target - draft) normalised


def test_sampling_partial_acceptance_then_recovered_token():
    draft_ids = torch.tensor([[1, 2, 3]])
    draft_probs = one_hot([1, 2, 3])[None]
    target_probs = torch.stack([one_hot([1])[0], one_hot([2])[0], one_hot([0])[0], one_hot([4])[0]])[None]
    r = speculative_accept(draft_ids, draft_probs, target_probs, torch.Generator().manual_seed(0))
    assert r.num_accepted.tolist() == [2]
    assert r.row_tokens() == [1, 2, 0]  # the residual at position 2 is all on token 0


def test_sampling_follows_target_distribution():
    """Losslessness: the first emitted token is distributed as target_probs[0], whatever the draft does.

    The draft is deliberately far from the target. With 40k samples a chi-square test rejects a wrong rule
    (e.g. taking the draft token unconditionally, or resampling from target instead of the residual).
    """
    from scipy.stats import chisquare

    draft_dist = torch.tensor([0.6, 0.2, 0.1, 0.05, 0.05])
    target_dist = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15])
    expected = lambda n: target_dist.double().numpy() / target_dist.double().sum().item() * n
    n = 40_000
    gen = torch.Generator().manual_seed(1234)
    draft_ids = torch.multinomial(draft_dist.expand(n, V), 1, replacement=True, generator=gen)  # [n, 1]
    draft_probs = draft_dist.expand(n, 1, V).clone()
    target_probs = torch.stack([target_dist, torch.full((V,), 1.0 / V)]).expand(n, 2, V).clone()
    r = speculative_accept(draft_ids, draft_probs, target_probs, gen)
    first = r.output_token_ids[:, 0]
    counts = torch.bincount(first, minlength=V).double()
    stat, p = chisquare(counts.numpy(), expected(n))
    assert p > 1e-3, (counts / n, p)
    # and the same test detects a broken rule: the draft's own tokens are far from the target
    _, p_wrong = chisquare(torch.bincount(draft_ids[:, 0], minlength=V).double().numpy(), expected(n))
    assert p_wrong < 1e-6
    # acceptance rate matches theory: sum_x min(draft, target)
    expected_rate = torch.minimum(draft_dist, target_dist).sum().item()
    assert abs(r.num_accepted.float().mean().item() - expected_rate) < 0.01
