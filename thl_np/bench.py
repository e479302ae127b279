"""Throughput and memory figures, all measured in one run (``thl-np bench``).

Nothing here asserts a speed: it prints what it measured, the machine's GEMV bandwidth, and the
bandwidth bound of a decode step (the bytes a step must read ÷ that bandwidth), so a figure can be
read against what the hardware allows.
"""
from __future__ import annotations

import functools
import platform
import resource
import time

import numpy as np

from .config import THLConfig


def decode_bytes_per_step(config: THLConfig, batch_size: int = 1, itemsize: int = 4) -> dict:
    """Bytes one decode step must read, averaged over the tier clocks (a tier's weights are read only on
    its active steps). Weights are read once per step whatever the batch; the bank scan (the writer's
    affinities and the router's cached keys) is per sequence."""
    c = config
    d_v = c.value_dim
    weights = {
        "output_head": c.vocab_size * (c.total_tier_dim + 1),
        "router": (c.num_heads * c.head_dim) * (c.router_input_dim + c.memory_dim) + d_v * c.memory_dim,
        "writer": c.memory_dim * (c.writer_input_dim + 1),
        "local_attn": (2 * c.query_dim + d_v) * c.embedding_dim if c.local_window else 0,
        "tiers": sum(3 * d * (d + c.tier_input_dim(k) + d_v + 1) / tau
                     for k, (d, tau) in enumerate(zip(c.tier_dims, c.tier_timescales, strict=True))),
    }
    per_sequence = c.memory_slots * (c.memory_dim + c.num_heads * c.head_dim) + c.embedding_dim
    out = {k: v * itemsize for k, v in weights.items()}
    out["state_scan"] = batch_size * per_sequence * itemsize
    out["total"] = sum(out.values())
    return out


class _Gemv:
    """A float32 GEMV over a matrix far larger than the caches, by NumPy's BLAS and by the decoder's own
    kernel (``thl_np.fast.linalg.gemv``); ``sample()`` times each a few times."""

    def __init__(self, nbytes: int = 256 << 20, cols: int = 2048):
        from .fast.linalg import gemv

        rows = max(1, nbytes // (4 * cols))
        self.A = np.random.default_rng(0).random((rows, cols), dtype=np.float32)
        self.x = np.ones(cols, np.float32)
        self._out, self._zeros = np.empty(rows, np.float32), np.zeros(rows, np.float32)
        self._kernel = gemv
        self.times = {"blas": [], "kernel": []}

    def sample(self, repeats: int = 3) -> None:
        from ._blas import blas_threads

        self.times["blas"] += [_timed(lambda: self.A @ self.x) for _ in range(repeats)]
        time.sleep(0.2)  # OpenBLAS's workers spin for a while after a call: let them sleep before what follows
        with blas_threads(1):
            self.times["kernel"] += [_timed(lambda: self._kernel(self.A, self._zeros, self.x, self._out))
                                     for _ in range(repeats)]

    def rates(self) -> dict:
        """Median bytes/s of each; "best" is the larger, the machine's bandwidth for the bound."""
        out = {k: self.A.nbytes / float(np.median(v)) for k, v in self.times.items()}
        out["best"] = max(out.values())
        return out


def bench_decode_and_bandwidth(model, batch_sizes=(1, 8), rounds: int = 8, steps: int = 8,
                               warmup_s: float = 1.0) -> tuple[dict, dict]:
    """Tokens/s of the fast decode path (logits every step) at each batch size, and the GEMV bandwidth,
    measured in alternating rounds so that both see the same machine (on a shared machine the memory
    bandwidth moves by 1.5× within seconds). Each figure is a median over all rounds, after a warm-up of
    at least ``warmup_s`` seconds per decoder and for the GEMVs (freshly allocated memory reads slower at
    first on some machines)."""
    gemv = _Gemv()
    decoders = {B: model.decoder(batch_size=B) for B in batch_sizes}
    ids = {B: np.arange(B) % model.config.vocab_size for B in batch_sizes}
    for B, dec in decoders.items():
        t_end = time.perf_counter() + warmup_s
        for i in range(1_000_000):
            dec.step(ids[B])
            if i >= 7 and time.perf_counter() > t_end:
                break
    t_end = time.perf_counter() + warmup_s
    while time.perf_counter() < t_end:
        gemv.sample(1)
    gemv.times = {"blas": [], "kernel": []}
    step_times = {B: [] for B in batch_sizes}
    for _ in range(rounds):
        gemv.sample()
        for B, dec in decoders.items():
            dec.step(ids[B])  # the first step after the GEMVs finds its weights out of the caches: not timed
            step_times[B] += [_timed(functools.partial(dec.step, ids[B])) for _ in range(steps)]
    tokens_per_s = {B: B / float(np.median(t)) for B, t in step_times.items()}
    return tokens_per_s, gemv.rates()


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_prompt(model, length: int = 128, repeats: int = 3) -> float:
    """Tokens/s of ``model(ids)`` with logits at every position."""
    ids = (np.arange(length) % model.config.vocab_size)[None, :]
    model(ids[:, :4])
    return length / min(_timed(lambda: model(ids)) for _ in range(repeats))


def bench_train(config: THLConfig, seq_len: int = 128, batch_size: int = 8, repeats: int = 3,
                seed: int = 0) -> float:
    """Tokens/s of forward + backward (value_and_grad, training-mode routing) on random bytes."""
    from .model import THLModel, value_and_grad

    model = THLModel(config, seed=seed)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, min(256, config.vocab_size), size=(batch_size, seq_len + 1))
    U = rng.random((seq_len, batch_size, config.num_heads, config.memory_slots))
    value_and_grad(model, ids[:, :2], ids[:, 1:3], gumbel_uniform=U[:2])
    best = min(_timed(lambda: value_and_grad(model, ids[:, :-1], ids[:, 1:], gumbel_uniform=U))
               for _ in range(repeats))
    return batch_size * seq_len / best


