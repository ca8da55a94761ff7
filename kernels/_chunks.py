"""The reduction walk shared by the conv and depthwise weight-gradient kernels.

The reduction runs over the N*P output rows (n, p), each of Q columns q. A chunk is one
sample n, ``RB = BLOCK_L // BI`` rows p and ``BI`` columns q (``BI`` a power of two, so
the in-chunk decomposition is a shift), and a split owns a contiguous range of rows. The
chunks meeting a split's rows are one flat loop ``for j in range(j_start, j_end)`` (the
software pipeliner only pipelines the innermost loop).
"""

import triton
import triton.language as tl


@triton.jit
def _split_chunks(split, R_PER_SPLIT, R, P, Q, RB: tl.constexpr, BI: tl.constexpr):
    """(r_start, r_end, n_pb, n_qb, j_start, j_end) of this split's rows and chunks."""
    r_start = split * R_PER_SPLIT
    r_end = tl.minimum(R, r_start + R_PER_SPLIT)
    n_pb = (P + RB - 1) // RB
    n_qb = (Q + BI - 1) // BI
    n_first = r_start // P
    n_last = (r_end - 1) // P
    j_start = (n_first * n_pb + (r_start - n_first * P) // RB) * n_qb
    j_end = (n_last * n_pb + (r_end - 1 - n_last * P) // RB + 1) * n_qb
    return r_start, r_end, n_pb, n_qb, j_start, j_end


@triton.jit
def _chunk_rows(j, n_pb, n_qb, i_row, i_col, P, Q, r_start, r_end, RB: tl.constexpr,
                BI: tl.constexpr):
    """(n, p, q, p_ok, q_ok) of chunk ``j``: p and q per chunk element; p_ok keeps the
    rows inside this split and the map, q_ok the columns inside the map."""
    qb = j % n_qb
    rest = j // n_qb
    pb = rest % n_pb
    n = rest // n_pb
    p = pb * RB + i_row
    q = qb * BI + i_col
    row = n * P + p
    p_ok = (p < P) & (row >= r_start) & (row < r_end)
    return n, p, q, p_ok, q < Q
