"""The reference cases, as tables: the whole sequences (``SEQUENCE_CASES``), one case per component step
(``component_cases``) and the training trajectory (``TRAIN_CASE``). What each case draws and runs is in
``draw.py`` / ``generate.py`` (sequences, training) and ``component_vectors.py`` (components); docs/PORTING.md
describes every case for a porter.

Every case has its own seed, so editing one case leaves the other cases' files byte for byte as they were.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .component_vectors import (
    Component,
    cross_entropy_case,
    embedding_case,
    gru_cell_case,
    head_choice_case,
    head_sequence_case,
    head_token_case,
    layernorm_head_case,
    load_balance_case,
    local_attention_case,
    memory_write_case,
    read_metadata_case,
    router_case,
    tiers_case,
    writer_case,
)


# ---------------------------------------------------------------------------------------- whole sequences
@dataclass(frozen=True)
class SequenceCase:
    """A whole-sequence case: a config, a batch of ``steps`` tokens from a mid-run state at ``timestep``
    (``empty_slots`` all-zero memory rows, ``local_valid`` buffer rows), eval or training-mode routing."""

    name: str
    description: str
    config: dict
    batch: int
    steps: int
    seed: int
    timestep: int
    local_valid: int
    empty_slots: int
    train: bool = False
    memory_scale: float = 1.0
    gains: dict = field(default_factory=dict)
    require: dict = field(default_factory=dict)   # minimum branch counts the run must show
    quantization: str | None = None   # a scheme name: the weights are stored as int8 + scales (W = s·q)


def _cfg(**kw) -> dict:
    base = dict(dtype="float64")
    base.update(kw)
    return base


SEQUENCE_CASES = (
    SequenceCase(
        name="small_default",
        description="The default config scaled down (K=3, clocks 1/8/64, W_loc=8, H=4, κ=4, η=0.05, "
                    "γ=0.9995), eval-mode routing, from a mid-run state at t=60 (tier 1 and 2 fire at t=64) "
                    "with 3 empty slots per sequence; the local buffer fills and starts dropping rows.",
        config=_cfg(vocab_size=48, embedding_dim=16, hidden_dim=16, num_tiers=3, tier_dims=[16, 16, 16],
                    tier_timescales=[1, 8, 64], local_window=8, memory_slots=16, memory_dim=16, query_dim=8,
                    value_dim=16, num_heads=4, head_dim=4, read_topk=4),
        batch=2, steps=32, seed=100, timestep=60, local_valid=5, empty_slots=3,
        gains={"writer.W_w": 0.5, "embedding": 1.5},
        require={"novel_empty": 2, "novel_lru": 2, "refine": 2, "clipped": 2, "unclipped": 2},
    ),
    SequenceCase(
        name="multi_write_capacity",
        description="Training-mode (Gumbel) routing with read_slot_capacity=1, write_slots=3, the router "
                    "load-balance loss (λ=0.05), η=0.3, tiers of different widths [12, 8, 14] on clocks "
                    "1/2/4; starts with an empty local buffer (ℓ=0 at the first step) and 4 empty slots.",
        config=_cfg(vocab_size=40, embedding_dim=12, hidden_dim=12, num_tiers=3, tier_dims=[12, 8, 14],
                    tier_timescales=[1, 2, 4], local_window=4, memory_slots=12, memory_dim=10, query_dim=6,
                    value_dim=12, num_heads=3, head_dim=5, read_topk=3, read_slot_capacity=1,
                    router_load_balance_lambda=0.05, write_slots=3, write_rate=0.3, load_penalty=0.2),
        batch=2, steps=24, seed=200, timestep=10, local_valid=0, empty_slots=1, train=True,
        gains={"writer.W_w": 0.6, "embedding": 1.5},
        require={"novel_empty": 1, "novel_lru": 2, "capacity_masked_picks": 4, "clipped": 1, "unclipped": 1},
    ),
    SequenceCase(
        name="no_local_window",
        description="local_window=0 (ℓ is always 0, the buffer has no rows), K=2 on clocks 1/3, "
                    "write_slots=2, a full memory from the start (every novel write is an LRU write).",
        config=_cfg(vocab_size=32, embedding_dim=10, hidden_dim=10, num_tiers=2, tier_dims=[10, 14],
                    tier_timescales=[1, 3], local_window=0, memory_slots=10, memory_dim=12, query_dim=4,
                    value_dim=8, num_heads=2, head_dim=6, read_topk=2, write_slots=2, write_rate=0.5),
        batch=2, steps=20, seed=300, timestep=7, local_valid=0, empty_slots=0,
        gains={"writer.W_w": 0.5},
        require={"novel_lru": 2, "refine": 1},
    ),
    SequenceCase(
        name="long_lru",
        description="A long run (T=128) on 8 slots with η=1 (the PyTorch THL's behaviour), γ=0.99 and θ=0.15 "
                    "(so most steps are novel): the two empty slots fill, then the memory stays full and "
                    "novel writes choose their slot by staleness + underuse, with refinements in between.",
        config=_cfg(vocab_size=24, embedding_dim=8, hidden_dim=8, num_tiers=2, tier_dims=[8, 8],
                    tier_timescales=[1, 4], local_window=4, memory_slots=8, memory_dim=8, query_dim=4,
                    value_dim=8, num_heads=2, head_dim=4, read_topk=2, write_rate=1.0, memory_decay=0.99,
                    novelty_theta=0.15),
        batch=1, steps=128, seed=400, timestep=200, local_valid=4, empty_slots=2,
        gains={"writer.W_w": 0.7, "embedding": 1.5},
        require={"novel_empty": 2, "novel_lru": 20, "refine": 3},
    ),
    SequenceCase(
        name="small_int8",
        description="Int8 weights (docs/QUANTIZATION.md, the default scheme int8-row): every matrix of "
                    "model.safetensors is int8 with a float32 scale per row, W = s·q; LayerNorm and biases "
                    "are float64. The outputs are the spec on the dequantized weights (exact in float64). "
                    "K=2 on clocks 1/4, W_loc=4, write_slots=2, eval routing from a mid-run state with 1 "
                    "empty slot per sequence.",
        config=_cfg(vocab_size=40, embedding_dim=16, hidden_dim=16, num_tiers=2, tier_dims=[16, 12],
                    tier_timescales=[1, 4], local_window=4, memory_slots=10, memory_dim=12, query_dim=8,
                    value_dim=16, num_heads=2, head_dim=6, read_topk=3, write_slots=2, write_rate=0.5),
        batch=2, steps=24, seed=600, timestep=30, local_valid=2, empty_slots=1,
        gains={"writer.W_w": 0.5, "embedding": 1.5},
        require={"novel_empty": 1, "novel_lru": 2, "refine": 2, "clipped": 1, "unclipped": 1},
        quantization="int8",
    ),
)


# ---------------------------------------------------------------------------------------- training


#: 10 AdamW steps (``generate.generate_training``); ``hyper`` is written to train.json.
TRAIN_CASE = dict(
    name="adamw_10",
    config=_cfg(vocab_size=20, embedding_dim=8, hidden_dim=8, num_tiers=2, tier_dims=[8, 8],
                tier_timescales=[1, 2], local_window=3, memory_slots=6, memory_dim=8, query_dim=4,
                value_dim=8, num_heads=2, head_dim=4, read_topk=2, write_rate=0.5),
    batch=2, seq_len=8, steps=10, seed=500, timestep=5, local_valid=2, empty_slots=1,
    hyper={"peak_lr": 0.01, "warmup": 3, "min_lr_ratio": 0.1, "weight_decay": 0.1, "beta1": 0.9,
           "beta2": 0.99, "eps": 1e-8, "grad_clip": 2.2},
)


# ---------------------------------------------------------------------------------------- components
def component_cases() -> list[Component]:
    """Every component case, in manifest order, each drawn from its own seeded generator (so editing one
    leaves the others' bytes). Drawing runs each component forward and backward in both dtypes."""
    def rng(i):
        return np.random.default_rng(7000 + i)

    def cap_want(res):
        m, used = res["capacity_mask"], res["_cap_used"]
        return bool((m[0] == 0).any() and used[0].all() and (~used[1]).any())

    return [
        embedding_case(rng(0)),
        local_attention_case(rng(1)),
        router_case(rng(2), "router", "Router read, eval mode, no capacity", B=2, H=3, d_h=4, J=9,
                    d_m=6, kappa=3, d_v=6),
        router_case(rng(3), "router_capacity", "Router read with read_slot_capacity=1: row 0 has "
                    "masked picks (renormalised), row 1 a head whose every pick is masked (it keeps "
                    "its uncapped α)", B=2, H=3, d_h=4, J=6, d_m=6, kappa=2, d_v=6, capacity=1,
                    want=cap_want),
        router_case(rng(4), "router_gumbel", "Router read in training mode (Gumbel noise from the "
                    "given uniforms)", B=2, H=2, d_h=4, J=8, d_m=6, kappa=3, d_v=6, train=True),
        read_metadata_case(rng(5)),
        gru_cell_case(rng(6)),
        tiers_case(rng(7), "tiers_all_active", 0, "All K=3 tiers at t=0 (every clock fires)"),
        tiers_case(rng(8), "tiers_some_inactive", 4, "Clocks [1, 3, 2] at t=4: tier 1 is inactive "
                   "(keeps its state), tier 2 is active and reads tier 1's unchanged state"),
        writer_case(rng(9), "writer_novel_empty", "Writer, novel branch with empty slots: targets are "
                    "the empty slots by index, then the others by index", [("novel_empty", False)] * 2),
        writer_case(rng(10), "writer_novel_lru", "Writer, novel branch on a full memory: targets are "
                    "the largest staleness + underuse", [("novel_lru", False)] * 2),
        writer_case(rng(11), "writer_refine", "Writer, refinement: g = 1, targets are the largest "
                    "affinities", [("refine", False)] * 2),
        writer_case(rng(12), "writer_clipped", "Writer with ‖w_raw‖ > Δ_max in every branch",
                    [("novel_empty", True), ("novel_lru", True), ("refine", True)]),
        memory_write_case(rng(13)),
        layernorm_head_case(rng(14)),
        cross_entropy_case(rng(15)),
        load_balance_case(rng(16)),
        head_sequence_case(rng(17)),
        head_token_case(rng(18)),
        head_choice_case(rng(19)),
    ]
