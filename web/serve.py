"""Serve web/ (or another folder) on 127.0.0.1 with the MIME types the page needs:

    python web/serve.py               # http://127.0.0.1:8000/
    python web/serve.py --port 9000 --folder SITE

A module script must come as JavaScript and the WASM binary as application/wasm, whatever this machine's
mime.types says; ``python -m http.server`` guesses from it. tests/test_web.py and web/screenshot.py use
``start`` for the same reason.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import os
import threading

WEB = os.path.dirname(os.path.abspath(__file__))
TYPES = {".html": "text/html", ".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
         ".json": "application/json", ".png": "image/png", ".onnx": "application/octet-stream"}


class Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = TYPES

    def log_message(self, *args):
        if not getattr(self.server, "quiet", False):
            super().log_message(*args)


def make(folder: str = WEB, port: int = 0, quiet: bool = True) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Handler, directory=folder))
    server.quiet = quiet
    return server


def start(folder: str = WEB) -> http.server.ThreadingHTTPServer:
    """A quiet server on a free port, in a daemon thread; ``server.server_address[1]`` is its port."""
    server = make(folder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main(argv=None):
    ap = argparse.ArgumentParser(description="Serve the THL page on 127.0.0.1.")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--folder", default=WEB, help="folder to serve [web/]")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.folder):
        raise SystemExit(f"--folder {args.folder} is not a folder")
    server = make(args.folder, args.port, quiet=False)
    print(f"serving {args.folder} on http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
