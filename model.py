"""Train the MNIST CNN with hand-derived gradients: `python model.py --help` lists every flag.

    Conv 5 filters 3x3 -> ReLU -> MaxPool 2/2 -> Flatten 845 -> Dense 64 -> ReLU -> Dense 10 -> softmax

Every gradient comes from the layers' own backward methods (THEORY.md §4), chained here in reverse
order; plain or momentum SGD applies them (THEORY.md §5). JAX only compiles and runs the arrays:
one training epoch is a single jitted function: the dataset stays on the device as uint8, the
epoch's images are gathered in their shuffled order, and a `lax.scan` steps through the minibatches,
scaling each to [0, 1] as it goes.

Two presets:
  --preset default  all 60,000 images, reshuffled every epoch, minibatches of 128, SGD with momentum,
                    weight decay and a cosine learning-rate decay, per-filter conv biases, fused
                    softmax-cross-entropy.
  --preset seed     the original run exactly: the first 5,000 images in file order, one sample per
                    step, lr 0.01, 10 epochs, the original's initialisation, untied conv biases,
                    the `x == max` pooling gradient, and a Softmax layer followed by the clipped
                    categorical cross-entropy.
"""

import argparse
import functools
import json
import math
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from Convolutional import Convolutional
from DenseLayer import Dense, Flatten, ReLU
from Pooling_layer import MaxPool
from data import IMAGE_SIZE, NUM_CLASSES, DataError, load_mnist
from loss import CategoricalCrossEntropy, Softmax, SoftmaxCrossEntropy

PRESETS = {
    "default": dict(epochs=15, batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4,
                    schedule="cosine", train_size=60000, shuffle=True, seed=0),
    "seed": dict(epochs=10, batch_size=1, lr=0.01, momentum=0.0, weight_decay=0.0,
                 schedule="constant", train_size=5000, shuffle=False, seed=0),
}
# The network each preset builds; a checkpoint records it and refuses to load into the other.
PRESET_NETWORK = {"default": "modern", "seed": "original"}
# A blind guess, the same probability 1/K for each of K classes, scores a loss of ln K. Training
# starts near it and goes down; an epoch whose mean loss ends clearly above it (this factor times
# ln K) has been thrown off by updates that overshoot. The clipped loss of the original network
# never exceeds -ln(1e-7) = 16.1, so the bound has to sit well below that to catch its divergence.
DIVERGED_LOSS_FACTOR = 1.5
# An epoch whose accuracy is within this much of always answering the most common class has
# learned nothing worth the name, diverged or not.
NEAR_CHANCE = 0.05
EVAL_CHUNK = 1000  # test images per compiled evaluation step: bounds memory, not accuracy
# Training steps traced per loop iteration of the epoch's lax.scan. XLA copies the loop-carried
# parameters at the top of every iteration; with two steps per iteration the step in the middle
# needs no copy (same arithmetic; PERFORMANCE.md has the timings).
SCAN_UNROLL = 2


class UsageError(Exception):
    """A flag value or file the user gave cannot work; the message is one line for the user."""


# ----------------------------------------------------------------------------------------------
# The network: layers chained forward, gradients chained backward.


