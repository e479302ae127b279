"""`thl-np serve`: the OpenAI-compatible server (thl_np.serve), on uvicorn. Needs the [serve] extra."""
from __future__ import annotations

import ipaddress
import os
import shutil
import sys
import tempfile

import click

from ..errors import InputError

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _need_serve_extra():
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise InputError(f"thl-np serve needs the [serve] extra ({exc.name} is missing): "
                         "pip install 'thl-np[serve]'") from None


@click.command(context_settings={"max_content_width": 100})
@click.option("--model", "model_dir", default=None, metavar="DIR",
              help="Model folder or training run (default: the shipped model).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but a loopback address needs --api-key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port (0: a free one, printed at start).")
@click.option("--api-key", envvar="THL_NP_API_KEY", default=None, metavar="KEY",
              help="Require 'Authorization: Bearer KEY' on every route but /health (env THL_NP_API_KEY).")
@click.option("--state-dir", default=None, metavar="DIR",
              help="Keep sessions here: written at each request's end, restored after a restart. Default: a "
                   "temporary folder removed at exit.")
@click.option("--max-sessions", type=click.IntRange(min=1), default=256, show_default=True,
              help="Sessions kept in memory; the least recently used others are read back from disk.")
@click.option("--prefix-cache", type=click.IntRange(min=0), default=32, show_default=True,
              help="Prompt prefixes whose states are kept (0: none).")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Requests stepped together in one batch.")
@click.option("--align-steps", type=click.IntRange(min=0), default=32, show_default=True,
              help="A batch up to this many steps ahead of another waits for it, so the two merge (0: never; "
                   "half the clock's period, 64 steps for the shipped model, merges any two).")
@click.option("--max-queue", type=click.IntRange(min=1), default=64, show_default=True,
              help="Requests queued or running; more get HTTP 429.")
@click.option("--max-body", type=click.IntRange(min=1024), default=1 << 20, show_default=True,
              help="Largest JSON request body, bytes (HTTP 413 above).")
@click.option("--max-prompt", type=click.IntRange(min=1), default=100_000, show_default=True,
              help="Longest prompt, tokens (bytes).")
@click.option("--max-tokens", "max_tokens_limit", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Largest max_tokens a request may ask for.")
@click.option("--stream-interval", type=click.FloatRange(0, 1), default=0.005, show_default=True,
              help="Seconds between two text chunks of a stream, at least: the tokens made meanwhile go as one "
                   "chunk (0: a chunk as soon as a token is made).")
@click.option("--shutdown-grace", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="On SIGTERM / Ctrl-C: seconds in-flight requests get to finish before they are cancelled.")
def serve(model_dir, host, port, api_key, state_dir, max_sessions, prefix_cache, max_batch, align_steps, max_queue,
          max_body, max_prompt, max_tokens_limit, stream_interval, shutdown_grace):
    """Serve a model over the OpenAI API (completions, chat, streaming), with sessions.

    A request may name a "session" (an extension field): the server keeps that conversation's state, so the
    next request sends only its new text. See docs/SERVING.md.

    \b
    Examples:
      thl-np serve
      thl-np serve --model runs/mine --port 8080 --state-dir sessions/
      thl-np serve --host 0.0.0.0 --api-key "$(cat key.txt)"
      curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
           -d '{"model": "default", "prompt": "def fib(n):", "max_tokens": 40}'
    """
    _need_serve_extra()
    if not is_loopback(host) and not api_key:
        raise InputError(f"--host {host} is not a loopback address: give --api-key KEY (or THL_NP_API_KEY) so "
                         "that only your clients can use the server")
    from ..io.folder import resolve_model_dir, run_lock

    model_path = resolve_model_dir(model_dir)
    if state_dir is not None:
        if os.path.exists(state_dir) and not os.path.isdir(state_dir):
            raise InputError(f"--state-dir {state_dir} is a file: give a folder")
        os.makedirs(state_dir, exist_ok=True)
        if not os.access(state_dir, os.W_OK):
            raise InputError(f"--state-dir {state_dir} is not writable")
    temp_dir = tempfile.mkdtemp(prefix="thl-np-sessions-") if state_dir is None else None
    try:
        with run_lock(state_dir or temp_dir):  # one server per state folder
            _run(model_path, model_dir, host, port, api_key, state_dir or temp_dir, max_sessions, prefix_cache,
                 max_batch, align_steps, max_queue, max_body, max_prompt, max_tokens_limit, stream_interval,
                 shutdown_grace)
    finally:
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _run(model_path, model_dir, host, port, api_key, sessions_dir, max_sessions, prefix_cache, max_batch,
         align_steps, max_queue, max_body, max_prompt, max_tokens_limit, stream_interval, shutdown_grace):
    import uvicorn

    from ..serve.app import Limits, Server, create_app, default_model_id

    def load():
        from ..serve.engine import Engine, load_engine

        return load_engine(model_path, sessions_dir, max_sessions=max_sessions, prefix_cache=prefix_cache,
                           max_batch=max_batch, max_queue=max_queue, align_steps=align_steps,
                           engine_class=Engine)

    server = Server(load, default_model_id(model_dir if model_dir not in (None, "default") else None),
                    Limits(max_body=max_body, max_prompt=max_prompt, max_tokens=max_tokens_limit,
                           stream_interval=stream_interval), api_key,
                    announce=lambda line: click.echo(f"thl-np serve: {line}", err=True))
    config = uvicorn.Config(create_app(server), host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=shutdown_grace, lifespan="on")
    web = uvicorn.Server(config)

    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): choose another --port") from None
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"thl-np serve: {server.model_id} on http://{shown}:{bound}/v1 (sessions in {sessions_dir}); "
               "loading the model...", err=True)
    sys.stderr.flush()
    import signal

    # uvicorn turns SIGTERM into a graceful shutdown, then raises it again once done: answered here, so the
    # command returns normally (its state folder's lock released) instead of dying by the signal
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        web.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    click.echo("thl-np serve: stopped", err=True)


COMMANDS = [serve]
