// The Node WASM decode speed of an exported step (onnxruntime-web's wasm backend, one sequence):
//   node web/bench.mjs [MODEL.onnx] [--steps N] [--threads T] [--json]
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
const asJson = args.includes("--json");
if (asJson) args.splice(args.indexOf("--json"), 1);
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
let cpu0 = null;
for (let i = 0; i < warm + steps; i++) {
  if (i === warm) {
    t0 = performance.now();
    cpu0 = process.cpuUsage();
  }
  const { logits } = await thl.feed(id);
  id = argmax(logits, thl.tokenizer.limit);
}
const seconds = (performance.now() - t0) / 1000;
const cpu = process.cpuUsage(cpu0);
const cpuSeconds = (cpu.user + cpu.system) / 1e6;
if (asJson) {
  // One line for a program (e.g. a benchmark that sets these figures beside onnxruntime's).
  console.log(JSON.stringify({ model, runtime: "onnxruntime-web", version: ort.env.versions?.web ?? null,
    backend: "wasm", threads, node: process.version, batch: 1, steps, tokens_per_s: steps / seconds,
    cpu_ms_per_step: 1000 * cpuSeconds / steps, state_bytes: thl.stateBytes }));
  process.exit(0);
}
console.log(`model: ${model} (${thl.config.vocab_size} ids, state ${thl.stateBytes} bytes per sequence)`);
console.log(`onnxruntime-web ${ort.env.versions?.web ?? ""} wasm, ${threads} thread(s), node ${process.version}, ` +
  `${cpus().length} cores`);
console.log(`decode B=1: ${(steps / seconds).toFixed(1)} tokens/s (${steps} greedy steps after ${warm} warm-up)`);
// On a busy machine the wall figure undercounts; the CPU figure is what an unshared core would give.
console.log(`this process's CPU time: ${(1000 * cpuSeconds / steps).toFixed(2)} ms per step ` +
  `(${(steps / cpuSeconds).toFixed(1)} tokens per CPU-second; ${(100 * cpuSeconds / seconds).toFixed(0)}% of wall time)`);