def run(model=None, config: THLConfig | None = None, echo=print, train_config: THLConfig | None = None,
        decode_steps: int = 64, prompt_len: int = 128, train: bool = True) -> dict:
    """Every figure of issue 5 in one run; returns them as a dict and prints them with ``echo``."""
    from .model import THLModel

    if model is None:
        config = config or THLConfig()
        t0 = time.perf_counter()
        model = THLModel(config, seed=0)
        echo(f"built {model!r} in {time.perf_counter() - t0:.1f}s")
    c = model.config
    itemsize = model.dtype.itemsize
    figures = {"machine": f"{platform.processor() or platform.machine()}, {_cores()} cores",
               "dtype": str(model.dtype), "parameters": model.num_parameters()}
    decode, rates = bench_decode_and_bandwidth(model, (1, 8), rounds=max(1, decode_steps // 8))
    bw = rates["best"]
    figures["gemv_bandwidth_GBps"] = bw / 1e9
    figures["gemv_bandwidth_blas_GBps"] = rates["blas"] / 1e9
    figures["gemv_bandwidth_kernel_GBps"] = rates["kernel"] / 1e9
    for B in (1, 8):
        need = decode_bytes_per_step(c, B, itemsize)
        bound = B * bw / need["total"]
        tps = decode[B]
        figures[f"decode_b{B}_tok_s"] = tps
        figures[f"decode_b{B}_bound_tok_s"] = bound
        figures[f"decode_b{B}_ratio_to_bound"] = tps / bound
        echo(f"decode batch {B}: {tps:8.1f} tokens/s   bound {bound:8.1f} tokens/s "
             f"({need['total'] / 1e6:.0f} MB/step at {bw / 1e9:.1f} GB/s)   ratio {tps / bound:.2f}")
    figures["prompt_tok_s"] = bench_prompt(model, prompt_len)
    echo(f"prompt ({prompt_len} tokens, all logits): {figures['prompt_tok_s']:.1f} tokens/s")
    if train:
        tc = train_config or THLConfig(dim=128, memory_slots=64, vocab_size=259, dtype=str(model.dtype))
        figures["train_tok_s"] = bench_train(tc)
        echo(f"train fwd+bwd (d={tc.embedding_dim}, J={tc.memory_slots}, T=128, B=8): "
             f"{figures['train_tok_s']:.0f} tokens/s")
    figures["peak_rss_MB"] = peak_rss_bytes() / 1e6
    echo(f"GEMV bandwidth {bw / 1e9:.1f} GB/s (the better of OpenBLAS {rates['blas'] / 1e9:.1f} and thl-np's kernel "
         f"{rates['kernel'] / 1e9:.1f}); peak resident memory {figures['peak_rss_MB']:.0f} MB; {figures['machine']}")
    return figures


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
