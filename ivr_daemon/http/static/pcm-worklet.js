// The microphone as 16 kHz mono PCM16: an AudioWorklet processor, on the audio rendering thread.
//
// The AudioContext runs at the device's rate (48 kHz, 44.1 kHz...). Each input block is low-pass
// filtered below the target's Nyquist frequency (a windowed-sinc FIR at the input rate: without
// it, what lies above 8 kHz would fold back into the speech band), then read at the target rate by
// linear interpolation between filtered samples (fine there: they hold nothing near the input's
// Nyquist). Samples go out as little-endian Int16 in chunks of `chunkSamples` (100 ms), each
// ArrayBuffer transferred to the page, which sends it as one binary WebSocket message.

const TAPS = 95; // odd: symmetric, a whole-sample delay

function lowPass(inputRate, cutoffHz) {
  const taps = new Float32Array(TAPS);
  const middle = (TAPS - 1) / 2;
  const fc = cutoffHz / inputRate; // cycles per sample
  let sum = 0;
  for (let n = 0; n < TAPS; n++) {
    const x = n - middle;
    const sinc = x === 0 ? 2 * fc : Math.sin(2 * Math.PI * fc * x) / (Math.PI * x);
    const blackman = 0.42 - 0.5 * Math.cos((2 * Math.PI * n) / (TAPS - 1)) + 0.08 * Math.cos((4 * Math.PI * n) / (TAPS - 1));
    taps[n] = sinc * blackman;
    sum += taps[n];
  }
  for (let n = 0; n < TAPS; n++) taps[n] /= sum; // unity gain at 0 Hz
  return taps;
}

class Pcm16Capture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = (options && options.processorOptions) || {};
    this.targetRate = o.targetRate || 16000;
    this.chunkSamples = o.chunkSamples || 1600;
    this.step = sampleRate / this.targetRate; // input samples per output sample
    this.taps = this.step > 1 ? lowPass(sampleRate, 0.45 * this.targetRate) : null;
    this.ring = new Float32Array(TAPS * 2); // the last TAPS inputs, twice over: no wrap in the loop
    this.ringAt = 0;
    this.position = 0; // where the next output sample lies, in input samples after `previous`
    this.previous = 0; // the last filtered sample
    this.out = new Int16Array(this.chunkSamples);
    this.outAt = 0;
    this.running = true;
    this.port.onmessage = (event) => { if (event.data === "stop") { this.flush(); this.running = false; } };
  }

  filtered(x) {
    if (!this.taps) return x;
    const ring = this.ring;
    ring[this.ringAt] = x;
    ring[this.ringAt + TAPS] = x;
    this.ringAt = (this.ringAt + 1) % TAPS;
    const taps = this.taps;
    let y = 0;
    for (let n = 0, at = this.ringAt; n < TAPS; n++, at++) y += taps[n] * ring[at];
    return y;
  }

  emit(value) {
    const clipped = value > 1 ? 1 : value < -1 ? -1 : value;
    this.out[this.outAt++] = clipped < 0 ? clipped * 0x8000 : clipped * 0x7fff;
    if (this.outAt === this.chunkSamples) this.flush();
  }

  flush() {
    if (this.outAt === 0) return;
    const chunk = this.out.slice(0, this.outAt); // Int16Array: little-endian on every browser's platform
    this.port.postMessage(chunk.buffer, [chunk.buffer]);
    this.outAt = 0;
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (!channel || !this.running) return this.running;
    for (let i = 0; i < channel.length; i++) {
      const y = this.filtered(channel[i]);
      // Output samples between the previous filtered sample (0) and this one (1).
      while (this.position <= 1) {
        this.emit(this.previous + (y - this.previous) * this.position);
        this.position += this.step;
      }
      this.position -= 1;
      this.previous = y;
    }
    return true;
  }
}

registerProcessor("pcm16-capture", Pcm16Capture);
