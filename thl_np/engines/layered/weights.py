"""The layered engine's weight provider for ``thl_np.step.thl_step``: the step is the plain path's own
composition; this file only says where each module's weights are and what its arrays cost.

``module(name)`` reserves the module's planned workspace on the device for the duration of the block and
hands over a mapping of its weights. A module's weights are fetched from the engine on first read:
resident weights directly, streamed ones from the streamer's slot (waiting for their copy), which is
given back when the block ends. The embedding table never moves: reading ``embedding.weight[ids]``
gathers the batch's rows on the host and moves only them. ``keep(*arrays)`` charges arrays that outlive
their module (the next state, the tier states) to the device budget. A quantized model's weights arrive
as int8 values and scales and are dequantized on the device on first read, once per module run
(``storage.dequantize_weight``); an int8 embedding's rows are dequantized on the host.
"""
from __future__ import annotations

import contextlib

import numpy as np

from .storage import dequantize_weight


class _HostRows:
    """The embedding table left on the host: ``table[ids]`` is a device array of the batch's rows."""

    def __init__(self, table, xp, dtype):
        self.table, self.xp, self.dtype = table, xp, dtype

    def __getitem__(self, ids):
        rows = self.table[ids] if isinstance(self.table, np.ndarray) else self.table.rows(ids, self.dtype)
        return self.xp.asarray(rows)


class _ModuleWeights:
    """One module's weights, fetched from the engine on first read."""

    def __init__(self, engine, name):
        self.engine, self.name, self.fetched, self.dense = engine, name, None, {}

    def __getitem__(self, key):
        params = self.engine.model.params
        if key == "embedding.weight":
            table = params.tensor(key) if hasattr(params, "tensor") else params[key]
            return _HostRows(table, self.engine.backend.xp, self.engine.dtype)
        if self.fetched is None:
            self.fetched = self.engine._weights(self.name)
        if key not in self.dense:
            q = self.engine.config.quantization
            self.dense[key] = dequantize_weight(self.fetched, key, self.engine.dtype, q and q["block_size"])
        return self.dense[key]

    def release(self):
        self.dense = {}
        if self.fetched is not None:
            self.fetched = None
            self.engine._done(self.name)


class StreamedWeights:
    """Weights for one step of ``engine`` (a ``LayeredInferenceEngine``)."""

    def __init__(self, engine):
        self.engine = engine
        self.workspace = {m.name: m.workspace for m in engine._plan.modules}

    @contextlib.contextmanager
    def module(self, name):
        with self.engine.backend.workspace(self.workspace[name]):
            weights = _ModuleWeights(self.engine, name)
            yield weights
            weights.release()   # not on an error: the engine aborts the streamer then

    def keep(self, *arrays) -> None:
        self.engine.backend.adopt(*arrays)
