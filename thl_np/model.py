"""THLModel, the public face of THL: a config and its parameters, the choice between the plain path
(``thl_np.step``, the spec composed from ``thl_np.components``) and the fast path
(``thl_np.engines.decoder``, ``thl_np.engines.gradient``), and saving and loading.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ._blas import blas_threads
from ._threads import StepThreads
from .checks import as_dtype, as_int_array, as_path, check
from .components.registry import components_for, router_score_rule
from .config import THLConfig
from .errors import InputError, StateError, WeightsError
from .params import check_params, init_params, num_parameters, param_shapes
from .quant import SCALE_SUFFIX, scheme_config, scheme_name
from .quant.params import QuantizedParams
from .quant.quantize import model_params as quantized_params
from .quant.quantize import quantize_params
from .state import InferenceState
from .step import head_loss_and_backward, loss_and_grads, output_forward, run_sequence, thl_step

FORMAT_VERSION = "1"
VERIFY_BELOW_BYTES = 64 << 20  # from_pretrained reads (and NaN-checks) every page of files this small


@dataclass(frozen=True)
class TierStack:
    """What ``model.tiers`` describes: the tier widths and clocks (for ``InferenceState.init``)."""

    dims: tuple
    timescales: tuple


@dataclass(frozen=True)
class MemoryBank:
    """What ``model.memory_bank`` describes: J slots of width d_m (for ``InferenceState.init``)."""

    slots: int
    dim: int


# ---------------------------------------------------------------------------------------------------
# The model object
# ---------------------------------------------------------------------------------------------------
class THLModel:
    """A THL language model: a config and a dict of parameters (spec §2 names). Stateless: the
    recurrent state is an ``InferenceState`` passed in and returned."""

    def __init__(self, config: THLConfig | None = None, seed: int | None = None, params=None, dtype=None):
        if config is None:
            config = THLConfig()
        if not isinstance(config, THLConfig):
            raise InputError(f"THLModel needs a THLConfig, got {type(config).__name__}")
        self.config = config
        self.dtype = as_dtype(dtype or config.dtype)
        if self.dtype not in (np.float32, np.float64):
            raise InputError(f"dtype {self.dtype} is not supported: use float32 or float64")
        if config.quantization or isinstance(params, QuantizedParams):
            params = quantized_params(config, params, self.dtype, seed)  # int8 weights (thl_np.quant)
        elif params is None:
            params = init_params(config, seed=seed, dtype=self.dtype)
        else:
            check_params(config, params)
            params = {k: (v if v.dtype == self.dtype else v.astype(self.dtype)) for k, v in params.items()}
        self.params = params

    # ----------------------------------------------------------------- descriptions
    @property
    def tiers(self) -> TierStack:
        return TierStack(tuple(self.config.tier_dims), tuple(self.config.tier_timescales))

    @property
    def memory_bank(self) -> MemoryBank:
        return MemoryBank(self.config.memory_slots, self.config.memory_dim)

    def weights_key(self) -> tuple:
        """Identifies the current parameter arrays. A decoder cache (derived from the weights) is reused
        only while this is unchanged: optimisers replace arrays, which changes it. After editing a
        parameter array in place, pass states through ``state.copy()`` to drop their caches."""
        if isinstance(self.params, QuantizedParams):
            return self.params.key()  # values() would dequantize
        return tuple(map(id, self.params.values()))

    def num_parameters(self) -> int:
        return num_parameters(self.config)

    @property
    def nbytes(self) -> int:
        """Bytes of the parameters as held (int8 values and scales for a quantized model)."""
        if isinstance(self.params, QuantizedParams):
            return self.params.nbytes
        return int(sum(p.nbytes for p in self.params.values()))

    def init_state(self, batch_size: int = 1) -> InferenceState:
        return InferenceState.init(batch_size, self.config, dtype=self.dtype)

    # ----------------------------------------------------------------- input checks
    def _check_ids(self, input_ids, name="input_ids", ndim=2):
        ids = as_int_array(input_ids, name)
        if ids.ndim != ndim:
            shape = "[B, T]" if ndim == 2 else "[B]"
            raise InputError(f"{name} must have shape {shape}, got shape {list(ids.shape)}"
                             + (" (wrap a single sequence as ids[None, :])" if ids.ndim == 1 and ndim == 2 else ""))
        if ids.size == 0:
            raise InputError(f"{name} is empty (shape {list(ids.shape)}): give at least one token per sequence")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise InputError(f"{name} holds token id {bad}, outside [0, {self.config.vocab_size - 1}] "
                             f"(vocab_size = {self.config.vocab_size}): encode with a tokenizer that fits the model")
        return ids

    def _prepare_state(self, state, batch_size):
        """The plain path's input state: validated once (a state this model's plain path returned is
        read-only and not scanned again, nor copied: thl_step never modifies its input)."""
        if state is None:
            return self.init_state(batch_size)
        if not isinstance(state, InferenceState):
            raise StateError(f"state must be an InferenceState, got {type(state).__name__}")
        state.check(self.config, batch_size)
        if state.__dict__.get("_valid_for") is self.config and state.dtype == self.dtype:
            return state
        return state.copy(dtype=self.dtype)

    def _frozen(self, state: InferenceState) -> InferenceState:
        """A state the plain path returns: read-only (it may share arrays with its input), and marked as
        computed for this config, so the next step neither rescans nor copies it."""
        for arr in state.arrays().values():
            if isinstance(arr, np.ndarray) and arr.ndim:
                arr.flags.writeable = False
        state.__dict__["_valid_for"] = self.config
        return state

    def _check_gumbel(self, gumbel_uniform, B, T):
        if gumbel_uniform is None:
            return None
        U = np.asarray(gumbel_uniform)
        want = (T, B, self.config.num_heads, self.config.memory_slots)
        if U.shape != want:
            raise InputError(f"gumbel_uniform must have shape [T, B, H, J] = {list(want)}, got {list(U.shape)}")
        # written so that NaN fails too (every comparison with NaN is False)
        if not np.issubdtype(U.dtype, np.floating) or not np.all((U >= 0) & (U < 1)):
            raise InputError("gumbel_uniform must hold floats in [0, 1) (no NaN)")
        return U

    # ----------------------------------------------------------------- forward
    def __call__(self, input_ids, state=None, gumbel_uniform=None, path: str = "auto"):
        """Run input_ids [B, T] from ``state`` (zeros if None) → (logits [B, T, V], the state after T steps).

        ``gumbel_uniform`` [T, B, H, J] of uniforms in [0, 1) selects training-mode routing (spec §4.3),
        which runs on the plain path. ``path`` is "auto" (the fast path where it applies), "fast" or
        "plain" (``thl_np.step``, the spec itself); both give the same numbers (``choose_fast``).
        """
        ids = self._check_ids(input_ids)
        B, T = ids.shape
        U = self._check_gumbel(gumbel_uniform, B, T)
        if self._use_plain(path, U):
            state = self._prepare_state(state, B)
            with blas_threads(self.plain_threads(), scipy=False):
                tier_states, state, _ = run_sequence(self.params, self.config, ids, state, U)
                logits, _, _ = output_forward(self.params, tier_states)
            return logits, self._frozen(state)
        decoder = self._decoder(state, B)
        decoder.begin_steps()
        logits = decoder.prompt(ids, logits="all")
        return logits, InferenceState.held_by(decoder)

    forward = __call__

    def prompt(self, input_ids, state=None, path: str = "auto"):
        """Consume input_ids [B, T] (T ≥ 1) from ``state`` → (logits [B, V] of the last position only, the
        state after T steps). As ``__call__`` but the head runs once, on the last position, and no [B, T, ·]
        array is kept: memory stays flat in T (a prefill: generate, eval --passkey, --state-out)."""
        ids = self._check_ids(input_ids)
        B, T = ids.shape
        if T == 0:
            raise InputError("prompt() needs at least one token")
        if self._use_plain(path, None):
            state = self._prepare_state(state, B)
            for t in range(T):
                tier_states, state, _ = thl_step(self.params, self.config, ids[:, t], state)
            logits, _, _ = output_forward(self.params, tier_states)
            return logits, state
        decoder = self._decoder(state, B)
        logits = decoder.prompt(ids, logits="last")
        return logits, InferenceState.held_by(decoder)

    def forward_step(self, token_ids, state=None, path: str = "auto"):
        """One step for token_ids [B] (or [B, 1]) → (logits [B, V], next state).

        ``state`` is not modified, and may be stepped from again (an independent future). On the fast
        path the state returned holds the session that computed it instead of a copy of its arrays, and
        the step from it copies only what one step changes (``thl_np.state``), so a chain
        ``logits, state = model.forward_step(ids, state)`` runs at ``FastDecoder.step``'s speed."""
        ids = as_int_array(token_ids, "token_ids")
        if ids.ndim == 2 and ids.shape[1] == 1:
            ids = ids[:, 0]
        elif ids.ndim == 0:
            ids = ids[None]
        ids = self._check_ids(ids, "token_ids", ndim=1)
        if self._use_plain(path, None):
            state = self._prepare_state(state, ids.shape[0])
            with blas_threads(self.plain_threads(), scipy=False):
                tier_states, state, _ = thl_step(self.params, self.config, ids, state)
                logits, _, _ = output_forward(self.params, tier_states)
            return logits, self._frozen(state)
        decoder = self._decoder(state, ids.shape[0])
        before = decoder.begin_steps()
        logits = decoder.step(ids)
        decoder.stepped_once(before)
        return logits, InferenceState.held_by(decoder)

    def decoder(self, state=None, batch_size: int = 1):
        """A mutable decoding session starting at ``state``: ``thl_np.engines.decoder.FastDecoder``, or, for a
        config whose component variants have no fast kernels, ``thl_np.engines.plain_decoder.PlainDecoder``
        (the same interface on the plain path)."""
        B = batch_size if state is None else state.batch_size
        if not choose_fast(self.config, "auto"):
            from .engines.plain_decoder import PlainDecoder

            if state is not None and not isinstance(state, InferenceState):
                raise StateError(f"state must be an InferenceState, got {type(state).__name__}")
            return PlainDecoder(self, state=state, batch_size=B)
        return self._decoder(state, B, link=False)

    def plain_threads(self) -> int:
        """OpenBLAS's threads for the plain path's products (``thl_np._threads``: one for a model too small
        to gain from more, as the shipped one, and only the cores other processes leave idle), re-chosen
        every second. OpenBLAS's idle workers spin: on a busy machine its default threads cost up to 5x."""
        policy = self.__dict__.get("_plain_policy")
        if policy is None:
            policy = self._plain_policy = StepThreads(self.nbytes)
        return policy.count

    def _use_plain(self, path, gumbel):
        return not choose_fast(self.config, path, gumbel_given=gumbel is not None)

    def _decoder(self, state, batch_size, link: bool = True):
        """A fast session at ``state`` that may be stepped: ``state`` itself is left as it is."""
        from .engines.decoder import FastDecoder

        if state is None:
            return FastDecoder(self, batch_size=batch_size)
        if not isinstance(state, InferenceState):
            raise StateError(f"state must be an InferenceState, got {type(state).__name__}")
        state.check(self.config, batch_size)  # a state this model computed: its batch size only
        held = state.decoder
        if held is not None and held.model is self and held.weights_key == self.weights_key():
            # the session that computed the state, never stepped while the state lives: its successor
            # (usually its spare, brought up to date by copying one step's changes) takes the step
            return held.successor(link=link)
        return FastDecoder(self, state=state, checked=True)

    # ----------------------------------------------------------------- files
    def save_pretrained(self, directory: str, dtype: str | None = None) -> None:
        """Write config.json + model.safetensors (spec §2 names) into ``directory``."""
        from .io.folder import write_model_folder

        config = self.config
        if dtype in ("float32", "float64") and dtype != config.dtype:
            config = config.replace(dtype=dtype)
        tensors, keep = self.params, ()
        if isinstance(tensors, QuantizedParams):  # int8 values and their float32 scales as they are
            tensors = tensors.stored()
            keep = [n for n, v in tensors.items() if v.dtype == np.int8 or n.endswith(SCALE_SUFFIX)]
        write_model_folder(directory, tensors, config,
                           metadata={"format": "thl-np", "format_version": FORMAT_VERSION,
                                     "config": config.to_json()}, dtype=dtype, keep_dtype=keep)

    @classmethod
    def from_pretrained(cls, directory: str, dtype: str | None = None, verify: bool | None = None) -> THLModel:
        """Load a model folder (config.json + model.safetensors). Weights are memory-mapped (pages are read
        when a step first touches them); with ``dtype`` (float32 | float64) they are cast to that compute
        dtype. ``verify`` checks every weight is finite (WeightsError otherwise): by default only for
        files under 64 MB, since it reads every page; pass True to check a large file too. A quantized
        folder (config.json with ``quantization``, docs/QUANTIZATION.md) keeps its int8 values mapped and
        always has its scales and float tensors checked (they are small). ``directory`` may also be
        ``"default"`` (the model shipped in the package) or a training run's output folder (its latest
        checkpoint), as ``thl_np.io.folder.resolve_model_dir`` says."""
        from .io.folder import resolve_model_dir
        from .io.safetensors import check_finite, read_safetensors

        directory = resolve_model_dir(as_path(directory, "from_pretrained's directory"))
        if not os.path.isdir(directory):
            raise WeightsError(f"no model folder at {directory}: it should hold config.json and model.safetensors")
        config = THLConfig.load(directory)
        if config.task is not None:
            from .task_fields import class_name_for

            raise WeightsError(f"{directory} holds a {config.task} model (config.json task), not a language model: "
                               f"load it with thl_np.{class_name_for(config.task)}.from_pretrained")
        path = os.path.join(directory, "model.safetensors")
        if not os.path.exists(path):
            raise WeightsError(f"{path} is missing: a model folder needs model.safetensors next to config.json")
        tensors, _ = read_safetensors(path)
        if config.quantization:  # int8 values stay memory-mapped; scales and float tensors are checked
            from .quant.params import from_file_tensors

            tensors = from_file_tensors(config, tensors, source=path)
        else:
            check_params(config, tensors, source=path)
            if verify or (verify is None and os.path.getsize(path) < VERIFY_BELOW_BYTES):
                check_finite(tensors, source=path)
        compute = dtype or config.dtype
        if compute not in ("float32", "float64"):
            raise InputError(f"dtype {compute!r} is not a compute dtype: use float32 or float64")
        if compute != config.dtype:
            config = config.replace(dtype=compute)
        return cls(config, params=tensors, dtype=compute)

    def __repr__(self):
        c = self.config
        return (f"THLModel({self.num_parameters():,} parameters, V={c.vocab_size}, tiers={c.tier_dims}, "
                f"J={c.memory_slots}, dtype={self.dtype}"
                + (f", {scheme_name(c.quantization)} weights" if c.quantization else "") + ")")


