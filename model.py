"""Train a CNN on MNIST with hand-derived gradients: the lesson, top to bottom.

    Conv 5 filters 3x3 -> ReLU -> MaxPool 2/2 -> Flatten 845 -> Dense 64 -> ReLU -> Dense 10 -> softmax

1. The networks as data (NETWORKS), lists of layers each with forward and backward (THEORY.md §3,
   §4); Network chains them, forward, then the loss's gradient backward in reverse (§4.6).
2. sgd_update applies the gradients (§5); make_train_epoch compiles a whole epoch, a lax.scan of
   forward, backward and update over the minibatches, split across devices if asked (§5.1).
3. train runs the epochs, evaluating after each; main is the whole run, from flags to files.
No autodiff anywhere. What runs this without being part of the lesson (presets, flags, checkpoints,
devices, processes, signals, pictures, --predict, --fgsm) lives in machinery/, never importing this.
"""

import signal

from machinery.stopping import stop_at_once

if __name__ == "__main__":
    # Ctrl-C before training ends the run at once, in one line; the imports below take a second or more.
    signal.signal(signal.SIGINT, stop_at_once)

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from DenseLayer import Dense, Flatten, ReLU, Tanh
from Pooling_layer import AvgPool
from data import (MNIST_CLASSES, MNIST_INPUT_SHAPE, dataset_file, fingerprint, image_size, ink_span,
                  load_idx, number_of_classes, to_input)
from fast_layers import FastConvolutional, FastMaxPool
from loss import CategoricalCrossEntropy, Softmax, SoftmaxCrossEntropy
from machinery import adversarial, backprop_pictures, checkpoints, flags, pictures, report
from machinery.compiling import ONCE_OPTIMISED, use_compile_cache
from machinery.divergence import check_not_diverged, near_chance_warning
from machinery.devices import (BATCH_AXIS, device_count, eval_chunk, local, make_mesh, pad_to_chunks, replicated,
                               start_devices)
from machinery.drawings import classify_drawings, load_drawing
from machinery.errors import UsageError
from machinery.exits import run_as_program
from machinery.files import check_output_paths
from machinery.processes import join_processes, stop_together
from machinery.schedule import learning_rates
from machinery.shuffle import shuffled_order
from machinery.stopping import StopOnInterrupt, print_line, stopped_line

# Training steps traced per loop iteration of the epoch's lax.scan. XLA copies the loop-carried
# parameters at the top of every iteration; with two steps per iteration the step in the middle
# needs no copy (same arithmetic; PERFORMANCE.md has the timings).
SCAN_UNROLL = 2


# ----------------------------------------------------------------------------------------------
# 1. The network: layers chained forward, gradients chained backward.

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
        # The original drew every layer's weights from one key; a fresh network gives each its own.
        self.shared_init_key = shared_init_key

    def draw(self, key):
        """Every layer's initial parameters from key, operation by operation (init compiles it)."""
        keys = [key] * len(self.layers) if self.shared_init_key else jax.random.split(key, len(self.layers))
        return [layer.init(layer_key) for layer, layer_key in zip(self.layers, keys)]

    def init(self, key):
        # Compiled as one function: drawn op by op, each random draw would be compiled on its own.
        # At ONCE_OPTIMISED the weights are the same, bit for bit, as drawn op by op
        # (tests/test_training.py checks it).
        return jax.jit(self.draw, compiler_options=ONCE_OPTIMISED)(key)

    def forward(self, params, x):
        """x (C, H, W, N) -> (output (N, K), caches): probabilities or logits, as the loss expects."""
        caches = []
        for layer, layer_params in zip(self.layers, params):
            x, cache = layer.forward(layer_params, x)
            caches.append(cache)
        return x, caches

    def backward(self, params, caches, d_output):
        """d_output (N, K), the loss's gradient -> (d_x, the gradient of the input x (C, H, W, N),
        grads, one dict per layer) (THEORY.md §4.6)."""
        grads = [None] * len(self.layers)
        d_x = d_output
        for index in reversed(range(len(self.layers))):
            d_x, grads[index] = self.layers[index].backward(params[index], caches[index], d_x)
        return d_x, grads

    def loss_and_gradients(self, params, x, labels):
        """x (C, H, W, N) float, labels (N,) int -> (mean loss over the batch, d_x, grads)."""
        output, caches = self.forward(params, x)
        targets = (labels[:, None] == jnp.arange(output.shape[-1])).astype(output.dtype)
        loss, loss_cache = self.loss.forward(output, targets)
        return (loss, *self.backward(params, caches, self.loss.backward(loss_cache)))

    def loss_and_grads(self, params, x, labels):
        """-> (mean loss, grads): what training needs; under jit, d_x is never computed."""
        loss, _, grads = self.loss_and_gradients(params, x, labels)
        return loss, grads

    def probabilities(self, params, x):
        """x (C, H, W, N) -> class probabilities (N, K)."""
        output, _ = self.forward(params, x)
        return self.loss.probabilities(output)


