// Copy the onnxruntime-web files the page loads from node_modules into web/vendor/ (run by `npm install`
// as postinstall, or `npm run vendor`), so the page is served as plain static files: no bundler, no CDN.
import { copyFileSync, existsSync, mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, "node_modules", "onnxruntime-web", "dist");
// The WASM-only build: the ES module, its loader and the SIMD binary it fetches beside itself.
const FILES = ["ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"];

if (!existsSync(dist)) {
  console.error(`${dist} not found: run npm ci in ${here} first`);
  process.exit(1);
}
const out = join(here, "vendor");
mkdirSync(out, { recursive: true });
for (const name of FILES) copyFileSync(join(dist, name), join(out, name));
console.log(`copied ${FILES.length} onnxruntime-web files to ${out}`);
