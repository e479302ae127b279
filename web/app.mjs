// The page: load an exported step, feed what is typed into the kept state, stream a continuation.
//
// URL parameters: model=URL of the .onnx file (default model/thl.onnx; URL.json beside it holds the layout);
// prompt=text to start with; max=continuation length; mode=greedy|sample. With auto=1 the page runs one
// continuation of the prompt and writes {"status", "ids", "text", ...} into <pre id="result"> (tests read it
// with chromium --headless --dump-dom). With split=N too, it is first given the prompt's N first characters
// and then the whole prompt, as if the rest were typed after a first continuation; "sync" in the result
// says whether that second edit fed only the added bytes onto the kept state.
import * as ort from "./vendor/ort.wasm.min.mjs";
import { ThlSession, continueFrom, promptIds } from "./thl.mjs";

// One thread: threads need a cross-origin-isolated page (special server headers), and one sequence's
// step is too small to gain from them.
ort.env.wasm.numThreads = 1;

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const auto = params.get("auto") === "1";
let thl = null;
let typedSnap = null;   // the session's state after exactly `typedIds`
let typedIds = [];
let generation = 0;     // bumped by every edit, so a continuation in progress stops
let queue = Promise.resolve();
let lastSync = null;    // {incremental, fed}: how the last edit reached the state
let autoRest = null;    // auto mode with split=N: the whole prompt, typed after the first continuation

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function writeResult(obj) {
  const el = $("result");
  el.textContent = JSON.stringify(obj);
  el.dataset.status = obj.status;
}

function sameStart(ids, prefix) {
  return prefix.length <= ids.length && prefix.every((v, i) => ids[i] === v);
}

// ort-web runs one call at a time per session: every use of the session goes through this queue.
function exclusive(fn) {
  queue = queue.then(fn).catch((e) => {
    setStatus(String(e.message || e), true);
    if (auto) writeResult({ status: "error", error: String(e.message || e) });
  });
  return queue;
}

function options() {
  const num = (id, fallback) => (Number.isFinite(Number($(id).value)) ? Number($(id).value) : fallback);
  const sampled = $("mode").value === "sample";
  return {
    maxLength: Math.max(1, Math.floor(num("max-length", 120))),
    temperature: sampled ? Math.max(num("temperature", 0.8), 1e-3) : 0,
    topK: sampled && num("top-k", 0) > 0 ? Math.floor(num("top-k", 0)) : null,
    topP: sampled && num("top-p", 1) < 1 ? num("top-p", 1) : null,
    seed: Math.floor(num("seed", 0)),
  };
}

// The memory view: column = generated step, row = slot.
function drawTrace(ctx, column, trace) {
  const slots = thl.config.memory_slots;
  const heads = thl.config.num_heads;
  const k = trace.readSlots.length / heads;
  ctx.fillStyle = "#f3f5f7";
  ctx.fillRect(column, 0, 1, slots);
  for (let i = 0; i < trace.readSlots.length; i++) {
    // readSlots is [heads, κ] in rank order: the top pick of each head drawn brightest.
    const rank = i % k;
    ctx.fillStyle = `rgba(31, 111, 209, ${1 - rank / (k + 1)})`;
    ctx.fillRect(column, trace.readSlots[i], 1, 1);
  }
  ctx.fillStyle = "#d9730d";
  for (const s of trace.writeSlots) ctx.fillRect(column, s, 1, 1);
}

async function sync(ids) {
  // Only what was added since the last sync is fed: the state holds everything before it.
  const incremental = Boolean(typedSnap) && sameStart(ids, typedIds);
  const fresh = incremental ? ids.slice(typedIds.length) : ids;
  if (incremental) thl.restore(typedSnap);
  else thl.reset();
  for (const id of fresh) await thl.feed(id);
  lastSync = { incremental, fed: fresh.length };
  typedIds = ids;
  typedSnap = thl.snapshot();
}

