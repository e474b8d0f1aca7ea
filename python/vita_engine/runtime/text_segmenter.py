"""Text -> TTS handoff policy (spec §5 "Text normalisation before TTS", docs/architecture.md §5 "text is handed to
the TTS as soon as a first segment exists").

`normalize_tts_text(text)` is the reference normalisation: special tokens (`<|im_end|>`,
`<|endoftext|>`, any `<|...|>`) are removed, then `lower()`. VITA's answer-state markers `☞ ☟ ☜`
(spec §1: the server strips a leading `☞`) are removed too, so they never reach the TTS. The reference's rewrite of simple
equations into Chinese words is NOT implemented (text passes through unchanged there).

`TextSegmenter` turns the LLM's streamed text pieces (one `push` per decoded token piece) into TTS
segments:

* the FIRST segment of an answer is handed over as soon as it holds `first_min_chars` characters
  OR `first_min_tokens` pushed pieces OR reaches one of the `punctuation` characters (whichever
  comes first; it must contain at least one letter/digit). When cut for length rather than at
  punctuation, the cut goes before the last whitespace so a word split across tokens is not torn
  apart (CJK text, or a buffer ending in whitespace, is cut whole). As in the reference, `,`/`，`
  in the first segment become `。`;
* LATER segments are cut at the first `punctuation` character at which the segment holds at least
  `min_chars` characters (the reference rule: split at `, ， . 。 ? \\n ？ ! ！ 、` once >= 5
  characters are buffered). A `.` between digits ("3.14") is not a boundary. A segment longer than
  `max_chars` without punctuation is cut at its last whitespace (bounds the TTS prefix length);
* `flush()` (end of the answer) returns the remainder and re-arms the early first segment for the
  next answer; `reset()` drops everything (barge-in).

Segments are normalised (`normalize_tts_text`) but not stripped: like the reference, a segment
after a punctuation cut starts with the space that followed it. Segments with no letter/digit
(e.g. a lone "。") are merged into what follows, or dropped at `flush`.

Defaults: first_min_chars = 10, first_min_tokens = 4 (about 50 ms of LLM decode at 80 tok/s;
a few words are enough for a natural first TTS window while keeping time-to-first-audio low),
min_chars = 5 (reference), max_chars = 120 (fits the TTSBatchDecoder default page budget of 64
text tokens per segment), punctuation = `, ， . 。 ? \\n ？ ! ！ 、` (reference).
"""
from __future__ import annotations

import re
from typing import List, Optional

__all__ = ["normalize_tts_text", "TextSegmenter", "DEFAULT_PUNCTUATION"]

DEFAULT_PUNCTUATION = ",，.。?\n？!！、"

_SPECIAL = re.compile(r"<\|.*?\|>", re.S)
_MARKERS = str.maketrans("", "", "☞☟☜")


def normalize_tts_text(text: str) -> str:
    """Remove special tokens (`<|...|>`) and the `☞ ☟ ☜` markers (a `☞` with the space after it, as
    web_demo/server.py does), lower-case (the reference's equation-to-Chinese rewrite is omitted).
    Other whitespace is kept: the reference hands the TTS its text as cut, leading space included."""
    return _SPECIAL.sub("", text).replace("\u261e ", "").translate(_MARKERS).lower()


def _has_word(s: str) -> bool:
    return any(ch.isalnum() for ch in s)


def _is_cjk(ch: str) -> bool:
    o = ord(ch)
    return 0x2E80 <= o <= 0x9FFF or 0xAC00 <= o <= 0xD7AF or 0xF900 <= o <= 0xFAFF or 0x3000 <= o <= 0x303F or 0xFF00 <= o <= 0xFFEF