# ---------------------------------------------------------------------------------------------------
# The quantized form
# ---------------------------------------------------------------------------------------------------
def quantize_model(model, scheme: str = "int8"):
    """A quantized copy of a float THLModel: ``scheme`` "int8" (the default scheme), "int8-row" or
    "int8-block32" (``thl_np.quant.scheme.SCHEMES``). The float model is not changed."""
    if isinstance(model.params, QuantizedParams):
        raise InputError(f"the model is already quantized ({scheme_name(model.config.quantization)}): quantize "
                         "its float original instead")
    quantization = scheme_config(scheme)
    params = quantize_params(model.params, quantization, model.dtype)
    return THLModel(model.config.replace(quantization=quantization), params=params, dtype=model.dtype)


def dequantize_model(model):
    """The float model a quantized model stands for (W = s·q for every weight): the whole model in float,
    e.g. to train it further or to save it for a reader without int8 support."""
    if not isinstance(model.params, QuantizedParams):
        return model
    params = {name: model.params[name] for name in model.params}
    return THLModel(model.config.replace(quantization=None), params=params, dtype=model.dtype)


# ---------------------------------------------------------------------------------------------------
# Loss and gradients
# ---------------------------------------------------------------------------------------------------
def value_and_grad(model: THLModel, input_ids, targets, state=None, gumbel_uniform=None, return_state=False,
                   return_state_grad=False, path: str = "auto", loss_weights=None, observe=None,
                   read_targets=None, memory_bptt=None):
    """Loss (spec §5: mean cross-entropy over B·T, plus the load-balance term when its weight is non-zero)
    and the exact gradient of every parameter, by back-propagation through all T steps.

    Returns ``(loss, grads)``; with ``return_state=True`` also the final state (to carry into the next
    chunk of truncated BPTT); with ``return_state_grad=True`` also the gradient w.r.t. the initial state.
    ``path``: "fast" runs ``thl_np.engines.gradient`` (the same numbers with much less work), "plain"
    runs ``thl_np.step.loss_and_grads`` (the spec, step by step); "auto" picks fast unless the config
    chooses a component variant that has no kernels (``choose_fast``).
    ``loss_weights`` [B, T] (optional, >= 0, not all 0): the cross-entropy becomes Σ w·CE / Σ w (e.g. more
    weight on the answer bytes of a retrieval task). ``observe`` (optional): called once with the
    forward's memory choices, a ``thl_np.eval.diagnostics.MemorySteps``, on either path.
    ``read_targets`` (optional, a ``thl_np.components.read_target.ReadTargets``): adds the read-target term, a
    loss on the router's scores at the steps that ask for a value, toward the slots its bytes were written to.
    ``memory_bptt`` N (optional, >= 1): a truncated backward through the bank: its gradient is cut before every
    step that is a multiple of N (``thl_np.step.cut_memory_gradient``; the tiers' gradient still crosses).
    """
    fast = choose_fast(model.config, path, gumbel_given=False)
    ids = model._check_ids(input_ids)
    tg = model._check_ids(targets, name="targets")
    if tg.shape != ids.shape:
        raise InputError(f"targets have shape {list(tg.shape)} but input_ids have {list(ids.shape)}")
    B, T = ids.shape
    U = model._check_gumbel(gumbel_uniform, B, T)
    state0 = model._prepare_state(state, B)
    weights = check_loss_weights(loss_weights, B, T)
    if memory_bptt is not None:
        check("memory_bptt", memory_bptt, InputError)
        memory_bptt = int(memory_bptt)
    if read_targets is not None:
        read_targets = read_targets.checked(B, T)
        if router_score_rule(model.config) is None:
            raise InputError("read_targets needs a built-in router's scores: the plugin router "
                             f"{model.config.components.get('router')!r} has its own")
    if fast:
        from .engines.gradient import loss_and_grads as fast_loss_and_grads  # imported here: it needs Numba

        loss, grads, state_out, d_state = fast_loss_and_grads(model.params, model.config, ids, tg, state0, U,
                                                              weights, observe, read_targets, memory_bptt)
    else:
        with blas_threads(model.plain_threads(), scipy=False):
            loss, grads, state_out, d_state = loss_and_grads(model.params, model.config, ids, tg, state0, U,
                                                             weights, observe, read_targets, memory_bptt)
    return pack_value_and_grad(loss, grads, state_out, d_state, return_state, return_state_grad)


