// THL in JavaScript: one exported step (thl-np export --format onnx) run by onnxruntime-web, the state
// arrays kept here between calls, the byte tokenizer, greedy and sampled decoding. No DOM: the page
// (app.mjs), the Node test and the benchmark share this module, and pass in the `ort` namespace they loaded.

export const NUM_BYTES = 256;
export const PAD_ID = 256;
export const EOS_ID = 257;
export const UNK_ID = 258;
export const FORMAT = "thl-np-onnx-step";

const BYTES_PER = { float32: 4, int64: 8, bool: 1 };

// The byte tokenizer of thl_np/tokenizer.py: ids 0..255 are UTF-8 bytes; 256/257/258 are pad/eos/unk and
// exist only when the model's vocabulary has room for them (vocab_size >= 259).
export class ByteTokenizer {
  constructor(vocabSize) {
    this.hasSpecials = vocabSize >= NUM_BYTES + 3;
    this.vocabSize = this.hasSpecials ? NUM_BYTES + 3 : NUM_BYTES;
    this.eosId = this.hasSpecials ? EOS_ID : null;
    // Only ids both the model and the tokenizer know are ever picked (thl_np/generation.py).
    this.limit = Math.min(vocabSize, this.vocabSize);
  }

  encode(text) {
    return Array.from(new TextEncoder().encode(text));
  }

  // Specials decode to nothing; invalid UTF-8 becomes U+FFFD, as Python's errors="replace".
  decode(ids) {
    return new TextDecoder("utf-8").decode(Uint8Array.from(ids.filter((i) => i < NUM_BYTES)));
  }

  // Incremental decoding: a multi-byte character is held back until complete, so streamed pieces
  // concatenate to decode(allIds).
  streamDecoder() {
    const dec = new TextDecoder("utf-8");
    return {
      push: (id) => (id < NUM_BYTES ? dec.decode(Uint8Array.of(id), { stream: true }) : ""),
      flush: () => dec.decode(),
    };
  }
}

// The export's sidecar (OUT.json): onnxruntime-web cannot read ONNX metadata, so the layout comes from it.
export function parseMeta(meta) {
  if (!meta || meta["thl_np.format"] !== FORMAT) {
    throw new Error(`not a thl-np step export's metadata (thl_np.format is not "${FORMAT}")`);
  }
  const asJson = (v) => (typeof v === "string" ? JSON.parse(v) : v);
  const config = asJson(meta["thl_np.config"]);
  const layout = asJson(meta["thl_np.state_layout"]);
  const trace = asJson(meta["thl_np.trace_outputs"] || "[]");
  if (!Array.isArray(layout) || layout.length === 0) throw new Error("the metadata has no state layout");
  for (const row of layout) {
    if (!(row.dtype in BYTES_PER)) throw new Error(`state ${row.name}: dtype ${row.dtype} is not supported`);
  }
  return { config, layout, trace, version: meta["thl_np.version"], weights: meta["thl_np.weights"] };
}

function dims(row, batch) {
  return row.shape.map((d) => (d === "batch" ? batch : d));
}

function count(shape) {
  return shape.reduce((a, b) => a * b, 1);
}

// Bytes of one sequence's state (batch = 1), the figure the page shows.
export function stateBytes(layout) {
  return layout.reduce((sum, row) => sum + count(dims(row, 1)) * BYTES_PER[row.dtype], 0);
}

export function zeroState(ort, layout, batch = 1) {
  const state = {};
  for (const row of layout) {
    const shape = dims(row, batch);
    const n = count(shape);
    const data = row.dtype === "int64" ? new BigInt64Array(n) : row.dtype === "bool" ? new Uint8Array(n)
      : new Float32Array(n);
    if (row.initial) data.fill(row.dtype === "int64" ? BigInt(row.initial) : row.initial);
    state[row.input] = new ort.Tensor(row.dtype, data, shape);
  }
  return state;
}

// One THL sequence (batch 1) on an exported step: feed(id) advances the state and returns the logits.
export class ThlSession {
  static async create(ort, model, meta, options = {}) {
    const parsed = parseMeta(meta);
    const session = await ort.InferenceSession.create(model, { executionProviders: ["wasm"], ...options });
    const missing = parsed.layout.map((r) => r.input).filter((n) => !session.inputNames.includes(n));
    if (missing.length) throw new Error(`the model and its metadata disagree: no input ${missing[0]}`);
    return new ThlSession(ort, session, parsed);
  }

  constructor(ort, session, parsed) {
    this.ort = ort;
    this.session = session;
    this.config = parsed.config;
    this.version = parsed.version;
    this.layout = parsed.layout;
    this.traceNames = parsed.trace.map((t) => t.name).filter((n) => session.outputNames.includes(n));
    this.tokenizer = new ByteTokenizer(this.config.vocab_size);
    this.stateBytes = stateBytes(this.layout);
    this.reset();
  }

  reset() {
    this.state = zeroState(this.ort, this.layout, 1);
    this.steps = 0;
    this.lastLogits = null;
  }

  snapshot() {
    return { state: this.state, steps: this.steps, lastLogits: this.lastLogits };
  }

  restore(snap) {
    ({ state: this.state, steps: this.steps, lastLogits: this.lastLogits } = snap);
  }

