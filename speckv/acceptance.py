"""The acceptance rule of speculative decoding, as pure functions over tensors.

Terms, used the same way everywhere in SpecKV:
- *draft tokens*: the γ tokens the draft proposed for a row.
- *accepted*: the leading draft tokens the target keeps. `num_accepted` never counts the token below.
- *recovered*: on the first rejection, a token drawn from the normalised residual
  max(0, target_probs - draft_probs) at that position (greedy: the target's argmax there).
- *bonus*: when all γ draft tokens are accepted, a token drawn from the target's distribution at position γ.
Every step therefore emits num_accepted + 1 tokens: the accepted ones, then one recovered or bonus token.

Shapes (B = batch rows, G = γ draft tokens, V = vocabulary):
    draft_token_ids  [B, G]      int64
    draft_probs      [B, G, V]   float32, the distribution each draft token was drawn from
    target_probs     [B, G+1, V] float32, the target's distribution at each draft position plus one
    output_token_ids [B, G+1]    int64, accepted tokens then the recovered/bonus token, PLACEHOLDER after
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PLACEHOLDER_TOKEN_ID = -1


@dataclass(frozen=True)
class AcceptanceResult:
    num_accepted: torch.Tensor  # [B] int64, accepted draft tokens per row (recovered/bonus excluded)
    output_token_ids: torch.Tensor  # [B, G+1] int64, PLACEHOLDER_TOKEN_ID after the first num_accepted+1

    def row_tokens(self, row: int = 0) -> list[int]:
        """The num_accepted + 1 tokens a row emits this step."""
        return self.output_token_ids[row, : int(self.num_accepted[row]) + 1].tolist()


def _assemble(draft_token_ids: torch.Tensor, num_accepted: torch.Tensor, last_token: torch.Tensor) -> AcceptanceResult:
    """Lay out accepted draft tokens, then `last_token` (recovered or bonus) at index num_accepted."""
    batch, gamma = draft_token_ids.shape
    positions = torch.arange(gamma + 1, device=draft_token_ids.device).expand(batch, gamma + 1)
    padded = torch.cat([draft_token_ids, draft_token_ids.new_full((batch, 1), PLACEHOLDER_TOKEN_ID)], dim=1)
    out = torch.where(positions < num_accepted[:, None], padded, PLACEHOLDER_TOKEN_ID)
    out = torch.where(positions == num_accepted[:, None], last_token[:, None], out)
    return AcceptanceResult(num_accepted=num_accepted, output_token_ids=out)


def _leading_true(mask: torch.Tensor) -> torch.Tensor:
    """[B, G] bool -> [B] length of the leading run of True."""
    return mask.long().cumprod(dim=1).sum(dim=1)


def greedy_accept(draft_token_ids: torch.Tensor, target_token_ids: torch.Tensor) -> AcceptanceResult:
    """Temperature 0: keep draft tokens while they equal the target's argmax; then emit the target's token.

    target_token_ids [B, G+1] is the target's argmax at each position.
    """
    batch, gamma = draft_token_ids.shape
    assert target_token_ids.shape == (batch, gamma + 1), (target_token_ids.shape, draft_token_ids.shape)
    num_accepted = _leading_true(draft_token_ids == target_token_ids[:, :gamma])
    last_token = target_token_ids.gather(1, num_accepted[:, None]).squeeze(1)
    return _assemble(draft_token_ids, num_accepted, last_token)


def speculative_accept(
    draft_token_ids: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
) -> AcceptanceResult:
    """Standard speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

    Draft token x at position i is accepted with probability min(1, target_probs[i, x] / draft_probs[i, x]).
    The first rejected position emits a recovered token from norm(max(0, target_probs - draft_probs)); if all
    are accepted the row emits a bonus token from target_probs[G]. Output tokens then follow target_probs
    exactly, whatever the draft does. Random draws happen on the CPU with `generator`.
    """
    batch, gamma = draft_token_ids.shape
    vocab = target_probs.shape[-1]
    assert draft_probs.shape == (batch, gamma, vocab), (draft_probs.shape, draft_token_ids.shape)
    assert target_probs.shape == (batch, gamma + 1, vocab), (target_probs.shape, draft_token_ids.shape)
    device = draft_token_ids.device
    draft_probs, target_probs, draft_token_ids = draft_probs.cpu(), target_probs.cpu(), draft_token_ids.cpu()

    index = draft_token_ids[..., None]
    draft_p = draft_probs.gather(2, index).squeeze(2)  # [B, G]
    target_p = target_probs[:, :gamma].gather(2, index).squeeze(2)  # [B, G]
    uniform = torch.rand((batch, gamma), generator=generator, dtype=torch.float32)
    # u < target/draft, written without the division; draft_p > 0 because the token was drawn from it
    accepted_mask = uniform * draft_p < target_p
    num_accepted = _leading_true(accepted_mask)

    # Distribution of the token after the accepted run: residual at a rejection, target at the bonus slot.
    rows = torch.arange(batch)
    at = num_accepted.clamp(max=gamma)
    target_at = target_probs[rows, at]  # [B, V]
    padded_draft = torch.cat([draft_probs, draft_probs.new_zeros((batch, 1, vocab))], dim=1)
    residual = (target_at - padded_draft[rows, at]).clamp(min=0.0)
    mass = residual.sum(-1, keepdim=True)
    # A zero residual means target == draft at that position, where rejection has probability 0.
    last_dist = torch.where((num_accepted < gamma)[:, None] & (mass > 0), residual / mass.clamp(min=1e-30), target_at)
    last_token = torch.multinomial(last_dist, 1, generator=generator).squeeze(1)
    result = _assemble(draft_token_ids, num_accepted, last_token)
    return AcceptanceResult(result.num_accepted.to(device), result.output_token_ids.to(device))
