"""The convolution and the max-pooling as training runs them: the same sums as Convolutional.py and
Pooling_layer.py derive, arranged the ways measured fastest on a CPU, and for one sample in the
order of additions that reproduces the original run to every printed digit. Each method names the
PERFORMANCE.md section with its measurements; tests/test_gradients.py checks every path equal to
the plain form over random shapes.

    FastConvolutional.forward   XLA's convolution (one input channel, at most 3x3), else
                                banded products over the input's width windows
    FastConvolutional.backward  dF: per-offset products (one sample: the original's rounding),
                                the im2col product in blocks of rows (one channel, at most 3x3),
                                else the banded products transposed; dx: one product per axis
    FastMaxPool                 XLA's windowed reduction; the first maximum by one reduction;
                                tiling windows put back by interleaving
"""

import jax.numpy as jnp
from jax import lax

from Convolutional import Convolutional
from Pooling_layer import MaxPool
from windows import add_offset_slices, offset_slices, spread

# The im2col weight gradient (FastConvolutional._weight_gradient_in_row_blocks) is computed in
# blocks of whole output rows, at most this many columns each (at least one row), and the blocks'
# products summed: each block's operands, for the default network 9 + 5 matrix rows of 6,656 floats
# (0.37 MB), then stay in a core's cache while the product reads them (PERFORMANCE.md, "What made
# it faster").
DW_BLOCK_COLUMNS = 8192

# The banded products (FastConvolutional._band) are taken over blocks of this many output rows (the
# last block may be shorter): measured fastest for LeNet-5's first convolution, and no different
# for its second (PERFORMANCE.md, "What made it faster").
BAND_ROWS = 4