  // Returns {logits: Float32Array [V], trace: {readSlots, writeSlots, novel, clipped} or null}.
  async feed(id) {
    const feeds = { ...this.state, token_ids: new this.ort.Tensor("int64", BigInt64Array.of(BigInt(id)), [1]) };
    const out = await this.session.run(feeds);
    // The outputs are fresh tensors, so a snapshot() of an earlier state stays valid.
    const next = {};
    for (const row of this.layout) next[row.input] = out[row.output];
    this.state = next;
    this.steps += 1;
    this.lastLogits = out.logits.data;
    let trace = null;
    if (this.traceNames.includes("trace.read_slots")) {
      trace = {
        readSlots: Array.from(out["trace.read_slots"].data, Number),
        writeSlots: out["trace.write_slots"] ? Array.from(out["trace.write_slots"].data, Number) : [],
        novel: out["trace.novel"] ? Boolean(out["trace.novel"].data[0]) : null,
        clipped: out["trace.clipped"] ? Boolean(out["trace.clipped"].data[0]) : null,
      };
    }
    return { logits: this.lastLogits, trace };
  }
}

// Arg-max over ids < limit, the lowest id on a tie (np.argmax's rule, which thl-np's greedy uses).
export function argmax(logits, limit) {
  let best = 0;
  for (let i = 1; i < limit; i++) if (logits[i] > logits[best]) best = i;
  return best;
}

// A small seeded generator (mulberry32): a seed reproduces a sampled continuation in this page. It is not
// NumPy's generator, so sampled text differs from thl-np's for the same seed; greedy text is identical.
export function makeRng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// thl_np/generation.py's filtering order: temperature, then top-k, then top-p; temperature 0 is greedy.
export function sampleNext(logits, limit, { temperature = 1, topK = null, topP = null } = {}, rng = Math.random) {
  if (temperature === 0 || topK === 1) return argmax(logits, limit);
  let max = -Infinity;
  for (let i = 0; i < limit; i++) if (logits[i] > max) max = logits[i];
  let order = Array.from({ length: limit }, (_, i) => i).sort((a, b) => logits[b] - logits[a] || a - b);
  if (topK) order = order.slice(0, topK);
  let probs = order.map((i) => Math.exp((logits[i] - max) / temperature));
  let total = probs.reduce((a, b) => a + b, 0);
  probs = probs.map((p) => p / total);
  if (topP !== null && topP < 1) {
    let acc = 0;
    let keep = 0;
    while (keep < probs.length && acc < topP) acc += probs[keep++];
    order = order.slice(0, Math.max(keep, 1));
    probs = probs.slice(0, order.length);
    total = probs.reduce((a, b) => a + b, 0);
    probs = probs.map((p) => p / total);
  }
  let u = rng();
  for (let k = 0; k < order.length; k++) {
    u -= probs[k];
    if (u < 0) return order[k];
  }
  return order[order.length - 1];
}

// The ids thl-np feeds for a prompt: its UTF-8 bytes; an empty prompt starts a document with eos.
export function promptIds(thl, prompt) {
  const tok = thl.tokenizer;
  const ids = tok.encode(prompt);
  if (ids.length > 0) return ids;
  if (tok.eosId === null || tok.eosId >= thl.config.vocab_size) {
    throw new Error("the prompt is empty and the model's vocabulary has no eos token to start a document");
  }
  return [tok.eosId];
}

// From the session's current state and last logits, yield up to maxLength new ids, each as
// {id, text, trace, ms}, `text` being the id's decoded piece; stops after eos or when shouldStop() says so.
export async function* continueFrom(thl, { maxLength = 100, temperature = 0, topK = null, topP = null, seed = 0,
  shouldStop = () => false } = {}) {
  const tok = thl.tokenizer;
  const rng = makeRng(seed);
  const dec = tok.streamDecoder();
  let logits = thl.lastLogits;
  for (let i = 0; i < maxLength && !shouldStop(); i++) {
    const id = sampleNext(logits, tok.limit, { temperature, topK, topP }, rng);
    if (id === tok.eosId) {
      yield { id, text: dec.flush(), trace: null, ms: 0 };
      return;
    }
    const t0 = performance.now();
    // The id is fed at once (thl-np feeds the last one only when asked for the state): the page shows its
    // memory trace, and a continuation accepted into the text leaves the state ready after it.
    const out = await thl.feed(id);
    logits = out.logits;
    yield { id, text: dec.push(id) + (i === maxLength - 1 ? dec.flush() : ""), trace: out.trace,
      ms: performance.now() - t0 };
  }
}

// Feed the prompt from the current state, then continue (see continueFrom).
export async function* generate(thl, prompt, options = {}) {
  for (const id of promptIds(thl, prompt)) await thl.feed(id);
  yield* continueFrom(thl, options);
}

// The greedy continuation as {ids, text}: what `thl-np generate --temperature 0` prints.
export async function greedy(thl, prompt, maxLength) {
  const ids = [];
  for await (const piece of generate(thl, prompt, { maxLength, temperature: 0 })) ids.push(piece.id);
  return { ids, text: thl.tokenizer.decode(ids) };
}
