"""Follow one passkey trial through the memory: where the key sentence was written, what happened to those
slots until the question, and whether the question's reads found them.

``passkey_trace`` runs the first trial of ``passkey_eval`` (the same key, filler and prompt for the same
length, depth, filler and seed) one token at a time on a decoding session, fast or plain, reading every
step's choices with ``thl_np.eval.diagnostics.MemoryObserver``:

- **written**: every write made while the key line is read (the "key slots"), with its branch and gate;
  the steps that read a digit of the key are marked (the text also shows the write at the byte after the
  key: a recall value's stop byte, which marks where the value ends);
- **afterwards**, per key slot until the end of the prompt: refines (another write into it by the refine
  branch), evictions (a novel write chose it: λ_s·staleness + λ_u·underuse), fills, reads (the router picked
  it), its norm against the decay alone (γ^steps under the spec; under another memory write, such as
  ``decay_on_write``, what that variant's decay did to the row), and the **key's share** of the row at the end: the norm
  of what the key line's writes added to it (each write's η·g·w, measured as the row's change over the step
  less the decay, then decayed to the end) over the row's norm (1: the row is the key line's writes; near
  0: drowned by the rest), with the same share for the writes made at the key's digits;
- **the question**: at each of its steps, every head's rank of every key slot among all J router scores
  (spec §4.3 scores, or the ``unit_keys`` variant's, recomputed from the state before the step by
  ``thl_np.step.read_scores``: rank 0 is the best; a slot is read when its rank is below κ), their scores
  against the κ-th best (the score a slot needs to be read), and whether it was picked.

The figures come from the steps themselves, so the fast and the plain session give the same trace.
"""
from __future__ import annotations

import math

import numpy as np

from ..components.primitives import top_k_desc
from ..components.registry import components_for
from ..memory_steps import BRANCHES, MemoryObserver
from ..step import read_scores
from ..training.haystack import Haystack, depth_label, haystack_prompt, parse_depth
from .long_context import KEY_DIGITS, decoding_session, greedy_bytes


def passkey_trial(length: int, seed: int = 0, depth=0.5, filler: str = "python", haystack_dir=None) -> dict:
    """The first trial ``passkey_eval`` runs at ``length`` with the same seed, depth and haystack: its key,
    prompt (bytes) and where the parts sit."""
    hay = Haystack(filler, haystack_dir)
    rng = np.random.default_rng([int(seed), int(length)])
    key = "".join(str(d) for d in rng.integers(0, 10, size=KEY_DIGITS))
    prompt, at = haystack_prompt(length, key, depth, hay, rng)
    key_line = hay.phrasing["key"].format(key=key)
    digits = sorted({at + i + k for i in range(len(key_line)) if key_line.startswith(key, i) for k in range(len(key))})
    question = len(hay.phrasing["question"])
    return {"key": key, "prompt": prompt, "key_start": at, "key_end": at + len(key_line), "digit_steps": digits,
            "question_start": length - question, "haystack": hay.describe(),
            "key_depth": round(at / max(1, length - len(key_line) - question), 4)}


def trace_decoder(model, path: str = "auto"):
    """A batch-1 decoding session on ``path``: "auto" (``model.decoder()``), "fast" or "plain"
    (``thl_np.eval.long_context.decoding_session``)."""
    return decoding_session(model, path)


def _query_ranks(model, state, token: int) -> tuple[np.ndarray, np.ndarray]:
    """([H, J] the rank (0 = best) of every slot's router score at the next step, ties to the lower index;
    [H, J] the scores, by the model's router: ``thl_np.step.read_scores``)."""
    c, P = model.config, model.params
    scores = read_scores(P, c, P["embedding.weight"][[token]], state)
    order = top_k_desc(scores[0], c.memory_slots)          # [H, J] slots, best first
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(c.memory_slots)[None, :], axis=1)
    return ranks, np.asarray(scores[0], dtype=np.float64)


