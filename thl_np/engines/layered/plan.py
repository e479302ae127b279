"""Planning the layered engine: which modules of the step stay resident on the device, which stream, in
what pieces, and how many bytes each part of a step takes (the workspace and size formulas).

``plan_layers`` needs shapes only, no weights and no device: the budget check, the minimum budget and
the stream-slot size are all computed from the config, the batch size, the dtype and the device's
sizing ``Profile``. docs/LAYERED.md ("Planning") states the rule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ...config import THLConfig
from .backends.accounting import DeviceBudgetError, Profile, profile_for
from .storage import dequantize_bytes, head_block_rows, tensor_layout
from .units import ALIGN, align_up, format_bytes

MODULE_SLACK = 16 << 10  # per-module allowance for small temporaries (index arrays, 0-d results)


@dataclass
class ModuleSpec:
    """One module of the step: its weights, what it costs on the device, and where it lives."""

    name: str
    params: tuple            # parameter names, in slot layout order
    nbytes: int              # device bytes when resident (each tensor its own allocation)
    layout_bytes: int        # bytes in a stream slot (tensors ALIGN-aligned)
    every: int               # runs once every `every` steps (tier k: τ_k), else 1
    workspace: int           # bound on the bytes the module allocates while it runs (its outputs included)
    out_bytes: int           # bytes of what it keeps until the end of the step
    resident: bool = False

    @property
    def has_weights(self) -> bool:
        return bool(self.params)


@dataclass(frozen=True)
class Piece:
    """What one stream slot holds at a time: a whole module, or a vocabulary chunk of the output head."""

    name: str
    module: str
    parts: tuple             # (param name, (row_start, row_stop) or None, offset in slot, shape)
    nbytes: int              # data bytes copied


@dataclass
class LayeredPlan:
    """What is resident, what streams, in what pieces, and the bytes each part of the budget takes."""

    device: str
    dtype: np.dtype
    batch_size: int
    budget: int
    minimum_budget: int
    state_bytes: int
    activation_bytes: int    # state in + the largest (kept outputs + workspace) over the step's modules
    largest_workspace: tuple  # (module name, bytes)
    modules: list
    slot_bytes: int          # bytes per stream slot; 0 when nothing streams
    num_slots: int
    head_chunk_rows: int
    head_chunks: list = field(default_factory=list)
    config: THLConfig | None = None
    overhead: int = 0
    extra_states: int = 0
    embedding_row_bytes: int = 0  # one stored embedding row (int8 values and scales for a quantized model)

    # ----------------------------------------------------------------- facts
    def module(self, name: str) -> ModuleSpec:
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(name)

    @property
    def resident_bytes(self) -> int:
        return sum(m.nbytes for m in self.modules if m.resident)

    @property
    def all_resident_budget(self) -> int:
        """The budget with which every module would be resident (nothing streams)."""
        return self.activation_bytes + self.overhead + sum(m.nbytes for m in self.modules)

    @property
    def planned_peak(self) -> int:
        return self.activation_bytes + self.overhead + self.resident_bytes + self.num_slots * self.slot_bytes

    @property
    def streamed(self) -> list:
        return [m.name for m in self.modules if m.has_weights and not m.resident]

    def needed(self, t: int, n: int) -> list:
        """The weighted modules a step at timestep t with n local-buffer entries runs, in order."""
        out = []
        for m in self.modules:
            if not m.has_weights:
                continue
            if m.name == "local_attn" and n == 0:
                continue
            if t % m.every:
                continue
            out.append(m.name)
        return out

    def pieces(self, name: str, params) -> list:
        """The stream pieces of module ``name`` (one, or the head's chunks)."""
        m = self.module(name)
        if name == "output_head":
            return [_head_piece(params, i, a, b) for i, (a, b) in enumerate(self.head_chunks)]
        return [_module_piece(params, m)]

    def streamed_bytes(self, t: int, n: int, params) -> int:
        return sum(p.nbytes for name in self.needed(t, n) if not self.module(name).resident
                   for p in self.pieces(name, params))

    def average_streamed_bytes(self, params) -> float:
        """Bytes streamed per step, averaged over the tiers' clocks (every step after the first)."""
        total = 0.0
        for m in self.modules:
            if m.has_weights and not m.resident:
                total += sum(p.nbytes for p in self.pieces(m.name, params)) / m.every
        return total

    # ----------------------------------------------------------------- description
    def describe(self, params=None) -> str:
        lines = [
            f"LayeredInferenceEngine plan: device {self.device}, {np.dtype(self.dtype).name}, batch size "
            f"{self.batch_size}",
            f"  budget {self.budget:,} B ({format_bytes(self.budget)}); planned peak {self.planned_peak:,} B "
            f"({format_bytes(self.planned_peak)}); minimum budget {self.minimum_budget:,} B "
            f"({format_bytes(self.minimum_budget)})",
            f"  state {format_bytes(self.state_bytes)} (in + out on the device during a step); activations, "
            f"state and workspace peak {format_bytes(self.activation_bytes)} (largest workspace: "
            f"{self.largest_workspace[0]}, {format_bytes(self.largest_workspace[1])})"
            + (f"; allocator slack {format_bytes(self.overhead)}" if self.overhead else ""),
        ]
        if self.num_slots:
            lines.append(f"  stream slots: {self.num_slots} x {self.slot_bytes:,} B "
                         f"({format_bytes(self.slot_bytes)}), double-buffered: the next piece copies while "
                         "the current one computes")
        else:
            lines.append("  nothing streams: every module is resident")
        lines.append(f"  {'module':<13}{'bytes':>12}  where")
        c = self.config
        if c is not None:
            row_bytes = self.embedding_row_bytes or c.embedding_dim * np.dtype(self.dtype).itemsize
            rows = format_bytes(self.batch_size * row_bytes)
            lines.append(f"  {'embedding':<13}{format_bytes(c.vocab_size * row_bytes):>12}  host: the "
                         f"batch's {self.batch_size} row(s) are gathered and copied ({rows})")
        for m in self.modules:
            if not m.has_weights:
                continue
            clock = f", runs 1 step in {m.every}" if m.every > 1 else ""
            if m.resident:
                where = "resident" + clock
            elif m.name == "output_head":
                where = (f"streams in {len(self.head_chunks)} chunk(s) of up to {self.head_chunk_rows:,} "
                         f"vocabulary rows{clock}")
            else:
                where = "streams" + clock
            lines.append(f"  {m.name:<13}{format_bytes(m.nbytes):>12}  {where}")
        if params is not None and self.num_slots:
            avg = format_bytes(self.average_streamed_bytes(params))
            lines.append(f"  streamed per step: {avg} on average over the tiers' clocks")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()


def _layout(nbytes_list) -> int:
    return sum(align_up(n) for n in nbytes_list)


def _module_piece(params, m: ModuleSpec) -> Piece:
    parts, off, total = [], 0, 0
    for name in m.params:
        arr = params[name]
        parts.append((name, None, off, tuple(arr.shape)))
        off += align_up(arr.nbytes)
        total += arr.nbytes
    return Piece(m.name, m.name, tuple(parts), total)


def _head_piece(params, i, a, b) -> Piece:
    """Vocabulary rows a..b of every stored head tensor (the weight, its scales when int8, the bias)."""
    parts, off, total = [], 0, 0
    for name in HEAD_TENSORS:
        if name not in params:
            continue
        arr = params[name]
        shape = (b - a,) + tuple(arr.shape[1:])
        n = int(np.prod(shape)) * arr.dtype.itemsize
        parts.append((name, (a, b), off, shape))
        off += align_up(n)
        total += n
    return Piece(f"output_head[{i}]", "output_head", tuple(parts), total)


HEAD_TENSORS = ("output_head.weight", "output_head.weight_scale", "output_head.bias")  # slot order


def _head_chunk_layout(rows: int, row_bytes) -> int:
    """Slot bytes of ``rows`` vocabulary rows: each stored head tensor aligned on its own."""
    return sum(align_up(rows * r) for r in row_bytes)


def _state_bytes(c: THLConfig, B: int, s: int, profile: Profile) -> int:
    r = profile.round
    J = c.memory_slots
    return (sum(r(B * d * s) for d in c.tier_dims) + r(B * J * c.memory_dim * s) + 2 * r(B * J * s)
            + 2 * r(B * J * 8) + r(B * c.local_window * c.embedding_dim * s))


def _module_specs(c: THLConfig, layout: dict, s: int, B: int, profile: Profile) -> list:
    """The step's modules in execution order, with their workspace bounds.

    Each ``workspace`` bounds what the module's code allocates while it runs, outputs included: it adds
    up every intermediate array the component functions (and their generic variants) create, as if
    none were freed early, plus MODULE_SLACK. ``tests/test_layered.py`` measures the real allocations
    with tracemalloc and checks they stay below these bounds.
    """
    f = lambda n: int(n) * s
    i8 = lambda n: int(n) * 8
    J, d_m, d_e, d_v = c.memory_slots, c.memory_dim, c.embedding_dim, c.value_dim
    H, d_h, kap, W, d_lq = c.num_heads, c.head_dim, c.read_topk, c.local_window, c.query_dim
    V, D, Ww = c.vocab_size, c.total_tier_dim, c.write_slots
    d0, dK = c.tier_dims[0], c.tier_dims[-1]

    def stored(names):  # (stored name, bytes): a float tensor, or int8 values and their scales
        return [(sn, int(np.prod(shape)) * size) for n in names for sn, shape, size in layout[n]]

    def resident_bytes(names):
        return sum(profile.round(nb) for _, nb in stored(names))

    def layout_bytes(names):
        return _layout(nb for _, nb in stored(names))

    specs = []

    def add(name, names, every, temps, out):
        # int8 weights are dequantized on the device while their module runs (storage.py): float copies
        temps += dequantize_bytes(layout, names, s, head_block_rows(D, s) if name == "output_head" else None)
        specs.append(ModuleSpec(name, tuple(sn for sn, _ in stored(names)), resident_bytes(names),
                                layout_bytes(names), every, int(temps + out + MODULE_SLACK), int(out)))

    # an int8 table's B rows are gathered and dequantized on the host: their values, scales and casts
    emb = layout["embedding.weight"]
    emb_temps = B * (d_e + emb[1][1][1] * (4 + s)) + f(B * d_e) if len(emb) == 2 else 0
    add("embedding", (), 1, emb_temps, f(B * d_e))
    # local attention: q, k, v, scores (4 [B, n] arrays), softmax sums, ℓ; a possible copy of the buffer
    # slice for the matmul; the zeros ℓ when it is skipped; the new buffer (state out)
    temps = f(B * (d_lq + W * d_lq + W * d_v + 4 * W + 2 + d_v)) + f(B * W * d_e) if W > 0 else 0
    add("local_attn", ("local_attn.q.weight", "local_attn.k.weight", "local_attn.v.weight") if W > 0 else (),
        1, temps, f(B * d_v) + f(B * W * d_e))
    # router: u, q, keys [B, J, H·d_h], scores and their negation/sort key (5 [B, H, J]), λ·ema, the
    # argsort output and sort buffer, picked/softmax/capacity arrays, gathered rows, values;
    # read metadata: A and the two EMA terms, index copies
    d_u = d_e + d0 + dK
    temps = (f(B * d_u + B * H * d_h + B * J * H * d_h + 5 * B * H * J + B * J + 12 * B * H * kap + 2 * B * H
               + B * H * kap * (d_m + d_h + d_v // H) + B * d_v)
             + i8(B * H * J + J + 4 * B * H * kap) + B * H * kap
             + f(3 * B * J) + i8(2 * B * H * kap))
    add("router", ("router.W_q.weight", "router.W_k.weight", "router.W_v.weight"), 1, temps,
        f(B * d_v) + f(B * J) + i8(B * J))
    # tier cells: ctx, x, p, p_h; the gates (sigmoid by sign: ≤ 12 [B, d] arrays and 2 masks each),
    # the candidate and the blend
    for k, d in enumerate(c.tier_dims):
        n_in = c.tier_input_dim(k)
        pre = f"tiers.cells.{k}."
        names = [pre + g + wb for g in ("W_z", "W_r", "W_h") for wb in (".weight", ".bias")]
        temps = f(B * (d_v + (n_in + d_v) + 2 * (d + n_in + d_v) + 33 * d)) + 4 * B * d
        add(f"tier.{k}", names, c.tier_timescales[k], temps, f(B * d))
    # writer: x_w, w_raw, squares, w; M⊙M [B, J, d_m] (freed inside); norms, dots, affinities; the
    # float64 target keys (per row in thl_np.components, all rows at once in the generic variant) and the sort.
    # Then the memory write: the decayed bank (state out), the target rows, the EMA terms.
    wf_temps = (f(B * (d0 + dK) + 5 * B * d_m + B * J * d_m + 9 * B * J + 20 * B) + 8 * 16 * B * J
                + i8(B * J + B * Ww + 12 * J) + 3 * B * J + J)
    wf_kept = f(B * d_m + B + B * (d0 + dK)) + i8(B * Ww)
    mw_temps = f(3 * B * Ww * d_m + B + 3 * B * J) + i8(B)
    out = f(B * J * d_m) + f(B * J) + i8(B * J)
    # the new bank (out) exists only after writer_forward has returned and freed M⊙M
    add("writer", ("writer.W_w.weight", "writer.W_w.bias"), 1, max(wf_temps - out, wf_kept + mw_temps), out)
    # LayerNorm: the concatenated tier states, centring, variance, x̂, the affine terms
    add("layer_norm", ("layer_norm.weight", "layer_norm.bias"), 1, f(5 * B * D + 5 * B), f(B * D))
    # output head: the logits, and per chunk the product and the biased product
    add("output_head", ("output_head.weight", "output_head.bias"), 1, f(2 * B * V), f(B * V))
    if profile.workspace_factor != 1.0:
        for m in specs:
            m.workspace = int(math.ceil(m.workspace * profile.workspace_factor))
    return specs


def plan_layers(config: THLConfig, budget: int, batch_size: int = 1, dtype="float32", device: str = "cpu",
                params_shapes: dict | None = None, extra_states: int = 0, layout: dict | None = None) -> LayeredPlan:
    """Plan a step of ``config`` on a device with ``budget`` bytes. Raises DeviceBudgetError naming the
    minimum budget when it cannot work.

    Budget = state in + max over modules of (outputs kept so far + the module's workspace)
           + ``extra_states`` more states (device states the caller keeps, e.g. other sessions)
           + resident weights + 2 stream slots (when anything streams).

    Residency rule. If every weighted module fits resident, nothing streams. Otherwise the output head
    streams in chunks and the planner starts from the fewest forced residents that make the budget work
    (the largest modules, when two slots of the largest streamed module would not fit), then adds modules
    greedily by how often they run (every-step modules first, tier k by 1/τ_k), ties in execution order,
    while two slots of the largest module still streaming (or of one head row) fit beside them. The slots
    then take all that is left, which sets the head's chunk size.
    """
    from ...params import param_shapes as _param_shapes

    profile = profile_for(device)
    B = int(batch_size)
    dt = np.dtype(dtype)
    s = dt.itemsize
    if layout is None and config.quantization:
        layout = tensor_layout(config, dt)
    elif layout is None:
        layout = {n: [(n, shape, s)] for n, shape in (params_shapes or _param_shapes(config)).items()}
    specs = _module_specs(config, layout, s, B, profile)
    state_bytes = _state_bytes(config, B, s, profile)
    kept, act = 0, 0
    largest = ("", 0)
    for m in specs:
        act = max(act, kept + m.workspace)
        kept += m.out_bytes
        if m.workspace > largest[1]:
            largest = (m.name, m.workspace)
    activation = state_bytes * (1 + int(extra_states)) + act
    overhead = profile.overhead
    fixed = activation + overhead
    avail = budget - fixed

    weighted = [m for m in specs if m.has_weights]
    head = next(m for m in weighted if m.name == "output_head")
    others = [m for m in weighted if m is not head]
    V = config.vocab_size
    head_row_bytes = [int(np.prod(shape[1:])) * size for _, shape, size in layout["output_head.weight"]
                      + layout["output_head.bias"]]
    head_row = _head_chunk_layout(1, head_row_bytes)
    step = max(ALIGN, profile.granularity)

    def cost(res: set) -> int:
        streamed = [m.layout_bytes for m in others if m.name not in res]
        if head.name not in res:
            streamed.append(head_row)
        slots = 2 * align_up(max(streamed), step) if streamed else 0
        return sum(m.nbytes for m in weighted if m.name in res) + slots

    by_size = sorted(others, key=lambda m: -m.layout_bytes)
    bases = []
    for head_res in (False, True):
        for i in range(len(by_size) + 1):
            res = {m.name for m in by_size[:i]} | ({head.name} if head_res else set())
            bases.append(res)
    minimum_cost = min(cost(r) for r in bases)
    minimum_budget = fixed + minimum_cost

    if avail < minimum_cost:
        raise DeviceBudgetError(
            f"vram_budget = {budget:,} bytes ({format_bytes(budget)}) is too small for this model at batch "
            f"size {B} ({dt.name}): the minimum budget is {minimum_budget:,} bytes "
            f"({format_bytes(minimum_budget)}). The state takes {format_bytes(state_bytes)} (twice during a "
            f"step), the largest module workspace {format_bytes(largest[1])} ({largest[0]}), and the largest "
            f"unsplittable module "
            f"{format_bytes(max(m.layout_bytes for m in others))} (two stream slots of it, or resident). "
            f"Raise vram_budget to at least {minimum_budget:,}, or use a smaller batch",
            budget=budget, minimum=minimum_budget)

    everything = {m.name for m in weighted}
    if cost(everything) <= avail:
        resident = everything
    else:
        resident = next(r for r in bases if cost(r) <= avail)
        order = sorted((m for m in weighted if m.name not in resident),
                       key=lambda m: (m.every, specs.index(m)))
        for m in order:
            if cost(resident | {m.name}) <= avail:
                resident = resident | {m.name}
    for m in specs:
        m.resident = m.name in resident

    streamed = [m for m in weighted if not m.resident]
    slot_bytes, rows, chunks = 0, V, []
    if streamed:
        need = max([m.layout_bytes for m in streamed if m is not head]
                   + ([head.layout_bytes] if not head.resident else []))
        spare = (avail - sum(m.nbytes for m in weighted if m.resident)) // 2
        smallest = align_up(_cost_slot(streamed, head, head_row), step)
        slot_bytes = max(min(need, spare) // step * step, smallest)
        if not head.resident:
            rows = min(V, max(1, _rows_fitting(slot_bytes, head_row_bytes)))
            chunks = [(a, min(V, a + rows)) for a in range(0, V, rows)]
    return LayeredPlan(device=profile.device, dtype=dt, batch_size=B, budget=int(budget),
                       minimum_budget=int(minimum_budget), state_bytes=state_bytes,
                       activation_bytes=activation, largest_workspace=largest, modules=specs,
                       slot_bytes=int(slot_bytes), num_slots=2 if streamed else 0, head_chunk_rows=rows,
                       head_chunks=chunks, config=config, overhead=overhead, extra_states=int(extra_states),
                       embedding_row_bytes=sum(int(np.prod(shape[1:])) * size
                                               for _, shape, size in layout["embedding.weight"]))


def _cost_slot(streamed, head, head_row) -> int:
    """The smallest slot that holds every streamed piece (a head piece is one row at least)."""
    return max([m.layout_bytes for m in streamed if m is not head] + ([head_row] if head in streamed else []))


def _rows_fitting(slot_bytes: int, row_bytes) -> int:
    rows = max(1, slot_bytes // sum(row_bytes))
    while rows > 1 and _head_chunk_layout(rows, row_bytes) > slot_bytes:
        rows -= 1
    return rows
