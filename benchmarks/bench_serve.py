"""`thl-np serve` under load, on loopback (issue 26's "Measured"). Not a test: it prints what it measured.

1. throughput: aggregate completion tokens/s of 8 concurrent streaming clients against one client alone,
   same server, same run (the shipped model, and the default 174M config with random weights);
2. time to first token (a 1-token completion): a session continued after 10,000 bytes of conversation, a
   fresh 10-byte prompt, and the same 10,000 + 10 bytes sent whole to a server that must reprocess them
   (no session, no prefix cache);
3. 64 clients x 20 requests, each client on its own session, some requests streamed and cancelled at random,
   twice (new sessions the second time): every error other than 429 is counted (429 is retried), each
   session's final state is compared with an in-process replay of its own committed requests, and the
   server's resident memory is read before and after each round (flat: the second round adds nothing);
4. kill -9 of the server while clients run, restart on the same --state-dir: every saved session continues
   exactly as an uninterrupted in-process run of its committed requests.

Every loop is bounded (request counts, timeouts). Each server is a `python -m thl_np serve` process.

    python benchmarks/bench_serve.py                       # the figures for docs/SERVING.md (~5-10 minutes)
    python benchmarks/bench_serve.py --quick               # a smoke test: small counts, shipped model only
    python benchmarks/bench_serve.py --models shipped --json out.json
    python benchmarks/bench_serve.py --throughput-only --repeats 7   # part 1 alone: the ratio's median and range
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's thl_np, not an installed one

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from thl_np import THLConfig, THLModel  # noqa: E402
from thl_np.generation import generate_text  # noqa: E402
from thl_np.serve.sessions import META_KEY  # noqa: E402

SHIPPED = ROOT / "thl_np" / "assets" / "default_model"
TIMEOUT = 600.0


class Serve:
    """A `thl-np serve` process on a free loopback port."""

    def __init__(self, model_dir, *flags):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, "-m", "thl_np", "serve", "--model", str(model_dir), "--port",
                                      "0", *flags], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                     env=env)
        line = self.proc.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        if not m:
            raise SystemExit(f"the server did not start: {line}{self.proc.stderr.read()}")
        self.url = f"http://127.0.0.1:{m.group(1)}"
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()
        end = time.monotonic() + TIMEOUT
        while time.monotonic() < end:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}")
            time.sleep(0.1)
        raise SystemExit("the server did not load its model in time")

    def rss_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(60)


_LOCAL = threading.local()


def client() -> httpx.Client:
    """One keep-alive client per thread: a new httpx client per request costs more (its SSL context) than
    the request itself."""
    if not hasattr(_LOCAL, "client"):
        _LOCAL.client = httpx.Client(timeout=TIMEOUT)
    return _LOCAL.client


def post(url, body, timeout=TIMEOUT):
    """(status, json) of a completion, retrying 429 (the documented "queue full") a bounded number of times."""
    for _ in range(2000):
        r = client().post(f"{url}/v1/completions", json=body, timeout=timeout)
        if r.status_code != 429:
            return r.status_code, r.json()
        time.sleep(0.05)
    return 429, r.json()


# ---------------------------------------------------------------------------------------------- 1. throughput
def stream_tokens(url, prompt, n) -> int:
    # greedy: the figure is the server's (batching, streaming), not the sampler's (sample_next at a temperature
    # costs each row ~50 us a token on top, as much as a whole batch-8 step of the shipped model)
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True}
    tokens = 0
    with client().stream("POST", f"{url}/v1/completions", json=body, timeout=TIMEOUT) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            # only the chunk with the usage counts is parsed: the client shares the 2 cores with the server
            if line.startswith("data: {") and '"usage"' in line:
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    return tokens


def throughput(model_dir, n_tokens, clients=8, repeats=5):
    """One server; ``repeats`` times: one client alone, then ``clients`` at once (back to back, so that both
    see about the same machine). The ratio's median and range, and each repeat's figures."""
    server = Serve(model_dir, "--max-batch", str(clients), "--max-tokens", str(n_tokens))
    runs = []
    try:
        prompt = "The quick brown fox jumps over the lazy dog. " * 3  # past the local window: one phase
        stream_tokens(server.url, prompt, 8)  # warm
        for _ in range(repeats):
            before = httpx.get(f"{server.url}/health", timeout=30).json()
            t0 = time.perf_counter()
            one = stream_tokens(server.url, prompt, n_tokens)
            t_one = time.perf_counter() - t0
            counts = [0] * clients
            # each thread makes its keep-alive client and connection first (an httpx client costs ~50-80 ms
            # to make, eight of them one after the other under the GIL as long as the whole timed run), then
            # all start together
            warmed, go = (threading.Barrier(clients + 1, timeout=TIMEOUT) for _ in range(2))

            def run(i, warmed=warmed, go=go, counts=counts):
                stream_tokens(server.url, prompt, 1)
                warmed.wait()
                go.wait()
                counts[i] = stream_tokens(server.url, prompt, n_tokens)
            threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
            for t in threads:
                t.start()
            warmed.wait()
            mid = httpx.get(f"{server.url}/health", timeout=30).json()
            go.wait()
            t0 = time.perf_counter()
            for t in threads:
                t.join(TIMEOUT)
            t_many = time.perf_counter() - t0
            after = httpx.get(f"{server.url}/health", timeout=30).json()
            single, aggregate = one / t_one, sum(counts) / t_many
            runs.append({"one_client_tok_s": round(single), f"{clients}_clients_tok_s": round(aggregate),
                         "ratio": round(aggregate / single, 2),
                         "rows_per_step": round((after["rows_stepped"] - mid["rows_stepped"])
                                                / max(1, after["steps"] - mid["steps"]), 2),
                         "one_client_steps": mid["steps"] - before["steps"]})
    finally:
        server.stop()
    ratios = [r["ratio"] for r in runs]
    return {"tokens_per_client": n_tokens, "repeats": repeats, "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "runs": runs}


# ---------------------------------------------------------------------------------------------- 2. TTFT
def ttft(model_dir, history_bytes, repeats):
    server = Serve(model_dir, "--prefix-cache", "0", "--max-prompt", str(history_bytes + 1000))
    rng = np.random.default_rng(0)
    words = ["state", "memory", "tier", "router", "slot", "window", "token", "model", "the", "a"]
    history = " ".join(rng.choice(words, history_bytes))[:history_bytes]
    tail = " and then"  # the next turn, ~10 bytes
    try:
        status, _ = post(server.url, {"prompt": history, "max_tokens": 1, "temperature": 0, "session": "base"})
        assert status == 200
        data = httpx.get(f"{server.url}/v1/sessions/base", timeout=60).content

        def timed(body):
            t0 = time.perf_counter()
            status, out = post(server.url, body)
            assert status == 200, out
            return time.perf_counter() - t0

        session, fresh, whole = [], [], []
        for i in range(repeats):
            httpx.put(f"{server.url}/v1/sessions/copy{i}", content=data, timeout=60).raise_for_status()
            session.append(timed({"prompt": tail, "max_tokens": 1, "temperature": 0, "session": f"copy{i}"}))
            fresh.append(timed({"prompt": tail + f"{i}", "max_tokens": 1, "temperature": 0}))
            whole.append(timed({"prompt": history + tail, "max_tokens": 1, "temperature": 0}))
    finally:
        server.stop()
    med = {k: statistics.median(v) * 1e3 for k, v in (("session_ms", session), ("fresh_10_bytes_ms", fresh),
                                                     ("no_session_reprocess_ms", whole))}
    med["session_over_fresh"] = med["session_ms"] / med["fresh_10_bytes_ms"]
    med["history_bytes"] = len(history.encode())
    return med


# ---------------------------------------------------------------------------------------------- 3. load
def session_meta(url, sid):
    data = httpx.get(f"{url}/v1/sessions/{sid}", timeout=60).content
    with np.load(io.BytesIO(data)) as z:
        arrays = {k: z[k] for k in z.files}
    return json.loads(arrays.pop(META_KEY).tobytes()), arrays


def client_run(url, sid, n_requests, rng, cancel_p, log, errors, tried=None):
    """Sequential requests on one session; a cancelled request is never followed by another cancel, so the
    next answer's request count says whether the cancelled one was committed. ``log``: the committed
    requests; ``tried``: every request not cancelled, in order (what a killed server may have committed)."""
    committed = 0
    last_cancel = None
    for i in range(n_requests):
        prompt = "".join(chr(c) for c in rng.integers(97, 123, int(rng.integers(5, 40))))
        n = int(rng.integers(1, 24))
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "session": sid}
        cancel = i < n_requests - 1 and last_cancel is None and rng.random() < cancel_p
        try:
            if cancel:
                with client().stream("POST", f"{url}/v1/completions", json={**body, "stream": True},
                                     timeout=TIMEOUT) as r:
                    if r.status_code == 429:
                        continue
                    if r.status_code != 200:
                        errors.append(f"{sid}: HTTP {r.status_code}")
                        continue
                    for k, _ in enumerate(r.iter_lines()):
                        if k >= int(rng.integers(0, 3)):
                            break
                last_cancel = (prompt, n)
                continue
            if tried is not None:
                tried.append((prompt, n))
            status, out = post(url, body)
            if status != 200:
                errors.append(f"{sid}: HTTP {status} {out}")
                continue
            count = out["session"]["requests"]
            if last_cancel is not None and count == committed + 2:
                log.append(last_cancel)
                committed += 1
            elif count != committed + 1:
                errors.append(f"{sid}: request count {count}, expected {committed + 1}")
            log.append((prompt, n))
            committed += 1
            last_cancel = None
        except httpx.HTTPError as exc:
            errors.append(f"{sid}: {type(exc).__name__}: {exc}")


def replay_matches(model, url, sid, log) -> bool:
    """The session's exported state, its pending token fed, against greedy requests replayed in-process."""
    meta, arrays = session_meta(url, sid)
    if meta["requests"] != len(log):
        return False
    state = None
    for prompt, n in log:
        _, state = generate_text(model, None, prompt, max_length=n, temperature=0, state=state, return_state=True)
    from thl_np.state import InferenceState

    K = model.config.num_tiers
    served = InferenceState(timestep=int(arrays["timestep"]), tiers=[arrays[f"tier_state_{k}"] for k in range(K)],
                            memory=arrays["memory"], read_ema=arrays["read_ema"], write_ema=arrays["write_ema"],
                            last_read=arrays["last_read"], last_write=arrays["last_write"],
                            local_buffer=arrays["local_buffer"], local_valid=int(arrays["local_valid"]))
    _, served = model.forward_step(np.array(meta["pending"][-1:]), served)
    mine, theirs = state.arrays(), served.arrays()
    return all(np.allclose(mine[k], theirs[k], rtol=0, atol=1e-5) for k in mine)


