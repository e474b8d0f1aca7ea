// vita-engine microphone capture: an AudioWorkletProcessor that low-pass filters the input,
// resamples it to the target rate (16 kHz) and posts PCM16 chunks (default 20 ms) to the page,
// each with its RMS level (used by the page for voice barge-in).
//
// Downsampling: windowed-sinc FIR low-pass at 0.45 * target rate (anti-aliasing), then
// fractional-step linear interpolation between the filtered samples. When the context already
// runs at the target rate the input is passed through unchanged.

class VitaCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = (options && options.processorOptions) || {};
    this.target = o.targetRate || 16000;
    this.chunk = Math.round(this.target * (o.chunkMs || 20) / 1000);
    this.ratio = sampleRate / this.target; // input samples per output sample
    this.out = new Int16Array(this.chunk);
    this.outLen = 0;
    this.sumSq = 0;
    // FIR low-pass (Blackman-windowed sinc), only when downsampling.
    this.taps = null;
    if (this.ratio > 1.0001) {
      const n = 2 * Math.ceil(4 * this.ratio) + 1; // ~4 output periods wide
      const fc = 0.45 * this.target / sampleRate; // normalized cutoff (cycles/sample)
      const taps = new Float32Array(n);
      const m = (n - 1) / 2;
      let sum = 0;
      for (let i = 0; i < n; i++) {
        const x = i - m;
        const sinc = x === 0 ? 2 * fc : Math.sin(2 * Math.PI * fc * x) / (Math.PI * x);
        const w = 0.42 - 0.5 * Math.cos(2 * Math.PI * i / (n - 1)) + 0.08 * Math.cos(4 * Math.PI * i / (n - 1));
        taps[i] = sinc * w;
        sum += taps[i];
      }
      for (let i = 0; i < n; i++) taps[i] /= sum;
      this.taps = taps;
      this.hist = new Float32Array(n); // circular history of raw input
      this.histPos = 0;
    }
    this.prev = 0; // last filtered sample (for interpolation across blocks)
    this.pos = 0; // fractional position of the next output sample, relative to `prev`'s index + 1 - 1
    this.enabled = true;
    this.port.onmessage = (e) => {
      if (e.data && e.data.type === "enable") this.enabled = !!e.data.value;
    };
  }

  filter(x) {
    const h = this.hist, t = this.taps, n = t.length;
    h[this.histPos] = x;
    this.histPos = (this.histPos + 1) % n;
    let acc = 0, j = this.histPos;
    for (let i = 0; i < n; i++) {
      acc += t[i] * h[j];
      j = j + 1 === n ? 0 : j + 1;
    }
    return acc;
  }

  emit(v) {
    const s = Math.max(-1, Math.min(1, v));
    this.sumSq += s * s;
    this.out[this.outLen++] = s < 0 ? Math.round(s * 32768) : Math.round(s * 32767);
    if (this.outLen === this.chunk) {
      const rms = Math.sqrt(this.sumSq / this.chunk);
      const buf = this.out.buffer;
      this.port.postMessage({ type: "pcm", pcm: buf, rms }, [buf]);
      this.out = new Int16Array(this.chunk);
      this.outLen = 0;
      this.sumSq = 0;
    }
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0 || !this.enabled) return true;
    const ch = input[0];
    if (!this.taps) { // context already at the target rate
      for (let i = 0; i < ch.length; i++) this.emit(ch[i]);
      return true;
    }
    // Output sample k lies at input position k * ratio; `pos` is that position measured from
    // the sample before this block's first one (the stored `prev`).
    for (let i = 0; i < ch.length; i++) {
      const cur = this.filter(ch[i]);
      // the segment between prev (at 0) and cur (at 1)
      while (this.pos <= 1) {
        this.emit(this.prev + (cur - this.prev) * this.pos);
        this.pos += this.ratio;
      }
      this.pos -= 1;
      this.prev = cur;
    }
    return true;
  }
}

registerProcessor("vita-capture", VitaCapture);
