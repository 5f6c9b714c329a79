"""What a run says and records about itself: its opening line, the configuration a checkpoint
keeps, and the numbers metrics.json holds."""

import os

import jax
import numpy as np

from data import counted, describe_data
from machinery.devices import describe_device, device_count
from machinery.flags import PRESET_NETWORK, RUN_FLAGS
from machinery.stopping import TRAINING_STOPS


def after_stdout_closes(args):
    """What the run does once its standard output has closed, as stopping.print_line says it."""
    if args.load and args.predict:
        return "the remaining answers go unprinted"
    return "the evaluation goes on and writes its files" if args.eval_only else TRAINING_STOPS


def devices_used(args, mesh):
    """'cpu (cpu)', and with a mesh ', 2 devices in 1 process'."""
    device = describe_device()
    if mesh is not None:
        device += f", {mesh.size} devices in {counted(args.num_processes, 'process', 'processes')}"
    return device


def opening_line(args, network, mesh, test_count):
    """The line a run opens with: JAX, the devices, and what it trains (or evaluates) on what."""
    device, kind = devices_used(args, mesh), PRESET_NETWORK[args.preset]
    described = describe_data(network.input_shape, network.num_classes)
    if args.eval_only:
        return (f"JAX {jax.__version__} on {device}; evaluating {args.load} ({kind} network) on {test_count} test "
                f"images ({described})")
    held_out = f", the last {args.val_size} held out for validation" if args.val_size else ""
    warmup = f" ({args.warmup_epochs} warming up)" if args.warmup_epochs else ""
    return (f"JAX {jax.__version__} on {device}; preset {args.preset!r} ({kind} network): "
            f"{args.train_size} training images ({described}){held_out}, batch {args.batch_size}, lr {args.lr}, "
            f"momentum {args.momentum}, weight decay {args.weight_decay}, {counted(args.epochs, 'epoch')}{warmup}")


def run_config(args, mesh, data_digest):
    """What a checkpoint records of its run: the flags that decide what it computes, the number of
    devices it trains on (not a flag of the run: it may change on resuming, but it decides how each
    batch's sums are split), and the SHA-256 and folder of the data it trains on."""
    return {**{name: getattr(args, name) for name in RUN_FLAGS}, "devices": device_count(mesh),
            "data_sha256": data_digest, "data_dir": os.path.abspath(args.data_dir)}


def metrics(args, epochs, test_accuracy, seconds, mesh):
    """metrics.json's contents; seconds is (compile_seconds, train_seconds)."""
    return {
        "config": {name: getattr(args, name) for name in sorted(vars(args)) if name != "explicit"},
        "epochs": epochs,
        "test_accuracy": test_accuracy,
        "train_seconds": seconds[1],
        "compile_seconds": seconds[0],
        "jax_version": jax.__version__,
        "device": devices_used(args, mesh),
        "devices": device_count(mesh),
        "processes": args.num_processes,
    }


def gradient_flow(network, params, flow):
    """metrics.json's record of an epoch's gradient flow (model.gradient_flow, its mean over the
    epoch's steps): for every layer with weights, its name and weights' shape, the gradient's norm
    and the update's size relative to the weights."""
    names = [f"{index}: {type(layer).__name__.removeprefix('Fast')} {'x'.join(map(str, layer_params['weights'].shape))}"
             for index, (layer, layer_params) in enumerate(zip(network.layers, params)) if "weights" in layer_params]
    return [{"layer": name, "gradient_norm": float(gradient), "relative_update": float(update)}
            for name, (gradient, update) in zip(names, np.asarray(flow))]
