"""Train the MNIST CNN with hand-derived gradients: `python model.py --help` lists every flag.

    Conv 5 filters 3x3 -> ReLU -> MaxPool 2/2 -> Flatten 845 -> Dense 64 -> ReLU -> Dense 10 -> softmax

Every gradient comes from the layers' own backward methods (THEORY.md §4), chained here in reverse
order; plain or momentum SGD applies them (THEORY.md §5). JAX only compiles and runs the arrays:
one training epoch is a single jitted function: the dataset stays on the device as uint8, the
epoch's images are gathered in their shuffled order, and a `lax.scan` steps through the minibatches,
scaling each to [0, 1] as it goes.

Three presets:
  --preset default  all 60,000 images, reshuffled every epoch, minibatches of 128, SGD with momentum,
                    weight decay and a cosine learning-rate decay, per-filter conv biases, fused
                    softmax-cross-entropy.
  --preset seed     the original run exactly: the first 5,000 images in file order, one sample per
                    step, lr 0.01, 10 epochs, the original's initialisation, untied conv biases,
                    the `x == max` pooling gradient, and a Softmax layer followed by the clipped
                    categorical cross-entropy.
  --preset lenet    LeNet-5 from the same layers (NETWORKS["lenet"]), trained like the default.
--data-dir trains on any other dataset in MNIST's IDX format (data.py); the network is built for its
image shape and number of classes.
"""

import os
import signal
import sys

# The line a run stopped at once ends with, naming what stopped it ("Ctrl-C", "SIGTERM").
STOPPED_BY = "model.py: stopped by {}; every file written so far is complete"
# The signals that stop training after its epoch (StopOnInterrupt), as the user knows them. Windows
# has no SIGHUP (HANGUP is None there), nor SIGPIPE.
HANGUP = getattr(signal, "SIGHUP", None)
STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
if HANGUP is not None:
    STOP_SIGNALS[HANGUP] = "SIGHUP"


def stop_at_once(signum, frame):
    """Ctrl-C (SIGINT) while model.py runs as a program, except while training and writing
    (StopOnInterrupt): nothing is being written then, so the process ends at once, in one line, with
    status 130. Python's own KeyboardInterrupt could land inside JAX's import or one of its callbacks,
    which prints a traceback or swallows the interrupt and carries on."""
    print(STOPPED_BY.format("Ctrl-C"), file=sys.stderr, flush=True)
    os._exit(130)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, stop_at_once)

# The imports below take a second or more: Ctrl-C is handled before them, so they come after code.
import argparse
import errno
import functools
import importlib
import json
import math
import re
import socket
import tempfile
import threading
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from Convolutional import Convolutional
from DenseLayer import Dense, Flatten, ReLU
from Pooling_layer import MaxPool
from data import (SHIPPED_MNIST, DataError, counted, dataset_file, fingerprint, image_size, ink_span, load_idx,
                  number_of_classes)
from loss import CategoricalCrossEntropy, Softmax, SoftmaxCrossEntropy

PRESETS = {
    "default": dict(epochs=15, batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4,
                    schedule="cosine", warmup_epochs=0, train_size=60000, shuffle=True, seed=0),
    "seed": dict(epochs=10, batch_size=1, lr=0.01, momentum=0.0, weight_decay=0.0,
                 schedule="constant", warmup_epochs=0, train_size=5000, shuffle=False, seed=0),
    "lenet": dict(epochs=20, batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine",
                  warmup_epochs=0, train_size=60000, shuffle=True, seed=0),
}
# The network each preset builds; a checkpoint records it and refuses to load into the other.
PRESET_NETWORK = {"default": "modern", "seed": "original", "lenet": "lenet"}
# A blind guess, the same probability 1/K for each of K classes, scores a loss of ln K. Training
# starts near it and goes down; an epoch whose mean loss ends clearly above it (this factor times
# ln K) has been thrown off by updates that overshoot. The clipped loss of the original network
# never exceeds -ln(1e-7) = 16.1, so the bound has to sit well below that to catch its divergence.
DIVERGED_LOSS_FACTOR = 1.5
# An epoch whose accuracy is within this much of always answering the most common class has
# learned nothing worth the name, diverged or not.
NEAR_CHANCE = 0.05
# The seeds a run accepts: its key is drawn by a compiled function whose argument is a 32-bit integer.
SEEDS = (-2 ** 31, 2 ** 31 - 1)
# Test images per compiled evaluation step: it bounds memory, not accuracy (each image's answer is
# the same in any chunk). In a run, 10,000 images are evaluated in chunks of 200 in about half the
# time they take in chunks of 1,000 (PERFORMANCE.md).
EVAL_CHUNK = 200
# Training steps traced per loop iteration of the epoch's lax.scan. XLA copies the loop-carried
# parameters at the top of every iteration; with two steps per iteration the step in the middle
# needs no copy (same arithmetic; PERFORMANCE.md has the timings).
SCAN_UNROLL = 2


# XLA's options for what runs once or once an epoch: drawing the initial weights, splitting keys,
# the shuffle's sort keys, the learning rates. That is integer hashing plus elementwise transforms,
# for which XLA's full optimisation (level 2) and its newer fusion emitters only make compiling
# slower, a second or more on every first run; the results are the same bit for bit.
ONCE_OPTIMISED = {"xla_backend_optimization_level": 1, "xla_cpu_use_fusion_emitters": False}

# Where a run keeps what XLA compiled for it (JAX's persistent compilation cache), unless
# JAX_COMPILATION_CACHE_DIR or --compile-cache says otherwise: a later run of the same shapes loads
# each function from there instead of compiling it again (PERFORMANCE.md, "Time outside training").
COMPILE_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                             "mnist-cnn-by-hand", "jax")


class UsageError(Exception):
    """A flag value or file the user gave cannot work; the message is one line for the user."""


# ----------------------------------------------------------------------------------------------
# The network: layers chained forward, gradients chained backward.


class Network:
    """A stack of layers ending in a loss, each layer with init / forward / backward.

    params is a list with one dict per layer (empty for layers without parameters); grads has
    exactly the same structure, so the update maps over both together (sgd_update).
    kind, input_shape (C, H, W) and num_classes K say what build_network built it for (a checkpoint
    records them).
    """

    def __init__(self, layers, loss, kind=None, input_shape=None, num_classes=None, shared_init_key=False):
        self.layers, self.loss = layers, loss
        self.kind, self.input_shape, self.num_classes = kind, input_shape, num_classes
        # The original drew every layer's weights from one and the same key; a fresh network
        # gives each layer a key of its own.
        self.shared_init_key = shared_init_key

    def draw(self, key):
        """Every layer's initial parameters from key, operation by operation (init compiles it)."""
        keys = [key] * len(self.layers) if self.shared_init_key else jax.random.split(key, len(self.layers))
        return [layer.init(layer_key) for layer, layer_key in zip(self.layers, keys)]

    def init(self, key):
        # Compiled as one function: drawn op by op, each random draw would be compiled on its own.
        # At ONCE_OPTIMISED the weights are the same, bit for bit, as drawn op by op
        # (tests/test_model.py checks it).
        return jax.jit(self.draw, compiler_options=ONCE_OPTIMISED)(key)

    def forward(self, params, x):
        """x (C, H, W, N) -> (output (N, K), caches): probabilities or logits, as the loss expects."""
        caches = []
        for layer, layer_params in zip(self.layers, params):
            x, cache = layer.forward(layer_params, x)
            caches.append(cache)
        return x, caches

    def backward(self, params, caches, d_output):
        """d_output (N, K), the loss's gradient -> grads, one dict per layer (THEORY.md §4.6)."""
        grads = [None] * len(self.layers)
        d_x = d_output
        for index in reversed(range(len(self.layers))):
            d_x, grads[index] = self.layers[index].backward(params[index], caches[index], d_x)
        return grads

    def loss_and_grads(self, params, x, labels):
        """x (C, H, W, N) float, labels (N,) int -> (mean loss over the batch, grads)."""
        output, caches = self.forward(params, x)
        targets = (labels[:, None] == jnp.arange(output.shape[-1])).astype(output.dtype)
        loss, loss_cache = self.loss.forward(output, targets)
        return loss, self.backward(params, caches, self.loss.backward(loss_cache))

    def probabilities(self, params, x):
        """x (C, H, W, N) -> class probabilities (N, K)."""
        output, _ = self.forward(params, x)
        return self.loss.probabilities(output)


# Networks as data. Each entry lists its layers from input to output; sizes between layers (a
# convolution's input channels, the flattened size, the number of classes) are not written here but
# derived by build_network from the shape each layer's output_shape reports. A new network is a
# new entry.
CLASSES = "classes"  # stands for the number of classes, build_network's num_classes


def conv(kernel_size, depth, **options):
    return lambda shape, classes: Convolutional(shape, kernel_size, depth, **options)


def dense(size):
    return lambda shape, classes: Dense(shape[0], classes if size == CLASSES else size)


def sizeless(layer_class, *args, **options):
    """A layer whose construction needs no sizes (ReLU, MaxPool, Flatten, Softmax)."""
    return lambda shape, classes: layer_class(*args, **options)


NETWORKS = {
    # The default run's network (THEORY.md §6).
    "modern": dict(layers=[conv(3, 5), sizeless(ReLU), sizeless(MaxPool, 2, 2), sizeless(Flatten), dense(64),
                           sizeless(ReLU), dense(CLASSES)],
                   loss=SoftmaxCrossEntropy),
    # The original's: N(0, 1) filters with untied biases, every tied maximum of a pooling window
    # taking the gradient, a separate softmax and the clipped cross-entropy, and one key shared by
    # every layer's initialisation.
    "original": dict(layers=[conv(3, 5, tied_biases=False, weight_init="normal"), sizeless(ReLU),
                             sizeless(MaxPool, 2, 2, ties="all"), sizeless(Flatten), dense(64), sizeless(ReLU),
                             dense(CLASSES), sizeless(Softmax)],
                     loss=CategoricalCrossEntropy, shared_init_key=True),
    # LeNet-5 (LeCun et al. 1998) as it is usually rebuilt today: ReLU and max-pooling in place of
    # the scaled tanh and trainable subsampling, and a plain dense output layer (THEORY.md §6).
    "lenet": dict(layers=[conv(5, 6, padding=2), sizeless(ReLU), sizeless(MaxPool, 2, 2),
                          conv(5, 16), sizeless(ReLU), sizeless(MaxPool, 2, 2), sizeless(Flatten),
                          dense(120), sizeless(ReLU), dense(84), sizeless(ReLU), dense(CLASSES)],
                  loss=SoftmaxCrossEntropy),
}


# MNIST's: one grey channel of 28 x 28 pixels, ten digits.
MNIST_INPUT_SHAPE, MNIST_CLASSES = (1, 28, 28), 10


