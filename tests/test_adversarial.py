"""Guards --fgsm: the fast gradient sign attack built on the network's own input gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data
import model
from gradcheck import quick_jit
from machinery import adversarial
from machinery.flags import parse_args


@pytest.fixture(scope="module")
def trained(mnist):
    """The default network after two short epochs (test_training.py's run_short size), and its answers."""
    args = parse_args(["--train-size", "3000", "--epochs", "2", "--batch-size", "32"])
    network = model.build_network("modern")
    params, _, _, _, predictions = model.train(network, network.init(model.run_keys(0)[0]), args, *mnist,
                                               log=lambda line: None)
    return network, params, predictions


def test_no_step_keeps_the_test_accuracy_and_a_step_lowers_it(trained, mnist):
    network, params, predictions = trained
    test_images, test_labels = mnist[2:]
    rows, _ = adversarial.fgsm(network, params, test_images, test_labels, (0.0, 0.1))
    assert [row["epsilon"] for row in rows] == [0.0, 0.1]
    assert rows[0]["test_accuracy"] == model.accuracy_of(predictions, test_labels)
    assert rows[1]["test_accuracy"] < rows[0]["test_accuracy"] - 0.1


def test_the_perturbation_is_the_sign_of_jax_grad_kept_in_range(trained, mnist):
    """x' = clip(x + eps sign(dL/dx), 0, 1), dL/dx from the network's backward pass, equals the same
    built from jax.grad (float64 parameters); every pixel stays in [0, 1] and within eps of x."""
    network, params, _ = trained
    params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), params)
    images, labels = mnist[2][:16], mnist[3][:16].astype(np.int32)
    epsilon = 0.1

    def loss_of_input(x):
        output, _ = network.forward(params, x)
        return network.loss.forward(output, jax.nn.one_hot(labels, 10, dtype=jnp.float64))[0]

    x = data.to_input(images).astype(jnp.float64)
    ours = np.asarray(quick_jit(lambda x: adversarial.perturb(network, params, x, labels, epsilon), x))
    theirs = np.asarray(quick_jit(lambda x: jnp.clip(x + epsilon * jnp.sign(jax.grad(loss_of_input)(x)), 0, 1), x))
    np.testing.assert_array_equal(ours, theirs)
    assert ours.min() >= 0 and ours.max() <= 1 and np.abs(ours - np.asarray(x)).max() <= epsilon + 1e-12
    assert (ours != np.asarray(x)).mean() > 0.05  # the attack moves pixels: not an empty test
