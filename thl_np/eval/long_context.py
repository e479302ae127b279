"""Evaluations that show what a bounded state does with a long context.

- **Passkey retrieval** (:func:`passkey_eval`): a random 5-digit key is hidden at a chosen (or random)
  depth of a haystack (filler lines, or real Python source: ``thl_np.training.haystack``), a question follows at
  the end ("... the pass key is "), and the model greedily writes 5 bytes.
  Accuracy over seeded trials at each context length, with a chance baseline, the process's resident
  memory and the THL state's bytes (fixed by the config, whatever the length). A finer signal than the
  greedy answer: the key's digits scored teacher-forced (bits per digit among the ten digits) against a
  control prompt that carries another key; lower bits than the control mean the key reached the question.
- **Memory against context length** (:func:`memory_vs_context`, :func:`plot_memory`): the memory a THL
  decoding session holds after T tokens (measured), against the key/value cache a Transformer of the same
  width and depth would hold after T tokens (computed: ``2 · layers · T · d · bytes per value``).

Both run the fast decoding session (``model.decoder(batch_size=1)``), one token per step, with eval-mode
routing. Resident memory is read from ``/proc/self/status`` (Linux; ``None`` elsewhere). The plot needs
matplotlib (the optional ``[plot]`` extra); nothing else here does.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np

from ..checks import NON_FINITE_OUTPUT, check_metric, check_seed, require_matplotlib
from ..components.output import log_softmax
from ..errors import InputError, WeightsError
from ..training.haystack import FILLERS, KEY_DIGITS, Haystack, depth_label, filler_text, haystack_prompt, parse_depth

#: Chance level of a guess: a uniform digit is right 1 time in 10, a whole 5-digit key 1 in 10^5.
CHANCE_PER_DIGIT = 0.1
CHANCE_EXACT = 10.0**-KEY_DIGITS
CHANCE_BITS_PER_DIGIT = math.log2(10)
DEFAULT_LENGTHS = (256, 1024, 4096)
DEFAULT_PLOT_LENGTHS = (256, 1024, 4096, 16384, 65536)

# ---------------------------------------------------------------------------------------- memory figures
def rss_bytes() -> dict:
    """This process's resident memory from /proc/self/status: ``{"rss": VmRSS, "peak": VmHWM}`` in bytes
    (``None`` values where the file does not exist, as on macOS or Windows)."""
    out = {"rss": None, "peak": None}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out["rss" if key == "VmRSS" else "peak"] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def session_bytes(decoder) -> int:
    """Bytes of the arrays a decoding session owns (the state, its key/norm caches, the local ring, per-step
    scratch), weights excluded. Like the state, fixed by the config and batch size."""
    from ..engines.decoder import _SHARED_WEIGHTS
    from ..state import InferenceState

    return int(sum(v.nbytes for k, v in vars(decoder).items()
                   if isinstance(v, InferenceState) or (isinstance(v, np.ndarray) and k not in _SHARED_WEIGHTS)))


def matched_transformer(config) -> dict:
    """The Transformer the memory comparison is made against: as many layers as THL has tiers, each of
    THL's model width (``embedding_dim``), caching a key and a value of that width per layer and token."""
    return {"layers": int(config.num_tiers), "width": int(config.embedding_dim)}