def build_network(kind, input_shape=MNIST_INPUT_SHAPE, num_classes=MNIST_CLASSES):
    """The network NETWORKS[kind] for inputs of input_shape (C, H, W) and num_classes classes.
    Raises ValueError, saying which layer, if the inputs are too small for the network."""
    spec = NETWORKS[kind]
    layers, shape = [], tuple(input_shape)
    for make in spec["layers"]:
        layers.append(make(shape, num_classes))
        shape, input_of_layer = layers[-1].output_shape(shape), shape
        if min(shape) < 1:
            raise ValueError(f"layer {len(layers)}, {type(layers[-1]).__name__}, turns {input_of_layer} into {shape}")
    if shape != (num_classes,):
        raise ValueError(f"the {kind!r} network ends in shape {shape}, not one score per class ({num_classes})")
    return Network(layers, spec["loss"](), kind, tuple(input_shape), num_classes,
                   shared_init_key=spec.get("shared_init_key", False))


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
    """(N, H, W) grey or (N, H, W, C) uint8 -> (C, H, W, N) float32 in [0, 1]: the channels first,
    the batch last, as the convolution reads them (Convolutional.py)."""
    if images_uint8.ndim == 3:
        x = jnp.moveaxis(images_uint8, 0, -1)[None]
    else:
        x = jnp.transpose(images_uint8, (3, 1, 2, 0))
    return x.astype(jnp.float32) / 255


# The name of the one mesh axis data-parallel training splits every batch along.
BATCH_AXIS = "batch"


def batch_loss_and_grads(network, mesh=None):
    """(params, images (B, H, W) or (B, H, W, C) uint8, labels (B,)) -> (the batch's mean loss, grads).

    Without a mesh, one device computes it. With a mesh of D devices, each device runs the layers'
    own forward and backward on its B/D images, and the results are averaged across the devices
    (THEORY.md §5): every device then holds the same loss and gradients, and takes the same step.
    """
    def on_one_device(params, images, labels):
        return network.loss_and_grads(params, to_input(images), labels)

    if mesh is None:
        return on_one_device

    def on_each_device(params, images, labels):
        loss, grads = on_one_device(params, images, labels)
        # The all-reduce. Each device holds the mean loss and gradients over its own equal share of
        # the batch; their mean over the D devices is the mean over the whole batch.
        return lax.pmean((loss, grads), BATCH_AXIS)

    return jax.shard_map(on_each_device, mesh=mesh, in_specs=(P(), P(BATCH_AXIS), P(BATCH_AXIS)), out_specs=P())


def make_train_epoch(network, momentum, weight_decay=0.0, mesh=None):
    """A jitted function running one epoch as a lax.scan over minibatches:

    (params, velocity, images (M, H, W) or (M, H, W, C) uint8, labels (M,), order (steps * B,) int32, the images
     of this epoch in the order they are used, learning_rates (steps,))
    -> (params, velocity, losses (steps,), each the batch's mean loss before that batch's update).
    params and velocity are donated: XLA may update them in place. With a mesh, every batch is
    split across its devices (batch_loss_and_grads); all inputs and outputs are replicated.
    """
    loss_and_grads = batch_loss_and_grads(network, mesh)

    def train_epoch(params, velocity, images, labels, order, learning_rates):
        steps = learning_rates.shape[0]
        # One gather for the whole epoch, in uint8, then the scan steps through contiguous batches.
        # (Gathering each batch inside the step is slower on a CPU, PERFORMANCE.md: XLA re-executes
        # the gather inside every fusion that reads the batch, one per convolution offset.)
        batch_images = images[order].reshape((steps, -1) + images.shape[1:])
        batch_labels = labels[order].reshape(steps, -1)

        def step(carry, batch):
            params, velocity = carry
            images, labels, lr = batch
            loss, grads = loss_and_grads(params, images, labels)
            params, velocity = sgd_update(params, velocity, grads, lr, momentum, weight_decay)
            return (params, velocity), loss

        (params, velocity), losses = lax.scan(step, (params, velocity),
                                              (batch_images, batch_labels, learning_rates), unroll=SCAN_UNROLL)
        return params, velocity, losses

    return jax.jit(train_epoch, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=None)  # one compiled evaluation per network and mesh, shared by train and main
def make_predict(network, mesh=None):
    """A jitted function: (params, images (M, H, W) or (M, H, W, C) uint8, M a multiple of eval_chunk(mesh)) ->
    predicted classes (M,), computed a chunk at a time so memory stays bounded; with a mesh, each
    chunk split across its devices and the answers gathered, so that every device has them all."""

    def on_one_device(params, chunk):
        return network.probabilities(params, to_input(chunk)).argmax(-1)

    # With a mesh, all_gather hands every device all the answers; shard_map cannot prove that on its
    # own (check_vma), so it is told: the output is the same on every device.
    classify = on_one_device if mesh is None else jax.shard_map(
        lambda params, chunk: lax.all_gather(on_one_device(params, chunk), BATCH_AXIS, tiled=True),
        mesh=mesh, in_specs=(P(), P(BATCH_AXIS)), out_specs=P(), check_vma=False)

    def predict(params, images):
        chunks = images.reshape((-1, eval_chunk(mesh)) + images.shape[1:])
        return lax.map(lambda chunk: classify(params, chunk), chunks).reshape(-1)

    return jax.jit(predict)


def device_count(mesh=None):
    """How many devices a run trains and evaluates on: the mesh's, or the one device without a mesh."""
    return 1 if mesh is None else mesh.size


def eval_chunk(mesh=None):
    """Test images per compiled evaluation step: EVAL_CHUNK, rounded up to split evenly over the mesh."""
    devices = device_count(mesh)
    return -(-EVAL_CHUNK // devices) * devices


def pad_to_chunks(images, mesh=None):
    """Pads images (M, ...) with blank ones to a multiple of eval_chunk(mesh), as a numpy array;
    predictions past M are dropped."""
    missing = -len(images) % eval_chunk(mesh)
    return np.pad(np.asarray(images), ((0, missing),) + ((0, 0),) * (np.ndim(images) - 1))


def replicated(tree, mesh=None):
    """The arrays of tree as JAX arrays, with a mesh copied to every device of it (in every process:
    each process supplies the copies on its own devices, from the same values). Copied by
    jax.device_put: jnp.asarray would compile a function for every new shape."""
    if mesh is None:
        return jax.tree_util.tree_map(jax.device_put, tree)
    sharding = NamedSharding(mesh, P())
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda index: np.asarray(x)[index]), tree)


def local(tree):
    """One copy of each replicated array, on this process's first device: what can be read here."""
    return jax.tree_util.tree_map(lambda x: x.addressable_data(0), tree)


def learning_rates(schedule, lr, epoch, epochs, steps, warmup_epochs=0):
    """The learning rate of every step of one epoch (0-based epoch number).

    "constant": lr throughout. "cosine": lr * (1 + cos(pi * t)) / 2 with t the fraction of all
    training steps done, falling smoothly from lr to near 0 at the last step. With warmup_epochs
    W > 0, step s (counted from 0 over the whole run) takes min(1, (s + 1) / (W * steps)) times that:
    the rate climbs linearly over the first W epochs. At full rate from the first step, a high lr
    can push every pre-activation of a ReLU layer below 0 before the network has learned anything,
    and no gradient passes that layer again (THEORY.md §5; README.md's LeNet-5 section has such a run).
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
# program: with the divisor a constant, some rates change in their last bit (XLA may multiply by its
# reciprocal instead); as arguments, every rate is the same, bit for bit, as computed operation by
# operation (tests/test_model.py checks it).
@functools.partial(jax.jit, static_argnames="steps", compiler_options=ONCE_OPTIMISED)
def cosine_rates(half_lr, first_step, total_steps, steps):
    done = (first_step + jnp.arange(steps)) / total_steps
    return (half_lr * (1 + jnp.cos(math.pi * done))).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Files: every file a run writes goes through write_atomically; checkpoints.


def write_atomically(path, write):
    """Calls write(temporary_path), then renames the result to path, so path is never half-written.

    The file gets the permissions the user's umask gives a new file (0644 under the usual 022):
    mkstemp creates the temporary file private (0600), and a rename keeps a file's mode.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def current_umask():
    """The process's umask; reading it means setting it, so it is set straight back."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def save_checkpoint(path, params, network, velocity=None, run=None, span=None):
    """Writes params, and what they were trained for (the network's kind, input shape (C, H, W),
    number of classes and, where given, `span`: how much of their frame the training images'
    drawings span, data.ink_span, for --predict), to an .npz file atomically. A checkpoint that a
    run can be resumed from also holds the velocity (with momentum) and `run`: {"config": the run's
    flags, "shuffle_key": the shuffling key after the epochs done, "epochs": their per-epoch
    records}."""
    def layer_arrays(prefix, tree):
        return {f"{prefix}layer{index}/{name}": np.asarray(value)
                for index, layer_params in enumerate(tree) for name, value in layer_params.items()}

    arrays = layer_arrays("", params)
    arrays["network"] = np.array(network.kind)
    arrays["input_shape"] = np.array(network.input_shape)
    arrays["num_classes"] = np.array(network.num_classes)
    if span is not None:
        arrays["ink_span"] = np.array(span)
    if velocity is not None:
        arrays.update(layer_arrays("velocity/", velocity))
    if run is not None:
        arrays["run/config"] = np.array(json.dumps(run["config"]))
        arrays["run/epochs"] = np.array(json.dumps(run["epochs"]))
        arrays["run/shuffle_key"] = np.asarray(run["shuffle_key"])

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object, so numpy adds no ".npz" to the name
            np.savez(f, **arrays)

    write_atomically(path, write)


def read_checkpoint(flag, path):
    """The arrays of a checkpoint written by save_checkpoint, its run's "run/config" and "run/epochs"
    (if it holds a run) read from their JSON, refusing (UsageError, one line) a file that is not one."""
    require_file(flag, path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            stored = {name: archive[name] for name in archive.files}
    except Exception as error:  # np.load raises many types for files that are not .npz archives
        raise UsageError(f"{flag} {path}: not a checkpoint written by --save ({type(error).__name__})") from None
    try:
        stored.update(check_records(stored))
    except ValueError as error:
        raise UsageError(f"{flag} {path}: not a checkpoint written by --save ({error})") from None
    return stored


def check_records(stored):
    """Raises ValueError naming the first of a checkpoint's records (the arrays besides the
    parameters) that save_checkpoint would not have written. Returns the run's JSON records read,
    {"run/config": dict, "run/epochs": list}, or {} for a checkpoint of parameters only."""
    def record(name):
        if name not in stored:
            raise ValueError(f"no {name} record")
        return stored[name]

    if str(record("network")) not in NETWORKS:
        raise ValueError(f"a network {str(stored['network'])!r} that this model.py does not know")
    if "input_shape" in stored:  # checkpoints from before they recorded the data's shape lack both
        shape, classes = stored["input_shape"], record("num_classes")
        if shape.dtype.kind not in "iu" or shape.shape != (3,) or (shape < 1).any():
            raise ValueError(f"input_shape {shape.tolist()}, not (channels, height, width)")
        if classes.dtype.kind not in "iu" or classes.shape != () or classes < 2:
            raise ValueError(f"num_classes {classes.tolist()}, not a number of classes")
    if "ink_span" in stored:  # checkpoints from before it was recorded lack it
        span = stored["ink_span"]
        if span.dtype.kind != "f" or span.shape != () or not 0 < span <= 1:
            raise ValueError(f"ink_span {span.tolist()}, not a fraction of the frame")
    if "run/config" in stored:
        try:
            config, epochs = json.loads(str(stored["run/config"])), json.loads(str(record("run/epochs")))
        except json.JSONDecodeError:
            raise ValueError("run/config or run/epochs is not JSON") from None
        if isinstance(config, dict):
            config.setdefault("warmup_epochs", 0)  # runs saved before the flag existed had none
        if not isinstance(config, dict) or not set(RUN_FLAGS) <= set(config):
            raise ValueError("run/config does not hold every flag of a run")
        if not isinstance(epochs, list):
            raise ValueError("run/epochs is not a list of epochs")
        if record("run/shuffle_key").shape != (2,) or stored["run/shuffle_key"].dtype != np.uint32:
            raise ValueError("run/shuffle_key is not a PRNG key")
        return {"run/config": config, "run/epochs": epochs}
    return {}


def drawing_span(stored):
    """How much of their frame the drawings a checkpoint's network was trained on span (data.ink_span);
    MNIST's for a checkpoint from before checkpoints recorded it."""
    return float(stored["ink_span"]) if "ink_span" in stored else MNIST_INK_SPAN