class FastConvolutional(Convolutional):
    """Convolutional, computed the ways measured fastest; the same parameters and results."""

    def forward(self, params, x):
        """x (C, H, W, N) -> (y (D, H_out, W_out, N), cache = x).

        One input channel and at most 3x3: XLA's own convolution. Written out as K*K offset slices,
            XLA's CPU compiler would recompute the sum inside every later operation that reads y.
            It also rounds as the original's per-sample run needs to be reproduced to every printed
            digit (README.md, "The original run").
        Otherwise: banded products over the input's width windows, block by block of BAND_ROWS
            output rows (_band, THEORY.md §3.1, "The sum as banded matrix products"). XLA's CPU
            convolution with the batch last is slow with several input channels, and with one
            channel and a 5x5 window (LeNet-5's first layer).
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
        return self.add_biases(y, params["biases"]), x

    def backward(self, params, cache, d_y):
        """d_y (D, H_out, W_out, N) -> (d_x (C, H, W, N), {"weights": dF (D, C, K, K), "biases": db})."""
        x = cache
        N, C, K = d_y.shape[3], x.shape[0], self.kernel_size
        if N == 1:
            d_weights = self._weight_gradient_per_offset(x, d_y)
        elif C == 1 and K <= 3:
            d_weights = self._weight_gradient_in_row_blocks(x, d_y)
        else:
            d_weights = self._weight_gradient_banded(x, d_y)
        d_biases = self.bias_gradient(d_y)
        d_x = self._input_gradient_by_axes(params["weights"], d_y, x.shape)
        return d_x, {"weights": d_weights, "biases": d_biases}

    def _weight_gradient_per_offset(self, x, d_y):
        """dF for one sample as the K*K products dy @ slice_(i,j)^T, one kernel offset at a time:
        the order of additions in which the original's per-sample run is reproduced to every
        printed digit (README.md, "The original run"). The slices come in row-major (i, j) order, so
        stacking the products on a last axis gives (D, C, K*K)."""
        K, S, P = self.kernel_size, self.stride, self.padding
        D, C = d_y.shape[0], x.shape[0]
        x_pad = jnp.pad(x, ((0, 0), (P, P), (P, P), (0, 0)))
        d_y_rows = d_y.reshape(D, -1)
        products = [d_y_rows @ x_slice.reshape(C, -1).T for x_slice in offset_slices(x_pad, K, S).values()]
        return jnp.stack(products, axis=-1).reshape(D, C, K, K)

    def _weight_gradient_in_row_blocks(self, x, d_y):
        """dF for a batch of one-channel inputs, at most 3x3: the im2col product dF = dy @ im2col^T,
        summed over blocks of output rows so that each block's operands stay in cache
        (DW_BLOCK_COLUMNS), each block's product taken the other way round, dF^T = im2col @ dy^T,
        which XLA's CPU matrix product computes faster in that order (PERFORMANCE.md)."""
        D, H_out, W_out, N = d_y.shape
        C, K = x.shape[0], self.kernel_size
        blocks = [patches @ d_y[:, top:top + rows].reshape(D, -1).T
                  for (top, rows), patches in zip(self._row_blocks(H_out, W_out, N), self._patch_blocks(x))]
        return sum(blocks[1:], blocks[0]).T.reshape(D, C, K, K)

    def _weight_gradient_banded(self, x, d_y):
        """dF as the transpose of the forward's banded products (THEORY.md §4.4). Block by block,
        the products of dy's rows (d, h) with the width windows' rows (r, c, j):
        products[d, h, r, c, j] = sum_{w, n} dy[d, top + h, w, n] * x_pad[c, S*top + r, S*w + j, n].
        Output row h reads input rows r = S*h + i, so dF[d, c, i, j] gathers the entries on the
        band, products[d, h, S*h + i, c, j], summed over h and the blocks."""
        S, K = self.stride, self.kernel_size
        D, C = d_y.shape[0], x.shape[0]
        d_weights = []
        for (top, rows), windows in self._window_blocks(x):
            products = (d_y[:, top:top + rows].reshape(D * rows, -1) @ windows.T).reshape(D, rows, -1, C, K)
            d_weights += [products[:, h, S * h:S * h + K] for h in range(rows)]  # each (D, K_i, C, K_j)
        return sum(d_weights[1:], d_weights[0]).transpose(0, 2, 1, 3)

    @staticmethod
    def _row_blocks(H_out, W_out, N):
        """The blocks of whole output rows, [(top, rows), ...], at most DW_BLOCK_COLUMNS columns each
        (at least one row); the last block may be shorter."""
        return FastConvolutional._blocks_of(H_out, max(1, DW_BLOCK_COLUMNS // (W_out * N)))

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

    def _input_gradient_by_axes(self, weights, d_y, x_shape):
        """weights (D, C, K, K), d_y (D, H_out, W_out, N) -> d_x of shape x_shape (C, H, W, N), the
        sum col2im takes (THEORY.md §4.4), taken over the K*K offsets one axis at a time, so that
        neither the (C*K*K)-row matrix nor K*K separate pieces of it are stored (PERFORMANCE.md).

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


class FastMaxPool(MaxPool):
    """MaxPool, computed the ways measured fastest; the same results under both tie rules."""

    def forward(self, params, x):
        """x (C, H, W, N) -> (y (C, H_out, W_out, N), cache = x), by XLA's windowed reduction.

        As an elementwise maximum of the K*K offset slices, XLA's CPU compiler would recompute it
        inside every later operation that reads y (the next layer, and the comparisons of the
        backward); a reduction it computes once (PERFORMANCE.md, "What made it faster").
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
        return self._interleave(d_slices, x.shape), {}

    def _interleave(self, d_slices, x_shape):
        """Tiling windows (S == K) read every input position at most once, so putting the slices'
        gradients back is a plain interleaving: d_x[c, K*h + i, K*w + j, n] = d_slices[i, j][c, h, w, n].
        Stacking i on axis 2 and j on axis 4 gives (C, H_out, K, W_out, K, N), which is that layout
        once reshaped; no sum of K*K padded arrays (PERFORMANCE.md)."""
        C, H, W, N = x_shape
        K = self.window
        H_out, W_out = d_slices[0, 0].shape[1:3]
        d_tiles = jnp.stack([jnp.stack([d_slices[i, j] for j in range(K)], axis=3) for i in range(K)], axis=2)
        d_x = d_tiles.reshape(C, H_out * K, W_out * K, N)
        # Rows and columns that no window covered (the floor in H_out) get zero gradient.
        return jnp.pad(d_x, ((0, 0), (0, H - H_out * K), (0, W - W_out * K), (0, 0)))
