"""Generating the reference vectors (``thl-np golden``): every case of ``cases.py`` drawn, run in float64
and float32, checked, and written with its manifest entry.

A reference folder holds, for every *case*, the inputs a port needs and the outputs thl-np computed
from them, in float64 and in float32 (the same inputs cast to float32, computed in float32)::

    reference/
      manifest.json                        what every file holds (keys, shapes, kinds), spec §, tolerances
      README.md
      cases/<name>/                        whole sequences (spec §4 steps, §5 loss and gradients)
        config.json  model.safetensors  state_in.npz  inputs.npz
        outputs_float64.npz  outputs_float32.npz
      components/<name>/                   one component's forward and backward
        config.json  inputs.npz  outputs_float64.npz  outputs_float32.npz
      training/<name>/                     a short AdamW trajectory
        config.json  train.json  model.safetensors  state_in.npz  inputs.npz
        outputs_float64.npz  outputs_float32.npz

Before a case is written: its discrete choices clear ``margins.MARGINS`` (else the next seed is drawn),
its float32 run makes the same choices as the float64 one and sits within a tenth of the float32
tolerances of it, and its gradients pass finite-difference checks (``gradcheck.py`` for sequences, the
component's own check in ``component_vectors.py``). Everything is deterministic: ``generate`` twice gives
the same files.
"""
from __future__ import annotations

import os

import numpy as np

from ..config import THLConfig
from ..errors import THLError
from ..io.safetensors import write_safetensors
from ..model import THLModel, value_and_grad
from ..params import param_shapes
from ..quant import scheme_config, scheme_name
from ..training.optim import AdamW, clip_grad_norm
from ..training.schedule import lr_at
from .cases import SEQUENCE_CASES, TRAIN_CASE, SequenceCase, component_cases
from .check import DTYPES, KIND_DOC, TOLERANCES, compare_arrays
from .component_vectors import Component
from .draw import cast_params, dequantized, draw_sequence, quantized_tensors, random_params, random_state, state_arrays
from .files import CaseOutputs, describe_arrays, round_sig, save_npz, write_json
from .margins import MARGINS, MAX_ATTEMPTS, trace_sequence
from .sequence_gradcheck import directional_checks

FORMAT = "thl-np reference vectors"
FORMAT_VERSION = 1

#: What an int8 case's manifest entry says about its weights (docs/QUANTIZATION.md is the format).
QUANTIZED_INPUTS = {
    "format": "docs/QUANTIZATION.md: each quantized matrix NAME is stored as int8 NAME [R, C] and float32 "
              "NAME_scale [R, G]; a tensor is quantized exactly when it is int8 with a NAME_scale beside it",
    "weights": "W[i, j] = s[i, j // b] * q[i, j], b = C when block_size is null (one scale per row)",
    "float64": "W = s*q computed in float64 (exact), as every other input",
    "float32": "W = float32(s) * float32(q) rounded once (= the float64 W cast to float32); the float "
               "tensors cast to float32",
    "outputs": "the spec on the dequantized weights; gradients are with respect to W and optional",
}


# ---------------------------------------------------------------------------- the float32 check
def _check_float32(out: CaseOutputs, name: str, factor: float = 0.1) -> None:
    """Our own float32 run must sit well inside the float32 tolerances of our float64 one (a tenth of
    them), or the case leaves a port no room: raise if it does not."""
    tol = TOLERANCES["float32"]
    for key, info in out.keys.items():
        ok, d_abs, d_rel, msg = compare_arrays(out.arrays["float32"][key], out.arrays["float64"][key],
                                               info["kind"], tol["atol"] * factor, tol["rtol"] * factor)
        if not ok:
            raise THLError(f"reference {name}: float32 {key} is {d_abs:.1e} (abs) / {d_rel:.1e} (rel) from "
                           f"float64, too close to the float32 tolerance {msg}")


