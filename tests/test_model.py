"""model.py: the whole network's gradients, training, the seed preset, checkpoints and the command line."""

import errno
import json
import os
import platform
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data
import model
from machinery import checkpoints, devices, errors, exits, files, flags, pictures, shuffle
from conftest import CLI_ENVIRONMENT, ROOT, run_cli, save_run, start_cli
from data import load_idx
from gradcheck import quick_jit, relative_error


@pytest.fixture(scope="module")
def mnist():
    return load_idx(os.path.join(ROOT, "data"))


def test_seed_preset_initialises_like_the_original():
    """The original drew every layer from one key; its conv weights are N(0, 1), its biases untied."""
    network = model.build_network("original")
    params = network.init(model.run_keys(0)[0])
    assert params[0]["biases"].shape == (5, 26, 26)
    np.testing.assert_array_equal(params[0]["weights"],
                                  jax.random.normal(jax.random.split(jax.random.PRNGKey(0))[0], (5, 1, 3, 3),
                                                    jnp.float32))


@pytest.mark.parametrize("kind", ["original", "modern", "lenet"])
def test_compiled_init_draws_the_weights_of_each_layer_drawn_op_by_op(kind):
    """Network.init compiles all draws as one function, at a lower optimisation level than XLA's
    default and without its newer fusion emitters (compiling.ONCE_OPTIMISED); the weights must still be
    bit for bit those of every layer's init run op by op. The original's network has both kinds of
    draw, N(0, 1) and He-scaled (at XLA's level 0 both differ), from one key shared by all layers;
    the modern one and LeNet-5 split a key per layer inside the compiled function."""
    network = model.build_network(kind)
    key = model.run_keys(3)[0]
    keys = [key] * len(network.layers) if network.shared_init_key else jax.random.split(key, len(network.layers))
    expected = [layer.init(layer_key) for layer, layer_key in zip(network.layers, keys)]  # not compiled as one
    for got, want in zip(network.init(key), expected):
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_compiled_cosine_schedule_equals_the_formula_op_by_op():
    """learning_rates compiles the cosine schedule as one function; in float32, as training uses
    it, every rate must be bit for bit the formula's taken operation by operation (the default
    run's 15 epochs of 468 steps among them). With the divisor compiled in as a constant, some
    rates differ in their last bit, and this fails."""
    with jax.enable_x64(False):
        for lr, epochs, steps in [(0.1, 15, 468), (0.05, 20, 468), (0.02, 4, 16)]:
            for epoch in range(epochs):
                done = (epoch * steps + jnp.arange(steps)) / (epochs * steps)
                expected = (lr * 0.5 * (1 + jnp.cos(np.pi * done))).astype(jnp.float32)
                np.testing.assert_array_equal(model.learning_rates("cosine", lr, epoch, epochs, steps), expected,
                                              err_msg=f"lr {lr}, epoch {epoch} of {epochs}, {steps} steps")


def test_warmup_climbs_linearly_to_the_schedule():
    """With --warmup-epochs W, step s of the run (from 0) takes min(1, (s + 1) / (W * steps)) times
    the schedule's rate: the first step 1 / (W * steps) of it, full rate from the last warming step
    on, bit for bit the schedule's alone."""
    epochs, steps, warmup = 3, 5, 2
    for schedule in ("constant", "cosine"):
        plain = np.concatenate([model.learning_rates(schedule, 0.1, epoch, epochs, steps) for epoch in range(epochs)])
        warmed = np.concatenate([model.learning_rates(schedule, 0.1, epoch, epochs, steps, warmup)
                                 for epoch in range(epochs)])
        assert warmed.dtype == np.float32
        ramp = np.minimum(1, np.arange(1, epochs * steps + 1) / (warmup * steps))
        np.testing.assert_allclose(warmed, plain * ramp, rtol=1e-6, err_msg=schedule)
        np.testing.assert_array_equal(warmed[warmup * steps - 1:], plain[warmup * steps - 1:], err_msg=schedule)


def test_shuffled_order_is_jax_random_permutation():
    """shuffled_order sorts on the host what JAX's permutation sorts with XLA; the orders, and the key
    it hands the next epoch, must be those of jax.random.permutation after the same split, or every
    shuffled run would train on other batches than README.md's. The sizes take no sorting round (1)
    and two (60,000, the default run's); count cuts the order short, as the steps of an epoch leave
    out the images of a last partial batch."""
    for train_size, count in [(1, 1), (60000, 59904)]:
        def split_and_permute(shuffle_key):
            next_key, epoch_key = jax.random.split(shuffle_key)
            return next_key, jax.random.permutation(epoch_key, train_size)

        # Integers only, so XLA's optimisation level changes nothing but the time to compile.
        reference = jax.jit(split_and_permute).lower(jax.random.PRNGKey(0)).compile(
            {"xla_backend_optimization_level": 0})
        for seed in range(3):
            next_key, expected = reference(jax.random.PRNGKey(seed))
            got_key, order = shuffle.shuffled_order(jax.random.PRNGKey(seed), train_size, count)
            assert order.dtype == np.int32
            np.testing.assert_array_equal(order, np.asarray(expected)[:count],
                                          err_msg=f"{train_size} images, seed {seed}")
            np.testing.assert_array_equal(got_key, next_key)