def trained_for(stored):
    """(input shape (C, H, W), number of classes) a checkpoint's parameters were trained for; MNIST's
    for a checkpoint from before checkpoints recorded them."""
    if "input_shape" not in stored:
        return MNIST_INPUT_SHAPE, MNIST_CLASSES
    return tuple(int(size) for size in stored["input_shape"]), int(stored["num_classes"])


def describe_data(input_shape, num_classes):
    """'28x28 images in 10 classes' for (1, 28, 28), '12x12x3 images in 4 classes' for (3, 12, 12)."""
    C, H, W = input_shape
    return f"{image_size((H, W) if C == 1 else (H, W, C))} images in {num_classes} classes"


def check_checkpoint(stored, network, flag, path):
    """Refuses (UsageError, one line) a checkpoint saved from another network than this one, or
    trained on images of another shape or another number of classes."""
    saved_kind = str(stored["network"])
    if saved_kind != network.kind:
        preset_of = {kind: preset for preset, kind in PRESET_NETWORK.items()}
        raise UsageError(f"{flag} {path}: saved from the {saved_kind!r} network, but this run builds the "
                         f"{network.kind!r} one; load it with --preset {preset_of[saved_kind]}")
    if trained_for(stored) != (network.input_shape, network.num_classes):
        raise UsageError(f"{flag} {path}: trained on {describe_data(*trained_for(stored))}, but this data has "
                         f"{describe_data(network.input_shape, network.num_classes)}; pass --data-dir the "
                         "dataset it was trained on")


def layers_from(stored, prefix, template, flag, path):
    """The arrays stored under prefix ("" for params, "velocity/") in the structure of template."""
    tree = []
    for index, layer_params in enumerate(template):
        loaded = {}
        for name, value in layer_params.items():
            key = f"{prefix}layer{index}/{name}"
            if key not in stored or stored[key].shape != value.shape:
                found = stored[key].shape if key in stored else "nothing"
                raise UsageError(f"{flag} {path}: {key} should have shape {value.shape}, found {found}; "
                                 "the checkpoint does not match this network")
            loaded[name] = jax.device_put(np.asarray(stored[key], value.dtype))
        tree.append(loaded)
    expected = {f"{prefix}layer{index}/{name}" for index, layer_params in enumerate(template) for name in layer_params}
    unexpected = sorted(key for key in stored if key.startswith(prefix + "layer") and key not in expected)
    if unexpected:
        raise UsageError(f"{flag} {path}: unexpected arrays {unexpected}; the checkpoint does not match this network")
    return tree


def parameter_shapes(network):
    """The shapes and dtypes of the network's parameters, for reading a checkpoint: no random draw."""
    return jax.eval_shape(network.draw, jax.ShapeDtypeStruct((2,), jnp.uint32))


def load_checkpoint(path, network, flag="--load", stored=None):
    """The parameters of the checkpoint at path (or already read from it: stored) written by
    save_checkpoint, refusing (UsageError, one line) files that do not fit the network."""
    stored = read_checkpoint(flag, path) if stored is None else stored
    check_checkpoint(stored, network, flag, path)
    return layers_from(stored, "", parameter_shapes(network), flag, path)


def load_run(stored, path, network):
    """(params, velocity or None, run) of the checkpoint at path to resume, already read (stored,
    as resume_flags returns it), as save_checkpoint wrote them."""
    check_checkpoint(stored, network, "--resume", path)
    template = parameter_shapes(network)
    params = layers_from(stored, "", template, "--resume", path)
    has_velocity = any(key.startswith("velocity/") for key in stored)
    velocity = layers_from(stored, "velocity/", template, "--resume", path) if has_velocity else None
    run = {"config": stored["run/config"], "epochs": stored["run/epochs"],
           "shuffle_key": jax.device_put(stored["run/shuffle_key"])}
    return params, velocity, run


# ----------------------------------------------------------------------------------------------
# Command line.


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line instead of usage plus error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# The flags that decide what a run computes. A resumed run takes them from its checkpoint and
# refuses different values; the others (--data-dir, --out-dir, --save) may change.
RUN_FLAGS = ("preset", "epochs", "batch_size", "lr", "momentum", "weight_decay", "schedule", "warmup_epochs",
             "shuffle", "train_size", "val_size", "seed")


def flag_of(name):
    return "--" + name.replace("_", "-")


def preset_values(name):
    """The value each preset gives a flag, for its help: 'default: 15, seed: 10, ...'."""
    return ", ".join(f"{preset}: {values[name]}" for preset, values in PRESETS.items())


def parse_args(argv=None):
    """The command line as args; args.explicit names the RUN_FLAGS given on it (the rest come from
    the preset)."""
    parser = OneLineParser(
        prog="model.py",
        description="Train the MNIST CNN with hand-derived gradients (no autodiff). "
                    "Flags given explicitly override the preset's values.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="'default': modern run on all 60,000 images; 'seed': the original run "
                             "exactly; 'lenet': LeNet-5 on all 60,000 images (default: default)")
    for flag, kind, text in [
        ("--epochs", int, "passes over the training images"),
        ("--batch-size", int, "images per SGD step (the last incomplete batch of an epoch is skipped)"),
        ("--lr", float, "learning rate (the peak of the cosine schedule)"),
        ("--momentum", float, "SGD momentum in [0, 1); 0 is plain SGD"),
        ("--weight-decay", float, "L2 penalty coefficient added to every gradient (0: none)"),
        ("--warmup-epochs", int, "epochs over which the learning rate climbs linearly to its schedule (0: none)"),
        ("--train-size", int, "use the first N training images (with --val-size, of those not held out)"),
        ("--seed", int, "seed for initialisation and shuffling"),
    ]:
        parser.add_argument(flag, type=kind, default=None,
                            help=f"{text} (preset {preset_values(flag[2:].replace('-', '_'))})")
    parser.add_argument("--val-size", type=int, default=None, metavar="N",
                        help="hold out the last N training images for validation: each epoch reports "
                             "validation accuracy, and the test images are used once, at the end (default: 0)")
    parser.add_argument("--schedule", choices=["constant", "cosine"], default=None,
                        help=f"learning-rate schedule (preset {preset_values('schedule')})")
    parser.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=None,
                        help=f"reshuffle the training images every epoch (preset {preset_values('shuffle')})")
    parser.add_argument("--data-dir", default=SHIPPED_MNIST,
                        help="folder with the four IDX files of MNIST, or of any image dataset in that format, "
                             ".gz or raw (default: the MNIST in data/ beside model.py, wherever it is run from)")
    parser.add_argument("--out-dir", default="results",
                        help="where metrics.json and the pictures go (default: %(default)s)")
    parser.add_argument("--save", metavar="PATH",
                        help="write the parameters, and what resuming needs, to PATH (.npz) after every epoch")
    parser.add_argument("--resume", metavar="PATH",
                        help="continue the run saved with --save at PATH to its planned epochs, with its flags")
    parser.add_argument("--load", metavar="PATH", help="start from parameters saved with --save")
    parser.add_argument("--eval-only", action="store_true",
                        help="with --load: evaluate on the test images, train nothing")
    parser.add_argument("--devices", type=int, default=1, metavar="N",
                        help="split every batch across N devices of this process, data-parallel (default: 1)")
    parser.add_argument("--coordinator", metavar="HOST:PORT",
                        help="with --num-processes and --process-id: train as one of several processes, on "
                             "one machine or several, joined through JAX's distributed runtime at HOST:PORT "
                             "(process 0's address)")
    parser.add_argument("--num-processes", type=int, default=1, metavar="P", help="processes in the run (default: 1)")
    parser.add_argument("--process-id", type=int, default=0, metavar="I", help="this process's number, 0 to P-1")
    parser.add_argument("--join-timeout", type=int, default=60, metavar="SECONDS",
                        help="how long to wait for every process to join before giving up (default: %(default)s)")
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--compile-cache", metavar="DIR",
                       help="keep the compiled functions in DIR, so that a later run of the same shapes loads them "
                            "instead of compiling them again (default: $JAX_COMPILATION_CACHE_DIR, else "
                            f"{COMPILE_CACHE.replace(os.path.expanduser('~'), '~', 1)})")
    cache.add_argument("--no-compile-cache", dest="compile_cache", action="store_const", const=False,
                       help="compile every function afresh, and keep none")
    parser.add_argument("--predict", metavar="IMAGE", nargs="+",
                        help="classify pictures (any size; for digits, dark or light background, transparency "
                             "allowed); with --load, only that: no data is read and nothing is written")
    args = parser.parse_args(argv)
    args.explicit = sorted(name for name in RUN_FLAGS if getattr(args, name) is not None)
    args.preset = args.preset or "default"
    for name, value in dict(PRESETS[args.preset], val_size=0).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def resume_flags(args):
    """Sets args' RUN_FLAGS to those of the run saved at args.resume, refusing (UsageError, one line)
    explicit flags that would change that run. Returns the checkpoint's arrays, for load_run."""
    stored = read_checkpoint("--resume", args.resume)
    if "run/config" not in stored:
        raise UsageError(f"--resume {args.resume}: holds parameters only, not a run to resume; "
                         "start from it with --load instead")
    config = stored["run/config"]
    for name in args.explicit:
        if getattr(args, name) != config[name]:
            raise UsageError(f"--resume {args.resume}: {flag_of(name)} {getattr(args, name)} would change the "
                             f"run, which has {config[name]}; drop {flag_of(name)}, or start a new run")
    for name in RUN_FLAGS:
        setattr(args, name, config[name])
    return stored


