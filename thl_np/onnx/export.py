"""``thl-np export``: a model folder → an ONNX file of one step + head, with its metadata.

The metadata (``metadata_props``, and the same JSON beside the file as ``OUT.json`` for runtimes that cannot
read ONNX metadata, such as onnxruntime-web): the thl-np version, the config, the state layout (names,
shapes with ``"batch"``, dtypes, initial value 0), the diagnostic outputs, the weights' form and the
tokenizer (bytes). A runtime needs nothing else.

Weights above ``EXTERNAL_ABOVE`` bytes (protobuf refuses a message past 2 GiB) go to ``OUT.data`` beside the
file (ONNX external data); ``external_data=True`` forces that for any size.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ..errors import InputError
from .graph import build_step, check_lowerable, state_layout, trace_layout

FORMAT = "thl-np-onnx-step"
FORMAT_VERSION = 1
META_KEYS = ("thl_np.format", "thl_np.format_version", "thl_np.version", "thl_np.config", "thl_np.state_layout",
             "thl_np.trace_outputs", "thl_np.weights", "thl_np.tokenizer")
EXTERNAL_ABOVE = 1_800_000_000   # leaves room under protobuf's 2 GiB for the graph itself
TOKENIZER = ("bytes: ids 0-255 are the UTF-8 bytes of the text; 256 pad, 257 eos, 258 unk when vocab_size "
             ">= 259 (thl_np.tokenizer)")


def stored_bytes(model) -> int:
    """Bytes of the weights as the export stores them (int8 + scales for an int8 model, float32 otherwise)."""
    p = model.params
    if hasattr(p, "stored"):
        return int(sum(a.size * (1 if a.dtype == np.int8 else 4) for a in p.stored().values()))
    return int(sum(a.size * 4 for a in p.values()))


def metadata(config, weights: str) -> dict:
    from .. import __version__

    return {"thl_np.format": FORMAT, "thl_np.format_version": FORMAT_VERSION, "thl_np.version": __version__,
            "thl_np.config": config.to_json(), "thl_np.state_layout": json.dumps(state_layout(config)),
            "thl_np.trace_outputs": json.dumps(trace_layout(config)), "thl_np.weights": weights,
            "thl_np.tokenizer": TOKENIZER}


def build_model(model):
    """The ONNX ModelProto of ``model`` (a THLModel; its weights exported as float32, or int8-row)."""
    config = model.config
    check_lowerable(config)
    params = model.params
    tensor = params.tensor if hasattr(params, "tensor") else None
    g = build_step(config, params, tensor)
    weights = "int8-row" if config.quantization else "float32"
    out_config = config.replace(dtype="float32")
    return g.model(metadata=metadata(out_config, weights))


def check_output_path(out, force: bool, flag: str = "--out") -> str:
    """The export's path: InputError (one line) for an existing file without ``force``, a folder, or an
    unwritable place. Checked before any work."""
    from ..checks import check_output_file

    out = check_output_file(out, flag)
    if os.path.lexists(out) and not force:
        raise InputError(f"{flag} {out} already exists: pass --force to overwrite it")
    return out


def save(proto, out: str, external_data: bool | None = None) -> dict:
    """Write ``proto`` to ``out`` (and ``out``.json; ``out``.data with external data). The .onnx file is
    written to a temporary name and renamed into place last. Returns {"onnx": path, "data": path|None,
    "json": path}."""
    import onnx

    weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
    if external_data is None:
        external_data = weight_bytes > EXTERNAL_ABOVE
    folder = os.path.dirname(os.path.abspath(out))
    tmp = os.path.join(folder, f".{os.path.basename(out)}.tmp-{os.getpid()}")
    data_name = os.path.basename(out) + ".data"
    try:
        if external_data:
            onnx.save_model(proto, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(proto, tmp)
        meta = {p.key: p.value for p in proto.metadata_props}
        side = {k: (json.loads(v) if k in ("thl_np.config", "thl_np.state_layout", "thl_np.trace_outputs") else v)
                for k, v in meta.items()}
        with open(out + ".json.tmp", "w") as f:
            json.dump(side, f, indent=1)
        os.replace(out + ".json.tmp", out + ".json")
        os.replace(tmp, out)
    except BaseException:
        for p in (tmp, out + ".json.tmp"):
            if os.path.exists(p):
                os.unlink(p)
        raise
    if external_data:  # onnx writes the data file private (0600): give it the permissions of the .onnx file
        os.chmod(os.path.join(folder, data_name), os.stat(out).st_mode & 0o777)
    elif os.path.exists(os.path.join(folder, data_name)):
        os.unlink(os.path.join(folder, data_name))  # a stale one from an earlier export under this name
    return {"onnx": out, "data": os.path.join(folder, data_name) if external_data else None, "json": out + ".json"}


def export_onnx(model_dir, out: str, force: bool = False, external_data: bool | None = None, progress=None) -> dict:
    """Load the model folder, check everything, then build and write the export (``save``'s answer plus
    ``config`` and ``weight_bytes``). ``progress(done, total)`` is told of the three stages (read, build,
    write) as they finish."""
    from ..io.folder import resolve_model_dir
    from ..model import THLModel

    src = resolve_model_dir(model_dir)
    out = check_output_path(out, force)
    from ..config import THLConfig

    config = THLConfig.load(src)  # the variants and the scheme are refused before the weights are read
    check_lowerable(config)
    tick = progress or (lambda done, total: None)
    model = THLModel.from_pretrained(src, dtype="float32")
    tick(1, 3)
    proto = build_model(model)
    tick(2, 3)
    written = save(proto, out, external_data)
    tick(3, 3)
    written.update(config=model.config, weight_bytes=stored_bytes(model))
    return written
