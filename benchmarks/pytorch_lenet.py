"""LeNet-5 epochs, ours against PyTorch eager, taking turns in one process.

    pip install torch                     # not one of the project's requirements
    python benchmarks/pytorch_lenet.py    # 5 epochs each; --epochs N for more

A shared machine's speed drifts by a factor of two or more over days, so a time measured today
means little beside one measured another day; a ratio measured in one process, the two sides
taking turns epoch by epoch, compares them at the same moment of that drift. The aim (README.md):
ours at most 0.60 of PyTorch eager's epoch.

Ours is `python model.py --preset lenet`'s training itself (model.train): each of its epochs is
timed as model.py times it, and after each one (the evaluation is not timed) PyTorch trains one
epoch of its own. The PyTorch side is the same network written as PyTorch users write it (Conv2d,
MaxPool2d, Linear, cross_entropy, loss.backward(), SGD with the preset's momentum and weight decay
at a constant learning rate, the preset's peak; the schedule costs nothing worth timing), on the
same uint8 images scaled to [0, 1] batch by batch, reshuffled every epoch, on as many threads as
PyTorch takes by default (one per core).
"""

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import model  # noqa: E402
from data import load_idx  # noqa: E402
from machinery import flags  # noqa: E402


def pytorch_lenet(torch):
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))


def pytorch_epoch(torch, network, optimiser, images, labels, batch_size):
    """One epoch of PyTorch eager training; returns (seconds, mean loss)."""
    order = torch.randperm(len(images))
    steps = len(images) // batch_size
    start = time.perf_counter()
    total = 0.0
    for step in range(steps):
        batch = order[step * batch_size:(step + 1) * batch_size]
        loss = torch.nn.functional.cross_entropy(network(images[batch].float() / 255), labels[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        total += loss.item()
    return time.perf_counter() - start, total / steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="epochs of each side (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, not {args.epochs}")
    try:
        import torch
    except ImportError:
        sys.exit("benchmarks/pytorch_lenet.py compares with PyTorch, which is not installed: pip install torch")

    train_images, train_labels, test_images, test_labels = load_idx(os.path.join(ROOT, "data"))
    torch.manual_seed(0)
    network = pytorch_lenet(torch)
    recipe = flags.PRESETS["lenet"]
    optimiser = torch.optim.SGD(network.parameters(), lr=recipe["lr"], momentum=recipe["momentum"],
                                weight_decay=recipe["weight_decay"])
    images = torch.from_numpy(train_images[:, None].copy())
    labels = torch.from_numpy(train_labels.astype("int64"))
    pytorch_seconds = []

    def pytorch_turn(*_):
        seconds, loss = pytorch_epoch(torch, network, optimiser, images, labels, 128)
        pytorch_seconds.append(seconds)
        print(f"          PyTorch {torch.__version__} eager ({torch.get_num_threads()} threads): "
              f"train loss {loss:.4f}  {seconds:7.3f} s", flush=True)

    run_args = flags.parse_args(["--preset", "lenet", "--epochs", str(args.epochs)])
    lenet = model.network_for_data("lenet", os.path.join(ROOT, "data"), train_images, train_labels)
    _, epochs, _, _, _ = model.train(lenet, lenet.init(model.run_keys(run_args.seed)[0]), run_args, train_images,
                                     train_labels, test_images, test_labels, log=lambda line: print(line, flush=True),
                                     after_epoch=pytorch_turn)
    ours = statistics.median(epoch["seconds"] for epoch in epochs)
    pytorch = statistics.median(pytorch_seconds)
    print(f"median epoch: ours {ours:.2f} s, PyTorch eager {pytorch:.2f} s; "
          f"ours/PyTorch {ours / pytorch:.2f} (the aim: at most 0.60)")


if __name__ == "__main__":
    main()
