"""Guards checkpoints and resume: the format, its refusals, and a resumed run equal to one never
interrupted."""

import json
import os
import signal

import jax
import numpy as np
import pytest

import model
from machinery import checkpoints, errors
from conftest import RUN_OUTPUTS, SMALL_CLI_RUN, run_cli, save_run, start_cli


SMALL_RUN = (*SMALL_CLI_RUN, "--epochs", "6")


def checkpoint_arrays(path):
    with np.load(path) as archive:
        return {name: archive[name] for name in archive.files}


def test_checkpoint_round_trip_and_refusals(tmp_path):
    network = model.build_network("modern")
    params = network.init(jax.random.PRNGKey(5))
    path = str(tmp_path / "net.npz")
    checkpoints.save_checkpoint(path, params, network)
    loaded = checkpoints.load_checkpoint(path, network)
    for a, b in zip(params, loaded):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    assert os.listdir(tmp_path) == ["net.npz"]  # no temporary file left behind

    with pytest.raises(errors.UsageError, match="'modern' network, .*--preset default"):
        checkpoints.load_checkpoint(path, model.build_network("original"))
    with pytest.raises(errors.UsageError, match="trained on 28x28 images in 10 classes, but this data has 28x28 "
                                               "images in 9 classes"):
        checkpoints.load_checkpoint(path, model.build_network("modern", num_classes=9))
    (tmp_path / "junk.npz").write_bytes(b"not a zip archive")
    with pytest.raises(errors.UsageError, match="not a checkpoint"):
        checkpoints.load_checkpoint(str(tmp_path / "junk.npz"), network)
    with np.load(path) as archive:
        other = dict(archive)
    np.savez(tmp_path / "other.npz", **{**other, "layer0/weights": np.zeros((2, 2))})
    with pytest.raises(errors.UsageError, match=r"layer0/weights should have shape \(5, 1, 3, 3\), found \(2, 2\)"):
        checkpoints.load_checkpoint(str(tmp_path / "other.npz"), network)
    with pytest.raises(errors.UsageError, match="no such file"):
        checkpoints.load_checkpoint(str(tmp_path / "absent.npz"), network)


@pytest.mark.parametrize("change, why", [
    (dict(network="resnet"), "a network 'resnet' that this model.py does not know"),
    (dict(input_shape=[1, 28]), r"input_shape \[1, 28\], not \(channels, height, width\)"),
    (dict(num_classes=1.5), "num_classes 1.5, not a number of classes"),
    (dict(ink_span=1.5), r"ink_span 1.5, not a fraction of the frame"),
    (dict(**{"run/config": "{not json"}), "run/config or run/epochs is not JSON"),
    (dict(**{"run/config": "[]"}), "run/config does not hold every flag of a run"),
    (dict(**{"run/shuffle_key": np.zeros(3, np.uint32)}), "run/shuffle_key is not a PRNG key"),
])
def test_a_damaged_checkpoint_is_refused_naming_the_record(tmp_path, change, why):
    """Records a --save could not have written: one line naming the record, not a traceback from
    wherever it would first be used (json, the shape's unpacking, ...)."""
    save_run(tmp_path / "run.npz")
    with np.load(tmp_path / "run.npz") as archive:
        arrays = {name: archive[name] for name in archive.files}
    np.savez(tmp_path / "damaged.npz", **{**arrays, **{name: np.asarray(value) for name, value in change.items()}})
    for flag in ("--load", "--resume"):
        with pytest.raises(errors.UsageError, match=f"{flag} .*damaged.npz: not a checkpoint written by --save \\({why}\\)"):
            checkpoints.read_checkpoint(flag, str(tmp_path / "damaged.npz"))


