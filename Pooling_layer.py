"""Max pooling over K x K windows with stride S (THEORY.md §3.3 forward, §4.3 backward).

    y[c, h, w, n] = max_{i, j < K} x[c, S*h + i, S*w + j, n]      (batch last, as in Convolutional.py)
    H_out = floor((H - K) / S) + 1, likewise W_out.

The maximum passes its input straight through, so the gradient of each window goes to the position
that held the maximum and nowhere else. When several positions tie for the maximum the function is
not differentiable there, and an implementation has to pick a rule:
    ties="first": the whole gradient goes to the first maximum in row-major order inside the
                  window (the position jnp.argmax picks); the default;
    ties="all":   every tied position receives the whole gradient (the original code's
                  `x == max` mask), so a tie multiplies the gradient that flows back.
(JAX's autodiff of jnp.max follows a third rule, splitting the gradient equally among the ties;
THEORY.md §4.3 compares them.) All three agree wherever the maximum is unique, which is almost
everywhere for real-valued inputs. With overlapping windows (S < K) an input position can be the
maximum of several windows; its gradients from all of them add up.

The forward is XLA's own windowed reduction (lax.reduce_window with max). The backward works,
like the convolution's, on the K*K offset slices of the input (windows.offset_slices): slice (i, j)
holds x[c, S*h + i, S*w + j, n] for every window (h, w), so the slices that equal y are where each
window's maximum sits. The backward routes dy into those slices, then puts the slices back onto the
input grid. When windows tile the input (S == K, the usual case) every input position belongs to at
most one slice, so putting them back is a plain interleaving (stack and reshape); otherwise
overlapping contributions are added up (windows.add_offset_slices).
"""

import jax.numpy as jnp
from jax import lax

from windows import add_offset_slices, offset_slices, output_size


class MaxPool:
    """Max pooling; no parameters. Input (C, H, W, N) -> output (C, H_out, W_out, N)."""

    def __init__(self, window=2, stride=2, ties="first"):
        if ties not in ("first", "all"):
            raise ValueError(f"ties must be 'first' or 'all', not {ties!r}")
        self.window, self.stride, self.ties = window, stride, ties

    def output_shape(self, input_shape):
        """(C, H, W) -> (C, H_out, W_out)."""
        C, H, W = input_shape
        return C, output_size(H, self.window, self.stride), output_size(W, self.window, self.stride)

    def init(self, key, dtype=jnp.float32):
        return {}

    def forward(self, params, x):
        """x (C, H, W, N) -> (y (C, H_out, W_out, N), cache = x).

        The same maximum could be written as an elementwise maximum of the K*K offset slices, but
        XLA's CPU compiler would then recompute it inside every later operation that reads y (the
        next layer, and the comparisons of the backward). A reduction it computes once
        (PERFORMANCE.md).
        """
        K, S = self.window, self.stride
        return lax.reduce_window(x, -jnp.inf, lax.max, (1, K, K, 1), (1, S, S, 1), "VALID"), x

    def backward(self, params, cache, d_y):
        """d_y (C, H_out, W_out, N) -> (d_x (C, H, W, N), {})."""
        x = cache
        # y is recomputed rather than cached: under jit XLA shares it with the forward pass.
        y, _ = self.forward(params, x)
        x_slices = offset_slices(x, self.window, self.stride)
        if self.ties == "first":
            # The index of the first slice, in row-major offset order, that holds the maximum. A
            # reduction again, so XLA computes it once; a chain of elementwise tests, slice after
            # slice, would be recomputed for every slice (PERFORMANCE.md).
            no_winner = len(x_slices)
            winner = jnp.stack([jnp.where(x_slice == y, k, no_winner)
                                for k, x_slice in enumerate(x_slices.values())]).min(axis=0)
        zero = jnp.zeros((), d_y.dtype)
        d_slices = {}
        for k, (offset, x_slice) in enumerate(x_slices.items()):
            is_max = winner == k if self.ties == "first" else x_slice == y
            d_slices[offset] = jnp.where(is_max, d_y, zero)
        if self.stride != self.window:
            return add_offset_slices(d_slices, x.shape[1:3], self.stride), {}
        # Tiling windows: d_x[c, K*h + i, K*w + j, n] = d_slices[i, j][c, h, w, n]. Stacking i on axis
        # 2 and j on axis 4 gives (C, H_out, K, W_out, K, N), which is that layout once reshaped.
        C, H, W, N = x.shape
        K = self.window
        H_out, W_out = y.shape[1:3]
        d_tiles = jnp.stack([jnp.stack([d_slices[i, j] for j in range(K)], axis=3) for i in range(K)], axis=2)
        d_x = d_tiles.reshape(C, H_out * K, W_out * K, N)
        # Rows and columns that no window covered (the floor in H_out) get zero gradient.
        return jnp.pad(d_x, ((0, 0), (0, H - H_out * K), (0, W - W_out * K), (0, 0))), {}
