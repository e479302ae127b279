"""Load a thl-np ONNX export and run it in ONNX Runtime: the metadata is checked against the graph first (a
truncated file, or metadata that disagrees with the graph's inputs and outputs, is one InputError), then
``OnnxStep`` steps it with thl-np's ``InferenceState`` values or plain dicts of arrays."""
from __future__ import annotations

import json
import os

import numpy as np

from ..errors import InputError
from .builder import BOOL, FLOAT, INT64
from .export import FORMAT, META_KEYS
from .graph import STATE_IN, STATE_OUT

_ELEM = {"float32": FLOAT, "int64": INT64, "bool": BOOL}
_NP = {"float32": np.float32, "int64": np.int64, "bool": np.bool_}


def read_metadata(path: str):
    """(ModelProto without its external weights, metadata dict, config) of an export; InputError when the
    file is missing, unreadable (truncated) or not a thl-np export, or its metadata disagrees with its graph."""
    import onnx

    from ..config import THLConfig

    if not os.path.isfile(path):
        raise InputError(f"{path}: no such ONNX file (write one with `thl-np export --format onnx`)")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as exc:
        raise InputError(f"{path} is not a readable ONNX model ({type(exc).__name__}; truncated or not ONNX): "
                         "export it again") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get("thl_np.format") != FORMAT:
        raise InputError(f"{path} is not a thl-np step export (no thl_np.format = {FORMAT} in its metadata)")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise InputError(f"{path}: its metadata lacks {missing}: export it again")
    try:
        config = THLConfig.from_dict(json.loads(meta["thl_np.config"]))
        layout = json.loads(meta["thl_np.state_layout"])
        traces = json.loads(meta["thl_np.trace_outputs"])
    except Exception as exc:
        raise InputError(f"{path}: its metadata does not parse ({type(exc).__name__}: {exc})") from None
    check_graph(proto, config, layout, traces, path)
    return proto, meta, config


def _dims(value_info) -> list:
    return [d.dim_param if d.dim_param else d.dim_value for d in value_info.type.tensor_type.shape.dim]


def check_graph(proto, config, layout, traces, path: str) -> None:
    """The graph's inputs and outputs against the metadata's state layout and config."""
    from .graph import state_layout, trace_layout

    if layout != state_layout(config) or traces != trace_layout(config):
        raise InputError(f"{path}: the metadata's state layout disagrees with its config "
                         f"(config {config.tier_dims} tiers, J={config.memory_slots}): the file was edited")
    want_in = {"token_ids": (INT64, ["batch"])}
    want_out = {"logits": (FLOAT, ["batch", config.vocab_size])}
    for row in layout:
        want_in[row["input"]] = (_ELEM[row["dtype"]], row["shape"])
        want_out[row["output"]] = (_ELEM[row["dtype"]], row["shape"])
    for row in traces:
        want_out[row["name"]] = (_ELEM[row["dtype"]], row["shape"])
    init = {t.name for t in proto.graph.initializer}
    got_in = {v.name: (v.type.tensor_type.elem_type, _dims(v)) for v in proto.graph.input if v.name not in init}
    got_out = {v.name: (v.type.tensor_type.elem_type, _dims(v)) for v in proto.graph.output}
    for what, want, got in (("input", want_in, got_in), ("output", want_out, got_out)):
        for name, spec in want.items():
            if name not in got:
                raise InputError(f"{path}: the metadata names the {what} {name!r}, which the graph does not have")
            if got[name] != spec:
                raise InputError(f"{path}: the graph's {what} {name!r} is {got[name]}, the metadata says {spec}")
        extra = sorted(set(got) - set(want))
        if extra:
            raise InputError(f"{path}: the graph has {what}(s) {extra} that its metadata does not describe")


class OnnxStep:
    """An export loaded in ONNX Runtime (CPU). ``step(token_ids, state)`` → (logits [B, V], next state,
    trace dict); ``state`` and the next state are ``InferenceState`` values."""

    def __init__(self, path: str, threads: int | None = None):
        import onnxruntime as ort

        self.path = os.fspath(path)
        _, self.meta, self.config = read_metadata(self.path)
        self.layout = json.loads(self.meta["thl_np.state_layout"])
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise InputError(f"{self.path}: ONNX Runtime cannot load it ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200]})") from None
        self.output_names = [o.name for o in self.session.get_outputs()]

    def zero_state(self, batch: int):
        from ..state import InferenceState

        return InferenceState.init(batch, self.config.replace(dtype="float32"))

    def feeds(self, token_ids, state) -> dict:
        arrays = state.arrays() if hasattr(state, "arrays") else state
        feed = {"token_ids": np.ascontiguousarray(token_ids, dtype=np.int64)}
        for row in self.layout:
            feed[row["input"]] = np.asarray(arrays[row["name"]], dtype=_NP[row["dtype"]], order="C")
        return feed

    def run(self, token_ids, arrays) -> dict:
        """One step on a dict of spec §3 arrays → every output by name."""
        return dict(zip(self.output_names, self.session.run(None, self.feeds(token_ids, arrays)), strict=True))

    def step(self, token_ids, state):
        from ..state import InferenceState

        out = self.run(token_ids, state)
        nxt = {row["name"]: out[row["output"]] for row in self.layout}
        K = self.config.num_tiers
        new = InferenceState(timestep=int(nxt["timestep"]), tiers=[nxt[f"tier_state_{k}"] for k in range(K)],
                             memory=nxt["memory"], read_ema=nxt["read_ema"], write_ema=nxt["write_ema"],
                             last_read=nxt["last_read"], last_write=nxt["last_write"],
                             local_buffer=nxt["local_buffer"], local_valid=int(nxt["local_valid"]))
        trace = {k: v for k, v in out.items() if k.startswith("trace.")}
        return out["logits"], new, trace


__all__ = ["OnnxStep", "read_metadata", "STATE_IN", "STATE_OUT"]