def test_a_checkpoint_of_another_format_is_refused_in_one_line(tmp_path):
    network = model.build_network("modern")
    path = str(tmp_path / "net.npz")
    checkpoints.save_checkpoint(path, network.init(jax.random.PRNGKey(0)), network)
    with np.load(path) as archive:
        stored = dict(archive)
    np.savez(tmp_path / "future.npz", **{**stored, "format": np.array(2)})
    np.savez(tmp_path / "older.npz", **{name: value for name, value in stored.items() if name != "format"})
    for name, written in [("future.npz", "format 2"), ("older.npz", "no format recorded")]:
        with pytest.raises(errors.UsageError, match=f"^--load {tmp_path / name}: a checkpoint of {written}, but this "
                                                    "model.py reads format 1 only; save it again with this model.py$"):
            checkpoints.load_checkpoint(str(tmp_path / name), network)


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(tmp_path, small_mnist):
    """SIGINT once the first epoch line has appeared: the run stops after the epoch running, says
    where in one line, writes its outputs and checkpoint, and exits with 130. --resume then finishes
    it with the same parameters, bit for bit, and the same per-epoch table as a run never stopped.
    It warms up over all its epochs, so the resumed run must also take its warmup from the checkpoint."""
    def start(name):
        return start_cli(*SMALL_RUN, "--warmup-epochs", "6", "--data-dir", small_mnist, "--out-dir",
                         str(tmp_path / name), "--save", str(tmp_path / f"{name}.npz"), cwd=tmp_path)

    # The run never stopped goes alongside the other two (a second core shortens the test).
    straight = start("straight")
    process = start("stopped")
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("epoch "):
            process.send_signal(signal.SIGINT)
            break
    rest, errors = process.communicate(timeout=300)
    output = "".join(lines) + rest
    assert process.returncode == 130, output + errors
    assert "Traceback" not in errors and errors == "", errors
    stopped = [line for line in output.splitlines() if line.startswith("interrupted:")]
    assert len(stopped) == 1 and "stopped after epoch" in stopped[0], output
    done = json.loads((tmp_path / "stopped" / "metrics.json").read_text())["epochs"]
    assert 1 <= len(done) < 6
    assert {path.name for path in (tmp_path / "stopped").iterdir()} == RUN_OUTPUTS
    assert not [name for name in os.listdir(tmp_path) if name.startswith("tmp")]  # nothing half-written

    resumed = run_cli("--resume", str(tmp_path / "stopped.npz"), "--out-dir", str(tmp_path / "resumed"),
                      "--data-dir", small_mnist, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    _, errors = straight.communicate(timeout=300)
    assert straight.returncode == 0, errors

    stopped_then_resumed, uninterrupted = (checkpoint_arrays(tmp_path / f"{name}.npz") for name in ("stopped", "straight"))
    assert stopped_then_resumed.keys() == uninterrupted.keys()
    for name, array in uninterrupted.items():
        if name != "run/epochs":  # the per-epoch records hold timings; compared below without them
            assert np.array_equal(stopped_then_resumed[name], array), name
    epochs = [json.loads((tmp_path / name / "metrics.json").read_text())["epochs"] for name in ("resumed", "straight")]
    assert len(epochs[0]) == 6
    for key in ("epoch", "train_loss", "test_accuracy"):
        assert [e[key] for e in epochs[0]] == [e[key] for e in epochs[1]], key


def test_resume_refuses_a_flag_that_changes_the_run(tmp_path):
    network, params = save_run(tmp_path / "run.npz", (*SMALL_RUN, "--epochs", "2"))
    # In this process: how the command line prints a UsageError, in one line, is checked in test_cli.py.
    with pytest.raises(errors.UsageError) as raised:
        model.main(["--resume", str(tmp_path / "run.npz"), "--lr", "0.5"])
    assert str(raised.value) == (f"--resume {tmp_path / 'run.npz'}: --lr 0.5 would change the run, which has "
                                 "0.1; drop --lr, or start a new run")
    # Parameters alone are not a run.
    checkpoints.save_checkpoint(str(tmp_path / "params.npz"), params, network)
    with pytest.raises(errors.UsageError, match="not a run to resume; start from it with --load"):
        model.main(["--resume", str(tmp_path / "params.npz")])
    # Nor is one that has done all its epochs.
    save_run(tmp_path / "done.npz", (*SMALL_RUN, "--epochs", "2"), epochs_done=2)
    with pytest.raises(errors.UsageError, match="has already done the 2 epochs it planned; evaluate it with --load"):
        model.main(["--resume", str(tmp_path / "done.npz"), "--out-dir", str(tmp_path / "out")])


def test_resume_refuses_other_data(tmp_path, small_mnist):
    """A run on one dataset resumed with another of the same shape (its --data-dir forgotten, so
    MNIST's by default, or the files replaced) went on training on the wrong images in silence. The
    checkpoint records the data's SHA-256 and folder; the folder may move, the data may not."""
    flags = (*SMALL_RUN, "--epochs", "2")
    for folder, why in (("/elsewhere/data", "it trained on those in /elsewhere/data"),
                        (os.path.abspath(small_mnist), "those files have changed since")):
        save_run(tmp_path / "run.npz", flags, epochs_done=1, data_sha256="0" * 64, data_dir=folder)
        with pytest.raises(errors.UsageError) as raised:
            model.main(["--resume", str(tmp_path / "run.npz"), "--data-dir", small_mnist, "--out-dir", str(tmp_path)])
        assert str(raised.value) == (f"--resume {tmp_path / 'run.npz'}: the run trained on other images or labels than "
                                     f"those in {small_mnist} ({why}); resume it on its own data, with --data-dir")


def test_a_checkpoint_is_refused_before_the_run_announces_itself(tmp_path, small_mnist):
    """A refusal is the run's one line: the line announcing the run (device, network, data) used
    to come first, for checkpoints found not to fit only after it."""
    wrong_network = model.build_network("original")
    checkpoints.save_checkpoint(str(tmp_path / "original.npz"), wrong_network.init(model.run_keys(0)[0]), wrong_network)
    save_run(tmp_path / "done.npz", (*SMALL_RUN, "--epochs", "2", "--data-dir", small_mnist), epochs_done=2)
    for flags, why in ((("--load", str(tmp_path / "original.npz"), "--eval-only"), "'original' network"),
                       (("--resume", str(tmp_path / "done.npz")), "has already done the 2 epochs")):
        lines = []
        with pytest.raises(errors.UsageError, match=why):
            model.main([*flags, "--data-dir", small_mnist, "--out-dir", str(tmp_path / "out")], log=lines.append)
        assert lines == []


def test_resume_on_another_number_of_devices_says_the_numbers_will_differ(tmp_path, small_mnist):
    """A run saved while training on 2 devices, resumed here on 1: allowed (a machine may change),
    but the resumed run cannot equal the uninterrupted one bit for bit, and says so in its line."""
    save_run(tmp_path / "run.npz", (*SMALL_CLI_RUN, "--epochs", "2", "--data-dir", small_mnist), epochs_done=1,
             devices=2)
    lines = []

    class Resumed(Exception):
        """Raised once the run has said it resumes: what follows is any run's training."""

    def log(line):
        lines.append(line)
        if line.startswith("resuming"):
            raise Resumed

    with pytest.raises(Resumed):
        model.main(["--resume", str(tmp_path / "run.npz"), "--data-dir", small_mnist, "--out-dir", str(tmp_path / "out")],
                   log=log)
    assert lines[-1] == (f"resuming {tmp_path / 'run.npz'} after epoch 1; it trained on 2 devices and continues on 1, "
                         "so its sums are split otherwise and its numbers will not equal, bit for bit, those of a run "
                         "never interrupted")
