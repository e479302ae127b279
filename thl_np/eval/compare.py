"""Two models on the same text: bits per byte of each, their difference, and how far apart their next-byte
distributions are (``thl-np eval --data TEXT --compare OTHER``).

The figures llama.cpp's perplexity tool reports for a quantized model against its float original: the
mean Kullback-Leibler divergence KL(P ‖ Q) = Σ_v P(v) (log P(v) − log Q(v)) of the next-byte distributions
over every predicted position (P: ``model``, the reference; Q: ``other``), and how often both put the
same byte first. Both models read identical lanes and chunks (``thl_np.training.trainer.evaluate``'s
protocol), each with its own state; every sum is in float64.
"""
from __future__ import annotations

import math
import time

import numpy as np

from ..components.output import log_softmax
from ..errors import InputError, WeightsError


def compare_models(model, other, data, seq_len: int = 128, lanes: int = 4, max_bytes: int | None = None,
                   progress=None) -> dict:
    """Bits per byte of ``model`` (keys as ``evaluate``'s) with ``"compare"``: ``other``'s bits per byte, the
    difference (other − model), the mean KL(P_model ‖ P_other) in nats per byte, and the fraction of
    positions where both models rank the same byte first. ``progress(done, total)``: after each chunk (bytes)."""
    from ..training.data import eval_lanes

    if seq_len < 1:
        raise InputError(f"seq_len = {seq_len} must be >= 1")
    if other.config.vocab_size != model.config.vocab_size:
        raise InputError(f"the models have different vocabularies ({model.config.vocab_size} and "
                         f"{other.config.vocab_size} tokens): compare models of one tokenizer")
    ids = eval_lanes(data, lanes, max_bytes)
    n_lanes, lane_len = ids.shape
    t0 = time.perf_counter()
    state_a = state_b = None
    ce_a = ce_b = kl = 0.0
    same = count = 0
    for start in range(0, lane_len - 1, seq_len):
        stop = min(start + seq_len, lane_len - 1)
        logits_a, state_a = model(ids[:, start:stop], state=state_a)
        logits_b, state_b = other(ids[:, start:stop], state=state_b)
        la = log_softmax(np.asarray(logits_a, dtype=np.float64))
        lb = log_softmax(np.asarray(logits_b, dtype=np.float64))
        targets = ids[:, start + 1:stop + 1, None]
        ce_a -= float(np.take_along_axis(la, targets, axis=-1).sum())
        ce_b -= float(np.take_along_axis(lb, targets, axis=-1).sum())
        kl += float((np.exp(la) * (la - lb)).sum())
        same += int((la.argmax(axis=-1) == lb.argmax(axis=-1)).sum())
        count += n_lanes * (stop - start)
        if progress is not None:
            progress(count, n_lanes * (lane_len - 1))
    nats_a, nats_b, kl = ce_a / count, ce_b / count, kl / count
    for name, value in (("the model's cross-entropy", nats_a), ("the other model's cross-entropy", nats_b),
                        ("the KL divergence", kl)):
        if not math.isfinite(value):
            raise WeightsError(f"{name} is {value} over {count} bytes: a model gives non-finite logits (its weights "
                               "are corrupt or training diverged)")
    bpb_a, bpb_b = nats_a / math.log(2), nats_b / math.log(2)
    return {"bits_per_byte": bpb_a, "nats_per_byte": nats_a, "bytes": count, "lanes": n_lanes,
            "seconds": time.perf_counter() - t0,
            "compare": {"bits_per_byte": bpb_b, "nats_per_byte": nats_b, "bits_per_byte_difference": bpb_b - bpb_a,
                        "mean_kl_nats": kl, "mean_kl_bits": kl / math.log(2), "same_top_byte": same / count}}


def compare_lines(result: dict, model_name: str, other_name: str) -> list[str]:
    """The comparison as text."""
    c = result["compare"]
    return [f"bits_per_byte  model   {result['bits_per_byte']:.4f}  ({model_name})",
            f"bits_per_byte  compare {c['bits_per_byte']:.4f}  ({other_name})",
            f"difference (compare - model): {c['bits_per_byte_difference']:+.4f} bits/byte",
            f"mean KL(model || compare): {c['mean_kl_nats']:.6f} nats/byte ({c['mean_kl_bits']:.6f} bits/byte); "
            f"same top byte {100 * c['same_top_byte']:.2f}% of {result['bytes']:,} positions"]
