"""THL in the browser (web/): the exported shipped model run by onnxruntime-web's WASM backend must continue
a prompt greedily exactly as `thl-np generate --temperature 0` does:

- in Node: `node --test web/test/` (web/test/thl.test.mjs) on this session's export and thl-np's output;
- in a real browser: headless Chromium loads web/index.html from a local static server, the page runs
  the greedy continuation and writes it into the DOM, read back with ``--dump-dom``.

Node and Chromium are system programs: a test skips when its program is absent, except under CI (CI=true),
where .ci/run installs both and a missing one is a failure. web/node_modules comes from `npm ci` (run here
when it is missing) and web/vendor/ from web/vendor.mjs."""
from __future__ import annotations

import functools
import html
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("onnx")

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
WEB = os.path.join(ROOT, "web")
PROMPT = "Café: the memory of a THL model"   # a 2-byte character: the JS tokenizer must feed UTF-8 bytes
LENGTH = 200
IN_CI = os.environ.get("CI") == "true"


def program(*names):
    """The first of ``names`` on PATH; skips the test when none is (fails under CI, which installs them)."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    if IN_CI:
        pytest.fail(f"{names[0]} is not installed, and CI must run this test (.ci/run installs it)")
    pytest.skip(f"{names[0]} is not installed")


@pytest.fixture(scope="module")
def web_ready():
    """web/node_modules (npm ci, from the committed lock file) and web/vendor/ (the page's copy of
    onnxruntime-web)."""
    program("node")
    if not os.path.isdir(os.path.join(WEB, "node_modules", "onnxruntime-web")):
        npm = program("npm")
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=WEB, check=True, timeout=600,
                       capture_output=True)
    if not os.path.isfile(os.path.join(WEB, "vendor", "ort-wasm-simd-threaded.wasm")):
        subprocess.run(["node", "vendor.mjs"], cwd=WEB, check=True, timeout=120, capture_output=True)
    return WEB


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(path of the shipped model's ONNX export, thl-np's greedy continuation of PROMPT as printed)."""
    folder = tmp_path_factory.mktemp("web")
    path = str(folder / "thl.onnx")
    run = functools.partial(subprocess.run, cwd=ROOT, capture_output=True, timeout=300)
    done = run([sys.executable, "-m", "thl_np", "export", "--out", path])
    assert done.returncode == 0, done.stderr.decode()
    gen = run([sys.executable, "-m", "thl_np", "generate", PROMPT, "--temperature", "0",
               "--max-length", str(LENGTH)])
    assert gen.returncode == 0, gen.stderr.decode()
    text = gen.stdout.decode("utf-8")
    assert len(text) > 20   # a continuation to compare, not an early eos
    (folder / "expected.txt").write_bytes(gen.stdout)
    return path, text


def test_node_wasm_greedy_equals_thl_np_generate(web_ready, exported):
    path, _ = exported
    env = dict(os.environ, THL_ONNX=path, THL_EXPECT=os.path.join(os.path.dirname(path), "expected.txt"),
               THL_PROMPT=PROMPT, THL_LENGTH=str(LENGTH))
    done = subprocess.run(["node", "--test", "--test-reporter=spec", "test/"], cwd=web_ready, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert re.search(r"\bpass 8\b", done.stdout), done.stdout   # every subtest ran, none skipped


# The JS tokenizer (web/thl.mjs) on a batch of inputs, in one node process: for each text its ids, and for
# each id list the decoded text and the text streamed one id at a time.
_JS_TOKENIZER = """
import { ByteTokenizer } from %s;
const { texts, idLists } = JSON.parse(require("node:fs").readFileSync(0, "utf8"));
const tok = new ByteTokenizer(259);
const streamed = (ids) => { const d = tok.streamDecoder(); return ids.map((i) => d.push(i)).join("") + d.flush(); };
process.stdout.write(JSON.stringify({ encoded: texts.map((t) => tok.encode(t)),
  decoded: idLists.map((ids) => tok.decode(ids)), streamed: idLists.map(streamed) }));
"""


@settings(max_examples=4)
@given(texts=st.lists(st.text(max_size=40), min_size=1, max_size=40),
       id_lists=st.lists(st.lists(st.integers(0, 258), max_size=40), min_size=1, max_size=40))
def test_js_tokenizer_equals_thl_np_tokenizer(texts, id_lists):
    """The page's byte tokenizer is thl_np.tokenizer's: the same ids for any text, the same text for any
    ids (invalid UTF-8 replaced the same way, specials dropped), streamed or not."""
    node = program("node")
    from thl_np.tokenizer import Tokenizer

    url = json.dumps("file://" + urllib.parse.quote(os.path.join(WEB, "thl.mjs")))
    script = "import { createRequire } from 'node:module'; const require = createRequire(import.meta.url);" + \
        _JS_TOKENIZER % url
    done = subprocess.run([node, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60,
                          input=json.dumps({"texts": texts, "idLists": id_lists}))
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    tok = Tokenizer()
    assert got["encoded"] == [list(tok.encode(t)) for t in texts]
    want = [tok.decode(ids) for ids in id_lists]
    assert got["decoded"] == want
    assert got["streamed"] == want


def _serve_module():
    spec = importlib.util.spec_from_file_location("thl_web_serve", os.path.join(WEB, "serve.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def site(tmp_path, model_path):
    """The page's files (linked) plus the model under model/: what `npm run vendor` + an export give."""
    root = tmp_path / "site"
    (root / "model").mkdir(parents=True)
    for name in ("index.html", "app.mjs", "thl.mjs", "vendor"):
        os.symlink(os.path.join(WEB, name), root / name)
    for suffix in ("", ".json"):
        shutil.copy(model_path + suffix, root / "model" / ("thl.onnx" + suffix))
    return str(root)


def chromium_dump(chromium, url, profile):
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}",
           "--virtual-time-budget=120000", "--dump-dom", url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def page_result(dom):
    found = re.search(r'<pre id="result"[^>]*>(.*?)</pre>', dom, re.S)
    assert found, dom[-3000:]
    return json.loads(html.unescape(found.group(1)))


def test_chromium_page_greedy_equals_thl_np_generate(web_ready, exported, tmp_path):
    chromium = program("chromium", "chromium-browser")
    path, expected = exported
    server = _serve_module().start(site(tmp_path, path))
    try:
        # split: the page continues the prompt's first 9 characters, then gets the whole prompt, which it
        # must feed onto the state it kept (only the added bytes), as when someone types on.
        query = urllib.parse.urlencode({"auto": "1", "max": LENGTH, "prompt": PROMPT, "split": 9})
        url = f"http://127.0.0.1:{server.server_address[1]}/index.html?{query}"
        result = page_result(chromium_dump(chromium, url, tmp_path / "profile"))
    finally:
        server.shutdown()
        server.server_close()
    assert result["status"] == "done", result
    assert result["prompt"] == PROMPT
    assert result["sync"] == {"incremental": True, "fed": len(PROMPT[9:].encode("utf-8"))}
    assert result["text"] == expected
    assert bytes(i for i in result["ids"] if i < 256).decode("utf-8", "replace") == expected
    # Spec §3's state for the shipped model: 3 tiers of 128, 64×128 memory, 4 slot statistics, 64×128 ring.
    assert result["stateBytes"] == 4 * 3 * 128 + 4 * 64 * 128 + (4 + 4 + 8 + 8) * 64 + 4 * 64 * 128 + 16