# ---------------------------------------------------------------------------------- whole sequences
def find_draw(case: SequenceCase):
    """The first seed (``case.seed``, +1, ...) whose run keeps every margin and meets ``case.require``,
    with float32 making the same choices as float64. Returns (seed, drawn inputs, float64 trace)."""
    for attempt in range(MAX_ATTEMPTS):
        seed = case.seed + attempt
        config, params, state, ids, targets, U = draw_sequence(case, seed)
        tr64 = trace_sequence(params, config, ids, state.copy(), U)
        if not tr64.margins_ok():
            continue
        if any(tr64.counts.get(k, 0) < v for k, v in case.require.items()):
            continue
        tr32 = trace_sequence(cast_params(params, np.float32), config, ids, state.copy(np.float32), U)
        if not tr64.same_choices(tr32):
            continue
        return seed, (config, params, state, ids, targets, U), tr64
    raise THLError(f"reference case {case.name}: no draw in {MAX_ATTEMPTS} seeds keeps every margin")


def _sequence_outputs(config, params, state, ids, targets, U, trace64, trace32, grads_required=True
                      ) -> CaseOutputs:
    """The outputs of a sequence case. ``grads_required=False`` (the int8 case) makes the gradients
    optional: a port that reads int8 weights for inference is checked on its forward values alone."""
    out = CaseOutputs()
    per = {}
    for dt in DTYPES:
        model = THLModel(config.replace(dtype=dt), params=params, dtype=dt)
        logits, _ = model(ids, state=state, gumbel_uniform=U)
        loss, grads, state_out, d_state = value_and_grad(model, ids, targets, state=state, gumbel_uniform=U,
                                                         return_state=True, return_state_grad=True)
        if dt == "float64":
            directional_checks(model.params, config, ids, targets, state, U, grads, d_state,
                               np.random.default_rng(12345))
        per[dt] = (logits, loss, grads, state_out, d_state)
    out.add("logits", {d: per[d][0] for d in DTYPES}, "value", "§4.8", "logits of every step [B, T, V]")
    out.add("loss", {d: np.asarray(per[d][1]) for d in DTYPES}, "value", "§5",
            "mean cross-entropy over B·T (+ the load-balance term when its λ is non-zero)")
    for key in per["float64"][3].arrays():
        kind = "exact" if np.asarray(per["float64"][3].arrays()[key]).dtype.kind == "i" else "value"
        out.add(f"state_out.{key}", {d: per[d][3].arrays()[key] for d in DTYPES}, kind, "§3",
                "the state after the T steps")
    for name in param_shapes(config):
        out.add(f"grad.{name}", {d: per[d][2][name] for d in DTYPES}, "grad", "§5",
                "" if grads_required else "with respect to the dequantized weight W = s·q",
                required=grads_required)
    for key in per["float64"][4]:
        out.add(f"grad_state.{key}", {d: per[d][4][key] for d in DTYPES}, "grad", "§5",
                "gradient of the loss w.r.t. this key of the initial state", required=grads_required)
    # diagnostics: optional, for localising a failure to a step
    traces = {"float64": trace64, "float32": trace32}
    out.add("tier_states", {d: traces[d].tier_states for d in DTYPES}, "value", "§4.5",
            "[s^0; …; s^{K-1}] after every step [B, T, Σd_k] (the LayerNorm's input)", required=False)
    docs = {"idx": ("§4.3", "slots read per step [T, B, H, κ], by descending score"),
            "capacity_mask": ("§4.3", "1 where a pick kept its weight under the slot capacity [T, B, H, κ]"),
            "targets": ("§4.6", "slots written per step [T, B, W_w], in ranking order"),
            "novel": ("§4.6", "1 for the novel branch, 0 for refinement [T, B]"),
            "j_star": ("§4.6", "the arg-max-affinity slot [T, B] (where the novelty's gradient reaches M)"),
            "clipped": ("§4.6", "1 where ‖w_raw‖ was clipped [T, B]")}
    for key in trace64.choices:
        spec, doc = docs[key]
        out.add(f"trace.{key}", {d: traces[d].choices[key] for d in DTYPES}, "exact", spec, doc,
                required=False)
    return out


