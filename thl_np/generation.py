"""Text generation: sample a continuation of a prompt from a THL model, one token per step.

The prompt is consumed in one ``model(ids[None, :], state)`` call (only its last position's logits are
used); every new token then costs one ``model.forward_step``. The model's state is bounded, so a long
generation costs the same per token from the first to the last.

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
- ``state`` (batch size 1) is the context to continue; it is never modified. With ``return_state=True``
  the result also carries the state after the prompt *and every generated token* (a final eos
  included), ready to be passed back in with the next prompt.
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
    x = x - x[np.isfinite(x)].max()  # <= 0 everywhere, so dividing by a tiny temperature cannot overflow
    if temperature != 0:
        x = x / temperature
    order = np.argsort(-x, kind="stable")  # descending, equal logits keep the lower id first
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


def _check_logits(logits) -> np.ndarray:
    x = np.asarray(logits)
    if x.ndim != 1 or x.size == 0:
        raise InputError(f"logits must be one position's scores, shape [V], got shape {list(x.shape)}")
    if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
        raise InputError(f"logits must be numbers, got dtype {x.dtype}")
    x = x.astype(np.float64)
    if np.isnan(x).any():
        raise InputError(f"logits contain NaN (at id {int(np.argmax(np.isnan(x)))}): the model diverged")
    if (x == np.inf).any():
        raise InputError(f"logits contain +inf (at id {int(np.argmax(x))}): the model diverged")
    if not np.isfinite(x).any():
        raise InputError("every logit is -inf: there is no token left to sample")
    return x


# ---------------------------------------------------------------------------------------- generation


@dataclass
class GenerationResult:
    """What :func:`generate_ids` returns: the new ids, why it stopped, and the state after them."""

    ids: np.ndarray          # int64 [n], the new tokens (a final eos included when stopped_at_eos)
    stopped_at_eos: bool
    state: object            # InferenceState after the prompt and every new token, or None if not asked


def generate_ids(model, prompt_ids, max_length: int = 100, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, state=None, eos_id: int | None = None,
                 vocab_limit: int | None = None, return_state: bool = False, path: str = "auto"
                 ) -> GenerationResult:
    """Token-level generation: :func:`iter_ids` collected into a :class:`GenerationResult`."""
    stream = iter_ids(model, prompt_ids, max_length, temperature, top_k, top_p, seed, state, eos_id,
                      vocab_limit, return_state, path)
    ids, final_state = _drain(stream)
    stopped = bool(ids) and eos_id is not None and ids[-1] == eos_id
    return GenerationResult(np.asarray(ids, dtype=np.int64), stopped, final_state)


def iter_ids(model, prompt_ids, max_length: int = 100, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, state=None, eos_id: int | None = None,
             vocab_limit: int | None = None, return_state: bool = False, path: str = "auto") -> Iterator[int]:
    """Yield new token ids one by one; the generator's return value is the final state (or None).

    ``prompt_ids`` must be non-empty and fit the model's vocabulary. Sampling is restricted to ids below
    ``vocab_limit`` (default: the model's vocab_size). Sampling stops after ``max_length`` ids or once
    ``eos_id`` is produced. The last id is only fed back to the model when ``return_state`` asks for the
    state after it, so plain generation never pays for a step whose logits nobody reads.
    """
    V = model.config.vocab_size
    limit = V if vocab_limit is None else min(int(vocab_limit), V)
    _check_max_length(max_length)
    check_sampling_args(temperature, top_k, top_p)
    prompt = _check_prompt_ids(prompt_ids, V)
    _check_state(state, model.config)
    rng = np.random.default_rng(check_seed(seed))
    session = _fast_session(model, prompt.size + max_length, path, state)
    if session is not None:
        return (yield from _iter_session(session, prompt, max_length, temperature, top_k, top_p, rng, eos_id,
                                         limit, return_state))
    run_prompt, run_step = _bind_path(model, prompt.size + max_length, path)

    logits, state = run_prompt(prompt[None, :], state)
    logits = np.asarray(logits)
    last = (logits[0, -1] if logits.ndim == 3 else logits[0])[:limit]  # model.prompt: [1, V]; another: [1, T, V]
    token = None
    for i in range(max_length):
        token = sample_next(last, rng, temperature, top_k, top_p)
        yield token
        if token == eos_id or i == max_length - 1:
            break
        last, state = _step(run_step, token, state)
        last = last[:limit]
    if not return_state:
        return None
    if token is not None:
        _, state = _step(run_step, token, state)
    return state


def _fast_session(model, steps: int, path: str, state):
    """A FastDecoder session for a THLModel whose generation runs on the fast path (:func:`decode_path`),
    starting at ``state`` (never modified); None for the plain path and for other model objects."""
    if not hasattr(model, "num_parameters") or decode_path(model, steps, path) != "fast":
        return None
    return model._decoder(state, 1)


def _iter_session(session, prompt, max_length, temperature, top_k, top_p, rng, eos_id, limit, return_state):
    """:func:`iter_ids` on a fast decoding session: the prompt in one call (logits of its last position
    only), then per token one compiled step (``thl_np.engines.compiled_steps``), the head and the draw;
    the state is taken from the session once, at the end. The draws are :func:`sample_next`'s."""
    from .engines.compiled_steps import step_logits

    last = session.prompt(prompt[None, :], logits="last")[0, :limit]
    ids = np.empty((1, 1), np.int64)
    token = None
    for i in range(max_length):
        token = sample_next(last, rng, temperature, top_k, top_p)
        yield token
        if token == eos_id or i == max_length - 1:
            break
        ids[0, 0] = token   # sampled below the model's vocab_size: no input check needed
        last = step_logits(session, ids)[0, :limit]
    if not return_state:
        return None
    if token is not None:
        session.step(np.array([token]), want_logits=False)
    from .state import InferenceState

    return InferenceState.held_by(session)


def _bind_path(model, steps: int, path: str):
    """(prompt call, step call) of ``model`` on the path :func:`decode_path` picks. Any other object with
    ``__call__(ids, state)`` and ``forward_step(ids, state)`` is called as it is (path must be "auto")."""
    if not hasattr(model, "num_parameters"):
        if path != "auto":
            raise InputError(f"path = {path!r} needs a THLModel; {type(model).__name__} runs as it is")
        return model, model.forward_step
    path = decode_path(model, steps, path)
    # the prompt through model.prompt: the last position's logits only, no T × V array (a long prompt's memory)
    return functools.partial(model.prompt, path=path), functools.partial(model.forward_step, path=path)


def _step(run_step, token: int, state):
    logits, state = run_step(np.array([token], dtype=np.int64), state)
    return np.asarray(logits)[0], state


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


def stream_text(model, tokenizer: Tokenizer | None, prompt: str | bytes, max_length: int = 100,
                temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                seed: int | None = None, state=None, return_state: bool = False, path: str = "auto") -> Iterator[str]:
    """Yield the continuation as text pieces, as soon as each piece is complete UTF-8.

    Bytes of a character split over several tokens are held back until the character is complete (an
    unfinished character at the end becomes U+FFFD). Pieces are never empty. The generator's return value
    (``StopIteration.value``, or the value of ``yield from``) is the final state when ``return_state``
    is true, else None. ``"".join(stream_text(...))`` equals ``generate_text(...)`` for the same arguments.
    """
    tokenizer = tokenizer if tokenizer is not None else Tokenizer()
    V = model.config.vocab_size
    prompt_ids = prompt_to_ids(tokenizer, prompt, V, state is not None)
    eos = tokenizer.eos_id if tokenizer.eos_id is not None and tokenizer.eos_id < V else None
    decoder = tokenizer.stream_decoder()
    ids = iter_ids(model, prompt_ids, max_length, temperature, top_k, top_p, seed, state, eos,
                   min(V, tokenizer.vocab_size), return_state, path)
    while True:
        try:
            token = next(ids)
        except StopIteration as stop:
            final_state = stop.value
            break
        piece = decoder.push(token)
        if piece:
            yield piece
    tail = decoder.flush()
    if tail:
        yield tail
    return final_state


def generate_text(model, tokenizer: Tokenizer | None, prompt: str | bytes, max_length: int = 100,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  seed: int | None = None, state=None, return_state: bool = False, path: str = "auto"):
    """The generated continuation of ``prompt`` (a str, the prompt not included).

    With ``return_state=True``, returns ``(text, state)`` where ``state`` has consumed the prompt and
    every generated token: pass it as ``state=`` with the next prompt to continue the same context.
    ``tokenizer=None`` means the byte :class:`Tokenizer`. See the module docstring for the conventions.
    """
    stream = stream_text(model, tokenizer, prompt, max_length, temperature, top_k, top_p, seed, state,
                         return_state, path)
    pieces, final_state = _drain(stream)
    text = "".join(pieces)
    return (text, final_state) if return_state else text


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


def _check_state(state, config) -> None:
    if state is None:
        return
    check = getattr(state, "check", None)
    if check is None:
        raise StateError(f"state must be an InferenceState, got {type(state).__name__}")
    if state.batch_size != 1:
        raise StateError(
            f"generation continues one sequence, but the state holds {state.batch_size}: "
            "pass a batch-1 state (InferenceState.init(1, config) or one saved from a generation)"
        )
    check(config, batch_size=1)


def _drain(generator):
    """Run a generator to its end → (the items it yielded, the value it returned)."""
    items = []
    while True:
        try:
            items.append(next(generator))
        except StopIteration as stop:
            return items, stop.value