def check_args(args, available_train_images=None):
    """Refuses values that cannot work, before any work starts (UsageError, one line)."""
    # First: an empty path would read below as no flag at all (no --save, no --resume).
    for name in ("data_dir", "out_dir", "save", "resume", "load", "compile_cache"):
        if getattr(args, name) == "":
            raise UsageError(f"{flag_of(name)}: an empty path; give a name, or leave the flag out")
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
    if not 0 <= args.warmup_epochs <= args.epochs:
        raise UsageError(f"--warmup-epochs must be 0 to --epochs ({args.epochs}), got {args.warmup_epochs}")
    if args.val_size < 0:
        raise UsageError(f"--val-size must be 0 or more, got {args.val_size}")
    if available_train_images is not None and args.val_size >= available_train_images:
        raise UsageError(f"--val-size {args.val_size} leaves none of the {available_train_images} "
                         "training images to train on")
    if args.train_size < 1:
        raise UsageError(f"--train-size must be at least 1, got {args.train_size}")
    if available_train_images is not None:
        left = available_train_images - args.val_size
        if args.train_size > left:
            held_out = f" after --val-size {args.val_size} holds {args.val_size} out" if args.val_size else ""
            raise UsageError(f"--train-size {args.train_size} exceeds the {left} training images "
                             f"available{held_out}")
    if args.batch_size > args.train_size:
        if "train_size" in args.explicit:
            raise UsageError(f"--batch-size {args.batch_size} exceeds --train-size {args.train_size}")
        left = f" left after --val-size {args.val_size}" if args.val_size else ""
        raise UsageError(f"--batch-size {args.batch_size} exceeds the {args.train_size} training images{left}; "
                         "give a smaller --batch-size")
    if args.eval_only and not args.load:
        raise UsageError("--eval-only needs --load CHECKPOINT: there is nothing trained to evaluate")
    if args.resume and (args.load or args.eval_only):
        raise UsageError("--resume continues a run; it cannot be combined with --load or --eval-only")
    if args.eval_only and args.predict:
        raise UsageError("--eval-only and --predict: with --load, --predict alone classifies the images")
    # A run that trains nothing takes its network from --preset; the flags that shape training could
    # only be copied from a training command by mistake, and would silently change nothing.
    untrained = [flag_of(name) for name in args.explicit if name != "preset"]
    if untrained and (args.eval_only or (args.load and args.predict)):
        what = "--eval-only trains nothing" if args.eval_only else "--load with --predict only classifies the images"
        raise UsageError(f"{what}, so {', '.join(untrained)} would change nothing; leave "
                         f"{'it' if len(untrained) == 1 else 'them'} out")
    if not SEEDS[0] <= args.seed <= SEEDS[1]:
        raise UsageError(f"--seed must be {SEEDS[0]} to {SEEDS[1]} (32 bits, as JAX's keys take it), got {args.seed}")
    if args.devices < 1:
        raise UsageError(f"--devices must be at least 1, got {args.devices}")
    if args.num_processes < 1:
        raise UsageError(f"--num-processes must be at least 1, got {args.num_processes}")
    if not 0 <= args.process_id < args.num_processes:
        raise UsageError(f"--process-id must be 0 to {args.num_processes - 1} for --num-processes "
                         f"{args.num_processes}, got {args.process_id}")
    if (args.num_processes > 1) != bool(args.coordinator):
        raise UsageError("several processes need all three of --coordinator HOST:PORT, --num-processes and "
                         "--process-id")
    if args.coordinator:
        coordinator_address(args.coordinator)
    if args.join_timeout < 1:
        raise UsageError(f"--join-timeout must be at least 1 second, got {args.join_timeout}")
    total_devices = args.devices * args.num_processes
    if total_devices > 1 and args.preset == "seed":
        raise UsageError(f"--preset seed trains on one image per step, which cannot be split across "
                         f"{total_devices} devices; use --devices 1")
    if args.batch_size % total_devices:
        below = args.batch_size - args.batch_size % total_devices
        sizes = " or ".join(str(size) for size in (below, below + total_devices) if size > 0)
        raise UsageError(f"--batch-size {args.batch_size} does not split evenly over {total_devices} devices; "
                         f"use {sizes}")
    for flag, path in (("--load", args.load), ("--resume", args.resume)):
        if path:
            require_file(flag, path)
    for path in args.predict or ():
        require_file("--predict", path)


def require_file(flag, path):
    """Refuses a path given to `flag` that is not an existing file (UsageError, one line)."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder; give the file in it")
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: no such file")


def check_output_paths(args):
    """Refuses, before any training, an --out-dir or checkpoint path the run could not write when
    it comes to it (UsageError, one line): a file where a folder must be, or the other way round, a
    folder where no file can be made, or a checkpoint where the run writes one of its OUTPUT_FILES,
    which would overwrite it. Only process 0 writes; with --load and --predict, nothing."""
    if args.process_id != 0:
        return
    outputs = {}  # {real path: name} of the files the run writes in --out-dir
    if not (args.load and args.predict):
        if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
            raise UsageError(f"--out-dir {args.out_dir}: is a file; name a folder (it is made if missing)")
        require_writable_folder("--out-dir", args.out_dir, args.out_dir)
        outputs = {os.path.realpath(os.path.join(args.out_dir, name)): name for name in OUTPUT_FILES}
    for flag, path in (("--save", args.save), ("--resume", args.resume)):
        if path:
            require_writable_file(flag, path, "run.npz")
            output = outputs.get(os.path.realpath(path))
            if output:
                raise UsageError(f"{flag} {path}: the run writes its {output} there, over the checkpoint; "
                                 "give the checkpoint another name")


def use_compile_cache(folder):
    """Has JAX keep every function it compiles from now on in folder, and look there before compiling
    one: the default (None) is $JAX_COMPILATION_CACHE_DIR, else COMPILE_CACHE; False turns the cache off.

    A cached function is the very executable XLA would compile again (JAX's key covers the program,
    the compiler's options and flags and JAX's version; XLA checks on loading that it was compiled
    for this kind of processor), so results are the same bit for bit. A --compile-cache folder that
    cannot be written is refused in one line (UsageError); a default one that cannot be made or
    written is passed over, and the run compiles everything, as it would without a cache. So is an
    entry that cannot be read: JAX compiles the function again, and its warning is not shown. The
    folder is made private to the user: JAX runs what it finds there."""
    given = folder is not None
    if not given:
        folder = jax.config.jax_compilation_cache_dir or COMPILE_CACHE
    if folder is not False:
        try:
            require_writable_folder("--compile-cache", folder, folder)
        except UsageError:
            if given:
                raise
            folder = False
    if folder is False:
        jax.config.update("jax_enable_compilation_cache", False)
        return
    os.makedirs(folder, mode=0o700, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    # Every function, however quickly it compiles: the small ones together take a second or more.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    warnings.filterwarnings("ignore", message="Error (reading|writing) persistent compilation cache entry")


def require_writable_file(flag, path, example_name):
    """Refuses `flag path` unless a file can be written at path: not a folder, and in a folder that
    is writable or can be made (require_writable_folder). example_name: a file name to suggest."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder; give a file name, such as {os.path.join(path, example_name)}")
    require_writable_folder(flag, path, os.path.dirname(os.path.abspath(path)))


def require_writable_folder(flag, path, folder):
    """Refuses `flag path` unless folder exists and is writable, or can be made (its nearest existing
    ancestor is a writable folder).

    Writable means that a file could be made there, and made it is, then removed at once: the
    permission bits do not tell. Root passes every permission check, yet makes no file in /proc; a
    read-only mount or an access-control list may refuse anybody."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{flag} {path}: {existing} is a file, so no folder can be made there; choose another path")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UsageError(f"{flag} {path}: cannot write in {existing} ({error.strerror}); "
                         "choose another path") from None


# ----------------------------------------------------------------------------------------------
# Training run.


@functools.partial(jax.jit, compiler_options=ONCE_OPTIMISED)  # one compilation, not one per operation
def run_keys(seed):
    """The two independent PRNG keys a run draws from its --seed: (initialisation, shuffling)."""
    init_key, shuffle_key = jax.random.split(jax.random.PRNGKey(seed))
    return init_key, shuffle_key


def shuffled_order(shuffle_key, train_size, count):
    """(the shuffling key for the next epoch, the first `count` of a random permutation of
    0..train_size-1 as an int32 numpy array): the order in which an epoch takes its training images.

    The permutation is jax.random.permutation's, computed its way: the numbers sorted by fresh random
    32-bit keys, in as many rounds as make it unlikely that two numbers tie in every round. JAX draws
    the keys; numpy does the stable sorts, which XLA's CPU sort does far more slowly (PERFORMANCE.md).
    The orders are jax.random.permutation's, number for number (tests/test_model.py checks), so every
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


def describe_device():
    device = jax.devices()[0]
    return f"{device.platform} ({device.device_kind})"


def start_devices():
    """Starts JAX's devices, refusing in one line (UsageError) a platform it cannot start, the usual
    cause being JAX_PLATFORMS naming one this installation or machine lacks. JAX raises a
    RuntimeError for most, and an AssertionError without a word for a GPU platform (cuda, rocm)
    whose plugin is not installed."""
    try:
        jax.devices()
    except (RuntimeError, AssertionError) as error:
        platforms = os.environ.get("JAX_PLATFORMS")
        asked = f" (JAX_PLATFORMS={platforms})" if platforms else ""
        why = (str(error).splitlines()[0] if str(error) else
               "that platform is not installed; unset JAX_PLATFORMS to use what is, or install JAX's support for it")
        raise UsageError(f"JAX cannot start its devices{asked}: {why}") from None


