"""Fully connected layer, and the small layers that sit around it: ReLU, Tanh and Flatten.

Dense (THEORY.md §3.4 forward, §4.1 backward), with X (N, I), weights A (I, O), b (O,):
    Y  = X A + b                    (N, O)
    dA = X^T dY                     (I, O)
    db = sum_n dY[n]                (O,)
    dX = dY A^T                     (N, I)
ReLU (§3.2, §4.2): y = max(x, 0), dx = dy * [x > 0]  (the derivative at 0 is taken as 0).
Tanh (§4.9): y = A tanh(S x), dx = dy * S (A - y^2 / A); A = S = 1, or LeCun's A = 1.7159, S = 2/3.
Flatten: (C, H, W, N) feature maps to (N, C*H*W) rows, a reshape and a transpose; its backward
undoes both.
"""

import math

import jax
import jax.numpy as jnp
from jax import lax


class Dense:
    """Y = X A + b with weights A (input_size, output_size) and biases b (output_size,).

    Weights start ~ N(0, 2 / (input_size + output_size)) (Glorot's normal scaling, as the original
    used), biases at 0.
    """

    def __init__(self, input_size, output_size):
        self.input_size, self.output_size = input_size, output_size

    def output_shape(self, input_shape):
        """(input_size,) -> (output_size,)."""
        if tuple(input_shape) != (self.input_size,):
            raise ValueError(f"Dense({self.input_size}, {self.output_size}) takes {self.input_size} features, "
                             f"not an input of shape {tuple(input_shape)}")
        return (self.output_size,)

    def init(self, key, dtype=jnp.float32):
        scale = math.sqrt(2.0 / (self.input_size + self.output_size))
        # Network.init compiles every layer's init as one function. The barrier keeps XLA from
        # folding `scale` into the constant factor inside the draw, which rounds differently: the
        # weights stay those of the draw times scale, bit for bit, compiled or not.
        weights = lax.optimization_barrier(jax.random.normal(key, (self.input_size, self.output_size), dtype)) * scale
        return {"weights": weights, "biases": jnp.zeros((self.output_size,), dtype)}

    def forward(self, params, x):
        """x (N, input_size) -> (y (N, output_size), cache = x)."""
        return x @ params["weights"] + params["biases"], x

    def backward(self, params, cache, d_y):
        """d_y (N, output_size) -> (d_x (N, input_size), {"weights", "biases"})."""
        x = cache
        d_weights = x.T @ d_y
        d_biases = d_y.sum(axis=0)
        d_x = d_y @ params["weights"].T
        return d_x, {"weights": d_weights, "biases": d_biases}


class ReLU:
    """Elementwise max(x, 0) on an array of any shape; no parameters."""

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def init(self, key, dtype=jnp.float32):
        return {}

    def forward(self, params, x):
        return jnp.maximum(x, 0), x

    def backward(self, params, cache, d_y):
        x = cache
        return jnp.where(x > 0, d_y, jnp.zeros((), d_y.dtype)), {}


class Tanh:
    """Elementwise y = A tanh(S x) on an array of any shape; no parameters. scaled=False: A = S = 1.
    scaled=True: LeCun's A = 1.7159, S = 2/3 (1998, appendix A), so that tanh's steepest part spans
    inputs of about +-1 and f(+-1) = +-1."""

    def __init__(self, scaled=False):
        self.amplitude, self.slope = (1.7159, 2 / 3) if scaled else (1.0, 1.0)

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def init(self, key, dtype=jnp.float32):
        return {}

    def forward(self, params, x):
        """x -> (y, cache = y): the derivative is a function of the output."""
        y = self.amplitude * jnp.tanh(self.slope * x)
        return y, y

    def backward(self, params, cache, d_y):
        """dy/dx = A S (1 - tanh^2(S x)) = S (A - y^2 / A) (THEORY.md §4.9)."""
        y = cache
        return d_y * self.slope * (self.amplitude - y * y / self.amplitude), {}


class Flatten:
    """(C, H, W, N) -> (N, C*H*W), features in row-major (c, h, w) order; no parameters.

    The convolutional layers keep the batch last (Convolutional.py explains why); the dense layers
    take it first, as X A reads, so this is where the batch axis moves to the front.
    """

    def output_shape(self, input_shape):
        """(C, H, W) -> (C*H*W,)."""
        return (math.prod(input_shape),)

    def init(self, key, dtype=jnp.float32):
        return {}

    def forward(self, params, x):
        # Reshaping (C, H, W, N) to (C*H*W, N) moves no data; the transpose that follows, XLA folds
        # into the next layer's matrix products instead of copying the array (moving the axis first
        # and reshaping after is the same result, but copied: PERFORMANCE.md). The cache is the
        # input itself, kept only for its shape.
        return x.reshape(-1, x.shape[-1]).T, x

    def backward(self, params, cache, d_y):
        return d_y.T.reshape(cache.shape), {}
