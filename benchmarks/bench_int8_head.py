"""The int8 output head of the default config (V = 50,257 rows × Σd_k = 2,304 columns, 115.8 MB of int8
values, per-row scales), kernel by kernel, on random weights: the figures behind docs/QUANTIZATION.md's
*Speed* section that `thl-np bench` does not print.

    python benchmarks/bench_int8_head.py [--rounds 3]

1. batch 1: ``gemv_q8`` (row-major, one horizontal sum per row) against ``packed_gemv_q8`` (the k-major
   tiles), in alternating rounds with the float32 GEMV of the same shape, each against the int8 bound
   (the int8 bytes ÷ that round's float32 bandwidth);
2. batch 8: ``packed_linear_q8`` on the whole head (from memory) and on a 512-row slice that stays in
   cache; equal rates of multiply-adds mean the kernel is bound by arithmetic, not by memory.

Figures are printed, not asserted; run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thl_np.fast import int8, linalg  # noqa: E402
from thl_np.quant.scheme import quantize_matrix  # noqa: E402

V, C = 50257, 2304


def packed(q, s):
    """The k-major copy ``Q8Matrix`` builds for the head."""
    L = linalg.lanes(np.float32)
    T = -(-q.shape[0] // L)
    Qp = np.empty((T, q.shape[1], L), np.int8)
    Sp = np.empty((T, s.shape[1], L), np.float32)
    linalg.pack_rows(q, L, Qp)
    linalg.pack_rows(s, L, Sp)
    return Qp, Sp


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="Alternating rounds of the batch-1 kernels.")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    W = rng.standard_normal((V, C), dtype=np.float32)
    q, s = quantize_matrix(W, None)
    Qp, Sp = packed(q, s)
    x = rng.standard_normal((1, C)).astype(np.float32)
    b = np.zeros(V, np.float32)
    row_out, packed_out, float_out = (np.empty((1, V), np.float32), np.empty((1, Qp.shape[0] * Qp.shape[2]),
                                      np.float32), np.empty(V, np.float32))
    int8.gemv_q8(q, s, C, b, x[0], row_out[0])
    int8.packed_gemv_q8(Qp, Sp, x, packed_out)
    linalg.gemv(W, b, x[0], float_out)
    err = np.abs(row_out[0] - packed_out[0, :V]).max() / np.abs(row_out).max()
    print(f"head {V} x {C}: {q.nbytes / 1e6:.1f} MB int8, {W.nbytes / 1e6:.1f} MB float32; "
          f"packed vs row-major relative difference {err:.1e}")
    for r in range(args.rounds):
        row = median_time(lambda: int8.gemv_q8(q, s, C, b, x[0], row_out[0]), 20)
        pk = median_time(lambda: int8.packed_gemv_q8(Qp, Sp, x, packed_out), 20)
        fl = median_time(lambda: linalg.gemv(W, b, x[0], float_out), 20)
        bound = q.nbytes / (W.nbytes / fl)
        print(f"round {r + 1} batch 1: gemv_q8 {row * 1e3:.2f} ms, packed_gemv_q8 {pk * 1e3:.2f} ms; float32 GEMV "
              f"{fl * 1e3:.2f} ms ({W.nbytes / fl / 1e9:.1f} GB/s), int8 bound {bound * 1e3:.2f} ms: "
              f"row-major {bound / row:.2f}, packed {bound / pk:.2f} of it")
    h = rng.standard_normal((int8.PACK_ROWS, C)).astype(np.float32)
    for rows, reps in ((V, 10), (512, 2000)):
        Qs, Ss = (Qp, Sp) if rows == V else packed(q[:rows], s[:rows])
        out = np.empty((int8.PACK_ROWS, Qs.shape[0] * Qs.shape[2]), np.float32)
        int8.packed_linear_q8(Qs, Ss, C, h, out)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(reps):
                int8.packed_linear_q8(Qs, Ss, C, h, out)
            times.append((time.perf_counter() - t0) / reps)
        t = min(times)
        macs = Qs.shape[0] * Qs.shape[2] * C * int8.PACK_ROWS
        print(f"batch 8, {rows:6d} rows ({Qs.nbytes / 1e6:6.1f} MB): {t * 1e3:7.3f} ms a call, "
              f"{macs / t / 1e9:6.1f} G multiply-adds/s, {Qs.nbytes / t / 1e9:5.1f} GB/s of int8")


if __name__ == "__main__":
    main()
