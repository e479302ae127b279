"""A small graph builder over ``onnx.helper``: every lowering (one module per spec component) adds its nodes
through it, so a component's lowering reads as its equations and a test can build a graph of one component.

Names: a lowering asks for fresh value names (``op`` returns them); graph inputs, outputs and the weights
keep the names a runtime sees (``state.memory``, ``router.W_q.weight``: the spec §2 names).

Weights come from the model's parameters: a float array becomes a float32 initializer; an int8 tensor of
the project's row-scaled scheme (``thl_np.quant``) becomes its int8 values and float32 row scales, read
through ``DequantizeLinear`` (axis 0, zero point 0), which computes float32(q)·s: the number the plain
path computes (``thl_np.quant.scheme.dequantize``).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import InputError

#: The opset every export uses: DequantizeLinear per axis (13), ReduceSum with axes as an input (13) and
#: the reduce ops with an ``axes`` attribute (below 18); onnxruntime (desktop, mobile, web) runs it.
OPSET = 17

FLOAT, INT64, BOOL, DOUBLE = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL, TensorProto.DOUBLE


class GraphBuilder:
    """Nodes, initializers, inputs and outputs of one graph. ``params`` maps spec §2 names to float arrays
    or to ``QuantizedTensor`` values (a ``QuantizedParams``' ``tensor(name)``)."""

    def __init__(self, params=None, tensor=None):
        self.nodes, self.initializers, self.inputs, self.outputs = [], [], [], []
        self._count = 0
        self._consts: dict = {}
        self._weights: dict = {}
        self.params = params
        # how to read the stored form of a weight: a QuantizedParams' tensor(), else the dict itself
        self._tensor = tensor or (lambda name: params[name])

    # ---------------------------------------------------------------- names and nodes
    def fresh(self, hint: str = "v") -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def op(self, op_type: str, *inputs, outputs: int = 1, hint: str | None = None, **attrs):
        """Add one node; returns its output name (or a list of names when ``outputs`` > 1)."""
        names = [self.fresh(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, [i if i is not None else "" for i in inputs], names,
                                           **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value, dtype=np.float32) -> str:
        """An initializer holding ``value`` (a scalar or an array) in ``dtype``, shared between equal uses."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self.fresh("c")
            self.initializers.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def f32(self, x: float) -> str:
        """A float32 scalar constant: how NumPy applies a Python float to a float32 array."""
        return self.const(np.float32(x))

    def i64(self, value) -> str:
        return self.const(value, np.int64)

    # ---------------------------------------------------------------- weights
    def weight(self, name: str) -> str:
        """The float32 matrix or vector ``name`` (spec §2), dequantized in the graph when stored as int8."""
        if name in self._weights:
            return self._weights[name]
        stored = self._tensor(name)
        if hasattr(stored, "q"):  # a QuantizedTensor: int8 values + one float32 scale per row
            _check_row_scaled(stored, name)
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(stored.q), name))
            self.initializers.append(numpy_helper.from_array(
                np.ascontiguousarray(stored.scale[:, 0], dtype=np.float32), name + "_scale"))
            out = self.op("DequantizeLinear", name, name + "_scale", hint=name.replace(".", "_") + "_f32",
                          axis=0)
        else:
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(stored, dtype=np.float32), name))
            out = name
        self._weights[name] = out
        return out

    def weight_t(self, name: str) -> str:
        """W^T of a [out, in] weight, for ``x @ W.T`` as a MatMul (onnxruntime folds the transpose once)."""
        key = name + "^T"
        if key not in self._weights:
            self._weights[key] = self.op("Transpose", self.weight(name), perm=[1, 0])
        return self._weights[key]

    def rows(self, name: str, ids: str) -> str:
        """weight[ids] ([B] → [B, C]), dequantizing only the rows read for an int8 table."""
        stored = self._tensor(name)
        if hasattr(stored, "q"):
            _check_row_scaled(stored, name)
            if name not in self._weights:
                self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(stored.q), name))
                self.initializers.append(numpy_helper.from_array(
                    np.ascontiguousarray(stored.scale[:, 0], dtype=np.float32), name + "_scale"))
                self._weights[name] = name
            q = self.op("Cast", self.op("Gather", name, ids, axis=0), to=FLOAT)
            s = self.op("Gather", name + "_scale", ids, axis=0)
            return self.op("Mul", q, self.op("Unsqueeze", s, self.i64([1])))
        return self.op("Gather", self.weight(name), ids, axis=0)

    def linear(self, x: str, w: str, b: str | None = None) -> str:
        """x W^T (+ b) as NumPy computes it: the product, then the bias added."""
        y = self.op("MatMul", x, self.weight_t(w))
        return y if b is None else self.op("Add", y, self.weight(b))

    # ---------------------------------------------------------------- graph
    def add_input(self, name: str, elem_type, shape) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def add_output(self, name: str, value: str, elem_type, shape) -> str:
        self.nodes.append(helper.make_node("Identity", [value], [name]))
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def model(self, graph_name: str = "thl_step", metadata: dict | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="thl-np")
        model.ir_version = min(model.ir_version, 8)  # onnxruntime builds of the last years read IR 8
        if metadata:
            helper.set_model_props(model, {k: str(v) for k, v in metadata.items()})
        return model


def _check_row_scaled(stored, name: str) -> None:
    if stored.scale.ndim != 2 or stored.scale.shape[1] != 1:
        raise InputError(f"{name}: only the int8-row scheme (one scale per row) has an ONNX lowering; "
                         f"this tensor has scales of shape {list(stored.scale.shape)}")


# ---------------------------------------------------------------- small shared pieces
def sigmoid(g: GraphBuilder, x: str) -> str:
    """σ(x) as ``thl_np.components.primitives.sigmoid`` computes it: 1/(1+e^{-x}) for x ≥ 0 and
    e^{x}/(1+e^{x}) below, from one e^{-|x|} (neither branch overflows)."""
    e = g.op("Exp", g.op("Neg", g.op("Abs", x)))
    one = g.f32(1.0)
    den = g.op("Add", one, e)
    return g.op("Where", g.op("GreaterOrEqual", x, g.f32(0.0)), g.op("Div", one, den), g.op("Div", e, den))


def sum_last(g: GraphBuilder, x: str, keepdims: int = 0) -> str:
    return g.op("ReduceSum", x, g.i64([-1]), keepdims=keepdims)


def bank_transposed(g: GraphBuilder, memory: str, slots: int, width: int) -> str:
    """memory [B, J, d_m] → [B, d_m, J], as a Gather with constant indices rather than a Transpose: onnxruntime's
    transpose optimizer would push a Transpose through the products and sums of ``slot_dots`` and turn their
    leading-axis sums back into last-axis sums (which break ties, see ``slot_dots``); it leaves a Gather be."""
    order = np.arange(slots * width, dtype=np.int64).reshape(slots, width).T.reshape(-1)   # (k, j) → j·d_m + k
    flat = g.op("Reshape", memory, g.i64([0, slots * width]))
    return g.op("Reshape", g.op("Gather", flat, g.const(order, np.int64), axis=1), g.i64([0, width, slots]))


def slot_dots(g: GraphBuilder, memory_t: str, v: str) -> str:
    """m_j·v_x for every slot j: memory_t [B, d_m, J] (``bank_transposed``) and v [B, X, d_m] → [B, X, J].

    Equal rows must give equal numbers: the tie rule ranks slots by them. onnxruntime's GEMMs and its
    ReduceSum over the last axis do not promise that (a row's result depends on where it lies: the kernels
    treat the last rows or columns of a block apart), but a ReduceSum over a leading axis adds the d_m
    terms of every slot in the same order, elementwise across slots."""
    prod = g.op("Mul", g.op("Unsqueeze", v, g.i64([3])), g.op("Unsqueeze", memory_t, g.i64([1])))   # [B, X, d_m, J]
    return g.op("ReduceSum", prod, g.i64([2]), keepdims=0)


def slot_sq_norms(g: GraphBuilder, memory_t: str) -> str:
    """‖m_j‖² for every slot [B, J], equal for equal rows (see ``slot_dots``)."""
    return g.op("ReduceSum", g.op("Mul", memory_t, memory_t), g.i64([1]), keepdims=0)


def norm_last(g: GraphBuilder, x: str) -> str:
    """√(Σ x²) over the last axis, as the components write it ((x·x).sum, then sqrt)."""
    return g.op("Sqrt", sum_last(g, g.op("Mul", x, x)))
