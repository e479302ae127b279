"""`thl-np serve` on loopback, driven by the official `openai` client (completions, chat, streaming, errors)
and by plain HTTP (httpx: sessions, health, the status codes); the engine's batches against single steps."""
from __future__ import annotations

import io
import json
import os
import re
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from serve_helpers import TIMEOUT, LiveServer, tiny_model_dir, wait_for

from thl_np import THLModel
from thl_np.generation import StopScanner, generate_text
from thl_np.serve.app import Limits
from thl_np.serve.engine import Group, Job, Request
from thl_np.serve.sessions import META_KEY, Session
from thl_np.serve.text import CHAT_STOP, chat_prompt

openai = pytest.importorskip("openai")  # in the [test] extra: CI runs these


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("serve-model"))


@pytest.fixture(scope="module")
def model(model_dir):
    return THLModel.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def live(model_dir, tmp_path_factory):
    server = LiveServer(model_dir, str(tmp_path_factory.mktemp("sessions")), max_sessions=2, prefix_cache=8,
                        max_batch=8, max_queue=32, limits=Limits(max_body=20_000, max_prompt=5_000, max_tokens=500))
    server.start()
    yield server
    server.stop()


def greedy(model, prompt, n, state=None, return_state=False):
    return generate_text(model, None, prompt, max_length=n, temperature=0, state=state, return_state=return_state)


# ---------------------------------------------------------------------------------------------- the client
def test_completion_equals_generate_text(live, model):
    client = live.openai()
    r = client.completions.create(model="tiny", prompt="def fib(n):", max_tokens=30, temperature=0)
    assert r.choices[0].text == greedy(model, "def fib(n):", 30)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(b"def fib(n):") and r.usage.completion_tokens <= 30
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_seeded_sampling_is_reproducible(live):
    client = live.openai()
    kw = dict(model="tiny", prompt="abc", max_tokens=20, temperature=0.9, top_k=40, top_p=0.9, seed=7)
    a = client.completions.create(**{k: v for k, v in kw.items() if k != "top_k"}, extra_body={"top_k": 40})
    b = client.completions.create(**{k: v for k, v in kw.items() if k != "top_k"}, extra_body={"top_k": 40})
    assert a.choices[0].text == b.choices[0].text


def test_chat_uses_the_documented_template(live, model):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    header, prompt = chat_prompt([("system", "Be brief."), ("user", "Hi")])
    assert prompt == "System: Be brief.\nUser: Hi\nAssistant:" and header == "System: Be brief.\n"
    r = live.openai().chat.completions.create(model="tiny", messages=msgs, max_tokens=25, temperature=0)
    full = greedy(model, prompt, 25)
    cut = full.find(CHAT_STOP)
    assert r.choices[0].message.content == (full if cut < 0 else full[:cut])
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(prompt.encode())


def test_stop_string_cuts_the_text(live, model):
    full = greedy(model, "stop here:", 40)
    stop = full[10:12]
    r = live.openai().completions.create(model="tiny", prompt="stop here:", max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.find(stop)]
    assert r.choices[0].finish_reason == "stop"


@given(st.text("ab\n", max_size=30), st.lists(st.text("ab\n", min_size=1, max_size=3), max_size=3),
       st.lists(st.integers(1, 5), min_size=1, max_size=30))
def test_stop_scanner_cuts_before_the_first_stop(text, stops, sizes):
    pieces, i, k = [], 0, 0
    while i < len(text):
        n = sizes[k % len(sizes)]
        pieces.append(text[i:i + n])
        i, k = i + n, k + 1
    scanner = StopScanner(stops)
    shown = "".join(scanner.push(p) for p in pieces) + scanner.flush()
    ends = [(end, end - len(s)) for end in range(len(text) + 1) for s in stops
            if len(s) <= end and text[end - len(s):end] == s]
    first = min(ends, default=None)
    assert shown == (text[:first[1]] if first else text)
    assert scanner.stopped == bool(ends) and not any(s in shown for s in stops)


