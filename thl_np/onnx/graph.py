"""One spec §4 step and the head as an ONNX graph, composed from the component lowerings in the order of
``thl_np.step.thl_step`` (which this file mirrors line for line).

Inputs: ``token_ids`` [B] int64 and every spec §3 state array as ``state.<key>``; outputs: ``logits`` [B, V]
and the next state as ``next_state.<key>`` (same shapes and dtypes), plus the step's memory choices as
``trace.*`` (the slots read and written, the novel branch, the clip), which a runtime may ignore. B is
dynamic. ``state_layout`` describes the state arrays for a runtime that keeps them between calls.
"""
from __future__ import annotations

from ..components.registry import SPEC, components_for
from ..components.router_empty_last import NAME as EMPTY_LAST
from ..components.router_unit_keys import NAME as UNIT_KEYS
from ..components.router_unit_rows import NAME as UNIT_ROWS
from ..errors import InputError
from .builder import BOOL, FLOAT, INT64, GraphBuilder
from .embedding import lower_embedding
from .gru import lower_tiers
from .local_attention import lower_buffer_push, lower_local_attention
from .output import lower_output
from .router import lower_read_meta, lower_router
from .writer import lower_memory_write, lower_writer

BATCH = "batch"
STATE_IN, STATE_OUT = "state.", "next_state."

#: The component variants this package lowers, per kind (anything else is refused by name).
LOWERED = {"local_attention": {SPEC}, "router": {SPEC, UNIT_KEYS, EMPTY_LAST, UNIT_ROWS}, "gru": {SPEC},
           "writer": {SPEC}, "memory_write": {SPEC}}


def state_layout(config) -> list[dict]:
    """The spec §3 state arrays in graph order: name, shape (``"batch"`` for B), dtype, and the initial
    value (all zeros)."""
    c = config
    rows = [("timestep", [], "int64")]
    rows += [(f"tier_state_{k}", [BATCH, d], "float32") for k, d in enumerate(c.tier_dims)]
    rows += [("memory", [BATCH, c.memory_slots, c.memory_dim], "float32"),
             ("read_ema", [BATCH, c.memory_slots], "float32"), ("write_ema", [BATCH, c.memory_slots], "float32"),
             ("last_read", [BATCH, c.memory_slots], "int64"), ("last_write", [BATCH, c.memory_slots], "int64"),
             ("local_buffer", [BATCH, c.local_window, c.embedding_dim], "float32"), ("local_valid", [], "int64")]
    return [{"name": n, "input": STATE_IN + n, "output": STATE_OUT + n, "shape": s, "dtype": d, "initial": 0}
            for n, s, d in rows]


def trace_layout(config) -> list[dict]:
    """The diagnostic outputs: the step's memory choices."""
    c = config
    return [{"name": "trace.read_slots", "shape": [BATCH, c.num_heads, c.read_topk], "dtype": "int64",
             "doc": "slots read per head, in rank order (spec §4.3)"},
            {"name": "trace.read_weights", "shape": [BATCH, c.num_heads, c.read_topk], "dtype": "float32",
             "doc": "their weights α after the capacity rule"},
            {"name": "trace.write_slots", "shape": [BATCH, c.write_slots], "dtype": "int64",
             "doc": "slots written (spec §4.6)"},
            {"name": "trace.novel", "shape": [BATCH], "dtype": "bool", "doc": "the novel branch was taken"},
            {"name": "trace.clipped", "shape": [BATCH], "dtype": "bool", "doc": "the write vector was clipped"},
            {"name": "trace.write_gate", "shape": [BATCH], "dtype": "float32", "doc": "the write gate g"}]


_ELEM = {"float32": FLOAT, "int64": INT64, "bool": BOOL}


def check_lowerable(config) -> None:
    """InputError naming the first component variant or quantization scheme with no ONNX lowering."""
    comp = components_for(config)
    for kind, names in LOWERED.items():
        name = getattr(comp, kind).name
        if name not in names:
            raise InputError(f"component {kind}={name} has no ONNX lowering (lowered: "
                             f"{', '.join(f'{kind}={n}' for n in sorted(names))}): export a model that uses them")
    q = config.quantization
    if q and q.get("block_size") is not None:
        raise InputError(f"quantization scheme int8-block{q['block_size']} has no ONNX lowering (int8-row has): "
                         "quantize the float model with `thl-np quantize --scheme int8-row`")


