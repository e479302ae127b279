"""`thl-np eval --diagnostics` and `--trace`: the memory figures of a run and one passkey trial traced through
the memory (``thl_np.eval.diagnostics``, ``thl_np.eval.trace``), turned into lines and JSON for the eval command."""
from __future__ import annotations

import numpy as np

DIAG_BYTES = 4096


def diagnostics_text(stream, lengths, filler: str, seed: int, depth=0.5, haystack_dir=None) -> tuple[np.ndarray, str]:
    """The byte ids the diagnostics run over, and what they are: the first DIAG_BYTES of ``stream`` (the
    --data bytes) or, without --data, the first passkey prompt at the longest of ``lengths`` (the haystack and
    depth of --passkey)."""
    if stream is not None:
        ids = np.asarray(stream[:DIAG_BYTES], dtype=np.int64)
        return ids, f"the first {len(ids):,} bytes of --data"
    from ..eval.trace import passkey_trial
    from ..tokenizer import Tokenizer

    length = max(lengths)
    trial = passkey_trial(length, seed, depth, filler, haystack_dir)
    return (Tokenizer().encode(trial["prompt"]),
            f"a {length:,}-byte passkey prompt ({filler} haystack, key at depth {trial['key_depth']:.2f}, seed {seed})")


def run_diagnostics(model, ids, what: str, path: str, plot: str | None, say) -> dict:
    """Memory figures over ``ids`` (one sequence, a fresh state) on the decoding path ``path``; draws the
    slot-use plot into ``plot`` when given. Returns the summary (and the plot's path)."""
    from ..eval.diagnostics import MemoryStats, observe_decoder, plot_diagnostics, summary_lines
    from ..eval.trace import trace_decoder

    dec = trace_decoder(model, path)
    stats = observe_decoder(dec, np.asarray(ids)[None, :], MemoryStats(model.config.memory_slots,
                                                                      keep_series=plot is not None))
    summary = stats.summary(dec.state())
    summary["text"] = what
    summary["path"] = "fast" if hasattr(dec, "_novel") else "plain"
    say(f"memory diagnostics ({summary['path']} path) over {what}:")
    for line in summary_lines(summary):
        say(line)
    if plot is not None:
        summary["plot"] = plot_diagnostics(stats.series_arrays(), plot, model.config.memory_slots,
                                           title=f"slot use over {what} ({summary['path']} path)")
        say(f"wrote {summary['plot']}")
    return summary


def run_traces(model, lengths, seed: int, depth, filler: str, path: str, say, haystack_dir=None) -> list[dict]:
    """``passkey_trace`` at each length, printed."""
    from ..eval.trace import passkey_trace, trace_lines

    out = []
    for length in lengths:
        tr = passkey_trace(model, length, seed=seed, depth=depth, filler=filler, path=path, haystack_dir=haystack_dir)
        for line in trace_lines(tr):
            say(line)
        out.append(tr)
    return out