def train(network, params, args, train_images, train_labels, eval_images, eval_labels, log=print,
          eval_name="test", resume=None, after_epoch=None, stop=lambda: False, mesh=None):
    """Runs the epochs of args.epochs not yet done. Returns (params, epochs, compile_seconds,
    train_seconds, predictions), where epochs is a list of {"epoch", "train_loss",
    "<eval_name>_accuracy", "seconds"}, those of `resume` first, and predictions the classes the
    returned params give eval_images (None if no epoch ran).

    eval_images, eval_labels: what each epoch is evaluated on, the test or the validation images.
    resume: {"velocity", "shuffle_key", "epochs"} of a run to continue (load_run), or None.
    after_epoch(params, velocity, shuffle_key, epochs): called after every epoch, to checkpoint.
    stop(): True once the user has asked training to stop; asked before every epoch (with several
        processes, all stop once one is asked).
    mesh: the devices to split every batch across (data-parallel), or None for one device.
    Raises UsageError naming the epoch if training diverges (check_not_diverged); logs a warning
    the first time an epoch's accuracy is near chance."""
    steps = args.train_size // args.batch_size
    momentum = args.momentum
    if jax.process_count() > 1:
        # A Ctrl-C reaches one process of several. All must stop after the same epoch: the others
        # would otherwise wait forever, in the next epoch's all-reduce, for the one that stopped.
        def stop(asked_here=stop):
            return bool(multihost_utils.process_allgather(np.array(asked_here())).any())
    images, labels = replicated((train_images[:args.train_size], train_labels[:args.train_size].astype(np.int32)),
                                mesh)
    eval_padded = replicated(pad_to_chunks(eval_images, mesh), mesh)
    predict = make_predict(network, mesh)
    if resume is None:
        # Made by numpy and copied to the device: jnp.zeros_like would compile a function for it.
        velocity = jax.tree_util.tree_map(lambda p: np.zeros(p.shape, p.dtype), params) if momentum > 0 else None
        _, shuffle_key = run_keys(args.seed)
        epochs = []
    else:
        velocity, shuffle_key, epochs = resume["velocity"], resume["shuffle_key"], list(resume["epochs"])
    params, velocity = replicated((params, velocity), mesh)
    in_order = replicated(np.arange(steps * args.batch_size, dtype=np.int32), mesh)

    def rates_of(epoch):
        return replicated(learning_rates(args.schedule, args.lr, epoch, args.epochs, steps, args.warmup_epochs), mesh)

    start = time.perf_counter()
    train_epoch = make_train_epoch(network, momentum, args.weight_decay, mesh).lower(
        params, velocity, images, labels, in_order, rates_of(0)).compile()
    compile_seconds = time.perf_counter() - start
    train_seconds = compile_seconds

    # Chance: the accuracy of always answering the most common class.
    chance = float(np.bincount(np.asarray(eval_labels)).max() / len(eval_labels))
    warned_near_chance, predictions = False, None
    for epoch in range(len(epochs), args.epochs):
        if stop():
            break
        if args.shuffle:
            shuffle_key, order = shuffled_order(shuffle_key, args.train_size, steps * args.batch_size)
            order = replicated(order, mesh)
        else:
            order = in_order
        rates = rates_of(epoch)
        start = time.perf_counter()
        params, velocity, losses = train_epoch(params, velocity, images, labels, order, rates)
        # Each step's loss is that batch's mean, and every batch has batch_size images, so the
        # mean of the step losses is the mean per-image loss of the epoch. Taken by numpy, in float64:
        # a JAX mean would be one more function to compile.
        train_loss = float(np.asarray(local(losses)).mean(dtype=np.float64))
        seconds = time.perf_counter() - start
        train_seconds += seconds
        check_not_diverged(train_loss, epoch + 1, args, network.num_classes)
        predictions = np.asarray(local(predict(params, eval_padded)))[:len(eval_labels)]
        accuracy = accuracy_of(predictions, eval_labels)
        epochs.append({"epoch": epoch + 1, "train_loss": train_loss, f"{eval_name}_accuracy": accuracy,
                       "seconds": seconds})
        log(f"epoch {epoch + 1:3d}/{args.epochs}  train loss {train_loss:.4f}  "
            f"{eval_name} accuracy {100 * accuracy:6.2f}%  {seconds:7.3f} s")
        if after_epoch is not None:
            after_epoch(local(params), local(velocity), shuffle_key, epochs)
        # Where nearly every image is of one class (a validation set of a few images), answering it
        # is nearly perfect, and nearness to chance says nothing.
        if not warned_near_chance and accuracy < chance + NEAR_CHANCE and chance < 1 - NEAR_CHANCE:
            warned_near_chance = True
            log(f"warning: {eval_name} accuracy {100 * accuracy:.2f}% in epoch {epoch + 1} is within "
                f"{100 * NEAR_CHANCE:.0f} points of chance ({100 * chance:.2f}%, always answering the most "
                f"common class): the learning rate {args.lr} may be too high (lower it, or climb to it with "
                f"--warmup-epochs), or too low for "
                f"{counted(args.epochs, 'epoch')}, or the labels may not belong to the images")
    return local(params), epochs, compile_seconds, train_seconds, predictions


class StopOnInterrupt:
    """While active, the first Ctrl-C (SIGINT), SIGTERM (what `kill`, `timeout`, `docker stop` and
    job schedulers send) or SIGHUP (the terminal closed, an SSH connection dropped) only asks
    training to stop once the epoch running has finished (calling the object says whether it has
    been asked; .signal is the one that asked); a second Ctrl-C or SIGTERM aborts at once with
    KeyboardInterrupt(its number). Every file is written atomically, so an abort leaves none
    half-written. A SIGHUP the run was started ignoring stays ignored: `nohup` ignores it so that
    the run goes on when its terminal closes. (Not so SIGINT, which a shell ignores in the jobs a
    script starts in the background: a `kill -INT` meant for such a run still stops it as Ctrl-C
    would, as it stops the tests' runs however the tests were started.)"""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self.previous = {number: signal.signal(number, self._interrupt) for number in STOP_SIGNALS
                         if not (number == HANGUP and signal.getsignal(number) is signal.SIG_IGN)}
        return self

    def request(self, signum):
        """Asks training to stop as the signal signum would, unless it has been asked already."""
        if self.signal is None:
            self.signal = signum

    def _interrupt(self, signum, frame):
        if self() and signum != HANGUP:  # a hangup comes twice, from the shell and from the terminal
            raise KeyboardInterrupt(signum)
        self.request(signum)

    def __call__(self):
        return self.signal is not None

    def exit_status(self, otherwise=0):
        """128 + the signal's number once asked to stop (as a shell reports a process a signal ended),
        else `otherwise`."""
        return 128 + self.signal if self() else otherwise

    def __exit__(self, *exception):
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def check_not_diverged(train_loss, epoch, args, num_classes):
    """Raises UsageError (one line, naming the epoch and the likely cause) if an epoch's mean loss is
    not finite or is clearly worse than a blind guess's ln K.

    The weight decay is named beside the learning rate when it diverges on its own: its part of the
    update (THEORY.md §5) is the recurrence w' = (1 + m - lr·wd) w - m w_before for momentum m, which
    grows without bound once lr·wd > 2 (1 + m), whichever of the two is too large."""
    blind_guess = math.log(num_classes)
    if not (train_loss <= DIVERGED_LOSS_FACTOR * blind_guess):  # also catches NaN: it compares False
        lost = (f"the training loss became {train_loss:.4g} in epoch {epoch}, worse than a blind guess "
                f"(ln {num_classes} = {blind_guess:.2f})")
        decay_bound = 2 * (1 + args.momentum)
        if args.lr * args.weight_decay > decay_bound:
            raise UsageError(f"{lost}: lr x weight decay = {args.lr} x {args.weight_decay} = "
                             f"{args.lr * args.weight_decay:.4g} exceeds 2 (1 + momentum) = {decay_bound:.4g}, past "
                             "which the decay alone makes training diverge; try a smaller --lr or a much "
                             "smaller --weight-decay")
        raise UsageError(f"{lost}: the learning rate {args.lr} makes training diverge; try a smaller --lr")


def accuracy_of(predictions, labels):
    """Fraction of labels matched by predictions (which may run longer, over padding images)."""
    return float(np.mean(np.asarray(predictions)[:len(labels)] == labels))


# MNIST's digits fill a 20 x 20 box in their 28 x 28 field (data.ink_span): --predict scales a
# drawing to that fraction of the field for a checkpoint that does not record its data's.
MNIST_INK_SPAN = 20 / 28


def load_drawing(path, input_shape=MNIST_INPUT_SHAPE, span=MNIST_INK_SPAN):
    """An image file -> (the image prepared as the network's training images were, warning or None)
    for a network of input_shape (C, H, W) trained on images whose drawings span `span` of their
    frame (data.ink_span).

    Grey networks (C = 1), the way NIST's digits were made into MNIST's: transparency is composited
    onto a background of the colour opposite the ink (a canvas's black ink on transparent pixels
    becomes black on white); light ink on dark is what MNIST holds, so a dark-on-light image is
    inverted; the digit is cut to its bounding box, scaled (keeping its aspect) to fit `span` of the
    H x W field (MNIST's 20 of 28; all of it for frame-filling images), and placed with its centre of
    mass at the field's centre. Returns (H, W) uint8.
    Colour networks (C = 3): the whole picture, transparency composited onto white, resampled to
    H x W. Returns (H, W, 3) uint8.
    The warning is a line to print for an image with nothing in it.
    """
    from PIL import Image  # Pillow, which matplotlib reads its images with too

    C, H, W = input_shape
    if C not in (1, 3):
        raise UsageError(f"--predict {path}: this network was trained on {C}-channel images; --predict "
                         "prepares grey (1 channel) or colour (3 channel) pictures only")
    try:
        # Pillow warns of a "decompression bomb" from 89 million pixels up, and refuses from twice that.
        # A user's own picture is no attack: a large one is read without the warning.
        with warnings.catch_warnings(action="ignore", category=Image.DecompressionBombWarning), \
                Image.open(path) as image:
            has_alpha = "A" in image.getbands() or "transparency" in image.info
            bands = ("L" if C == 1 else "RGB") + ("A" if has_alpha else "")
            pixels = np.asarray(image.convert(bands), np.float32) / 255
    except Image.DecompressionBombError:
        raise UsageError(f"--predict {path}: more than {2 * Image.MAX_IMAGE_PIXELS} pixels, too large an image "
                         "for Pillow to read; scale it down") from None
    except Exception as error:  # Pillow raises many types for files that are not images
        raise UsageError(f"--predict {path}: not a readable image ({type(error).__name__})") from None
    pixels = pixels.reshape(pixels.shape[:2] + (len(bands),))
    colour, alpha = (pixels[..., :C], pixels[..., C]) if has_alpha else (pixels, np.ones(pixels.shape[:2], np.float32))
    blank = np.zeros((H, W) if C == 1 else (H, W, C), np.uint8)
    if alpha.sum() == 0:
        return blank, f"warning: {path} is fully transparent"
    if C == 3:
        picture = alpha[..., None] * colour + (1 - alpha[..., None])
        picture = np.einsum("Hh,hwc,Ww->HWc", resampling(picture.shape[0], H), picture, resampling(picture.shape[1], W))
        return np.round(np.clip(picture, 0, 1) * 255).astype(np.uint8), None
    grey = colour[..., 0]
    ink_colour = float((grey * alpha).sum() / alpha.sum())
    background = 1.0 if ink_colour < 0.5 else 0.0
    grey = alpha * grey + (1 - alpha) * background
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    if border.mean() > 0.5:  # dark ink on light: make it light on dark, as MNIST is
        grey, border = 1.0 - grey, 1.0 - border
    ink = np.clip(grey - np.median(border), 0, None)
    if ink.max() < 0.1:
        return blank, f"warning: {path} looks blank (no ink found)"
    ink = ink / ink.max()
    rows, columns = np.flatnonzero((ink > 0.1).any(axis=1)), np.flatnonzero((ink > 0.1).any(axis=0))
    ink = ink[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1]
    scale = min(round(span * H) / ink.shape[0], round(span * W) / ink.shape[1])
    height, width = (max(1, round(side * scale)) for side in ink.shape)
    digit = np.clip(resampling(ink.shape[0], height) @ ink @ resampling(ink.shape[1], width).T, 0, 1)
    centre_row, centre_column = (float((digit.sum(axis=1 - axis) * np.arange(digit.shape[axis])).sum() / digit.sum())
                                 for axis in (0, 1))
    top = int(np.clip(round(H / 2 - 0.5 - centre_row), 0, H - height))
    left = int(np.clip(round(W / 2 - 0.5 - centre_column), 0, W - width))
    field = np.zeros((H, W), np.float32)
    field[top:top + height, left:left + width] = digit
    return np.round(field * 255).astype(np.uint8), None


