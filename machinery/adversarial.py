"""--fgsm: the fast gradient sign attack (Goodfellow, Shlens and Szegedy 2015) on the test images,
with the input gradient the network's own backward pass computes (THEORY.md §4.7):

    x' = clip(x + eps * sign(dL/dx), 0, 1)

each pixel pushed by eps, up or down, whichever raises the image's loss, and kept in [0, 1]."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from data import to_input
from machinery.devices import EVAL_CHUNK, pad_to_chunks

# How many test images adversarial.png shows beside their perturbed versions.
SHOWN = 8


def perturb(network, params, x, labels, epsilon):
    """x (C, H, W, M) in [0, 1] as the network reads images, labels (M,) -> the FGSM images x', the
    same shape. The loss is the batch's mean, so dL/dx carries a factor 1/M: its sign, all the attack
    uses, does not."""
    _, d_x, _ = network.loss_and_gradients(params, x, labels)
    return jnp.clip(x + epsilon * jnp.sign(d_x), 0, 1)


@functools.lru_cache(maxsize=None)  # one compiled attack per network
def make_attack(network):
    """A jitted function: (params, images (M, ...) uint8, labels (M,), epsilon), M a multiple of
    EVAL_CHUNK -> the classes the network gives the perturbed images (M,), a chunk at a time."""
    def attack(params, images, labels, epsilon):
        chunks = images.reshape((-1, EVAL_CHUNK) + images.shape[1:]), labels.reshape(-1, EVAL_CHUNK)

        def classify(chunk):
            images, labels = chunk
            x_adversarial = perturb(network, params, to_input(images), labels, epsilon)
            return network.probabilities(params, x_adversarial).argmax(-1)

        return lax.map(classify, chunks).reshape(-1)

    return jax.jit(attack)


def fgsm(network, params, test_images, test_labels, epsilons):
    """({"epsilon", "test_accuracy"} for each of epsilons, in order; the examples adversarial.png
    shows: (the first SHOWN test images, their perturbed versions at the largest epsilon (H, W[, C])
    floats, the classes given to each))."""
    images, labels = pad_to_chunks(test_images), pad_to_chunks(test_labels).astype(np.int32)
    attack = make_attack(network)
    results = []
    for epsilon in epsilons:
        answers = np.asarray(attack(params, images, labels, np.float32(epsilon)))[:len(test_labels)]
        results.append({"epsilon": epsilon, "test_accuracy": float(np.mean(answers == test_labels))})
    shown_images, shown_labels = test_images[:SHOWN], test_labels[:SHOWN].astype(np.int32)
    largest = np.float32(max(epsilons))
    def example(params, images, labels):
        x = to_input(images)
        x_adversarial = perturb(network, params, x, labels, largest)
        return (x_adversarial, network.probabilities(params, x).argmax(-1),
                network.probabilities(params, x_adversarial).argmax(-1))

    examples = jax.jit(example)
    perturbed, before, after = (np.asarray(array) for array in examples(params, shown_images, shown_labels))
    perturbed = np.moveaxis(perturbed, -1, 0)  # (SHOWN, C, H, W)
    perturbed = perturbed[:, 0] if perturbed.shape[1] == 1 else perturbed.transpose(0, 2, 3, 1)
    return results, (shown_images / 255, perturbed, before, after)
