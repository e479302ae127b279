"""The layered engine's weight provider for ``thl_np.step.thl_step``: the step is the plain path's own
composition; this file only says where each module's weights are and what its arrays cost.

``module(name)`` reserves the module's planned workspace on the device for the duration of the block and
hands over a mapping of its weights. A module's weights are fetched from the engine on first read:
resident weights directly, streamed ones from the streamer's slot (waiting for their copy), which is
given back when the block ends. The embedding table never moves: reading ``embedding.weight[ids]``
gathers the batch's rows on the host and moves only them. ``keep(*arrays)`` charges arrays that outlive
their module (the next state, the tier states) to the device budget.
"""
from __future__ import annotations

import contextlib


class _HostRows:
    """The embedding table left on the host: ``table[ids]`` is a device array of the batch's rows."""

    def __init__(self, table, xp):
        self.table, self.xp = table, xp

    def __getitem__(self, ids):
        return self.xp.asarray(self.table[ids])


class _ModuleWeights:
    """One module's weights, fetched from the engine on first read."""

    def __init__(self, engine, name):
        self.engine, self.name, self.fetched = engine, name, None

    def __getitem__(self, key):
        if key == "embedding.weight":
            return _HostRows(self.engine.model.params[key], self.engine.backend.xp)
        if self.fetched is None:
            self.fetched = self.engine._weights(self.name)
        return self.fetched[key]

    def release(self):
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
