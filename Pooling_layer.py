"""Max pooling over P x P windows with stride S (THEORY.md §3.3 forward, §4.3 backward).

    y[n, c, h, w] = max_{i, j < P} x[n, c, S*h + i, S*w + j]
    H_out = floor((H - P) / S) + 1, likewise W_out.

The maximum passes its input straight through, so the gradient of each window goes to the position
that held the maximum and nowhere else. When several positions tie for the maximum the function is
not differentiable there, and an implementation has to pick a rule:
    ties="first": the whole gradient goes to the first maximum in row-major order inside the
                  window (what jnp.argmax picks, and what jax.grad of a max-reduction does too);
    ties="all":   every tied position receives the whole gradient (the original code's
                  `x == max` mask), so a tie multiplies the gradient that flows back.
With overlapping windows (S < P) an input position can be the maximum of several windows; its
gradients from all of them add up.
"""

import jax
import jax.numpy as jnp

from Convolutional import add_windows, extract_windows, output_size


class MaxPool:
    """Max pooling; no parameters. Input (N, C, H, W) -> output (N, C, H_out, W_out)."""

    def __init__(self, pool_size=2, stride=2, ties="first"):
        if ties not in ("first", "all"):
            raise ValueError(f"ties must be 'first' or 'all', not {ties!r}")
        self.pool_size, self.stride, self.ties = pool_size, stride, ties

    def output_shape(self, input_shape):
        """(C, H, W) -> (C, H_out, W_out)."""
        C, H, W = input_shape
        return (C, output_size(H, self.pool_size, self.stride),
                output_size(W, self.pool_size, self.stride))

    def init(self, key, dtype=jnp.float32):
        return {}

    def _flat_windows(self, x):
        """x (N, C, H, W) -> windows (N, C, P*P, H_out, W_out), window positions in row-major order."""
        windows = extract_windows(x, self.pool_size, self.stride)
        N, C, P, _, H_out, W_out = windows.shape
        return windows.reshape(N, C, P * P, H_out, W_out)

    def forward(self, params, x):
        """x (N, C, H, W) -> (y (N, C, H_out, W_out), cache = x)."""
        return self._flat_windows(x).max(axis=2), x

    def backward(self, params, cache, d_y):
        """d_y (N, C, H_out, W_out) -> (d_x (N, C, H, W), {})."""
        x = cache
        windows = self._flat_windows(x)
        if self.ties == "all":
            routes = windows == windows.max(axis=2, keepdims=True)
        else:
            routes = jax.nn.one_hot(windows.argmax(axis=2), windows.shape[2], axis=2, dtype=bool)
        d_windows = jnp.where(routes, d_y[:, :, None], jnp.zeros((), d_y.dtype))
        N, C, _, H_out, W_out = windows.shape
        d_windows = d_windows.reshape(N, C, self.pool_size, self.pool_size, H_out, W_out)
        return add_windows(d_windows, x.shape[2:], self.stride), {}