def passkey_trace(model, length: int = 1024, seed: int = 0, depth=0.5, filler: str = "python",
                  path: str = "auto", haystack_dir=None) -> dict:
    """Trace the first passkey trial at ``length`` (module docstring) → a dict (``trace_lines`` prints it).
    ``depth``, ``filler`` and ``haystack_dir`` choose the prompt as in ``passkey_eval``."""
    from ..tokenizer import Tokenizer

    depth = parse_depth(depth)
    trial = passkey_trial(length, seed, depth, filler, haystack_dir)
    ids = Tokenizer().encode(trial["prompt"])
    tr = trace_prompt(model, ids, trial["key_start"], trial["key_end"], trial["question_start"],
                      trial["digit_steps"], KEY_DIGITS, path)
    answer = tr.pop("answer")
    return {"length": int(length), "seed": int(seed), "depth": depth_label(depth), "filler": filler,
            "haystack": trial["haystack"], "key_depth": trial["key_depth"],
            "path": tr.pop("path"), "key": trial["key"], "answer": answer,
            "correct": answer == trial["key"], **tr}


def decay_rows(model, memory_write, rows, last_write, targets, t: int):
    """``rows`` [J, n] (any columns per slot) after step ``t``'s decay, as the model's memory write (its
    config's variant: ``memory_write`` of ``components``) decays the memory when ``targets`` are written and
    the state's ``last_write`` [J] is as given: that variant's forward (``memory_write``, the variant
    ``components_for`` chose) with nothing written (g = 0). The spec multiplies every row by γ;
    ``decay_on_write`` only the targets, by γ^(t − last_write)."""
    c = model.config
    out, _, _ = memory_write.forward(
        rows[None], np.zeros((1, rows.shape[0])), np.asarray(last_write)[None], np.asarray(targets)[None],
        np.zeros(1, rows.dtype), np.zeros((1, rows.shape[1]), rows.dtype), t, decay=c.memory_decay,
        write_rate=c.write_rate, ema_decay=c.write_ema_decay)
    return out[0]