def generate_sequence_case(case: SequenceCase, folder: str) -> dict:
    seed, (config, params, state, ids, targets, U), tr64 = find_draw(case)
    tr32 = trace_sequence(cast_params(params, np.float32), config, ids, state.copy(np.float32), U)
    file_config, tensors, described = config, params, {k: list(v.shape) for k, v in params.items()}
    if case.quantization:  # the file holds int8 + scales; the outputs are computed on W = s·q (float64)
        file_config = config.replace(quantization=scheme_config(case.quantization))
        tensors = quantized_tensors(params, case.quantization)
        back = dequantized(tensors, case.quantization)
        if any(not np.array_equal(back[k], params[k]) for k in params):  # pragma: no cover
            raise THLError(f"reference {case.name}: the stored int8 weights do not give back the weights "
                           "the outputs were computed on")
        described = describe_arrays(tensors)
    os.makedirs(folder, exist_ok=True)
    file_config.save(os.path.join(folder, "config.json"))
    write_safetensors(os.path.join(folder, "model.safetensors"), tensors,
                      metadata={"format": "thl-np", "format_version": "1", "config": file_config.to_json()})
    state_arr = state_arrays(state)
    save_npz(os.path.join(folder, "state_in.npz"), state_arr)
    inputs = {"input_ids": ids, "targets": targets}
    if U is not None:
        inputs["gumbel_uniform"] = U
    save_npz(os.path.join(folder, "inputs.npz"), inputs)
    out = _sequence_outputs(config, params, state, ids, targets, U, tr64, tr32,
                            grads_required=not case.quantization)
    _check_float32(out, case.name)
    for dt in DTYPES:
        save_npz(os.path.join(folder, f"outputs_{dt}.npz"), out.arrays[dt])
    entry = {
        "kind": "sequence",
        "description": case.description,
        "spec": ["§3", "§4", "§5"],
        "routing": "training (gumbel_uniform given)" if case.train else "eval",
        "seed": seed,
    }
    if case.quantization:
        entry["quantization"] = QUANTIZED_INPUTS | {"scheme": scheme_name(file_config.quantization),
                                                     "config": file_config.quantization}
    return entry | {
        "inputs": {
            "config.json": "THLConfig (spec §1)" + (" with its quantization" if case.quantization else ""),
            "model.safetensors": described,
            "state_in.npz": describe_arrays(state_arr),
            "inputs.npz": describe_arrays(inputs),
        },
        "outputs": out.manifest(),
        "margins": {k: round_sig(v) for k, v in tr64.margins.items()},
        "counts": tr64.counts,
    }


# --------------------------------------------------------------------------------------- components
def generate_component(comp: Component, folder: str) -> dict:
    _check_float32(comp.outputs, comp.name)
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "config.json"), comp.config)
    save_npz(os.path.join(folder, "inputs.npz"), comp.inputs)
    for dt in DTYPES:
        save_npz(os.path.join(folder, f"outputs_{dt}.npz"), comp.outputs.arrays[dt])
    entry = {"kind": "component", "description": comp.description, "spec": [comp.spec],
             "functions": [f if "." in f else f"{_module_of(f)}.{f}" for f in comp.functions],
             "inputs": {"config.json": comp.config, "inputs.npz": describe_arrays(comp.inputs)},
             "outputs": comp.outputs.manifest()}
    if comp.margins:
        entry["margins"] = comp.margins
    return entry


def _module_of(fn_name: str) -> str:
    for mod in ("embedding", "local_attention", "router", "gru", "writer", "output"):
        module = __import__(f"thl_np.components.{mod}", fromlist=[fn_name])
        if hasattr(module, fn_name):
            return module.__name__
    return "thl_np.model"  # pragma: no cover


# ----------------------------------------------------------------------------------------- training
def _train_trajectory(config, params, state, inputs, hyper, dtype):
    """Run the 10 steps in ``dtype``: the loop of ``thl_np.training.trainer._train_step`` with given data,
    noise and learning rates. Returns (losses, norms, final params, final state, traces)."""
    model = THLModel(config.replace(dtype=dtype), params=params, dtype=dtype)
    opt = AdamW(model.params, weight_decay=hyper["weight_decay"], betas=(hyper["beta1"], hyper["beta2"]),
                eps=hyper["eps"])
    st = state.copy(dtype)
    losses, norms, traces = [], [], []
    for i in range(len(inputs["lr"])):
        U = inputs["gumbel_uniform"][i]
        traces.append(trace_sequence(model.params, model.config, inputs["input_ids"][i], st.copy(), U))
        loss, grads, st = value_and_grad(model, inputs["input_ids"][i], inputs["targets"][i], state=st,
                                         gumbel_uniform=U, return_state=True)
        grads = dict(grads)
        norms.append(clip_grad_norm(grads, hyper["grad_clip"]))
        losses.append(loss)
        opt.step(model.params, grads, float(inputs["lr"][i]))
    return np.array(losses), np.array(norms), model.params, st, traces