class Network:
    """A stack of layers ending in a loss, each layer with init / forward / backward.

    params is a list with one dict per layer (empty for layers without parameters); grads has
    exactly the same structure, so the update is one tree_map over both.
    """

    def __init__(self, layers, loss, shared_init_key=False):
        self.layers, self.loss = layers, loss
        # The original drew every layer's weights from one and the same key; a fresh network
        # gives each layer a key of its own.
        self.shared_init_key = shared_init_key

    def init(self, key):
        keys = [key] * len(self.layers) if self.shared_init_key else jax.random.split(key, len(self.layers))
        return [layer.init(k) for layer, k in zip(self.layers, keys)]

    def forward(self, params, x):
        """x (1, 28, 28, N) -> (output (N, 10), caches): probabilities or logits, as the loss expects."""
        caches = []
        for layer, layer_params in zip(self.layers, params):
            x, cache = layer.forward(layer_params, x)
            caches.append(cache)
        return x, caches

    def backward(self, params, caches, d_output):
        """d_output (N, 10), the loss's gradient -> grads, one dict per layer (THEORY.md §4.6)."""
        grads = [None] * len(self.layers)
        d_x = d_output
        for index in reversed(range(len(self.layers))):
            d_x, grads[index] = self.layers[index].backward(params[index], caches[index], d_x)
        return grads

    def loss_and_grads(self, params, x, labels):
        """x (1, 28, 28, N) float, labels (N,) int -> (mean loss over the batch, grads)."""
        output, caches = self.forward(params, x)
        targets = (labels[:, None] == jnp.arange(output.shape[-1])).astype(output.dtype)
        loss, loss_cache = self.loss.forward(output, targets)
        return loss, self.backward(params, caches, self.loss.backward(loss_cache))

    def probabilities(self, params, x):
        """x (1, 28, 28, N) -> class probabilities (N, 10)."""
        output, _ = self.forward(params, x)
        return self.loss.probabilities(output)


# Networks as data. Each entry lists its layers from input to output; sizes between layers (a
# convolution's input channels, the flattened size, the number of classes) are not written here but
# derived by build_network from the shape each layer's output_shape reports. A new network is a
# new entry.
CLASSES = "classes"  # stands for the number of classes, read from the data


def conv(kernel_size, depth, **options):
    return lambda shape, classes: Convolutional(shape, kernel_size, depth, **options)


def dense(size):
    return lambda shape, classes: Dense(shape[0], classes if size == CLASSES else size)


def sizeless(layer_class, *args, **options):
    """A layer whose construction needs no sizes (ReLU, MaxPool, Flatten, Softmax)."""
    return lambda shape, classes: layer_class(*args, **options)


NETWORKS = {
    # The default run's network (THEORY.md §6).
    "modern": dict(layers=[conv(3, 5), sizeless(ReLU), sizeless(MaxPool, 2, 2), sizeless(Flatten), dense(64), sizeless(ReLU),
                           dense(CLASSES)],
                   loss=SoftmaxCrossEntropy),
    # The original's: N(0, 1) filters with untied biases, every tied maximum of a pooling window
    # taking the gradient, a separate softmax and the clipped cross-entropy, and one key shared by
    # every layer's initialisation.
    "original": dict(layers=[conv(3, 5, tied_biases=False, weight_init="normal"), sizeless(ReLU),
                             sizeless(MaxPool, 2, 2, ties="all"), sizeless(Flatten), dense(64), sizeless(ReLU),
                             dense(CLASSES), sizeless(Softmax)],
                     loss=CategoricalCrossEntropy, shared_init_key=True),
}


def build_network(kind, input_shape=(1, IMAGE_SIZE, IMAGE_SIZE), num_classes=NUM_CLASSES):
    """The network NETWORKS[kind] for inputs of input_shape (C, H, W) and num_classes classes."""
    spec = NETWORKS[kind]
    layers, shape = [], tuple(input_shape)
    for make in spec["layers"]:
        layers.append(make(shape, num_classes))
        shape = layers[-1].output_shape(shape)
    if shape != (num_classes,):
        raise ValueError(f"the {kind!r} network ends in shape {shape}, not one score per class ({num_classes})")
    return Network(layers, spec["loss"](), shared_init_key=spec.get("shared_init_key", False))


# ----------------------------------------------------------------------------------------------
# SGD, one compiled epoch, compiled evaluation.


def sgd_update(params, velocity, grads, lr, momentum, weight_decay=0.0):
    """params <- params - lr * v with v <- momentum * v + grads (THEORY.md §5).

    With momentum 0 there is no velocity (None) and this is plain SGD, params - lr * grads.
    weight_decay adds the gradient of (weight_decay / 2) * |params|^2 to grads.
    """
    if weight_decay:
        grads = jax.tree_util.tree_map(lambda g, p: g + weight_decay * p, grads, params)
    if velocity is None:
        return jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads), None
    velocity = jax.tree_util.tree_map(lambda v, g: momentum * v + g, velocity, grads)
    return jax.tree_util.tree_map(lambda p, v: p - lr * v, params, velocity), velocity