ORIGINAL_LOSSES = ["0.4169", "0.1493", "0.0792", "0.0412", "0.0220", "0.0148", "0.0064", "0.0032", "0.0017",
                   "0.0013"]


@pytest.mark.skipif(jax.default_backend() != "cpu" or platform.machine() != "x86_64",
                    reason="the table is reproduced digit for digit on an x86-64 CPU (README.md, 'The original "
                           "run'); other platforms round differently and may follow another trajectory")
def test_seed_preset_prints_the_original_table(tmp_path):
    """`python model.py --preset seed` as a user runs it (float32, no test configuration): all ten
    epoch losses of the original to four decimals, and the final test accuracy."""
    result = run_cli("--preset", "seed", "--out-dir", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    losses = re.findall(r"^epoch +\d+/10  train loss (\d\.\d{4})", result.stdout, re.MULTILINE)
    assert losses == ORIGINAL_LOSSES, result.stdout
    # The original reported 95.77%; this run's 95.78% is one test image more (README.md explains).
    assert "test accuracy 95.78% on 10000 images" in result.stdout, result.stdout


# The first two lines of `python model.py`'s table in README.md ("What `python model.py` does"), as
# printed on the two kinds of 2-core x86-64 CPU the project was developed on: XLA's matrix products
# add in another order on each, so each has its own digits. README.md shows both.
DEFAULT_RUN_FIRST_EPOCHS = {"without AVX-512": [("0.2030", "97.50"), ("0.0728", "97.42")],
                            "AMD family 25 with AVX-512": [("0.2030", "97.54"), ("0.0728", "97.34")]}


def cpu_kind():
    """Which of DEFAULT_RUN_FIRST_EPOCHS' CPUs this is, or None for another (a GPU, another
    architecture, another number of cores, another CPU with AVX-512)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if jax.default_backend() != "cpu" or platform.machine() != "x86_64" or cores != 2:
        return None
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            fields = dict(line.split(":", 1) for line in cpuinfo if ":" in line)  # every core's alike; the last stays
    except OSError:
        return None
    fields = {name.strip(): value.strip() for name, value in fields.items()}
    if "avx512f" not in fields.get("flags", "").split():
        return "without AVX-512"
    if fields.get("vendor_id") == "AuthenticAMD" and fields.get("cpu family") == "25":
        return "AMD family 25 with AVX-512"
    return None


def test_default_run_begins_as_readme_shows(tmp_path):
    """`python model.py` as a user runs it, stopped once its second epoch is printed: its first two
    epochs as README.md prints them.
    To the digit on the CPUs where README's runs were made (cpu_kind); elsewhere the sums are added
    in another order, and the numbers must only be close. A change that moves the default run's
    trajectory at all (its gradients, its schedule, its shuffle, its initialisation) breaks the
    former."""
    process = start_cli("--out-dir", str(tmp_path / "out"), cwd=tmp_path)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("epoch   2/"):
            break
    process.kill()  # the rest of the run is not needed
    process.communicate()
    output = "".join(lines)
    epochs = re.findall(r"^epoch +\d+/15  train loss (\d\.\d{4})  test accuracy +(\d+\.\d\d)%", output, re.MULTILINE)
    kind = cpu_kind()
    if kind:
        assert epochs[:2] == DEFAULT_RUN_FIRST_EPOCHS[kind], f"{kind}:\n{output}"
    else:
        assert len(epochs) == 2, output
        for (loss, accuracy), (readme_loss, readme_accuracy) in zip(epochs, DEFAULT_RUN_FIRST_EPOCHS["without AVX-512"]):
            assert abs(float(loss) - float(readme_loss)) < 0.005 and abs(float(accuracy) - float(readme_accuracy)) < 0.5


def run_short(mnist, extra=(), seed=0, log=lambda line: None):
    """A short run of the default network in this process. The tests that train in this process use
    its size, so that all but the first find the compiled epoch in the session's cache."""
    args = flags.parse_args(["--train-size", "3000", "--epochs", "3", "--batch-size", "32", "--seed", str(seed),
                             *extra])
    network = model.build_network("modern")
    params = network.init(model.run_keys(args.seed)[0])
    return model.train(network, params, args, *mnist, log=log)


@pytest.mark.parametrize("steps", [1, 3])  # odd step counts exercise the scan's unroll remainder
def test_compiled_epoch_equals_steps_taken_one_by_one(steps):
    """make_train_epoch (gather, lax.scan, unrolling, donation) against the same SGD steps written as
    a plain Python loop over network.loss_and_grads and sgd_update, with momentum and weight decay."""
    network = model.build_network("modern")
    params = network.init(jax.random.PRNGKey(3))
    velocity = jax.tree_util.tree_map(jnp.zeros_like, params)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (20, 28, 28)), jnp.uint8)
    labels = jnp.asarray(rng.integers(0, 10, 20), jnp.int32)
    order = jnp.asarray(rng.permutation(20)[:4 * steps], jnp.int32)
    rates = jnp.linspace(0.05, 0.02, steps, dtype=jnp.float32)

    expected_params, expected_velocity, expected_losses = params, velocity, []

    @jax.jit  # each step compiled on its own (one compilation, not one per operation), run from Python
    def one_step(params, velocity, x, labels, lr):
        loss, grads = network.loss_and_grads(params, x, labels)
        return (loss,) + model.sgd_update(params, velocity, grads, lr, 0.9, 5e-4)

    for step, batch in enumerate(np.asarray(order).reshape(steps, 4)):
        loss, expected_params, expected_velocity = one_step(expected_params, expected_velocity,
                                                            data.to_input(images[batch]), labels[batch], rates[step])
        expected_losses.append(float(loss))

    train_epoch = model.make_train_epoch(network, momentum=0.9, weight_decay=5e-4)
    got_params, got_velocity, got_losses = train_epoch(params, velocity, images, labels, order, rates)
    np.testing.assert_allclose(np.asarray(got_losses), expected_losses, rtol=1e-5)
    for got, expected in zip(jax.tree_util.tree_leaves((got_params, got_velocity)),
                             jax.tree_util.tree_leaves((expected_params, expected_velocity))):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def hand_sgd(params, velocity, grads, lr, momentum, weight_decay):
    """THEORY.md §5 written out in numpy, leaf by leaf: g = dθ + λθ, v = μv + g, θ = θ - ηv
    (and θ = θ - ηg with no momentum)."""
    new_params, new_velocity = [], []
    for index, layer in enumerate(params):
        new_params.append({})
        new_velocity.append({})
        for name, theta in layer.items():
            theta, g = np.asarray(theta, np.float64), np.asarray(grads[index][name], np.float64)
            g = g + weight_decay * theta
            if momentum:
                v = momentum * np.asarray(velocity[index][name], np.float64) + g
                new_velocity[-1][name] = v
                new_params[-1][name] = theta - lr * v
            else:
                new_params[-1][name] = theta - lr * g
    return new_params, (new_velocity if momentum else None)


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.0, 0.1), (0.9, 0.1)])
def test_sgd_update_follows_theory(momentum, weight_decay):
    """sgd_update against the formulas of THEORY.md §5, two steps on small arrays: a non-zero velocity
    carried from step to step, and layers without parameters left as they are."""
    rng = np.random.default_rng(11)
    params = [{"weights": rng.standard_normal((3, 2)), "biases": rng.standard_normal(2)}, {}]
    velocity = ([{name: rng.standard_normal(value.shape) for name, value in params[0].items()}, {}]
                if momentum else None)
    ours = jax.tree_util.tree_map(jnp.asarray, (params, velocity))
    expected = (params, velocity)
    for lr in (0.5, 0.25):
        grads = [{name: rng.standard_normal(value.shape) for name, value in params[0].items()}, {}]
        ours = model.sgd_update(*ours, jax.tree_util.tree_map(jnp.asarray, grads), lr, momentum, weight_decay)
        expected = hand_sgd(*expected, grads, lr, momentum, weight_decay)
    assert ours[1] is None if not momentum else ours[1][1] == {}
    assert ours[0][1] == {}
    for got, want in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_training_step_with_momentum_and_decay_matches_jax_grad():
    """One step of the default network as training takes it (loss_and_grads, then sgd_update with
    momentum and weight decay), against jax.grad of the same loss followed by THEORY.md §5 by hand.
    The parameters' changes are compared, not the parameters, so that a small error in the update
    cannot hide behind the size of the weights."""
    network = model.build_network("modern")
    rng = np.random.default_rng(12)
    params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64) + 0.1 * rng.standard_normal(p.shape),
                                    network.init(jax.random.PRNGKey(4)))
    velocity = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.standard_normal(p.shape)), params)
    x = jnp.asarray(rng.random((1, 28, 28, 4)))
    labels = jnp.asarray([1, 5, 9, 0])
    lr, momentum, weight_decay = 0.05, 0.9, 5e-3

    _, grads = quick_jit(network.loss_and_grads, params, x, labels)
    ours, ours_velocity = model.sgd_update(params, velocity, grads, lr, momentum, weight_decay)

    def loss_only(params):
        output, _ = network.forward(params, x)
        return network.loss.forward(output, jax.nn.one_hot(labels, 10, dtype=jnp.float64))[0]

    expected, expected_velocity = hand_sgd(params, velocity, quick_jit(jax.grad(loss_only), params), lr, momentum,
                                           weight_decay)
    for got, want, before in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(expected),
                                 jax.tree_util.tree_leaves(params)):
        assert relative_error(np.asarray(got) - before, want - np.asarray(before)) <= 1e-9
    for got, want in zip(jax.tree_util.tree_leaves(ours_velocity), jax.tree_util.tree_leaves(expected_velocity)):
        assert relative_error(got, want) <= 1e-9


