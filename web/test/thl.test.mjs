// The JS side of THL on onnxruntime-web's wasm backend, offline:  node --test web/test/
//
// The greedy continuation must equal `thl-np generate --temperature 0` byte for byte. With THL_ONNX (an
// export), THL_PROMPT and THL_EXPECT (a file holding thl-np's output) set, as tests/test_web.py does, it
// compares with those; otherwise it exports the shipped model and runs thl-np itself, with the Python in
// THL_PYTHON (default python3) on this checkout.
import { test, before } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import * as ort from "onnxruntime-web";
import {
  ByteTokenizer, ThlSession, argmax, continueFrom, generate, greedy, makeRng, parseMeta, sampleNext, stateBytes,
  zeroState,
} from "../thl.mjs";

ort.env.wasm.numThreads = 1;
const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const PROMPT = process.env.THL_PROMPT ?? "Café: the memory of a THL model";
const LENGTH = Number(process.env.THL_LENGTH ?? 200);
let onnxPath;
let expected;
let meta;
let thl;

before(() => {
  if (process.env.THL_ONNX) {
    onnxPath = process.env.THL_ONNX;
    expected = readFileSync(process.env.THL_EXPECT, "utf8");
  } else {
    const dir = mkdtempSync(join(tmpdir(), "thl-web-test-"));
    process.on("exit", () => rmSync(dir, { recursive: true, force: true }));
    const py = process.env.THL_PYTHON ?? "python3";
    onnxPath = join(dir, "thl.onnx");
    execFileSync(py, ["-m", "thl_np", "export", "--out", onnxPath], { cwd: root, stdio: "ignore" });
    expected = execFileSync(py, ["-m", "thl_np", "generate", PROMPT, "--temperature", "0", "--max-length",
      String(LENGTH)], { cwd: root, encoding: "utf8" });
  }
  meta = JSON.parse(readFileSync(`${onnxPath}.json`, "utf8"));
});

async function session() {
  thl ??= await ThlSession.create(ort, readFileSync(onnxPath), meta);
  thl.reset();
  return thl;
}

test("greedy continuation equals thl-np generate --temperature 0", async () => {
  const s = await session();
  const { text, ids } = await greedy(s, PROMPT, LENGTH);
  assert.ok(ids.length > 0);
  assert.equal(text, expected);
});

test("the state is the layout's arrays, zeros at the start, and its size is what the page shows", async () => {
  const { layout, config } = parseMeta(meta);
  const zero = zeroState(ort, layout, 3);
  let bytes = 0;
  for (const row of layout) {
    const t = zero[row.input];
    assert.equal(t.type, row.dtype);
    assert.deepEqual(t.dims, row.shape.map((d) => (d === "batch" ? 3 : d)));
    assert.ok(Array.from(t.data).every((v) => Number(v) === 0));
    bytes += t.data.byteLength / 3 ** row.shape.filter((d) => d === "batch").length;
  }
  assert.equal(stateBytes(layout), bytes);
  // Spec §3's arrays for this config, counted by hand: tiers, memory, 4 slot statistics, local ring, 2 scalars.
  const J = config.memory_slots;
  const expectBytes = 4 * config.tier_dims.reduce((a, b) => a + b, 0) + 4 * J * config.memory_dim
    + (4 + 4 + 8 + 8) * J + 4 * config.local_window * config.embedding_dim + 8 + 8;
  assert.equal(bytes, expectBytes);
});

test("feeding more text onto a snapshot equals feeding it all from the start", async () => {
  const s = await session();
  for (const id of s.tokenizer.encode("abc")) await s.feed(id);
  const snap = s.snapshot();
  for (const id of s.tokenizer.encode("def")) await s.feed(id);
  const split = Float32Array.from(s.lastLogits);
  s.restore(snap);
  assert.equal(s.steps, 3);
  s.reset();
  for (const id of s.tokenizer.encode("abcdef")) await s.feed(id);
  assert.deepEqual(Float32Array.from(s.lastLogits), split);
});

test("sampling: a seed reproduces the text, ids stay below the tokenizer's limit, temperature 0 is greedy", async () => {
  const s = await session();
  const run = async (opts) => {
    s.reset();
    const ids = [];
    for await (const p of generate(s, "Hello", { maxLength: 24, ...opts })) ids.push(p.id);
    return ids;
  };
  const a = await run({ temperature: 1.0, topK: 50, topP: 0.95, seed: 7 });
  assert.deepEqual(await run({ temperature: 1.0, topK: 50, topP: 0.95, seed: 7 }), a);
  assert.ok(a.every((id) => id >= 0 && id < s.tokenizer.limit));
  const g = await run({ temperature: 0 });
  s.reset();
  assert.deepEqual(g, (await greedy(s, "Hello", 24)).ids);
});

test("continueFrom stops when asked, and streamed pieces concatenate to the decoded ids", async () => {
  const s = await session();
  for (const id of s.tokenizer.encode("x")) await s.feed(id);
  let n = 0;
  const pieces = [];
  const ids = [];
  for await (const p of continueFrom(s, { maxLength: 50, shouldStop: () => n >= 5 })) {
    n += 1;
    pieces.push(p.text);
    ids.push(p.id);
  }
  assert.equal(n, 5);
  assert.equal(s.steps, 1 + 5);
  const tok = new ByteTokenizer(259);
  const dec = tok.streamDecoder();
  const emoji = tok.encode("né 🙂 ok");
  const streamed = emoji.map((id) => dec.push(id)).join("") + dec.flush();
  assert.equal(streamed, "né 🙂 ok");
  assert.equal(tok.decode([...emoji, 257, 256]), "né 🙂 ok");
  assert.ok(ids.every((id) => id < tok.limit));
});

test("tokenizer: bytes are ids, specials only when the vocabulary has room", () => {
  assert.deepEqual(new ByteTokenizer(259).encode("é"), [0xc3, 0xa9]);
  assert.equal(new ByteTokenizer(259).eosId, 257);
  assert.equal(new ByteTokenizer(256).eosId, null);
  assert.equal(new ByteTokenizer(256).limit, 256);
  assert.equal(new ByteTokenizer(300).limit, 259);
  // Invalid UTF-8 becomes U+FFFD, as Python's errors="replace".
  assert.equal(new ByteTokenizer(259).decode([0x61, 0xff, 0x62]), "a\ufffdb");
});

test("argmax takes the lowest id on a tie; sampleNext never leaves top-k", () => {
  assert.equal(argmax(Float32Array.of(1, 3, 3, 2), 4), 1);
  assert.equal(argmax(Float32Array.of(1, 3, 3, 9), 3), 1);
  const rng = makeRng(3);
  const logits = Float32Array.of(0, 5, 4.9, 1, 4.8);
  for (let i = 0; i < 200; i++) {
    assert.ok([1, 2].includes(sampleNext(logits, 5, { temperature: 2, topK: 2 }, rng)));
  }
});

test("metadata that is not a thl-np step export is refused", async () => {
  assert.throws(() => parseMeta({ "thl_np.format": "something-else" }), /not a thl-np step export/);
  const wrong = { ...meta, "thl_np.state_layout": meta["thl_np.state_layout"].map((r, i) =>
    (i === 1 ? { ...r, input: "state.nope" } : r)) };
  await assert.rejects(ThlSession.create(ort, readFileSync(onnxPath), wrong), /no input state\.nope/);
});