def generate_training(folder: str) -> dict:
    tc = TRAIN_CASE
    hyper = tc["hyper"]
    S, B, T = tc["steps"], tc["batch"], tc["seq_len"]
    lrs = np.array([lr_at(i, hyper["peak_lr"], hyper["warmup"], S, hyper["min_lr_ratio"]) for i in range(S)])
    for attempt in range(MAX_ATTEMPTS):
        seed = tc["seed"] + attempt
        rng = np.random.default_rng(seed)
        config = THLConfig(**tc["config"])
        params = random_params(config, rng, {"writer.W_w": 0.5})
        state = random_state(config, B, rng, timestep=tc["timestep"], local_valid=tc["local_valid"],
                             empty_slots=tc["empty_slots"])
        inputs = {"input_ids": rng.integers(0, config.vocab_size, (S, B, T)).astype(np.int64),
                  "targets": rng.integers(0, config.vocab_size, (S, B, T)).astype(np.int64),
                  "gumbel_uniform": rng.random((S, T, B, config.num_heads, config.memory_slots)),
                  "lr": lrs}
        run = {dt: _train_trajectory(config, params, state, inputs, hyper, dt) for dt in DTYPES}
        tr64, tr32 = run["float64"][4], run["float32"][4]
        if not all(t.margins_ok() for t in tr64):
            continue
        if not all(a.same_choices(b) for a, b in zip(tr64, tr32, strict=True)):
            continue
        clip_margin = float(np.min(np.abs(run["float64"][1] - hyper["grad_clip"]) / hyper["grad_clip"]))
        if clip_margin < MARGINS["grad_clip"]:
            continue
        break
    else:  # pragma: no cover
        raise THLError("training case: no draw keeps every margin")
    os.makedirs(folder, exist_ok=True)
    config.save(os.path.join(folder, "config.json"))
    write_safetensors(os.path.join(folder, "model.safetensors"), params,
                      metadata={"format": "thl-np", "format_version": "1", "config": config.to_json()})
    save_npz(os.path.join(folder, "state_in.npz"), state_arrays(state))
    save_npz(os.path.join(folder, "inputs.npz"), inputs)
    train_json = {
        "steps": S, "batch_size": B, "seq_len": T,
        "optimizer": "AdamW (decoupled weight decay), PyTorch's update: m = β1·m + (1−β1)·g; "
                     "v = β2·v + (1−β2)·g²; p = p·(1 − lr·wd) for decayed tensors; "
                     "p = p − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + eps)",
        "lr": [float(x) for x in lrs],
        "lr_schedule": f"lr_at(step, peak_lr={hyper['peak_lr']}, warmup={hyper['warmup']}, "
                       f"total_steps={S}, min_lr_ratio={hyper['min_lr_ratio']}): linear warm-up "
                       "peak·(step+1)/warmup, then cosine to min_lr at the last step (inputs.npz holds the "
                       "values)",
        **hyper,
        "no_decay": "tensors named *.bias, layer_norm.*, and embedding.weight are not decayed",
        "grad_clip_rule": "global L2 norm over all gradients (float64 accumulation); if norm > grad_clip, "
                          "every gradient is multiplied by grad_clip / (norm + 1e-6)",
        "moments": "m and v start at 0, kept in the compute dtype",
        "state": "step i starts from the state the step i−1 ended with (step 0 from state_in.npz); the "
                 "gradient does not flow into the state passed in (truncated BPTT)",
        "routing": "training mode with gumbel_uniform[i] for step i",
        "order": "loss, grads = value_and_grad; norm = clip(grads); AdamW step with lr[i]",
    }
    write_json(os.path.join(folder, "train.json"), train_json)
    out = CaseOutputs()
    out.add("loss", {d: run[d][0] for d in DTYPES}, "value", "§5",
            "loss of each step, before its update [steps]")
    out.add("grad_norm", {d: run[d][1] for d in DTYPES}, "value", "§5",
            "global gradient norm of each step, before clipping [steps]")
    for name in param_shapes(config):
        out.add(f"final.{name}", {d: run[d][2][name] for d in DTYPES}, "value", "§2",
                "the weight after the 10 updates")
    for key, v in run["float64"][3].arrays().items():
        kind = "exact" if np.asarray(v).dtype.kind == "i" else "value"
        out.add(f"state_out.{key}", {d: run[d][3].arrays()[key] for d in DTYPES}, kind, "§3",
                "the state after the last step")
    _check_float32(out, tc["name"])
    for dt in DTYPES:
        save_npz(os.path.join(folder, f"outputs_{dt}.npz"), out.arrays[dt])
    margins = {k: round_sig(min(t.margins[k] for t in run["float64"][4])) for k in run["float64"][4][0].margins}
    margins["grad_clip"] = round_sig(clip_margin)
    return {"kind": "training", "description": "10 AdamW steps with gradient clipping and a warm-up/cosine "
            "schedule, training-mode routing, the state carried from step to step (as thl-np train does).",
            "spec": ["§5"], "seed": seed,
            "inputs": {"config.json": "THLConfig (spec §1)", "train.json": train_json,
                       "model.safetensors": {k: list(v.shape) for k, v in params.items()},
                       "state_in.npz": describe_arrays(state_arrays(state)),
                       "inputs.npz": describe_arrays(inputs)},
            "outputs": out.manifest(), "margins": margins}