def trace_prompt(model, ids, k0: int, k1: int, q0: int, digit_steps, answer_bytes: int, path: str = "auto") -> dict:
    """The memory's handling of one prompt (``ids``, one sequence): the writes made while reading steps
    ``k0``..``k1 - 1`` (the key line; ``digit_steps`` marks the key's own bytes), those slots' fate until
    the end, and the question's reads from step ``q0`` on (module docstring); then ``answer_bytes`` greedy
    bytes. ``passkey_trace`` and ``thl_np.eval.recall``'s ``--trace`` both read their trial through it."""
    c = model.config
    dec = trace_decoder(model, path)
    obs = MemoryObserver(dec)
    digit_steps = set(digit_steps)
    written, slots, question = [], {}, []
    J, d_m = c.memory_slots, c.memory_dim
    memory_write = components_for(c).memory_write            # resolved once: decay_rows runs every step
    # Columns: the key line's writes, those made at the key's digits (each decayed to the current step), and
    # each slot's decay alone since the key line's end (1 until then).
    followed = np.zeros((J, 2 * d_m + 1))
    followed[:, -1] = 1.0
    last_write = None                                        # the state's last_write before the step, from k0 on
    snapshot = None
    S = None
    for t, tok in enumerate(ids):
        before = dec.state() if (t >= q0 or k0 <= t < k1) else None
        if t == k0:
            last_write = np.asarray(before.last_write[0]).copy()
        ranks, scores = _query_ranks(model, before, int(tok)) if t >= q0 else (None, None)
        S, st = obs.step(np.array([tok]))
        branch = BRANCHES[int(st.branch[0, 0])]
        targets = [int(j) for j in st.targets[0, 0]]
        g = float(st.g[0, 0])
        idx = st.idx[0, 0]                                   # [H, κ]
        if t >= k0:
            followed = decay_rows(model, memory_write, followed, last_write, targets, t)
            if t < k1:
                followed[:, -1] = 1.0
        if k0 <= t < k1:
            decayed = decay_rows(model, memory_write, np.asarray(before.memory[0], np.float64), last_write, targets, t)
            added = np.asarray(dec.state().memory[0], np.float64) - decayed
            key_rows, digit_rows = followed[:, :d_m], followed[:, d_m:2 * d_m]
            key_rows[targets] += added[targets]
            if t in digit_steps:
                digit_rows[targets] += added[targets]
            written.append({"step": t, "byte": chr(int(tok)), "digit": t in digit_steps, "slots": targets,
                            "branch": branch, "gate": g})
            for j in targets:
                slots.setdefault(j, {"slot": j, "writes_in_key_line": 0, "digit_writes": 0, "last_key_write": t,
                                     "refines": [], "fills": [], "evictions": [], "reads": []})
                slots[j]["writes_in_key_line"] += 1
                slots[j]["digit_writes"] += t in digit_steps
                slots[j]["last_key_write"] = t
            if t == k1 - 1:
                snapshot = np.asarray(dec.state().memory[0], dtype=np.float64)
        elif t >= k1:
            for j in targets:
                if j in slots:
                    event = {"step": t, "gate": g}
                    {"refine": slots[j]["refines"], "novel_empty": slots[j]["fills"],
                     "novel_evict": slots[j]["evictions"]}[branch].append(event)
            for h in range(c.num_heads):
                for r, j in enumerate(idx[h]):
                    if int(j) in slots:
                        slots[int(j)]["reads"].append({"step": t, "head": h, "rank": r,
                                                       "alpha": float(st.alpha[0, 0, h, r])})
        if t >= k0:
            last_write[targets] = t
        if ranks is not None:
            picked = {int(j) for j in idx.reshape(-1)}
            norms = np.sqrt((np.asarray(before.memory[0], np.float64) ** 2).sum(axis=1))
            question.append({"step": t, "byte": chr(int(tok)),
                             "ranks": {j: [int(ranks[h, j]) for h in range(c.num_heads)] for j in sorted(slots)},
                             "scores": {j: [float(scores[h, j]) for h in range(c.num_heads)] for j in sorted(slots)},
                             "read_threshold": [float(np.sort(scores[h])[::-1][c.read_topk - 1])
                                                for h in range(c.num_heads)],
                             "negative_score_share": float((scores < 0).mean()),
                             "norm_read": float(norms[idx.reshape(-1)].mean()), "norm_bank": float(norms.mean()),
                             "picked": sorted(j for j in slots if j in picked),
                             "picked_digit_slots": sorted(j for j in slots
                                                          if j in picked and slots[j]["digit_writes"])})
    final = dec.state()
    mem = np.asarray(final.memory[0], dtype=np.float64)
    key_rows, digit_rows, decay_alone = followed[:, :d_m], followed[:, d_m:2 * d_m], followed[:, -1]
    for j, s in slots.items():
        then, now = snapshot[j], mem[j]
        n_then, n_now = float(np.linalg.norm(then)), float(np.linalg.norm(now))
        s["norm_after_key_line"] = n_then
        s["norm_at_end"] = n_now
        s["decay_alone"] = float(decay_alone[j])
        s["cosine_with_key_content"] = float(then @ now / (n_then * n_now)) if n_then > 0 and n_now > 0 else 0.0
        s["key_share_at_end"] = float(np.linalg.norm(key_rows[j]) / n_now) if n_now > 0 else 0.0
        s["digit_share_at_end"] = float(np.linalg.norm(digit_rows[j]) / n_now) if n_now > 0 else 0.0
        s["best_rank_last_step"] = min(question[-1]["ranks"][j]) if question else None
    logits = dec.logits(S)
    answer = bytes(greedy_bytes(dec, logits, int(answer_bytes), min(256, c.vocab_size))).decode("latin-1")
    for s in slots.values():
        for key in ("refines", "fills", "evictions", "reads"):
            s[key + "_count"] = len(s[key])
    return {"path": "fast" if obs.fast else "plain", "answer": answer, "key_start": k0, "key_end": k1,
            "question_start": q0,
            "memory_slots": int(c.memory_slots), "read_topk": int(c.read_topk), "written": written,
            "key_slots": [slots[j] for j in sorted(slots)], "question": question}


def _steps(events, limit=6) -> str:
    shown = ", ".join(str(e["step"]) for e in events[:limit])
    return shown + (f", ... ({len(events)} in all)" if len(events) > limit else "")


