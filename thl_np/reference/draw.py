"""Drawing a case's inputs: random weights at a scale where no path is negligible, a mid-run state, and
a sequence case's token ids, targets and Gumbel uniforms, all from one seeded generator."""
from __future__ import annotations

import math

import numpy as np

from ..config import THLConfig
from ..params import param_shapes
from ..state import InferenceState
from .cases import SequenceCase

DEFAULT_GAINS = {"embedding": 0.6, "bias": 0.15, "router.W_q": 1.5, "router.W_k": 1.5, "writer.W_w": 1.0}


def random_params(config: THLConfig, rng: np.random.Generator, gains: dict | None = None) -> dict:
    """Every spec §2 tensor, float64, at a scale where no path is negligible: linear weights
    N(0, gain²/fan_in), biases N(0, 0.15²) (non-zero, so a dropped bias shows), LayerNorm weight
    1 + N(0, 0.1²). ``gains`` raises the router's query/key weights (so scores spread and top-κ gaps are
    wide) and sets the writer's (so ‖w_raw‖ straddles the clip point)."""
    g = dict(DEFAULT_GAINS)
    g.update(gains or {})
    params = {}
    for name, shape in param_shapes(config).items():
        if name == "embedding.weight":
            w = rng.normal(0.0, g["embedding"], shape)
        elif name == "layer_norm.weight":
            w = 1.0 + rng.normal(0.0, 0.1, shape)
        elif name.endswith(".bias"):
            w = rng.normal(0.0, g["bias"], shape)
        else:
            gain = next((v for k, v in g.items() if name.startswith(k + ".")), 1.0)
            w = rng.normal(0.0, gain / math.sqrt(shape[1]), shape)
        params[name] = w
    return params


def random_state(config: THLConfig, batch: int, rng: np.random.Generator, *, timestep: int, local_valid: int,
                 empty_slots: int, memory_scale: float = 1.0) -> InferenceState:
    """A mid-run float64 state: tier states in (−1, 1), memory rows of norm ≈ ``memory_scale`` with
    ``empty_slots`` all-zero rows per sequence, read_ema in [0.02, 0.4] (never 0, so the underuse term
    stays finite and distinct per slot), last_read / last_write before ``timestep``, and ``local_valid``
    random rows in the local buffer (the rest zero)."""
    c = config
    B, J = batch, c.memory_slots
    memory = rng.normal(0.0, memory_scale / math.sqrt(c.memory_dim), (B, J, c.memory_dim))
    for b in range(B):
        memory[b, rng.choice(J, size=empty_slots, replace=False)] = 0.0
    buffer = np.zeros((B, c.local_window, c.embedding_dim))
    buffer[:, :local_valid] = rng.normal(0.0, 0.6, (B, local_valid, c.embedding_dim))
    hi = max(timestep, 1)
    return InferenceState(
        timestep=timestep,
        tiers=[np.tanh(rng.normal(0.0, 1.0, (B, d))) for d in c.tier_dims],
        memory=memory,
        read_ema=rng.uniform(0.02, 0.4, (B, J)),
        write_ema=rng.uniform(0.0, 0.4, (B, J)),
        last_read=rng.integers(0, hi, (B, J)).astype(np.int64),
        last_write=rng.integers(0, hi, (B, J)).astype(np.int64),
        local_buffer=buffer,
        local_valid=local_valid,
    )


def state_arrays(state: InferenceState, dtype=None) -> dict:
    """The spec §3 keys of a state (floats cast to ``dtype`` if given)."""
    out = {}
    for k, v in state.arrays().items():
        v = np.asarray(v)
        out[k] = v.astype(dtype) if dtype is not None and v.dtype.kind == "f" else v
    return out


def draw_sequence(case: SequenceCase, seed: int):
    """A sequence case's inputs from ``seed``: (config, float64 params, state, ids, targets, U or None).
    For an int8 case the params are the weights its file stands for (``dequantized``), and ``config``
    is the float config the outputs are computed with (the file's config.json adds the quantization)."""
    rng = np.random.default_rng(seed)
    config = THLConfig(**case.config)
    params = random_params(config, rng, case.gains)
    state = random_state(config, case.batch, rng, timestep=case.timestep, local_valid=case.local_valid,
                         empty_slots=case.empty_slots, memory_scale=case.memory_scale)
    if case.quantization:  # the case's weights are the int8 grid points: W = s·q, exact in float64
        params = dequantized(quantized_tensors(params, case.quantization), case.quantization)
    ids = rng.integers(0, config.vocab_size, (case.batch, case.steps)).astype(np.int64)
    targets = rng.integers(0, config.vocab_size, (case.batch, case.steps)).astype(np.int64)
    U = None
    if case.train:
        U = rng.random((case.steps, case.batch, config.num_heads, config.memory_slots))
    return config, params, state, ids, targets, U


def cast_params(params, dtype):
    return {k: np.asarray(v, dtype=dtype) for k, v in params.items()}


def quantized_tensors(params: dict, scheme: str) -> dict:
    """An int8 case's model.safetensors tensors (thl-np quantize's format, docs/QUANTIZATION.md): each
    matrix as int8 ``name`` and float32 ``name_scale``, LayerNorm and biases as they are (float64).
    Quantizing weights that already are ``s·q`` gives back the same q and s, so this is also how the
    generator recovers the file from ``draw_sequence``'s dequantized params."""
    from ..quant import scheme_config
    from ..quant.quantize import quantize_params

    return quantize_params(params, scheme_config(scheme), np.float64).stored()


def dequantized(tensors: dict, scheme: str) -> dict:
    """The float64 weights an int8 case's tensors stand for: W[i, j] = s[i, j // b] · q[i, j] (exact in
    float64); the float tensors as they are."""
    from ..quant import SCALE_SUFFIX, dequantize, scheme_config

    block = scheme_config(scheme)["block_size"]
    out = {}
    for name, value in tensors.items():
        if name.endswith(SCALE_SUFFIX) and name.removesuffix(SCALE_SUFFIX) in tensors:
            continue
        scale = tensors.get(name + SCALE_SUFFIX)
        out[name] = (np.asarray(value, dtype=np.float64) if scale is None
                     else dequantize(np.asarray(value), np.asarray(scale), block, np.float64))
    return out
