"""Text generation: sample a continuation of a prompt from a THL model, one token per step.

The prompt is consumed in one ``model(ids[None, :], state)`` call (only its last position's logits are
used); every new token then costs one ``model.forward_step``. The model's state is bounded, so a long
generation costs the same per token from the first to the last. Every entry point runs one loop,
:func:`_decode`, which also steps several prompts as one batch.

Conventions, shared by :func:`generate_text`, :func:`stream_text` and :func:`generate_ids`:

- ``max_length`` is the number of *new* tokens (bytes, for the byte tokenizer), not counting the prompt.
  Generation stops earlier when the tokenizer's eos is sampled; eos is not part of the returned text.
- The result is the continuation only; the prompt is not repeated.
- ``temperature = 0`` is greedy decoding (argmax, ties to the lowest id). Otherwise logits are divided by
  the temperature, then ``top_k`` keeps the k most likely ids and ``top_p`` keeps the smallest set of most
  likely ids whose probability reaches p (nucleus sampling); the draw uses
  ``np.random.default_rng(seed)``, so a seed reproduces a generation exactly.
- Only ids that both the model and the tokenizer know are ever sampled (``< min(model vocab_size,
  tokenizer vocab_size)``). A prompt byte the model's vocabulary lacks raises :class:`InputError`.
- An empty prompt starts a new document: with no ``state`` the model is fed a single eos token (which
  needs eos in the model's vocabulary). An empty prompt with a carried ``state`` raises InputError,
  because the state holds no logits to sample from: give at least one token of prompt.
- ``state`` (batch size 1; for several prompts see :func:`generate_text`) is the context to continue; it
  is never modified. With ``return_state=True``
  the result also carries the state after the prompt *and every generated token* (a final eos
  included), ready to be passed back in with the next prompt.
- ``stop`` (text functions): a string or a list of strings. The text is cut before the first occurrence
  of any of them and generation stops there; the stop string is not returned. While a piece of text
  could still be the start of a stop string, :func:`stream_text` holds it back. With ``return_state``
  the state has consumed every generated token up to the one that completed the stop string, that token
  included (so the model has seen the stop string, as it sees a final eos): continuing from it continues
  after the stop string, not after the returned text.
- Penalties, applied to the logits before temperature, top-k and top-p (greedy decoding included), to
  every id *seen*: the prompt's ids (the lone eos that starts an empty prompt excepted; a carried
  ``state``'s earlier text is not known and does not count) and every id generated so far.
  ``repetition_penalty`` r > 0 (1 = off): a seen id's logit is divided by r if positive, multiplied by r
  if negative (r > 1 discourages repeats, as in the common LM toolkits). ``presence_penalty`` p (0 =
  off): p is subtracted from a seen id's logit, once, however often it was seen (p < 0 encourages).
- Several prompts at once (``generate_text(model, None, ["a", "b"])`` returns a list): stepped as one
  batch, each result equal to the prompt's own result with the same arguments and seed (``seed`` is one
  for all or a list, one per prompt): identical on the fast path, and on the plain path up to the
  rounding of the batched products (~1e-6 in float32 logits, which could change a near-tie). Prompts of
  different lengths are exact too (:func:`_decode` says how).
- ``path`` is the model's ("fast", "plain"), or "auto": the fast path, except for a job so small that the
  plain path finishes it before the fast path's first compile would (see :func:`decode_path`). Both give
  the same numbers.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .checks import check, check_seed
from .errors import InputError, StateError
from .tokenizer import Tokenizer

# "auto" and the first use of the fast path on a machine: its Numba code compiles once (about 12 s for the
# shipped model: the compiled step, thl_np.engines.compiled_steps, and the head) and is then cached.
# Once cached, "auto" takes the fast path for every job. Measured roughly on the shipped model (a shared
# 2-core machine, one thread): in a process, the fast path is faster from the first token (1 token: 0.8
# against 2.3 ms; 100 tokens: 16 against 84 ms); from a fresh process, loading Numba's cached code costs
# the fast path about 0.35 s of CPU more than the plain path at start-up (its per-token cost is then 0.15
# against 0.7 ms), so jobs under ~600 tokens would finish up to 0.35 s sooner on the plain path on a quiet
# machine, but the plain path's small BLAS products collapse on a busy one (500 tokens: 16.7 s against
# 2.7 s measured under load), so the fast path is the safe choice. While the fast path is not cached, a
# job of at most this many parameter-steps (parameters × tokens) runs on the plain path instead: about a
# second there (the shipped model: ~1,200 tokens), less than the compile it would wait for.
SMALL_JOB_PARAMETER_STEPS = 1e9


def decode_path(model, steps: int, path: str = "auto") -> str:
    """The path ("fast" or "plain") a generation of ``steps`` tokens (prompt included) runs on: "auto" is
    the fast path, except for a small job (``SMALL_JOB_PARAMETER_STEPS``) while the fast path's compiled
    code is not in Numba's cache yet (``compiled_steps.is_warm``; a model the compiled step does not apply
    to keeps the size rule alone)."""
    from .model import choose_fast

    fast_possible = choose_fast(model.config, path)   # checks the name; "fast" without kernels is an error
    if path != "auto" or not fast_possible:
        return "fast" if fast_possible else "plain"
    if steps * model.num_parameters() > SMALL_JOB_PARAMETER_STEPS:
        return "fast"
    from .engines.compiled_steps import is_warm

    return "fast" if is_warm(model) else "plain"


# ---------------------------------------------------------------------------------------- sampling


def sample_next(logits, rng: np.random.Generator | None = None, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None) -> int:
    """Pick the next token id from one position's logits [V].

    Filtering order (as in most LM toolkits): temperature, then top-k, then top-p on what is left.
    Filtered ids have probability exactly 0: they are never returned. ``-inf`` logits are allowed (they
    mark ids that must never be picked); NaN is an error. ``temperature == 0`` returns the argmax (lowest
    id among ties) without touching ``rng``.
    """
    x = _check_logits(logits)
    check_sampling_args(temperature, top_k, top_p)
    if temperature == 0 or top_k == 1:
        return int(np.argmax(x))
    return _draw(x, rng, temperature, top_k, top_p)


def sample_rows(logits, rows) -> list[int]:
    """The next token of each row of ``logits`` [B, V]; ``rows[b]`` is ``(rng, temperature, top_k, top_p)``.

    Row b gets exactly what ``sample_next(logits[b], *rows[b])`` gives (the same rule, the same draws from
    its rng), with the per-call costs paid once for the batch: the logits checked together, each distinct
    setting checked once, every greedy row in one argmax. A server stepping many requests samples with it.
    """
    x = _check_logits(logits, rows=True)
    if len(rows) != x.shape[0]:
        raise InputError(f"{len(rows)} sampling settings for {x.shape[0]} rows of logits")
    for setting in {r[1:] for r in rows}:
        check_sampling_args(*setting)
    greedy = [b for b, r in enumerate(rows) if r[1] == 0 or r[2] == 1]
    out = [0] * len(rows)
    if len(greedy) == len(rows):
        return np.argmax(x, axis=1).tolist()
    if greedy:
        for b, token in zip(greedy, np.argmax(x[greedy], axis=1).tolist(), strict=True):
            out[b] = token
    plain, rest = [], []  # plain: all logits finite, no top-k or top-p (the usual request): done together
    finite = np.isfinite(x).all(axis=1)
    for b, (_, temperature, top_k, top_p) in enumerate(rows):
        if not (temperature == 0 or top_k == 1):
            unfiltered = top_k is None and (top_p is None or top_p >= 1.0)
            (plain if unfiltered and finite[b] and x.shape[1] > 1 else rest).append(b)
    if plain:
        for b, token in zip(plain, _draw_rows(x[plain], [rows[b][0] for b in plain],
                                              [rows[b][1] for b in plain]), strict=True):
            out[b] = token
    for b in rest:
        out[b] = _draw(x[b], *rows[b])
    return out


def _draw_rows(x: np.ndarray, rngs, temperatures) -> list[int]:
    """:func:`_draw` for finite logits [B, V > 1] without top-k or top-p, row b drawing from ``rngs[b]``:
    the same operations as :func:`filtered_distribution` then :func:`_draw` on each row (an elementwise
    operation or a reduction along a contiguous row gives the same bits for a row alone or in a batch;
    searchsorted(side="right") on a non-decreasing row is the count of entries <= the value), with numpy's
    per-call cost paid once for the batch (tests/test_generation.py holds the two equal)."""
    x = x - x.max(axis=1, keepdims=True)
    x = x / np.asarray(temperatures, dtype=np.float64)[:, None]
    order = np.argsort(-x, axis=1, kind="stable")
    probs = np.exp(np.take_along_axis(x, order, axis=1))
    probs /= probs.sum(axis=1, keepdims=True)
    cum = np.cumsum(probs, axis=1)
    u = np.array([(rng if rng is not None else np.random.default_rng()).random() for rng in rngs])
    pick = np.minimum((cum <= (u * cum[:, -1])[:, None]).sum(axis=1), x.shape[1] - 1)
    return order[np.arange(len(order)), pick].tolist()


def _draw(x: np.ndarray, rng, temperature, top_k, top_p) -> int:
    """The sampling rule (a temperature > 0) on checked float64 logits [V]: one ``rng.random()`` unless a
    single id survives the filters."""
    kept, probs = filtered_distribution(x, temperature, top_k, top_p)
    if len(kept) == 1:
        return int(kept[0])
    rng = rng if rng is not None else np.random.default_rng()
    cum = np.cumsum(probs)
    pick = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
    return int(kept[min(pick, len(kept) - 1)])


def filtered_distribution(logits: np.ndarray, temperature: float = 1.0, top_k: int | None = None,
                          top_p: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ids that survive filtering (most likely first, ties to the lower id) and their probabilities.

    Exposed so that tests and callers can see the exact distribution :func:`sample_next` draws from.
    """
    x = np.asarray(logits, dtype=np.float64)
    finite = np.isfinite(x)
    everywhere = bool(finite.all())  # the usual case: no -inf to find and drop
    x = x - (x.max() if everywhere else x[finite].max())  # <= 0 everywhere: a tiny temperature cannot overflow
    if temperature != 0:
        x = x / temperature
    order = np.argsort(-x, kind="stable")  # descending, equal logits keep the lower id first
    if not everywhere:
        order = order[np.isfinite(x[order])]
    if top_k is not None:
        order = order[:top_k]
    probs = np.exp(x[order])
    probs /= probs.sum()
    if top_p is not None and top_p < 1.0:
        # keep the shortest prefix whose mass reaches top_p (at least the most likely id)
        n = int(np.searchsorted(np.cumsum(probs), top_p, side="left")) + 1
        order, probs = order[:n], probs[:n] / probs[:n].sum()
    return order, probs


