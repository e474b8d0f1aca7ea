"""Media for one WebRTC call: the outgoing Opus track (the realtime handler's `audio_out`) and the
incoming microphone (Opus 48 kHz -> float32 16 kHz mono for the handler)."""
from __future__ import annotations

import asyncio
import collections
import fractions
import logging
import time
from typing import Callable, Optional

import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

log = logging.getLogger("vita_engine.server.webrtc")

OUT_RATE = 24000  # the engine's output rate; Opus encodes it as is (RTP clock stays 48 kHz)
FRAME = 480  # 20 ms at 24 kHz: one Opus packet
RTP_STEP = 960  # the same 20 ms on the 48 kHz RTP clock
RTP_TIME_BASE = fractions.Fraction(1, 48000)


class OpusOutTrack(MediaStreamTrack):
    """The answer's audio, encoded to Opus here (mono, `bitrate` VBR, 20 ms packets) and paced to real
    time: aiortc's sender pulls a packet whenever it has sent the last one, so `recv` waits for the
    packet's slot on a monotonic clock. Underrun plays silence (the stream never stops, so the
    browser's jitter buffer stays primed and its echo canceller keeps its reference).

    The realtime handler's `audio_out`: `write(pcm, item_id)` queues audio, `clear()` drops
    everything queued at once (barge-in) and says how much of the current item was played,
    `played_ms()` the same without clearing. "Played" = handed to the network, which is what the
    listener hears one network+jitter-buffer delay later. The current item is the one written last:
    until its first sample goes out, 0 ms of it were played."""

    kind = "audio"

    def __init__(self, bitrate: int = 32000, prebuffer_ms: float = 20.0) -> None:
        super().__init__()
        import av

        self._codec = av.CodecContext.create("libopus", "w")
        self._codec.bit_rate = int(bitrate)
        self._codec.format = "s16"
        self._codec.layout = "mono"
        self._codec.sample_rate = OUT_RATE
        self._codec.time_base = fractions.Fraction(1, OUT_RATE)
        # CELT only ("restricted low delay"): 2.5 ms of look-ahead instead of 6.5, and digital
        # silence (between answers) in 3-byte packets where "voip" spends 32 bytes on it;
        # constrained VBR holds `bitrate` on noisy audio (plain VBR spent 53 kbit/s at 32 on the
        # tiny model's answers)
        self._codec.options = {"application": "lowdelay", "vbr": "constrained"}
        self._q: collections.deque = collections.deque()  # [item_id, float32 pcm, read offset]
        self.queued = 0  # samples in the queue
        self.item: Optional[str] = None  # the item being played (or last played)
        self.item_played = 0  # its samples sent
        self.playing = False
        self.prebuffer = int(prebuffer_ms * OUT_RATE / 1000)
        self._wait_since: Optional[float] = None  # when queued audio first waited for the prebuffer
        self._wake = asyncio.Event()  # set by write(): enough audio to start playing
        self.written: Optional[str] = None  # the item written last (the current one)
        self._t0: Optional[float] = None
        self._n = 0  # packets sent
        self._pts = 0
        # statistics (tests, bench)
        self.packets = self.audio_packets = self.bytes = self.audio_bytes = 0
        self.gaps = 0  # times an item's audio ran dry and then resumed (an audible gap)
        self.sent_samples = collections.Counter()  # item_id -> samples sent
        self.first_written: dict = {}  # item_id -> monotonic time of its first write / first packet out
        self.first_sent: dict = {}

    # -- the handler's side -----------------------------------------------------------------------
    def write(self, pcm24k: np.ndarray, item_id: str) -> None:
        x = np.asarray(pcm24k, dtype=np.float32).reshape(-1)
        if x.size:
            self.first_written.setdefault(item_id, time.monotonic())
            self.written = item_id
            self._q.append([item_id, x, 0])
            self.queued += x.size
            if not self.playing and self.queued >= self.prebuffer:
                self._wake.set()

    def clear(self) -> float:
        """Drop the queue now (nothing more of it is sent) -> ms of the current item played."""
        played = self.played_ms()
        self._q.clear()
        self.queued = 0
        self._wait_since = None
        self.playing = False
        return played

    def played_ms(self) -> float:
        if self.written is not None and self.written != self.item:
            return 0.0  # the current item has not started playing
        return self.item_played * 1000.0 / OUT_RATE

    # -- aiortc's side ----------------------------------------------------------------------------
    async def recv(self):
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
        else:
            self._n += 1
            wait = self._t0 + self._n * 0.020 - now
            if wait > 0 and not self.playing:
                # idle (silence): an answer that starts now goes out now, not at the next 20 ms
                # slot; the clock moves to it (the receiver sees up to 20 ms of jitter, once)
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                    self._t0 = time.monotonic() - self._n * 0.020
                except asyncio.TimeoutError:
                    pass
            elif wait > 0:
                await asyncio.sleep(wait)
            elif wait < -0.2:  # the loop was stalled: start a new clock rather than send a burst
                self._t0, self._n = now, 0
        if self.readyState != "live":
            raise MediaStreamError
        return self._packet(self._take())

    def _take(self) -> np.ndarray:
        out = np.zeros(FRAME, np.float32)
        if not self.playing:
            if not self.queued:
                return out
            # start once `prebuffer` is queued (or its first sample waited that long): an underrun
            # right after the start would be an audible gap
            t = time.monotonic()
            self._wait_since = self._wait_since or t
            if self.queued < self.prebuffer and t - self._wait_since < self.prebuffer / OUT_RATE:
                return out
            self.playing, self._wait_since = True, None
            if self._q[0][0] == self.item and self.item_played:
                self.gaps += 1  # the item ran dry and resumes: the listener heard a gap
        n = 0
        while n < FRAME and self._q:
            ent = self._q[0]
            item, x, off = ent
            if item != self.item:
                self.item, self.item_played = item, 0
            k = min(FRAME - n, x.size - off)
            out[n:n + k] = x[off:off + k]
            n += k
            self.item_played += k
            self.sent_samples[item] += k
            self.first_sent.setdefault(item, time.monotonic())
            self.queued -= k
            if off + k >= x.size:
                self._q.popleft()
            else:
                ent[2] = off + k
        if not self._q:
            self.playing = False
        return out

    def _packet(self, pcm: np.ndarray):
        import av

        x = np.round(np.clip(pcm, -1.0, 1.0) * 32767).astype(np.int16)[None, :]
        frame = av.AudioFrame.from_ndarray(x, format="s16", layout="mono")
        frame.sample_rate = OUT_RATE
        frame.pts = self._pts // 2
        frame.time_base = fractions.Fraction(1, OUT_RATE)
        pkts = self._codec.encode(frame)
        pkt = pkts[0] if pkts else av.Packet(b"\xf8\xff\xfe")  # an Opus 20 ms silence frame
        # our own RTP timeline: one 20 ms step per packet, whatever the encoder's pts
        pkt.pts = self._pts
        pkt.time_base = RTP_TIME_BASE
        self._pts += RTP_STEP
        self.packets += 1
        self.bytes += pkt.size
        if np.any(pcm):
            self.audio_packets += 1
            self.audio_bytes += pkt.size
        return pkt

    def stop(self) -> None:
        self._q.clear()
        self.queued = 0
        super().stop()