def resampling(size, new_size):
    """(new_size, size) matrix that resamples an axis of `size` pixels to new_size by linear
    interpolation, widened when shrinking so that every input pixel counts (antialiasing): output
    pixel o, centred at (o + 1/2) * size / new_size - 1/2 in input coordinates, averages the inputs
    with a triangle of half-width max(1, size / new_size) around that point."""
    ratio = size / new_size
    width = max(1.0, ratio)
    centres = (np.arange(new_size) + 0.5) * ratio - 0.5
    weights = np.clip(1 - np.abs(np.arange(size)[None, :] - centres[:, None]) / width, 0, None)
    return weights / weights.sum(axis=1, keepdims=True)


# Below this top probability, --predict says it is unsure.
UNSURE_BELOW = 0.5


def classify_drawings(network, params, drawings, log=print):
    """Prints the class (for MNIST, the digit) and the K probabilities for each of drawings, (path,
    image, warning) as load_drawing prepared them, with a warning line for a blank image or an
    unsure answer."""
    images = np.stack([image for _, image, _ in drawings])
    # One compilation for the whole computation, the scaling included (compiled operation by
    # operation, the scaling alone took longer than the network).
    probabilities = np.asarray(jax.jit(lambda params, images: network.probabilities(params, to_input(images)))(
        params, images))
    for (path, _, warning), row in zip(drawings, probabilities):
        if warning:
            log(warning)
        elif row.max() < UNSURE_BELOW:
            log(f"warning: {path}: unsure, the most likely class has probability {row.max():.2f} only")
        log(f"{path}: class {int(row.argmax())}; probabilities "
            + " ".join(f"{label}:{p:.4f}" for label, p in enumerate(row)))


# ----------------------------------------------------------------------------------------------
# What a run leaves behind: metrics.json and four pictures, each written atomically.


OUTPUT_FILES = ("metrics.json", "loss_curve.png", "learned_filters.png", "confusion_matrix.png",
                "misclassified.png")


def filters_figure(kernels):
    """The first convolution's filters F (D, C, K, K) as a figure: one column per filter, one row
    per input channel, on one colour scale (red > 0 > blue), with each weight written in its cell
    for a grey first layer. For colour images (C = 3), a first row shows each filter as the colour
    patch it responds to most (its weights mapped from [-max, max] to [0, 1] in each channel)."""
    from matplotlib.figure import Figure

    D, C, K, _ = kernels.shape
    names = ["red", "green", "blue"] if C == 3 else [f"channel {c}" for c in range(C)]
    rows = C + (C == 3)
    figure = Figure(figsize=(max(2.2 * D, 5.5), 0.6 + 2.0 * rows))  # at least as wide as the title
    axes = figure.subplots(rows, D, squeeze=False)
    figure.subplots_adjust(left=0.06 if C > 1 else 0.02, right=0.98, bottom=0.03, top=1 - 0.6 / (0.6 + 2.0 * rows),
                           wspace=0.1, hspace=0.1)
    limit = np.abs(kernels).max()
    for index in range(D):
        if C == 3:
            axes[0, index].imshow((kernels[index].transpose(1, 2, 0) / limit + 1) / 2)
        for channel in range(C):
            axis = axes[rows - C + channel, index]
            axis.imshow(kernels[index, channel], cmap="RdBu_r", vmin=-limit, vmax=limit)
            if C == 1:
                for (row, column), value in np.ndenumerate(kernels[index, channel]):
                    axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8)
        axes[0, index].set_title(f"filter {index}")
    for row in range(rows):
        if C > 1:
            axes[row, 0].set_ylabel("as colour" if row < rows - C else names[row - (rows - C)])
        for axis in axes[row]:
            axis.set_xticks([])
            axis.set_yticks([])
    figure.suptitle(f"learned {K}x{K} kernels of the first convolution (red > 0 > blue)")
    return figure


