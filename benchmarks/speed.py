"""How fast are the hand-written gradients? Side by side with the same network trained through jax.grad.

    python benchmarks/speed.py            # the full table; writes benchmarks/results.json
    python benchmarks/speed.py --quick    # one step of everything (batch 8), to check that it runs;
                                          # the sides' agreement is left to tests/test_benchmark.py

All three sides run the default network (5 filters 3x3, per-filter biases, 2x2 max-pool,
845 -> 64 -> 10, fused softmax-cross-entropy) with plain SGD on the same MNIST images, parameters in
the same layout, each training step compiled with jax.jit inside a lax.scan over steps (unrolled by 2),
exactly as model.py trains. They differ in where the gradient comes from, and in the image layout:
    ours                    the layers' backward methods, images batch last (C, H, W, N);
    jax.grad, same layout   jax.grad of the project's own forward (Network.forward), batch last:
                            only the gradient differs from ours;
    jax.grad, batch first   jax.grad of the forward as JAX users write it, batch first (N, C, H, W)
                            (lax.conv_general_dilated, lax.reduce_window, jax.nn.log_softmax).
Against the first peer the ratio measures the hand-written gradients alone; against the second, the
hand-written gradients and the batch-last layout together.
LeNet-5 (--preset lenet's network, 61,706 parameters) is timed likewise against one peer, written as
JAX users write it: images NHWC, filters HWIO, XLA's convolution, reduce_window, jax.grad.
Samples per second exclude compilation and warm-up: the median of 7 repeats, each at least 0.2 s
long, the sides' repeats taking turns. This file is, with tests/, the only place where autodiff may
appear: here as the peers.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

import data  # noqa: E402
import model  # noqa: E402
from DenseLayer import ReLU  # noqa: E402
from data import load_idx  # noqa: E402
from machinery import devices, errors, files, flags  # noqa: E402
from machinery.schedule import learning_rates  # noqa: E402


def peer_loss(params, images, labels):
    """The default network's mean loss, written the way a JAX user would (batch first), for jax.grad."""
    conv, _, _, _, dense1, _, dense2 = params
    x = images[:, None].astype(jnp.float32) / 255
    y = lax.conv_general_dilated(x, conv["weights"], (1, 1), "VALID",
                                 dimension_numbers=("NCHW", "OIHW", "NCHW"))
    y = jax.nn.relu(y + conv["biases"][:, None, None])
    y = lax.reduce_window(y, -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
    y = y.reshape(y.shape[0], -1)
    y = jax.nn.relu(y @ dense1["weights"] + dense1["biases"])
    logits = y @ dense2["weights"] + dense2["biases"]
    log_p = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=1))


def lenet_peer_loss(params, images, labels):
    """LeNet-5's mean loss written the way a JAX user would (NHWC, HWIO), for jax.grad. The filters
    are stored (D, C, K, K) and the flattened features in (C, H, W) order, as the layers keep them,
    so that both sides train the very same parameters."""
    conv1, _, _, conv2, _, _, _, dense1, _, dense2, _, dense3 = params

    def conv_relu_pool(x, layer, padding):
        filters = jnp.transpose(layer["weights"], (2, 3, 1, 0))  # (D, C, K, K) -> (K, K, C, D), HWIO
        y = lax.conv_general_dilated(x, filters, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = jax.nn.relu(y + layer["biases"])
        return lax.reduce_window(y, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    x = images[..., None].astype(jnp.float32) / 255
    y = conv_relu_pool(conv_relu_pool(x, conv1, ((2, 2), (2, 2))), conv2, "VALID")
    y = jnp.transpose(y, (0, 3, 1, 2)).reshape(y.shape[0], -1)
    y = jax.nn.relu(y @ dense1["weights"] + dense1["biases"])
    y = jax.nn.relu(y @ dense2["weights"] + dense2["biases"])
    log_p = jax.nn.log_softmax(y @ dense3["weights"] + dense3["biases"])
    return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=1))


def lenet_peer_loss_and_grads(network):
    return jax.value_and_grad(lenet_peer_loss)


def ours_loss_and_grads(network):
    return lambda params, images, labels: network.loss_and_grads(params, data.to_input(images), labels)


class AutodiffReLU(ReLU):
    """ReLU whose autodiff takes the derivative at 0 as 0, as ReLU.backward does (jax.nn.relu's rule);
    autodiff of jnp.maximum(x, 0) would split it, 0.5, and MNIST's blank background with zero biases
    puts many pre-activations exactly at 0."""

    def forward(self, params, x):
        return jax.nn.relu(x), x


