"""Chat template, system prompts and tokenisation for VITA-1.5 (spec §1).

`<|im_start|>system\n{SYS}<|im_end|>\n<|im_start|>user\n{msg}<|im_end|>\n<|im_start|>assistant\n`
with `<image>` -> -200 (one per tile/frame) and `<audio>` -> -500 (one per clip) placeholder ids,
expanded by `VitaModel.splice`. A session's KV cache holds the history, so each turn only encodes
its own block: on turns after the first, the previous answer is closed first with `<|im_end|>\n`
(the eos the model sampled is never fed back).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from ..model.vita import AUDIO_TOKEN_INDEX, IMAGE_TOKEN_INDEX

__all__ = ["SYSTEM_LANG", "SYSTEM_IMAGE", "SYSTEM_VIDEO", "ChatFormat", "IncrementalDetokenizer", "system_prompt_for"]

_BASE = ("You are an AI robot and your name is VITA. \n- You are a multimodal large language model developed by the "
         "open source community. Your aim is to be helpful, honest and harmless. \n- You support the ability to "
         "communicate fluently and answer user questions in multiple languages of the user's choice. \n- If the user "
         "corrects the wrong answer you generated, you will apologize and discuss the correct answer with the user.")
SYSTEM_LANG = _BASE
# conversation.py::conv_qwen2p5_instruct: the image/video prompts continue the base with " \n- " (a space
# before the newline, as every other line break of the prompt has)
SYSTEM_IMAGE = _BASE + (" \n- You must answer the question strictly according to the content of the image given by the user, "
                        "and it is strictly forbidden to answer the question without the content of the image. Please note "
                        "that you are seeing the image, not the video.")
SYSTEM_VIDEO = _BASE + (" \n- You must answer the question strictly according to the content of the video given by the user, "
                        "and it is strictly forbidden to answer the question without the content of the video. Please note "
                        "that you are seeing the video, not the image.")


def system_prompt_for(modality: str) -> str:
    return {"image": SYSTEM_IMAGE, "video": SYSTEM_VIDEO}.get(modality, SYSTEM_LANG)


class ChatFormat:
    def __init__(self, model_path, eos_ids: Optional[List[int]] = None):
        from tokenizers import Tokenizer

        p = Path(model_path) / "tokenizer.json"
        if not p.is_file():
            raise FileNotFoundError(f"{p}: the checkpoint has no tokenizer.json (needed for the chat template)")
        self.tok = Tokenizer.from_file(str(p))
        self.im_start = self._special("<|im_start|>")
        self.im_end = self._special("<|im_end|>")
        eos = {self.im_end, self.im_start}
        eot = self.tok.token_to_id("<|endoftext|>")
        if eot is not None:
            eos.add(eot)
        eos.update(eos_ids or [])
        self.stop_ids = eos

    def _special(self, s: str) -> int:
        i = self.tok.token_to_id(s)
        if i is None:
            raise ValueError(f"tokenizer.json has no {s} token (a Qwen2.5 chat tokenizer is required)")
        return i

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids: List[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def system_ids(self, system: str) -> List[int]:
        return self.encode(f"<|im_start|>system\n{system}<|im_end|>\n")

    def turn_ids(self, message: str, *, system: Optional[str], close_previous: bool) -> List[int]:
        """Token ids of one user turn up to the assistant header, with -200/-500 for <image>/<audio>."""
        head = ""
        if close_previous:
            head += "<|im_end|>\n"
        if system is not None:
            head += f"<|im_start|>system\n{system}<|im_end|>\n"
        text = head + "<|im_start|>user\n" + message + "<|im_end|>\n<|im_start|>assistant\n"
        ids: List[int] = []
        import re

        for part in re.split(r"(<image>|<audio>)", text):
            if part == "<image>":
                ids.append(IMAGE_TOKEN_INDEX)
            elif part == "<audio>":
                ids.append(AUDIO_TOKEN_INDEX)
            elif part:
                ids.extend(self.encode(part))
        return ids

    def user_prefix_ids(self, n_images: int) -> List[int]:
        """The ids that start every user turn with `n_images` (> 0) image placeholders: `<|im_start|>user\\n`
        then -200 per tile/frame. `turn_ids` splits the text at `<image>`, so they are the first ids of
        `turn_ids(user_message(n_images, audio, text))` whatever the text and audio that follow."""
        return self.encode("<|im_start|>user\n") + [IMAGE_TOKEN_INDEX] * int(n_images)

    @staticmethod
    def user_message(n_images: int, audio: bool, text: Optional[str]) -> str:
        """Image/frame placeholders first, then the text question, then audio: video_audio_demo.py builds
        `"<image>" * n + "\n" + question + "<audio>"`, web_demo/server.py `"<image>" * n + "<audio>"` for
        a spoken turn (no question, no newline)."""
        m = "<image>" * n_images
        if text:
            m += ("\n" if n_images else "") + text
        if audio:
            m += "<audio>"
        return m


class IncrementalDetokenizer:
    """Text deltas from a growing token list.

    Each `push(tok)` decodes the accumulated ids with the tokenizer and returns only the new STABLE
    suffix: a trailing run of U+FFFD (the bytes of a multi-byte character split across tokens, not
    yet complete) is held back until a later token completes it. `flush()` (end of the answer) returns
    what is still held, so the concatenation of all deltas equals `fmt.decode(ids)` exactly (with a
    leading `☞` answer marker and the spaces after it stripped, spec §1), and a delta contains U+FFFD
    only where the full decode does. Never decodes a token alone."""

    def __init__(self, fmt: ChatFormat):
        self.fmt, self.ids, self.text = fmt, [], ""
        self.mismatches = 0  # decodes that rewrote already emitted text (never for byte-level BPE)

    def _decoded(self) -> str:
        full = self.fmt.decode(self.ids)
        if full.startswith("\u261e"):
            full = full.lstrip("\u261e").lstrip(" ")
        return full

    def _delta(self, stable: str) -> str:
        if stable.startswith(self.text):
            delta = stable[len(self.text):]
            self.text = stable
            return delta
        if len(stable) <= len(self.text) and self.text.startswith(stable):
            return ""  # held back more than before (cannot happen for UTF-8 lossy decoding)
        self.mismatches += 1  # the tokenizer rewrote emitted text: emit nothing older, keep going
        return ""

    def push(self, tok: int) -> str:
        self.ids.append(int(tok))
        full = self._decoded()
        # a trailing U+FFFD run may be an incomplete character: hold it back until it completes
        return self._delta(full.rstrip("\ufffd"))

    def flush(self) -> str:
        """The held-back tail (end of the answer): whatever the full decode has beyond the emitted text."""
        if not self.ids:
            return ""
        return self._delta(self._decoded())
