"""The Triton kernels of :mod:`optimizers.fused` (imported on first use: importing Triton costs ~0.2-0.6 s)."""

import triton
import triton.language as tl

__all__ = ["layer_kernel", "block_sum_kernel", "rows_sum_kernel"]


@triton.jit
def layer_kernel(x_ptr, w_ptr, table_ptr, y_ptr, part_ptr, proj_ptr, out_ptr, nrows_ptr, blk_seg_ptr,
                 blk_start_ptr, blk_stop_ptr, N, T, C_IN, K_PAD: tl.constexpr, C_OUT: tl.constexpr,
                 BLOCK_N: tl.constexpr, STORE_Y: tl.constexpr, PROJECT: tl.constexpr, N_PROJ: tl.constexpr,
                 PRECISION: tl.constexpr):
    """One fused layer on one block of ``BLOCK_N`` elements inside one segment (see :mod:`optimizers.fused`).

    ``N_PROJ == 1``: the read-out ``proj . y`` (one row for all segments) goes to ``out`` (N,). ``N_PROJ > 1``:
    each segment has its own ``(N_PROJ, C_OUT)`` projection in ``proj`` and its first ``nrows[segment]`` rows of
    ``proj @ y`` go to ``out`` (N_PROJ, N), channels first."""
    pid = tl.program_id(0)
    seg = tl.load(blk_seg_ptr + pid)
    start = tl.load(blk_start_ptr + pid)
    stop = tl.load(blk_stop_ptr + pid)
    cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
    inside = cols < stop
    k = tl.arange(0, K_PAD)
    o = tl.arange(0, C_OUT)
    x = tl.load(x_ptr + k[:, None].to(tl.int64) * N + cols[None, :], mask=(k[:, None] < C_IN) & inside[None, :],
                other=0.0)
    w = tl.load(w_ptr + o[:, None] * C_IN + k[None, :], mask=k[None, :] < C_IN, other=0.0)
    y = tl.dot(w, x, input_precision=PRECISION)
    c = tl.load(table_ptr + o * T + seg)
    y = tl.maximum(y + c[:, None], 0.0)
    y = tl.where(inside[None, :], y, 0.0)
    if STORE_Y:
        tl.store(y_ptr + o[:, None].to(tl.int64) * N + cols[None, :], y, mask=inside[None, :])
    tl.store(part_ptr + pid * C_OUT + o, tl.sum(y, axis=1))
    if PROJECT:
        if N_PROJ == 1:
            p = tl.load(proj_ptr + o)
            tl.store(out_ptr + cols, tl.sum(y * p[:, None], axis=0), mask=inside)
        else:
            r = tl.arange(0, N_PROJ)
            p = tl.load(proj_ptr + seg * (N_PROJ * C_OUT) + r[:, None] * C_OUT + o[None, :])
            q = tl.dot(p, y, input_precision=PRECISION)
            rows = tl.load(nrows_ptr + seg)
            tl.store(out_ptr + r[:, None].to(tl.int64) * N + cols[None, :], q,
                     mask=(r[:, None] < rows) & inside[None, :])


@triton.jit
def block_sum_kernel(x_ptr, part_ptr, blk_start_ptr, blk_stop_ptr, N, C_IN, K_PAD: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """Column sums of one block of channels-first ``x``."""
    pid = tl.program_id(0)
    start = tl.load(blk_start_ptr + pid)
    stop = tl.load(blk_stop_ptr + pid)
    cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
    k = tl.arange(0, K_PAD)
    x = tl.load(x_ptr + k[:, None].to(tl.int64) * N + cols[None, :],
                mask=(k[:, None] < C_IN) & (cols < stop)[None, :], other=0.0)
    tl.store(part_ptr + pid * K_PAD + k, tl.sum(x, axis=1))


@triton.jit
def rows_sum_kernel(in_ptr, out_ptr, row_start_ptr, row_stop_ptr, C: tl.constexpr, CHUNK: tl.constexpr):
    """One output row: the sum of input rows ``[start, stop)`` (at most ``CHUNK``), one level of the tree."""
    pid = tl.program_id(0)
    start = tl.load(row_start_ptr + pid)
    stop = tl.load(row_stop_ptr + pid)
    rows = start + tl.arange(0, CHUNK)
    o = tl.arange(0, C)
    v = tl.load(in_ptr + rows[:, None] * C + o[None, :], mask=(rows < stop)[:, None], other=0.0)
    tl.store(out_ptr + pid * C + o, tl.sum(v, axis=0))