def test_short_training_learns(mnist):
    """The loss falls and the accuracy rises; the answers train returns, which main reports as the
    final test accuracy instead of evaluating again, are those of the parameters it returns."""
    params, epochs, compile_seconds, train_seconds, predictions = run_short(mnist)
    losses = [e["train_loss"] for e in epochs]
    assert losses[0] < 2.3 and losses[-1] < 0.5 * losses[0], losses
    assert epochs[-1]["test_accuracy"] > 0.85  # chance is 0.10
    assert 0 < compile_seconds <= train_seconds
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))
    test_images, test_labels = mnist[2:]
    answers = model.make_predict(model.build_network("modern"))(params, devices.pad_to_chunks(test_images))
    np.testing.assert_array_equal(predictions, np.asarray(answers)[:len(test_labels)])
    assert model.accuracy_of(predictions, test_labels) == epochs[-1]["test_accuracy"]


def test_same_flags_give_the_same_numbers(mnist):
    two_epochs = ("--epochs", "2")
    first, second = run_short(mnist, two_epochs), run_short(mnist, two_epochs)
    assert [e["train_loss"] for e in first[1]] == [e["train_loss"] for e in second[1]]
    np.testing.assert_array_equal(first[0][4]["weights"], second[0][4]["weights"])
    other_seed = run_short(mnist, two_epochs, seed=1)
    assert [e["train_loss"] for e in other_seed[1]] != [e["train_loss"] for e in first[1]]


