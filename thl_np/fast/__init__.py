"""Numba kernels of the fast paths (``thl_np.engines.decoder.FastDecoder`` and
``thl_np.engines.gradient.loss_and_grads``), one file per spec component, each kernel naming the
plain function of ``thl_np.components`` it mirrors and tested alone against it (tests/fast/):

    embedding.py         §4.1      scatter_rows                          embedding_backward
    local_attention.py   §4.2      softmax_terms (both paths)            the softmax of local_attention_forward
                                   local_attend, local_forward           local_attention_forward
                                   local_backward                        local_attention_backward
    router.py            §4.3-4.4  pick_slots (both paths)               slot_scores + top-κ + softmax
                                   capacity_walk (both paths)            apply_slot_capacity
                                   read_meta (both paths)                read_meta_forward
                                   route, route_parallel, route_forward  router_forward + read_meta_forward
                                   route_backward                        router_backward + read_meta_backward
    gru.py               §4.5      gru_reset + gru_update, gru_forward   gru_forward
                                   gru_backward                          gru_backward
    writer.py            §4.6-4.7  clip_write (both paths)               writer_forward's clip
                                   choose_write (both paths)             writer_forward (targets, g, j*)
                                   decay_and_write (both paths)          memory_write_forward
                                   write, write_parallel, write_forward  writer_forward + memory_write_forward
                                   write_backward                        memory_write_backward + writer_backward
    primitives.py        the per-row dot, the sigmoid, top-κ with the lower-index tie rule, [s^0; s^{K-1}] read
                         from the tier states (and its gradient added back): defined once
    linalg.py            products with few rows (GEMV, the small-batch tile, per-head products, the packing and
                         the packed tiles' LLVM IR, each for float and int8 weights) and the ``linear``
                         dispatcher: linear algebra, no THL math
    int8.py              what only int8 weights need (thl_np.quant's parameters on the fast path): the
                         transposed per-head product, dequantized rows, the packed int8 kernels, Q8Matrix

Each kernel mirrors one component: the step's wiring (the context r + ℓ of Tier 0 and its gradient's way
back to r and ℓ, the step's output gradient) is the composition's, in ``thl_np.engines.decoder`` and
``thl_np.engines.gradient``.

Conventions shared by the kernels:

- The memory bank is stored divided by a running scalar: forward ``true = scale · mem`` (the decay
  ``M ← γM`` is ``scale ← γ·scale``); backward ``dM = c · D`` (``dM ← γ·dM`` is ``c ← γ·c``). The squared
  norms of the stored rows are kept beside the bank (``primitives.row_norms2``).
- Scores are ``m_j · q_mem_h`` with ``q_mem_h = W_k,h^T q_h`` (``thl_np.components.router.slot_scores``), and
  every per-slot dot product over the bank (scores, the writer's affinities, squared norms) runs the same
  code for every row, so identical rows give identical numbers and the spec's tie rule (lower index first)
  holds exactly. Every ranking is ``primitives.top_k_desc``.
- Training kernels take time-major tape arrays, ``X[i]`` is step i's record ([T, B, ...]), and the step
  index ``i``, so a step costs a few calls and no slicing in Python. Their small dense products run
  through ``np.dot`` on C-contiguous operands (BLAS); everything else is loops.
- Numba caches each kernel by the file it is defined in, and does not notice when a helper from another
  file changes: after editing ``primitives.py`` (or any kernel another file calls), delete
  ``thl_np/fast/__pycache__``.
"""
from . import embedding, gru, int8, linalg, local_attention, primitives, router, writer

__all__ = ["embedding", "gru", "int8", "linalg", "local_attention", "primitives", "router", "writer"]