def load_test(model_dir, clients, per_client, cancel_p=0.2, max_sessions=16, rounds=2):
    """``rounds`` rounds of the load, each on new sessions: the resident memory after each round stays flat
    once the caches (sessions in memory, prefix cache) are full, which the first round does."""
    model = THLModel.from_pretrained(str(model_dir))
    state_dir = tempfile.mkdtemp(prefix="bench-serve-")
    server = Serve(model_dir, "--state-dir", state_dir, "--max-sessions", str(max_sessions), "--max-queue", "32")
    out = {"clients": clients, "requests_each": per_client, "rounds": rounds, "wall_s": [], "rss_mib": [],
           "errors_other_than_429": 0, "first_errors": [], "sessions_matching_replay": 0, "sessions": 0}
    try:
        post(server.url, {"prompt": "warm up", "max_tokens": 8})
        out["rss_mib"].append(server.rss_mib())
        for r in range(rounds):
            logs, errors = [[] for _ in range(clients)], []
            threads = [threading.Thread(target=client_run, args=(server.url, f"r{r}c{i}", per_client,
                                                                 np.random.default_rng(1000 * r + i), cancel_p,
                                                                 logs[i], errors)) for i in range(clients)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join(TIMEOUT)
            out["wall_s"].append(time.perf_counter() - t0)
            out["rss_mib"].append(server.rss_mib())
            out["errors_other_than_429"] += len(errors)
            out["first_errors"] += errors[:3 - len(out["first_errors"])]
            out["sessions"] += sum(1 for g in logs if g)
            out["sessions_matching_replay"] += sum(replay_matches(model, server.url, f"r{r}c{i}", logs[i])
                                                   for i in range(clients) if logs[i])
    finally:
        server.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------- 4. kill -9
def kill_restore(model_dir, clients, per_client):
    model = THLModel.from_pretrained(str(model_dir))
    state_dir = tempfile.mkdtemp(prefix="bench-serve-kill-")
    server = Serve(model_dir, "--state-dir", state_dir)
    logs, tried, errors = [[] for _ in range(clients)], [[] for _ in range(clients)], []
    threads = [threading.Thread(target=client_run, args=(server.url, f"k{i}", per_client,
                                                         np.random.default_rng(100 + i), 0.0, logs[i], errors,
                                                         tried[i]), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    server.stop(signal.SIGKILL)
    for t in threads:
        t.join(60)
    again = Serve(model_dir, "--state-dir", state_dir)
    try:
        saved = [s["id"] for s in httpx.get(f"{again.url}/v1/sessions", timeout=60).json()["data"]]
        same = 0
        for sid in saved:
            meta, _ = session_meta(again.url, sid)
            log = tried[int(sid[1:])][:meta["requests"]]  # what the killed server committed
            state = None
            for prompt, n in log:
                _, state = generate_text(model, None, prompt, max_length=n, temperature=0, state=state,
                                         return_state=True)
            status, out = post(again.url, {"prompt": " go on", "max_tokens": 16, "temperature": 0, "session": sid})
            expected = generate_text(model, None, " go on", max_length=16, temperature=0, state=state)
            same += status == 200 and out["choices"][0]["text"] == expected and meta["requests"] == len(log)
    finally:
        again.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
    return {"sessions_saved": len(saved), "continue_identically": f"{same}/{len(saved)}"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small counts, shipped model only (a smoke test)")
    ap.add_argument("--models", default=None, help="shipped,default (default: both; --quick: shipped)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--repeats", type=int, default=None, help="throughput: 1-then-8-client runs (default 5; --quick 3)")
    ap.add_argument("--throughput-only", action="store_true", help="only part 1 (throughput)")
    args = ap.parse_args(argv)
    models = (args.models or ("shipped" if args.quick else "shipped,default")).split(",")
    q = args.quick
    out = {"machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}, "quick": q, "throughput": {}}
    tmp = tempfile.mkdtemp(prefix="bench-serve-models-")
    try:
        for name in models:
            if name == "shipped":
                model_dir, n = SHIPPED, 64 if q else 512
            else:
                model_dir, n = os.path.join(tmp, "default-174m"), 16 if q else 64
                THLModel(THLConfig(), seed=0).save_pretrained(model_dir)
            out["throughput"][name] = throughput(model_dir, n, repeats=args.repeats or (3 if q else 5))
            print(f"throughput {name}: {json.dumps(out['throughput'][name])}", flush=True)
            if name != "shipped":
                shutil.rmtree(model_dir, ignore_errors=True)
        if args.throughput_only:
            return out
        out["ttft"] = ttft(SHIPPED, 1000 if q else 10_000, 3 if q else 9)
        print(f"ttft: {json.dumps(out['ttft'])}", flush=True)
        out["load"] = load_test(SHIPPED, 8 if q else 64, 5 if q else 20)
        print(f"load: {json.dumps(out['load'])}", flush=True)
        out["kill_9"] = kill_restore(SHIPPED, 4 if q else 16, 10 if q else 40)
        print(f"kill -9: {json.dumps(out['kill_9'])}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