def test_diverging_learning_rate_is_reported(mnist):
    with pytest.raises(errors.UsageError, match=r"in epoch 1, .*diverge; try a smaller --lr"):
        run_short(mnist, extra=("--lr", "1e6"))


def test_a_weight_decay_that_diverges_on_its_own_is_named(mnist):
    """lr x weight decay = 0.1 x 100 = 10 > 2 (1 + 0.9) = 3.8: the decay alone makes the weights grow
    without bound (THEORY.md §5), and the message says so rather than blaming the learning rate only."""
    with pytest.raises(errors.UsageError, match=r"in epoch 1, .*: lr x weight decay = 0.1 x 100.0 = 10 exceeds "
                                               r"2 \(1 \+ momentum\) = 3.8, past which the decay alone makes "
                                               r"training diverge; try a smaller --lr or a much smaller "
                                               r"--weight-decay"):
        run_short(mnist, extra=("--weight-decay", "100"))


def test_divergence_stops_the_original_network_too(mnist):
    """The original's clipped loss can never exceed -ln(1e-7) = 16.1; the run must stop all the same."""
    args = flags.parse_args(["--preset", "seed", "--lr", "50", "--train-size", "500", "--epochs", "2"])
    network = model.build_network("original")
    with pytest.raises(errors.UsageError, match=r"loss became 1\d\.\d+ in epoch 1, worse than a blind guess"):
        model.train(network, network.init(model.run_keys(0)[0]), args, *mnist, log=lambda line: None)


def test_accuracy_near_chance_is_warned_about_once(mnist):
    """Labels shuffled away from their images leave nothing to learn: accuracy stays near chance,
    and one warning line says so. A run that learns prints none."""
    train_images, train_labels, test_images, test_labels = mnist
    shuffled = np.random.default_rng(0).permutation(train_labels[:3000])
    lines = []
    args = flags.parse_args(["--train-size", "3000", "--epochs", "2", "--batch-size", "32"])
    network = model.build_network("modern")
    model.train(network, network.init(model.run_keys(0)[0]), args, train_images, shuffled, test_images,
                test_labels, log=lines.append)
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and "within 5 points of chance (11.35%" in warnings[0], lines
    learned = []
    run_short(mnist, extra=("--epochs", "1"), log=learned.append)
    assert not [line for line in learned if line.startswith("warning:")], learned
    # Evaluated on a single image (--val-size 1), always answering its class is chance, and perfect.
    single = []
    model.train(network, network.init(model.run_keys(0)[0]), args, train_images, shuffled, test_images[:1],
                test_labels[:1], log=single.append)
    assert not [line for line in single if line.startswith("warning:")], single