def to_input(images_uint8):
    """(N, 28, 28) uint8 -> (1, 28, 28, N) float32 in [0, 1]: one channel, the batch last, as the
    convolution reads it (Convolutional.py)."""
    return jnp.moveaxis(images_uint8, 0, -1)[None].astype(jnp.float32) / 255


def make_train_epoch(network, momentum, weight_decay=0.0):
    """A jitted function running one epoch as a lax.scan over minibatches:

    (params, velocity, images (M, 28, 28) uint8, labels (M,), order (steps * B,) int32, the images
     of this epoch in the order they are used, learning_rates (steps,))
    -> (params, velocity, losses (steps,), each the batch's mean loss before that batch's update).
    params and velocity are donated: XLA may update them in place.
    """

    def train_epoch(params, velocity, images, labels, order, learning_rates):
        steps = learning_rates.shape[0]
        # One gather for the whole epoch, in uint8, then the scan steps through contiguous batches.
        # (Gathering each batch inside the step is slower on a CPU, PERFORMANCE.md: XLA re-executes
        # the gather inside every fusion that reads the batch, one per convolution offset.)
        batch_images = images[order].reshape(steps, -1, IMAGE_SIZE, IMAGE_SIZE)
        batch_labels = labels[order].reshape(steps, -1)

        def step(carry, batch):
            params, velocity = carry
            images, labels, lr = batch
            loss, grads = network.loss_and_grads(params, to_input(images), labels)
            params, velocity = sgd_update(params, velocity, grads, lr, momentum, weight_decay)
            return (params, velocity), loss

        (params, velocity), losses = lax.scan(step, (params, velocity),
                                              (batch_images, batch_labels, learning_rates), unroll=SCAN_UNROLL)
        return params, velocity, losses

    return jax.jit(train_epoch, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=None)  # one compiled evaluation per network, shared by train and main
def make_predict(network):
    """A jitted function: (params, images (M, 28, 28) uint8, M a multiple of EVAL_CHUNK) ->
    predicted classes (M,), computed EVAL_CHUNK images at a time so memory stays bounded."""

    def predict(params, images):
        chunks = images.reshape(-1, EVAL_CHUNK, IMAGE_SIZE, IMAGE_SIZE)
        return lax.map(lambda chunk: network.probabilities(params, to_input(chunk)).argmax(-1),
                       chunks).reshape(-1)

    return jax.jit(predict)


def pad_to_chunks(images):
    """Pads (M, 28, 28) with blank images to a multiple of EVAL_CHUNK; predictions past M are dropped."""
    missing = -len(images) % EVAL_CHUNK
    return jnp.pad(images, ((0, missing), (0, 0), (0, 0)))


def learning_rates(schedule, lr, epoch, epochs, steps):
    """The learning rate of every step of one epoch (0-based epoch number).

    "constant": lr throughout. "cosine": lr * (1 + cos(pi * t)) / 2 with t the fraction of all
    training steps done, falling smoothly from lr to near 0 at the last step.
    """
    if schedule == "constant":
        return jnp.full((steps,), lr, jnp.float32)
    done = (epoch * steps + jnp.arange(steps)) / (epochs * steps)
    return (lr * 0.5 * (1 + jnp.cos(math.pi * done))).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Files: every file a run writes goes through write_atomically; checkpoints.