def test_streaming_with_the_client_and_raw_sse_framing(live, model):
    client = live.openai()
    chunks = list(client.completions.create(model="tiny", prompt="stream", max_tokens=30, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == greedy(model, "stream", 30)
    assert chunks[-1].choices[0].finish_reason is not None and chunks[-1].usage.completion_tokens <= 30
    chat = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "yo"}],
                                               max_tokens=10, temperature=0, stream=True,
                                               stream_options={"include_usage": True}))
    assert chat[0].choices[0].delta.role == "assistant"
    assert chat[-1].choices == [] and chat[-1].usage.prompt_tokens == len(chat_prompt([("user", "yo")])[1])
    with httpx.stream("POST", f"{live.url}/v1/completions", timeout=TIMEOUT,
                      json={"model": "tiny", "prompt": "stream", "max_tokens": 30, "temperature": 0,
                            "stream": True}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert "".join(p["choices"][0]["text"] for p in payloads) == greedy(model, "stream", 30)
    assert payloads[-1]["usage"]["prompt_tokens"] == len(b"stream")
    assert payloads[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_readme_snippet_prints_a_completion_from_the_shipped_model(tmp_path, capsys):
    """The README's Serving snippet (a ```py block: it needs a server, so test_readme's runner of ```python
    blocks leaves it to this test), against the shipped model on a free port instead of 8000."""
    from thl_np.io.folder import DEFAULT_MODEL_DIR

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Serving"):]
    snippet = re.search(r"```py\n(.*?)```", section, flags=re.S).group(1)
    assert "http://127.0.0.1:8000/v1" in snippet
    server = LiveServer(str(DEFAULT_MODEL_DIR), str(tmp_path), model_id="default").start()
    try:
        exec(compile(snippet.replace("http://127.0.0.1:8000/v1", f"{server.url}/v1"), "README.md", "exec"), {})
    finally:
        server.stop()
    model = THLModel.from_pretrained(str(DEFAULT_MODEL_DIR))
    printed = capsys.readouterr().out
    assert printed == greedy(model, "def fibonacci(n):", 40) + "\n" and printed.strip()


def test_serve_command_refuses_an_open_address_without_a_key(capsys):
    from thl_np.cli import main

    assert main(["serve", "--host", "0.0.0.0"]) == 1
    assert "--api-key" in capsys.readouterr().err
    assert main(["serve", "--help"]) == 0
    assert "Examples:" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- errors
def test_errors_are_openai_objects_with_the_right_status(live):
    client = live.openai()
    bad = [dict(max_tokens=0), dict(max_tokens=501), dict(temperature=-1), dict(temperature="hot"), dict(n=2),
           dict(stop=["a", "b", "c", "d", "e"]), dict(top_p=0), dict(extra_body={"session": "../etc"}),
           dict(prompt="x" * 5_001)]
    for kw in bad:
        args = dict(model="tiny", prompt="x", max_tokens=5)
        args.update(kw)
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(**args)
        assert err.value.status_code == 400 and err.value.body["type"] == "invalid_request_error", kw
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])
    r = httpx.get(f"{live.url}/v1/nothing-here", timeout=TIMEOUT)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.post(f"{live.url}/v1/completions", content=b"{not json", timeout=TIMEOUT)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{live.url}/v1/completions", timeout=TIMEOUT,
                   json={"model": "tiny", "prompt": "x" * 30_000})
    assert r.status_code == 413 and r.json()["error"]["message"]
    r = httpx.delete(f"{live.url}/v1/models", timeout=TIMEOUT)
    assert r.status_code == 405 and "error" in r.json()


