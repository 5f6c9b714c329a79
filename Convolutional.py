"""2-D convolution (strictly: cross-correlation, as in every deep-learning library).

Shape key, used in every comment of this project (THEORY.md §1):
    N batch, C input channels, H x W input size, K kernel size (K x K),
    S stride, P zero padding, D depth (number of filters), H_out x W_out output size,
    H_out = floor((H + 2P - K) / S) + 1, and likewise W_out.

Forward (THEORY.md §3.1):
    y[n, d, h, w] = b[d] + sum_{c, i, j} W[d, c, i, j] * x_pad[n, c, S*h + i, S*w + j]

Backward (THEORY.md §4.4, derived there step by step):
    dW[d, c, i, j] = sum_{n, h, w} dy[n, d, h, w] * x_pad[n, c, S*h + i, S*w + j]
    db[d]          = sum_{n, h, w} dy[n, d, h, w]          (untied biases: sum over n only)
    dx_pad[n, c, S*h + i, S*w + j] += sum_d W[d, c, i, j] * dy[n, d, h, w],  then crop P.

The trick that makes all three cheap is the "window view" (im2col by slicing): one strided slice
of the input per kernel offset (i, j). The forward is then one contraction of the windows with the
kernel, dW is one contraction of the windows with dy, and dx puts each offset's share back where its
slice came from. The K*K offsets are a short Python loop unrolled at trace time; there is no loop
over samples, channels or pixels.
"""

import math

import jax
import jax.numpy as jnp
from jax import lax


def output_size(size, window, stride, padding=0):
    """Number of window positions along one axis: floor((size + 2*padding - window) / stride) + 1."""
    return (size + 2 * padding - window) // stride + 1


def extract_windows(x, window, stride):
    """Every window x window patch of x, laid out per kernel offset.

    x:       (N, C, H, W)
    returns: (N, C, window, window, H_out, W_out) with
             windows[n, c, i, j, h, w] = x[n, c, stride*h + i, stride*w + j]
    Rows and columns past the last full window are dropped (the floor in output_size).
    """
    N, C, H, W = x.shape
    H_out, W_out = output_size(H, window, stride), output_size(W, window, stride)
    rows = []
    for i in range(window):
        row = []
        for j in range(window):
            # Offset (i, j) of every window at once: rows i, i+S, ..., i+S*(H_out-1), same for columns.
            row.append(lax.slice(x, (0, 0, i, j),
                                 (N, C, i + stride * (H_out - 1) + 1, j + stride * (W_out - 1) + 1),
                                 (1, 1, stride, stride)))
        rows.append(jnp.stack(row, axis=2))
    return jnp.stack(rows, axis=2)


def add_windows(d_windows, input_hw, stride):
    """The transpose of extract_windows: sum every window's gradient back onto the input grid.

    d_windows: (N, C, window, window, H_out, W_out), a gradient with respect to extract_windows' output
    input_hw:  (H, W) of the input that the windows were cut from
    returns:   (N, C, H, W) with d_x[n, c, p, q] = sum of d_windows[n, c, i, j, h, w] over all
               (i, j, h, w) with stride*h + i = p and stride*w + j = q.
    Where windows overlap (stride < window) their contributions add up, as the chain rule demands.
    """
    _, _, window, _, H_out, W_out = d_windows.shape
    H, W = input_hw
    d_x = None
    for i in range(window):
        for j in range(window):
            # lax.pad's interior padding (stride - 1) spreads the H_out x W_out values out to the
            # positions i, i+S, ... they were sliced from; edge padding fills the rest of the grid.
            spread = lax.pad(d_windows[:, :, i, j], jnp.zeros((), d_windows.dtype),
                             ((0, 0, 0), (0, 0, 0),
                              (i, H - i - stride * (H_out - 1) - 1, stride - 1),
                              (j, W - j - stride * (W_out - 1) - 1, stride - 1)))
            d_x = spread if d_x is None else d_x + spread
    return d_x


class Convolutional:
    """Conv2D with D filters of size K x K over C input channels, then a bias.

    Args:
        input_shape: (C, H, W) of one sample.
        kernel_size: K.
        depth: D, the number of filters.
        padding: P, zeros added on every side.
        stride: S.
        tied_biases: True gives one bias per filter, biases (D,); False gives the original's
            untied biases, one per filter and output position, biases (D, H_out, W_out).
        weight_init: "he" draws weights ~ N(0, 2 / (C*K*K)), suited to a following ReLU;
            "normal" draws them ~ N(0, 1) unscaled, as the original did.
    """

    def __init__(self, input_shape, kernel_size, depth, padding=0, stride=1,
                 tied_biases=True, weight_init="he"):
        if weight_init not in ("he", "normal"):
            raise ValueError(f"weight_init must be 'he' or 'normal', not {weight_init!r}")
        C, H, W = input_shape
        self.input_shape = (C, H, W)
        self.kernel_size, self.depth = kernel_size, depth
        self.padding, self.stride = padding, stride
        self.tied_biases, self.weight_init = tied_biases, weight_init
        self.output_shape = (depth, output_size(H, kernel_size, stride, padding),
                             output_size(W, kernel_size, stride, padding))
        if min(self.output_shape[1:]) < 1:
            raise ValueError(f"a {kernel_size}x{kernel_size} kernel with padding {padding} "
                             f"does not fit a {H}x{W} input")

    def init(self, key, dtype=jnp.float32):
        """Returns {"weights": (D, C, K, K), "biases": (D,) or (D, H_out, W_out)}; biases start at 0."""
        C, K = self.input_shape[0], self.kernel_size
        weights = jax.random.normal(key, (self.depth, C, K, K), dtype)
        if self.weight_init == "he":
            weights = weights * math.sqrt(2.0 / (C * K * K))
        bias_shape = (self.depth,) if self.tied_biases else self.output_shape
        return {"weights": weights, "biases": jnp.zeros(bias_shape, dtype)}

    def _padded_windows(self, x):
        """x (N, C, H, W) -> windows of the zero-padded input, (N, C, K, K, H_out, W_out)."""
        P = self.padding
        x_pad = jnp.pad(x, ((0, 0), (0, 0), (P, P), (P, P)))
        return extract_windows(x_pad, self.kernel_size, self.stride)

    def forward(self, params, x):
        """x (N, C, H, W) -> (y (N, D, H_out, W_out), cache = x)."""
        windows = self._padded_windows(x)
        y = jnp.einsum("ncijhw,dcij->ndhw", windows, params["weights"])
        biases = params["biases"]
        y = y + (biases[:, None, None] if self.tied_biases else biases)
        return y, x

    def backward(self, params, cache, d_y):
        """d_y (N, D, H_out, W_out) -> (d_x (N, C, H, W), {"weights": d_weights, "biases": d_biases}).

        Under jax.jit, d_x costs nothing when nobody uses it (the first layer in training):
        XLA removes computations whose results are never read.
        """
        x = cache
        H, W = x.shape[2:]
        P = self.padding
        # Recomputing the windows here is free under jit: XLA shares them with the forward's.
        windows = self._padded_windows(x)
        d_weights = jnp.einsum("ncijhw,ndhw->dcij", windows, d_y)
        d_biases = d_y.sum(axis=(0, 2, 3)) if self.tied_biases else d_y.sum(axis=0)
        d_windows = jnp.einsum("dcij,ndhw->ncijhw", params["weights"], d_y)
        d_x_pad = add_windows(d_windows, (H + 2 * P, W + 2 * P), self.stride)
        d_x = d_x_pad[:, :, P:P + H, P:P + W]
        return d_x, {"weights": d_weights, "biases": d_biases}
