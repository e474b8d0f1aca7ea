"""Vision off the critical path: images and camera frames are encoded as they arrive (vision_stage.py),
the turn start pays only for what is left, and the answer is the same as when everything is encoded
at the turn start (`vision_tiles_per_tick=0`, the behaviour before)."""
import time

import numpy as np
import pytest
import torch

from vita_engine.runtime.state import Visual

from runtime_util import check_turn_tail, make_engine, one_thread  # noqa: F401


def _frames(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (64 + 8 * i, 80, 3), dtype=np.uint8) for i in range(n)]


def _wait_encoded(st, n_visuals, timeout=30.0):
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        vs = list(st.pending_images) + list(st.pending_frames)
        # all of them: a visual still in the session's inbox is not pending yet
        if len(vs) == n_visuals and all(v.feats is not None for v in vs):
            return True
        time.sleep(0.02)
    return False


def _turn(engine, frames, image, pre_encode):
    s = engine.session(seed=5)
    for i, f in enumerate(frames):
        s.push_video_frame(f, timestamp=0.5 * i)
    if image is not None:
        s.push_image(image)
    st = s._state
    if pre_encode:
        assert _wait_encoded(st, len(frames) + (image is not None)), "the vision stage did not encode the pushed visuals"
        assert all(v.pv is None for v in (*st.pending_images, *st.pending_frames)), "pixels kept after encoding"
    r = s.run_turn(text="What do you see?")
    check_turn_tail(r.events)
    s.close()
    return r


@pytest.mark.parametrize("what", ["frames", "image", "both"])
def test_encoded_on_arrival_same_answer(tiny_ckpt, one_thread, what):  # noqa: F811
    frames = _frames(6) if what in ("frames", "both") else []
    image = np.random.default_rng(1).integers(0, 256, (200, 300, 3), dtype=np.uint8) if what != "frames" else None
    early = make_engine(tiny_ckpt, max_new_tokens=8)
    late = make_engine(tiny_ckpt, max_new_tokens=8, vision_tiles_per_tick=0)
    try:
        a = _turn(early, frames, image, pre_encode=True)
        b = _turn(late, frames, image, pre_encode=False)
        # every tile ahead of the turn with the stage on; every used one at the turn start without
        assert early._scheduler.vision_stage.tiles > 0 and early._scheduler.life.start_tiles == 0
        assert late._scheduler.vision_stage.tiles == 0 and late._scheduler.life.start_tiles > 0
    finally:
        early.close()
        late.close()
    assert a.text == b.text and a.text
    np.testing.assert_array_equal(a.audio, b.audio)
    assert "vision_ms" in a.metrics and "vision_ms" in b.metrics


def test_frames_selected_after_encoding_are_the_right_ones(tiny_ckpt, one_thread):  # noqa: F811
    """More frames than max_video_frames, pushed out of timestamp order: the turn uses the frames at
    the linspace positions of the timestamp order, whether encoded early or at the turn start."""
    frames = _frames(9, seed=3)
    order = [4, 0, 8, 2, 6, 1, 3, 7, 5]
    e = make_engine(tiny_ckpt, max_new_tokens=4)
    try:
        s = e.session(seed=1)
        for i in order:
            s.push_video_frame(frames[i], timestamp=float(i))
        st = s._state
        assert _wait_encoded(st, len(order))
        chosen = []
        life = e._scheduler.life
        orig = life.start_turn

        def spy(st_, kind, **kw):
            fr = sorted(st_.pending_frames, key=lambda v: v.ts)
            chosen.append([v.ts for v in fr])
            return orig(st_, kind, **kw)

        life.start_turn = spy
        r = s.run_turn(text="Describe it.")
        check_turn_tail(r.events)
        assert chosen and chosen[0] == [float(i) for i in range(9)]
        s.close()
    finally:
        e.close()


def test_policy_defers_vision_while_first_audio_is_due(tiny_ckpt, one_thread):  # noqa: F811
    e = make_engine(tiny_ckpt)
    try:
        p = e._scheduler.policy
        assert p.vision_tiles(urgent=True) == 0
        assert p.vision_tiles(urgent=False) == e.options["vision_tiles_per_tick"] == 8
    finally:
        e.close()
    with pytest.raises(ValueError, match="vision_tiles_per_tick"):
        make_engine(tiny_ckpt, vision_tiles_per_tick=-1)


def test_budget_bounds_tiles_per_tick(tiny_ckpt, one_thread):  # noqa: F811
    """A 5-tile image (pixel_values pushed as they are) does not fit a 4-tile budget: it waits for its
    turn start (never split); a 1-tile frame pushed after it is encoded at once."""
    e = make_engine(tiny_ckpt, max_new_tokens=4, vision_tiles_per_tick=4)
    try:
        s = e.session()
        s.push_image(torch.randn(5, 3, 56, 56, generator=torch.Generator().manual_seed(2)))
        s.push_video_frame(_frames(1)[0], timestamp=0.0)
        st = s._state
        t_end = time.monotonic() + 20
        while time.monotonic() < t_end and not (st.pending_frames and st.pending_frames[0].feats is not None):
            time.sleep(0.02)
        img = st.pending_images[0]
        assert isinstance(img, Visual) and img.tiles > 4
        assert st.pending_frames[0].feats is not None and img.feats is None
        r = s.run_turn(text="And now?")
        check_turn_tail(r.events)
        assert e._scheduler.life.start_tiles == img.tiles  # the image, at the turn start; the frame was ready
        s.close()
    finally:
        e.close()
