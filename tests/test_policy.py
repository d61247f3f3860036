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
    count, the draft's arrears and the remaining budget included: the same as a request that never previewed
    builds after the step."""
    for drafted in (0, 1, 4):
        for accepted in range(drafted + 1):
            progress, twin = RequestProgress(max_new_tokens=50), RequestProgress(max_new_tokens=50)
            for p in (progress, twin):
                p.context(0, 0, 40)
                p.advance(_signals(2), 0)
                p.context(1, 1, 41)
            signals = _signals(drafted)
            previews = progress.previews(signals, 1, 1, 41)
            for p in (progress, twin):
                p.advance(signals, accepted)
            asked = progress.context(2, 1 + accepted + 1, 41 + accepted + 1)
            assert asked is previews[accepted]  # handed out, not built between the verification and the draft
            assert asked == twin.context(2, 1 + accepted + 1, 41 + accepted + 1)


def test_a_preview_is_handed_out_only_for_the_step_it_was_made_for():
    """A step that emitted fewer tokens than its accepted count + 1 (an end of sequence, the budget), or was
    advanced with other signals, gets a context built for it, as if nothing had been previewed."""
    def after(previewed: bool, advanced_with_other_signals: bool, position: int) -> tuple:
        progress = RequestProgress(max_new_tokens=50)
        progress.context(0, 0, 40)
        progress.advance(_signals(0), 0)
        progress.context(1, 1, 41)
        signals = _signals(3)
        previews = progress.previews(signals, 1, 1, 41) if previewed else []
        progress.advance(_signals(3) if advanced_with_other_signals else signals, 2)
        return progress.context(2, position, 40 + position), previews

    asked, previews = after(True, False, 4)  # at 1, 2 accepted + 1 more emitted: the preview's step
    assert asked is previews[2]
    for other_signals, position in ((False, 3), (True, 4)):
        asked, previews = after(True, other_signals, position)
        assert all(asked is not p for p in previews)
        assert asked == after(False, False, position)[0]
