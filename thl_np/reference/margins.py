"""Margins of the discrete choices: how far each top-κ pick, capacity mask, write branch, write target,
arg-max slot and clip decision of a reference case is from a tie.

A case is only written when every margin clears ``MARGINS`` (and the float32 run makes the same choices
as the float64 one), so a correct port, in either precision, makes exactly the same choices.
``trace_sequence`` runs the spec §4 step by step and records each choice with the margin that decided it;
the scores, affinities and eviction keys come from the config's own components (``thl_np.step.read_scores``
for the router's scores, so a ``unit_keys`` router is measured by its own scores; the writer's
``affinities`` / ``novelty_of`` / ``eviction_scores``), recomputed from the step's inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..components.registry import SPEC, components_for
from ..components.router import gumbel_noise
from ..components.writer import EMPTY_NORM, affinities, eviction_scores, novelty_of
from ..errors import InputError
from ..state import InferenceState
from ..step import read_scores, thl_step

#: Smallest margin every discrete choice must keep (``trace_sequence``, ``writer_margins``): score gaps,
#: arg-max affinity gap, |novelty − θ|, relative distance of ‖w_raw‖ from the clip point, relative gaps
#: of the staleness/underuse ranking, decades between a slot norm and the 1e-6 "empty" threshold, and
#: the norm of the arg-max slot j* (an empty j* would make d aff/d m_j* ~ 1e8: ill-conditioned).
MARGINS = {"score_gap": 1e-4, "aff_gap": 1e-4, "novelty": 1e-4, "clip": 1e-4, "lru_gap": 1e-4,
           "empty_decades": 2.0, "jstar_norm": 1e-3, "grad_clip": 1e-3}

#: How many draws a case tries (the next seed, or the next draw of its generator) before it gives up on
#: clearing the margins.
MAX_ATTEMPTS = 200


def desc_gaps(values, k):
    """Gaps between consecutive entries of ``values`` (last axis) sorted descending, for the first k
    ranks and the boundary after them: what decides both the top-k set and its order."""
    s = -np.sort(-values, axis=-1)
    n = min(k, s.shape[-1] - 1)
    if n <= 0:
        return np.full(values.shape[:-1], np.inf)
    return (s[..., :n] - s[..., 1:n + 1]).min(axis=-1)


def router_scores(params, config, e, state, gumbel=None):
    """Spec §4.3 scores [B, H, J] by the config's router (``thl_np.step.read_scores``), for margins."""
    return read_scores(params, config, e, state, gumbel)


def writer_margins(w, n_raw, memory, read_ema_after, last_write, t, *, write_slots, clip_max, theta,
                   stale_weight, underuse_weight):
    """Margins and branch of the writer's choices for every sequence (spec §4.6), from the writer's own
    affinities, novelty and eviction key."""
    B = w.shape[0]
    aff, _, _, n_m = affinities(memory, w)
    j_star, novelty = novelty_of(aff)
    evict = eviction_scores(n_m, read_ema_after, last_write, t, stale_weight, underuse_weight)
    out = {"clip": np.inf, "aff_gap": np.inf, "novelty": np.inf, "lru_gap": np.inf, "empty_decades": np.inf,
           "jstar_norm": np.inf}
    branches = []
    for b in range(B):
        out["clip"] = min(out["clip"], abs(n_raw[b] + 1e-6 - clip_max) / clip_max)
        out["novelty"] = min(out["novelty"], abs(novelty[b] - theta))
        nz = n_m[b][n_m[b] > 0]
        if nz.size:
            out["empty_decades"] = min(out["empty_decades"], float(np.abs(np.log10(nz / EMPTY_NORM)).min()))
        empty = n_m[b] <= EMPTY_NORM
        out["jstar_norm"] = min(out["jstar_norm"], float(n_m[b, j_star[b]]))
        if novelty[b] > theta:
            out["aff_gap"] = min(out["aff_gap"], desc_gaps(aff[b], 1))       # the arg-max slot j*
            if empty.any():
                branches.append("novel_empty")
            else:
                s = -np.sort(-evict[b])
                n = min(write_slots, s.size - 1)
                if n > 0:
                    rel = (s[:n] - s[1:n + 1]) / np.maximum(1.0, np.abs(s[:n]))
                    out["lru_gap"] = min(out["lru_gap"], float(rel.min()))
                branches.append("novel_lru")
        else:
            out["aff_gap"] = min(out["aff_gap"], desc_gaps(aff[b], write_slots))
            branches.append("refine")
    return out, branches


