"""Parameter names and shapes (spec §2: they are the checkpoint format) and fresh initialisation."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .checks import check_allocation, check_seed
from .config import THLConfig
from .errors import WeightsError


def param_shapes(config: THLConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in checkpoint order (spec §2)."""
    c = config
    d_v = c.value_dim
    hq = c.num_heads * c.head_dim
    shapes = {
        "embedding.weight": (c.vocab_size, c.embedding_dim),
        "local_attn.q.weight": (c.query_dim, c.embedding_dim),
        "local_attn.k.weight": (c.query_dim, c.embedding_dim),
        "local_attn.v.weight": (d_v, c.embedding_dim),
        "router.W_q.weight": (hq, c.router_input_dim),
        "router.W_k.weight": (hq, c.memory_dim),
        "router.W_v.weight": (d_v, c.memory_dim),
        "writer.W_w.weight": (c.memory_dim, c.writer_input_dim),
        "writer.W_w.bias": (c.memory_dim,),
        "writer.W_r.weight": (c.memory_dim, d_v),
    }
    for k, d_k in enumerate(c.tier_dims):
        fan_in = d_k + c.tier_input_dim(k) + d_v
        for gate in ("W_z", "W_r", "W_h"):
            shapes[f"tiers.cells.{k}.{gate}.weight"] = (d_k, fan_in)
            shapes[f"tiers.cells.{k}.{gate}.bias"] = (d_k,)
    shapes["layer_norm.weight"] = (c.total_tier_dim,)
    shapes["layer_norm.bias"] = (c.total_tier_dim,)
    shapes["output_head.weight"] = (c.vocab_size, c.total_tier_dim)
    shapes["output_head.bias"] = (c.vocab_size,)
    return shapes


def init_params(config: THLConfig, seed: int | None = None, dtype=None) -> dict[str, np.ndarray]:
    """Fresh weights (spec §2): Xavier-uniform linear weights, zero biases, embedding ~ N(0, 0.02²),
    LayerNorm weight 1 and bias 0. The draws are made in float64, in checkpoint order, so a seed gives
    the same model in every compute dtype."""
    dtype = np.dtype(dtype or config.dtype)
    seed = check_seed(seed)
    largest = max(int(np.prod(s)) for s in param_shapes(config).values())
    check_allocation(num_parameters(config) * dtype.itemsize + largest * 8, f"a model of {num_parameters(config):,} "
                     "parameters", "choose smaller widths (--dim), fewer slots or a smaller vocabulary")
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(config).items():
        if name == "embedding.weight":
            w = rng.normal(0.0, 0.02, size=shape)
        elif name == "layer_norm.weight":
            w = np.ones(shape)
        elif name.endswith(".bias"):
            w = np.zeros(shape)
        else:
            fan_out, fan_in = shape
            bound = np.sqrt(6.0 / (fan_in + fan_out))
            w = rng.uniform(-bound, bound, size=shape)
        params[name] = w.astype(dtype)
    return params


def check_params(config: THLConfig, tensors: Mapping[str, np.ndarray], source: str = "weights") -> None:
    """Raise WeightsError listing every missing, unexpected or mis-shaped tensor at once."""
    expected = param_shapes(config)
    problems = []
    for name, shape in expected.items():
        if name not in tensors:
            problems.append(f"missing tensor {name} (expected shape {list(shape)})")
        elif tuple(tensors[name].shape) != shape:
            problems.append(f"tensor {name} has shape {list(tensors[name].shape)}, expected {list(shape)}")
        elif np.dtype(tensors[name].dtype).kind != "f":
            # a header that relabels floats as I32 / U8 / BOOL would otherwise be cast to floats silently
            problems.append(f"tensor {name} has dtype {tensors[name].dtype}, but weights are floating point "
                            "(F16, BF16, F32 or F64)")
    for name in tensors:
        if name not in expected:
            problems.append(f"unexpected tensor {name} (shape {list(tensors[name].shape)})")
    if problems:
        raise WeightsError(
            f"{source} does not match its config ({len(problems)} problem(s)): " + "; ".join(problems)
        )


def num_parameters(config: THLConfig) -> int:
    return int(sum(int(np.prod(s)) for s in param_shapes(config).values()))