def trace_lines(tr: dict) -> list[str]:
    """The trace as text."""
    J, kappa = tr["memory_slots"], tr["read_topk"]
    what, key = ((f"recall trace of cell {tr['cell']}", repr(tr["key"] + tr["stop"])) if "cell" in tr
                 else ("passkey trace", tr["key"]))
    out = [f"{what} ({tr['path']} path): length {tr['length']}, seed {tr['seed']}, key {key} in the "
           f"line at bytes {tr['key_start']}-{tr['key_end'] - 1} (depth {tr['key_depth']:.2f} of a "
           f"{tr['haystack']['kind']} haystack), question from byte {tr['question_start']}; "
           f"greedy answer {tr['answer']!r} ({'right' if tr['correct'] else 'wrong'})"]
    by_branch = {b: sum(w["branch"] == b for w in tr["written"]) for b in BRANCHES}
    out.append(f"key line: {len(tr['written'])} writes into slots {[s['slot'] for s in tr['key_slots']]} "
               f"(refine {by_branch['refine']}, novel into an empty slot {by_branch['novel_empty']}, "
               f"novel evicting {by_branch['novel_evict']})")
    def write(w, byte):
        return f"{byte}@{w['step']}->{','.join(map(str, w['slots']))} ({w['branch']}, g {w['gate']:.2f})"

    digits = [w for w in tr["written"] if w["digit"]]
    out.append("  the key's digits: " + "; ".join(write(w, w["byte"]) for w in digits))
    # The byte after the key (a recall value's stop byte): what marks where the key ends in the memory.
    after = next((w for w in tr["written"] if digits and w["step"] == digits[-1]["step"] + 1), None)
    if after is not None:
        out.append(f"  the byte after them: {write(after, repr(after['byte']))}")
    out.append(f"after the key line (steps {tr['key_end']}-{tr['length'] - 1}), per key slot:")
    for s in tr["key_slots"]:
        fate = []
        if s["evictions"]:
            fate.append(f"evicted at {_steps(s['evictions'])}")
        if s["refines"]:
            fate.append(f"refined {s['refines_count']}x ({_steps(s['refines'], 3)})")
        if s["fills"]:
            fate.append(f"filled at {_steps(s['fills'])}")
        reads = f"read {s['reads_count']}x" + (f" (last at {s['reads'][-1]['step']})" if s["reads"] else "")
        out.append(f"  slot {s['slot']:>3}: {s['writes_in_key_line']} key-line writes ({s['digit_writes']} at "
                   f"digits); {'; '.join(fate) or 'never written again'}; {reads}; norm "
                   f"{s['norm_after_key_line']:.4f} -> {s['norm_at_end']:.4f} (decay alone x{s['decay_alone']:.3f}); "
                   f"the key line's writes are {s['key_share_at_end']:.2%} of the row at the end (its digits' "
                   f"{s['digit_share_at_end']:.2%}), cosine with the row after the key line "
                   f"{s['cosine_with_key_content']:.3f}")
    q = tr["question"]
    if q:
        hits = sum(bool(step["picked"]) for step in q)
        digit_hits = sum(bool(step["picked_digit_slots"]) for step in q)
        out.append(f"question (steps {q[0]['step']}-{q[-1]['step']}): a key slot was read at {hits} of {len(q)} "
                   f"steps, a slot holding the key's digits at {digit_hits} (read = rank < {kappa} of {J})")
        last = q[-1]
        thr = ", ".join(f"{x:.3g}" for x in last["read_threshold"])
        out.append(f"  last step ({last['byte']!r} -> first digit): a head reads the slots scoring at least its "
                   f"{kappa}th best score: {thr} (by head)")
        for j, ranks in last["ranks"].items():
            sc = ", ".join(f"{x:.3g}" for x in last["scores"][j])
            out.append(f"    slot {j}: rank {ranks}, score {sc}{' (read)' if j in last['picked'] else ''}")
        best = min((min(r) for step in q for r in step["ranks"].values()), default=math.inf)
        out.append(f"  best rank of any key slot at any question step: {best}")
        neg = np.mean([step["negative_score_share"] for step in q])
        out.append(f"  over the question: {neg:.1%} of the router's scores are negative; the slots read have a mean "
                   f"norm of {np.mean([step['norm_read'] for step in q]):.3f}, the bank "
                   f"{np.mean([step['norm_bank'] for step in q]):.3f}")
    return out
