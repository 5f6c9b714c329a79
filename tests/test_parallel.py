"""Data-parallel training: the same run on one device, on two host devices, and in two processes.

Several CPU devices exist only if XLA is told so before JAX starts, and several processes only as
processes, so every run here is a fresh interpreter: model.py itself, or a few lines around
model.train. Only the rendezvous before JAX's runtime starts, plain sockets, is tested in threads.
"""

import argparse
import json
import os
import signal
import socket
import threading
import time

import pytest

from machinery import errors, processes
from machinery.flags import parse_args
from conftest import CLI_ENVIRONMENT, ROOT, SMALL_CLI_RUN, start_cli

RUN = (*SMALL_CLI_RUN, "--epochs", "2")


def two_host_devices():
    return dict(CLI_ENVIRONMENT, XLA_FLAGS="--xla_force_host_platform_device_count=2")


def model_py(*flags, cwd, env=None, data_dir=os.path.join(ROOT, "data")):
    return start_cli(*RUN, *flags, "--data-dir", data_dir, cwd=cwd, env=env or two_host_devices())


def epochs_of(out_dir):
    return json.loads((out_dir / "metrics.json").read_text())["epochs"]


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_processes(folder, data_dir, *flags):
    """model.py as processes 0 and 1 of a run on localhost, one device each, writing to folder/rank0
    and folder/rank1."""
    port = free_port()
    return [model_py("--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(rank),
                     *flags, "--out-dir", str(folder / f"rank{rank}"), cwd=folder, env=CLI_ENVIRONMENT,
                     data_dir=data_dir) for rank in (0, 1)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_mnist, small_run):
    """The same run three ways: on one device (conftest's small_run, with these flags); on two host
    devices in one process; in two processes of one device each, joined on localhost. The last two
    at once. Returns {name: (stdout, stderr)} and {name: its out-dir}."""
    folder = tmp_path_factory.mktemp("parallel")
    processes = {"two devices": model_py("--devices", "2", "--out-dir", str(folder / "two"), cwd=folder,
                                         data_dir=small_mnist)}
    processes["process 0"], processes["process 1"] = two_processes(folder, small_mnist)
    outputs = {name: process.communicate(timeout=400) for name, process in processes.items()}
    for name, process in processes.items():
        assert process.returncode == 0, (name, outputs[name])
    one_device, small_folder = small_run
    assert one_device.returncode == 0, one_device.stderr
    out_dirs = {"one device": small_folder / "out", "two devices": folder / "two", "process 0": folder / "rank0",
                "process 1": folder / "rank1"}
    return outputs, out_dirs


def test_two_devices_train_as_one(runs):
    """Each device computes the mean over its 32 images, and pmean averages the two means: in exact
    arithmetic the mean over all 64, so only the order of float32 additions may differ from one
    device, a few parts in 1e7 per step, which 50 SGD steps could grow but not to 1e-4 of the loss.
    (Measured on this run: no difference at all; the divisions by 32, 2 and 64 are exact in binary,
    and the sums happen to add in the same order. Other batch sizes or device counts need not.) A
    wrong all-reduce changes the loss at once by far more: psum in place of pmean fails here."""
    outputs, out_dirs = runs
    one, two = epochs_of(out_dirs["one device"]), epochs_of(out_dirs["two devices"])
    assert len(one) == len(two) == 2, (one, two)
    for a, b in zip(one, two):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-4 * a["train_loss"], (one, two)
        assert abs(a["test_accuracy"] - b["test_accuracy"]) <= 0.002, (one, two)
    metrics = json.loads((out_dirs["two devices"] / "metrics.json").read_text())
    assert metrics["devices"] == 2 and metrics["processes"] == 1
    assert "2 devices in 1 process" in outputs["two devices"][0]


def test_two_processes_train_as_two_devices(runs):
    """Two processes of one device each run the same arithmetic as two devices in one process, the
    average taken across processes by Gloo: the same numbers."""
    outputs, out_dirs = runs
    two, processes = epochs_of(out_dirs["two devices"]), epochs_of(out_dirs["process 0"])
    assert [e["train_loss"] for e in processes] == pytest.approx([e["train_loss"] for e in two], rel=1e-6)
    assert [e["test_accuracy"] for e in processes] == [e["test_accuracy"] for e in two]
    metrics = json.loads((out_dirs["process 0"] / "metrics.json").read_text())
    assert metrics["devices"] == 2 and metrics["processes"] == 2


def test_only_process_zero_writes(runs):
    outputs, out_dirs = runs
    assert "epoch   2/2" in outputs["process 0"][0]
    # Process 1 prints nothing of its own (Gloo, the collectives library, announces its connection).
    assert [line for line in outputs["process 1"][0].splitlines() if not line.startswith("[Gloo]")] == []
    assert not out_dirs["process 1"].exists()