def test_api_key_is_required_when_set(model_dir, tmp_path):
    server = LiveServer(model_dir, str(tmp_path), api_key="sesame").start()
    try:
        with pytest.raises(openai.AuthenticationError):
            server.openai("wrong").completions.create(model="tiny", prompt="x", max_tokens=2)
        assert httpx.get(f"{server.url}/v1/models", timeout=TIMEOUT).status_code == 401
        assert server.health()["status"] == "ok"  # health needs no key
        r = server.openai("sesame").completions.create(model="tiny", prompt="x", max_tokens=2)
        assert r.usage.completion_tokens >= 1
    finally:
        server.stop()


def test_503_while_loading_then_ready(model_dir, tmp_path):
    from thl_np.serve.engine import load_engine

    release = threading.Event()

    def slow_load():
        assert release.wait(TIMEOUT)
        return load_engine(model_dir, str(tmp_path))

    server = LiveServer(load=slow_load).start(wait_model=False)
    try:
        assert httpx.get(f"{server.url}/health", timeout=TIMEOUT).status_code == 503
        with pytest.raises(openai.InternalServerError) as err:
            server.openai().completions.create(model="tiny", prompt="x", max_tokens=2)
        assert err.value.status_code == 503
        release.set()
        wait_for(lambda: httpx.get(f"{server.url}/health", timeout=TIMEOUT).status_code == 200, what="loading")
    finally:
        release.set()
        server.stop()


def test_429_when_full_and_a_disconnect_frees_the_slot(model_dir, tmp_path):
    server = LiveServer(model_dir, str(tmp_path), max_queue=1, limits=Limits(max_tokens=10**7)).start()
    try:  # greedy, 10 million tokens: still running while the test looks
        body = {"model": "tiny", "prompt": "long", "max_tokens": 10**7, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=TIMEOUT) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")  # the request is running
            r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "x"}, timeout=TIMEOUT)
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        # the client went away mid-stream: its row is dropped at the next step
        wait_for(lambda: server.health()["queued_or_running"] == 0, what="the slot to be freed")
        r = server.openai().completions.create(model="tiny", prompt="x", max_tokens=3)
        assert r.usage.completion_tokens >= 1
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------- sessions
def test_session_continues_without_reprocessing(live, model):
    client = live.openai()
    a = client.completions.create(model="tiny", prompt="Once upon", max_tokens=12, temperature=0,
                                  extra_body={"session": "story"})
    b = client.completions.create(model="tiny", prompt=" a time", max_tokens=12, temperature=0,
                                  extra_body={"session": "story"})
    text1, state1 = greedy(model, "Once upon", 12, return_state=True)
    assert a.choices[0].text == text1
    assert b.choices[0].text == greedy(model, " a time", 12, state=state1)
    # the second request fed its own text and the first request's last token, nothing more
    assert b.usage.prompt_tokens == 1 + len(b" a time")
    assert b.model_extra["session"] == {"id": "story", "requests": 2,
                                        "tokens": len(b"Once upon") + 12 + len(b" a time") + 12}


def test_session_export_import_and_checks(live, model):
    client = live.openai()
    client.completions.create(model="tiny", prompt="ABC", max_tokens=5, temperature=0, extra_body={"session": "orig"})
    data = httpx.get(f"{live.url}/v1/sessions/orig", timeout=TIMEOUT).content
    r = httpx.put(f"{live.url}/v1/sessions/copy", content=data, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["requests"] == 1
    outs = [client.completions.create(model="tiny", prompt="DEF", max_tokens=8, temperature=0,
                                      extra_body={"session": s}).choices[0].text for s in ("orig", "copy")]
    assert outs[0] == outs[1]
    ids = [s["id"] for s in httpx.get(f"{live.url}/v1/sessions", timeout=TIMEOUT).json()["data"]]
    assert {"orig", "copy"} <= set(ids)
    # another config's session, a damaged file, a NaN: 400 with the reason; nothing is stored
    with np.load(io.BytesIO(data)) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays[META_KEY].tobytes())
    for change, word in ((lambda a: a.update({META_KEY: _meta(meta, fingerprint="0" * 16)}), "another model config"),
                         (lambda a: a["memory"].fill(np.nan), "non-finite"),
                         (lambda a: a.pop("read_ema"), "state keys")):
        bad = {k: v.copy() for k, v in arrays.items()}
        change(bad)
        buf = io.BytesIO()
        np.savez(buf, **bad)
        r = httpx.put(f"{live.url}/v1/sessions/bad", content=buf.getvalue(), timeout=TIMEOUT)
        assert r.status_code == 400 and word in r.json()["error"]["message"], r.text
    assert httpx.put(f"{live.url}/v1/sessions/bad", content=b"junk", timeout=TIMEOUT).status_code == 400
    assert httpx.get(f"{live.url}/v1/sessions/bad", timeout=TIMEOUT).status_code == 404
    assert httpx.delete(f"{live.url}/v1/sessions/copy", timeout=TIMEOUT).status_code == 200
    assert httpx.get(f"{live.url}/v1/sessions/copy", timeout=TIMEOUT).status_code == 404