def same_layout_loss_and_grads(network):
    """jax.grad of the project's own forward and loss: batch last, XLA's convolution, reduce_window."""
    peer = model.Network([AutodiffReLU() if isinstance(layer, ReLU) else layer for layer in network.layers],
                         network.loss)

    def loss(params, images, labels):
        output, _ = peer.forward(params, data.to_input(images))
        return peer.loss.forward(output, jax.nn.one_hot(labels, output.shape[-1], dtype=output.dtype))[0]

    return jax.value_and_grad(loss)


def batch_first_loss_and_grads(network):
    return jax.value_and_grad(peer_loss)


# (key in results.json, column heading, how the step computes its loss and gradients)
SIDES = [("ours", "ours", ours_loss_and_grads),
         ("jax_grad_same_layout", "jax.grad, same layout", same_layout_loss_and_grads),
         ("jax_grad_batch_first", "jax.grad, batch first", batch_first_loss_and_grads)]
PEERS = SIDES[1:]
LENET_SIDES = [("ours", "ours", ours_loss_and_grads),
               ("jax_grad_nhwc", "jax.grad, NHWC", lenet_peer_loss_and_grads)]


def make_run(loss_and_grads, lr=0.01):
    """A jitted function: (params, batches of images (steps, B, 28, 28) uint8, labels (steps, B))
    -> (params, losses), one plain SGD step per batch inside lax.scan. loss_and_grads takes
    (params, images (B, 28, 28) uint8, labels (B,)); each side converts the images to its own layout."""

    def run(params, images, labels):
        def step(params, batch):
            batch_images, batch_labels = batch
            loss, grads = loss_and_grads(params, batch_images, batch_labels)
            return model.sgd_update(params, None, grads, lr, 0.0)[0], loss

        return lax.scan(step, params, (images, labels), unroll=model.SCAN_UNROLL)

    return jax.jit(run)


def batches(images, labels, batch_size, steps):
    count = batch_size * steps
    reps = -(-count // len(images))
    images = jnp.tile(images, (reps, 1, 1))[:count].reshape(steps, batch_size, 28, 28)
    labels = jnp.tile(labels, reps)[:count].reshape(steps, batch_size)
    return images, labels


def measure(runs, params, images, labels, batch_size, repeats, min_seconds, quick):
    """[(compile seconds, samples/s, steps per repeat)] of each of runs (one per side, each from
    make_run) at this batch size. Each side's scan grows until one call takes at least min_seconds;
    then the sides take turns, one call each per repeat, so that the machine's speed, which drifts
    over minutes on a shared CPU, weighs on every side alike. Samples/s from the median call."""
    timed = []
    for run in runs:
        steps = 1 if quick else 20
        data = batches(images, labels, batch_size, steps)
        start = time.perf_counter()
        compiled = run.lower(params, *data).compile()
        compile_seconds = time.perf_counter() - start
        jax.block_until_ready(compiled(params, *data))  # warm-up
        while not quick:  # grow the scan until one call takes at least min_seconds
            start = time.perf_counter()
            jax.block_until_ready(compiled(params, *data))
            if time.perf_counter() - start >= min_seconds:
                break
            steps *= 2
            data = batches(images, labels, batch_size, steps)
            compiled = run.lower(params, *data).compile()
            jax.block_until_ready(compiled(params, *data))  # warm-up
        timed.append((compiled, data, compile_seconds, steps, []))
    for _ in range(repeats):
        for compiled, data, _, _, times in timed:
            start = time.perf_counter()
            jax.block_until_ready(compiled(params, *data))
            times.append(time.perf_counter() - start)
    return [(compile_seconds, batch_size * steps / statistics.median(times), steps)
            for _, _, compile_seconds, steps, times in timed]


def same_step(network, params, images, labels, peer):
    """Largest relative differences of loss and updated parameters after one step, ours vs a peer
    (a function like same_layout_loss_and_grads)."""
    x, y = images[None, :8], labels[None, :8]
    ours_params, ours_loss = make_run(ours_loss_and_grads(network))(params, x, y)
    peer_params, peer_loss_value = make_run(peer(network))(params, x, y)
    loss_error = float(abs(ours_loss[0] - peer_loss_value[0]) / abs(peer_loss_value[0]))
    param_error = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                      for a, b in zip(jax.tree_util.tree_leaves(ours_params), jax.tree_util.tree_leaves(peer_params)))
    return loss_error, param_error


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def whole_runs(mnist, quick):
    """model.train as `python model.py` runs it: the whole --preset seed training (compile included)
    and the median of its epochs; the median of 5 epochs of the default preset (60,000 images each).
    quick: one short epoch of each, of the sizes tests/test_training.py trains (shared compilations)."""
    quiet = lambda line: None  # noqa: E731
    seed_args = flags.parse_args(["--preset", "seed"] + (["--epochs", "1", "--train-size", "500"] if quick else []))
    network = model.build_network("original")
    params = network.init(model.run_keys(seed_args.seed)[0])
    _, seed_epochs, seed_compile, seed_total, _ = model.train(network, params, seed_args, *mnist, log=quiet)

    default_args = flags.parse_args(["--epochs", "1" if quick else "5"]
                                    + (["--train-size", "3000", "--batch-size", "32"] if quick else []))
    network = model.build_network("modern")
    params = network.init(model.run_keys(default_args.seed)[0])
    _, default_epochs, default_compile, _, _ = model.train(network, params, default_args, *mnist, log=quiet)
    return {"seed_preset_train_seconds": seed_total, "seed_preset_compile_seconds": seed_compile,
            "seed_preset_epoch_seconds": statistics.median(epoch["seconds"] for epoch in seed_epochs),
            "seed_preset_epoch_images": seed_args.train_size,
            "default_epoch_seconds": statistics.median(epoch["seconds"] for epoch in default_epochs),
            "default_epoch_images": default_args.train_size, "default_batch_size": default_args.batch_size,
            "default_compile_seconds": default_compile}