def check_sampling_args(temperature, top_k, top_p) -> None:
    """Raise InputError naming the bad value, so a CLI flag error is one readable line (the rules are
    thl_np.checks.RULES, shared with the CLI flags)."""
    check("temperature", temperature, fix="0 means greedy")
    if top_k is not None:
        check("top_k", top_k, fix="or None for no top-k filter")
    if top_p is not None:
        check("top_p", top_p, fix="or None for no nucleus filter")


def _check_logits(logits, rows: bool = False) -> np.ndarray:
    """float64 logits [V] (or [B, V] with ``rows``), checked: no NaN, no +inf, something finite (in each row)."""
    x = np.asarray(logits)
    want = "[B, V] (one position's scores per row)" if rows else "[V]"
    if x.ndim != (2 if rows else 1) or x.size == 0:
        raise InputError(f"logits must be one position's scores, shape {want}, got shape {list(x.shape)}")
    if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
        raise InputError(f"logits must be numbers, got dtype {x.dtype}")
    x = x.astype(np.float64)
    finite = np.isfinite(x)
    if finite.all():  # the usual case: one pass instead of three
        return x
    flat = x.reshape(-1, x.shape[-1])
    for row, values in enumerate(flat):
        where = f" (row {row})" if rows else ""
        if np.isnan(values).any():
            raise InputError(f"logits contain NaN (at id {int(np.argmax(np.isnan(values)))}){where}: the model "
                             "diverged")
        if (values == np.inf).any():
            raise InputError(f"logits contain +inf (at id {int(np.argmax(values))}){where}: the model diverged")
        if not np.isfinite(values).any():
            raise InputError(f"every logit is -inf{where}: there is no token left to sample")
    return x


