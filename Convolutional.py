"""2-D convolution (strictly: cross-correlation, as in every deep-learning library), forward and
backward as THEORY.md derives them.

Shape key, used in every comment of this project (THEORY.md §1):
    N batch, C input channels, H x W input size, K kernel size (K x K),
    S stride, P zero padding, D depth (number of filters), H_out x W_out output size,
    H_out = floor((H + 2P - K) / S) + 1, and likewise W_out.
Layout: images and feature maps are stored (C, H, W, N), the batch LAST (THEORY.md §1 says why), so
below indices are written in storage order, x[c, h, w, n]. The filters are F, stored (D, C, K, K).

Forward (THEORY.md §3.1):
    y[d, h, w, n] = b[d] + sum_{c, i, j} F[d, c, i, j] * x_pad[c, S*h + i, S*w + j, n]
Backward (THEORY.md §4.4):
    dF[d, c, i, j] = sum_{h, w, n} dy[d, h, w, n] * x_pad[c, S*h + i, S*w + j, n]
    db[d]          = sum_{h, w, n} dy[d, h, w, n]          (untied biases: sum over n only)
    dx_pad[c, S*h + i, S*w + j, n] += sum_d F[d, c, i, j] * dy[d, h, w, n],  then crop P.

Each sum is one matrix product with the im2col matrix (windows.im2col), which holds every window's
C*K*K inputs as a column: with F_mat the filters as a (D, C*K*K) matrix and dy read as (D,
H_out*W_out*N),
    y = F_mat @ im2col(x),    dF_mat = dy @ im2col(x)^T,    dx = col2im(F_mat^T @ dy).
That is the form below. Training computes the same sums the ways measured fastest on a CPU
(fast_layers.FastConvolutional); tests/test_gradients.py checks the two forms equal.
"""

import math

import jax
import jax.numpy as jnp
from jax import lax

from windows import col2im, im2col, output_size


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
            "lecun" ~ N(0, 1 / (C*K*K)), suited to a following tanh (LeCun et al. 1998);
            "normal" draws them ~ N(0, 1) unscaled, as the original did.
    """

    def __init__(self, input_shape, kernel_size, depth, padding=0, stride=1,
                 tied_biases=True, weight_init="he"):
        if weight_init not in ("he", "lecun", "normal"):
            raise ValueError(f"weight_init must be 'he', 'lecun' or 'normal', not {weight_init!r}")
        self.input_shape = tuple(input_shape)
        self.kernel_size, self.depth = kernel_size, depth
        self.padding, self.stride = padding, stride
        self.tied_biases, self.weight_init = tied_biases, weight_init
        _, H, W = self.input_shape
        if min(self.output_shape(self.input_shape)[1:]) < 1:
            raise ValueError(f"a {kernel_size}x{kernel_size} kernel with padding {padding} "
                             f"does not fit a {H}x{W} input")

    def output_shape(self, input_shape):
        """(C, H, W) -> (D, H_out, W_out)."""
        C, H, W = input_shape
        K, S, P = self.kernel_size, self.stride, self.padding
        return self.depth, output_size(H, K, S, P), output_size(W, K, S, P)

    def init(self, key, dtype=jnp.float32):
        """Returns {"weights": (D, C, K, K), "biases": (D,) or (D, H_out, W_out)}; biases start at 0."""
        C, K = self.input_shape[0], self.kernel_size
        weights = jax.random.normal(key, (self.depth, C, K, K), dtype)
        if self.weight_init != "normal":
            # The barrier: see Dense.init (the same weights whether Network.init is compiled or not).
            gain = 2.0 if self.weight_init == "he" else 1.0
            weights = lax.optimization_barrier(weights) * math.sqrt(gain / (C * K * K))
        bias_shape = (self.depth,) if self.tied_biases else self.output_shape(self.input_shape)
        return {"weights": weights, "biases": jnp.zeros(bias_shape, dtype)}

    def forward(self, params, x):
        """x (C, H, W, N) -> (y (D, H_out, W_out, N), cache = x): y = F_mat @ im2col(x) + b."""
        weights = params["weights"]
        D, (_, H_out, W_out) = weights.shape[0], self.output_shape(x.shape[:3])
        columns = im2col(x, self.kernel_size, self.stride, self.padding)  # (C*K*K, H_out*W_out*N)
        y = (weights.reshape(D, -1) @ columns).reshape(D, H_out, W_out, x.shape[3])
        return self.add_biases(y, params["biases"]), x

    def backward(self, params, cache, d_y):
        """d_y (D, H_out, W_out, N) -> (d_x (C, H, W, N), {"weights": dF (D, C, K, K), "biases": db}).

        The three sums of THEORY.md §4.4, one product each. Under jax.jit, d_x costs nothing when
        nobody uses it (the first layer in training): XLA removes computations whose results are
        never read.
        """
        x, weights = cache, params["weights"]
        K, S, P = self.kernel_size, self.stride, self.padding
        D = weights.shape[0]
        columns = im2col(x, K, S, P)  # recomputed from the cache: x is K*K times smaller
        d_y_rows = d_y.reshape(D, -1)  # (D, H_out*W_out*N), columns in (h, w, n) order as stored
        d_weights = (d_y_rows @ columns.T).reshape(weights.shape)  # the input correlated with dy
        d_x = col2im(weights.reshape(D, -1).T @ d_y_rows, x.shape, K, S, P)  # dy sent back through F
        return d_x, {"weights": d_weights, "biases": self.bias_gradient(d_y)}

    def add_biases(self, y, biases):
        """y (D, H_out, W_out, N) plus the biases, tied (D,) or untied (D, H_out, W_out)."""
        return y + (biases[:, None, None, None] if self.tied_biases else biases[..., None])

    def bias_gradient(self, d_y):
        """db: d_y summed over everything a bias is shared by, (D,) tied or (D, H_out, W_out) untied."""
        return d_y.sum(axis=(1, 2, 3)) if self.tied_biases else d_y.sum(axis=3)
