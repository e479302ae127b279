"""The layered inference engine: one spec §4 step on a device with less memory than the model.

    engine = LayeredInferenceEngine(model, device="cpu", vram_budget="64MB")
    state = InferenceState.init(batch_size=1, config=model.config, tiers=model.tiers,
                                memory_bank=model.memory_bank)
    logits, state = engine.step([[token_id]], state)      # token [B] or [B, 1]; logits [B, V] (host)

The step is split into modules, in execution order: the embedding (its B rows are gathered on the host;
the table never moves), local attention, the router (with the read metadata), each tier cell, the
writer (with the memory write), the LayerNorm and the output head. The planner (``plan_layers``) makes
modules resident while they fit (see its docstring for the rule) and streams the rest from host memory
(memory-mapped weights stay on disk until touched) through two slot buffers, so the next module's copy
overlaps the current module's compute; the output head, larger than most budgets, streams in vocabulary
chunks sized to a slot. The state (memory bank, tier states, buffers) stays on the device between
steps. Every device byte is counted against the budget: weights, slots, the input and output state,
the activations each module keeps and the temporaries each module makes (``peak_device_bytes``).

The math is the ``thl_np.components`` component functions (NumPy backend) or their backend-generic variants
(CuPy), composed in spec §4 order exactly as ``thl_np.model.thl_step`` composes them, LayerNorm
included (the PyTorch THL's engine skipped it, spec §6): logits and state equal the plain model's.
Docs: docs/LAYERED.md.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from ..components.embedding import embedding_forward
from ..config import THLConfig
from ..errors import InputError, StateError
from .backends import (
    ALIGN,
    DeviceBudgetError,
    Profile,
    align_up,
    format_bytes,
    make_backend,
    parse_bytes,
    profile_for,
)
from .state import InferenceState

MODULE_SLACK = 16 << 10  # per-module allowance for small temporaries (index arrays, 0-d results)


# ---------------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------------
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
            row_bytes = c.embedding_dim * np.dtype(self.dtype).itemsize
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
    W = params["output_head.weight"]
    s = W.dtype.itemsize
    D = W.shape[1]
    w_bytes = (b - a) * D * s
    parts = (("output_head.weight", (a, b), 0, (b - a, D)),
             ("output_head.bias", (a, b), align_up(w_bytes), (b - a,)))
    return Piece(f"output_head[{i}]", "output_head", parts, w_bytes + (b - a) * s)


def _head_chunk_layout(rows: int, D: int, s: int) -> int:
    return align_up(rows * D * s) + align_up(rows * s)


def _state_bytes(c: THLConfig, B: int, s: int, profile: Profile) -> int:
    r = profile.round
    J = c.memory_slots
    return (sum(r(B * d * s) for d in c.tier_dims) + r(B * J * c.memory_dim * s) + 2 * r(B * J * s)
            + 2 * r(B * J * 8) + r(B * c.local_window * c.embedding_dim * s))


def _module_specs(c: THLConfig, params_shapes: dict, s: int, B: int, profile: Profile) -> list:
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

    def resident_bytes(names):
        return sum(profile.round(int(np.prod(params_shapes[n])) * s) for n in names)

    def layout_bytes(names):
        return _layout(int(np.prod(params_shapes[n])) * s for n in names)

    specs = []

    def add(name, names, every, temps, out):
        specs.append(ModuleSpec(name, tuple(names), resident_bytes(names), layout_bytes(names), every,
                                int(temps + out + MODULE_SLACK), int(out)))

    add("embedding", (), 1, 0, f(B * d_e))
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
                params_shapes: dict | None = None, extra_states: int = 0) -> LayeredPlan:
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
    from ..params import param_shapes as _param_shapes

    profile = profile_for(device)
    B = int(batch_size)
    dt = np.dtype(dtype)
    s = dt.itemsize
    shapes = params_shapes or _param_shapes(config)
    specs = _module_specs(config, shapes, s, B, profile)
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
    D, V = config.total_tier_dim, config.vocab_size
    head_row = _head_chunk_layout(1, D, s)
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
            rows = min(V, max(1, _rows_fitting(slot_bytes, D, s)))
            chunks = [(a, min(V, a + rows)) for a in range(0, V, rows)]
    return LayeredPlan(device=profile.device, dtype=dt, batch_size=B, budget=int(budget),
                       minimum_budget=int(minimum_budget), state_bytes=state_bytes,
                       activation_bytes=activation, largest_workspace=largest, modules=specs,
                       slot_bytes=int(slot_bytes), num_slots=2 if streamed else 0, head_chunk_rows=rows,
                       head_chunks=chunks, config=config, overhead=overhead, extra_states=int(extra_states))


def _cost_slot(streamed, head, head_row) -> int:
    """The smallest slot that holds every streamed piece (a head piece is one row at least)."""
    return max([m.layout_bytes for m in streamed if m is not head] + ([head_row] if head in streamed else []))


def _rows_fitting(slot_bytes: int, D: int, s: int) -> int:
    rows = max(1, slot_bytes // ((D + 1) * s))
    while rows > 1 and _head_chunk_layout(rows, D, s) > slot_bytes:
        rows -= 1
    return rows


# ---------------------------------------------------------------------------------------------------
# Streaming: two slots, pieces in order, the next copy in flight while the current piece computes
# ---------------------------------------------------------------------------------------------------
class _Streamer:
    def __init__(self, backend, params, slot_bytes: int):
        self.be = backend
        self.params = params
        self.slots = [backend.alloc_slot(slot_bytes) for _ in range(2)]
        self.slot_index = [None, None]   # queue index of the piece in each slot (None: free)
        self.ticket = [None, None]
        self.done = [None, None]         # compute-done event of each slot's last user
        self.queue: list = []
        self.next_issue = 0
        self.next_use = 0
        self.prefetched = None           # (slot, piece) issued at the end of the previous step
        self.bytes_copied = 0
        self.bytes_wasted = 0
        self.wait_seconds = 0.0

    def _parts(self, piece: Piece):
        out = []
        for name, rows, offset, _shape in piece.parts:
            src = self.params[name]
            if rows is not None:
                src = src[rows[0]:rows[1]]
            out.append((offset, src))
        return out

    def _issue(self, slot: int, piece: Piece):
        self.ticket[slot] = self.be.copy_to_slot(self.slots[slot], self._parts(piece), after=self.done[slot])
        self.bytes_copied += piece.nbytes

    def _pump(self):
        while self.next_issue < len(self.queue):
            free = [s for s in (0, 1) if self.slot_index[s] is None]
            if not free:
                return
            s = free[0]
            self.slot_index[s] = self.next_issue
            self._issue(s, self.queue[self.next_issue])
            self.next_issue += 1

    def begin(self, queue: list):
        self.queue, self.next_issue, self.next_use = list(queue), 0, 0
        if self.prefetched is not None:
            s, piece = self.prefetched
            self.prefetched = None
            if self.queue and self.queue[0].name == piece.name:
                self.slot_index[s] = 0
                self.next_issue = 1
            else:
                self.be.wait_copy(self.ticket[s])
                self.done[s] = self.be.record_done()
                self.slot_index[s] = None
                self.bytes_copied -= piece.nbytes
                self.bytes_wasted += piece.nbytes
        self._pump()

    def acquire(self, module: str) -> dict:
        i = self.next_use
        if i >= len(self.queue) or self.queue[i].module != module:
            got = self.queue[i].name if i < len(self.queue) else "nothing"
            raise RuntimeError(f"layered engine: expected to stream {module}, the schedule has {got}")
        self._pump()
        s = self.slot_index.index(i)
        t0 = time.perf_counter()
        self.be.wait_copy(self.ticket[s])
        self.wait_seconds += time.perf_counter() - t0
        self.ticket[s] = None
        piece = self.queue[i]
        views = {}
        for name, _rows, offset, shape in piece.parts:
            views[name] = self.be.view(self.slots[s], offset, self.params[name].dtype, shape)
        return views

    def release(self):
        s = self.slot_index.index(self.next_use)
        self.done[s] = self.be.record_done()
        self.slot_index[s] = None
        self.next_use += 1
        self._pump()

    def end_step(self, next_queue: list):
        """Prefetch the first piece of the next step's (predicted) schedule while the caller samples."""
        self.queue, self.next_issue, self.next_use = [], 0, 0
        if next_queue:
            s = 0 if self.slot_index[0] is None else 1
            self._issue(s, next_queue[0])
            self.prefetched = (s, next_queue[0])
            self.slot_index[s] = -1

    def abort(self):
        """After an error mid-step: let copies in flight finish and free both slots."""
        for s in (0, 1):
            if self.ticket[s] is not None:
                try:
                    self.be.wait_copy(self.ticket[s])
                except Exception:  # the step's own error is the one to report
                    pass
            self.ticket[s] = None
            self.slot_index[s] = None
        self.prefetched = None
        self.queue, self.next_issue, self.next_use = [], 0, 0


