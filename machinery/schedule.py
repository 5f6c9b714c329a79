"""The learning rate of every step: constant, or along a cosine, with an optional linear warmup
(THEORY.md §5)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from machinery.compiling import ONCE_OPTIMISED


def learning_rates(schedule, lr, epoch, epochs, steps, warmup_epochs=0):
    """The learning rate of every step of one epoch (0-based epoch number).

    "constant": lr throughout. "cosine": lr * (1 + cos(pi * t)) / 2 with t the fraction of all
    training steps done, falling smoothly from lr to near 0 at the last step. With warmup_epochs
    W > 0, step s (counted from 0 over the whole run) takes min(1, (s + 1) / (W * steps)) times that:
    the rate climbs linearly over the first W epochs, so that a high lr does not kill a ReLU layer
    before the network has learned anything (THEORY.md §5).
    """
    if schedule == "constant":
        rates = np.full((steps,), lr, np.float32)
    else:
        rates = cosine_rates(lr * 0.5, epoch * steps, epochs * steps, steps)
    if warmup_epochs == 0:
        return rates
    ramp = np.minimum(1.0, (epoch * steps + np.arange(1, steps + 1)) / (warmup_epochs * steps))
    return np.asarray(rates) * ramp.astype(np.float32)


# One compilation for every epoch. The numbers are arguments, not constants compiled into the
# program: as constants, XLA may multiply by the divisor's reciprocal and change some rates in their
# last bit (tests/test_training.py checks them against the formula taken operation by operation).
@functools.partial(jax.jit, static_argnames="steps", compiler_options=ONCE_OPTIMISED)
def cosine_rates(half_lr, first_step, total_steps, steps):
    done = (first_step + jnp.arange(steps)) / total_steps
    return (half_lr * (1 + jnp.cos(math.pi * done))).astype(jnp.float32)
