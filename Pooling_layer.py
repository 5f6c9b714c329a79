"""Max pooling and average pooling over K x K windows with stride S, forward and backward as
THEORY.md derives them (§3.3 and §4.3 max, §4.8 average).

    y[c, h, w, n] = max_{i, j < K} x[c, S*h + i, S*w + j, n]      (batch last, as in Convolutional.py)
    H_out = floor((H - K) / S) + 1, likewise W_out.

Cut out, for each offset (i, j) inside the window, the input values that offset sees at every window
position (windows.offset_slices: slice (i, j) holds x[c, S*h + i, S*w + j, n] for every window
(h, w)), and the maximum is the elementwise maximum of the K*K slices. The maximum passes its input
straight through, so the gradient of each window goes to the slice that held the maximum and nowhere
else; the slices' gradients are then put back where the slices came from (windows.add_offset_slices),
and where windows overlap (S < K) an input that is the maximum of several windows gets all their
gradients, added.

When several positions tie for the maximum the function is not differentiable there, and an
implementation has to pick a rule:
    ties="first": the whole gradient goes to the first maximum in row-major order inside the
                  window (the position jnp.argmax picks); the default;
    ties="all":   every tied position receives the whole gradient (the original code's
                  `x == max` mask), so a tie multiplies the gradient that flows back.
(JAX's autodiff of jnp.max follows a third rule, splitting the gradient equally among the ties;
THEORY.md §4.3 compares them.) All three agree wherever the maximum is unique, which is almost
everywhere for real-valued inputs.

Training computes the same the ways measured fastest on a CPU (fast_layers.FastMaxPool);
tests/test_gradients.py checks the two forms equal.
"""

import jax.numpy as jnp

from windows import add_offset_slices, offset_slices, output_size


class Pooling:
    """What every pooling shares: a K x K window (K = window) moving with stride S, no parameters,
    input (C, H, W, N) -> output (C, H_out, W_out, N)."""

    def __init__(self, window=2, stride=2):
        self.window, self.stride = window, stride

    def output_shape(self, input_shape):
        """(C, H, W) -> (C, H_out, W_out)."""
        C, H, W = input_shape
        return C, output_size(H, self.window, self.stride), output_size(W, self.window, self.stride)

    def init(self, key, dtype=jnp.float32):
        return {}


class MaxPool(Pooling):
    """Max pooling, with the tie rule of the module's docstring."""

    def __init__(self, window=2, stride=2, ties="first"):
        if ties not in ("first", "all"):
            raise ValueError(f"ties must be 'first' or 'all', not {ties!r}")
        super().__init__(window, stride)
        self.ties = ties

    def forward(self, params, x):
        """x (C, H, W, N) -> (y (C, H_out, W_out, N), cache = x): the maximum over the K*K slices."""
        slices = jnp.stack(list(offset_slices(x, self.window, self.stride).values()))  # (K*K, C, H_out, W_out, N)
        return slices.max(axis=0), x

    def backward(self, params, cache, d_y):
        """d_y (C, H_out, W_out, N) -> (d_x (C, H, W, N), {}): each window's dy routed to the slice
        that holds its maximum (by the tie rule), the slices put back onto the input grid."""
        x = cache
        offsets = offset_slices(x, self.window, self.stride)
        slices = jnp.stack(list(offsets.values()))  # (K*K, C, H_out, W_out, N)
        if self.ties == "first":
            # argmax returns the first maximum in the slices' row-major (i, j) order.
            is_max = jnp.arange(len(slices))[:, None, None, None, None] == slices.argmax(axis=0)
        else:
            is_max = slices == slices.max(axis=0)
        d_slices = jnp.where(is_max, d_y, jnp.zeros((), d_y.dtype))
        return add_offset_slices(dict(zip(offsets, d_slices)), x.shape[1:3], self.stride), {}


class AvgPool(Pooling):
    """Average pooling (LeNet-5's subsampling, without its trainable coefficients), THEORY.md §4.8:

        y[c, h, w, n] = (1 / K^2) sum_{i, j < K} x[c, S*h + i, S*w + j, n]
        dx: every slice (i, j) receives dy / K^2, put back where it came from, overlaps adding up.
    """

    def forward(self, params, x):
        """x (C, H, W, N) -> (y (C, H_out, W_out, N), cache = the input's shape)."""
        slices = offset_slices(x, self.window, self.stride)
        return sum(slices.values()) / self.window ** 2, x.shape

    def backward(self, params, cache, d_y):
        """d_y (C, H_out, W_out, N) -> (d_x (C, H, W, N), {}): y is linear in x, each input of a window
        weighing 1 / K^2, so each slice's gradient is d_y / K^2."""
        offsets = [(i, j) for i in range(self.window) for j in range(self.window)]
        share = d_y / self.window ** 2
        return add_offset_slices({offset: share for offset in offsets}, cache[1:3], self.stride), {}