def loss_figure(epochs):
    """The mean training loss (log scale) and the evaluation accuracy per epoch, side by side, from
    metrics.json's epochs (at least one)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    class PlainLogFormatter(LogFormatter):
        """matplotlib's own choice of which ticks of a log axis to label (the minor ones, 0.2, 0.3 ...,
        too where the axis spans less than a decade), each written as 0.3, not as 3 x 10^-1, which
        would build matplotlib's TeX-like parser (PERFORMANCE.md)."""

        def _num_to_string(self, value, vmin, vmax):
            return f"{value:g}"

    numbers = [e["epoch"] for e in epochs]
    which = "val" if "val_accuracy" in epochs[0] else "test"
    figure = Figure(figsize=(10, 4))
    loss_axis, accuracy_axis = figure.subplots(1, 2)
    # Room on the left for tick labels as wide as 0.000125 (a loss within one decade gets such labels).
    figure.subplots_adjust(left=0.1, right=0.98, bottom=0.13, top=0.91, wspace=0.25)
    loss_axis.semilogy(numbers, [e["train_loss"] for e in epochs], "o-")
    loss_axis.yaxis.set_major_formatter(PlainLogFormatter(labelOnlyBase=False))
    loss_axis.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))
    loss_axis.set(xlabel="epoch", ylabel="mean training loss (log scale)", title="training loss")
    accuracy_axis.plot(numbers, [100 * e[f"{which}_accuracy"] for e in epochs], "o-", color="C1")
    accuracy_axis.set(xlabel="epoch", ylabel=f"{which} accuracy (%)", title=f"{which} accuracy")
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.set_xticks(numbers if len(numbers) <= 20 else numbers[::len(numbers) // 10])
    return figure


def confusion_figure(test_labels, predictions, classes):
    """The classes x classes confusion matrix of the test images, each cell's count written in it
    (up to 20 classes), shaded by its logarithm."""
    from matplotlib.figure import Figure

    confusion = np.zeros((classes, classes), np.int64)
    np.add.at(confusion, (np.asarray(test_labels, np.int64), predictions), 1)
    figure = Figure(figsize=(6.5, 5.5))
    axis = figure.subplots()
    figure.subplots_adjust(left=0.1, right=0.97, bottom=0.1, top=0.93)
    image = axis.imshow(np.log1p(confusion), cmap="Blues")
    if classes <= 20:  # beyond that, the counts would not fit their cells; the colours still show them
        for (row, column), count in np.ndenumerate(confusion):
            axis.text(column, row, str(count), ha="center", va="center", fontsize=7,
                      color="white" if image.norm(np.log1p(count)) > 0.6 else "black")
        axis.set(xticks=range(classes), yticks=range(classes))
    axis.set(xlabel="predicted class", ylabel="true class", title=f"confusion matrix, {len(test_labels)} test images")
    return figure


def misclassified_figure(test_images, test_labels, predictions):
    """The first 48 misclassified test images, each labelled with its true and predicted class.

    One mosaic in one axes, each tile labelled: far cheaper to draw than an axes per image. Colour
    images are shown in colour, on white; grey ones as MNIST's digits are usually shown, dark ink on
    white."""
    from matplotlib.figure import Figure

    wrong = np.flatnonzero(predictions != test_labels)[:48]
    colour = test_images.ndim == 4 and test_images.shape[3] == 3
    tiles = test_images if colour or test_images.ndim == 3 else test_images[..., 0]  # other channel counts: the first
    columns = 8
    rows = max(1, math.ceil(len(wrong) / columns))
    (height, width), gap, label = tiles.shape[1:3], 2, 9  # pixels: an image, between images, above each for its label
    mosaic = np.full((rows * (height + gap + label), columns * (width + gap)) + tiles.shape[3:], np.nan)
    figure = Figure(figsize=(1.4 * columns, 1.6 * rows + 0.4))
    axis = figure.subplots()
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.4 / (1.6 * rows + 0.4))
    for tile, index in enumerate(wrong):
        top, left = (tile // columns) * (height + gap + label) + label, (tile % columns) * (width + gap)
        mosaic[top:top + height, left:left + width] = tiles[index]
        axis.text(left + width / 2, top - 1.5, f"true {test_labels[index]}, said {predictions[index]}",
                  ha="center", va="bottom", fontsize=8)
    if colour:
        axis.imshow(np.nan_to_num(mosaic, nan=255) / 255, interpolation="nearest")
    else:
        axis.imshow(np.ma.masked_invalid(mosaic), cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
    axis.axis("off")
    count = int((predictions != test_labels).sum())
    figure.suptitle("no test image misclassified" if not count else
                    f"the {counted(count, 'misclassified test image')}" if count == len(wrong) else
                    f"the first {len(wrong)} of {count} misclassified test images")
    return figure


def write_outputs(out_dir, metrics, kernels, test_images, test_labels, predictions, classes):
    """metrics.json, loss_curve.png (if anything was trained), learned_filters.png, the classes x classes
    confusion_matrix.png and misclassified.png in out_dir; removes any other of OUTPUT_FILES left
    there by an earlier run, since it would describe another run.

    The figures are matplotlib Figure objects drawn straight to PNG, without pyplot's window
    machinery, and laid out by hand: an automatic layout pass costs more than the drawing.
    """
    os.makedirs(out_dir, exist_ok=True)

    def write_json(tmp):
        with open(tmp, "w") as f:
            json.dump(metrics, f, indent=2)

    write_atomically(os.path.join(out_dir, "metrics.json"), write_json)
    figures = {"loss_curve.png": loss_figure(metrics["epochs"])} if metrics["epochs"] else {}
    figures["learned_filters.png"] = filters_figure(np.asarray(kernels))
    figures["confusion_matrix.png"] = confusion_figure(test_labels, predictions, classes)
    figures["misclassified.png"] = misclassified_figure(test_images, test_labels, predictions)
    for name, figure in figures.items():
        write_atomically(os.path.join(out_dir, name), functools.partial(figure.savefig, format="png", dpi=110))
    for name in OUTPUT_FILES:
        if name != "metrics.json" and name not in figures and os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def import_in_background(*modules):
    """Starts importing modules in a background thread and returns at once; a later import of one
    of them waits until it is complete (Python's import lock)."""
    threading.Thread(target=lambda: [importlib.import_module(module) for module in modules], daemon=True).start()


def join_processes(args):
    """Starts JAX's distributed runtime for a run of several processes (before JAX does anything
    else), once every process is known to be there (rendezvous), refusing in one line what cannot
    work."""
    rendezvous(args)
    # On CPUs the processes exchange gradients through Gloo; on GPUs JAX uses NCCL whatever this says.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                               initialization_timeout=args.join_timeout)


def rendezvous(args):
    """Waits, with plain sockets on the coordinator's port, until all args.num_processes processes
    have arrived; raises UsageError (one line) if they have not within args.join_timeout seconds.

    JAX's runtime, left to find a missing process itself, or two processes of one number, ends
    every process with a fatal error and a stack trace; this makes it a sentence instead. Process 0
    listens; each other process connects, says in one JSON line its number, --num-processes and the
    flags every process must share (SHARED_FLAGS), and waits for process 0's answer, sent once all
    are there: go, or the sentence refusing them (joining_refusal), which every process then raises.
    The others close first, so that process 0's port is free at once for the runtime's coordinator.
    """
    host, port = coordinator_address(args.coordinator)
    flags = {name: getattr(args, name, None) for name in SHARED_FLAGS}
    flags.update({name: bool(getattr(args, name, None)) for name in SHARED_PATH_FLAGS})
    deadline = time.monotonic() + args.join_timeout
    waiting = f"within --join-timeout {args.join_timeout} s"
    if args.process_id == 0:
        try:
            server = socket.create_server(("", port))
        except OSError as error:
            raise UsageError(f"--coordinator {args.coordinator}: process 0 cannot listen on port {port} "
                             f"({error.strerror}); choose a free port, or if a process 0 is running there "
                             "already, give this process another --process-id") from None
        arrived = []
        with server:
            while len(arrived) < args.num_processes - 1:
                server.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    connection, _ = server.accept()
                    connection.settimeout(max(0.01, deadline - time.monotonic()))
                    said = json.loads(receive_line(connection))
                    arrived.append((int(said["process"]), int(said["processes"]), dict(said["flags"]), connection))
                except (OSError, ValueError, KeyError, TypeError):  # a timeout, or a stranger's connection: ignored
                    if time.monotonic() >= deadline:
                        joined = sorted([0] + [number for number, *_ in arrived])
                        raise UsageError(f"--coordinator {args.coordinator}: only processes {joined} of "
                                         f"{args.num_processes} arrived {waiting}; start the others with the "
                                         "same --coordinator and --num-processes") from None
            refusal = joining_refusal(args.num_processes, flags, [said for *said, _ in arrived])
            for *_, connection in arrived:
                connection.sendall(b"go" if refusal is None else refusal.encode())
            for *_, connection in arrived:
                connection.recv(1)  # returns once the other side has closed
                connection.close()
        if refusal is not None:
            raise UsageError(refusal)
        return
    while True:
        unknown_host = False
        try:
            with socket.create_connection((host, port), timeout=max(0.01, deadline - time.monotonic())) as link:
                link.sendall(json.dumps({"process": args.process_id, "processes": args.num_processes,
                                         "flags": flags}).encode() + b"\n")
                answer = link.recv(4096)
        except OSError as error:  # nobody listening yet, or the name not (yet) known: tried again
            answer, unknown_host = b"", isinstance(error, socket.gaierror)
        if answer == b"go":
            return
        if answer:
            raise UsageError(answer.decode())
        if time.monotonic() >= deadline:
            if unknown_host:
                raise UsageError(f"--coordinator {args.coordinator}: no machine called {host} could be found "
                                 f"{waiting}; give process 0's machine by a name or address this one knows")
            raise UsageError(f"--coordinator {args.coordinator}: process {args.process_id} found no process 0 "
                             f"there, or not every process arrived, {waiting}; start process 0 on that "
                             "machine with the same --coordinator and --num-processes")
        time.sleep(0.2)


def coordinator_address(text):
    """--coordinator's HOST:PORT as (host, port); UsageError (one line) unless it is one. Port 0
    would let process 0 listen where the others cannot know to look."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"--coordinator {text}: expected HOST:PORT, a port 1 to 65535, such as 127.0.0.1:12345")
    return host, int(port)


# The flags every process of a run must be given alike: each process takes its own steps, and with
# another learning rate, say, they would part silently; with another batch size or number of
# epochs, each would wait for collectives the others never start.
SHARED_FLAGS = RUN_FLAGS + ("devices", "eval_only")
# Flags every process must be given or not given alike, whatever path each names on its machine: a
# process without --load would start from other parameters, one without --resume from epoch 0.
SHARED_PATH_FLAGS = ("load", "resume")


def receive_line(connection, limit=65536):
    """The bytes a peer sends up to and including its first newline (or until it closes, or limit)."""
    received = b""
    while not received.endswith(b"\n") and len(received) < limit:
        chunk = connection.recv(limit)
        if not chunk:
            break
        received += chunk
    return received


def joining_refusal(num_processes, flags, arrived):
    """Why the processes that reached process 0 cannot train together, one line, or None if they can.
    flags: process 0's SHARED_FLAGS, and whether it was given each of SHARED_PATH_FLAGS. arrived:
    [(the --process-id, the --num-processes, those flags) each other process was started with]."""
    for number, processes, _ in arrived:
        if processes != num_processes:
            return (f"--num-processes: process {number} was started with {processes}, process 0 with "
                    f"{num_processes}; start every process with the same --num-processes")
    numbers = [number for number, _, _ in arrived]
    for number in sorted(set(numbers)):
        if numbers.count(number) > 1:
            return (f"--process-id {number}: {numbers.count(number)} processes were started with it; give each "
                    f"process its own number, 0 to {num_processes - 1}")
    for number, _, their_flags in sorted(arrived, key=lambda said: said[0]):
        for name in flags:
            if their_flags.get(name) != flags[name]:
                return (f"{flag_of(name)}: process {number} was started {as_given(name, their_flags.get(name))}, "
                        f"process 0 {as_given(name, flags[name])}; start every process with the same flags but "
                        "--process-id")
    return None


def as_given(name, value):
    """How a process was started with a flag, in joining_refusal's words: a path flag given or not,
    any other with its value."""
    if name in SHARED_PATH_FLAGS:
        return "with it" if value else "without it"
    return f"with {value}"


def make_mesh(args):
    """The devices a run splits its batches across: args.devices of each process's own, as one mesh
    axis; None for a run on one device."""
    available = jax.local_devices()
    if args.devices > len(available):
        hint = (f"; on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count={args.devices} set before "
                "starting makes that many" if available[0].platform == "cpu" else "")
        raise UsageError(f"--devices {args.devices}: this process has "
                         f"{counted(len(available), available[0].platform + ' device')}{hint}")
    if args.devices * args.num_processes == 1:
        return None
    devices = [device for device in jax.devices()
               if device in jax.local_devices(process_index=device.process_index)[:args.devices]]
    return Mesh(np.array(devices), (BATCH_AXIS,))


def fit_train_size(args, available_train_images):
    """Without --train-size, trains on the preset's number of images or on every image not held out
    by --val-size, whichever is fewer (a smaller dataset than MNIST is used whole), rather than
    refusing the preset's number as too many."""
    if "train_size" not in args.explicit:
        args.train_size = min(args.train_size, available_train_images - args.val_size)


def network_for_data(kind, data_dir, train_images, train_labels):
    """The network `kind` built for the dataset's image shape and number of classes; refuses
    (UsageError, one line) images too small for it."""
    C = train_images.shape[3] if train_images.ndim == 4 else 1
    input_shape = (C,) + train_images.shape[1:3]
    try:
        return build_network(kind, input_shape, number_of_classes(train_labels))
    except ValueError as error:
        raise UsageError(f"{dataset_file(data_dir, 'train_images')}: its {image_size(train_images.shape[1:])} images "
                         f"are too small for the {kind!r} network ({error}); use larger images or a "
                         "--preset whose network fits them") from None


# What a training run does once its stdout has been closed, as print_line's line on stderr says it.
TRAINING_STOPS = "training stops after the epoch running and writes what it trained"


def print_line(line, interrupted, then=TRAINING_STOPS):
    """Prints line to stdout, flushed (even into a pipe). Once stdout's reader has gone (a closed
    pipe, EPIPE: `| head`, or `| tee` ended by the same Ctrl-C; a terminal hung up, EIO), the lines
    can only be dropped, not the run: stdout is pointed at /dev/null, stderr says so once, adding
    `then`, what the run does now, and training is asked to stop after its epoch (interrupted, a
    StopOnInterrupt), as a Ctrl-C would, so that what it trained is written. The exit status is then
    128 + SIGPIPE, or + SIGHUP."""
    try:
        print(line, flush=True)
    except OSError as error:
        if error.errno not in (errno.EPIPE, errno.EIO):
            raise
        nowhere = os.open(os.devnull, os.O_WRONLY)
        os.dup2(nowhere, sys.stdout.fileno())
        try:
            print(f"model.py: standard output was closed (whatever read it has gone); {then}", file=sys.stderr,
                  flush=True)
        except OSError:  # stderr went the same way (2>&1, or the same terminal)
            os.dup2(nowhere, sys.stderr.fileno())
        os.close(nowhere)
        # As the signal would have stopped it; Windows has neither, and stops it as SIGTERM would.
        closed_by = getattr(signal, "SIGPIPE", None) if error.errno == errno.EPIPE else HANGUP
        interrupted.request(closed_by or signal.SIGTERM)


def main(argv=None, log=None):
    """The command line's run; returns the exit status (130 when Ctrl-C interrupted training, 143
    when SIGTERM did, 129 when SIGHUP did, 141 when stdout was closed).
    log(line) prints what the run reports (print_line by default)."""
    args = parse_args(argv)
    interrupted = StopOnInterrupt()
    then = ("the remaining answers go unprinted" if args.load and args.predict else
            "the evaluation goes on and writes its files" if args.eval_only else TRAINING_STOPS)
    log = log or functools.partial(print_line, interrupted=interrupted, then=then)
    check_args(args)
    check_output_paths(args)
    use_compile_cache(args.compile_cache)
    if args.coordinator:
        join_processes(args)
    start_devices()
    stored_run = resume_flags(args) if args.resume else None
    network_kind = PRESET_NETWORK[args.preset]
    # With several processes, process 0 alone prints and writes files; the others train in silence.
    writes = jax.process_index() == 0
    if not writes:
        log = lambda line: None  # noqa: E731
    stored_params = read_checkpoint("--load", args.load) if args.load else None
    if args.load and args.predict:
        # The checkpoint says what images and classes the network was trained for: no data is read.
        network = build_network(network_kind, *trained_for(stored_params))
        span = drawing_span(stored_params)
        drawings = [(path,) + load_drawing(path, network.input_shape, span) for path in args.predict]
        classify_drawings(network, load_checkpoint(args.load, network, stored=stored_params), drawings, log)
        return interrupted.exit_status()
    train_images, train_labels, test_images, test_labels = load_idx(args.data_dir)
    network = network_for_data(network_kind, args.data_dir, train_images, train_labels)
    span = ink_span(train_images)  # for --predict, and recorded in the checkpoint for a later one
    # Read now: an unreadable image is refused before any training, not after it.
    drawings = [(path,) + load_drawing(path, network.input_shape, span) for path in args.predict or ()]
    fit_train_size(args, len(train_images))
    check_args(args, available_train_images=len(train_images))
    mesh = make_mesh(args)

    if args.val_size:
        eval_name, eval_images, eval_labels = "val", train_images[-args.val_size:], train_labels[-args.val_size:]
    else:
        eval_name, eval_images, eval_labels = "test", test_images, test_labels

    save_path = args.save or args.resume
    # Which data the run trains on, whatever folder holds it: a resumed run must go on with the same.
    saves_run = save_path and not args.eval_only  # --eval-only --save saves parameters only
    data_digest = fingerprint(train_images, train_labels, test_images, test_labels) if saves_run else None
    resume = None
    if args.load:
        params = load_checkpoint(args.load, network, stored=stored_params)
    elif args.resume:
        params, velocity, run = load_run(stored_run, args.resume, network)
        # Checkpoints written before the data was recorded are taken on trust.
        if run["config"].get("data_sha256", data_digest) != data_digest:
            before = run["config"]["data_dir"]
            where = ("those files have changed since" if before == os.path.abspath(args.data_dir)
                     else f"it trained on those in {before}")
            raise UsageError(f"--resume {args.resume}: the run trained on other images or labels than those in "
                             f"{args.data_dir} ({where}); resume it on its own data, with --data-dir")
        resume = {"velocity": velocity, "shuffle_key": run["shuffle_key"], "epochs": run["epochs"]}
        if len(run["epochs"]) >= args.epochs:
            raise UsageError(f"--resume {args.resume}: the run has already done the {counted(args.epochs, 'epoch')} "
                             "it planned; evaluate it with --load and --eval-only")
        # The same epochs on another number of devices: each batch's sums are split and added in
        # another order, so the numbers part from the uninterrupted run's, at first in their last bits.
        saved_on, devices_now = run["config"].get("devices", 1), device_count(mesh)
        moved = (f"; it trained on {counted(saved_on, 'device')} and continues on {devices_now}, "
                 "so its sums are split otherwise and its numbers will not equal, bit for bit, those of a run "
                 "never interrupted") if saved_on != devices_now else ""
        resuming = f"resuming {args.resume} after epoch {len(run['epochs'])}{moved}"
    else:
        params = network.init(run_keys(args.seed)[0])

    # Announced once every refusal (a checkpoint that does not fit, a finished run) has had its say.
    device = describe_device()
    if mesh is not None:
        device += f", {mesh.size} devices in {counted(args.num_processes, 'process', 'processes')}"
    held_out = f", the last {args.val_size} held out for validation" if args.val_size else ""
    described = describe_data(network.input_shape, network.num_classes)
    if args.eval_only:
        log(f"JAX {jax.__version__} on {device}; evaluating {args.load} ({network_kind} network) on "
            f"{len(test_images)} test images ({described})")
    else:
        log(f"JAX {jax.__version__} on {device}; preset {args.preset!r} ({network_kind} network): "
            f"{args.train_size} training images ({described}){held_out}, batch {args.batch_size}, lr {args.lr}, "
            f"momentum {args.momentum}, weight decay {args.weight_decay}, {counted(args.epochs, 'epoch')}"
            + (f" ({args.warmup_epochs} warming up)" if args.warmup_epochs else ""))
    if resume:
        log(resuming)
    # With the flags, the number of devices the run trains on: not a flag of the run (it may change
    # on resuming), but it decides how each batch's sums are split; and the data it trains on.
    config = {**{name: getattr(args, name) for name in RUN_FLAGS}, "devices": device_count(mesh),
              "data_sha256": data_digest, "data_dir": os.path.abspath(args.data_dir)}

    def checkpoint(params, velocity, shuffle_key, epochs):
        if writes:
            save_checkpoint(save_path, params, network, velocity,
                            {"config": config, "shuffle_key": shuffle_key, "epochs": epochs}, span)

    if writes:
        # The pictures' library, imported while XLA compiles the epoch (which releases Python's
        # interpreter lock), rather than after training, when it is needed.
        import_in_background("matplotlib.figure", "matplotlib.backends.backend_agg")
    with interrupted:
        if args.eval_only:
            epochs, compile_seconds, train_seconds, stopped, predictions = [], 0.0, 0.0, False, None
        else:
            params, epochs, compile_seconds, train_seconds, eval_predictions = train(
                network, params, args, train_images[:len(train_images) - args.val_size], train_labels,
                eval_images, eval_labels, log, eval_name, resume, checkpoint if save_path else None,
                stop=interrupted, mesh=mesh)
            # The last epoch's evaluation was of the final parameters: of the test images, it is the
            # final one, and need not be run again.
            predictions = eval_predictions if eval_name == "test" else None
            # Stopped early: by a signal or a closed stdout here, or with several processes, in another.
            stopped = interrupted() or len(epochs) < args.epochs
            if stopped:
                # Ctrl-C is the usual way, and needs no naming (nor a closed stdout, where the line goes
                # nowhere); the exit status is 128 + the signal's number.
                named = interrupted.signal in STOP_SIGNALS and interrupted.signal != signal.SIGINT
                by = f" by {STOP_SIGNALS[interrupted.signal]}" if named else ""
                if len(epochs) == len(resume["epochs"] if resume else []):
                    # Stopped before this run's first epoch (while it compiled): nothing was trained,
                    # and writing would replace the outputs and checkpoint of an earlier run in the
                    # same places with those of an untrained network.
                    log(f"interrupted{by}: training stopped before epoch {len(epochs) + 1} of {args.epochs}; "
                        "nothing was trained, so nothing is written")
                    return interrupted.exit_status(130)
                log(f"interrupted{by}: training stopped after epoch {len(epochs)} of {args.epochs}; writing "
                    "what it trained (Ctrl-C again aborts at once)")

        if predictions is None:
            predictions = make_predict(network, mesh)(replicated(params, mesh),
                                                      replicated(pad_to_chunks(test_images, mesh), mesh))
            predictions = np.asarray(local(predictions))[:len(test_labels)]
        test_accuracy = accuracy_of(predictions, test_labels)
        trained = "" if args.eval_only else f"; training {train_seconds:.2f} s (compile {compile_seconds:.2f} s)"
        log(f"test accuracy {100 * test_accuracy:.2f}% on {len(test_labels)} images{trained}")
        metrics = {
            "config": {name: getattr(args, name) for name in sorted(vars(args)) if name != "explicit"},
            "epochs": epochs,
            "test_accuracy": test_accuracy,
            "train_seconds": train_seconds,
            "compile_seconds": compile_seconds,
            "jax_version": jax.__version__,
            "device": device,
            "devices": device_count(mesh),
            "processes": args.num_processes,
        }
        if writes:
            write_outputs(args.out_dir, metrics, params[0]["weights"], test_images, test_labels, predictions,
                          network.num_classes)
            log(f"wrote metrics.json and pictures to {args.out_dir}/")
            if args.save and args.eval_only:  # a training run saved its checkpoint after every epoch
                save_checkpoint(args.save, params, network, span=span)
            if save_path:
                log(f"saved parameters to {save_path}")
        if args.predict and writes:
            classify_drawings(network, params, drawings, log)
        return interrupted.exit_status(130 if stopped else 0)


def exit_now(status, leave_together=True):
    """Ends the process with status (an int, or a message for stderr and status 1) at once.

    By then every file is written and closed, and stdout and stderr are flushed here. Python's own
    shutdown would go on to tear down JAX's runtime object by object, a noticeable part of a short
    run's wall time (PERFORMANCE.md has the numbers). A process of a run of several first leaves
    JAX's distributed runtime, as Python's shutdown would have done (JAX registers that for exit):
    the processes wait there for each other, so that process 0, which hosts the runtime, ends last.
    Not so when this process gives up alone (leave_together=False): the others would be waited for
    in vain, until the runtime gave up on them and ended this process with a fatal error."""
    if isinstance(status, str):
        print(status, file=sys.stderr)
        status = 1
    if leave_together and jax.distributed.is_initialized():
        jax.distributed.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def out_of_memory(error):
    """The one line for an error that says memory ran out, or None for any other error: XLA's
    "Out of memory allocating N bytes" (CPU) or "RESOURCE_EXHAUSTED: Out of memory while trying to
    allocate N bytes" (GPU), from compiling or running, or numpy's MemoryError."""
    text = str(error)
    if not (isinstance(error, MemoryError) or "out of memory" in text.lower()):
        return None
    asked = re.search(r"allocat\w* (\d+) bytes", text)
    amount = f" (an allocation of {int(asked.group(1)) / 2 ** 30:.1f} GiB failed)" if asked else ""
    return (f"model.py: error: out of memory{amount}: the run needs more memory than this machine gives it; "
            "a smaller --batch-size needs less; every file written so far is complete")


def run_as_program(argv=None):
    """main as the command line runs it: its exit status, or one line on stderr for every error the
    user can act on, never a traceback; ends the process (exit_now)."""
    try:
        exit_now(main(argv))
    except (UsageError, DataError) as error:
        exit_now(f"model.py: error: {error}")
    except OSError as error:  # a file the checks before training could not foresee (a full disk, ...)
        # A failed rename names the temporary file first and the file meant (filename2) second.
        path = error.filename2 or error.filename
        exit_now(f"model.py: error: {path}: {error.strerror}" if path else f"model.py: error: {error}")
    except KeyboardInterrupt as stop:  # a second signal while training or writing (StopOnInterrupt)
        signum = stop.args[0] if stop.args else signal.SIGINT
        print(STOPPED_BY.format(STOP_SIGNALS[signum]), file=sys.stderr)
        exit_now(128 + signum, leave_together=False)
    except Exception as error:
        line = out_of_memory(error)
        if line:
            exit_now(line, leave_together=False)
        # On CPUs, a collective between processes that fails because another process of the run has
        # ended (a second Ctrl-C there, a crash, a lost machine) raises Gloo's error, from JAX's
        # runtime or from its dispatch, whichever was running.
        if not jax.distributed.is_initialized() or "Gloo" not in str(error):
            raise
        exit_now(f"model.py: error: process {jax.process_index()} lost the other processes of the run "
                 f"({str(error).splitlines()[0]}); every file written so far is complete", leave_together=False)


if __name__ == "__main__":
    run_as_program()
