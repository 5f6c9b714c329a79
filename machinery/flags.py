"""The command line: the presets, every flag, and the checks that refuse a value that cannot work
before any work starts (UsageError, one line). `python model.py --help` prints the table below."""

import argparse
import math
import os

from data import SHIPPED_MNIST
from machinery.compiling import COMPILE_CACHE
from machinery.errors import UsageError
from machinery.files import require_file

# Each preset's values for the flags that decide what a run computes; a flag given explicitly wins.
PRESETS = {
    "default": dict(epochs=15, batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4,
                    schedule="cosine", warmup_epochs=0, train_size=60000, shuffle=True, seed=0),
    "seed": dict(epochs=10, batch_size=1, lr=0.01, momentum=0.0, weight_decay=0.0,
                 schedule="constant", warmup_epochs=0, train_size=5000, shuffle=False, seed=0),
    "lenet": dict(epochs=20, batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine",
                  warmup_epochs=0, train_size=60000, shuffle=True, seed=0),
    "lenet1998": dict(epochs=20, batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine",
                      warmup_epochs=0, train_size=60000, shuffle=True, seed=0),
}
# The network each preset builds (model.NETWORKS); a checkpoint records it and refuses to load into the other.
PRESET_NETWORK = {"default": "modern", "seed": "original", "lenet": "lenet", "lenet1998": "lenet1998"}
# The seeds a run accepts: its key is drawn by a compiled function whose argument is a 32-bit integer.
SEEDS = (-2 ** 31, 2 ** 31 - 1)


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




def epsilons(text):
    """--fgsm's EPS[,EPS...] as a tuple of floats, each from 0 to 1; argparse reports a bad one."""
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a number; give sizes from 0 to 1, such as "
                                             "0.05,0.1,0.25") from None
        if not 0 <= value <= 1:
            raise argparse.ArgumentTypeError(f"{part} is outside 0 to 1: pixels lie in [0, 1], so a step of more "
                                             "than 1 changes nothing more, and a negative one helps the network")
        values.append(value)
    return tuple(values)


def build_parser():
    """The table of flags: what each means, and each run flag's value in every preset."""
    parser = OneLineParser(
        prog="model.py",
        description="Train the MNIST CNN with hand-derived gradients (no autodiff). "
                    "Flags given explicitly override the preset's values.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="'default': modern run on all 60,000 images; 'seed': the original run "
                             "exactly; 'lenet': LeNet-5 on all 60,000 images; 'lenet1998': LeNet-5 with LeCun's "
                             "scaled tanh and average pooling (default: default)")
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
                        help="write the parameters, and what resuming needs, to PATH (.npz) after every epoch "
                             "(a symbolic link is written through to the file it points to)")
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
    parser.add_argument("--fgsm", type=epsilons, metavar="EPS[,EPS...]",
                        help="after training, or with --load and --eval-only: attack the test images with the fast "
                             "gradient sign method at each EPS (pixels lie in [0, 1]) and report the accuracy")
    parser.add_argument("--predict", metavar="IMAGE", nargs="+",
                        help="classify pictures (any size; for digits, dark or light background, transparency "
                             "allowed); with --load, only that: no data is read and nothing is written")
    return parser


def parse_args(argv=None):
    """The command line as args; args.explicit names the RUN_FLAGS given on it (the rest come from
    the preset)."""
    args = build_parser().parse_args(argv)
    args.explicit = sorted(name for name in RUN_FLAGS if getattr(args, name) is not None)
    args.preset = args.preset or "default"
    for name, value in dict(PRESETS[args.preset], val_size=0).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def check_args(args, available_train_images=None):
    """Refuses values that cannot work, before any work starts (UsageError, one line). Given the
    number of training images the data holds, checks the sizes against it too."""
    check_sgd(args)
    check_sizes(args, available_train_images)
    check_modes(args)
    check_parallel(args)
    for flag, path in (("--load", args.load), ("--resume", args.resume)):
        if path:
            require_file(flag, path)
    for path in args.predict or ():
        require_file("--predict", path)


def fit_to_data(args, available_train_images):
    """Without --train-size, trains on the preset's number of images or on every image not held out
    by --val-size, whichever is fewer (a smaller dataset than MNIST is used whole), rather than
    refusing the preset's number as too many; then checks the sizes against the data."""
    if "train_size" not in args.explicit:
        args.train_size = min(args.train_size, available_train_images - args.val_size)
    check_args(args, available_train_images)


def check_sgd(args):
    """No empty path, and SGD settings that can train."""
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


def check_sizes(args, available_train_images=None):
    """--val-size, --train-size and --batch-size that fit each other and, where known, the data."""
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


def check_modes(args):
    """--load, --eval-only, --resume and --predict in combinations that mean something."""
    if args.eval_only and not args.load:
        raise UsageError("--eval-only needs --load CHECKPOINT: there is nothing trained to evaluate")
    if args.resume and (args.load or args.eval_only):
        raise UsageError("--resume continues a run; it cannot be combined with --load or --eval-only")
    if args.eval_only and args.predict:
        raise UsageError("--eval-only and --predict: with --load, --predict alone classifies the images")
    if args.fgsm and args.load and args.predict:
        raise UsageError("--fgsm attacks the test images, which --load with --predict does not read; "
                         "use --load with --eval-only --fgsm")
    # A run that trains nothing takes its network from --preset; the flags that shape training could
    # only be copied from a training command by mistake, and would silently change nothing.
    untrained = [flag_of(name) for name in args.explicit if name != "preset"]
    if untrained and (args.eval_only or (args.load and args.predict)):
        what = "--eval-only trains nothing" if args.eval_only else "--load with --predict only classifies the images"
        raise UsageError(f"{what}, so {', '.join(untrained)} would change nothing; leave "
                         f"{'it' if len(untrained) == 1 else 'them'} out")


def check_parallel(args):
    """The seed, and devices and processes that can share every batch."""
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


def coordinator_address(text):
    """--coordinator's HOST:PORT as (host, port); UsageError (one line) unless it is one. Port 0
    would let process 0 listen where the others cannot know to look."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"--coordinator {text}: expected HOST:PORT, a port 1 to 65535, such as 127.0.0.1:12345")
    return host, int(port)
