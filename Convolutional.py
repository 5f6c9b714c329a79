"""2-D convolution (strictly: cross-correlation, as in every deep-learning library).

Shape key, used in every comment of this project (THEORY.md §1):
    N batch, C input channels, H x W input size, K kernel size (K x K),
    S stride, P zero padding, D depth (number of filters), H_out x W_out output size,
    H_out = floor((H + 2P - K) / S) + 1, and likewise W_out.
Layout: images and feature maps are stored (C, H, W, N), the batch LAST (THEORY.md §1 says why), so
below indices are written in storage order, x[c, h, w, n]. The filters are F, stored (D, C, K, K).

Forward (THEORY.md §3.1):
    y[d, h, w, n] = b[d] + sum_{c, i, j} F[d, c, i, j] * x_pad[c, S*h + i, S*w + j, n]

Backward (THEORY.md §4.4, derived there step by step):
    dF[d, c, i, j] = sum_{h, w, n} dy[d, h, w, n] * x_pad[c, S*h + i, S*w + j, n]
    db[d]          = sum_{h, w, n} dy[d, h, w, n]          (untied biases: sum over n only)
    dx_pad[c, S*h + i, S*w + j, n] += sum_d F[d, c, i, j] * dy[d, h, w, n],  then crop P.

All three are sums over the K*K kernel offsets (i, j). For one offset, x_pad[c, S*h + i, S*w + j, n]
over all (h, w) is a single strided slice of the input, shaped like the output
(windows.offset_slices). So dF[:, :, i, j] contracts that slice with dy: the input correlated with
dy. And dx puts dy, mixed by F[:, :, i, j]^T, back where that slice came from: dy sent back through
the weights. The offsets are a short Python loop unrolled at trace time; there is no loop over
samples, channels or pixels. Which of several equal ways of computing each sum is used is a matter
of speed (and, for one sample, of rounding); PERFORMANCE.md has the measurements behind each choice.
"""

import math

import jax
import jax.numpy as jnp
from jax import lax

from windows import offset_slices, output_size, spread

# For a batch, the weight gradient is one matrix product over all pixels and samples
# (Convolutional._weight_gradient). Where it is the im2col product (one input channel, at most 3x3)
# it is computed in blocks of whole output rows, at most this many columns each (at least one row),
# and the blocks' products summed: each block's operands, for the default network 9 + 5 matrix rows
# of 6,656 floats (0.37 MB), then stay in a core's cache while the product reads them.
DW_BLOCK_COLUMNS = 8192