@dataclass
class Trace:
    """The discrete choices of a run, step by step, their smallest margins, and branch counts."""

    choices: dict
    margins: dict
    counts: dict
    tier_states: np.ndarray
    final_state: InferenceState

    def margins_ok(self) -> bool:
        return all(self.margins.get(k, np.inf) >= v for k, v in MARGINS.items())

    def same_choices(self, other: Trace) -> bool:
        return all(np.array_equal(self.choices[k], other.choices[k]) for k in self.choices)


def trace_sequence(params, config, input_ids, state, gumbel_uniform=None) -> Trace:
    """Run ``thl_step`` step by step, recording every discrete choice and the margin that decided it."""
    c = config
    if components_for(c).writer.name != SPEC:
        raise InputError(f"the margins measure the spec writer's choices; the writer variant "
                         f"{c.components.get('writer')!r} makes its own")
    dtype = params["embedding.weight"].dtype
    B, T = input_ids.shape
    margins = {k: np.inf for k in ("score_gap", "aff_gap", "novelty", "clip", "lru_gap", "empty_decades",
                                   "jstar_norm")}
    counts = {"novel_empty": 0, "novel_lru": 0, "refine": 0, "clipped": 0, "unclipped": 0,
              "capacity_masked_picks": 0, "capacity_fallback_heads": 0, "local_attention_steps": 0}
    rec_keys = ("idx", "targets", "novel", "j_star", "clipped") + (("capacity_mask",) if
                                                                   c.read_slot_capacity is not None else ())
    choices = {k: [] for k in rec_keys}
    tier_states = np.empty((B, T, c.total_tier_dim), dtype=dtype)
    for t in range(T):
        gumbel = None if gumbel_uniform is None else gumbel_noise(gumbel_uniform[t], dtype)
        prev = state
        ids = input_ids[:, t]
        tier_states[:, t], state, rec = thl_step(params, c, ids, prev, gumbel, record=True)
        e = params["embedding.weight"][ids]
        scores = router_scores(params, c, e, prev, gumbel)
        margins["score_gap"] = min(margins["score_gap"], float(desc_gaps(scores, c.read_topk).min()))
        wm, branches = writer_margins(
            rec.w, rec.writer.n_raw, prev.memory, state.read_ema, prev.last_write, int(prev.timestep),
            write_slots=c.write_slots, clip_max=c.write_clip_max, theta=c.novelty_theta,
            stale_weight=c.stale_weight, underuse_weight=c.underuse_weight)
        for k, v in wm.items():
            margins[k] = min(margins[k], float(v))
        for br in branches:
            counts[br] += 1
        n_clip = int(rec.writer.clipped.sum())
        counts["clipped"] += n_clip
        counts["unclipped"] += B - n_clip
        counts["local_attention_steps"] += int(rec.local is not None)
        choices["idx"].append(rec.idx)
        choices["targets"].append(rec.targets)
        choices["novel"].append(rec.writer.novel)
        choices["j_star"].append(rec.writer.j_star)
        choices["clipped"].append(rec.writer.clipped)
        if c.read_slot_capacity is not None:
            cap_mask, cap_used = rec.router.cap_mask, rec.router.cap_used
            choices["capacity_mask"].append(cap_mask)
            counts["capacity_masked_picks"] += int((cap_mask == 0).sum())
            counts["capacity_fallback_heads"] += int((~cap_used).sum())
    choices = {k: np.stack(v).astype(np.int64) for k, v in choices.items()}
    return Trace(choices, margins, counts, tier_states, state)
