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

The step is the plain path's own composition, ``thl_np.step.thl_step``, with the weights streamed into it
(``weights.py``); the ``thl_np.components`` functions run on NumPy or CuPy arrays alike. LayerNorm is
included (the PyTorch THL's engine skipped it, spec §6): logits and state equal the plain model's.
Docs: docs/LAYERED.md.

One concern per file:

- ``plan.py``: the modules, their sizes and workspace bounds, and ``plan_layers`` (shapes only);
- ``stream.py``: the double-buffered streamer;
- ``engine.py``: ``LayeredInferenceEngine`` (inputs, states, plan, stats);
- ``weights.py``: the weight provider that fetches or streams each module's weights into the step;
- ``backends/``: ``cpu.NumpyBackend``, ``cuda.CupyBackend`` (the one place CuPy is imported, lazily),
  ``accounting`` (``DeviceBudgetError``, the sizing ``Profile``, the byte ``Meter``), ``make_backend``;
- ``units.py``: byte sizes (``parse_bytes``, ``format_bytes``), alignment, the host's free RAM.
"""
from .backends.accounting import DeviceBudgetError
from .engine import LayeredInferenceEngine
from .plan import LayeredPlan, plan_layers
from .units import parse_bytes

__all__ = ["LayeredInferenceEngine", "LayeredPlan", "plan_layers", "DeviceBudgetError", "parse_bytes"]