# ---------------------------------------------------------------------------------------- penalties


def check_penalties(repetition_penalty, presence_penalty) -> None:
    """Raise InputError naming a bad penalty (rules in thl_np.checks.RULES, shared with the CLI flags)."""
    check("repetition_penalty", repetition_penalty, fix="1 means no penalty")
    check("presence_penalty", presence_penalty, fix="0 means no penalty")


def apply_penalties(logits, seen, repetition_penalty: float = 1.0, presence_penalty: float = 0.0) -> np.ndarray:
    """``logits`` [V] (as float64, a copy) with the penalties applied to the ids ``seen`` marks (a boolean
    mask [V]): first the repetition penalty r (a positive logit is divided by r, a negative one multiplied
    by r, so r > 1 always makes a seen id less likely), then the presence penalty p subtracted once from
    each seen id, however often it was seen. ``-inf`` stays ``-inf``."""
    x = np.array(logits, dtype=np.float64)
    ids = np.flatnonzero(seen)
    if repetition_penalty != 1.0:
        v = x[ids]
        x[ids] = np.where(v > 0, v / repetition_penalty, v * repetition_penalty)
    if presence_penalty != 0.0:
        x[ids] -= presence_penalty
    return x


class _Picker:
    """One sequence's draws: the penalties on the ids it has seen, then :func:`sample_next` with its own
    generator, so a row of a batch draws exactly what the same prompt and seed draw alone."""

    def __init__(self, seed, temperature, top_k, top_p, repetition_penalty, presence_penalty, limit, seen_ids):
        self.rng = np.random.default_rng(seed)
        self.args = (temperature, top_k, top_p)
        self.penalties = (repetition_penalty, presence_penalty)
        self.seen = None
        if repetition_penalty != 1.0 or presence_penalty != 0.0:
            self.seen = np.zeros(limit, bool)
            ids = np.asarray(seen_ids, dtype=np.int64)
            self.seen[ids[ids < limit]] = True

    def __call__(self, logits) -> int:
        if self.seen is None:
            return sample_next(logits, self.rng, *self.args)
        token = sample_next(apply_penalties(_check_logits(logits), self.seen, *self.penalties), self.rng,
                            *self.args)
        self.seen[token] = True
        return token