def epochs_taking_turns(sides, epochs):
    """sides: {name: (a compiled epoch, its (params, velocity), its other inputs)}. Runs the epochs of
    every side in turn, epochs + 1 times (the first of each compiles, and is not counted), so that the
    machine's drift weighs on all alike. Returns {name: [seconds of each counted epoch]}."""
    times = {name: [] for name in sides}
    state = {name: state for name, (_, state, _) in sides.items()}
    for epoch in range(epochs + 1):
        for name, (epoch_function, _, inputs) in sides.items():
            start = time.perf_counter()
            outputs = jax.block_until_ready(epoch_function(*state[name], *inputs))
            if epoch:
                times[name].append(time.perf_counter() - start)
            state[name] = outputs[:2]
    return times


def preset_epoch(preset, mnist, train_size=None):
    """(the compiled epoch of the preset's network at its settings, (params, velocity), the other
    inputs) for epochs_taking_turns; train_size: fewer images than the preset's."""
    args = flags.parse_args(["--preset", preset] + (["--train-size", str(train_size)] if train_size else []))
    network = model.build_network(flags.PRESET_NETWORK[preset])
    params = network.init(model.run_keys(args.seed)[0])
    velocity = jax.tree_util.tree_map(lambda p: np.zeros(p.shape, p.dtype), params) if args.momentum else None
    steps = args.train_size // args.batch_size
    images, labels = mnist[0][:args.train_size], mnist[1][:args.train_size].astype(np.int32)
    inputs = [jax.device_put(array) for array in (images, labels, np.arange(steps * args.batch_size, dtype=np.int32),
                                                  learning_rates(args.schedule, args.lr, 0, args.epochs, steps))]
    return model.make_train_epoch(network, args.momentum, args.weight_decay), (params, velocity), inputs


def lenet_variants(mnist, epochs=5, train_size=None):
    """Epochs of --preset lenet and of the LeNet-5 variants, taking turns: each one's median epoch
    and its ratio to lenet's."""
    presets = ("lenet", "lenet1998")
    sides = {preset: preset_epoch(preset, mnist, train_size) for preset in presets}
    times = epochs_taking_turns(sides, epochs)
    medians = {preset: statistics.median(seconds) for preset, seconds in times.items()}
    return {preset: {"median_epoch_seconds": median, "ratio_to_lenet": median / medians["lenet"]}
            for preset, median in medians.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps of everything, no timing claims")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results.json"),
                        help="where to write the results (default: %(default)s)")
    args = parser.parse_args(argv)
    try:  # refused now, not after minutes of timing
        files.require_writable_file("--out", args.out, "results.json")
    except errors.UsageError as error:
        parser.error(str(error))
    repeats, min_seconds = (1, 0.0) if args.quick else (7, 0.2)

    mnist = load_idx(os.path.join(ROOT, "data"))
    images, labels = jnp.asarray(mnist[0][:8192]), jnp.asarray(mnist[1][:8192], jnp.int32)
    network = model.build_network("modern")
    params = network.init(jax.random.PRNGKey(0))
    lenet = model.build_network("lenet")
    lenet_params = lenet.init(jax.random.PRNGKey(0))
    # (key in results.json, heading, network, its parameters, the peer): each peer's step against ours.
    comparisons = [(key, heading, network, params, make) for key, heading, make in PEERS]
    comparisons.append(("lenet_jax_grad_nhwc", "LeNet-5 jax.grad, NHWC", lenet, lenet_params, lenet_peer_loss_and_grads))
    agreement = {}
    if not args.quick:
        for key, _, net, net_params, make in comparisons:
            loss_error, param_error = same_step(net, net_params, images, labels, make)
            agreement[key] = {"loss_relative_difference": loss_error, "params_relative_difference": param_error}
    # --quick: one step of 8 images, the shapes of same_step's, whose compilations the tests share.
    quick_batch = 8
    timing = (images, labels, repeats, min_seconds, args.quick)
    results = {
        "quick": args.quick,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "jax_version": jax.__version__,
                    "device": devices.describe_device()},
        "same_step": agreement,
        "training_step": [step_row(network, params, batch_size, *timing)
                          for batch_size in ((quick_batch,) if args.quick else (1, 32, 128))],
        "lenet_training_step": lenet_step_row(lenet, lenet_params, quick_batch if args.quick else 128, *timing),
        "whole_runs": whole_runs(mnist, args.quick),
        # Not in --quick: compiling two more LeNet-5 epochs would double the quick run's time.
        "lenet_variants": {} if args.quick else lenet_variants(mnist),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print_results(results, comparisons)
    print(f"wrote {args.out}")