# ---------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------
class LayeredInferenceEngine:
    """Spec §4 steps of ``model`` on ``device`` ("cpu" or "cuda") within ``vram_budget`` bytes.

    ``vram_budget``: bytes (int) or a string such as "64MB", "4GB", "512MiB"; None takes all free device
    memory (CPU: the available RAM). ``batch_size``: the batch the first plan is made for (a larger
    batch later re-plans). ``ops``: "auto" (the ``thl_np.components`` functions on the CPU, the backend-generic
    variants on CUDA) or "generic" (the CUDA path's ops on NumPy, for testing). ``overlap``: copy the next
    streamed piece on a worker thread while the current one computes. ``extra_states``: how many device
    states the caller keeps besides the one being stepped (interleaved sessions); the plan leaves room.
    """

    def __init__(self, model, device: str = "cpu", vram_budget=None, *, batch_size: int = 1,
                 ops: str = "auto", overlap: bool = True, extra_states: int = 0):
        if not (hasattr(model, "params") and isinstance(getattr(model, "config", None), THLConfig)):
            raise InputError(f"LayeredInferenceEngine needs a THLModel, got {type(model).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InputError(f"batch_size = {batch_size!r} must be a positive integer")
        if (isinstance(extra_states, bool) or not isinstance(extra_states, (int, np.integer))
                or extra_states < 0):
            raise InputError(f"extra_states = {extra_states!r} must be an integer >= 0")
        self.extra_states = int(extra_states)
        self.model = model
        self.config = model.config
        self.dtype = np.dtype(model.dtype)
        budget = None if vram_budget is None else parse_bytes(vram_budget)
        self.device = device
        self.backend = make_backend(device, budget, ops=ops, overlap=overlap)
        self.budget = self.backend.budget
        self._plan: LayeredPlan | None = None
        self._resident: dict = {}
        self._streamer: _Streamer | None = None
        self.stats = dict(steps=0, tokens=0, bytes_streamed=0, last_step_bytes_streamed=0,
                          bytes_prefetch_wasted=0, copy_wait_seconds=0.0, step_seconds=0.0)
        try:
            self._replan(int(batch_size))
        except BaseException:
            self.backend.close()
            raise

    # ----------------------------------------------------------------- planning
    @staticmethod
    def minimum_budget(model, batch_size: int = 1, device: str = "cpu", extra_states: int = 0) -> int:
        """The smallest vram_budget (bytes) with which ``model`` steps a batch of ``batch_size``."""
        shapes = {k: tuple(v.shape) for k, v in model.params.items()}
        return plan_layers(model.config, 1 << 62, batch_size, model.dtype, device, shapes,
                           extra_states).minimum_budget

    def plan(self, batch_size: int | None = None) -> LayeredPlan:
        """The plan in use (``print(engine.plan())`` describes it), or the plan a batch would get."""
        if batch_size is None or int(batch_size) == self._plan.batch_size:
            return self._plan
        return plan_layers(self.config, self.budget, int(batch_size), self.dtype, self.backend.profile.device,
                           self._shapes(), self.extra_states)

    def describe(self) -> str:
        return self._plan.describe(self.model.params) + f"\n  backend: {self.backend.describe()}"

    def _shapes(self):
        return {k: tuple(v.shape) for k, v in self.model.params.items()}

    def _replan(self, batch_size: int):
        plan = plan_layers(self.config, self.budget, batch_size, self.dtype, self.backend.profile.device,
                           self._shapes(), self.extra_states)
        if self._streamer is not None:
            self._streamer.abort()
        self._resident, self._streamer = {}, None   # the old buffers go back to the pool
        P = self.model.params
        be = self.backend
        with be.activate():
            if plan.num_slots:
                self._streamer = _Streamer(be, P, plan.slot_bytes)
            for m in plan.modules:
                if m.resident and m.has_weights:
                    self._resident[m.name] = {p: be.asarray(P[p], what=f"resident weight {p}")
                                              for p in m.params}
        self._plan = plan

    # ----------------------------------------------------------------- accounting
    @property
    def peak_device_bytes(self) -> int:
        """The most device bytes in use at any moment since the engine was made (or reset_peak)."""
        return self.backend.peak_bytes

    @property
    def device_bytes(self) -> int:
        """Device bytes in use now (resident weights, slots, and device states still referenced)."""
        return self.backend.current_bytes

    def reset_peak(self) -> None:
        self.backend.reset_peak()

    # ----------------------------------------------------------------- inputs
    def _token_ids(self, token) -> np.ndarray:
        from ..model import _as_int_array

        if self.backend.device == "cuda" and not isinstance(token, np.ndarray) and hasattr(token, "get") \
                and hasattr(token, "device"):
            token = token.get()   # a CuPy array of ids
        ids = _as_int_array(token, "token")
        if ids.ndim == 2 and ids.shape[1] == 1:
            ids = ids[:, 0]
        elif ids.ndim == 0:
            ids = ids[None]
        if ids.ndim != 1:
            raise InputError(f"token must have shape [B] or [B, 1] (one token per sequence), got shape "
                             f"{list(ids.shape)}")
        if ids.size == 0:
            raise InputError("token is empty: give one token id per sequence")
        V = self.config.vocab_size
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= V:
            bad = lo if lo < 0 else hi
            raise InputError(f"token holds id {bad}, outside [0, {V - 1}] (vocab_size = {V}): encode with a "
                             "tokenizer that fits the model")
        return ids

    def _expected_shapes(self, B: int) -> dict:
        c = self.config
        J = c.memory_slots
        shapes = {f"tier_state_{k}": (B, d) for k, d in enumerate(c.tier_dims)}
        shapes.update(memory=(B, J, c.memory_dim), read_ema=(B, J), write_ema=(B, J), last_read=(B, J),
                      last_write=(B, J), local_buffer=(B, c.local_window, c.embedding_dim))
        return shapes

    def _check_state(self, state, B: int) -> None:
        if not isinstance(state, InferenceState):
            raise StateError("state must be an InferenceState (InferenceState.init(batch_size=..., "
                             f"config=...)), got {type(state).__name__}")
        c = self.config
        if len(state.tiers) != c.num_tiers:
            raise StateError(f"the state has {len(state.tiers)} tier(s) but the model has {c.num_tiers}: it "
                             "was made for another config")
        Bs = state.memory.shape[0] if getattr(state.memory, "ndim", 0) == 3 else None
        if Bs is not None and Bs != B:
            raise StateError(f"the state holds {Bs} sequence(s) but the token has batch size {B}: use "
                             f"InferenceState.init(batch_size={B}, config=...) or a state from a batch-{B} "
                             "run")
        got = {f"tier_state_{k}": s for k, s in enumerate(state.tiers)}
        got.update(memory=state.memory, read_ema=state.read_ema, write_ema=state.write_ema,
                   last_read=state.last_read, last_write=state.last_write, local_buffer=state.local_buffer)
        for key, want in self._expected_shapes(B).items():
            shape = tuple(getattr(got[key], "shape", ()))
            if shape != want:
                raise StateError(f"state {key} has shape {list(shape)}, the model needs {list(want)}: the "
                                 "state was made for another config")
        state.check(c, B)  # counters, dtypes, finite values: the one state check every path makes

    def _state_to_device(self, state, B: int) -> InferenceState:
        be = self.backend
        if state is None:
            state = InferenceState.init(B, self.config, dtype=self.dtype)
        self._check_state(state, B)

        def dev(a, dtype):
            if be.owns(a) and a.dtype == dtype:
                return a
            return be.asarray(a if be.owns(a) else np.asarray(a), dtype=dtype, what="the input state")

        dt = self.dtype
        i64 = np.dtype(np.int64)
        return InferenceState(
            timestep=int(state.timestep), tiers=[dev(s, dt) for s in state.tiers],
            memory=dev(state.memory, dt),
            read_ema=dev(state.read_ema, dt), write_ema=dev(state.write_ema, dt),
            last_read=dev(state.last_read, i64), last_write=dev(state.last_write, i64),
            local_buffer=dev(state.local_buffer, dt), local_valid=int(state.local_valid))

    def state_to_host(self, state: InferenceState) -> InferenceState:
        """A copy of a (device) state as NumPy arrays, e.g. to save it; device memory is not kept."""
        h = self.backend.to_host
        return InferenceState(
            timestep=int(state.timestep), tiers=[h(s) for s in state.tiers], memory=h(state.memory),
            read_ema=h(state.read_ema), write_ema=h(state.write_ema), last_read=h(state.last_read),
            last_write=h(state.last_write), local_buffer=h(state.local_buffer),
            local_valid=int(state.local_valid))

    def state_to_device(self, state: InferenceState) -> InferenceState:
        """A device copy of a host state (``step`` does this itself for a state it was not given back)."""
        B = int(np.shape(state.memory)[0])
        with self.backend.activate():
            return self._state_to_device(state, B)

    # ----------------------------------------------------------------- the step
    def _weights(self, module: str) -> dict:
        res = self._resident.get(module)
        if res is not None:
            return res
        return self._streamer.acquire(module)

    def _done(self, module: str) -> None:
        if module not in self._resident:
            self._streamer.release()

    def step(self, token, state: InferenceState | None = None):
        """One spec §4 step: token ids [B] or [B, 1] and a state → (logits [B, V], a NumPy array; next state).

        The input state is not modified; the next state's arrays live on the device (on "cpu" they are
        NumPy arrays). ``state=None`` starts from the all-zero state.
        """
        ids = self._token_ids(token)
        B = int(ids.shape[0])
        if B > self._plan.batch_size:
            self._replan(B)
        t0 = time.perf_counter()
        wait0 = self._streamer.wait_seconds if self._streamer else 0.0
        copied0 = self._streamer.bytes_copied if self._streamer else 0
        try:
            with self.backend.activate():
                self.backend.begin_step()
                logits, state = self._step(ids, state)
        except BaseException:
            if self._streamer is not None:
                self._streamer.abort()
            raise
        st = self.stats
        st["steps"] += 1
        st["tokens"] += B
        st["step_seconds"] += time.perf_counter() - t0
        if self._streamer is not None:
            st["copy_wait_seconds"] += self._streamer.wait_seconds - wait0
            st["bytes_streamed"] = self._streamer.bytes_copied
            st["last_step_bytes_streamed"] = self._streamer.bytes_copied - copied0
            st["bytes_prefetch_wasted"] = self._streamer.bytes_wasted
        return logits, state

    __call__ = step

    def _step(self, ids: np.ndarray, state):
        c, P, plan, be = self.config, self.model.params, self._plan, self.backend
        xp, ops = be.xp, be.ops
        B = int(ids.shape[0])
        ws = {m.name: m.workspace for m in plan.modules}
        st = self._state_to_device(state, B)
        t, n, Wl = int(st.timestep), int(st.local_valid), c.local_window
        streamer = self._streamer
        if streamer is not None:
            streamer.begin(self._queue(t, n))

        # 1. embed: the batch's rows are gathered on the host; only they move
        with be.workspace(ws["embedding"]):
            e = xp.asarray(embedding_forward(P["embedding.weight"], ids))
        be.adopt(e)

        # 2. local attention over the buffer, then the buffer takes e
        with be.workspace(ws["local_attn"]):
            if Wl > 0 and n > 0:
                W = self._weights("local_attn")
                loc = ops.local_attention(e, st.local_buffer[:, :n], W["local_attn.q.weight"],
                                          W["local_attn.k.weight"], W["local_attn.v.weight"])
                del W
                self._done("local_attn")
            else:
                loc = xp.zeros((B, c.value_dim), dtype=e.dtype)
            buffer = xp.empty_like(st.local_buffer)
            if Wl > 0:
                if n < Wl:
                    buffer[...] = st.local_buffer
                    buffer[:, n] = e
                    n_next = n + 1
                else:
                    buffer[:, :-1] = st.local_buffer[:, 1:]
                    buffer[:, -1] = e
                    n_next = n
            else:
                n_next = 0
        be.adopt(loc, buffer)

        # 3-4. router read with the previous tier states, then the read metadata
        with be.workspace(ws["router"]):
            W = self._weights("router")
            u = xp.concatenate([e, st.tiers[0], st.tiers[-1]], axis=1)
            r, alpha, idx = ops.router(
                u, st.memory, st.read_ema, W["router.W_q.weight"], W["router.W_k.weight"],
                W["router.W_v.weight"], num_heads=c.num_heads, head_dim=c.head_dim, topk=c.read_topk,
                load_penalty=c.load_penalty, capacity=c.read_slot_capacity)
            del W, u
            self._done("router")
            read_ema, last_read = ops.read_meta(st.read_ema, st.last_read, alpha, idx, t, c.read_ema_decay)
            del alpha, idx
        be.adopt(r, read_ema, last_read)

        # 5. tiers under their clocks (an inactive tier's weights are not fetched)
        s_new = []
        lower = e
        for k in range(c.num_tiers):
            name = f"tier.{k}"
            with be.workspace(ws[name]):
                if t % c.tier_timescales[k] == 0:
                    W = self._weights(name)
                    ctx = r + loc if k == 0 else r
                    pre = f"tiers.cells.{k}."
                    s_k = ops.gru(st.tiers[k], xp.concatenate([lower, ctx], axis=1),
                                  W[pre + "W_z.weight"], W[pre + "W_z.bias"], W[pre + "W_r.weight"],
                                  W[pre + "W_r.bias"], W[pre + "W_h.weight"], W[pre + "W_h.bias"])
                    del W, ctx
                    self._done(name)
                else:
                    s_k = st.tiers[k].copy()
            be.adopt(s_k)
            s_new.append(s_k)
            lower = s_k

        # 6-7. writer against the memory before this step's decay, then decay and write
        with be.workspace(ws["writer"]):
            W = self._weights("writer")
            x_w = xp.concatenate([s_new[0], s_new[-1]], axis=1)
            w, g, targets = ops.writer(
                x_w, st.memory, read_ema, st.last_write, t, W["writer.W_w.weight"], W["writer.W_w.bias"],
                write_slots=c.write_slots, clip_max=c.write_clip_max, beta=c.novelty_beta,
                theta=c.novelty_theta, stale_weight=c.stale_weight, underuse_weight=c.underuse_weight)
            del W, x_w
            self._done("writer")
            memory, write_ema, last_write = ops.memory_write(
                st.memory, st.write_ema, st.last_write, targets, g, w, t, decay=c.memory_decay,
                write_rate=c.write_rate, ema_decay=c.write_ema_decay)
            del w, g, targets
        be.adopt(memory, write_ema, last_write)

        # 8. output: LayerNorm over [s^0; …; s^{K-1}], then the head (whole, or chunk by chunk)
        with be.workspace(ws["layer_norm"]):
            W = self._weights("layer_norm")
            h = ops.layer_norm(xp.concatenate(s_new, axis=1), W["layer_norm.weight"], W["layer_norm.bias"])
            del W
            self._done("layer_norm")
        be.adopt(h)
        with be.workspace(ws["output_head"]):
            if "output_head" in self._resident:
                W = self._resident["output_head"]
                logits = ops.linear(h, W["output_head.weight"], W["output_head.bias"])
            else:
                logits = xp.empty((B, c.vocab_size), dtype=h.dtype)
                for a, b in plan.head_chunks:
                    W = self._streamer.acquire("output_head")
                    logits[:, a:b] = ops.linear(h, W["output_head.weight"], W["output_head.bias"])
                    del W
                    self._streamer.release()
            del h
        be.adopt(logits)
        logits_host = be.to_host(logits)
        del logits

        # 9. advance
        next_state = InferenceState(timestep=t + 1, tiers=s_new, memory=memory, read_ema=read_ema,
                                    write_ema=write_ema, last_read=last_read, last_write=last_write,
                                    local_buffer=buffer, local_valid=n_next)
        if streamer is not None:
            streamer.end_step(self._queue(t + 1, n_next))
        return logits_host, next_state

    def _queue(self, t: int, n: int) -> list:
        plan, P = self._plan, self.model.params
        return [p for name in plan.needed(t, n) if not plan.module(name).resident
                for p in plan.pieces(name, P)]

    # ----------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Stop the copy thread and drop the device buffers (the engine cannot step afterwards)."""
        if self._streamer is not None:
            self._streamer.abort()
        self._resident, self._streamer = {}, None
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        p = self._plan
        return (f"LayeredInferenceEngine(device={self.device!r}, budget={format_bytes(self.budget)}, "
                f"resident={[m.name for m in p.modules if m.resident and m.has_weights]}, "
                f"streamed={p.streamed}, "
                f"peak={format_bytes(self.peak_device_bytes)})")


__all__ = ["LayeredInferenceEngine", "LayeredPlan", "plan_layers", "DeviceBudgetError", "parse_bytes"]
