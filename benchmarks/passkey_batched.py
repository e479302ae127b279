"""`thl-np eval --passkey`'s trials, all of a length in one batch: the same keys, haystack draws, scorer and
control (``thl_np.eval.long_context.passkey_eval``), for models that run on the plain path only (a
component variant without kernels, e.g. ``memory_write: decay_on_write``), where one trial at a time
would take hours at 262,144 bytes. The trials and their controls are the rows of one decoding session.

    python benchmarks/passkey_batched.py default --lengths 262144 --trials 10 --seed 3000 \\
        --set 'components={"memory_write": "decay_on_write"}'

Prints one row per length in `thl-np eval --passkey`'s columns; ``--json FILE`` writes the rows.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from thl_np import THLModel
from thl_np.components.output import log_softmax
from thl_np.components.registry import has_fast_path
from thl_np.config import parse_overrides
from thl_np.errors import InputError
from thl_np.eval.long_context import KEY_DIGITS, _check_lengths
from thl_np.io.folder import resolve_model_dir
from thl_np.tokenizer import Tokenizer
from thl_np.training.haystack import Haystack, haystack_prompt, parse_depth

ZERO = ord("0")


def trial_prompts(length: int, trials: int, seed: int, depth, hay: Haystack):
    """The keys, prompts and control prompts of passkey_eval's trials at ``length`` (its draws, in its
    order: key, haystack, decoy)."""
    tok = Tokenizer()
    rng = np.random.default_rng([int(seed), int(length)])
    keys, prompts, controls = [], [], []
    for _ in range(trials):
        key = "".join(str(d) for d in rng.integers(0, 10, size=KEY_DIGITS))
        prompt, _ = haystack_prompt(length, key, depth, hay, rng)
        decoy = "".join(str((int(d) + 1 + int(o)) % 10) for d, o in zip(key, rng.integers(0, 9, KEY_DIGITS),
                                                                        strict=True))
        keys.append(key)
        prompts.append(tok.encode(prompt))
        controls.append(tok.encode(prompt.replace(key.encode(), decoy.encode())))
    return keys, np.stack(prompts + controls).astype(np.int64)


def evaluate(model, length: int, trials: int, seed: int, depth=(0.1, 0.9), hay: Haystack | None = None) -> dict:
    """passkey_eval's row for one length (accuracy, digits, forced, bits per digit, control), batched."""
    hay = hay or Haystack("source")
    hay.check_prompt(length)
    keys, ids = trial_prompts(length, trials, seed, parse_depth(depth), hay)
    t0 = time.perf_counter()
    dec = model.decoder(batch_size=ids.shape[0])
    logits = np.asarray(dec.prompt(ids, logits="last"))
    forced = dec.clone()
    limit = min(256, model.config.vocab_size)
    answers = np.zeros((ids.shape[0], KEY_DIGITS), np.int64)
    step_logits = logits
    for i in range(KEY_DIGITS):                                   # greedy, every row (controls ignored)
        if not np.isfinite(step_logits[:, :limit]).all():
            raise RuntimeError("non-finite logits in the greedy answer")
        answers[:, i] = np.argmax(step_logits[:, :limit], axis=1)
        if i < KEY_DIGITS - 1:
            step_logits = np.asarray(dec.step(answers[:, i]))
    key_digits = np.array([[ord(c) for c in k] for k in keys] * 2, np.int64)   # trials, then controls
    bits = np.zeros(ids.shape[0])
    top = np.zeros(ids.shape[0], np.int64)
    step_logits = logits
    for i in range(KEY_DIGITS):                                   # teacher-forced over the ten digits
        logp = log_softmax(step_logits.astype(np.float64)[:, ZERO:ZERO + 10])
        d = key_digits[:, i] - ZERO
        bits -= logp[np.arange(len(d)), d] / math.log(2)
        top += np.argmax(logp, axis=1) == d
        if i < KEY_DIGITS - 1:
            step_logits = np.asarray(forced.step(key_digits[:, i]))
    n = trials
    exact = sum(bytes(answers[r].tolist()).decode("latin-1") == keys[r] for r in range(n))
    digits = int(sum((answers[r] == key_digits[r]).sum() for r in range(n)))
    row = {"length": length, "trials": n, "correct": int(exact), "accuracy": exact / n,
           "digit_accuracy": digits / (n * KEY_DIGITS),
           "forced_digit_accuracy": float(top[:n].sum()) / (n * KEY_DIGITS),
           "key_bits_per_digit": float(bits[:n].sum()) / (n * KEY_DIGITS),
           "control_bits_per_digit": float(bits[n:].sum()) / (n * KEY_DIGITS),
           "answers": [bytes(a.tolist()).decode("latin-1") for a in answers[:n]], "keys": keys,
           "seconds": time.perf_counter() - t0}
    for name in ("key_bits_per_digit", "control_bits_per_digit"):
        if not math.isfinite(row[name]):
            raise RuntimeError(f"{name} is not finite")
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="model folder, training run folder or 'default'")
    ap.add_argument("--lengths", default="1024,4096,16384")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                    help="config override, as thl-np's --set (repeatable)")
    ap.add_argument("--json", default=None, help="write the rows to this file")
    args = ap.parse_args(argv)
    if args.trials < 1:
        raise InputError("--trials must be at least 1")
    lengths = _check_lengths([int(x) for x in args.lengths.split(",") if x])
    base = THLModel.from_pretrained(resolve_model_dir(args.model))
    config = base.config.replace(**parse_overrides(args.overrides)) if args.overrides else base.config
    model = THLModel(config, params=base.params)
    print(f"passkey, {args.trials} trials per length, seed {args.seed}, batched on the "
          f"{'fast' if has_fast_path(config) else 'plain'} path; components {config.components or 'spec'}, "
          f"memory_decay {config.memory_decay}")
    print(f"{'length':>8}  {'accuracy':>8}  {'digits':>6}  {'forced':>6}  {'bits/digit':>10}  {'control':>7}  "
          f"{'seconds':>7}  answers")
    rows = []
    for length in lengths:
        r = evaluate(model, length, args.trials, args.seed)
        rows.append(r)
        print(f"{length:>8}  {r['accuracy']:>8.2f}  {r['digit_accuracy']:>6.2f}  {r['forced_digit_accuracy']:>6.2f}  "
              f"{r['key_bits_per_digit']:>10.2f}  {r['control_bits_per_digit']:>7.2f}  {r['seconds']:>7.0f}  "
              f"{' '.join(a if a == k else a + '≠' + k for a, k in zip(r['answers'], r['keys'], strict=True))}",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
