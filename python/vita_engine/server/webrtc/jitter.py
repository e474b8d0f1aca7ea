"""A zero-wait audio jitter buffer for aiortc's RTP receiver.

aiortc's audio receiver uses `JitterBuffer(capacity=16, prefetch=4)`: a packet is released only
once 4 later packets have arrived (a frame counts as complete when a packet with another RTP
timestamp follows it, so even prefetch=0 would hold one packet): every uplink frame waits 4 x 20 ms
= 80 ms before decoding (measured in bench/webrtc_bench.py). For audio each RTP packet is a complete Opus frame, so waiting
only buys tolerance to reordering; on a voice uplink, latency matters more: here each packet is
handed to the decoder as it arrives, a duplicate or late (reordered) packet is dropped, and a gap
(lost packets) is left to the Opus decoder, which bridges it. aiortc has no parameter for this:
`install(receiver)` replaces the receiver's (private) buffer, before any packet arrives, and leaves
the stock one when this aiortc version does not have it where expected.
"""
from __future__ import annotations

import logging

from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.utils import uint16_add

log = logging.getLogger("vita_engine.server.webrtc")
_ATTR = "_RTCRtpReceiver__jitter_buffer"  # aiortc 1.x: RTCRtpReceiver.__jitter_buffer
MAX_MISORDER = 100  # a jump back by more than this is a restarted stream, not a late packet


class ImmediateAudioJitterBuffer(JitterBuffer):
    def __init__(self) -> None:
        super().__init__(capacity=16, prefetch=0)
        self._last = None  # sequence number of the last packet released
        self.released = self.dropped = 0

    def add(self, packet):
        seq = packet.sequence_number
        if self._last is not None:
            back = uint16_add(self._last, -seq)  # how far behind the last released packet
            if back < MAX_MISORDER and back <= uint16_add(seq, -self._last):
                self.dropped += 1  # a duplicate (back == 0) or a late packet: already played past it
                return False, None
        self._last = seq
        self.released += 1
        return False, JitterFrame(data=packet._data, timestamp=packet.timestamp)


def install(receiver) -> bool:
    """Give an audio RTCRtpReceiver the immediate jitter buffer -> True, or False (stock kept)."""
    if not isinstance(getattr(receiver, _ATTR, None), JitterBuffer):
        log.warning("this aiortc version keeps no %s: the stock audio jitter buffer (+80 ms) stays", _ATTR)
        return False
    setattr(receiver, _ATTR, ImmediateAudioJitterBuffer())
    return True