def step_row(network, params, batch_size, images, labels, repeats, min_seconds, quick):
    """The default network's step at one batch size: each side's samples per second and compile
    seconds, and ours' time over each peer's."""
    row = {"batch_size": batch_size}
    measured = measure([make_run(make(network)) for _, _, make in SIDES], params, images, labels, batch_size,
                       repeats, min_seconds, quick)
    for (key, _, _), (compile_seconds, rate, steps) in zip(SIDES, measured):
        row[key] = {"samples_per_second": rate, "compile_seconds": compile_seconds, "steps_per_repeat": steps}
    for key, _, _ in PEERS:
        row["time_ratio_ours_over_" + key] = row[key]["samples_per_second"] / row["ours"]["samples_per_second"]
    return row


def lenet_step_row(lenet, lenet_params, batch_size, images, labels, repeats, min_seconds, quick):
    """LeNet-5's step, ours against the NHWC jax.grad peer."""
    row = {"batch_size": batch_size}
    measured = measure([make_run(make(lenet)) for _, _, make in LENET_SIDES], lenet_params, images, labels,
                       batch_size, repeats, min_seconds, quick)
    for (key, _, _), (compile_seconds, rate, steps) in zip(LENET_SIDES, measured):
        row[key] = {"samples_per_second": rate, "compile_seconds": compile_seconds, "steps_per_repeat": steps,
                    "milliseconds_per_step": 1000 * batch_size / rate}
    row["time_ratio_ours_over_jax_grad_nhwc"] = (row["jax_grad_nhwc"]["samples_per_second"]
                                                 / row["ours"]["samples_per_second"])
    return row


def print_results(results, comparisons):
    machine, agreement = results["machine"], results["same_step"]
    print(f"{machine['cpu']}, {machine['cores']} cores, JAX {machine['jax_version']} on {machine['device']}"
          + ("  [--quick: not a measurement]" if results["quick"] else ""))
    for key, heading, _, _, _ in comparisons:
        if key in agreement:
            print(f"one step, ours vs {heading}: loss differs by {agreement[key]['loss_relative_difference']:.1e}, "
                  f"parameters by {agreement[key]['params_relative_difference']:.1e} (relative)")
    print("samples per second (compile seconds), and the time ours takes over each peer's")
    print(f"{'batch':>5} | " + " | ".join(f"{heading:>21}" for _, heading, _ in SIDES) + " | "
          + " | ".join(f"ours/{heading[10:]:>11}" for _, heading, _ in PEERS))
    for row in results["training_step"]:
        print(f"{row['batch_size']:>5} | "
              + " | ".join(f"{row[key]['samples_per_second']:>11,.0f} ({row[key]['compile_seconds']:.2f} s)"
                           for key, _, _ in SIDES) + " | "
              + " | ".join(f"{row['time_ratio_ours_over_' + key]:>16.2f}" for key, _, _ in PEERS))
    lenet_row = results["lenet_training_step"]
    print(f"LeNet-5 at batch {lenet_row['batch_size']}: "
          + ", ".join(f"{heading} {lenet_row[key]['milliseconds_per_step']:.1f} ms per step" for key, heading, _ in LENET_SIDES)
          + f"; ours/NHWC {lenet_row['time_ratio_ours_over_jax_grad_nhwc']:.2f}")
    runs = results["whole_runs"]
    print(f"--preset seed: {runs['seed_preset_train_seconds']:.2f} s of training, compile included "
          f"(median {runs['seed_preset_epoch_seconds']:.3f} s per {runs['seed_preset_epoch_images']:,}-image epoch)")
    print(f"default: median {runs['default_epoch_seconds']:.3f} s per {runs['default_epoch_images']:,}-image "
          f"epoch at batch {runs['default_batch_size']} (compile {runs['default_compile_seconds']:.2f} s)")
    print("LeNet-5 variants, taking turns: " + ", ".join(  # (none with --quick)
        f"{preset} {row['median_epoch_seconds']:.2f} s ({row['ratio_to_lenet']:.2f} of lenet's)"
        for preset, row in results["lenet_variants"].items()))


if __name__ == "__main__":
    main()
