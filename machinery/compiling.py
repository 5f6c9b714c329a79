"""What XLA compiles: the options for the small functions a run calls once or once an epoch, and
JAX's persistent compilation cache, which lets a later run load what an earlier one compiled."""

import os
import warnings

import jax

from machinery.errors import UsageError
from machinery.files import require_writable_folder

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
