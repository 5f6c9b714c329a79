"""Checkpoints: --save writes one after every epoch, --load starts from one, --resume continues the
run one holds. A checkpoint is an .npz archive of plain arrays (no pickled objects):

    format                 CHECKPOINT_FORMAT; a checkpoint of any other format is refused
    network                the kind of network (model.NETWORKS), input_shape (C, H, W), num_classes
    ink_span               how much of their frame the training images' drawings span (--predict)
    layer{i}/{name}        the parameters, one array per layer and name
and, for a run that can be resumed,
    velocity/layer{i}/...  the momentum velocity (with momentum)
    run/config             the run's flags, its number of devices and the SHA-256 of its data (JSON)
    run/epochs             its per-epoch records (JSON)
    run/shuffle_key        the shuffling key after the epochs done
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from data import MNIST_INK_SPAN, counted, describe_data
from machinery.errors import UsageError
from machinery.files import require_file, write_atomically
from machinery.flags import PRESET_NETWORK, RUN_FLAGS, flag_of

# The one layout this model.py writes and reads.
CHECKPOINT_FORMAT = 1


def save_checkpoint(path, params, network, velocity=None, run=None, span=MNIST_INK_SPAN):
    """Writes params, and what they were trained for (the network's kind, input shape (C, H, W),
    number of classes and `span`: how much of their frame the training images' drawings span,
    data.ink_span, for --predict), to an .npz file atomically. A checkpoint that a run can be
    resumed from also holds the velocity (with momentum) and `run`: {"config": the run's flags,
    "shuffle_key": the shuffling key after the epochs done, "epochs": their per-epoch records}."""
    def layer_arrays(prefix, tree):
        return {f"{prefix}layer{index}/{name}": np.asarray(value)
                for index, layer_params in enumerate(tree) for name, value in layer_params.items()}

    arrays = layer_arrays("", params)
    arrays["format"] = np.array(CHECKPOINT_FORMAT)
    arrays["network"] = np.array(network.kind)
    arrays["input_shape"] = np.array(network.input_shape)
    arrays["num_classes"] = np.array(network.num_classes)
    arrays["ink_span"] = np.array(float(span))
    if velocity is not None:
        arrays.update(layer_arrays("velocity/", velocity))
    if run is not None:
        arrays["run/config"] = np.array(json.dumps(run["config"]))
        arrays["run/epochs"] = np.array(json.dumps(run["epochs"]))
        arrays["run/shuffle_key"] = np.asarray(run["shuffle_key"])

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object, so numpy adds no ".npz" to the name
            np.savez(f, **arrays)

    write_atomically(path, write)


def read_checkpoint(flag, path):
    """The arrays of a checkpoint written by save_checkpoint, its run's "run/config" and "run/epochs"
    (if it holds a run) read from their JSON, refusing (UsageError, one line) a file that is not one,
    or one of another format."""
    require_file(flag, path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            stored = {name: archive[name] for name in archive.files}
    except Exception as error:  # np.load raises many types for files that are not .npz archives
        raise UsageError(f"{flag} {path}: not a checkpoint written by --save ({type(error).__name__})") from None
    found = stored.get("format")
    if found is None or found.shape != () or found.dtype.kind not in "iu" or found != CHECKPOINT_FORMAT:
        written = "no format recorded" if found is None else f"format {found.tolist()}"
        raise UsageError(f"{flag} {path}: a checkpoint of {written}, but this model.py reads format "
                         f"{CHECKPOINT_FORMAT} only; save it again with this model.py")
    try:
        stored.update(check_records(stored))
    except ValueError as error:
        raise UsageError(f"{flag} {path}: not a checkpoint written by --save ({error})") from None
    return stored


def check_records(stored):
    """Raises ValueError naming the first of a checkpoint's records (the arrays besides the
    parameters) that save_checkpoint would not have written. Returns the run's JSON records read,
    {"run/config": dict, "run/epochs": list}, or {} for a checkpoint of parameters only."""
    def record(name):
        if name not in stored:
            raise ValueError(f"no {name} record")
        return stored[name]

    if str(record("network")) not in PRESET_NETWORK.values():
        raise ValueError(f"a network {str(stored['network'])!r} that this model.py does not know")
    shape, classes, span = record("input_shape"), record("num_classes"), record("ink_span")
    if shape.dtype.kind not in "iu" or shape.shape != (3,) or (shape < 1).any():
        raise ValueError(f"input_shape {shape.tolist()}, not (channels, height, width)")
    if classes.dtype.kind not in "iu" or classes.shape != () or classes < 2:
        raise ValueError(f"num_classes {classes.tolist()}, not a number of classes")
    if span.dtype.kind != "f" or span.shape != () or not 0 < span <= 1:
        raise ValueError(f"ink_span {span.tolist()}, not a fraction of the frame")
    if "run/config" not in stored:
        return {}
    try:
        config, epochs = json.loads(str(stored["run/config"])), json.loads(str(record("run/epochs")))
    except json.JSONDecodeError:
        raise ValueError("run/config or run/epochs is not JSON") from None
    if not isinstance(config, dict) or not set(RUN_FLAGS + ("devices", "data_sha256", "data_dir")) <= set(config):
        raise ValueError("run/config does not hold every flag of a run")
    if not isinstance(epochs, list):
        raise ValueError("run/epochs is not a list of epochs")
    if record("run/shuffle_key").shape != (2,) or stored["run/shuffle_key"].dtype != np.uint32:
        raise ValueError("run/shuffle_key is not a PRNG key")
    return {"run/config": config, "run/epochs": epochs}


def trained_for(stored):
    """(input shape (C, H, W), number of classes) a checkpoint's parameters were trained for."""
    return tuple(int(size) for size in stored["input_shape"]), int(stored["num_classes"])


