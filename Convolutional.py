"""2-D convolution (strictly: cross-correlation, as in every deep-learning library).

Shape key, used in every comment of this project (THEORY.md §1):
    N batch, C input channels, H x W input size, K kernel size (K x K),
    S stride, P zero padding, D depth (number of filters), H_out x W_out output size,
    H_out = floor((H + 2P - K) / S) + 1, and likewise W_out.
Layout: images and feature maps are (C, H, W, N), the batch LAST (THEORY.md §1). Every elementwise
pass, slice and window then runs along N contiguous samples, which vector instructions process
several at a time; with the batch first, XLA's CPU code walks 26-wide rows instead (measured: a
60,000-image epoch at batch 128 took 0.74 s with (N, C, H, W), 0.61 s with (C, H, W, N)). Indices
below are written in storage order, x[c, h, w, n].

Forward (THEORY.md §3.1):
    y[d, h, w, n] = b[d] + sum_{c, i, j} W[d, c, i, j] * x_pad[c, S*h + i, S*w + j, n]

Backward (THEORY.md §4.4, derived there step by step):
    dW[d, c, i, j] = sum_{n, h, w} dy[d, h, w, n] * x_pad[c, S*h + i, S*w + j, n]
    db[d]          = sum_{n, h, w} dy[d, h, w, n]          (untied biases: sum over n only)
    dx_pad[c, S*h + i, S*w + j, n] += sum_d W[d, c, i, j] * dy[d, h, w, n],  then crop P.

All three are sums over the K*K kernel offsets (i, j). For one offset, x_pad[c, S*h + i, S*w + j, n]
over all (h, w) is a single strided slice of the input, shaped like the output. So dW[:, :, i, j]
contracts one slice with dy, and dx puts dy mixed by W[:, :, i, j]^T back where that slice came from.
The offsets are a short Python loop unrolled at trace time; there is no loop over samples, channels
or pixels, and XLA turns the slices, products and sums into a few passes over memory. For a batch,
dW stacks all the slices into one im2col matrix instead and needs a single matrix product (see
_batch_weight_gradient); the forward as such a product was measured 1.25x to 1.5x slower than
XLA's convolution, to which it is handed (see forward).
"""

import math

import jax
import jax.numpy as jnp
from jax import lax

# For a batch, the weight gradient is one matrix product, dy (D, H_out*W_out*N) times the im2col
# patches (C*K*K, H_out*W_out*N) transposed (Convolutional._batch_weight_gradient). It is computed in
# blocks of whole output rows, about this many columns each, and the blocks' products summed: each
# block's operands, 14 rows of about 8192 floats (0.5 MB) for the default network, then stay in a
# core's cache while the product reads them. Measured, 60,000-image epochs: at batch 128, 0.49 s
# unblocked and 0.42 s blocked; at batch 256, 0.72 s and 0.49 s.
DW_BLOCK_COLUMNS = 8192


def output_size(size, window, stride, padding=0):
    """Number of window positions along one axis: floor((size + 2*padding - window) / stride) + 1."""
    return (size + 2 * padding - window) // stride + 1


def offset_slices(x, window, stride):
    """The input as seen by each offset of a window x window kernel sliding with `stride`.

    x:       (C, H, W, N)
    returns: a dict {(i, j): slice (C, H_out, W_out, N)} for 0 <= i, j < window, with
             slice[c, h, w, n] = x[c, stride*h + i, stride*w + j, n]
    Rows and columns past the last full window are dropped (the floor in output_size).
    """
    C, H, W, N = x.shape
    H_out, W_out = output_size(H, window, stride), output_size(W, window, stride)
    return {(i, j): lax.slice(x, (0, i, j, 0),
                              (C, i + stride * (H_out - 1) + 1, j + stride * (W_out - 1) + 1, N),
                              (1, stride, stride, 1))
            for i in range(window) for j in range(window)}


