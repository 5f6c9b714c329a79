"""The devices a run computes on: starting them, the mesh that --devices and several processes split
every batch across, and arrays copied to each device of it."""

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from data import counted
from machinery.errors import UsageError

# The name of the one mesh axis data-parallel training splits every batch along.
BATCH_AXIS = "batch"
# Test images per compiled evaluation step: it bounds memory, not accuracy (each image's answer is
# the same in any chunk). In a run, 10,000 images are evaluated in chunks of 200 in about half the
# time they take in chunks of 1,000 (PERFORMANCE.md).
EVAL_CHUNK = 200


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


