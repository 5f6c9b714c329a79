"""Softmax and the cross-entropy losses (THEORY.md §3.5 forward, §4.5 backward).

Targets t are one-hot, (N, classes). Every loss here is the MEAN over the batch, so its backward
divides by N once and the layers below never divide again: their parameter gradients come out
as those of the mean loss.

A loss is not a layer: it has no parameters, and its contract differs from the layers'
(forward(params, x) -> (y, cache), backward(params, cache, d_y) -> (d_x, grads)):
forward(output, targets) -> (loss, cache) takes the targets, and backward(cache) -> d_output needs
no upstream gradient, since dL/dL = 1 starts the chain (THEORY.md §4).

Two ways to end the network:
  Softmax layer, then CategoricalCrossEntropy on probabilities (the original's way). The loss
      clips probabilities to [eps, 1 - eps] so log never sees 0, and its backward is
      -t / clip(p) / N; Softmax.backward then applies the softmax Jacobian.
  SoftmaxCrossEntropy on logits (fused). The Jacobian product collapses to (p - t) / N: cheaper,
      and exact for any p. Where no clipping is active, the two give the same gradient.
"""

import jax.numpy as jnp


def log_softmax(z):
    """log softmax(z) over the last axis: z - max(z) - log sum exp(z - max(z)).
    Shifting by max(z) changes nothing mathematically and keeps exp from overflowing."""
    shifted = z - jnp.max(z, axis=-1, keepdims=True)
    return shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True))


def softmax(z):
    """exp(z) / sum exp(z) over the last axis, shifted by max(z) like log_softmax."""
    e = jnp.exp(z - jnp.max(z, axis=-1, keepdims=True))
    return e / jnp.sum(e, axis=-1, keepdims=True)


class Softmax:
    """p = softmax(z) over the last axis, per sample; no parameters."""

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def init(self, key, dtype=jnp.float32):
        return {}

    def forward(self, params, z):
        """z (N, classes) -> (p (N, classes), cache = p)."""
        p = softmax(z)
        return p, p

    def backward(self, params, cache, d_p):
        """d_p (N, classes) -> (d_z, {}), the Jacobian-vector product dz_k = p_k (dp_k - sum_j dp_j p_j)."""
        p = cache
        return p * (d_p - jnp.sum(d_p * p, axis=-1, keepdims=True)), {}


class CategoricalCrossEntropy:
    """L = -(1/N) sum_n sum_k t[n, k] log(clip(p[n, k], eps, 1 - eps)), on probabilities."""

    def __init__(self, epsilon=1e-7):
        self.epsilon = epsilon

    def forward(self, p, targets):
        """p, targets (N, classes) -> (loss (), cache)."""
        p_clipped = jnp.clip(p, self.epsilon, 1 - self.epsilon)
        loss = -jnp.sum(targets * jnp.log(p_clipped)) / p.shape[0]
        return loss, (p_clipped, targets)

    def backward(self, cache):
        """-> d_p (N, classes) = -t / clip(p) / N. This is the original's gradient: it keeps the
        clipped value in the denominator instead of treating clip as a function with derivative 0
        outside [eps, 1 - eps], so it differs from the exact (p - t) / N once clipping is active."""
        p_clipped, targets = cache
        return -targets / p_clipped / p_clipped.shape[0]

    def probabilities(self, output):
        """The network's output already is a probability distribution."""
        return output


class SoftmaxCrossEntropy:
    """L = -(1/N) sum_n sum_k t[n, k] log softmax(z)[n, k], on logits z."""

    def forward(self, z, targets):
        """z, targets (N, classes) -> (loss (), cache). log softmax via log-sum-exp never takes log(0)."""
        log_p = log_softmax(z)
        loss = -jnp.sum(targets * log_p) / z.shape[0]
        return loss, (jnp.exp(log_p), targets)

    def backward(self, cache):
        """-> d_z (N, classes) = (p - t) / N."""
        p, targets = cache
        return (p - targets) / p.shape[0]

    def probabilities(self, output):
        return softmax(output)