def check_checkpoint(stored, network, flag, path):
    """Refuses (UsageError, one line) a checkpoint saved from another network than this one, or
    trained on images of another shape or another number of classes."""
    saved_kind = str(stored["network"])
    if saved_kind != network.kind:
        preset_of = {kind: preset for preset, kind in PRESET_NETWORK.items()}
        raise UsageError(f"{flag} {path}: saved from the {saved_kind!r} network, but this run builds the "
                         f"{network.kind!r} one; load it with --preset {preset_of[saved_kind]}")
    if trained_for(stored) != (network.input_shape, network.num_classes):
        raise UsageError(f"{flag} {path}: trained on {describe_data(*trained_for(stored))}, but this data has "
                         f"{describe_data(network.input_shape, network.num_classes)}; pass --data-dir the "
                         "dataset it was trained on")


def layers_from(stored, prefix, template, flag, path):
    """The arrays stored under prefix ("" for params, "velocity/") in the structure of template."""
    tree = []
    for index, layer_params in enumerate(template):
        loaded = {}
        for name, value in layer_params.items():
            key = f"{prefix}layer{index}/{name}"
            if key not in stored or stored[key].shape != value.shape:
                found = stored[key].shape if key in stored else "nothing"
                raise UsageError(f"{flag} {path}: {key} should have shape {value.shape}, found {found}; "
                                 "the checkpoint does not match this network")
            loaded[name] = jax.device_put(np.asarray(stored[key], value.dtype))
        tree.append(loaded)
    expected = {f"{prefix}layer{index}/{name}" for index, layer_params in enumerate(template) for name in layer_params}
    unexpected = sorted(key for key in stored if key.startswith(prefix + "layer") and key not in expected)
    if unexpected:
        raise UsageError(f"{flag} {path}: unexpected arrays {unexpected}; the checkpoint does not match this network")
    return tree


def parameter_shapes(network):
    """The shapes and dtypes of the network's parameters, for reading a checkpoint: no random draw."""
    return jax.eval_shape(network.draw, jax.ShapeDtypeStruct((2,), jnp.uint32))


def load_checkpoint(path, network, flag="--load", stored=None):
    """The parameters of the checkpoint at path (or already read from it: stored) written by
    save_checkpoint, refusing (UsageError, one line) files that do not fit the network."""
    stored = read_checkpoint(flag, path) if stored is None else stored
    check_checkpoint(stored, network, flag, path)
    return layers_from(stored, "", parameter_shapes(network), flag, path)


def resume_flags(args):
    """Sets args' RUN_FLAGS to those of the run saved at args.resume, refusing (UsageError, one line)
    explicit flags that would change that run. Returns the checkpoint's arrays, for resume_run."""
    stored = read_checkpoint("--resume", args.resume)
    if "run/config" not in stored:
        raise UsageError(f"--resume {args.resume}: holds parameters only, not a run to resume; "
                         "start from it with --load instead")
    config = stored["run/config"]
    for name in args.explicit:
        if getattr(args, name) != config[name]:
            raise UsageError(f"--resume {args.resume}: {flag_of(name)} {getattr(args, name)} would change the "
                             f"run, which has {config[name]}; drop {flag_of(name)}, or start a new run")
    for name in RUN_FLAGS:
        setattr(args, name, config[name])
    return stored


def resume_run(args, stored, network, data_digest, devices):
    """(params, {"velocity", "shuffle_key", "epochs"} for model.train, the line announcing the
    resumption) of the run saved at args.resume, already read (resume_flags), to go on with on
    `devices` devices and the data whose fingerprint is data_digest. Refuses (UsageError, one line)
    a run of other data, or one that has done all its epochs."""
    path = args.resume
    params = load_checkpoint(path, network, "--resume", stored)
    has_velocity = any(key.startswith("velocity/") for key in stored)
    velocity = layers_from(stored, "velocity/", parameter_shapes(network), "--resume", path) if has_velocity else None
    config, epochs = stored["run/config"], stored["run/epochs"]
    if config["data_sha256"] != data_digest:
        before = config["data_dir"]
        where = ("those files have changed since" if before == os.path.abspath(args.data_dir)
                 else f"it trained on those in {before}")
        raise UsageError(f"--resume {path}: the run trained on other images or labels than those in "
                         f"{args.data_dir} ({where}); resume it on its own data, with --data-dir")
    if len(epochs) >= args.epochs:
        raise UsageError(f"--resume {path}: the run has already done the {counted(args.epochs, 'epoch')} "
                         "it planned; evaluate it with --load and --eval-only")
    # The same epochs on another number of devices: each batch's sums are split and added in
    # another order, so the numbers part from the uninterrupted run's, at first in their last bits.
    moved = (f"; it trained on {counted(config['devices'], 'device')} and continues on {devices}, "
             "so its sums are split otherwise and its numbers will not equal, bit for bit, those of a run "
             "never interrupted") if config["devices"] != devices else ""
    resume = {"velocity": velocity, "shuffle_key": jax.device_put(stored["run/shuffle_key"]), "epochs": epochs}
    return params, resume, f"resuming {path} after epoch {len(epochs)}{moved}"


def writer(args, network, config, span):
    """after_epoch for model.train: writes the run, resumable, to --save (or back to --resume), from
    process 0 only; None without either."""
    path = args.save or args.resume
    if not path:
        return None

    def save(params, velocity, shuffle_key, epochs):
        if jax.process_index() == 0:
            save_checkpoint(path, params, network, velocity,
                            {"config": config, "shuffle_key": shuffle_key, "epochs": epochs}, span)
    return save