# Elsewhere the forward and the weight gradient are banded products (Convolutional._band), taken
# over blocks of this many output rows (the last block may be shorter): measured fastest for
# LeNet-5's first convolution, and no different for its second (PERFORMANCE.md).
BAND_ROWS = 4


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
        if self.weight_init == "he":
            # The barrier: see Dense.init (the same weights whether Network.init is compiled or not).
            weights = lax.optimization_barrier(weights) * math.sqrt(2.0 / (C * K * K))
        bias_shape = (self.depth,) if self.tied_biases else self.output_shape(self.input_shape)
        return {"weights": weights, "biases": jnp.zeros(bias_shape, dtype)}

    def forward(self, params, x):
        """x (C, H, W, N) -> (y (D, H_out, W_out, N), cache = x).

        Two ways of computing the same sum, each where it was measured faster (PERFORMANCE.md):
        one input channel and at most 3x3: XLA's own convolution. Written out as K*K offset slices
            (as the backward is), XLA's CPU compiler would recompute that sum inside every later
            operation that reads y. It also rounds as the original's per-sample run needs to be
            reproduced to every printed digit (README.md, "The original run").
        otherwise: banded products over the input's width windows, block by block of BAND_ROWS
            output rows (_band, THEORY.md §3.1): the block's output rows (d, h) are a banded matrix
            of the filters times the width windows of the input rows the block reads, which lie
            next to each other in memory. XLA's CPU convolution with the batch last is slow with
            several input channels, and with one channel and a 5x5 window (LeNet-5's first layer).
        tests/test_layers.py checks this forward against a naive loop over every index.
        """
        K, S, P = self.kernel_size, self.stride, self.padding
        weights = params["weights"]
        D, C = weights.shape[:2]
        if C == 1 and K <= 3:
            y = lax.conv_general_dilated(x, weights, (S, S), ((P, P), (P, P)),
                                         dimension_numbers=("CHWN", "OIHW", "CHWN"))
        else:
            N = x.shape[3]
            W_out = self.output_shape(x.shape[:3])[2]
            y = jnp.concatenate([(self._band(weights, rows) @ windows).reshape(D, rows, W_out, N)
                                 for (_, rows), windows in self._window_blocks(x)], axis=1)
        biases = params["biases"]
        return y + (biases[:, None, None, None] if self.tied_biases else biases[..., None]), x

    def backward(self, params, cache, d_y):
        """d_y (D, H_out, W_out, N) -> (d_x (C, H, W, N), {"weights": dF (D, C, K, K), "biases": db}).

        The three sums of THEORY.md §4.4, one line each. Under jax.jit, d_x costs nothing when
        nobody uses it (the first layer in training): XLA removes computations whose results are
        never read.
        """
        x = cache
        d_weights = self._weight_gradient(x, d_y)  # the input correlated with dy
        d_biases = d_y.sum(axis=(1, 2, 3)) if self.tied_biases else d_y.sum(axis=3)
        d_x = self._input_gradient(params["weights"], d_y, x.shape)  # dy sent back through F
        return d_x, {"weights": d_weights, "biases": d_biases}

    def _weight_gradient(self, x, d_y):
        """x (C, H, W, N), d_y (D, H_out, W_out, N) -> dF (D, C, K, K),
        dF[d, c, i, j] = sum_{h, w, n} dy[d, h, w, n] * x_pad[c, S*h + i, S*w + j, n].

        Read dy as a (D, H_out*W_out*N) matrix, columns in (h, w, n) order, which is how it is
        stored. The slice at offset (i, j) read as a (C, H_out*W_out*N) matrix in the same column
        order, dF[:, :, i, j] = dy @ slice^T. Stacking all K*K slices as the rows of one matrix, row
        c*K*K + i*K + j holding channel c at offset (i, j) (the im2col matrix, C*K*K rows), gives all of
        dF in one product, dF = dy @ im2col^T, whose (D, C*K*K) result is dF in (D, C, K, K) order.
        Three ways of taking these sums, by measurement (PERFORMANCE.md): for one sample, the K*K
        products; for a batch with one input channel and at most 3x3, the im2col product, taken the
        other way round, dF^T = im2col @ dy^T, which XLA's CPU matrix product computes faster in that
        order; otherwise, the transpose of the forward's banded products (THEORY.md §4.4).
        """
        K, S, P = self.kernel_size, self.stride, self.padding
        D, H_out, W_out, N = d_y.shape
        C = x.shape[0]
        if N == 1:
            # THE ORIGINAL'S ROUNDING. One sample takes the K*K products one offset at a time, the
            # order of additions in which the original's per-sample run is reproduced to every
            # printed digit (README.md). The slices come in row-major (i, j) order, so stacking the
            # products on a last axis gives (D, C, K*K).
            x_pad = jnp.pad(x, ((0, 0), (P, P), (P, P), (0, 0)))
            d_y_rows = d_y.reshape(D, -1)
            products = [d_y_rows @ x_slice.reshape(C, -1).T for x_slice in offset_slices(x_pad, K, S).values()]
            return jnp.stack(products, axis=-1).reshape(D, C, K, K)
        if C == 1 and K <= 3:
            # The one im2col product, summed over blocks of output rows so that each block's
            # operands stay in cache (DW_BLOCK_COLUMNS).
            blocks = [patches @ d_y[:, top:top + rows].reshape(D, -1).T
                      for (top, rows), patches in zip(self._row_blocks(H_out, W_out, N), self._patch_blocks(x))]
            return sum(blocks[1:], blocks[0]).T.reshape(D, C, K, K)
        # Block by block, the products of dy's rows (d, h) with the width windows' rows (r, c, j):
        # products[d, h, r, c, j] = sum_{w, n} dy[d, top + h, w, n] * x_pad[c, S*top + r, S*w + j, n].
        # Output row h reads input rows r = S*h + i, so dF[d, c, i, j] gathers the entries on the
        # band, products[d, h, S*h + i, c, j], summed over h and the blocks: the transpose of _band.
        d_weights = []
        for (top, rows), windows in self._window_blocks(x):
            products = (d_y[:, top:top + rows].reshape(D * rows, -1) @ windows.T).reshape(D, rows, -1, C, K)
            d_weights += [products[:, h, S * h:S * h + K] for h in range(rows)]  # each (D, K_i, C, K_j)
        return sum(d_weights[1:], d_weights[0]).transpose(0, 2, 1, 3)

    @staticmethod
    def _row_blocks(H_out, W_out, N):
        """The blocks of whole output rows, [(top, rows), ...], at most DW_BLOCK_COLUMNS columns each
        (at least one row); the last block may be shorter."""
        return Convolutional._blocks_of(H_out, max(1, DW_BLOCK_COLUMNS // (W_out * N)))

    @staticmethod
    def _blocks_of(H_out, rows):
        """H_out output rows cut into blocks of `rows` rows, [(top, rows), ...]; the last may be shorter."""
        return [(top, min(rows, H_out - top)) for top in range(0, H_out, rows)]

    def _patch_blocks(self, x):
        """x (1, H, W, N) -> the im2col matrix of a one-channel input, at most 3x3, in blocks of
        output rows (_row_blocks), each (K*K, rows*W_out*N),
        patches[i*K + j, (h, w, n)] = x_pad[0, S*h + i, S*w + j, n].
        Built by XLA's conv_general_dilated_patches (a convolution with 0/1 weights), then cut into
        blocks: for these shapes faster in training than stacking the offset slices (PERFORMANCE.md).
        """
        K, S, P = self.kernel_size, self.stride, self.padding
        _, H_out, W_out = self.output_shape(x.shape[:3])
        patches = lax.conv_general_dilated_patches(x, (K, K), (S, S), ((P, P), (P, P)),
                                                   dimension_numbers=("CHWN", "OIHW", "CHWN"))
        blocks = self._row_blocks(H_out, W_out, x.shape[3])
        return [patches[:, top:top + rows].reshape(K * K, -1) for top, rows in blocks]

    def _window_blocks(self, x):
        """x (C, H, W, N) -> [((top, rows), windows), ...] for the blocks of BAND_ROWS output rows
        (the last may be shorter), windows (R*C*K, W_out*N) with R = S*(rows - 1) + K:
        windows[(r, c, j), (w, n)] = x_pad[c, S*top + r, S*w + j, n], the width windows of the R
        input rows the block's output rows read.

        The width windows of all input rows are built once, rows in (r, c, j) order, so that each
        block's are a run of consecutive rows of that matrix: K copies of the input, where the
        im2col matrix holds K*K.
        """
        C, _, _, N = x.shape
        K, S, P = self.kernel_size, self.stride, self.padding
        _, H_out, W_out = self.output_shape(x.shape[:3])
        x_pad = jnp.pad(x, ((0, 0), (P, P), (P, P), (0, 0)))
        # by_column[r, c, j, w, n] = x_pad[c, r, S*w + j, n]: the K column offsets' slices stacked.
        by_column = jnp.stack([x_pad[:, :, j:j + S * (W_out - 1) + 1:S] for j in range(K)], axis=2)
        by_column = by_column.transpose(1, 0, 2, 3, 4).reshape(-1, W_out * N)
        blocks = []
        for top, rows in self._blocks_of(H_out, BAND_ROWS):
            first, count = S * top * C * K, (S * (rows - 1) + K) * C * K
            blocks.append(((top, rows), by_column[first:first + count]))
        return blocks

    def _band(self, weights, rows):
        """weights (D, C, K, K) -> the banded matrix B (D*rows, R*C*K), R = S*(rows - 1) + K, with
        B[(d, h), (r, c, j)] = F[d, c, r - S*h, j] where 0 <= r - S*h < K, and 0 elsewhere: output
        row h of a block reads the block's input rows S*h, ..., S*h + K - 1 (THEORY.md §3.1), so
        B @ windows (_window_blocks) is the block's output, rows (d, h), columns (w, n)."""
        D, C, K, _ = weights.shape
        S = self.stride
        R = S * (rows - 1) + K
        by_row = weights.transpose(0, 2, 1, 3)  # (D, K_i, C, K_j)
        band = jnp.stack([jnp.pad(by_row, ((0, 0), (S * h, R - S * h - K), (0, 0), (0, 0))) for h in range(rows)],
                         axis=1)  # (D, rows, R, C, K)
        return band.reshape(D * rows, R * C * K)

    def _input_gradient(self, weights, d_y, x_shape):
        """weights (D, C, K, K), d_y (D, H_out, W_out, N) -> d_x of shape x_shape (C, H, W, N):
        dx_pad[c, S*h + i, S*w + j, n] += sum_d F[d, c, i, j] * dy[d, h, w, n], then the padding
        cropped.

        The sum over the K*K offsets taken one axis at a time (THEORY.md §4.4, "dx in matrix form").
        Along the width: for each column offset j, dy with its columns spread to j, j+S, ...
        (windows.spread), the K of them stacked as (D*K) rows. One product with F arranged as
        (C*K, D*K), rows (c, i) and columns (d, j), sums over d and j at once. Along the height: the
        block of row offset i spread to rows i, i+S, ..., and the K blocks added.
        """
        _, H, W, _ = x_shape
        K, S, P = self.kernel_size, self.stride, self.padding
        D, C = weights.shape[:2]
        _, H_out, _, N = d_y.shape
        columns = jnp.stack([spread(d_y, 2, j, W + 2 * P, S) for j in range(K)], axis=1)  # (D, K, H_out, W+2P, N)
        mixed = weights.transpose(1, 2, 0, 3).reshape(C * K, D * K) @ columns.reshape(D * K, -1)
        mixed = mixed.reshape(C, K, H_out, W + 2 * P, N)
        d_x_pad = sum(spread(mixed[:, i], 1, i, H + 2 * P, S) for i in range(K))
        return d_x_pad[:, P:P + H, P:P + W, :]
