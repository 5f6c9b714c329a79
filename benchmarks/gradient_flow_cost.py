"""What recording the gradient flow costs an epoch: the default network's compiled epoch as model.py
runs it, against the same epoch with the gradient-flow output dropped, which XLA then does not
compute. Both are timed in one process, taking turns epoch by epoch, so that the machine's drift
weighs on both alike.

    python benchmarks/gradient_flow_cost.py            # 9 epochs of each; --epochs N for more
"""

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

import model  # noqa: E402
from data import load_idx  # noqa: E402
from machinery.flags import parse_args  # noqa: E402
from machinery.schedule import learning_rates  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=9, help="epochs of each (default: %(default)s)")
    parser.add_argument("--preset", default="default", help="whose network and batch size (default: %(default)s)")
    epochs = parser.parse_args(argv).epochs
    args = parse_args(["--preset", parser.parse_args(argv).preset])
    train_images, train_labels = load_idx(os.path.join(ROOT, "data"))[:2]
    network = model.build_network(model.flags.PRESET_NETWORK[args.preset])
    params = network.init(model.run_keys(args.seed)[0])
    velocity = jax.tree_util.tree_map(lambda p: np.zeros(p.shape, p.dtype), params) if args.momentum else None
    steps = args.train_size // args.batch_size
    arrays = [jax.device_put(array) for array in (train_images, train_labels.astype(np.int32),
                                                  np.arange(steps * args.batch_size, dtype=np.int32),
                                                  learning_rates(args.schedule, args.lr, 0, args.epochs, steps))]
    with_flow = model.make_train_epoch(network, args.momentum, args.weight_decay)
    # The same function, its fourth output (the gradient flow) dropped: XLA removes what computes it.
    without_flow = jax.jit(lambda *inputs: with_flow(*inputs)[:3], donate_argnums=(0, 1))
    sides = {"with gradient flow": with_flow, "without": without_flow}
    state = {name: jax.tree_util.tree_map(np.copy, (params, velocity)) for name in sides}
    times = {name: [] for name in sides}
    for epoch in range(epochs + 1):  # the first of each compiles, and is not counted
        for name, epoch_function in sides.items():
            start = time.perf_counter()
            outputs = epoch_function(*state[name], *arrays)
            jax.block_until_ready(outputs)
            if epoch:
                times[name].append(time.perf_counter() - start)
            state[name] = outputs[:2]
    with_median, without_median = (statistics.median(times[name]) for name in sides)
    # Each epoch against the one just before it: the drift of the machine between them is least.
    pair_ratio = statistics.median(a / b for a, b in zip(*times.values()))
    print(f"{args.preset} network, {epochs} epochs of each, taking turns: median epoch {with_median:.3f} s with the "
          f"gradient flow, {without_median:.3f} s without; median ratio of neighbouring epochs "
          f"{pair_ratio:.3f} ({100 * (pair_ratio - 1):+.1f}%)")


if __name__ == "__main__":
    main()