def test_ctrl_c_in_one_process_stops_them_all_after_the_same_epoch(tmp_path, small_mnist):
    """SIGINT to process 1 alone (a Ctrl-C in its terminal) once process 0 has printed an epoch: both
    stop after the same epoch, process 0 writes what was trained, and both exit with 130 (a process
    that stopped alone would leave the other waiting forever in the next epoch's collective)."""
    processes = two_processes(tmp_path, small_mnist, "--epochs", "30")
    lines = []
    for line in processes[0].stdout:
        lines.append(line)
        if line.startswith("epoch "):
            processes[1].send_signal(signal.SIGINT)
            break
    outputs = [process.communicate(timeout=120) for process in processes]
    output = "".join(lines) + outputs[0][0]
    assert [process.returncode for process in processes] == [130, 130], (output, outputs)
    assert "Traceback" not in outputs[0][1] + outputs[1][1]
    done = epochs_of(tmp_path / "rank0")
    assert 1 <= len(done) < 30
    assert f"interrupted: training stopped after epoch {len(done)} of 30" in output


def test_a_process_that_dies_ends_the_others_in_one_line(tmp_path, small_mnist):
    """Process 1 killed outright (a crash, a lost machine) during training: process 0, waiting for it
    in a collective, ends at once with one line, not JAX's traceback after a minute and a half's wait
    for the lost process."""
    processes = two_processes(tmp_path, small_mnist, "--epochs", "30")
    for line in processes[0].stdout:
        if line.startswith("epoch "):
            processes[1].kill()
            break
    start = time.monotonic()
    output, errors = processes[0].communicate(timeout=120)
    processes[1].communicate()
    assert processes[0].returncode == 1 and time.monotonic() - start < 30, (output, errors)
    lines = [line for line in errors.splitlines() if not line.startswith("[Gloo]")]
    assert len(lines) == 1 and lines[0].startswith("model.py: error: process 0 lost the other processes of the "
                                                   "run ("), errors
    assert not (tmp_path / "rank0").exists()


def test_more_devices_than_there_are_is_refused(tmp_path):
    result = model_py("--devices", "3", "--batch-size", "63", "--out-dir", str(tmp_path / "out"), cwd=tmp_path)
    out, err = result.communicate(timeout=120)
    assert result.returncode != 0 and out == "" and "Traceback" not in err
    assert err.strip().splitlines() == ["model.py: error: --devices 3: this process has 2 cpu devices; on a CPU, "
                                        "XLA_FLAGS=--xla_force_host_platform_device_count=3 set before starting "
                                        "makes that many"]


def test_a_missing_process_is_reported_in_one_line_in_bounded_time(tmp_path):
    """Process 1 of 2 with nobody at the coordinator's address, and process 0 of 2 whose partner
    never comes: each gives up after --join-timeout with one line, not a hang or a crash."""
    start = time.monotonic()
    # Both at once, each at a port of its own: they do not meet.
    processes = [model_py("--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2", "--process-id",
                          str(rank), "--join-timeout", "2", "--out-dir", str(tmp_path / "out"), cwd=tmp_path,
                          env=CLI_ENVIRONMENT) for rank in (1, 0)]
    for process in processes:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 1 and out == "", (out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "within --join-timeout 2 s" in lines[0], err
    assert time.monotonic() - start < 30
    assert not (tmp_path / "out").exists()


def test_a_coordinator_no_one_knows_is_named_as_such():
    """A host name that does not resolve: said so, rather than that process 0 was not there."""
    args = argparse.Namespace(coordinator="nosuchhost.invalid:1234", process_id=1, num_processes=2, join_timeout=1)
    with pytest.raises(errors.UsageError, match="no machine called nosuchhost.invalid could be found within "
                                               "--join-timeout 1 s"):
        processes.rendezvous(args)


@pytest.mark.parametrize("started_as, refusal", [
    ([(0, 3), (1, 3), (1, 3)], "--process-id 1: 2 processes were started with it; give each process its own "
                               "number, 0 to 2"),
    ([(0, 3), (1, 2), (2, 3)], "--num-processes: process 1 was started with 2, process 0 with 3; start every "
                               "process with the same --num-processes"),
    ([(0, 3), (1, 3), (2, 3, "--lr", "0.05")], "--lr: process 2 was started with 0.05, process 0 with 0.1; start "
                                               "every process with the same flags but --process-id"),
    ([(0, 2, "--resume", "run.npz"), (1, 2)], "--resume: process 1 was started without it, process 0 with it; "
                                              "start every process with the same flags but --process-id"),
])
def test_processes_that_cannot_train_together_are_all_refused_in_one_line(started_as, refusal):
    """Two processes of one number, started for different numbers of processes, or with different
    flags: JAX's runtime would abort every one of them with a stack trace, or wait forever, or (another
    learning rate) they would train apart in silence. The rendezvous before it refuses them all,
    process 0 and the others, with the same line. Each (--process-id, --num-processes, other flags)
    here is a thread."""
    port = free_port()
    outcome = {}

    def join(index, process_id, num_processes, *flags):
        args = parse_args(["--coordinator", f"127.0.0.1:{port}", "--process-id", str(process_id),
                                 "--num-processes", str(num_processes), "--join-timeout", "20", *flags])
        try:
            processes.rendezvous(args)
            outcome[index] = "joined"
        except errors.UsageError as error:
            outcome[index] = str(error)

    threads = [threading.Thread(target=join, args=(index, *flags)) for index, flags in enumerate(started_as)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert outcome == {index: refusal for index in range(len(started_as))}
