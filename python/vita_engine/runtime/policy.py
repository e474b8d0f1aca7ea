"""What runs in each scheduler tick (the policy), apart from how each stage does its work.

The stages (turns.py, llm_stage.py, tts_stage.py, codec_stage.py) ask this module three questions:
which LLM rows run this tick, how many TTS AR steps each stream gets, and when a codec window is
pushed. Change the scheduling here without reading the stages.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

from .state import SessionState

__all__ = ["Policy"]


class Policy:
    def __init__(self, options: Dict, codec=None):
        self.prefill_chunk_tokens = int(options["prefill_chunk_tokens"])

    # ---- LLM ---------------------------------------------------------------------------------------
    def llm_rows(self, states: List[SessionState]) -> Tuple[List[SessionState], List[Tuple[SessionState, int]]]:
        """-> (sessions that get a decode row, [(session, prefill tokens)]) for this tick's one LLM forward.
        Every answering session decodes one token; prefill chunks of new turns fill `prefill_chunk_tokens`,
        oldest turn first (a long prompt never stalls decoding)."""
        decode = [st for st in states if st.turn is not None and st.turn.state == "decode" and not st.turn.llm_done]
        prefill: List[Tuple[SessionState, int]] = []
        budget = self.prefill_chunk_tokens
        for st in sorted(states, key=lambda s: s.turn.clock.t.get("created", 0) if s.turn else 0):
            t = st.turn
            if budget <= 0:
                break
            if t is None or t.state != "prefill":
                continue
            n = min(budget, t.x.shape[0] - t.prefilled)
            prefill.append((st, n))
            budget -= n
        return decode, prefill