def check_loss_weights(loss_weights, B, T):
    """None, or the per-position loss weights as a float64 [B, T] array (finite, >= 0, not all 0)."""
    if loss_weights is None:
        return None
    w = np.asarray(loss_weights, dtype=np.float64)
    if w.shape != (B, T):
        raise InputError(f"loss_weights must have the shape of the targets [B, T] = {[B, T]}, got {list(w.shape)}")
    if not np.all(np.isfinite(w) & (w >= 0)) or not w.sum() > 0:
        raise InputError("loss_weights must be finite and >= 0 with a positive sum")
    return w


def choose_fast(config, path: str, gumbel_given: bool = False) -> bool:
    """Whether a computation asked for on ``path`` ("auto", "fast" or "plain") runs on the fast path.

    "auto" takes the fast path when its kernels compute every component the config chooses (the spec's,
    unless ``config.components`` names a variant) and, for inference, no Gumbel noise is given; "fast"
    insists (an InputError where it cannot); "plain" is the spec's composition in ``thl_np.step``."""
    if path not in ("auto", "fast", "plain"):
        raise InputError(f"path = {path!r}: use 'auto', 'fast' or 'plain'")
    custom = components_for(config).without_kernels()
    if path == "fast" and custom:
        raise InputError(f"the fast path has no kernels for the component variant(s) {custom}: use path='plain' "
                         "(or 'auto', which picks it)")
    if path == "fast" and gumbel_given:
        raise InputError("training-mode routing (gumbel_uniform) runs on the plain path: use path='auto'")
    return path != "plain" and not custom and not gumbel_given


def pack_value_and_grad(loss, grads, state_out, d_state, return_state, return_state_grad):
    """value_and_grad's return value: (loss, grads[, final state][, initial-state gradient])."""
    out = [float(loss), grads]
    if return_state:
        out.append(state_out)
    if return_state_grad:
        out.append(d_state)
    return tuple(out)


__all__ = ["THLModel", "InferenceState", "value_and_grad", "choose_fast", "thl_step", "run_sequence", "output_forward",
           "head_loss_and_backward", "param_shapes"]