# ---------------------------------------------------------------------------------------- generation


@dataclass
class GenerationResult:
    """What :func:`generate_ids` returns: the new ids, why it stopped, and the state after them."""

    ids: np.ndarray          # int64 [n], the new tokens (a final eos included when stopped_at_eos)
    stopped_at_eos: bool
    state: object            # InferenceState after the prompt and every new token, or None if not asked


def generate_ids(model, prompt_ids, max_length: int = 100, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, state=None, eos_id: int | None = None,
                 vocab_limit: int | None = None, return_state: bool = False, path: str = "auto", *,
                 repetition_penalty: float = 1.0, presence_penalty: float = 0.0) -> GenerationResult:
    """Token-level generation: :func:`iter_ids` collected into a :class:`GenerationResult`."""
    stream = iter_ids(model, prompt_ids, max_length, temperature, top_k, top_p, seed, state, eos_id,
                      vocab_limit, return_state, path, repetition_penalty=repetition_penalty,
                      presence_penalty=presence_penalty)
    ids, final_state = _drain(stream)
    stopped = bool(ids) and eos_id is not None and ids[-1] == eos_id
    return GenerationResult(np.asarray(ids, dtype=np.int64), stopped, final_state)


def iter_ids(model, prompt_ids, max_length: int = 100, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, state=None, eos_id: int | None = None,
             vocab_limit: int | None = None, return_state: bool = False, path: str = "auto", *,
             repetition_penalty: float = 1.0, presence_penalty: float = 0.0) -> Iterator[int]:
    """Yield new token ids one by one; the generator's return value is the final state (or None).

    ``prompt_ids`` must be non-empty and fit the model's vocabulary. Sampling is restricted to ids below
    ``vocab_limit`` (default: the model's vocab_size). Sampling stops after ``max_length`` ids or once
    ``eos_id`` is produced. The last id is only fed back to the model when ``return_state`` asks for the
    state after it, so plain generation never pays for a step whose logits nobody reads. Every id of
    ``prompt_ids`` counts as seen for the penalties.
    """
    job = _Job(model, [prompt_ids], max_length, temperature, top_k, top_p, seed, state, vocab_limit, path,
               repetition_penalty, presence_penalty, None, single=True)
    core = job.decode(eos_id, return_state)
    halt = None
    while True:
        try:
            _, token = core.send(halt)
        except StopIteration as stop:
            return stop.value[0] if return_state else None
        yield token


