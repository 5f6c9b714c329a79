"""Naive loop implementations, written straight from the definitions: the oracle for the fast layers.

Slow on purpose: one Python loop per index, so that each line can be checked against THEORY.md by eye.
"""

import numpy as np


def conv_forward_naive(x, weights, biases, stride, padding):
    """x (C, H, W, N), weights (D, C, K, K), biases (D,) or (D, H_out, W_out) -> y (D, H_out, W_out, N)."""
    C, H, W, N = x.shape
    D, _, K, _ = weights.shape
    x_pad = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    H_out = (H + 2 * padding - K) // stride + 1
    W_out = (W + 2 * padding - K) // stride + 1
    y = np.zeros((D, H_out, W_out, N))
    for n in range(N):
        for d in range(D):
            for h in range(H_out):
                for w in range(W_out):
                    total = biases[d] if biases.ndim == 1 else biases[d, h, w]
                    for c in range(C):
                        for i in range(K):
                            for j in range(K):
                                total += weights[d, c, i, j] * x_pad[c, stride * h + i, stride * w + j, n]
                    y[d, h, w, n] = total
    return y


def conv_backward_naive(x, weights, d_y, stride, padding, tied_biases=True):
    """Gradients of sum(y * d_y) for conv_forward_naive: (d_x, d_weights, d_biases)."""
    C, H, W, N = x.shape
    D, _, K, _ = weights.shape
    _, H_out, W_out, _ = d_y.shape
    x_pad = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    d_x_pad = np.zeros_like(x_pad)
    d_weights = np.zeros_like(weights)
    for n in range(N):
        for d in range(D):
            for h in range(H_out):
                for w in range(W_out):
                    for c in range(C):
                        for i in range(K):
                            for j in range(K):
                                d_weights[d, c, i, j] += d_y[d, h, w, n] * x_pad[c, stride * h + i, stride * w + j, n]
                                d_x_pad[c, stride * h + i, stride * w + j, n] += d_y[d, h, w, n] * weights[d, c, i, j]
    d_biases = d_y.sum(axis=(1, 2, 3)) if tied_biases else d_y.sum(axis=3)
    return d_x_pad[:, padding:padding + H, padding:padding + W, :], d_weights, d_biases
