"""`thl-np serve --state-dir` as a process: sessions survive a kill -9 mid-load and a SIGTERM, and continue
exactly as an uninterrupted run would."""
from __future__ import annotations

import os
import signal
import threading

import httpx
import pytest
from serve_helpers import TIMEOUT, ServeProcess, tiny_model_dir

from thl_np import THLModel
from thl_np.generation import generate_text

pytest.importorskip("uvicorn")

TURNS = ["Hello there.", " How are you?", " Fine."]


def ask(url, session, prompt, n=10):
    r = httpx.post(f"{url}/v1/completions", timeout=TIMEOUT, json={
        "model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0, "session": session})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def uninterrupted(model, turns, n=10):
    """The texts of greedy turns in one process, each continuing the state of the last."""
    state, out = None, []
    for prompt in turns:
        text, state = generate_text(model, None, prompt, max_length=n, temperature=0, state=state, return_state=True)
        out.append(text)
    return out


def start_long_stream(url, session, started: threading.Event):
    """A request that runs until its server dies: read until the first chunk arrives, then keep reading."""
    def run():
        try:
            with httpx.stream("POST", f"{url}/v1/completions", timeout=TIMEOUT, json={
                    "model": "tiny", "prompt": " long", "max_tokens": 10**7, "temperature": 0, "stream": True,
                    "session": session}) as resp:
                for _ in resp.iter_lines():
                    started.set()
        except httpx.HTTPError:
            pass  # the server went away: expected
        finally:
            started.set()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("restart-model"))


def test_sessions_survive_kill_9_mid_load_and_sigterm(model_dir, tmp_path):
    """Three runs of one state folder: a kill -9 while requests run; a restart where every committed session
    continues as an uninterrupted run would, then a SIGTERM with a request in flight (cancelled, not
    committed; the server exits 0, its lock released); a third run that continues the sessions again."""
    model = THLModel.from_pretrained(model_dir)
    expected = uninterrupted(model, TURNS)
    state_dir = str(tmp_path / "state")
    first = ServeProcess(model_dir, state_dir, "--max-tokens", str(10**7), "--max-sessions", "2")
    try:
        for i in range(4):
            for prompt in TURNS[:2]:
                ask(first.url, f"user{i}", prompt)
        ask(first.url, "busy", TURNS[0])
        started = [threading.Event() for _ in range(2)]
        streams = [start_long_stream(first.url, s, e) for s, e in zip(("busy", "fresh"), started, strict=True)]
        for e in started:
            assert e.wait(TIMEOUT)
        first.kill(signal.SIGKILL)
        assert first.wait() == -signal.SIGKILL
    finally:
        first.close()
    for t in streams:
        t.join(TIMEOUT)

    second = ServeProcess(model_dir, state_dir, "--max-tokens", str(10**7), "--max-sessions", "2",
                          "--shutdown-grace", "0.5")  # the dead server's lock is stale: taken over
    try:
        for i in range(4):  # two committed turns each; the third continues them
            assert ask(second.url, f"user{i}", TURNS[2]) == expected[2]
        # the request killed in flight was never committed: the session continues from its first turn
        assert ask(second.url, "busy", TURNS[1]) == expected[1]
        assert httpx.get(f"{second.url}/v1/sessions/fresh", timeout=TIMEOUT).status_code == 404
        started = threading.Event()
        stream = start_long_stream(second.url, "cut", started)
        assert started.wait(TIMEOUT)
        second.kill(signal.SIGTERM)
        assert second.wait() == 0
    finally:
        second.close()
    stream.join(TIMEOUT)
    assert "stopped" in "".join(second.log)
    names = sorted(os.listdir(state_dir))
    assert ".run.lock" not in names and "cut.session.npz" not in names and not [n for n in names if "tmp" in n]
    assert names == sorted([f"user{i}.session.npz" for i in range(4)] + ["busy.session.npz"])

    third = ServeProcess(model_dir, state_dir)
    try:
        assert ask(third.url, "busy", TURNS[2]) == expected[2]
        third.kill(signal.SIGTERM)
        assert third.wait() == 0
    finally:
        third.close()