class _Job:
    """Checked arguments of one generation of one or several prompts, and the runner that steps them."""

    def __init__(self, model, prompts, max_length, temperature, top_k, top_p, seed, state, vocab_limit, path,
                 repetition_penalty, presence_penalty, seen, single: bool):
        V = model.config.vocab_size
        self.limit = V if vocab_limit is None else min(int(vocab_limit), V)
        _check_max_length(max_length)
        check_sampling_args(temperature, top_k, top_p)
        check_penalties(repetition_penalty, presence_penalty)
        self.prompts = [_check_prompt_ids(p, V) for p in prompts]
        self.max_length = int(max_length)
        B = len(self.prompts)
        state = _check_state(state, model.config, B, single)
        seeds = _seeds(seed, B)
        seen = self.prompts if seen is None else seen
        self.pickers = [_Picker(s, temperature, top_k, top_p, repetition_penalty, presence_penalty, self.limit, ids)
                        for s, ids in zip(seeds, seen, strict=True)]
        steps = max(p.size for p in self.prompts) + self.max_length
        self.runner = _runner(model, B, steps, path, state)

    def decode(self, eos_id, return_state):
        return _decode(self.runner, self.prompts, self.max_length, self.pickers, eos_id, self.limit, return_state)


def _decode(runner, prompts, max_length, pickers, eos_id, limit, return_state):
    """The generation loop (one for every entry point): yield ``(row, token)`` for each new token of each
    prompt; ``send(True)`` after a token stops that row there (a stop string). The generator returns the
    list of each row's final state (None where ``return_state`` is false).

    Several prompts are stepped as one batch in lockstep, which is exact for prompts of any lengths: the
    batch shares one step counter (spec §3), so every row consumes one token per step, its own: the rows
    of a shorter prompt start sampling while the longer ones are still fed their prompts. The common part
    of the prompts goes in one call. A row that has finished is fed a filler token (its results unread)
    until the last row finishes. Each row therefore sees exactly the tokens it would see alone."""
    B = len(prompts)
    lens = [p.size for p in prompts]
    pos = min(lens)                                   # tokens every row has consumed so far
    logits = runner.prompt(np.stack([p[:pos] for p in prompts]))
    made = [0] * B
    status = ["run"] * B                              # "last": its final token is being fed back
    finals = [None] * B
    feed = np.zeros(B, np.int64)
    while True:
        live = want = False   # want: some row samples from the next step's logits
        for b in range(B):
            if status[b] == "done":
                continue
            if pos < lens[b]:
                feed[b] = prompts[b][pos]
                live = True
                want = want or pos + 1 >= lens[b]
                continue
            if status[b] == "last" or made[b] == max_length:
                status[b] = "done"
                if return_state:
                    finals[b] = runner.state_of(b)
                continue
            token = pickers[b](logits[b, :limit])
            made[b] += 1
            halt = yield b, token
            if halt or token == eos_id or made[b] == max_length:
                status[b] = "last" if return_state else "done"
            else:
                want = True
            feed[b] = token
            live = live or status[b] != "done"
        if not live:
            return finals
        logits = runner.step(feed, want)
        pos += 1


def _runner(model, B: int, steps: int, path: str, state):
    """What steps the batch: a fast decoding session of a THLModel on the fast path (:func:`decode_path`),
    else the model's own calls (the plain path, or any object with ``__call__(ids, state)`` and
    ``forward_step(ids, state)``, run as it is: path must be "auto")."""
    if not hasattr(model, "num_parameters"):
        if path != "auto":
            raise InputError(f"path = {path!r} needs a THLModel; {type(model).__name__} runs as it is")
        return _CallRunner(model, model.forward_step, state, B)
    path = decode_path(model, steps, path)
    if path == "fast":
        return _SessionRunner(model._decoder(state, B))
    # the prompt through model.prompt: the last position's logits only, no T × V array (a long prompt's memory)
    return _CallRunner(functools.partial(model.prompt, path=path), functools.partial(model.forward_step, path=path),
                       state, B)