function update() {
  const mine = ++generation;
  return exclusive(async () => {
    if (mine !== generation || !thl) return;
    const text = $("prompt").value;
    const ids = promptIds(thl, text);
    await sync(ids);
    $("typed").textContent = text;
    $("continuation").textContent = "";
    $("steps").textContent = thl.steps;
    const canvas = $("memory");
    canvas.height = thl.config.memory_slots;
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    const opts = options();
    const out = [];
    let shown = "";
    const t0 = performance.now();
    for await (const piece of continueFrom(thl, { ...opts, shouldStop: () => mine !== generation })) {
      out.push(piece.id);
      shown += piece.text;
      $("continuation").textContent = shown;
      if (piece.trace) {
        if (out.length <= canvas.width) drawTrace(ctx, out.length - 1, piece.trace);
        const reads = new Set(piece.trace.readSlots);
        $("last-step").textContent = `${reads.size} / ${piece.trace.writeSlots.length}`;
      }
      $("steps").textContent = thl.steps;
      $("tps").textContent = (out.length / ((performance.now() - t0) / 1000)).toFixed(1);
    }
    if (mine !== generation) return;
    if (autoRest !== null) {
      $("prompt").value = autoRest;
      autoRest = null;
      update();
      return;
    }
    const seconds = (performance.now() - t0) / 1000;
    setStatus(`ready: ${out.length} tokens in ${seconds.toFixed(2)} s`);
    if (auto) {
      writeResult({ status: "done", prompt: text, ids: out, text: shown, tokensPerSecond: out.length / seconds,
        stateBytes: thl.stateBytes, mode: $("mode").value, sync: lastSync });
    }
  });
}

async function load(model, meta, label) {
  setStatus(`loading ${label}…`);
  generation++;
  await exclusive(async () => {
    thl = await ThlSession.create(ort, model, meta);
    typedSnap = null;
    typedIds = [];
    const kib = (thl.stateBytes / 1024).toFixed(1);
    $("state-bytes").textContent = `${thl.stateBytes.toLocaleString("en")} B (${kib} KiB)`;
    setStatus(`${label}: thl-np ${thl.version} export, vocabulary ${thl.config.vocab_size}, ` +
      `${thl.config.memory_slots} memory slots`);
  });
  return update();
}

async function loadFromUrl(url) {
  const [model, meta] = await Promise.all([
    fetch(url).then((r) => { if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`); return r.arrayBuffer(); }),
    fetch(`${url}.json`).then((r) => { if (!r.ok) throw new Error(`${url}.json: HTTP ${r.status}`); return r.json(); }),
  ]);
  return load(new Uint8Array(model), meta, url.split("/").pop());
}

async function loadFromFiles() {
  const m = $("model-file").files[0];
  const j = $("meta-file").files[0];
  if (!m || !j) return;
  try {
    await load(new Uint8Array(await m.arrayBuffer()), JSON.parse(await j.text()), m.name);
  } catch (e) {
    setStatus(String(e.message || e), true);
  }
}

let debounce = 0;
$("prompt").addEventListener("input", () => {
  clearTimeout(debounce);
  debounce = setTimeout(update, 120);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Tab" && $("continuation").textContent) {
    e.preventDefault();
    $("accept").click();
  }
});
$("accept").addEventListener("click", () => {
  $("prompt").value += $("continuation").textContent;
  update();
});
for (const id of ["mode", "temperature", "top-k", "top-p", "seed", "max-length"]) {
  $(id).addEventListener("change", update);
}
$("model-file").addEventListener("change", loadFromFiles);
$("meta-file").addEventListener("change", loadFromFiles);

if (params.has("prompt")) $("prompt").value = params.get("prompt");
if (auto && params.has("split")) {
  autoRest = $("prompt").value;
  $("prompt").value = autoRest.slice(0, Number(params.get("split")));
}
if (params.has("max")) $("max-length").value = params.get("max");
if (params.get("mode") === "sample") $("mode").value = "sample";
loadFromUrl(params.get("model") || "model/thl.onnx").catch((e) => {
  setStatus(`${e.message || e} (export a model with: mkdir -p web/model && thl-np export --out web/model/thl.onnx)`, true);
  if (auto) writeResult({ status: "error", error: String(e.message || e) });
});
