"""Sliding windows, shared by the convolution and the max-pooling (THEORY.md §2, §3.3, §4.3, §4.4).

Both layers look at their input through a K x K window that moves with stride S. Cut out, for each
offset (i, j) inside the window, the input values that offset sees at every window position, and a
window operation becomes an operation on K*K arrays shaped like the output: the convolution
weights and sums them, the pooling takes their maximum. Going backward, each offset's gradient is
put back where its slice came from (the transpose of the cutting), and where windows overlap the
contributions add up.

Arrays are (C, H, W, N), the batch last (THEORY.md §1).
"""

import jax.numpy as jnp
from jax import lax


def output_size(size, window, stride, padding=0):
    """Number of window positions along one axis: floor((size + 2*padding - window) / stride) + 1."""
    return (size + 2 * padding - window) // stride + 1


def offset_slices(x, window, stride):
    """The input as seen from each offset (i, j) of a square window, `window` positions on a side,
    sliding with `stride`.

    x:       (C, H, W, N)
    returns: a dict {(i, j): slice (C, H_out, W_out, N)} for 0 <= i, j < window, in row-major order
             of (i, j), with slice[c, h, w, n] = x[c, stride*h + i, stride*w + j, n]
    Rows and columns past the last full window are dropped (the floor in output_size).
    """
    C, H, W, N = x.shape
    H_out, W_out = output_size(H, window, stride), output_size(W, window, stride)
    return {(i, j): lax.slice(x, (0, i, j, 0),
                              (C, i + stride * (H_out - 1) + 1, j + stride * (W_out - 1) + 1, N),
                              (1, stride, stride, 1))
            for i in range(window) for j in range(window)}


def spread(x, axis, offset, size, stride):
    """The transpose, along one axis, of taking every stride-th entry from offset: x's entries along
    `axis` placed at positions offset, offset + stride, ... of an axis of `size` positions, zeros
    elsewhere. lax.pad does it: interior padding puts stride - 1 zeros between neighbours, edge
    padding fills the rest."""
    count = x.shape[axis]
    widths = [(0, 0, 0)] * x.ndim
    widths[axis] = (offset, size - offset - stride * (count - 1) - 1, stride - 1)
    return lax.pad(x, jnp.zeros((), x.dtype), widths)


def add_offset_slices(d_slices, input_hw, stride):
    """The transpose of offset_slices: sums each slice's gradient back where the slice came from.

    d_slices: {(i, j): (C, H_out, W_out, N)}, gradients with respect to offset_slices' outputs
    input_hw: (H, W) of the input that was sliced
    returns:  (C, H, W, N), d_x[c, p, q, n] = sum of d_slices[(i, j)][c, h, w, n] over all
              (i, j, h, w) with stride*h + i = p and stride*w + j = q; positions no window read
              (the last (H - window) mod stride rows and columns) get 0.
    Where windows overlap (stride < window) their contributions add up, as the chain rule demands.
    """
    H, W = input_hw
    return sum(spread(spread(d_slice, 1, i, H, stride), 2, j, W, stride) for (i, j), d_slice in d_slices.items())


def im2col(x, window, stride, padding=0):
    """The im2col matrix: every window's inputs as one column (THEORY.md §4.4).

    x:       (C, H, W, N)
    returns: (C*K*K, H_out*W_out*N) with K = window, row c*K*K + i*K + j holding channel c at offset
             (i, j) of every window, columns in (h, w, n) order:
             columns[c*K*K + i*K + j, (h, w, n)] = x_pad[c, stride*h + i, stride*w + j, n]
    """
    x_pad = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    slices = jnp.stack(list(offset_slices(x_pad, window, stride).values()), axis=1)  # (C, K*K, H_out, W_out, N)
    return slices.reshape(x.shape[0] * window * window, -1)


def col2im(d_columns, x_shape, window, stride, padding=0):
    """The transpose of im2col: adds each column's entries back onto the input pixels they were
    copied from, then crops the padding (THEORY.md §4.4, "dx in matrix form: col2im").

    d_columns: (C*K*K, H_out*W_out*N), gradients with respect to im2col's output
    x_shape:   (C, H, W, N) of the input
    returns:   (C, H, W, N)
    """
    C, H, W, N = x_shape
    K, P = window, padding
    H_out, W_out = output_size(H, K, stride, P), output_size(W, K, stride, P)
    by_offset = d_columns.reshape(C, K, K, H_out, W_out, N)
    d_slices = {(i, j): by_offset[:, i, j] for i in range(K) for j in range(K)}
    d_x_pad = add_offset_slices(d_slices, (H + 2 * P, W + 2 * P), stride)
    return d_x_pad[:, P:P + H, P:P + W, :]