class _SessionRunner:
    """A fast decoding session (``thl_np.engines.decoder``): the prompt in one compiled call, then per step
    one compiled step and the head; a row's state is read from the session when it finishes."""

    def __init__(self, session):
        from .engines.compiled_steps import step_logits

        self.session, self.step_logits = session, step_logits
        self.ids = np.empty((session.B, 1), np.int64)

    def prompt(self, ids):
        return self.session.prompt(ids, logits="last")

    def step(self, tokens, want_logits: bool):
        if not want_logits:
            self.session.step(tokens, want_logits=False)
            return None
        self.ids[:, 0] = tokens   # ids the loop sampled (below vocab_size) or prompt ids already checked
        return self.step_logits(self.session, self.ids)

    def state_of(self, b: int):
        from .state import InferenceState

        if self.session.B == 1:   # the session itself becomes the state's value: no copy (thl_np.state)
            return InferenceState.held_by(self.session)
        return self.session.state().rows([b])


class _CallRunner:
    """A model stepped through its calls ``run_prompt(ids [B, T], state)`` and ``run_step(ids [B], state)``."""

    def __init__(self, run_prompt, run_step, state, B: int):
        self.run_prompt, self.run_step, self.state, self.B = run_prompt, run_step, state, B

    def prompt(self, ids):
        logits, self.state = self.run_prompt(ids, self.state)
        logits = np.asarray(logits)
        return logits[:, -1] if logits.ndim == 3 else logits   # model.prompt: [B, V]; another: [B, T, V]

    def step(self, tokens, want_logits: bool):
        logits, self.state = self.run_step(tokens.copy(), self.state)
        return np.asarray(logits)

    def state_of(self, b: int):
        return self.state if self.B == 1 else self.state.rows([b])


def prompt_to_ids(tokenizer: Tokenizer, prompt, vocab_size: int, has_state: bool) -> np.ndarray:
    """Encode the prompt; an empty prompt becomes a lone eos (a new document), see the module docstring."""
    ids = tokenizer.encode(prompt)
    if len(ids):
        return ids
    if has_state:
        raise InputError(
            "the prompt is empty, but a carried state has no logits to continue from: "
            "give at least one character of prompt"
        )
    eos = tokenizer.eos_id
    if eos is None or eos >= vocab_size:
        raise InputError(
            f"the prompt is empty and the model's vocabulary (vocab_size = {vocab_size}) has no eos token "
            "to start a document with: give a prompt"
        )
    return np.array([eos], dtype=np.int64)


class StopScanner:
    """Cuts generated text before the first stop string (the one complete first; of those complete at once,
    the longest), across pieces as they stream. Used by the text functions here and by ``thl-np serve``.

    ``push`` returns the text that can be shown now: only text that might still be the start of a stop
    string is held back, until the next piece settles it; ``flush`` returns what is held at the end."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""       # everything generated so far
        self.shown = 0       # how much of it has been returned
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        old = len(self.text)
        self.text += piece
        # generation stops where a stop string is first complete: scan the new end positions in order
        for end in range(old + 1, len(self.text) + 1):
            starts = [end - len(s) for s in self.stops if end >= len(s) and self.text.startswith(s, end - len(s))]
            if starts:
                self.stopped = True
                return self._show(min(starts))
        return self._show(len(self.text) - self._open_tail())

    def _open_tail(self) -> int:
        """The length of the longest end of the text that begins some stop string (0 if none)."""
        for k in range(min(len(self.text) - self.shown, self.hold), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def flush(self) -> str:
        return "" if self.stopped else self._show(len(self.text))

    def _show(self, upto: int) -> str:
        if upto <= self.shown:
            return ""
        out = self.text[self.shown:upto]
        self.shown = upto
        return out


class _TextRow:
    """One prompt's text: bytes decoded as they come (a character split across tokens waits for its last
    byte), cut before the first stop string (:class:`StopScanner`)."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str]):
        self.decoder = tokenizer.stream_decoder()
        self.scanner = StopScanner(stops)

    @property
    def stopped(self) -> bool:
        return self.scanner.stopped

    def push(self, token) -> tuple[str, bool]:
        """(the text now safe to show, whether a stop string has completed)."""
        return self.scanner.push(self.decoder.push(token)), self.scanner.stopped

    def finish(self) -> str:
        if self.scanner.stopped:
            return ""
        return self.scanner.push(self.decoder.flush()) + self.scanner.flush()


