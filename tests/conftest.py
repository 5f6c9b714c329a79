"""Shared set-up: the project root on sys.path, float64 so gradients can be compared to ~1e-12,
float32 matrix products at full precision, one compilation cache for the session, and what several
test modules need: a small MNIST folder, an IDX writer, model.py run in a fresh interpreter.

The training code fixes its own dtype (float32) explicitly, so model tests still run in float32. On a
GPU, JAX's default float32 matrix product may round its inputs to TensorFloat-32 (10 mantissa bits);
"highest" keeps every product in full float32 (or float64) wherever the tests run, so their tolerances
mean the same on every device.
"""

import atexit
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_default_matmul_precision", "highest")

# One compilation cache for the whole test session, this process and the model.py processes the
# tests start alike (run_cli passes it on): many tests build the same network and compile the same
# epoch, and compiling, not computing, is most of their time on a small CPU. A cached executable is
# the very one the compiler would produce again, so results do not change. The cache lives in a
# temporary folder removed at exit: nothing carries over from one test session to the next.
COMPILATION_CACHE = {
    "JAX_COMPILATION_CACHE_DIR": tempfile.mkdtemp(prefix="jax-cache-"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}
atexit.register(shutil.rmtree, COMPILATION_CACHE["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
for name, value in COMPILATION_CACHE.items():
    jax.config.update(name.lower(), value if name.endswith("DIR") else float(value) if "SECS" in name else int(value))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from machinery.files import OUTPUT_FILES  # noqa: E402

# What a run writes in --out-dir without --fgsm: every output but the attack's picture.
RUN_OUTPUTS = set(OUTPUT_FILES) - {"adversarial.png"}


def idx_bytes(array, magic):
    """The bytes of an IDX file holding array (as unsigned bytes) under the header's magic number."""
    array = np.asarray(array, np.uint8)
    return struct.pack(f">i{array.ndim}I", magic, *array.shape) + array.tobytes()


@pytest.fixture(scope="session")
def mnist():
    """The shipped MNIST: (train_images, train_labels, test_images, test_labels)."""
    from data import load_idx

    return load_idx(os.path.join(ROOT, "data"))


@pytest.fixture(scope="session")
def small_mnist(tmp_path_factory):
    """The first 2,000 training and 500 test images of the shipped MNIST as a dataset folder of
    their own, for runs in fresh interpreters that need no more: less to read and to evaluate."""
    from data import FILES, load_idx

    folder = tmp_path_factory.mktemp("small-mnist")
    arrays = load_idx(os.path.join(ROOT, "data"))
    for (key, name), array, count in zip(FILES.items(), arrays, (2000, 2000, 500, 500)):
        (folder / name).write_bytes(idx_bytes(array[:count], 2051 if key.endswith("images") else 2049))
    return str(folder)


def run_cli(*flags, cwd):
    """model.py in a fresh interpreter, as a user runs it: float32, none of this suite's settings
    but full-precision matrix products and the session's compilation cache, reading the shipped
    MNIST unless --data-dir is among the flags."""
    return subprocess.run(cli_command(flags), capture_output=True, text=True, cwd=cwd, timeout=600,
                          env=CLI_ENVIRONMENT)


def start_cli(*flags, cwd, env=None, stderr=subprocess.PIPE):
    """run_cli's model.py, started and left running, its output and errors pipes to read as it goes;
    env replaces CLI_ENVIRONMENT; stderr=subprocess.STDOUT sends the errors into the output's pipe."""
    return subprocess.Popen(cli_command(flags), stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=cwd,
                            env=env or CLI_ENVIRONMENT)


def cli_command(flags):
    if "--data-dir" not in flags:
        flags += ("--data-dir", os.path.join(ROOT, "data"))
    return [sys.executable, os.path.join(ROOT, "model.py"), *flags]


CLI_ENVIRONMENT = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest", **COMPILATION_CACHE)
# The size of every short model.py run on the small_mnist folder: with the same shapes, each fresh
# interpreter after the first finds the training epoch, the draws and the evaluation in the
# session's compilation cache instead of compiling them.
SMALL_CLI_RUN = ("--train-size", "1600", "--batch-size", "64")


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, small_mnist):
    """`python model.py` on small_mnist for 2 epochs of SMALL_CLI_RUN, as a user runs it, saving
    net.npz and classifying seven.png: test digit 0 (a 7) drawn dark on light at 3 times its size.
    Returns (the completed process, its folder; out/ holds what the run wrote). One run for two
    modules: test_pictures.py checks what it wrote, test_parallel.py compares runs on several devices
    with it."""
    from PIL import Image
    from data import load_idx

    folder = tmp_path_factory.mktemp("small-run")
    digit = 255 - load_idx(small_mnist)[2][0]
    Image.fromarray(np.kron(digit, np.ones((3, 3), np.uint8)), "L").save(folder / "seven.png")
    result = run_cli(*SMALL_CLI_RUN, "--epochs", "2", "--out-dir", str(folder / "out"), "--save",
                     str(folder / "net.npz"), "--predict", str(folder / "seven.png"), "--data-dir", small_mnist,
                     cwd=folder)
    return result, folder


def save_run(path, flags=(), epochs_done=0, **config):
    """A checkpoint as --save writes it for a run of the default network started with flags (on the
    data their --data-dir names), after epochs_done epochs: freshly drawn parameters (and velocity),
    made-up epoch records; config entries override the run's recorded ones. Returns (network, params)."""
    import model
    from data import fingerprint, load_idx
    from machinery import checkpoints
    from machinery.flags import RUN_FLAGS, parse_args

    args = parse_args(list(flags))
    network = model.build_network("modern")
    init_key, shuffle_key = model.run_keys(args.seed)
    params = network.init(init_key)
    recorded = {"devices": 1, "data_dir": os.path.abspath(args.data_dir)}
    if "data_sha256" not in config:
        recorded["data_sha256"] = fingerprint(*load_idx(args.data_dir))
    run = {"config": {**{name: getattr(args, name) for name in RUN_FLAGS}, **recorded, **config},
           "shuffle_key": shuffle_key,
           "epochs": [{"epoch": epoch, "train_loss": 0.5, "test_accuracy": 0.9, "seconds": 1.0}
                      for epoch in range(1, epochs_done + 1)]}
    checkpoints.save_checkpoint(str(path), params, network, params, run)
    return network, params
