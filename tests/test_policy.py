"""What policies are told (speckv.policy): RequestProgress follows how much of the context the draft has read."""

from __future__ import annotations

from speckv.policy import RequestProgress
from speckv.signals import DraftSignals


def _signals(n: int) -> DraftSignals:
    return DraftSignals([0.9] * n, [0.9] * n, [0.1] * n)


def test_the_draft_lacks_the_prompt_then_what_target_only_steps_added():
    progress = RequestProgress(max_new_tokens=32)
    first = progress.context(0, 0, 100)
    assert first.draft_behind == 100 and first.remaining == 32  # it has read nothing yet
    progress.advance(_signals(0), 0)  # a target-only step: one token, still unread
    assert progress.context(1, 1, 101).draft_behind == 101
    progress.advance(_signals(3), 1)  # drafted 3 after the 101, the first accepted, then a recovered token
    assert progress.context(2, 3, 103).draft_behind == 1  # read 101 + its accepted token; lacks the recovered one
    progress.advance(_signals(2), 2)  # both accepted, then the bonus: its last drafted token was never fed
    after_full_run = progress.context(3, 6, 106)
    assert after_full_run.draft_behind == 2 and after_full_run.remaining == 26
    for step, length in ((3, 107), (4, 108)):
        progress.advance(_signals(0), 0)
        assert progress.context(step + 1, length - 100, length).draft_behind == 2 + length - 106


def test_previews_agree_with_the_context_after_the_step():
    """What `adaptive` prepares during verification is the context it is then asked about, for every accepted
    count, the draft's arrears and the remaining budget included."""
    for drafted in (0, 1, 4):
        for accepted in range(drafted + 1):
            progress = RequestProgress(max_new_tokens=50)
            progress.context(0, 0, 40)
            progress.advance(_signals(2), 0)
            progress.context(1, 1, 41)
            previews = progress.previews(_signals(drafted), 1, 1, 41)
            progress.advance(_signals(drafted), accepted)
            assert previews[accepted] == progress.context(2, 1 + accepted + 1, 41 + accepted + 1)