def test_requests_on_one_session_run_in_turn_and_a_damaged_file_is_a_500(live):
    results = []

    def run(prompt):
        r = httpx.post(f"{live.url}/v1/completions", timeout=TIMEOUT, json={
            "model": "tiny", "prompt": prompt, "max_tokens": 20, "session": "shared"})
        results.append(r.json()["session"]["requests"])

    threads = [threading.Thread(target=run, args=(p,)) for p in ("one", "two", "three")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert sorted(results) == [1, 2, 3]  # each saw the commits of those before it
    sessions_dir = live.server.engine.sessions.directory
    with open(os.path.join(sessions_dir, "broken.session.npz"), "wb") as f:
        f.write(b"not a zip")
    r = httpx.post(f"{live.url}/v1/completions", json={"model": "tiny", "prompt": "x", "session": "broken"},
                   timeout=TIMEOUT)
    assert r.status_code == 500 and "not a session .npz" in r.json()["error"]["message"]
    assert live.openai().completions.create(model="tiny", prompt="still fine", max_tokens=2).usage.total_tokens > 0


def _meta(meta, **change):
    return np.frombuffer(json.dumps({**meta, **change}).encode(), np.uint8)


def test_sessions_spill_to_disk_beyond_max_sessions(live, model):
    client = live.openai()
    for i in range(4):  # the live server keeps 2 in memory
        client.completions.create(model="tiny", prompt=f"s{i}", max_tokens=4, temperature=0,
                                  extra_body={"session": f"spill{i}"})
    assert live.health()["sessions_in_memory"] <= 2
    r = client.completions.create(model="tiny", prompt="!", max_tokens=6, temperature=0,
                                  extra_body={"session": "spill0"})
    _, state = greedy(model, "s0", 4, return_state=True)
    assert r.choices[0].text == greedy(model, "!", 6, state=state)


def test_prefix_cache_reports_cached_tokens(live, model):
    client = live.openai()
    head = "A long shared few-shot header. " * 3
    client.completions.create(model="tiny", prompt=head, max_tokens=2, temperature=0)
    r = client.completions.create(model="tiny", prompt=head + "and more", max_tokens=10, temperature=0)
    assert r.usage.prompt_tokens_details.cached_tokens == len(head.encode())
    assert r.choices[0].text == greedy(model, head + "and more", 10)
    # a chat's earlier messages are a cached prefix of its next request
    sys_msg = {"role": "system", "content": "You answer in French. " * 2}
    client.chat.completions.create(model="tiny", messages=[sys_msg, {"role": "user", "content": "a"}], max_tokens=2)
    r = client.chat.completions.create(model="tiny", messages=[sys_msg, {"role": "user", "content": "b"}],
                                       max_tokens=8, temperature=0)
    header, prompt = chat_prompt([("system", sys_msg["content"]), ("user", "b")])
    assert r.usage.prompt_tokens_details.cached_tokens == len(header.encode())
    full = greedy(model, prompt, 8)
    assert r.choices[0].message.content == full[:full.find(CHAT_STOP)] if CHAT_STOP in full else full


# ---------------------------------------------------------------------------------------------- batching
def _states(model, lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        decoder = model.decoder(None, 1)
        decoder.prompt(rng.integers(0, 256, (1, n)), logits="none")
        out.append(decoder.state())
    return out


@settings(max_examples=examples(6), deadline=None)
@given(st.integers(0, 3), st.lists(st.integers(0, 4), min_size=1, max_size=4), st.integers(0, 2**32 - 1),
       st.booleans())
def test_a_batch_steps_each_row_as_it_would_step_alone(model, offset, periods, seed, shared_weights):
    """Rows at different timesteps of one phase share a batch (their step numbers shifted): logits equal
    single-request logits to 1e-5 (float32) at every step, and the states taken back out equal too; with
    the batch's decoder made from the model or from a template whose weights it shares (the server's)."""
    period, window = 4, model.config.local_window
    states = _states(model, [window + offset + k * period for k in periods], seed)
    jobs = []
    for s in states:
        job = Job(Request(np.zeros(1, np.int64)), lambda *a: None)
        job.state, job.pending = s, 0
        jobs.append(job)
    group = Group(model, jobs, model.decoder(None, 1) if shared_weights else None)
    rng = np.random.default_rng(seed)
    singles = list(states)
    for _ in range(2 * period + 1):
        tokens = rng.integers(0, 256, len(jobs))
        for j, t in zip(jobs, tokens, strict=True):
            j.pending = int(t)
        batch_logits = group.step()
        for b, t in enumerate(tokens):
            logits, singles[b] = model.forward_step(np.array([t]), singles[b])
            np.testing.assert_allclose(batch_logits[b], logits[0], rtol=0, atol=1e-5)
    for mine, single in zip(group.split(), singles, strict=True):
        assert mine.timestep == single.timestep
        for key, value in single.arrays().items():
            np.testing.assert_allclose(mine.arrays()[key], value, rtol=0, atol=1e-5, err_msg=key)


def test_a_request_joining_later_catches_up_and_shares_the_batch(model, tmp_path):
    """The engine's ticks by hand: a request two steps ahead pauses until the newcomer's clock agrees, then
    the two run as one batch, and both texts are what each gives alone."""
    from thl_np.serve.engine import Engine
    from thl_np.serve.sessions import PrefixCache, SessionStore
    from thl_np.tokenizer import Tokenizer

    tok = Tokenizer()
    engine = Engine(model, tok, SessionStore(str(tmp_path), model.config), PrefixCache(0), align_steps=3)
    texts = {}

    def job(name, prompt):
        texts[name] = ""

        def emit(kind, payload):
            if kind == "text":
                texts[name] += payload
        return Job(Request(tok.encode(prompt), max_tokens=30, temperature=0), emit)

    engine._admit(job("a", "first prompt"))   # 12 bytes: a full window of 8
    for _ in range(2):
        engine._regroup()
        engine._step_all()
    engine._admit(job("b", "other prompt"))
    engine._regroup()
    assert len(engine._groups) == 2
    for _ in range(2):  # "a" waits while "b" catches up
        engine._step_all()
        engine._regroup()
    assert [len(g.jobs) for g in engine._groups] == [2]
    while engine._groups:
        engine._step_all()
        engine._regroup(leavers_only=True)
    assert texts == {"a": greedy(model, "first prompt", 30), "b": greedy(model, "other prompt", 30)}


def test_clients_gone_during_a_step_fail_nobody(model, tmp_path):
    """Every client of one batch disconnects while its step runs (the HTTP side sets ``cancelled`` from
    another thread): that batch is answered "cancelled", and the other batch runs on to its texts (found
    by the load benchmark: sampling the empty batch raised, which failed every running request)."""
    from thl_np.serve.engine import Engine
    from thl_np.serve.sessions import PrefixCache, SessionStore
    from thl_np.tokenizer import Tokenizer

    tok = Tokenizer()
    engine = Engine(model, tok, SessionStore(str(tmp_path), model.config), PrefixCache(0), align_steps=0)
    events, texts = {}, {}

    def job(name, prompt):
        events[name], texts[name] = [], ""

        def emit(kind, payload):
            events[name].append(kind)
            if kind == "text":
                texts[name] += payload
        return Job(Request(tok.encode(prompt), max_tokens=20, temperature=0), emit)

    gone = [job("a", "first prompt"), job("b", "other prompt")]
    for j in gone:
        engine._admit(j)
    engine._regroup()
    engine._step_all()
    engine._regroup()
    engine._admit(job("c", "third prompt, later"))
    engine._regroup()
    assert len(engine._groups) == 2
    first = next(g for g in engine._groups if gone[0] in g.jobs)
    step = first.step

    def step_then_disconnect():
        logits = step()
        for j in gone:
            j.cancel()
        return logits
    first.step = step_then_disconnect
    engine._step_all()
    while engine._groups:
        engine._regroup(leavers_only=True)
        engine._step_all()
    assert "error" not in events["a"] + events["b"] + events["c"]
    assert events["a"][-1] == events["b"][-1] == "cancelled"
    assert events["c"][-1] == "done" and texts["c"] == greedy(model, "third prompt, later", 20)


def test_sampled_rows_of_a_batch_draw_what_generate_text_draws_with_their_seeds(model, tmp_path):
    """One batch mixing greedy, plain sampled and filtered rows (sample_rows takes each kind its own way):
    each request's text is generate_text's with its seed."""
    from thl_np.serve.engine import Engine
    from thl_np.serve.sessions import PrefixCache, SessionStore
    from thl_np.tokenizer import Tokenizer

    tok = Tokenizer()
    engine = Engine(model, tok, SessionStore(str(tmp_path), model.config), PrefixCache(0))
    settings_ = [dict(temperature=0.8, seed=1), dict(temperature=1.0, seed=2), dict(temperature=0),
                 dict(temperature=0.9, top_k=40, top_p=0.9, seed=3), dict(temperature=1.3, seed=4)]
    texts = [""] * len(settings_)

    def emit(i):
        def put(kind, payload):
            if kind == "text":
                texts[i] += payload
        return put
    for i, kw in enumerate(settings_):
        engine._admit(Job(Request(tok.encode(f"row {i}:"), max_tokens=40, **kw), emit(i)))
    engine._regroup()
    assert [len(g.jobs) for g in engine._groups] == [len(settings_)]
    while engine._groups:
        engine._step_all()
        engine._regroup(leavers_only=True)
    assert texts == [generate_text(model, None, f"row {i}:", max_length=40, **kw) for i, kw in enumerate(settings_)]


def test_concurrent_requests_are_batched_and_unchanged(live, model):
    prompts = [f"job {i}!" for i in range(6)]  # one length: one phase, one batch
    before = live.health()
    results = [None] * len(prompts)

    def run(i):
        r = live.openai().completions.create(model="tiny", prompt=prompts[i], max_tokens=40, temperature=0)
        results[i] = r.choices[0].text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert results == [greedy(model, p, 40) for p in prompts]
    after = live.health()
    steps, rows = after["steps"] - before["steps"], after["rows_stepped"] - before["rows_stepped"]
    assert rows > steps  # some steps ran several requests at once


def test_session_file_round_trip(model):
    from thl_np.serve.sessions import config_fingerprint

    (state,) = _states(model, [5])
    s = Session(state, [3, 4], 2, 11)
    fp = config_fingerprint(model.config)
    back = Session.from_bytes(s.to_bytes(fp), model.config, fp)
    assert (back.pending, back.requests, back.tokens) == ([3, 4], 2, 11)
    for key, value in state.arrays().items():
        np.testing.assert_array_equal(back.state.arrays()[key], value)


def test_the_relay_delivers_every_event_in_order_with_one_wake_up_per_burst():
    import asyncio

    from thl_np.serve.app import _Relay

    async def main():
        loop = asyncio.get_running_loop()
        relay = _Relay(loop)
        wakes = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: (wakes.append(1), real(*a))[1]
        queues = [asyncio.Queue() for _ in range(8)]

        def worker():  # 50 "steps" of 8 rows, as the engine posts them
            for step in range(50):
                for i, q in enumerate(queues):
                    assert relay.post(q, (i, step))
        t = threading.Thread(target=worker)
        t.start()
        t.join()  # the loop is busy meanwhile (as it is writing a step's chunks): every post rides one wake-up
        await asyncio.sleep(0)
        got = [[q.get_nowait() for _ in range(q.qsize())] for q in queues]
        assert got == [[(i, s) for s in range(50)] for i in range(8)]
        assert len(wakes) == 1
        assert relay.post(queues[0], "next")  # delivered: the next post wakes the loop again
        await asyncio.sleep(0)
        assert len(wakes) == 2 and queues[0].get_nowait() == "next"
        return relay

    relay = asyncio.run(main())
    assert relay.post(asyncio.Queue(), "late") is False  # the loop has closed: the job gets cancelled


def test_a_stream_sends_its_first_text_at_once_then_a_chunk_per_interval_at_most():
    import asyncio

    from thl_np.serve.app import _Shape, _sse

    async def main():
        events = asyncio.Queue()

        async def worker():  # a token a millisecond, as the engine makes them
            for i in range(60):
                events.put_nowait(("text", f"{i},"))
                await asyncio.sleep(0.001)
            events.put_nowait(("done", {"finish_reason": "length", "prompt_tokens": 1, "completion_tokens": 60,
                                        "cached_tokens": 0}))
        job = Job(Request(np.array([65])), lambda *a: None)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        producer = asyncio.ensure_future(worker())
        lines = [line async for line in _sse(job, events, _Shape("cmpl-x", 0, "tiny", False), False, 0.02)]
        await producer
        return lines, loop.time() - t0

    lines, elapsed = asyncio.run(main())
    assert lines[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    texts = [c["choices"][0]["text"] for c in chunks[:-1]]
    assert "".join(texts) == "".join(f"{i}," for i in range(60)) and chunks[-1]["usage"]["completion_tokens"] == 60
    assert texts[0] == "0,"  # not held back: the time to the first token is unchanged
    assert 2 <= len(texts) <= elapsed / 0.02 + 1


def test_batches_spread_around_the_clock_all_merge(model, tmp_path):
    """Three batches a third of the clock apart (each ahead of another): one steps alone until it catches up
    with the batch ahead of it, and so on, until every request runs in one batch; texts unchanged."""
    from thl_np.serve.engine import Engine
    from thl_np.serve.sessions import PrefixCache, SessionStore
    from thl_np.tokenizer import Tokenizer

    tok = Tokenizer()
    engine = Engine(model, tok, SessionStore(str(tmp_path), model.config), PrefixCache(0), align_steps=2)
    period, window = engine.period, model.config.local_window
    assert period == 4
    texts = {}

    def job(name, prompt):
        texts[name] = ""

        def emit(kind, payload):
            if kind == "text":
                texts[name] += payload
        return Job(Request(tok.encode(prompt), max_tokens=40, temperature=0), emit)

    prompts = {name: "x" * (window + k) for name, k in (("a", 0), ("b", 1), ("c", 3))}  # clocks 0, 1, 3 of 4
    for name, prompt in prompts.items():
        engine._admit(job(name, prompt))
    engine._regroup()
    assert len(engine._groups) == 3
    for _ in range(8):
        engine._step_all()
        engine._regroup()
    assert [len(g.jobs) for g in engine._groups] == [3]
    while engine._groups:
        engine._step_all()
        engine._regroup(leavers_only=True)
    assert texts == {name: greedy(model, prompt, 40) for name, prompt in prompts.items()}
