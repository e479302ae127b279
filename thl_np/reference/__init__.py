"""Reference vectors for ports: generating them (``thl-np golden``) and checking a port against them
(``thl-np check-port``). docs/PORTING.md is the porter's guide to the files.

One concern per file:

- ``cases.py``: the cases, as tables (whole sequences, one case per component step, the training run).
- ``draw.py``: random weights, mid-run states and token sequences from a seeded generator.
- ``component_vectors.py``: each component case: its inputs, its forward and backward in both dtypes,
  and a finite-difference check of its gradients.
- ``margins.py``: every discrete choice of a run with its distance from a tie (``MARGINS``).
- ``gradcheck.py``: finite-difference checks of a sequence case's gradients.
- ``generate.py``: drawing, running, checking and writing every case, and the manifest.
- ``files.py``: npz and JSON written byte-identically; a case's output table.
- ``check.py``: the stand-alone checker (NumPy only): compare a port's results with the reference.

A port's RESULTS_DIR mirrors the reference folder: ``RESULTS_DIR/<case>/outputs_<dtype>.npz`` with the
same keys; ``compare_results`` compares the two tensor by tensor and ``format_report`` prints the listing.
"""
from __future__ import annotations

from .cases import SEQUENCE_CASES, TRAIN_CASE, SequenceCase, component_cases
from .check import (
    DTYPES,
    TOLERANCES,
    CheckReport,
    TensorCheck,
    compare_arrays,
    compare_results,
    default_reference_dir,
    format_report,
    load_manifest,
    load_npz,
    select_cases,
)
from .files import save_npz, write_json
from .generate import generate
from .margins import MARGINS, trace_sequence

__all__ = ["TOLERANCES", "MARGINS", "DTYPES", "SEQUENCE_CASES", "TRAIN_CASE", "SequenceCase", "component_cases",
           "generate", "trace_sequence", "compare_results", "compare_arrays", "format_report", "CheckReport",
           "TensorCheck", "load_manifest", "select_cases", "default_reference_dir", "save_npz", "load_npz",
           "write_json"]