class TextSegmenter:
    """See the module docstring. `push(piece) -> [segments]`, `flush() -> [segments]`."""

    def __init__(self, first_min_chars: Optional[int] = 10, first_min_tokens: Optional[int] = 4,
                 punctuation: str = DEFAULT_PUNCTUATION, *, min_chars: int = 5, max_chars: int = 120,
                 first_comma_to_period: bool = True):
        if not punctuation:
            raise ValueError("TextSegmenter: punctuation must not be empty")
        if min_chars < 1 or max_chars < min_chars:
            raise ValueError(f"TextSegmenter: need 1 <= min_chars <= max_chars, got {min_chars}, {max_chars}")
        self.first_min_chars = first_min_chars
        self.first_min_tokens = first_min_tokens
        self.punctuation = set(punctuation)
        self.min_chars = int(min_chars)
        self.max_chars = int(max_chars)
        self.first_comma_to_period = first_comma_to_period
        self.reset()

    def reset(self) -> None:
        """Drop buffered text and start a new answer (the next segment is a first segment)."""
        self._raw = ""  # not yet normalised (may end in a partial special token)
        self._buf = ""  # normalised, not yet emitted
        self._tokens = 0  # pieces pushed since the last emitted segment
        self._first = True

    @property
    def first_pending(self) -> bool:
        """True until the first segment of the current answer has been handed over."""
        return self._first

    # ---- input -----------------------------------------------------------------------------------
    def push(self, text_piece: str) -> List[str]:
        if not isinstance(text_piece, str):
            raise TypeError(f"TextSegmenter.push: expected str, got {type(text_piece).__name__}")
        self._tokens += 1
        self._raw += text_piece
        # keep a trailing partial special token ("<|im_" ... "end|>") raw until it completes
        cut = self._raw.rfind("<|")
        if cut >= 0 and self._raw.find("|>", cut) < 0:
            ready, self._raw = self._raw[:cut], self._raw[cut:]
        else:
            ready, self._raw = self._raw, ""
        self._buf += normalize_tts_text(ready)
        return self._drain(final=False)

    def flush(self) -> List[str]:
        """End of the answer: everything left (an unfinished special token is dropped)."""
        self._buf += normalize_tts_text(_SPECIAL.sub("", self._raw).split("<|")[0])
        self._raw = ""
        out = self._drain(final=True)
        rest = self._buf
        self._buf = ""
        if _has_word(rest):
            out.append(self._emit(rest))
        self.reset()
        return out

    # ---- policy ----------------------------------------------------------------------------------
    def _emit(self, seg: str) -> str:
        if self._first and self.first_comma_to_period:
            seg = seg.replace("，", "。").replace(",", "。")
        self._first = False
        self._tokens = 0
        # not stripped: web_demo/server.py::tts_worker tokenizes the segment as cut, so a later
        # segment starts with the space after the previous punctuation (" world." -> " world" token)
        return seg

    def _boundary(self, i: int, final: bool) -> Optional[bool]:
        """Is buf[i] (a punctuation char) a boundary? None = undecidable yet (needs the next char)."""
        b = self._buf
        if b[i] == "." and i > 0 and b[i - 1].isdigit():
            if i + 1 >= len(b):
                return True if final else None
            return not b[i + 1].isdigit()
        return True

    def _drain(self, final: bool) -> List[str]:
        out: List[str] = []
        while self._buf:
            cut = self._next_cut(final)
            if cut is None:
                break
            seg, self._buf = self._buf[:cut], self._buf[cut:]
            if _has_word(seg):
                out.append(self._emit(seg))
            else:  # nothing speakable: keep it in front of what follows
                self._buf = seg + self._buf
                break
        return out

    def _next_cut(self, final: bool) -> Optional[int]:
        b = self._buf
        need = 1 if self._first else self.min_chars
        for i, ch in enumerate(b):
            # the reference counts every character buffered (len(tts_input_text) >= 5), spaces included
            if ch in self.punctuation and len(b[: i + 1]) >= need and _has_word(b[: i + 1]):
                ok = self._boundary(i, final)
                if ok is None:
                    return None
                if ok:
                    return i + 1
        n = len(b.strip())
        if self._first:
            long_enough = (self.first_min_chars is not None and n >= self.first_min_chars) or \
                          (self.first_min_tokens is not None and self._tokens >= self.first_min_tokens)
            if long_enough and _has_word(b):
                return self._soft_cut(b)
        elif n > self.max_chars:
            return self._soft_cut(b)
        return None

    @staticmethod
    def _soft_cut(b: str) -> int:
        """Cut before the last inner whitespace (the text after it may be a word still being
        generated; the space goes with it, as after a punctuation cut); the whole buffer when it ends
        in whitespace or CJK, or has no inner whitespace."""
        if b[-1].isspace() or _is_cjk(b[-1]):
            return len(b)
        j = max(b.rfind(" "), b.rfind("\t"))
        if j <= 0 or not _has_word(b[:j]):
            return len(b)
        return j
