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

from .. import _threads
from ..config import THLConfig


def decode_bytes_per_step(config: THLConfig, batch_size: int = 1, itemsize: int = 4,
                          quantization: dict | None = None) -> dict:
    """Bytes one decode step must read, averaged over the tier clocks (a tier's weights are read only on
    its active steps). Weights are read once per step whatever the batch; the bank scan (the writer's
    affinities and the router's cached keys) is per sequence. With ``quantization`` (thl_np.quant) every
    matrix is int8 values and float32 scales; biases and the state stay in ``itemsize``."""
    c = config
    d_v, hq = c.value_dim, c.num_heads * c.head_dim

    def matrix(R, C):  # bytes of one weight matrix as the decoder reads it
        if quantization is None:
            return R * C * itemsize
        b = quantization["block_size"]
        return R * C + R * (1 if b is None else -(-C // b)) * 4

    out = {
        "output_head": matrix(c.vocab_size, c.total_tier_dim) + c.vocab_size * itemsize,
        "router": matrix(hq, c.router_input_dim) + matrix(hq, c.memory_dim) + matrix(d_v, c.memory_dim),
        "writer": matrix(c.memory_dim, c.writer_input_dim) + c.memory_dim * itemsize,
        "local_attn": 2 * matrix(c.query_dim, c.embedding_dim) + matrix(d_v, c.embedding_dim) if c.local_window else 0,
        "tiers": sum((3 * matrix(d, d + c.tier_input_dim(k) + d_v) + 3 * d * itemsize) / tau
                     for k, (d, tau) in enumerate(zip(c.tier_dims, c.tier_timescales, strict=True))),
    }
    per_sequence = c.memory_slots * (c.memory_dim + c.num_heads * c.head_dim) + c.embedding_dim
    out["state_scan"] = batch_size * per_sequence * itemsize
    out["total"] = sum(out.values())
    return out


class _Gemv:
    """A float32 GEMV over a matrix far larger than the caches, by NumPy's BLAS and by the decoder's own
    kernel (``thl_np.fast.linalg.gemv``); ``sample()`` times each a few times."""

    def __init__(self, nbytes: int = 256 << 20, cols: int = 2048):
        from ..fast.linalg import gemv

        rows = max(1, nbytes // (4 * cols))
        self.A = np.random.default_rng(0).random((rows, cols), dtype=np.float32)
        self.x = np.ones(cols, np.float32)
        self._out, self._zeros = np.empty(rows, np.float32), np.zeros(rows, np.float32)
        self._kernel = gemv
        self.times = {"blas": [], "kernel": []}

    def sample(self, repeats: int = 3) -> None:
        from .._blas import blas_threads

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


class ForwardStepChain:
    """The functional API as a user steps it, ``logits, state = model.forward_step(ids, state)``, behind a
    session's ``step(ids)`` (so the bench times it in the same rounds as ``FastDecoder.step``)."""

    def __init__(self, model, batch_size: int):
        self.model, self.state = model, model.init_state(batch_size)

    def step(self, ids):
        logits, self.state = self.model.forward_step(ids, self.state)
        return logits

    @property
    def threads(self):
        return getattr(self.state.decoder, "threads", None)


def bench_decode_and_bandwidth(model, batch_sizes=(1, 8), rounds: int = 8, steps: int = 8,
                               warmup_s: float = 1.0, forward_step=(), threads: dict | None = None
                               ) -> tuple[dict, dict]:
    """Tokens/s of the fast decode path (logits every step) at each batch size, and the GEMV bandwidth,
    measured in alternating rounds so that both see the same machine (on a shared machine the memory
    bandwidth moves by 1.5× within seconds). Each figure is a median over all rounds, after a warm-up of
    at least ``warmup_s`` seconds per decoder and for the GEMVs (freshly allocated memory reads slower at
    first on some machines). ``model`` may be a dict {label: model} (e.g. float32 and int8), measured in
    the same rounds: tokens/s are then keyed (label, batch size). A model is anything with
    ``decoder(batch_size).step(ids)`` and ``config.vocab_size`` (the PyTorch THL of ``benchmarks.bench_peer``
    too); one with a ``settle_s`` is left that long after its steps, so its threads go idle first.

    ``forward_step``: labels of models also stepped through the functional API (``ForwardStepChain``),
    each right after its session in every round; their tokens/s are keyed (label, batch size,
    "forward_step"), or (batch size, "forward_step") for a single model. ``threads``: a dict that
    receives the kernel thread count each of them last ran on (same keys)."""
    models = model if isinstance(model, dict) else {None: model}
    gemv = _Gemv()
    decoders, ids = {}, {}
    for label, m in models.items():
        for B in batch_sizes:
            decoders[(label, B)] = m.decoder(batch_size=B)
            if label in forward_step:
                decoders[(label, B, "forward_step")] = ForwardStepChain(m, B)
    for key in decoders:
        ids[key] = np.arange(key[1]) % models[key[0]].config.vocab_size
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
    step_times = {key: [] for key in decoders}
    # a session and its forward_step chain read the same weights: their steps alternate, one by one
    groups = {}
    for key in decoders:
        groups.setdefault(key[:2], []).append(key)
    for _ in range(rounds):
        gemv.sample()
        for (label, _B), keys in groups.items():
            for key in keys:
                decoders[key].step(ids[key])  # the first step after the GEMVs finds its weights out of the caches
            for _ in range(steps):
                for key in keys:
                    step_times[key].append(_timed(functools.partial(decoders[key].step, ids[key])))
            if getattr(models[label], "settle_s", 0):
                time.sleep(models[label].settle_s)
    tokens_per_s = {key: key[1] / float(np.median(t)) for key, t in step_times.items()}
    if threads is not None:
        for key, dec in decoders.items():
            policy = getattr(dec, "threads", None)
            if policy is not None:
                threads[key if isinstance(model, dict) else key[1:] if len(key) > 2 else key[1]] = policy.count
    if not isinstance(model, dict):
        tokens_per_s = {(key[1:] if len(key) > 2 else key[1]): v for key, v in tokens_per_s.items()}
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


def bench_generation(model, prompt_bytes: int = 4096, new_bytes: int = 500, repeats: int = 3,
                     threads: int = 1) -> dict:
    """A model's byte throughput as a user sees it, on ``threads`` threads (Numba's and OpenBLAS's):
    prefill (a decoding session's ``prompt`` over ``prompt_bytes`` of Python source, logits of the last
    position only, as generation runs it) and generation of ``new_bytes`` through the public
    ``generate_text`` (its path choice, its prompt and the session included), greedy and sampled
    (temperature 0.8, top-k 40, top-p 0.95). Each figure is the best of ``repeats`` after one untimed run
    (which compiles or loads the compiled code)."""
    import inspect

    import numba

    from .. import generation
    from .._blas import blas_threads

    source = inspect.getsource(generation).encode()
    text = (source * (prompt_bytes // len(source) + 1))[:prompt_bytes]
    ids = np.frombuffer(text, np.uint8).astype(np.int64)[None, :] % model.config.vocab_size
    sampled = dict(temperature=0.8, top_k=40, top_p=0.95, seed=0)
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        with blas_threads(threads):
            used = numba.get_num_threads()
            model.decoder(batch_size=1).prompt(ids[:, :8], logits="last")

            def prefill():
                model.decoder(batch_size=1).prompt(ids, logits="last")

            def generate(**kw):
                return lambda: generation.generate_text(model, None, "def main():\n", max_length=new_bytes, **kw)

            out = {"threads": used, "prompt_bytes": prompt_bytes, "new_bytes": new_bytes,
                   "path": generation.decode_path(model, 12 + new_bytes)}
            for key, fn in (("prefill_bytes_s", prefill), ("greedy_bytes_s", generate(temperature=0)),
                            ("sampled_bytes_s", generate(**sampled))):
                fn()
                n = prompt_bytes if key == "prefill_bytes_s" else new_bytes
                out[key] = n / min(_timed(fn) for _ in range(repeats))
    finally:
        numba.set_num_threads(before)
    return out


def bench_train(config: THLConfig, seq_len: int = 128, batch_size: int = 8, repeats: int = 3,
                seed: int = 0) -> float:
    """Tokens/s of forward + backward (value_and_grad, training-mode routing) on random bytes."""
    from ..model import THLModel, value_and_grad

    model = THLModel(config, seed=seed)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, min(256, config.vocab_size), size=(batch_size, seq_len + 1))
    U = rng.random((seq_len, batch_size, config.num_heads, config.memory_slots))
    value_and_grad(model, ids[:, :2], ids[:, 1:3], gumbel_uniform=U[:2])
    best = min(_timed(lambda: value_and_grad(model, ids[:, :-1], ids[:, 1:], gumbel_uniform=U))
               for _ in range(repeats))
    return batch_size * seq_len / best


def run(model=None, config: THLConfig | None = None, echo=print, train_config: THLConfig | None = None,
        decode_steps: int = 64, prompt_len: int = 128, train: bool = True, int8: str | None = "int8",
        peer=None, generation: bool = False) -> dict:
    """Every figure of issue 5 in one run; returns them as a dict and prints them with ``echo``.

    ``peer``: a ``benchmarks.bench_peer.Peer`` (``load_peer``) to run the PyTorch THL beside thl-np: its decode
    steps in the same rounds as thl-np's, its prompt right after thl-np's float prompt, its training step
    right after thl-np's, each printed with the ratio thl-np / PyTorch (``peer_*`` and ``*_vs_peer`` keys).

    ``int8``: a scheme of thl_np.quant (None: skip): the model's int8 copy is decoded in the same rounds
    as the float model, against its own bandwidth bound (the int8 bytes a step reads ÷ the same GEMV
    bandwidth), and its prompt throughput is measured too. A quantized ``model`` is measured against the
    float model it stands for.

    ``generation``: first, the model's prefill and generation bytes/s on one thread (``bench_generation``:
    ``generation_*`` keys), what a user of a small model sees."""
    from ..model import THLModel, dequantize_model, quantize_model
    from ..quant import scheme_name
    from ..quant.quantize import is_quantized

    if model is None:
        config = config or THLConfig()
        t0 = time.perf_counter()
        model = THLModel(config, seed=0)
        echo(f"built {model!r} in {time.perf_counter() - t0:.1f}s")
    qmodel = None
    if is_quantized(model):
        model, qmodel = dequantize_model(model), model
    elif int8:
        t0 = time.perf_counter()
        qmodel = quantize_model(model, int8)
        echo(f"quantized it ({scheme_name(qmodel.config.quantization)}) in {time.perf_counter() - t0:.1f}s")
    c = model.config
    itemsize = model.dtype.itemsize
    figures = {"machine": f"{platform.processor() or platform.machine()}, {_cores()} cores",
               "threads_requested": _threads.requested() or "auto", "others_running": _threads.others_running(),
               "dtype": str(model.dtype), "parameters": model.num_parameters()}
    if generation:
        g = bench_generation(model)
        figures.update({f"generation_{k}": v for k, v in g.items()})
        echo(f"one thread ({g['threads']} used): prefill {g['prefill_bytes_s']:,.0f} bytes/s ({g['prompt_bytes']} "
             f"bytes, last logits); generate_text {g['new_bytes']} bytes ({g['path']} path): greedy "
             f"{g['greedy_bytes_s']:,.0f} bytes/s, sampled (T 0.8, top-k 40, top-p 0.95) "
             f"{g['sampled_bytes_s']:,.0f} bytes/s")
    models = {"float": model} if qmodel is None else {"float": model, "int8": qmodel}
    measured = dict(models)
    if peer is not None:
        t0 = time.perf_counter()
        measured["peer"] = pmodel = peer.model(c, model.params)
        echo(f"built {peer.description} in {time.perf_counter() - t0:.1f}s, float32, {pmodel.weights}")
        figures.update(peer=peer.description, peer_weights=pmodel.weights, peer_torch=peer.torch.__version__,
                       peer_threads=peer.torch.get_num_threads())
    threads: dict = {}
    decode, rates = bench_decode_and_bandwidth(measured, (1, 8), rounds=max(1, decode_steps // 8),
                                               forward_step=("float",), threads=threads)
    bw = rates["best"]
    figures["gemv_bandwidth_GBps"] = bw / 1e9
    figures["gemv_bandwidth_blas_GBps"] = rates["blas"] / 1e9
    figures["gemv_bandwidth_kernel_GBps"] = rates["kernel"] / 1e9
    for label, m in models.items():
        quant = m.config.quantization
        prefix, name = ("", "decode") if quant is None else ("int8_", f"int8 ({scheme_name(quant)}) decode")
        for B in (1, 8):
            need = decode_bytes_per_step(c, B, itemsize, quant)
            bound = B * bw / need["total"]
            tps = decode[(label, B)]
            figures[f"{prefix}decode_b{B}_tok_s"] = tps
            figures[f"{prefix}decode_b{B}_bound_tok_s"] = bound
            figures[f"{prefix}decode_b{B}_ratio_to_bound"] = tps / bound
            figures[f"{prefix}decode_b{B}_threads"] = n_threads = threads.get((label, B))
            vs = ""
            if quant is not None:
                figures[f"int8_decode_b{B}_speedup"] = tps / decode[("float", B)]
                vs = f"   {tps / decode[('float', B)]:.2f}x float32"
            echo(f"{name} batch {B}: {tps:8.1f} tokens/s   bound {bound:8.1f} tokens/s "
                 f"({need['total'] / 1e6:.0f} MB/step at {bw / 1e9:.1f} GB/s)   ratio {tps / bound:.2f}{vs}"
                 f"   {n_threads} thread(s)")
            if (label, B, "forward_step") in decode:  # the functional API, in the same rounds as the session
                fs = decode[(label, B, "forward_step")]
                figures[f"forward_step_b{B}_tok_s"] = fs
                figures[f"forward_step_b{B}_ratio_to_bound"] = fs / bound
                figures[f"forward_step_b{B}_vs_session"] = fs / tps
                figures[f"forward_step_b{B}_threads"] = threads.get((label, B, "forward_step"))
                echo(f"forward_step batch {B}: {fs:8.1f} tokens/s   bound {bound:8.1f} tokens/s   "
                     f"ratio {fs / bound:.2f}   {fs / tps:.3f}x the session (model.forward_step(ids, state), "
                     "the state handed over)")
    if qmodel is not None:
        figures["int8_scheme"] = scheme_name(qmodel.config.quantization)
    if peer is not None:
        for B in (1, 8):
            tps = decode[("peer", B)]
            figures[f"peer_decode_b{B}_tok_s"] = tps
            echo(f"PyTorch THL decode batch {B}: {tps:8.1f} tokens/s   thl-np / PyTorch: "
                 + _vs_peer(figures, {label: decode[(label, B)] for label in models}, f"decode_b{B}", tps))
    figures["prompt_tok_s"] = bench_prompt(model, prompt_len)
    echo(f"prompt ({prompt_len} tokens, all logits): {figures['prompt_tok_s']:.1f} tokens/s")
    if peer is not None:  # right after thl-np's float prompt, so both see the same machine
        figures["peer_prompt_tok_s"] = measured["peer"].prompt_tokens_per_s(prompt_len)
    if qmodel is not None:
        figures["int8_prompt_tok_s"] = bench_prompt(qmodel, prompt_len)
        echo(f"int8 prompt ({prompt_len} tokens, all logits): {figures['int8_prompt_tok_s']:.1f} tokens/s")
    if peer is not None:
        tps = figures["peer_prompt_tok_s"]
        ours = {"float": figures["prompt_tok_s"]} | ({"int8": figures["int8_prompt_tok_s"]} if qmodel else {})
        echo(f"PyTorch THL prompt ({prompt_len} tokens, all logits): {tps:.1f} tokens/s   thl-np / PyTorch: "
             + _vs_peer(figures, ours, "prompt", tps))
    if train:
        tc = train_config or THLConfig(dim=128, memory_slots=64, vocab_size=259, dtype=str(model.dtype))
        figures["train_tok_s"] = bench_train(tc)
        echo(f"train fwd+bwd (d={tc.embedding_dim}, J={tc.memory_slots}, T=128, B=8): "
             f"{figures['train_tok_s']:.0f} tokens/s")
        if peer is not None:
            tps, weights = peer.train_tokens_per_s(tc)
            figures["peer_train_tok_s"], figures["peer_train_weights"] = tps, weights
            echo(f"PyTorch THL train fwd+bwd (same config, torch autograd, {weights}): {tps:.0f} tokens/s   "
                 "thl-np / PyTorch: " + _vs_peer(figures, {"float": figures["train_tok_s"]}, "train", tps))
    elif peer is not None:
        echo("PyTorch THL training not measured (--no-train)")
    figures["peak_rss_MB"] = peak_rss_bytes() / 1e6
    echo(f"GEMV bandwidth {bw / 1e9:.1f} GB/s (the better of OpenBLAS {rates['blas'] / 1e9:.1f} and thl-np's kernel "
         f"{rates['kernel'] / 1e9:.1f}); peak resident memory {figures['peak_rss_MB']:.0f} MB; {figures['machine']}; "
         f"threads {figures['threads_requested']} ({figures['others_running']} other runnable thread(s) at the start)")
    return figures


def _vs_peer(figures: dict, ours: dict, what: str, peer_tok_s: float) -> str:
    """Record thl-np / PyTorch for each of thl-np's figures (``<what>_vs_peer``, ``int8_<what>_vs_peer``)
    and return them as text: "float32 3.10x, int8 9.50x"."""
    parts = []
    for label, tps in ours.items():
        prefix, name = ("", "float32") if label == "float" else ("int8_", "int8")
        figures[f"{prefix}{what}_vs_peer"] = ratio = tps / peer_tok_s
        parts.append(f"{name} {ratio:.2f}x")
    return ", ".join(parts)


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