def _check_stop(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise InputError(f"stop = {stop!r} must be a non-empty str or a list of non-empty str")
    return list(stops)


def _text_job(model, tokenizer, prompts, max_length, temperature, top_k, top_p, seed, state, path,
              repetition_penalty, presence_penalty, single: bool):
    """(job, eos id) for text prompts: each encoded (an empty one starts a document: its lone eos is not a
    'seen' token for the penalties)."""
    V = model.config.vocab_size
    has_state = state is not None
    ids = [prompt_to_ids(tokenizer, p, V, has_state) for p in prompts]
    seen = [i if len(tokenizer.encode(p)) else i[:0] for i, p in zip(ids, prompts, strict=True)]
    eos = tokenizer.eos_id if tokenizer.eos_id is not None and tokenizer.eos_id < V else None
    job = _Job(model, ids, max_length, temperature, top_k, top_p, seed, state, min(V, tokenizer.vocab_size),
               path, repetition_penalty, presence_penalty, seen, single)
    return job, eos


def stream_text(model, tokenizer: Tokenizer | None, prompt: str | bytes, max_length: int = 100,
                temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                seed: int | None = None, state=None, return_state: bool = False, path: str = "auto", *,
                stop: str | list[str] | None = None, repetition_penalty: float = 1.0,
                presence_penalty: float = 0.0) -> Iterator[str]:
    """Yield the continuation as text pieces, as soon as each piece is complete UTF-8.

    Bytes of a character split over several tokens are held back until the character is complete (an
    unfinished character at the end becomes U+FFFD); with ``stop``, text that may be the beginning of a
    stop string is held back until it is known not to be one. Pieces are never empty. The generator's
    return value (``StopIteration.value``, or the value of ``yield from``) is the final state when
    ``return_state`` is true, else None. ``"".join(stream_text(...))`` equals ``generate_text(...)`` for
    the same arguments.
    """
    tokenizer = tokenizer if tokenizer is not None else Tokenizer()
    row = _TextRow(tokenizer, _check_stop(stop))
    job, eos = _text_job(model, tokenizer, [prompt], max_length, temperature, top_k, top_p, seed, state, path,
                         repetition_penalty, presence_penalty, single=True)
    core = job.decode(eos, return_state)
    halt = None
    while True:
        try:
            _, token = core.send(halt)
        except StopIteration as end:
            finals = end.value
            break
        piece, halt = row.push(token)
        if piece:
            yield piece
    tail = row.finish()
    if tail:
        yield tail
    return finals[0] if return_state else None


def generate_text(model, tokenizer: Tokenizer | None, prompt, max_length: int = 100,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  seed=None, state=None, return_state: bool = False, path: str = "auto", *,
                  stop: str | list[str] | None = None, repetition_penalty: float = 1.0,
                  presence_penalty: float = 0.0):
    """The generated continuation of ``prompt`` (a str, the prompt not included).

    With ``return_state=True``, returns ``(text, state)`` where ``state`` has consumed the prompt and
    every generated token: pass it as ``state=`` with the next prompt to continue the same context.
    ``tokenizer=None`` means the byte :class:`Tokenizer`. See the module docstring for the conventions
    (stop strings, penalties, several prompts at once).

    ``prompt`` may be a list of prompts: they are generated as one batch and the result is a list of
    texts (with ``return_state``, a list of ``(text, state)``), each equal to what its prompt gives alone.
    ``seed`` is then one seed for every prompt or a list of one per prompt; ``state`` is None, one batch-1
    state every prompt continues, a state of one row per prompt, or a list of batch-1 states at the same
    step.
    """
    if not isinstance(prompt, (list, tuple)):
        stream = stream_text(model, tokenizer, prompt, max_length, temperature, top_k, top_p, seed, state,
                             return_state, path, stop=stop, repetition_penalty=repetition_penalty,
                             presence_penalty=presence_penalty)
        pieces, final_state = _drain(stream)
        text = "".join(pieces)
        return (text, final_state) if return_state else text
    tokenizer = tokenizer if tokenizer is not None else Tokenizer()
    stops = _check_stop(stop)
    if not prompt:
        return []
    rows = [_TextRow(tokenizer, stops) for _ in prompt]
    texts = [[] for _ in prompt]
    job, eos = _text_job(model, tokenizer, list(prompt), max_length, temperature, top_k, top_p, seed, state,
                         path, repetition_penalty, presence_penalty, single=False)
    core = job.decode(eos, return_state)
    halt = None
    while True:
        try:
            b, token = core.send(halt)
        except StopIteration as end:
            finals = end.value
            break
        piece, halt = rows[b].push(token)
        texts[b].append(piece)
    out = ["".join(t) + row.finish() for t, row in zip(texts, rows, strict=True)]
    return [(t, s) for t, s in zip(out, finals, strict=True)] if return_state else out


# ---------------------------------------------------------------------------------------- checks


def _check_max_length(max_length) -> None:
    check("max_length", max_length, fix="the number of new tokens")


def _check_prompt_ids(prompt_ids, vocab_size: int) -> np.ndarray:
    ids = np.asarray(prompt_ids)
    if ids.ndim != 1 or ids.size == 0:
        raise InputError(f"prompt ids must be a non-empty 1-D sequence, got shape {list(ids.shape)}")
    if not np.issubdtype(ids.dtype, np.integer) or ids.dtype == np.bool_:
        raise InputError(f"prompt ids must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        pos = int(np.argmax(bad))
        tid = int(ids[pos])
        what = f"byte 0x{tid:02x} (id {tid})" if 0 <= tid < 256 else f"id {tid}"
        raise InputError(
            f"prompt {what} at position {pos} is outside the model's vocabulary (vocab_size = {vocab_size}): "
            "this model was not made for these token ids (the byte tokenizer needs vocab_size >= 256, "
            "or an ASCII-only prompt for a smaller vocabulary)"
        )
    return ids


def _check_state(state, config, B: int = 1, single: bool = True):
    """The state the batch of ``B`` prompts starts from (None: zeros), checked; never modified. A batch
    takes one batch-1 state (every prompt continues it), a state of B rows, or a list of B batch-1 states
    at the same step (stacked)."""
    if state is None:
        return None
    from .state import InferenceState

    if isinstance(state, (list, tuple)) and not single:
        if len(state) != B:
            raise StateError(f"{len(state)} state(s) for {B} prompt(s): give one per prompt, or one for all")
        for s in state:
            _check_state(s, config)
        return InferenceState.stack(state)
    check = getattr(state, "check", None)
    if check is None:
        raise StateError(f"state must be an InferenceState, got {type(state).__name__}")
    if single and state.batch_size != 1:
        raise StateError(
            f"generation continues one sequence, but the state holds {state.batch_size}: "
            "pass a batch-1 state (InferenceState.init(1, config) or one saved from a generation)"
        )
    if state.batch_size not in (1, B):
        raise StateError(f"the state holds {state.batch_size} sequences for {B} prompts: "
                         "give a batch-1 state (every prompt continues it) or one row per prompt")
    check(config, batch_size=state.batch_size)
    if state.batch_size != B:
        return InferenceState.stack([state] * B)
    return state


def _seeds(seed, B: int) -> list:
    """One seed per prompt: ``seed`` for all (each prompt draws what it draws alone with that seed), or a
    list of one per prompt."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != B:
            raise InputError(f"{len(seed)} seed(s) for {B} prompt(s): give one per prompt, or one for all")
        return [check_seed(s) for s in seed]
    return [check_seed(seed)] * B


def _drain(generator):
    """Run a generator to its end → (the items it yielded, the value it returned)."""
    items = []
    while True:
        try:
            items.append(next(generator))
        except StopIteration as stop:
            return items, stop.value
