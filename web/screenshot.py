"""The README's picture of the page (docs/web.png), taken in real time by headless Chromium:

    mkdir -p web/model && thl-np export --out web/model/thl.onnx   # once; npm ci in web/ once
    python web/screenshot.py --out docs/web.png

It serves web/ on 127.0.0.1, opens the page with a prompt, waits (at most --wait seconds) until the
continuation is done, saves a screenshot and prints the page's tokens/s (the browser's WASM speed).
Chromium is driven over --remote-debugging-pipe (the DevTools protocol as NUL-terminated JSON on fds 3
and 4), so no driver package is needed; ``--dump-dom`` with a virtual-time budget (what
tests/test_web.py uses) would freeze the page's clock and show no tokens/s.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve  # noqa: E402  (web/serve.py, beside this file)

WEB = serve.WEB


class Pipe:
    """A DevTools session over Chromium's remote-debugging pipe."""

    def __init__(self, proc, to_browser: int, from_browser: int):
        self.proc, self.out, self.inp = proc, to_browser, from_browser
        self.buf = b""
        self.next_id = 0

    def call(self, method, session=None, **params):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self.out, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self.buf:
                chunk = os.read(self.inp, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the pipe")
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/web.png", help="PNG to write [docs/web.png]")
    ap.add_argument("--prompt", default="def fibonacci(n):")
    ap.add_argument("--max", type=int, default=160, help="continuation length [160]")
    ap.add_argument("--size", default="1000,880", help="window size W,H [1000,880]")
    ap.add_argument("--wait", type=float, default=120, help="seconds to wait for the continuation [120]")
    args = ap.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("chromium is not installed (Debian: apt-get install chromium)")
    if not os.path.isfile(os.path.join(WEB, "model", "thl.onnx")):
        sys.exit("web/model/thl.onnx not found: mkdir -p web/model && thl-np export --out web/model/thl.onnx")
    if not os.path.isfile(os.path.join(WEB, "vendor", "ort.wasm.min.mjs")):
        sys.exit("web/vendor/ not found: run npm ci in web/")
    out = os.path.abspath(args.out)
    if not os.path.isdir(os.path.dirname(out)):
        sys.exit(f"--out {args.out}: its folder does not exist")

    server = serve.start(WEB)
    query = urllib.parse.urlencode({"auto": "1", "max": args.max, "prompt": args.prompt})
    url = f"http://127.0.0.1:{server.server_address[1]}/index.html?{query}"
    to_r, to_w = os.pipe()       # we write, chromium reads on its fd 3
    from_r, from_w = os.pipe()   # chromium writes on its fd 4, we read
    profile = tempfile.mkdtemp(prefix="thl-web-shot-")

    def child_fds():
        # dup2 onto the same number keeps close-on-exec, hence set_inheritable; close_fds=False keeps them.
        r, w = os.dup(to_r), os.dup(from_w)
        os.dup2(r, 3)
        os.dup2(w, 4)
        os.set_inheritable(3, True)
        os.set_inheritable(4, True)

    proc = subprocess.Popen([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                             "--no-first-run", f"--user-data-dir={profile}", f"--window-size={args.size}",
                             "--remote-debugging-pipe", url],
                            preexec_fn=child_fds, close_fds=False, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.close(to_r)
    os.close(from_w)
    try:
        cdp = Pipe(proc, to_w, from_r)
        page = next(t for t in cdp.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        session = cdp.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        deadline = time.monotonic() + args.wait
        status = None
        while time.monotonic() < deadline:
            got = cdp.call("Runtime.evaluate", session,
                           expression="(document.getElementById('result') || {dataset: {}}).dataset.status || ''")
            status = got["result"].get("value")
            if status in ("done", "error"):
                break
            time.sleep(0.25)
        if status != "done":
            sys.exit(f"the page did not finish in {args.wait} s (status {status!r})")
        got = cdp.call("Runtime.evaluate", session, expression="document.getElementById('result').textContent")
        result = json.loads(got["result"]["value"])
        png = cdp.call("Page.captureScreenshot", session, format="png")["data"]
        with open(out + ".tmp", "wb") as f:
            f.write(base64.b64decode(png))
        os.replace(out + ".tmp", out)
        print(f"wrote {args.out}; the page's continuation: {len(result['ids'])} tokens at "
              f"{result['tokensPerSecond']:.1f} tokens/s (Chromium, WASM, 1 thread)")
    finally:
        proc.kill()
        proc.wait()
        server.shutdown()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