def build_step(config, params, tensor=None) -> GraphBuilder:
    """The graph of one step + head for ``config`` with weights from ``params`` (``tensor(name)``: the stored
    form of a weight, for int8 models)."""
    c = config
    check_lowerable(c)
    comp = components_for(c)
    g = GraphBuilder(params, tensor)
    ids = g.add_input("token_ids", INT64, [BATCH])
    st = {row["name"]: g.add_input(row["input"], _ELEM[row["dtype"]], row["shape"]) for row in state_layout(c)}
    K = c.num_tiers
    s_prev = [st[f"tier_state_{k}"] for k in range(K)]
    t, n = st["timestep"], st["local_valid"]
    # 1. embed
    e = lower_embedding(g, ids)
    # 2. local attention over the buffer, then the buffer takes e
    loc = lower_local_attention(g, e, st["local_buffer"], n, c.local_window, c.value_dim, c.query_dim)
    buffer, n_next = lower_buffer_push(g, st["local_buffer"], n, e, c.local_window)
    # 3. router read with the previous tier states; 4. read metadata
    u = g.op("Concat", e, s_prev[0], s_prev[-1], axis=1)
    r, alpha, idx = lower_router(g, u, st["memory"], st["read_ema"], num_heads=c.num_heads, head_dim=c.head_dim,
                                 num_slots=c.memory_slots, memory_dim=c.memory_dim, value_dim=c.value_dim,
                                 topk=c.read_topk,
                                 load_penalty=c.load_penalty, capacity=c.read_slot_capacity,
                                 unit_keys=comp.router.name == UNIT_KEYS,
                                 empty_last=comp.router.name == EMPTY_LAST,
                                 unit_rows=comp.router.name == UNIT_ROWS)
    read_ema, last_read, _ = lower_read_meta(g, st["read_ema"], st["last_read"], alpha, idx, t,
                                             num_slots=c.memory_slots, decay=c.read_ema_decay)
    # 5. tiers under their clocks
    s_new = lower_tiers(g, t, e, r, loc, s_prev, c.tier_timescales)
    # 6. writer against the memory before the decay; 7. decay and write
    x_w = g.op("Concat", s_new[0], s_new[-1], axis=1)
    w, gate, targets, novel, clipped = lower_writer(
        g, x_w, st["memory"], read_ema, st["last_write"], t, num_slots=c.memory_slots, memory_dim=c.memory_dim,
        write_slots=c.write_slots, clip_max=c.write_clip_max,
        beta=c.novelty_beta, theta=c.novelty_theta, stale_weight=c.stale_weight, underuse_weight=c.underuse_weight)
    memory, write_ema, last_write = lower_memory_write(
        g, st["memory"], st["write_ema"], st["last_write"], targets, gate, w, t, num_slots=c.memory_slots,
        decay=c.memory_decay, write_rate=c.write_rate, ema_decay=c.write_ema_decay)
    # 8. output head
    logits = lower_output(g, g.op("Concat", *s_new, axis=1) if K > 1 else s_new[0])
    # 9. advance
    nxt = {"timestep": g.op("Add", t, g.i64(1)), "memory": memory, "read_ema": read_ema, "write_ema": write_ema,
           "last_read": last_read, "last_write": last_write, "local_buffer": buffer, "local_valid": n_next}
    nxt.update({f"tier_state_{k}": s_new[k] for k in range(K)})
    g.add_output("logits", logits, FLOAT, [BATCH, c.vocab_size])
    for row in state_layout(c):
        g.add_output(row["output"], nxt[row["name"]], _ELEM[row["dtype"]], row["shape"])
    values = {"trace.read_slots": idx, "trace.read_weights": alpha, "trace.write_slots": targets,
              "trace.novel": novel, "trace.clipped": clipped, "trace.write_gate": gate}
    for row in trace_layout(c):
        g.add_output(row["name"], values[row["name"]], _ELEM[row["dtype"]], row["shape"])
    return g
