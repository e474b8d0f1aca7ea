"""The LLM stage: one batched forward per tick over the rows the policy picked (decode rows of
answering sessions + chunked prefill of new turns + chunks of the next turns' prefixes, prefix_stage.py),
sampling, incremental detokenization, and the text handoff to the TTS segmenter."""
from __future__ import annotations

import logging
import time
import traceback
from typing import List

import torch

from . import _compat
from .batch_llm import LLMWork
from .chat import IncrementalDetokenizer
from .events import TextDelta
from .metrics import nvtx_range
from .stage import Stage
from .state import Segment, SessionState, Turn

log = logging.getLogger(__name__)

__all__ = ["LLMStage"]


class LLMStage(Stage):
    def step(self) -> bool:
        states = list(self.states.values())
        decode, prefill = self.policy.llm_rows(states)
        prefix = self.policy.prefix_rows(states, sum(n for _, n in prefill))
        busy = self._forward(decode, prefill, prefix)
        # back-to-back forwards for the rows on the critical path (the policy says which, and how many)
        for _ in range(self.policy.llm_extra_forwards):
            rows = self.policy.llm_extra_rows(list(self.states.values()))
            if not rows:
                break
            busy |= self._forward(rows, [])
        return busy

    def _forward(self, decode: List[SessionState], prefill: List[tuple], prefix: List[tuple] = ()) -> bool:
        """One batched forward: a decode row per session in `decode`, a prefill chunk per (session, n) of
        `prefill` (its turn's prompt) and of `prefix` (its next turn's prefix: no logits)."""
        work: List[LLMWork] = []
        rows: List[tuple] = []  # (state, turn, kind)
        if decode:
            x = self.model.llm.embed([st.turn.tokens[-1] for st in decode])  # one lookup for every row
            for i, st in enumerate(decode):
                work.append(LLMWork(st.seq, x[i:i + 1]))
                rows.append((st, st.turn, "decode"))
        for st, n in prefill:
            t = st.turn
            last = t.prefilled + n == t.x.shape[0]
            t.clock.mark("prefill_start")  # the first chunk (after the prefix, if the turn has one)
            work.append(LLMWork(st.seq, t.x[t.prefilled:t.prefilled + n], want_logits=last))
            rows.append((st, t, "prefill_last" if last else "prefill"))
            t.prefilled += n
            st.stats["prefill_tokens"] += n
        for st, n in prefix:
            p = st.prefix
            work.append(LLMWork(st.seq, p.x[p.prefilled:p.prefilled + n], want_logits=False))
            rows.append((st, p, "prefix"))
            p.prefilled += n
            st.stats["prefill_tokens"] += n
            st.stats["prefix_tokens"] += n
        if not work:
            return False
        try:
            with nvtx_range("llm_forward", self.nvtx):
                logits = self.sch.llm.forward(work)
        except Exception as ex:
            log.error("LLM forward failed:\n%s", traceback.format_exc())
            for st, t, kind in rows:
                if kind == "prefix":
                    if st.prefix is t:
                        self.sch.prefix_stage.drop(st)
                elif st.turn is t:
                    st.prefix = None  # the KV this forward wrote is not trusted: a rollback drops it all
                    self.sch.life.fail(st, f"LLM forward failed: {type(ex).__name__}: {ex}")
            return True
        want = [(st, t, k) for (st, t, k) in rows if k in ("decode", "prefill_last")]
        if want:
            B = len(want)
            dev = logits.device
            temp = torch.tensor([st.session.temperature for st, _, _ in want], dtype=torch.float32, device=dev)
            topk = torch.tensor([st.session.top_k for st, _, _ in want], dtype=torch.int32, device=dev)
            seed = torch.tensor([st.session.seed for st, _, _ in want], dtype=torch.int64, device=dev)
            step = torch.tensor([st.gen_step for st, _, _ in want], dtype=torch.int64, device=dev)
            from .. import ops

            with nvtx_range("sample", self.nvtx):  # on CUDA: waits for the forward too
                toks = ops.sample_tokens(logits, temperature=temp, top_k=topk, seed=seed, step=step).tolist()
            assert len(toks) == B
        else:
            toks = []
        now = time.perf_counter()
        for (st, t, kind), tok in zip(want, toks):
            st.gen_step += 1
            if st.turn is not t:
                continue
            if kind == "decode":
                t.n_fed += 1
                st.stats["decode_tokens"] += 1
                self.on_token(st, t, tok)
            else:
                t.clock.mark("prefill_end", now)
                st.stats["turn_prefill_tokens"].append(int(t.x.shape[0]) - t.prefix_tokens)  # by the turn itself
                if t.speculative:
                    t.state, t.held_token = "ready", tok
                else:
                    t.state = "decode"
                    self.on_token(st, t, tok)
        return True

    def on_token(self, st: SessionState, t: Turn, tok: int) -> None:
        fmt = self.e.chat
        t.clock.mark("first_token")
        if tok in fmt.stop_ids or t.max_new_tokens <= 0:
            self._llm_done(st, t)
            return
        t.tokens.append(tok)
        if t.detok is None:
            t.detok = IncrementalDetokenizer(fmt)
            t.segmenter = _compat.TextSegmenter()
        self._text(st, t, t.detok.push(tok))
        if len(t.tokens) >= t.max_new_tokens:
            self._llm_done(st, t)

    def _text(self, st: SessionState, t: Turn, delta: str) -> None:
        """One stable text delta: to the client (TextDelta) and to the TTS segmenter (same text)."""
        if delta:
            t.text += delta
            st.session._sink.put(TextDelta(delta, t.idx))
            for seg in t.segmenter.push(delta):
                self.add_segment(st, t, seg, len(t.tokens))

    def _llm_done(self, st: SessionState, t: Turn) -> None:
        t.llm_done = True
        t.state = "speak"
        if t.detok is not None:
            # the answer is over: what the detokenizer held back (an incomplete trailing character) goes out
            self._text(st, t, t.detok.flush())
        if t.segmenter is not None:
            for seg in t.segmenter.flush():
                self.add_segment(st, t, seg, len(t.tokens))
        if self.e.tts is not None and t.text.strip() and not any(g.text_ids for g in t.segments):
            # the answer has text but nothing the segmenter calls speakable (no letter or digit: only
            # symbols, or U+FFFD of invalid bytes, as the random tiny model often answers): speak it as it
            # is rather than ending the turn without audio (pieces of <= 120 characters)
            txt = " ".join(t.text.split())
            for i in range(0, len(txt), 120):
                self.add_segment(st, t, txt[i:i + 120], len(t.tokens))
        # the last sampled token is not fed: it joins the next turn's prompt with <|im_end|>
        st.stats["turn_answer_tokens"] = len(t.tokens)

    def add_segment(self, st: SessionState, t: Turn, text: str, tok_end: int) -> None:
        start = t.segments[-1].tok_end if t.segments else 0
        norm = _compat.normalize_tts_text(text)
        ids = self.e.chat.encode(norm) if norm.strip() else []
        seg = Segment(text=norm, tok_start=start, tok_end=max(start, tok_end), text_ids=ids)
        if not ids or self.e.tts is None:
            seg.tts_done = True
        t.segments.append(seg)