def write_atomically(path, write):
    """Calls write(temporary_path), then renames the result to path, so path is never half-written."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path, params, network_kind):
    """Writes params and the network kind to an .npz file atomically."""
    arrays = {f"layer{index}/{name}": np.asarray(value)
              for index, layer_params in enumerate(params) for name, value in layer_params.items()}
    arrays["network"] = np.array(network_kind)

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object, so numpy adds no ".npz" to the name
            np.savez(f, **arrays)

    write_atomically(path, write)


def load_checkpoint(path, template, network_kind):
    """Reads a checkpoint written by save_checkpoint into the structure of `template` (the params
    of a freshly initialised network), refusing files that don't fit it."""
    require_file("--load", path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            stored = {name: archive[name] for name in archive.files}
    except Exception as error:  # np.load raises many types for files that are not .npz archives
        raise UsageError(f"--load {path}: not a checkpoint written by --save ({type(error).__name__})") from None
    if "network" not in stored:
        raise UsageError(f"--load {path}: not a checkpoint written by --save (no network record)")
    saved_kind = str(stored.pop("network"))
    if saved_kind != network_kind:
        preset_of = {kind: preset for preset, kind in PRESET_NETWORK.items()}
        raise UsageError(f"--load {path}: saved from the {saved_kind!r} network, but this run builds the "
                         f"{network_kind!r} one; load it with --preset {preset_of.get(saved_kind, '?')}")
    params = []
    for index, layer_params in enumerate(template):
        loaded = {}
        for name, value in layer_params.items():
            key = f"layer{index}/{name}"
            if key not in stored or stored[key].shape != value.shape:
                found = stored[key].shape if key in stored else "nothing"
                raise UsageError(f"--load {path}: {key} should have shape {value.shape}, found {found}; "
                                 "the checkpoint does not match this network")
            loaded[name] = jnp.asarray(stored.pop(key), value.dtype)
        params.append(loaded)
    if stored:
        raise UsageError(f"--load {path}: unexpected arrays {sorted(stored)}; "
                         "the checkpoint does not match this network")
    return params


# ----------------------------------------------------------------------------------------------
# Command line.


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line instead of usage plus error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None):
    parser = OneLineParser(
        prog="model.py",
        description="Train the MNIST CNN with hand-derived gradients (no autodiff). "
                    "Flags given explicitly override the preset's values.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="'default': modern run on all 60,000 images; 'seed': the original run "
                             "exactly (default: %(default)s)")
    for flag, kind, text in [
        ("--epochs", int, "passes over the training images"),
        ("--batch-size", int, "images per SGD step (the last incomplete batch of an epoch is skipped)"),
        ("--lr", float, "learning rate (the peak of the cosine schedule)"),
        ("--momentum", float, "SGD momentum in [0, 1); 0 is plain SGD"),
        ("--weight-decay", float, "L2 penalty coefficient added to every gradient (0: none)"),
        ("--train-size", int, "use the first N training images"),
        ("--seed", int, "seed for initialisation and shuffling"),
    ]:
        defaults = ", ".join(f"{name}: {values[flag[2:].replace('-', '_')]}" for name, values in PRESETS.items())
        parser.add_argument(flag, type=kind, default=None, help=f"{text} (preset {defaults})")
    parser.add_argument("--schedule", choices=["constant", "cosine"], default=None,
                        help="learning-rate schedule (preset default: cosine, seed: constant)")
    parser.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=None,
                        help="reshuffle the training images every epoch (preset default: yes, seed: no)")
    parser.add_argument("--data-dir", default="data",
                        help="folder with the four MNIST IDX files, .gz or raw (default: %(default)s)")
    parser.add_argument("--out-dir", default="results",
                        help="where metrics.json and the pictures go (default: %(default)s)")
    parser.add_argument("--save", metavar="PATH", help="write the trained parameters to PATH (.npz)")
    parser.add_argument("--load", metavar="PATH", help="start from parameters saved with --save")
    parser.add_argument("--eval-only", action="store_true",
                        help="with --load: evaluate on the test images, train nothing")
    parser.add_argument("--predict", metavar="IMAGE",
                        help="classify a PNG of a digit (any size, dark or light background) with "
                             "the loaded or just-trained model")
    args = parser.parse_args(argv)
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def check_args(args, available_train_images=None):
    """Refuses values that cannot work, before any work starts (UsageError, one line)."""
    if args.epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {args.epochs}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    if not (0 <= args.momentum < 1):
        raise UsageError(f"--momentum must be in [0, 1), got {args.momentum}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise UsageError(f"--weight-decay must be 0 or more, got {args.weight_decay}")
    if args.train_size < 1:
        raise UsageError(f"--train-size must be at least 1, got {args.train_size}")
    if available_train_images is not None and args.train_size > available_train_images:
        raise UsageError(f"--train-size {args.train_size} exceeds the {available_train_images} "
                         "training images available")
    if args.batch_size > args.train_size:
        raise UsageError(f"--batch-size {args.batch_size} exceeds --train-size {args.train_size}")
    if args.eval_only and not args.load:
        raise UsageError("--eval-only needs --load CHECKPOINT: there is nothing trained to evaluate")
    for flag, path in (("--load", args.load), ("--predict", args.predict)):
        if path:
            require_file(flag, path)


def require_file(flag, path):
    """Refuses a path given to `flag` that is not an existing file (UsageError, one line)."""
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: no such file")


# ----------------------------------------------------------------------------------------------
# Training run.


def run_keys(seed):
    """The two independent PRNG keys a run draws from its --seed: (initialisation, shuffling)."""
    init_key, shuffle_key = jax.random.split(jax.random.PRNGKey(seed))
    return init_key, shuffle_key


def describe_device():
    device = jax.devices()[0]
    return f"{device.platform} ({device.device_kind})"


def train(network, params, args, train_images, train_labels, test_images, test_labels, log=print):
    """Runs args.epochs epochs. Returns (params, epochs, compile_seconds, train_seconds), where
    epochs is a list of {"epoch", "train_loss", "test_accuracy", "seconds"}.
    Raises UsageError naming the epoch if training diverges (check_not_diverged); logs a warning
    the first time an epoch's test accuracy is near chance."""
    steps = args.train_size // args.batch_size
    momentum = args.momentum
    velocity = jax.tree_util.tree_map(jnp.zeros_like, params) if momentum > 0 else None
    images = jnp.asarray(train_images[:args.train_size])
    labels = jnp.asarray(train_labels[:args.train_size], jnp.int32)
    test_padded = pad_to_chunks(jnp.asarray(test_images))
    predict = make_predict(network)

    _, shuffle_key = run_keys(args.seed)
    in_order = jnp.arange(steps * args.batch_size, dtype=jnp.int32)

    start = time.perf_counter()
    train_epoch = make_train_epoch(network, momentum, args.weight_decay).lower(
        params, velocity, images, labels, in_order, learning_rates(args.schedule, args.lr, 0, args.epochs, steps)
    ).compile()
    compile_seconds = time.perf_counter() - start
    train_seconds = compile_seconds

    # Chance: the accuracy of always answering the test set's most common class.
    chance = float(np.bincount(np.asarray(test_labels)).max() / len(test_labels))
    warned_near_chance = False
    epochs = []
    for epoch in range(args.epochs):
        if args.shuffle:
            shuffle_key, epoch_key = jax.random.split(shuffle_key)
            order = jax.random.permutation(epoch_key, args.train_size)[:steps * args.batch_size]
            order = order.astype(jnp.int32)
        else:
            order = in_order
        rates = learning_rates(args.schedule, args.lr, epoch, args.epochs, steps)
        start = time.perf_counter()
        params, velocity, losses = train_epoch(params, velocity, images, labels, order, rates)
        # Each step's loss is that batch's mean, and every batch has batch_size images, so the
        # mean of the step losses is the mean per-image loss of the epoch.
        train_loss = float(losses.mean())
        seconds = time.perf_counter() - start
        train_seconds += seconds
        check_not_diverged(train_loss, epoch + 1, args.lr)
        accuracy = accuracy_of(predict(params, test_padded), test_labels)
        epochs.append({"epoch": epoch + 1, "train_loss": train_loss, "test_accuracy": accuracy,
                       "seconds": seconds})
        log(f"epoch {epoch + 1:3d}/{args.epochs}  train loss {train_loss:.4f}  "
            f"test accuracy {100 * accuracy:6.2f}%  {seconds:7.3f} s")
        if not warned_near_chance and accuracy < chance + NEAR_CHANCE:
            warned_near_chance = True
            log(f"warning: test accuracy {100 * accuracy:.2f}% in epoch {epoch + 1} is within "
                f"{100 * NEAR_CHANCE:.0f} points of chance ({100 * chance:.2f}%, always answering the most "
                f"common class): the learning rate {args.lr} may be too high, or too low for "
                f"{args.epochs} epochs, or the labels may not belong to the images")
    return params, epochs, compile_seconds, train_seconds


def check_not_diverged(train_loss, epoch, lr, num_classes=NUM_CLASSES):
    """Raises UsageError (one line, naming the epoch) if an epoch's mean loss is not finite or is
    clearly worse than a blind guess's ln K."""
    blind_guess = math.log(num_classes)
    if not (train_loss <= DIVERGED_LOSS_FACTOR * blind_guess):  # also catches NaN: it compares False
        raise UsageError(f"the training loss became {train_loss:.4g} in epoch {epoch}, worse than a blind "
                         f"guess (ln {num_classes} = {blind_guess:.2f}): the learning rate {lr} makes "
                         "training diverge; try a smaller --lr")


def accuracy_of(predictions, labels):
    """Fraction of labels matched by predictions (which may run longer, over padding images)."""
    return float(np.mean(np.asarray(predictions)[:len(labels)] == labels))


def load_png_digit(path):
    """A PNG of a digit -> (28, 28) uint8 like MNIST: grayscale, white ink on black, 28x28."""
    import matplotlib.image

    try:
        image = np.asarray(matplotlib.image.imread(path), np.float32)
    except Exception as error:  # matplotlib/Pillow raise many types for unreadable files
        raise UsageError(f"--predict {path}: not a readable PNG image ({type(error).__name__})") from None
    if image.ndim == 3:
        image = image[..., :3].mean(axis=-1) if image.shape[-1] >= 3 else image[..., 0]
    if image.ndim != 2 or min(image.shape) < 1:
        raise UsageError(f"--predict {path}: expected a 2-D image, got shape {image.shape}")
    if image.max() > 1:  # integer PNGs may come back as 0..255
        image = image / 255.0
    # MNIST digits are light ink on a dark background; a photo or drawing is usually the reverse.
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    if border.mean() > 0.5:
        image = 1.0 - image
    small = jax.image.resize(jnp.asarray(image), (IMAGE_SIZE, IMAGE_SIZE), "linear", antialias=True)
    return np.asarray(jnp.clip(jnp.round(small * 255), 0, 255), np.uint8)


# ----------------------------------------------------------------------------------------------
# What a run leaves behind: metrics.json and four pictures, each written atomically.


def write_outputs(out_dir, metrics, kernels, test_images, test_labels, predictions):
    """metrics.json, loss_curve.png (if anything was trained), learned_filters.png,
    confusion_matrix.png and misclassified.png in out_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)

    def save_figure(figure, name):
        write_atomically(os.path.join(out_dir, name), lambda tmp: figure.savefig(tmp, format="png", dpi=110))
        plt.close(figure)

    def write_json(tmp):
        with open(tmp, "w") as f:
            json.dump(metrics, f, indent=2)

    write_atomically(os.path.join(out_dir, "metrics.json"), write_json)

    if metrics["epochs"]:
        epochs = [e["epoch"] for e in metrics["epochs"]]
        figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
        loss_axis.semilogy(epochs, [e["train_loss"] for e in metrics["epochs"]], "o-")
        loss_axis.set(xlabel="epoch", ylabel="mean training loss (log scale)", title="training loss")
        accuracy_axis.plot(epochs, [100 * e["test_accuracy"] for e in metrics["epochs"]], "o-", color="C1")
        accuracy_axis.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
        for axis in (loss_axis, accuracy_axis):
            axis.grid(alpha=0.3)
            axis.set_xticks(epochs if len(epochs) <= 20 else epochs[::len(epochs) // 10])
        figure.tight_layout()
        save_figure(figure, "loss_curve.png")

    kernels = np.asarray(kernels)[:, 0]  # (D, K, K): the first layer reads one channel
    figure, axes = plt.subplots(1, len(kernels), figsize=(2.2 * len(kernels), 2.6))
    limit = np.abs(kernels).max()
    for index, (axis, kernel) in enumerate(zip(np.atleast_1d(axes), kernels)):
        axis.imshow(kernel, cmap="RdBu_r", vmin=-limit, vmax=limit)
        for (row, column), value in np.ndenumerate(kernel):
            axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8)
        axis.set_title(f"filter {index}")
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle("learned 3x3 kernels of the convolution (red > 0 > blue)")
    figure.tight_layout()
    save_figure(figure, "learned_filters.png")

    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    np.add.at(confusion, (np.asarray(test_labels, np.int64), predictions), 1)
    figure, axis = plt.subplots(figsize=(6.5, 5.5))
    image = axis.imshow(np.log1p(confusion), cmap="Blues")
    for (row, column), count in np.ndenumerate(confusion):
        axis.text(column, row, str(count), ha="center", va="center", fontsize=7,
                  color="white" if image.norm(np.log1p(count)) > 0.6 else "black")
    axis.set(xlabel="predicted digit", ylabel="true digit", xticks=range(NUM_CLASSES), yticks=range(NUM_CLASSES),
             title=f"confusion matrix, {len(test_labels)} test images")
    figure.tight_layout()
    save_figure(figure, "confusion_matrix.png")

    wrong = np.flatnonzero(predictions != test_labels)[:48]
    columns = 8
    rows = max(1, math.ceil(len(wrong) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(1.4 * columns, 1.6 * rows), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, index in zip(axes.ravel(), wrong):
        axis.imshow(test_images[index], cmap="gray_r")
        axis.set_title(f"true {test_labels[index]}, said {predictions[index]}", fontsize=8)
    figure.suptitle(f"first {len(wrong)} of {int((predictions != test_labels).sum())} misclassified test digits")
    figure.tight_layout()
    save_figure(figure, "misclassified.png")


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    network_kind = PRESET_NETWORK[args.preset]
    train_images, train_labels, test_images, test_labels = load_mnist(args.data_dir)
    check_args(args, available_train_images=len(train_images))
    predict_image = load_png_digit(args.predict) if args.predict else None

    log = print
    device = describe_device()
    log(f"JAX {jax.__version__} on {device}; preset {args.preset!r} ({network_kind} network): "
        f"{args.train_size} training images, batch {args.batch_size}, lr {args.lr}, "
        f"momentum {args.momentum}, weight decay {args.weight_decay}, {args.epochs} epochs")

    network = build_network(network_kind)
    init_key, _ = run_keys(args.seed)
    params = network.init(init_key)
    if args.load:
        params = load_checkpoint(args.load, params, network_kind)

    if args.eval_only:
        epochs, compile_seconds, train_seconds = [], 0.0, 0.0
    else:
        params, epochs, compile_seconds, train_seconds = train(
            network, params, args, train_images, train_labels, test_images, test_labels, log)

    predictions = np.asarray(make_predict(network)(params, pad_to_chunks(jnp.asarray(test_images))))
    predictions = predictions[:len(test_labels)]
    test_accuracy = accuracy_of(predictions, test_labels)
    log(f"test accuracy {100 * test_accuracy:.2f}% on {len(test_labels)} images; "
        f"training {train_seconds:.2f} s (compile {compile_seconds:.2f} s)")

    metrics = {
        "config": {name: getattr(args, name) for name in sorted(vars(args))},
        "epochs": epochs,
        "test_accuracy": test_accuracy,
        "train_seconds": train_seconds,
        "compile_seconds": compile_seconds,
        "jax_version": jax.__version__,
        "device": device,
    }
    write_outputs(args.out_dir, metrics, params[0]["weights"], test_images, test_labels, predictions)
    log(f"wrote metrics.json and pictures to {args.out_dir}/")
    if args.save:
        save_checkpoint(args.save, params, network_kind)
        log(f"saved parameters to {args.save}")
    if predict_image is not None:
        probabilities = np.asarray(network.probabilities(params, to_input(jnp.asarray(predict_image[None])))[0])
        log(f"{args.predict}: digit {int(probabilities.argmax())}; probabilities "
            + " ".join(f"{digit}:{p:.4f}" for digit, p in enumerate(probabilities)))


if __name__ == "__main__":
    try:
        main()
    except (UsageError, DataError) as error:
        sys.exit(f"model.py: error: {error}")
