"""Visuals pushed while a speculative turn (started at the VAD's pause) waits for the end-of-turn
decision: an image belongs to the turn being decided, so the speculative start is discarded and the
end of turn starts the turn again with it (the answer is the one without speculation); a camera
frame is kept for the next turn (frames stream on through every pause; the turn chose its frames at
its start). Before this, the commit cleared both, so such an image was silently lost."""

import numpy as np
import pytest

from vita_engine.runtime import _compat
from vita_engine.runtime.session import summarize_turn

from runtime_util import check_turn_tail, make_engine, one_thread, push_chunks, rand_image, until  # noqa: F401


@pytest.fixture(scope="module")
def engines(tiny_ckpt, one_thread):  # noqa: F811
    spec = make_engine(tiny_ckpt, max_new_tokens=8)
    plain = make_engine(tiny_ckpt, max_new_tokens=8, speculative=False)
    yield spec, plain
    spec.close()
    plain.close()


def _speak_then(s, spec: bool, push):
    """The question, a pause long enough for a speculative start (> 200 ms) but not for the end of turn
    (500 ms), `push(s)` while the turn is undecided, then silence: the turn ends."""
    x, sr = _compat.load_sample("question.wav")
    push_chunks(s, x, sr)
    push_chunks(s, np.zeros(int(0.3 * sr), np.float32), sr)
    if spec:
        until(lambda: s._state.turn is not None and s._state.turn.speculative and s.stats.get("turn_prefill_tokens"),
               "the speculative start at the pause")
    push(s)
    push_chunks(s, np.zeros(sr, np.float32), sr)
    return summarize_turn(s.collect(timeout=60))


def test_image_during_a_speculative_turn_joins_it(engines):
    spec, plain = engines
    res = {}
    for name, e in (("spec", spec), ("plain", plain)):
        s = e.session(seed=4)
        r = _speak_then(s, name == "spec", lambda s: s.push_image(rand_image(1, 120, 160)))
        check_turn_tail(r.events)
        res[name] = (r, dict(s.stats), list(s._state.pending_images))
        s.close()
    (a, sa, pa), (b, sb, pb) = res["spec"], res["plain"]
    assert sa.get("discarded", 0) >= 1  # the speculative start without the image was dropped
    assert not pa and not pb  # the image went into the turn, not into the next one
    assert a.text == b.text and a.text
    np.testing.assert_array_equal(a.audio, b.audio)
    # the same prompt, image tokens included (the spec side may have prefilled them ahead: prefix_stage.py)
    ma, mb = a.metrics, b.metrics
    assert ma["cached_tokens"] + ma["prompt_tokens"] == mb["cached_tokens"] + mb["prompt_tokens"]


def test_frame_during_a_speculative_turn_is_kept_for_the_next(engines):
    spec, _ = engines
    s = spec.session(seed=5)
    r = _speak_then(s, True, lambda s: s.push_video_frame(rand_image(2, 120, 160), timestamp=1.0))
    check_turn_tail(r.events)
    st = s._state
    assert s.stats.get("discarded", 0) == 0  # a frame does not undo the speculative start
    assert len(st.pending_frames) == 1 and st.pending_frames[0].ts == 1.0
    r2 = s.run_turn(text="And now?")
    check_turn_tail(r2.events)
    assert not st.pending_frames  # the next turn took it
    s.close()
