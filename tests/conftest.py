"""Shared set-up: the project root on sys.path, float64 so gradients can be compared to ~1e-12,
float32 matrix products at full precision, and one compilation cache for the session.

The training code fixes its own dtype (float32) explicitly, so model tests still run in float32. On a
GPU, JAX's default float32 matrix product may round its inputs to TensorFloat-32 (10 mantissa bits);
"highest" keeps every product in full float32 (or float64) wherever the tests run, so their tolerances
mean the same on every device.
"""

import atexit
import os
import shutil
import struct
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


def idx_bytes(array, magic):
    """The bytes of an IDX file holding array (as unsigned bytes) under the header's magic number."""
    array = np.asarray(array, np.uint8)
    return struct.pack(f">i{array.ndim}I", magic, *array.shape) + array.tobytes()


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