def add_offset_slices(d_slices, input_hw, stride):
    """The transpose of offset_slices: sums each slice's gradient back where the slice came from.

    d_slices: {(i, j): (C, H_out, W_out, N)}, gradients with respect to offset_slices' outputs
    input_hw: (H, W) of the input that was sliced
    returns:  (C, H, W, N), d_x[c, p, q, n] = sum of d_slices[(i, j)][c, h, w, n] over all
              (i, j, h, w) with stride*h + i = p and stride*w + j = q.
    Where windows overlap (stride < window) their contributions add up, as the chain rule demands.
    """
    H, W = input_hw
    d_x = 0
    for (i, j), d_slice in d_slices.items():
        H_out, W_out = d_slice.shape[1:3]
        # Interior padding (stride - 1 zeros between neighbours) spreads the H_out x W_out values
        # to rows i, i+S, ... and columns j, j+S, ...; edge padding fills the rest of the H x W grid.
        d_x = d_x + lax.pad(d_slice, jnp.zeros((), d_slice.dtype),
                            ((0, 0, 0),
                             (i, H - i - stride * (H_out - 1) - 1, stride - 1),
                             (j, W - j - stride * (W_out - 1) - 1, stride - 1),
                             (0, 0, 0)))
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

    def _input_slices(self, x):
        """x (C, H, W, N) -> {(i, j): (C, H_out, W_out, N)}, the slices of the zero-padded input."""
        P = self.padding
        x_pad = jnp.pad(x, ((0, 0), (P, P), (P, P), (0, 0)))
        return offset_slices(x_pad, self.kernel_size, self.stride)

    def _batch_weight_gradient(self, x, d_y):
        """x (C, H, W, N), d_y (D, H_out, W_out, N) -> dW as (D, C*K*K), by im2col.

        patches[c*K*K + i*K + j, h, w, n] = x_pad[c, S*h + i, S*w + j, n] holds every offset slice in
        one array (XLA computes it as a convolution with 0/1 weights, an exact copy), and
        dW = dy (D, H_out*W_out*N) @ patches (C*K*K, H_out*W_out*N)^T contracts pixels and samples in
        one product, summed over blocks of output rows (DW_BLOCK_COLUMNS). Measured against nine
        matrix-vector products, one per slice, in 60,000-image epochs: 0.57 -> 0.42 s at batch 128,
        0.62 -> 0.49 s at batch 256, 0.63 -> 0.59 s at batch 64, 0.68 -> 0.69 s at batch 32. Those
        nine products read dy nine times, and XLA copies each slice out with a slow per-element loop.
        """
        K, S, P = self.kernel_size, self.stride, self.padding
        patches = lax.conv_general_dilated_patches(x, (K, K), (S, S), ((P, P), (P, P)),
                                                   dimension_numbers=("CHWN", "OIHW", "CHWN"))
        D, H_out, W_out, N = d_y.shape
        rows = math.ceil(H_out / math.ceil(H_out * W_out * N / DW_BLOCK_COLUMNS))
        products = [d_y[:, top:top + rows].reshape(D, -1)
                    @ patches[:, top:top + rows].reshape(len(patches), -1).T
                    for top in range(0, H_out, rows)]
        return sum(products[1:], products[0])

    def forward(self, params, x):
        """x (C, H, W, N) -> (y (D, H_out, W_out, N), cache = x).

        This is XLA's own convolution, computing the sum above. Written out as K*K offset slices
        (as the backward is), the same sum is slower: XLA's CPU compiler fuses that cheap-looking
        elementwise sum into every later operation that reads y and recomputes it there, three
        times per training step, while its convolution is computed once (measured while building
        this, with the batch first: 2.25 s against 1.32 s for a 60,000-image epoch at batch 128).
        It also rounds differently, and the original's per-sample run, which amplifies last-bit
        differences, is reproduced to every printed digit only with this one (README.md, "The
        original run").
        tests/test_layers.py checks this forward against a naive loop over every index.
        """
        P, S = self.padding, self.stride
        y = lax.conv_general_dilated(x, params["weights"], (S, S), ((P, P), (P, P)),
                                     dimension_numbers=("CHWN", "OIHW", "CHWN"))
        biases = params["biases"]
        return y + (biases[:, None, None, None] if self.tied_biases else biases[..., None]), x

    def backward(self, params, cache, d_y):
        """d_y (D, H_out, W_out, N) -> (d_x (C, H, W, N), {"weights": d_weights, "biases": d_biases}).

        Under jax.jit, d_x costs nothing when nobody uses it (the first layer in training):
        XLA removes computations whose results are never read.
        """
        x = cache
        H, W = x.shape[1:3]
        P, weights = self.padding, params["weights"]
        # The cache holds only x; the slices are cut from it here.
        x_slices = self._input_slices(x)
        D, C = weights.shape[:2]
        if x.shape[-1] == 1:
            # One sample: dW[:, :, i, j] is dy as a (D, H_out*W_out) matrix times the slice at offset
            # (i, j) as a (C, H_out*W_out) matrix, transposed; for one channel, nine matrix-vector
            # products. This is the arithmetic with which the original's per-sample run is reproduced
            # to every printed digit (README.md); the batch path below adds the same terms in another
            # order. x_slices runs over the offsets in row-major order, so stacking them last is (D, C, K*K).
            d_y_rows = d_y.reshape(D, -1)
            d_weights = jnp.stack([d_y_rows @ x_slice.reshape(C, -1).T for x_slice in x_slices.values()],
                                  axis=-1)
        else:
            d_weights = self._batch_weight_gradient(x, d_y)
        d_weights = d_weights.reshape(weights.shape)
        d_biases = d_y.sum(axis=(1, 2, 3)) if self.tied_biases else d_y.sum(axis=3)
        d_slices = {(i, j): jnp.einsum("dhwn,dc->chwn", d_y, weights[:, :, i, j]) for (i, j) in x_slices}
        d_x_pad = add_offset_slices(d_slices, (H + 2 * P, W + 2 * P), self.stride)
        d_x = d_x_pad[:, P:P + H, P:P + W, :]
        return d_x, {"weights": d_weights, "biases": d_biases}