class MicInput:
    """Reads the caller's audio track: every decoded frame (48 kHz s16, stereo or mono) becomes
    float32 16 kHz mono, handed to `sink` at once. `last_rx` (monotonic) is when the last frame
    came: the call's watchdog closes a peer that stops sending RTP. `log` keeps (time, decoded 48 kHz
    samples so far) for the first frames: the uplink delay measurement."""

    def __init__(self, track, sink: Callable[[np.ndarray], None], keep_log: int = 0) -> None:
        import soxr

        self.track, self.sink = track, sink
        self._rs = soxr.ResampleStream(48000, 16000, 1, dtype="float32", quality="LQ")
        self.last_rx = time.monotonic()
        self.frames = 0
        self.samples48 = 0
        self.log: list = []
        self.keep_log = keep_log
        self.task: Optional[asyncio.Task] = None

    def start(self) -> "MicInput":
        self.task = asyncio.ensure_future(self._run())
        return self

    async def _run(self) -> None:
        while True:
            try:
                frame = await self.track.recv()
            except MediaStreamError:
                return
            self.last_rx = time.monotonic()
            x = frame.to_ndarray()
            ch = len(frame.layout.channels)
            if x.dtype == np.int16:
                x = x.astype(np.float32) / 32768.0
            x = x.reshape(-1, ch)[:, 0] if x.shape[0] == 1 else x[0]  # packed: interleaved; planar: rows
            sr = frame.sample_rate
            if sr != 48000:
                import soxr

                x = soxr.resample(x, sr, 48000)
            y = self._rs.resample_chunk(np.ascontiguousarray(x, dtype=np.float32))
            self.frames += 1
            self.samples48 += x.size
            if y.size:
                try:
                    self.sink(y)
                except Exception:  # noqa: BLE001  (one bad frame must not end the call's input)
                    log.exception("push_input_audio failed")
            if len(self.log) < self.keep_log:
                self.log.append((time.monotonic(), self.samples48))

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