def kv_cache_bytes(layers: int, width: int, tokens: int, bytes_per_value: int = 4) -> int:
    """Key/value cache of a decoder-only Transformer after ``tokens`` tokens, batch 1:
    ``2 (K and V) · layers · tokens · width · bytes_per_value``."""
    for name, v in (("layers", layers), ("width", width), ("tokens", tokens), ("bytes_per_value", bytes_per_value)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise InputError(f"{name} = {v!r} must be an integer >= 0")
    return 2 * int(layers) * int(tokens) * int(width) * int(bytes_per_value)


# ---------------------------------------------------------------------------------------- passkey
def _check_lengths(lengths) -> list[int]:
    try:
        out = [int(n) for n in lengths]
    except (TypeError, ValueError):
        raise InputError(f"lengths = {lengths!r} must be a list of integers (bytes of context)") from None
    if not out or any(n < 1 for n in out):
        raise InputError(f"lengths = {lengths!r} must be a non-empty list of positive integers")
    return out


def _filler(kind: str) -> dict:
    if kind not in FILLERS:
        raise InputError(f"filler = {kind!r} is not known: use one of {sorted(FILLERS)}")
    return FILLERS[kind]


def passkey_prompt(length: int, key: str, depth: float = 0.5, filler: str = "python",
                   rng: np.random.Generator | None = None) -> tuple[str, int]:
    """A passkey prompt of exactly ``length`` ASCII bytes in filler lines (``python`` or ``prose``), and the
    byte offset where the key line starts.

    The prompt is filler (whole lines drawn at random, except the first, which may be cut: a window into a
    longer text), the key line (at the filler's line boundary nearest to ``depth`` of the filler: 0 = at
    the start, 1 = just before the question; or a range ``(lo, hi)``, ``thl_np.training.haystack.key_position``),
    more filler, then the question, which ends right where the key's digits should follow. The ``source``
    haystack (real Python source, bytes) is :func:`thl_np.training.haystack.haystack_prompt`'s.
    """
    _filler(filler)
    prompt, at = haystack_prompt(length, key, depth, Haystack(filler),
                                 rng if rng is not None else np.random.default_rng(0))
    return prompt.decode("ascii"), at


def decoding_session(model, path: str = "auto"):
    """A batch-1 decoding session on ``path``: "auto" (``model.decoder()``: fast where the components have
    kernels), "fast" (``FastDecoder``) or "plain" (``PlainDecoder``, the spec's composition)."""
    from ..model import choose_fast

    if path not in ("auto", "fast", "plain"):
        raise InputError(f"path = {path!r}: use 'auto', 'fast' or 'plain'")
    if path == "auto":
        return model.decoder(batch_size=1)
    if path == "plain" or not choose_fast(model.config, path):
        from ..engines.plain_decoder import PlainDecoder

        return PlainDecoder(model, batch_size=1)
    return model._decoder(None, 1)


def greedy_bytes(decoder, logits, n: int, vocab_limit: int = 256) -> list[int]:
    """Greedily pick ``n`` ids among the first ``vocab_limit`` (bytes), starting from ``logits`` [1, V]
    (the session's last position); each pick but the last is fed back to ``decoder``."""
    out = []
    for i in range(n):
        row = np.asarray(logits)[0, :vocab_limit]
        if not np.isfinite(row).all():  # argmax over NaN picks the NaN: the answer would be noise
            raise WeightsError(f"passkey: {NON_FINITE_OUTPUT}")
        tok = int(np.argmax(row))
        out.append(tok)
        if i < n - 1:
            logits = decoder.step(np.array([tok], dtype=np.int64))
    return out


def key_digit_scores(decoder, logits, key: str) -> tuple[float, int]:
    """Teacher-forced: feed the key's digits one by one and score each against the model's distribution
    restricted to the ten digit bytes. Returns (Σ −log2 p(right digit | digits), number of digits that are
    the most likely digit). Chance: log2(10) ≈ 3.32 bits and 1 in 10 per digit. More sensitive than the
    greedy answer: it shows whether the key's digits are favoured even when the model would not write
    digits at all."""
    bits, top = 0.0, 0
    zero = ord("0")
    for i, ch in enumerate(key):
        logp = log_softmax(np.asarray(logits, dtype=np.float64)[0, zero : zero + 10])
        d = ord(ch) - zero
        bits -= logp[d] / np.log(2)
        top += int(np.argmax(logp)) == d
        if i < len(key) - 1:
            logits = decoder.step(np.array([ord(ch)], dtype=np.int64))
    return float(bits), top


def passkey_eval(model, lengths=DEFAULT_LENGTHS, trials: int = 10, depth=0.5, seed: int = 0,
                 filler: str = "python", keep_samples: int = 3, progress=None, haystack_dir=None, on_trial=None,
                 path: str = "auto") -> dict:
    """Passkey retrieval accuracy at each context length (module docstring).

    The haystack (``thl_np.training.haystack``): ``filler`` "python" or "prose" (filler lines) or "source" (real
    Python source: thl-np's own sources, frozen, or the ``.py`` files of ``haystack_dir``); ``depth`` a fraction or
    a range ``(lo, hi)`` / ``"lo:hi"`` drawn uniformly per trial. Each row records every trial's key offset
    and depth (``key_depths``: the fraction of the haystack text before the key line).
    For each length, ``trials`` prompts (keys, haystack, depths: ``np.random.default_rng([seed, length])``,
    so a length's trials do not depend on the other lengths asked for; the training tasks draw from their
    own generator, ``thl_np.training.synthetic_tasks``) run each in a fresh decoding session on ``path``
    (:func:`decoding_session`; the fast and the plain session give the same answers).
    ``accuracy`` counts answers equal to the key; ``digit_accuracy`` counts digits in the right place.
    Teacher-forced (:func:`key_digit_scores`, chance 0.1 and log2 10 ≈ 3.32): ``forced_digit_accuracy``,
    how often the right digit is the most likely digit, and ``key_bits_per_digit``; the control,
    ``control_bits_per_digit``, scores the same key after the same prompt holding another key (every digit
    differs): the key's bits lower than the control's mean the model carried information about the key
    from the prompt to the question.
    ``rss_bytes`` is the process's VmRSS after the length's last prompt, ``state_bytes`` the THL state's
    (``InferenceState.nbytes``) and ``session_bytes`` the decoding session's arrays, both measured.
    ``progress``, if given, is called with each length's result row as it is done; ``on_trial(done, total)``
    after every trial (of all lengths' trials).
    """
    from ..tokenizer import Tokenizer

    lengths = _check_lengths(lengths)
    check_seed(seed)
    if isinstance(trials, bool) or not isinstance(trials, (int, np.integer)) or trials < 1:
        raise InputError(f"trials = {trials!r} must be an integer >= 1")
    depth = parse_depth(depth)
    hay = Haystack(filler, haystack_dir)
    for length in lengths:   # every length checked before the first trial runs
        hay.check_prompt(length)
    room = hay.room()
    tok = Tokenizer()
    limit = min(256, model.config.vocab_size)
    rows = []
    for length in lengths:
        rng = np.random.default_rng([int(seed), int(length)])
        t0 = time.perf_counter()
        exact = digits = forced_top = 0
        key_bits = control_bits = 0.0
        samples, offsets, depths = [], [], []
        for _ in range(trials):
            key = "".join(str(d) for d in rng.integers(0, 10, size=KEY_DIGITS))
            prompt, at = haystack_prompt(length, key, depth, hay, rng)
            offsets.append(at)
            depths.append(round(at / max(1, length - room), 4))
            dec = decoding_session(model, path)
            logits = dec.prompt(tok.encode(prompt)[None, :], logits="last")
            forced = dec.clone()
            answer = bytes(greedy_bytes(dec, logits, KEY_DIGITS, limit)).decode("latin-1")
            exact += answer == key
            digits += sum(a == b for a, b in zip(answer, key, strict=True))
            b, t = key_digit_scores(forced, logits, key)
            key_bits += b
            forced_top += t
            # control: the same prompt carrying another key; the right key's bits without its information
            decoy = "".join(str((int(d) + 1 + int(o)) % 10) for d, o in zip(key, rng.integers(0, 9, KEY_DIGITS),
                                                                            strict=True))
            ctrl = decoding_session(model, path)
            ctrl_logits = ctrl.prompt(tok.encode(prompt.replace(key.encode(), decoy.encode()))[None, :],
                                      logits="last")
            control_bits += key_digit_scores(ctrl, ctrl_logits, key)[0]
            if len(samples) < keep_samples:
                samples.append({"key": key, "answer": answer, "key_offset": at, "depth": depths[-1]})
            if on_trial is not None:
                on_trial(len(rows) * trials + len(offsets), len(lengths) * trials)
        state_bytes = dec.state().nbytes
        mem = rss_bytes()
        row = {"length": length, "trials": trials, "correct": exact, "accuracy": exact / trials,
               "digit_accuracy": digits / (trials * KEY_DIGITS),
               "forced_digit_accuracy": forced_top / (trials * KEY_DIGITS),
               "key_bits_per_digit": key_bits / (trials * KEY_DIGITS),
               "control_bits_per_digit": control_bits / (trials * KEY_DIGITS), "rss_bytes": mem["rss"],
               "rss_peak_bytes": mem["peak"], "state_bytes": int(state_bytes),
               "session_bytes": session_bytes(dec), "seconds": time.perf_counter() - t0,
               "key_offsets": offsets, "key_depths": depths, "samples": samples}
        for name in ("key_bits_per_digit", "control_bits_per_digit"):
            check_metric(f"passkey {name} at length {length}", row[name], NON_FINITE_OUTPUT, WeightsError)
        rows.append(row)
        if progress is not None:
            progress(row)
    return {"task": "passkey", "filler": filler, "haystack": hay.describe(), "depth": depth_label(depth),
            "trials": trials, "seed": seed,
            "key_digits": KEY_DIGITS, "chance": {"accuracy": CHANCE_EXACT, "digit_accuracy": CHANCE_PER_DIGIT,
                       "forced_digit_accuracy": CHANCE_PER_DIGIT, "key_bits_per_digit": CHANCE_BITS_PER_DIGIT},
            "decoding": "greedy, bytes only, fresh state per trial", "results": rows}


# ---------------------------------------------------------------------------------------- memory vs context
def memory_vs_context(model, lengths=DEFAULT_PLOT_LENGTHS, seed: int = 0, filler: str = "python",
                      progress=None) -> dict:
    """Measure a batch-1 decoding session after T tokens of filler text for each T in ``lengths`` (a fresh
    session per length), next to the computed KV cache of the matched Transformer.

    Rows: ``length``, ``state_bytes`` (``InferenceState.nbytes``), ``session_bytes`` (state + caches),
    ``rss_bytes`` (VmRSS after the T tokens), ``rss_growth_bytes`` (VmRSS after the T tokens minus after the
    session's first token: what reading them cost the process, page-granular, allocator noise included),
    ``kv_cache_bytes`` (float32) and ``kv_cache_bytes_float16`` (computed, not measured). A short warm-up
    run first loads the compiled kernels and the weights, so the first row does not carry them.
    """
    from ..tokenizer import Tokenizer

    lengths = _check_lengths(lengths)
    check_seed(seed)
    f = _filler(filler)
    tf = matched_transformer(model.config)
    tok = Tokenizer()
    rows = []
    # warm-up: Numba's compiled kernels and the weights' pages are loaded once, before any measurement
    model.decoder(batch_size=1).prompt(tok.encode(f["lines"][0])[None, :], logits="none")
    for length in lengths:
        rng = np.random.default_rng([int(seed), int(length)])
        ids = tok.encode(filler_text(rng, f["lines"], length)[:length])[None, :]
        t0 = time.perf_counter()
        dec = model.decoder(batch_size=1)
        dec.prompt(ids[:, :1], logits="none")
        before = rss_bytes()["rss"]
        if length > 1:
            dec.prompt(ids[:, 1:], logits="none")
        after = rss_bytes()["rss"]
        seconds = time.perf_counter() - t0
        rows.append({
            "length": length, "state_bytes": int(dec.state().nbytes), "session_bytes": session_bytes(dec),
            "rss_bytes": after, "rss_growth_bytes": None if after is None else after - before,
            "kv_cache_bytes": kv_cache_bytes(tf["layers"], tf["width"], length, 4),
            "kv_cache_bytes_float16": kv_cache_bytes(tf["layers"], tf["width"], length, 2),
            "tokens_per_s": length / max(seconds, 1e-9),
        })
        if progress is not None:
            progress(rows[-1])
        del dec
    c = model.config
    return {"task": "memory_vs_context", "model": {"parameters": int(model.num_parameters()),
            "dtype": str(model.dtype), "width": int(c.embedding_dim), "tiers": int(c.num_tiers),
            "memory_slots": int(c.memory_slots), "local_window": int(c.local_window)},
            "transformer": {**tf, "formula": "2 * layers * tokens * width * bytes_per_value", "computed": True},
            "results": rows}


def plot_memory(report: dict, path: str | os.PathLike, title: str | None = None) -> str:
    """Draw :func:`memory_vs_context`'s report as a PNG at ``path`` (log-log axes); returns the path.

    Needs matplotlib (``pip install thl-np[plot]``): raises InputError naming the extra without it.
    """
    Figure, FigureCanvasAgg = require_matplotlib("the memory plot")
    rows = report["results"]
    if not rows:
        raise InputError("the memory report has no rows to plot")
    T = [r["length"] for r in rows]
    tf, m = report["transformer"], report["model"]
    fig = Figure(figsize=(8, 6.5))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.1, 0.27, 0.86, 0.6))
    ax.plot(T, [r["kv_cache_bytes"] for r in rows], "s--", color="tab:red",
            label=f"Transformer KV cache, float32 (computed: 2 x {tf['layers']} layers x T x width {tf['width']} "
                  "x 4 bytes)")
    ax.plot(T, [r["kv_cache_bytes_float16"] for r in rows], "s:", color="tab:orange",
            label="Transformer KV cache, float16 (computed: 2 bytes a value)")
    if all(r["rss_bytes"] is not None for r in rows):
        ax.plot(T, [r["rss_bytes"] for r in rows], "o-", color="tab:gray",
                label="THL: whole process resident memory, VmRSS (measured: Python, NumPy, Numba, weights)")
    ax.plot(T, [r["session_bytes"] for r in rows], "o-", color="tab:green",
            label="THL: decoding session, state + its caches (measured)")
    ax.plot(T, [r["state_bytes"] for r in rows], "o-", color="tab:blue",
            label="THL: InferenceState.nbytes (measured)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length T (tokens = bytes)")
    ax.set_ylabel("bytes")
    ax.set_title(title or (f"Memory vs context length, batch 1\nTHL: {m['parameters']:,} parameters, width "
                           f"{m['width']}, {m['tiers']} tiers, {m['memory_slots']} memory slots, {m['dtype']}\n"
                           f"vs a Transformer of the same width and depth ({tf['layers']} layers x width "
                           f"{tf['width']})"), fontsize=10)
    ax.grid(alpha=0.3, which="both")
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", fontsize=8, frameon=False)
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def format_bytes(n) -> str:
    """1536 -> '1.5 KiB'; None -> 'n/a'."""
    if n is None:
        return "n/a"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def passkey_lines(report: dict) -> list[str]:
    """The passkey report as a small text table."""
    ch = report["chance"]
    d, hay = report["depth"], report.get("haystack", {"kind": report["filler"]})
    where = f"at depth {d:.2f}" if not isinstance(d, list) else f"at a random depth in [{d[0]:.2f}, {d[1]:.2f}]"
    what = (f"{report['filler']} filler" if hay["kind"] != "source"
            else f"Python source haystack ({hay['files']} .py files of {hay['dir']}, {hay['bytes']:,} bytes)")
    out = [f"passkey retrieval ({what}, key {where}, "
           f"{report['trials']} trials per length, seed {report['seed']}, greedy)",
           f"{'length':>8}  {'accuracy':>8}  {'digits':>6}  {'forced':>6}  {'bits/digit':>10}  {'control':>7}  "
           f"{'RSS':>10}  "
           f"{'THL state':>10}  {'session':>10}"]
    for r in report["results"]:
        out.append(f"{r['length']:>8}  {r['accuracy']:>8.2f}  {r['digit_accuracy']:>6.2f}  "
                   f"{r['forced_digit_accuracy']:>6.2f}  {r['key_bits_per_digit']:>10.2f}  "
                   f"{r['control_bits_per_digit']:>7.2f}  "
                   f"{format_bytes(r['rss_bytes']):>10}  {format_bytes(r['state_bytes']):>10}  "
                   f"{format_bytes(r['session_bytes']):>10}")
    out.append(f"chance: accuracy {ch['accuracy']:.0e}, digits {ch['digit_accuracy']:.2f}, forced "
               f"{ch['forced_digit_accuracy']:.2f}, bits/digit {ch['key_bits_per_digit']:.2f}  (digits: greedy "
               "digits in place; forced: right digit most likely among digits, teacher-forced; control: bits/digit "
               "of the key after a prompt holding another key)")
    return out