# --------------------------------------------------------------------------------- the whole folder
README = """# Reference vectors

Generated by `thl-np golden --out reference` (thl_np/reference/generate.py); do not edit by hand.
`manifest.json` lists every case, every file, every tensor (shape, kind, spec section) and the tolerances.
See docs/PORTING.md for how a port reads these files, writes its results, and runs `thl-np check-port`.
"""


def generate(out_dir: str, log=None) -> dict:
    """Write every reference case under ``out_dir`` and its manifest.json; returns the manifest."""
    log = log or (lambda msg: None)
    os.makedirs(out_dir, exist_ok=True)
    cases = {}
    for case in SEQUENCE_CASES:
        log(f"cases/{case.name}")
        cases[f"cases/{case.name}"] = generate_sequence_case(case, os.path.join(out_dir, "cases", case.name))
    for comp in component_cases():
        log(f"components/{comp.name}")
        cases[f"components/{comp.name}"] = generate_component(comp, os.path.join(out_dir, "components",
                                                                                   comp.name))
    log(f"training/{TRAIN_CASE['name']}")
    cases[f"training/{TRAIN_CASE['name']}"] = generate_training(os.path.join(out_dir, "training",
                                                                             TRAIN_CASE["name"]))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "generator": "thl-np golden (thl_np/reference/generate.py)",
        "layout": {
            "cases/<name>": "config.json, model.safetensors (float64; int8 + float32 scales in a case with a "
                            "quantization entry), state_in.npz (spec §3 keys), inputs.npz; outputs_<dtype>.npz",
            "components/<name>": "config.json (scalar settings), inputs.npz (float64 inputs, parameters and "
                                 "the upstream gradients d_<output>); outputs_<dtype>.npz",
            "training/<name>": "config.json, train.json (hyper-parameters), model.safetensors (initial "
                               "weights), state_in.npz, inputs.npz; outputs_<dtype>.npz",
            "results": "a port writes RESULTS_DIR/<case>/outputs_<dtype>.npz with the keys listed under "
                       "outputs",
        },
        "dtypes": {"float64": "inputs as stored, computed in float64",
                   "float32": "the same inputs cast to float32, computed in float32 (integers unchanged)"},
        "tolerances": TOLERANCES,
        "kinds": KIND_DOC,
        "required": "keys with required=false are diagnostics: compared when the results hold them, else "
                    "skipped",
        "margins": {"thresholds": MARGINS,
                    "meaning": "every discrete choice of every case is at least this far from a tie "
                               "(sequence cases list the smallest margin they reached)"},
        "cases": cases,
    }
    write_json(os.path.join(out_dir, "manifest.json"), manifest)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(README)
    return manifest