# Networks as data. Each entry lists its layers from input to output; sizes between layers (a
# convolution's input channels, the flattened size, the number of classes) are not written here but
# derived by build_network from the shape each layer's output_shape reports. A new network is a
# new entry. The convolutions and poolings train as fast_layers computes them, the same sums as
# Convolutional.py and Pooling_layer.py derive.
CLASSES = "classes"  # stands for the number of classes, build_network's num_classes


def conv(kernel_size, depth, **options):
    return lambda shape, classes: FastConvolutional(shape, kernel_size, depth, **options)


def dense(size):
    return lambda shape, classes: Dense(shape[0], classes if size == CLASSES else size)


def sizeless(layer_class, *args, **options):
    """A layer whose construction needs no sizes (ReLU, MaxPool, Flatten, Softmax)."""
    return lambda shape, classes: layer_class(*args, **options)


NETWORKS = {
    "modern": dict(layers=[conv(3, 5), sizeless(ReLU), sizeless(FastMaxPool, 2, 2), sizeless(Flatten), dense(64),
                           sizeless(ReLU), dense(CLASSES)],
                   loss=SoftmaxCrossEntropy),  # the default run's (THEORY.md §6)
    # The original's: N(0, 1) filters with untied biases, every tied maximum of a pooling window taking
    # the gradient, a separate softmax and the clipped cross-entropy, one key for every layer's weights.
    "original": dict(layers=[conv(3, 5, tied_biases=False, weight_init="normal"), sizeless(ReLU),
                             sizeless(FastMaxPool, 2, 2, ties="all"), sizeless(Flatten), dense(64), sizeless(ReLU),
                             dense(CLASSES), sizeless(Softmax)],
                     loss=CategoricalCrossEntropy, shared_init_key=True),
    # LeNet-5 (LeCun et al. 1998) as it is usually rebuilt today: ReLU and max-pooling in place of
    # the scaled tanh and trainable subsampling, and a plain dense output layer (THEORY.md §6).
    "lenet": dict(layers=[conv(5, 6, padding=2), sizeless(ReLU), sizeless(FastMaxPool, 2, 2),
                          conv(5, 16), sizeless(ReLU), sizeless(FastMaxPool, 2, 2), sizeless(Flatten),
                          dense(120), sizeless(ReLU), dense(84), sizeless(ReLU), dense(CLASSES)],
                  loss=SoftmaxCrossEntropy),
    # LeNet-5 closer to LeCun et al. 1998: the scaled tanh and average pooling, weights drawn for tanh
    # (README.md says where it still differs from the paper).
    "lenet1998": dict(layers=[conv(5, 6, padding=2, weight_init="lecun"), sizeless(Tanh, scaled=True),
                              sizeless(AvgPool, 2, 2), conv(5, 16, weight_init="lecun"), sizeless(Tanh, scaled=True),
                              sizeless(AvgPool, 2, 2), sizeless(Flatten), dense(120), sizeless(Tanh, scaled=True),
                              dense(84), sizeless(Tanh, scaled=True), dense(CLASSES)],
                      loss=SoftmaxCrossEntropy),
}


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
# 2. SGD, one compiled epoch, compiled evaluation.

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
    -> (params, velocity, losses (steps,), each the batch's mean loss before that batch's update,
        the epoch's mean gradient_flow (layers with weights, 2)).
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
            new_params, velocity = sgd_update(params, velocity, grads, lr, momentum, weight_decay)
            return (new_params, velocity), (loss, gradient_flow(params, new_params, grads))

        (params, velocity), (losses, flows) = lax.scan(step, (params, velocity),
                                                       (batch_images, batch_labels, learning_rates), unroll=SCAN_UNROLL)
        return params, velocity, losses, flows.mean(axis=0)

    return jax.jit(train_epoch, donate_argnums=(0, 1))


def gradient_flow(params, new_params, grads):
    """For every layer with weights, (|dW|, |W' - W| / |W|): how much gradient reached its weights,
    and how far the step moved them relative to their size (lr |v| / |W| with momentum)."""
    def norm(array):
        return jnp.sqrt(jnp.sum(array * array))

    return jnp.array([(norm(g["weights"]), norm(new["weights"] - old["weights"]) / norm(old["weights"]))
                      for old, new, g in zip(params, new_params, grads) if "weights" in g])


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


@functools.partial(jax.jit, compiler_options=ONCE_OPTIMISED)  # one compilation, not one per operation
def run_keys(seed):
    """The two independent PRNG keys a run draws from its --seed: (initialisation, shuffling)."""
    init_key, shuffle_key = jax.random.split(jax.random.PRNGKey(seed))
    return init_key, shuffle_key


# ----------------------------------------------------------------------------------------------
# 3. The training loop.


def train(network, params, args, train_images, train_labels, eval_images, eval_labels, log=print,
          eval_name="test", resume=None, after_epoch=None, stop=lambda: False, mesh=None):
    """Runs the epochs of args.epochs not yet done. Returns (params, epochs, compile_seconds,
    train_seconds, predictions), where epochs is a list of {"epoch", "train_loss", "<eval_name>_accuracy",
    "seconds", "gradient_flow"}, those of `resume` first, and predictions the classes the returned
    params give eval_images (None if no epoch ran).

    resume: {"velocity", "shuffle_key", "epochs"} of a run to continue, or None.
    after_epoch(params, velocity, shuffle_key, epochs): called after every epoch, to checkpoint.
    stop(): True once the user has asked training to stop; asked before every epoch.
    mesh: the devices to split every batch across (data-parallel), or None for one device.
    Raises UsageError naming the epoch if training diverges (check_not_diverged)."""
    steps, stop = args.train_size // args.batch_size, stop_together(stop)
    images, labels = replicated((train_images[:args.train_size], train_labels[:args.train_size].astype(np.int32)),
                                mesh)
    eval_padded, predict = replicated(pad_to_chunks(eval_images, mesh), mesh), make_predict(network, mesh)
    if resume is None:
        # Made by numpy and copied to the device: jnp.zeros_like would compile a function for it.
        velocity = jax.tree_util.tree_map(lambda p: np.zeros(p.shape, p.dtype), params) if args.momentum > 0 else None
        resume = {"velocity": velocity, "shuffle_key": run_keys(args.seed)[1], "epochs": []}
    velocity, shuffle_key, epochs = resume["velocity"], resume["shuffle_key"], list(resume["epochs"])
    params, velocity = replicated((params, velocity), mesh)
    in_order = replicated(np.arange(steps * args.batch_size, dtype=np.int32), mesh)

    def rates_of(epoch):
        return replicated(learning_rates(args.schedule, args.lr, epoch, args.epochs, steps, args.warmup_epochs), mesh)

    start = time.perf_counter()
    train_epoch = make_train_epoch(network, args.momentum, args.weight_decay, mesh).lower(
        params, velocity, images, labels, in_order, rates_of(0)).compile()
    compile_seconds = train_seconds = time.perf_counter() - start
    warned, predictions = False, None
    for epoch in range(len(epochs), args.epochs):
        if stop():
            break
        order = in_order
        if args.shuffle:
            shuffle_key, order = shuffled_order(shuffle_key, args.train_size, steps * args.batch_size)
            order = replicated(order, mesh)
        rates, start = rates_of(epoch), time.perf_counter()
        params, velocity, losses, flow = train_epoch(params, velocity, images, labels, order, rates)
        # Each step's loss is that batch's mean over batch_size images, so their mean is the epoch's
        # mean per-image loss. Taken by numpy in float64: a JAX mean would be one more compilation.
        train_loss = float(np.asarray(local(losses)).mean(dtype=np.float64))
        seconds = time.perf_counter() - start
        train_seconds += seconds
        check_not_diverged(train_loss, epoch + 1, args, network.num_classes)
        predictions = np.asarray(local(predict(params, eval_padded)))[:len(eval_labels)]
        accuracy = accuracy_of(predictions, eval_labels)
        epochs.append({"epoch": epoch + 1, "train_loss": train_loss, f"{eval_name}_accuracy": accuracy,
                       "seconds": seconds, "gradient_flow": report.gradient_flow(network, params, local(flow))})
        log(f"epoch {epoch + 1:3d}/{args.epochs}  train loss {train_loss:.4f}  "
            f"{eval_name} accuracy {100 * accuracy:6.2f}%  {seconds:7.3f} s")
        if after_epoch is not None:
            after_epoch(local(params), local(velocity), shuffle_key, epochs)
        if not warned and (warning := near_chance_warning(accuracy, eval_labels, epoch + 1, eval_name, args)):
            warned = True
            log(warning)
    return local(params), epochs, compile_seconds, train_seconds, predictions


def accuracy_of(predictions, labels):
    """Fraction of labels matched by predictions (which may run longer, over padding images)."""
    return float(np.mean(np.asarray(predictions)[:len(labels)] == labels))


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


# ----------------------------------------------------------------------------------------------
# 4. The run: flags in, files out.


def main(argv=None, log=None):
    """The command line's run; returns the exit status (130 when Ctrl-C interrupted training, 143
    when SIGTERM did, 129 when SIGHUP did, 141 when stdout was closed).
    log(line) prints what the run reports (print_line by default)."""
    args = flags.parse_args(argv)
    interrupted = StopOnInterrupt()
    log = log or functools.partial(print_line, interrupted=interrupted, then=report.after_stdout_closes(args))
    set_up(args)
    stored = (checkpoints.resume_flags(args) if args.resume else
              checkpoints.read_checkpoint("--load", args.load) if args.load else None)
    if jax.process_index() != 0:  # with several processes, process 0 alone prints and writes files
        log = lambda line: None  # noqa: E731
    if args.load and args.predict:
        predict_only(args, stored, log)
        return interrupted.exit_status()  # 141 where stdout closed before every answer was printed
    train_images, train_labels, test_images, test_labels = data = load_idx(args.data_dir)
    network = network_for_data(flags.PRESET_NETWORK[args.preset], args.data_dir, train_images, train_labels)
    span = ink_span(train_images)  # for --predict, and recorded in the checkpoint for a later one
    # Read now: an unreadable image is refused before any training, not after it.
    drawings = [(path,) + load_drawing(path, network.input_shape, span) for path in args.predict or ()]
    flags.fit_to_data(args, len(train_images))
    mesh = make_mesh(args)
    # Which data a resumed run must go on with, whatever folder holds it.
    digest = fingerprint(*data) if (args.save or args.resume) and not args.eval_only else None
    params, resume, resuming = starting_point(args, network, stored, digest, mesh)
    # Announced once every refusal (a checkpoint that does not fit, a finished run) has had its say.
    log(report.opening_line(args, network, mesh, len(test_images)))
    if resuming:
        log(resuming)
    save = checkpoints.writer(args, network, report.run_config(args, mesh, digest), span)
    if jax.process_index() == 0:
        # The pictures' library, imported while XLA compiles the epoch (releasing Python's lock).
        pictures.import_in_background("matplotlib.figure", "matplotlib.backends.backend_agg")
    with interrupted:
        epochs, seconds, predictions, stopped = [], (0.0, 0.0), None, False
        if not args.eval_only:
            split = len(train_images) - args.val_size  # the last --val-size images are held out
            evaluated = (("val", train_images[split:], train_labels[split:]) if args.val_size else
                         ("test", test_images, test_labels))
            params, epochs, *seconds, predictions = train(
                network, params, args, train_images[:split], train_labels, *evaluated[1:], log, evaluated[0], resume,
                save, stop=interrupted, mesh=mesh)
            stopped = interrupted() or len(epochs) < args.epochs  # by a signal here, or in another process
            if stopped:
                line, trained = stopped_line(interrupted, len(epochs), len(resume["epochs"]) if resume else 0,
                                             args.epochs)
                log(line)
                if not trained:
                    return interrupted.exit_status(130)
            # The last epoch evaluated the final parameters: of the test images, that is final.
            predictions = predictions if evaluated[0] == "test" else None
        finish(args, network, params, mesh, (test_images, test_labels), predictions, epochs, seconds, drawings, span,
               log)
        return interrupted.exit_status(130 if stopped else 0)


def set_up(args):
    """Every check the flags allow before any data is read, then the compile cache, the processes
    (several: joined first, before JAX does anything else) and the devices."""
    flags.check_args(args)
    check_output_paths(args)
    use_compile_cache(args.compile_cache)
    if args.coordinator:
        join_processes(args)
    start_devices()


def predict_only(args, stored, log):
    """--load with --predict: the checkpoint says what images and classes its network was trained
    for, so no data is read, and nothing is written."""
    network = build_network(flags.PRESET_NETWORK[args.preset], *checkpoints.trained_for(stored))
    span = float(stored["ink_span"])
    drawings = [(path,) + load_drawing(path, network.input_shape, span) for path in args.predict]
    classify_drawings(network, checkpoints.load_checkpoint(args.load, network, stored=stored), drawings, log)


def starting_point(args, network, stored, data_digest, mesh):
    """(params, resume, the line announcing a resumption) to train from: a --load checkpoint's
    parameters, a --resume run's parameters and state for train, or fresh ones drawn from --seed."""
    if args.load:
        return checkpoints.load_checkpoint(args.load, network, stored=stored), None, None
    if args.resume:
        return checkpoints.resume_run(args, stored, network, data_digest, device_count(mesh))
    return network.init(run_keys(args.seed)[0]), None, None


def finish(args, network, params, mesh, test_data, predictions, epochs, seconds, drawings, span, log):
    """The final test accuracy (evaluated now unless `predictions` already are the final parameters'),
    metrics.json, the pictures and the checkpoint written, and the --predict answers."""
    test_images, test_labels = test_data
    if predictions is None:
        predictions = make_predict(network, mesh)(replicated(params, mesh),
                                                  replicated(pad_to_chunks(test_images, mesh), mesh))
        predictions = np.asarray(local(predictions))[:len(test_labels)]
    test_accuracy = accuracy_of(predictions, test_labels)
    trained = "" if args.eval_only else f"; training {seconds[1]:.2f} s (compile {seconds[0]:.2f} s)"
    log(f"test accuracy {100 * test_accuracy:.2f}% on {len(test_labels)} images{trained}")
    if jax.process_index() != 0:
        return
    metrics = report.metrics(args, epochs, test_accuracy, seconds, mesh)
    attack = adversarial.fgsm(network, params, test_images, test_labels, args.fgsm) if args.fgsm else None
    if attack:
        metrics["fgsm"] = attack[0]
        for row in attack[0]:
            log(f"fgsm eps {row['epsilon']}: test accuracy {100 * row['test_accuracy']:.2f}%")
    pictures.write_outputs(args.out_dir, metrics, params[0]["weights"], test_images, test_labels, predictions,
                           network.num_classes, backprop_pictures.figures(network, params, *test_data, epochs, attack))
    log(f"wrote metrics.json and pictures to {args.out_dir}/")
    if args.save and args.eval_only:  # a training run saved its checkpoint after every epoch
        checkpoints.save_checkpoint(args.save, params, network, span=span)
    if args.save or args.resume:
        log(f"saved parameters to {args.save or args.resume}")
    if args.predict:
        classify_drawings(network, params, drawings, log)


if __name__ == "__main__":
    run_as_program(main)
