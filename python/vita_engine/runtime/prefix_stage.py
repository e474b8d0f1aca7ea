"""The prefix stage: the start of a session's next turn prefilled into its KV while the user still
speaks, so the end of turn pays only for the text/audio part.

The chat template puts a turn's image placeholders right after `<|im_start|>user\\n`, before the text
and audio, and `ChatFormat.turn_ids` splits the text at `<image>`; so, while no turn is in flight,
`[close of the previous answer] [system prompt, first turn] <|im_start|>user\\n <image>*n` is known
once the pushed images are encoded (vision_stage.py), whatever the user says next. This stage builds
that `Prefix` (state.py) each tick from the session's state; the LLM stage prefills it in the ticks'
slack (`Policy.prefix_rows`: how many tokens, when); the turn start (`Lifecycle.start_turn`) computes
its prompt exactly as without a prefix and uses the prefix only where the prefilled part is equal,
embedding for embedding, to the start of that prompt (`take`), so a stale prefix can cost time, never
change an answer.

Scope: images only. Camera frames are chosen among all those pushed since the previous turn only when
the turn starts, and come before the images in the message: a pushed frame drops the prefix, and
none is built while frames are pending. A prefix is dropped (its KV truncated) when what it was built
from changes: a frame, a system prompt change, `truncate_answer` trimming the previous answer, a
history change under it (the KV length no longer matches), and when the turn start evicts history.
A discarded speculative turn leaves it in place (nothing before it changed); a later image extends it
(causal prefill: the first images' KV stays valid). A committed turn takes its KV over.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .stage import Stage
from .state import Prefix, SessionState, Turn

__all__ = ["PrefixStage"]


class PrefixStage(Stage):
    built = 0  # prefixes built or extended (a counter for tests)

    def step(self) -> bool:
        """Build, extend or drop each idle session's prefix (no model forward: the LLM stage prefills)."""
        if not getattr(self.policy, "prefix_prefill", False) or self.model.vision is None:
            return False
        busy = False
        for st in self.states.values():
            if st.turn is None and not st.closed:
                busy |= self._refresh(st)
        return busy

    # ---- what a prefix is built from ---------------------------------------------------------------
    def _head_key(self, st: SessionState) -> Tuple:
        """Everything `Lifecycle.prompt_head` reads (the replayed history by identity: it is kept alive
        by the prefix's refs)."""
        first = st.sys_len is None
        return (st.needs_close, tuple(st.unfed_ids), st.sys_len, st.session.system_prompt if first else None,
                id(st.replay_x) if first and st.replay_x is not None else None)

    def _refresh(self, st: SessionState) -> bool:
        p = st.prefix
        if p is not None and (st.seq.length != p.kv_start + p.prefilled or p.head_key != self._head_key(st)):
            self.drop(st)  # the history or the head changed under it
            p = None
        imgs = st.pending_images
        if st.pending_frames or st.system_changed or not imgs:
            if p is not None:
                self.drop(st)
            return False
        if p is not None and len(p.visuals) == len(imgs) and all(a is b for a, b in zip(p.visuals, imgs)):
            return False  # up to date
        if any(v.feats is None for v in imgs):
            return False  # wait for the vision stage
        key = (self._head_key(st), st.seq.length, tuple(id(v) for v in imgs))
        if st.prefix_refused == key:
            return False  # refused before (over the budget), nothing changed since
        feats: List[torch.Tensor] = [f for v in imgs for f in v.feats]
        m = self.model
        x_img = m.splice(self.e.chat.user_prefix_ids(len(feats)), image_features=feats)
        head, _ = self.sch.life.prompt_head(st, "image", x_img)
        x = torch.cat([head, x_img], 0)
        kv_start = st.seq.length - (p.prefilled if p is not None else 0)
        budget = int(self.o["session_max_tokens"])
        if kv_start + x.shape[0] + self.sch.life.default_max_new(st) > budget:
            st.prefix_refused = key  # the turn start would evict history: not worth prefilling (an existing one stays)
            return False
        if p is not None and not (all(a is b for a, b in zip(p.visuals, imgs))
                                  and torch.equal(x[:p.prefilled], p.x[:p.prefilled])):
            self.drop(st)
            p, kv_start = None, st.seq.length
        ends, n = [], head.shape[0] + len(self.e.chat.user_prefix_ids(0))
        for v in imgs:
            n += int(v.feats.shape[0]) * int(v.feats.shape[1])
            ends.append(n)
        q = Prefix(x, kv_start, self._head_key(st), list(imgs), ends, refs=(st.replay_x,))
        q.prefilled = p.prefilled if p is not None else 0
        st.prefix = q
        self.built += 1
        return True

    # ---- used by the lifecycle ---------------------------------------------------------------------
    def drop(self, st: SessionState) -> None:
        """Forget the prefix; with no turn in flight its KV is truncated (a speculative turn built on it
        owns that KV: its rollback truncates to the turn's start)."""
        p = st.prefix
        if p is None:
            return
        st.prefix = None
        st.stats["prefix_dropped"] = st.stats.get("prefix_dropped", 0) + 1
        if st.turn is None:
            st.seq.truncate(min(st.seq.length, p.kv_start))

    def take(self, st: SessionState, x: torch.Tensor) -> int:
        """At a turn start (no turn in flight), `x` the turn's whole prompt: -> how many tokens of x are
        already in the KV. The prefix is used only if its KV ends the sequence and its prefilled part
        equals the start of x exactly; else it is dropped (and x is prefilled whole)."""
        p = st.prefix
        if p is None:
            return 0
        n = p.prefilled
        if st.seq.length == p.kv_start + n and x.shape[0] > n and torch.equal(x[:n], p.x[:n]):
            st.stats["prefix_hits"] = st.stats.get("prefix_hits", 0) + 1
            return n
        st.stats["prefix_misses"] = st.stats.get("prefix_misses", 0) + 1
        self.drop(st)
        return 0

    def kept_after(self, st: SessionState, t: Turn) -> int:
        """Rolling back speculative turn `t`: tokens after t.kv_start that stay in the KV (the prefix t
        was built on, grown by what t prefilled of it; 0 without one)."""
        p: Optional[Prefix] = st.prefix
        if p is None or p.kv_start != t.kv_start:
            st.prefix = None
            return 0
        keep = min(t.prefilled, int(p.x.shape[0]))
        if keep > p.prefilled and torch.equal(t.x[:keep], p.x[:keep]):
            p.prefilled = keep
        return p.prefilled