def test_checkpoint_round_trip_and_refusals(tmp_path):
    network = model.build_network("modern")
    params = network.init(jax.random.PRNGKey(5))
    path = str(tmp_path / "net.npz")
    checkpoints.save_checkpoint(path, params, network)
    loaded = checkpoints.load_checkpoint(path, network)
    for a, b in zip(params, loaded):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    assert os.listdir(tmp_path) == ["net.npz"]  # no temporary file left behind

    with pytest.raises(errors.UsageError, match="'modern' network, .*--preset default"):
        checkpoints.load_checkpoint(path, model.build_network("original"))
    with pytest.raises(errors.UsageError, match="trained on 28x28 images in 10 classes, but this data has 28x28 "
                                               "images in 9 classes"):
        checkpoints.load_checkpoint(path, model.build_network("modern", num_classes=9))
    (tmp_path / "junk.npz").write_bytes(b"not a zip archive")
    with pytest.raises(errors.UsageError, match="not a checkpoint"):
        checkpoints.load_checkpoint(str(tmp_path / "junk.npz"), network)
    with np.load(path) as archive:
        other = dict(archive)
    np.savez(tmp_path / "other.npz", **{**other, "layer0/weights": np.zeros((2, 2))})
    with pytest.raises(errors.UsageError, match=r"layer0/weights should have shape \(5, 1, 3, 3\), found \(2, 2\)"):
        checkpoints.load_checkpoint(str(tmp_path / "other.npz"), network)
    with pytest.raises(errors.UsageError, match="no such file"):
        checkpoints.load_checkpoint(str(tmp_path / "absent.npz"), network)


@pytest.mark.parametrize("change, why", [
    (dict(network="resnet"), "a network 'resnet' that this model.py does not know"),
    (dict(input_shape=[1, 28]), r"input_shape \[1, 28\], not \(channels, height, width\)"),
    (dict(num_classes=1.5), "num_classes 1.5, not a number of classes"),
    (dict(ink_span=1.5), r"ink_span 1.5, not a fraction of the frame"),
    (dict(**{"run/config": "{not json"}), "run/config or run/epochs is not JSON"),
    (dict(**{"run/config": "[]"}), "run/config does not hold every flag of a run"),
    (dict(**{"run/shuffle_key": np.zeros(3, np.uint32)}), "run/shuffle_key is not a PRNG key"),
])
def test_a_damaged_checkpoint_is_refused_naming_the_record(tmp_path, change, why):
    """Records a --save could not have written: one line naming the record, not a traceback from
    wherever it would first be used (json, the shape's unpacking, ...)."""
    save_run(tmp_path / "run.npz")
    with np.load(tmp_path / "run.npz") as archive:
        arrays = {name: archive[name] for name in archive.files}
    np.savez(tmp_path / "damaged.npz", **{**arrays, **{name: np.asarray(value) for name, value in change.items()}})
    for flag in ("--load", "--resume"):
        with pytest.raises(errors.UsageError, match=f"{flag} .*damaged.npz: not a checkpoint written by --save \\({why}\\)"):
            checkpoints.read_checkpoint(flag, str(tmp_path / "damaged.npz"))


