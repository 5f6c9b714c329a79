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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from data import load_idx  # noqa: E402
from speed import epochs_taking_turns, preset_epoch  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=9, help="epochs of each (default: %(default)s)")
    parser.add_argument("--preset", default="default", help="whose network and settings (default: %(default)s)")
    options = parser.parse_args(argv)
    with_flow, state, inputs = preset_epoch(options.preset, load_idx(os.path.join(ROOT, "data"))[:2])
    # The same function, its fourth output (the gradient flow) dropped: XLA removes what computes it.
    without_flow = jax.jit(lambda *arrays: with_flow(*arrays)[:3], donate_argnums=(0, 1))
    copies = [jax.tree_util.tree_map(np.copy, state) for _ in range(2)]  # each side updates its own, in place
    times = epochs_taking_turns({"with": (with_flow, copies[0], inputs), "without": (without_flow, copies[1], inputs)},
                                options.epochs)
    with_median, without_median = (statistics.median(seconds) for seconds in times.values())
    # Each epoch against the one just before it: the drift of the machine between them is least.
    pair_ratio = statistics.median(a / b for a, b in zip(*times.values()))
    print(f"{options.preset} network, {options.epochs} epochs of each, taking turns: median epoch {with_median:.3f} s "
          f"with the gradient flow, {without_median:.3f} s without; median ratio of neighbouring epochs "
          f"{pair_ratio:.3f} ({100 * (pair_ratio - 1):+.1f}%)")


if __name__ == "__main__":
    main()
