"""Shared pieces of the server tests: a tiny model folder, a server on a loopback port in a background
thread, and a `thl-np serve` subprocess. Every wait is a bounded loop."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import uvicorn

from thl_np import THLConfig, THLModel
from thl_np.serve.app import Limits, Server, create_app
from thl_np.serve.engine import load_engine

# small enough to load and step in milliseconds; clocks [1, 2, 4] so that batches share phases often
TINY_SERVE = dict(dim=16, vocab_size=259, memory_slots=8, head_dim=8, query_dim=8, local_window=8, num_tiers=3,
                  tier_timescales=[1, 2, 4])
TIMEOUT = 60.0


def tiny_model_dir(path) -> str:
    directory = os.path.join(str(path), "tiny")
    if not os.path.exists(os.path.join(directory, "config.json")):
        THLModel(THLConfig(**TINY_SERVE), seed=0).save_pretrained(directory)
    return directory


def wait_for(predicate, timeout: float = TIMEOUT, what: str = "the condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class LiveServer:
    """The app on 127.0.0.1 (a free port) in a background thread, started by ``start``, stopped by ``stop``."""

    def __init__(self, model_dir=None, sessions_dir=None, load=None, limits=None, api_key=None, model_id="tiny",
                 **engine_kw):
        if load is None:
            def load():
                return load_engine(model_dir, sessions_dir, **engine_kw)
        self.server = Server(load, model_id, limits or Limits(), api_key)
        self.app = create_app(self.server)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.web = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on",
                                                 timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.web.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, wait_model: bool = True) -> LiveServer:
        self.thread.start()
        wait_for(lambda: self.web.started, what="uvicorn to start")
        if wait_model:
            assert self.server.wait_loaded(TIMEOUT), self.server.load_error
        return self

    def stop(self) -> None:
        self.web.should_exit = True
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()

    def openai(self, api_key: str = "unused"):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=api_key, timeout=TIMEOUT, max_retries=0)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=TIMEOUT).json()


class ServeProcess:
    """`python -m thl_np serve` on a free port; ``kill`` sends a signal, ``wait`` collects the exit."""

    def __init__(self, model_dir: str, state_dir: str, *extra: str):
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "thl_np", "serve", "--model", model_dir, "--port", "0", "--state-dir", state_dir,
             *extra], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.log = []
        line = self.proc.stderr.readline()  # the first line names the port
        self.log.append(line)
        m = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert m, f"no address in {line!r}"
        self.url = f"http://127.0.0.1:{m.group(1)}"
        self._reader = threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True)
        self._reader.start()
        wait_for(self._healthy, what="the server to load its model")

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the server exited with {self.proc.returncode}: {''.join(self.log)}")
        try:
            return httpx.get(f"{self.url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self, sig=signal.SIGKILL) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)

    def close(self) -> None:
        """Kill it if it still runs (a failed test leaves no server behind)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)