REFUSALS = [
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "-1"], "--batch-size"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--momentum", "1.5"], "--momentum"),
    (["--warmup-epochs", "16"], "--warmup-epochs must be 0 to --epochs (15), got 16"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be 0 to --epochs"),
    (["--train-size", "70000"], "--train-size 70000"),
    (["--val-size", "-1"], "--val-size"),
    (["--val-size", "60000"], "--val-size 60000 leaves none"),
    (["--val-size", "10000", "--train-size", "55000"], "after --val-size 10000 holds 10000 out"),
    (["--train-size", "100", "--batch-size", "200"], "--batch-size 200 exceeds --train-size 100"),
    (["--batch-size", "70000"], "--batch-size 70000 exceeds the 60000 training images; give a smaller"),
    (["--val-size", "59990"], "--batch-size 128 exceeds the 10 training images left after --val-size 59990"),
    (["--predict", "missing.png"], "missing.png"),
    (["--load", "missing.npz"], "missing.npz"),
    (["--resume", "missing.npz"], "missing.npz"),
    (["--resume", "run.npz", "--load", "run.npz"], "cannot be combined"),
    (["--eval-only"], "--eval-only needs --load"),
    (["--load", "net.npz", "--eval-only", "--predict", "x.png"], "--eval-only and --predict"),
    (["--load", "net.npz", "--eval-only", "--epochs", "3", "--lr", "0.5"],
     "--eval-only trains nothing, so --epochs, --lr would change nothing; leave them out"),
    (["--load", "net.npz", "--predict", "x.png", "--seed", "1"],
     "--load with --predict only classifies the images, so --seed would change nothing; leave it out"),
    (["--devices", "0"], "--devices must be at least 1"),
    (["--devices", "2"], "--devices 2: this process has 1 cpu device"),
    (["--devices", "3", "--batch-size", "100"], "does not split evenly over 3 devices; use 99 or 102"),
    (["--preset", "seed", "--devices", "2"], "cannot be split across 2 devices"),
    (["--num-processes", "2"], "need all three of --coordinator"),
    (["--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "2"], "--process-id must be 0 to 1"),
    (["--coordinator", "nowhere", "--num-processes", "2", "--process-id", "1"], "expected HOST:PORT"),
    (["--coordinator", "localhost:99999", "--num-processes", "2", "--process-id", "1"], "a port 1 to 65535"),
    (["--coordinator", "localhost:0", "--num-processes", "2", "--process-id", "0"], "a port 1 to 65535"),
    (["--seed", "2147483648"], "--seed must be -2147483648 to 2147483647"),
    (["--num-processes", "0"], "--num-processes must be at least 1"),
    (["--out-dir", "x.png"], "--out-dir x.png: is a file"),
    (["--out-dir", "x.png/pictures"], "x.png is a file, so no folder can be made there"),
    (["--save", "."], "--save .: is a folder"),
    (["--save", "x.png/run.npz"], "x.png is a file, so no folder can be made there"),
    (["--load", "."], "--load .: is a folder"),
    (["--save", "out/loss_curve.png"], "--save out/loss_curve.png: the run writes its loss_curve.png there"),
    (["--predict", "."], "--predict .: is a folder"),
    (["--save", ""], "--save: an empty path"),
    (["--resume", ""], "--resume: an empty path"),
    (["--out-dir", ""], "--out-dir: an empty path"),
    (["--compile-cache", ""], "--compile-cache: an empty path"),
    (["--compile-cache", "x.png/cache"], "x.png is a file, so no folder can be made there"),
    (["--compile-cache", "cache", "--no-compile-cache"], "not allowed with argument --compile-cache"),
    (["--epochs", "two"], "--epochs"),
    (["--preset", "fast"], "--preset"),
]


@pytest.mark.parametrize("flags, fragment", REFUSALS)
def test_nonsense_is_refused_in_one_line(tmp_path, capsys, monkeypatch, flags, fragment):
    """Each refusal as main() raises it, in this process; the command line's own handling of the
    same errors is checked once below, in a fresh one."""
    for name in ("run.npz", "net.npz", "x.png"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    with pytest.raises((errors.UsageError, SystemExit)) as raised:
        model.main(["--data-dir", os.path.join(ROOT, "data"), "--out-dir", str(tmp_path / "out"), *flags])
    message = str(raised.value) if raised.type is errors.UsageError else capsys.readouterr().err.strip()
    assert "\n" not in message and fragment in message, message
    assert raised.type is errors.UsageError or raised.value.code == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, fragment", [REFUSALS[3], REFUSALS[-2]])
def test_cli_refuses_nonsense_in_one_line(tmp_path, flags, fragment):
    result = run_cli(*flags, "--out-dir", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (tmp_path / "out").exists()


def test_cli_run_writes_metrics_pictures_checkpoint_and_predicts(tmp_path, small_run, small_mnist):
    """A tiny end-to-end run (conftest's small_run), then --load --eval-only; --predict on a PNG made
    from a test digit."""
    result, folder = small_run
    out = folder / "out"
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("JAX ") and "preset 'default'" in result.stdout
    assert "epoch   2/2" in result.stdout and "class 7;" in result.stdout
    # The checkpoint records, beside the run's flags, the devices it trained on (see --resume).
    with np.load(folder / "net.npz") as archive:
        assert json.loads(str(archive["run/config"]))["devices"] == 1
        assert float(archive["ink_span"]) == data.MNIST_INK_SPAN  # for a later --predict (data.ink_span)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"config", "epochs", "test_accuracy", "train_seconds", "compile_seconds", "jax_version",
            "device"} <= set(metrics)
    assert metrics["config"]["train_size"] == 1600 and metrics["config"]["batch_size"] == 64
    assert [sorted(e) for e in metrics["epochs"]] == [["epoch", "seconds", "test_accuracy", "train_loss"]] * 2
    assert 0.5 < metrics["test_accuracy"] <= 1
    for picture in ["loss_curve.png", "learned_filters.png", "confusion_matrix.png", "misclassified.png"]:
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", picture

    # The checkpoint evaluates to the same accuracy (here in this process: float32 all the same).
    lines = []
    assert model.main(["--load", str(folder / "net.npz"), "--eval-only", "--out-dir", str(tmp_path / "eval"),
                       "--data-dir", small_mnist], log=lines.append) == 0
    reloaded = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert reloaded["test_accuracy"] == metrics["test_accuracy"] and reloaded["epochs"] == []
    # It says what it does: no training flags, no training time.
    assert f"evaluating {folder / 'net.npz'} (modern network) on 500 test images" in lines[0], lines
    assert lines[1] == f"test accuracy {100 * metrics['test_accuracy']:.2f}% on 500 images", lines

    with pytest.raises(errors.UsageError, match="saved from the 'modern' network"):
        model.main(["--preset", "seed", "--load", str(folder / "net.npz"), "--eval-only",
                    "--data-dir", os.path.join(ROOT, "data"), "--out-dir", str(tmp_path / "seed")])


def drawn_beyond_the_canvas(figure):
    """How far (inches) anything drawn in figure reaches past its edges; 0 when it all fits."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    drawn = figure.get_tightbbox(FigureCanvasAgg(figure).get_renderer())
    width, height = figure.get_size_inches()
    return max(0.0, -drawn.x0, -drawn.y0, drawn.x1 - width, drawn.y1 - height)


# A run's losses: over a decade (the default run's 15 epochs); within one (a short run), where
# matplotlib labels the minor ticks too; flat near chance; far below 0.01 (fine-tuning, say).
@pytest.mark.parametrize("losses", [[0.2030, 0.0728, 0.0093], [1.0566, 0.3602, 0.2610], [2.3026, 2.2990],
                                    [0.00017, 0.00013]])
def test_the_loss_curve_keeps_its_labels_on_the_picture(losses):
    """Manual margins (no layout pass) must leave room for the tick labels: written as matplotlib
    writes them by default (3 x 10^-1), the minor ones of a loss within one decade pushed the
    y-axis label off the picture's left edge. And none is typeset by matplotlib's TeX-like parser,
    which takes a quarter of a second to build (PERFORMANCE.md)."""
    figure = pictures.loss_figure([{"epoch": epoch + 1, "train_loss": loss, "test_accuracy": 0.9}
                                for epoch, loss in enumerate(losses)])
    assert drawn_beyond_the_canvas(figure) == 0
    labels = [label.get_text() for label in figure.axes[0].yaxis.get_ticklabels(which="both")]
    assert any(labels) and not any("$" in label for label in labels), labels


def test_the_other_pictures_keep_their_labels_on_them():
    """The other three pictures at their most crowded: the filters of a colour first layer of one
    and of two filters (each filter's column is narrower than the title, which overhung the picture),
    20 classes (the most whose counts are written in the cells), small colour images among the
    misclassified."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 20, 1000)
    predictions = np.where(rng.random(1000) < 0.5, labels, (labels + 1) % 20)
    images = rng.integers(0, 256, (1000, 12, 12, 3)).astype(np.uint8)
    figures = {"one colour filter": pictures.filters_figure(rng.normal(size=(1, 3, 5, 5))),
               "two grey filters": pictures.filters_figure(rng.normal(size=(2, 1, 3, 3))),
               "20 classes": pictures.confusion_figure(labels, predictions, 20),
               "small colour images": pictures.misclassified_figure(images, labels, predictions)}
    for name, figure in figures.items():
        assert drawn_beyond_the_canvas(figure) == 0, name


def test_the_misclassified_picture_says_how_many_it_shows():
    labels = np.arange(100) % 10
    for wrong, title in [(0, "no test image misclassified"), (1, "the 1 misclassified test image"),
                         (60, "the first 48 of 60 misclassified test images")]:
        predictions = np.where(np.arange(100) < wrong, (labels + 1) % 10, labels)
        figure = pictures.misclassified_figure(np.zeros((100, 28, 28), np.uint8), labels, predictions)
        assert figure.get_suptitle() == title


@pytest.mark.parametrize("error, amount", [
    # As `python model.py --batch-size 60000` met it on CPU under a 6 GB memory limit (ulimit -v):
    # a traceback ending in this line, from inside JAX. A GPU's says RESOURCE_EXHAUSTED instead.
    (jax.errors.JaxRuntimeError("INTERNAL: Error dispatching computation: Out of memory allocating 5354378880 bytes."),
     " (an allocation of 5.0 GiB failed)"),
    (jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1073741824 bytes."),
     " (an allocation of 1.0 GiB failed)"),
    (MemoryError(), "")])
def test_running_out_of_memory_is_one_line(monkeypatch, error, amount):
    def run_out(argv):
        raise error

    def exit_now(status, leave_together=True):
        raise SystemExit(status)

    monkeypatch.setattr(exits, "exit_now", exit_now)
    with pytest.raises(SystemExit) as ended:
        exits.run_as_program(run_out, [])
    assert ended.value.code == (f"model.py: error: out of memory{amount}: the run needs more memory than this "
                                "machine gives it; a smaller --batch-size needs less; every file written so far is "
                                "complete")


def test_a_platform_jax_cannot_start_is_one_line():
    """JAX_PLATFORMS naming a platform this JAX lacks (a GPU's without its plugin gives a bare
    AssertionError; an unknown name, as here, a RuntimeError): one line, not JAX's traceback."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "model.py")], capture_output=True, text=True,
                            timeout=120, env=dict(CLI_ENVIRONMENT, JAX_PLATFORMS="nosuchdevice"))
    assert result.returncode == 1 and result.stdout == "", result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "model.py: error: JAX cannot start its devices (JAX_PLATFORMS=nosuchdevice): "), result.stderr


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs Linux's /proc")
def test_a_folder_where_no_file_can_be_made_is_refused_before_training():
    """/proc takes no new file from anybody, root included, though its permission bits let root
    write: the check tries to make a file, as the run will, rather than read the bits."""
    with pytest.raises(errors.UsageError, match="^--out-dir /proc/out: cannot write in /proc "):
        model.main(["--out-dir", "/proc/out", "--data-dir", os.path.join(ROOT, "data")])
    with pytest.raises(errors.UsageError, match="^--save /proc/out/run.npz: cannot write in /proc "):
        model.main(["--save", "/proc/out/run.npz", "--data-dir", os.path.join(ROOT, "data")])


def test_a_folder_without_write_permission_is_refused_before_training(tmp_path, monkeypatch):
    """As a user without write permission there sees it (the suite may run as root, who has it
    everywhere, so the permission is denied by hand)."""
    def denied(**_):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(files.tempfile, "TemporaryFile", denied)
    with pytest.raises(errors.UsageError,
                       match=f"^--out-dir {tmp_path}/out: cannot write in {tmp_path} \\(Permission denied\\);"):
        model.main(["--out-dir", str(tmp_path / "out"), "--data-dir", os.path.join(ROOT, "data")])


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch):
    """What the checks before training cannot foresee (a full disk) still ends in one line naming
    the file the run was writing, not the temporary file it never saw, and no traceback."""
    def fill_the_disk(tmp):
        with open(tmp, "w") as f:
            f.write("{")
        raise OSError(errno.ENOSPC, "No space left on device")  # as f.write raises it: no file name

    def exit_now(status, leave_together=True):
        raise SystemExit(status)

    path = str(tmp_path / "out" / "metrics.json")
    monkeypatch.setattr(exits, "exit_now", exit_now)
    with pytest.raises(SystemExit) as ended:
        exits.run_as_program(lambda argv: files.write_atomically(path, fill_the_disk), [])
    assert ended.value.code == f"model.py: error: {path}: No space left on device"
    assert os.listdir(tmp_path / "out") == []  # no temporary file left behind


def test_shipped_mnist_is_found_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.path.samefile(flags.parse_args([]).data_dir, os.path.join(ROOT, "data"))


def test_nan_loss_stops_training_and_writes_nothing(tmp_path):
    """main() as the command line runs it; that a UsageError becomes one line there is checked above."""
    with pytest.raises(errors.UsageError, match="loss became nan in epoch 1, .*smaller --lr") as raised:
        model.main(["--train-size", "3000", "--batch-size", "32", "--epochs", "2", "--lr", "1e38",
                    "--out-dir", str(tmp_path / "out"),
                    "--data-dir", os.path.join(ROOT, "data"), "--save", str(tmp_path / "net.npz")])
    assert "\n" not in str(raised.value)
    assert os.listdir(tmp_path) == []


def test_a_path_that_is_not_a_regular_file_is_refused_before_training(tmp_path):
    """The atomic write renames a new file over the path: over a device or a named pipe (as root,
    /dev/full itself) it would replace the node with a regular file and report success. Each such
    output path is refused before training, in one line."""
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "out").mkdir()
    os.mkfifo(tmp_path / "out" / "loss_curve.png")
    (tmp_path / "taken" / "metrics.json").mkdir(parents=True)
    for given, message in [
        (["--save", "/dev/full"], "^--save /dev/full: is a character device, not a regular file; give the name of a "
                                  "file to write$"),
        (["--save", str(tmp_path / "pipe")], r": is a named pipe \(FIFO\), not a regular file"),
        (["--out-dir", "/dev/null"], "^--out-dir /dev/null: is a character device; name a folder"),
        (["--out-dir", str(tmp_path / "out")], r"loss_curve.png is a named pipe \(FIFO\), where the run writes its "
                                               "loss_curve.png; remove it, or name another --out-dir$"),
        (["--out-dir", str(tmp_path / "taken")], "metrics.json is a folder, where the run writes its metrics.json"),
    ]:
        with pytest.raises(errors.UsageError, match=message):
            files.check_output_paths(flags.parse_args(given))
    result = run_cli("--epochs", "1", "--save", "/dev/full", cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == "", result.stdout
    assert result.stderr == ("model.py: error: --save /dev/full: is a character device, not a regular file; give the "
                             "name of a file to write\n")
    assert os.path.exists("/dev/full") and not os.path.isfile("/dev/full")


def test_a_symbolic_link_is_written_through_to_its_file(tmp_path):
    target = tmp_path / "real.npz"
    target.write_text("before")
    (tmp_path / "link.npz").symlink_to(target)

    def write(tmp):
        with open(tmp, "w") as f:
            f.write("after")

    files.write_atomically(str(tmp_path / "link.npz"), write)
    assert (tmp_path / "link.npz").is_symlink() and target.read_text() == "after"
    assert sorted(os.listdir(tmp_path)) == ["link.npz", "real.npz"]


def test_a_checkpoint_of_another_format_is_refused_in_one_line(tmp_path):
    network = model.build_network("modern")
    path = str(tmp_path / "net.npz")
    checkpoints.save_checkpoint(path, network.init(jax.random.PRNGKey(0)), network)
    with np.load(path) as archive:
        stored = dict(archive)
    np.savez(tmp_path / "future.npz", **{**stored, "format": np.array(2)})
    np.savez(tmp_path / "older.npz", **{name: value for name, value in stored.items() if name != "format"})
    for name, written in [("future.npz", "format 2"), ("older.npz", "no format recorded")]:
        with pytest.raises(errors.UsageError, match=f"^--load {tmp_path / name}: a checkpoint of {written}, but this "
                                                    "model.py reads format 1 only; save it again with this model.py$"):
            checkpoints.load_checkpoint(str(tmp_path / name), network)
