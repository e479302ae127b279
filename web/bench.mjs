// The Node WASM decode speed of an exported step (onnxruntime-web's wasm backend, one sequence):
//   node web/bench.mjs [MODEL.onnx] [--steps N] [--threads T]
// MODEL.onnx defaults to web/model/thl.onnx (npm run model exports the shipped model there); its OUT.json
// sidecar must lie beside it. Prints one line per figure; a shared machine gives noisy figures.
import { readFileSync, existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { dirname, join } from "node:path";
import { cpus } from "node:os";
import * as ort from "onnxruntime-web";
import { ThlSession, argmax } from "./thl.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const args = process.argv.slice(2);
function option(name, fallback) {
  const i = args.indexOf(name);
  if (i < 0) return fallback;
  const v = Number(args[i + 1]);
  if (!Number.isInteger(v) || v < 1) {
    console.error(`${name} needs a positive integer, got ${args[i + 1]}`);
    process.exit(2);
  }
  args.splice(i, 2);
  return v;
}
const steps = option("--steps", 300);
const threads = option("--threads", 1);
const model = args[0] ?? join(here, "model", "thl.onnx");
if (!existsSync(model) || !existsSync(model + ".json")) {
  console.error(`${model} or ${model}.json not found: export one with  thl-np export --out ${model}`);
  process.exit(2);
}
ort.env.wasm.numThreads = threads;
const thl = await ThlSession.create(ort, readFileSync(model), JSON.parse(readFileSync(model + ".json", "utf8")));
const warm = 20;
let id = thl.tokenizer.encode("T")[0];
let t0 = 0;
for (let i = 0; i < warm + steps; i++) {
  if (i === warm) t0 = performance.now();
  const { logits } = await thl.feed(id);
  id = argmax(logits, thl.tokenizer.limit);
}
const seconds = (performance.now() - t0) / 1000;
console.log(`model: ${model} (${thl.config.vocab_size} ids, state ${thl.stateBytes} bytes per sequence)`);
console.log(`onnxruntime-web ${ort.env.versions?.web ?? ""} wasm, ${threads} thread(s), node ${process.version}, ` +
  `${cpus().length} cores`);
console.log(`decode B=1: ${(steps / seconds).toFixed(1)} tokens/s (${steps} greedy steps after ${warm} warm-up)`);
