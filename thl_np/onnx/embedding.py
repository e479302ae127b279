"""ONNX lowering of spec §4.1 (``thl_np.components.embedding``): e = embedding.weight[x_t]."""
from __future__ import annotations

from .builder import GraphBuilder


def lower_embedding(g: GraphBuilder, token_ids: str, table: str = "embedding.weight") -> str:
    """token_ids [B] int64 → e [B, d_e] (an int8 table dequantizes only the B rows read)."""
    return g.rows(table, token_ids)
