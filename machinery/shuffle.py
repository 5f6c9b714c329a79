"""The order in which each epoch takes the training images: jax.random.permutation's, computed with
numpy's sort, which is far faster on a CPU than XLA's."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from machinery.compiling import ONCE_OPTIMISED


def shuffled_order(shuffle_key, train_size, count):
    """(the shuffling key for the next epoch, the first `count` of a random permutation of
    0..train_size-1 as an int32 numpy array): the order in which an epoch takes its training images.

    The permutation is jax.random.permutation's, computed its way: the numbers sorted by fresh random
    32-bit keys, in as many rounds as make it unlikely that two numbers tie in every round. JAX draws
    the keys; numpy does the stable sorts, which XLA's CPU sort does far more slowly (PERFORMANCE.md).
    The orders are jax.random.permutation's, number for number (tests/test_training.py checks), so every
    run trains as it did when that drew them.
    """
    rounds = math.ceil(3 * math.log(max(1, train_size)) / math.log(np.iinfo(np.uint32).max))
    shuffle_key, sort_keys = shuffle_sort_keys(shuffle_key, train_size, rounds)
    order = np.arange(train_size, dtype=np.int32)
    positions = np.arange(train_size, dtype=np.uint64)
    for keys in sort_keys:
        # A stable sort by key is a sort of the pairs (key, position). Packed into one uint64 each,
        # they go through numpy's vectorised sort, faster than argsort(kind="stable") (PERFORMANCE.md).
        packed = np.asarray(keys).astype(np.uint64) << 32 | positions
        order = order[np.sort(packed) & 0xFFFFFFFF]
    return shuffle_key, order[:count]


@functools.partial(jax.jit, static_argnames=("train_size", "rounds"), compiler_options=ONCE_OPTIMISED)
def shuffle_sort_keys(shuffle_key, train_size, rounds):
    """(the shuffling key for the next epoch, one (train_size,) uint32 array of sort keys per round),
    split from the keys as jax.random.permutation splits them."""
    shuffle_key, round_key = jax.random.split(shuffle_key)
    sort_keys = []
    for _ in range(rounds):
        round_key, this_round = jax.random.split(round_key)
        sort_keys.append(jax.random.bits(this_round, (train_size,), jnp.uint32))
    return shuffle_key, sort_keys


