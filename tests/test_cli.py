"""Guards the command line: every refusal in one line, signals and a closed stdout, files and their
paths, the compile cache."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

import model
from machinery import checkpoints, compiling, errors, exits, files, stopping
from machinery.flags import parse_args
from conftest import (CLI_ENVIRONMENT, COMPILATION_CACHE, ROOT, RUN_OUTPUTS, SMALL_CLI_RUN, run_cli, save_run,
                      start_cli)


REFUSALS = [
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "-1"], "--batch-size"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--momentum", "1.5"], "--momentum"),
    (["--warmup-epochs", "16"], "--warmup-epochs must be 0 to --epochs (15), got 16"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be 0 to --epochs"),
    (["--train-size", "70000"], "--train-size 70000"),
    (["--val-size", "-1"], "--val-size"),
    (["--val-size", "60000"], "--val-size 60000 leaves none"),
    (["--val-size", "10000", "--train-size", "55000"], "after --val-size 10000 holds 10000 out"),
    (["--train-size", "100", "--batch-size", "200"], "--batch-size 200 exceeds --train-size 100"),
    (["--batch-size", "70000"], "--batch-size 70000 exceeds the 60000 training images; give a smaller"),
    (["--val-size", "59990"], "--batch-size 128 exceeds the 10 training images left after --val-size 59990"),
    (["--fgsm", "-0.1"], "argument --fgsm: -0.1 is outside 0 to 1"),
    (["--fgsm", "0.1,1.5"], "argument --fgsm: 1.5 is outside 0 to 1"),
    (["--fgsm", "0.1,big"], "argument --fgsm: 'big' is not a number"),
    (["--load", "net.npz", "--predict", "x.png", "--fgsm", "0.1"], "--fgsm attacks the test images"),
    (["--predict", "missing.png"], "missing.png"),
    (["--load", "missing.npz"], "missing.npz"),
    (["--resume", "missing.npz"], "missing.npz"),
    (["--resume", "run.npz", "--load", "run.npz"], "cannot be combined"),
    (["--eval-only"], "--eval-only needs --load"),
    (["--load", "net.npz", "--eval-only", "--predict", "x.png"], "--eval-only and --predict"),
    (["--load", "net.npz", "--eval-only", "--epochs", "3", "--lr", "0.5"],
     "--eval-only trains nothing, so --epochs, --lr would change nothing; leave them out"),
    (["--load", "net.npz", "--predict", "x.png", "--seed", "1"],
     "--load with --predict only classifies the images, so --seed would change nothing; leave it out"),
    (["--devices", "0"], "--devices must be at least 1"),
    (["--devices", "2"], "--devices 2: this process has 1 cpu device"),
    (["--devices", "3", "--batch-size", "100"], "does not split evenly over 3 devices; use 99 or 102"),
    (["--preset", "seed", "--devices", "2"], "cannot be split across 2 devices"),
    (["--num-processes", "2"], "need all three of --coordinator"),
    (["--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "2"], "--process-id must be 0 to 1"),
    (["--coordinator", "nowhere", "--num-processes", "2", "--process-id", "1"], "expected HOST:PORT"),
    (["--coordinator", "localhost:99999", "--num-processes", "2", "--process-id", "1"], "a port 1 to 65535"),
    (["--coordinator", "localhost:0", "--num-processes", "2", "--process-id", "0"], "a port 1 to 65535"),
    (["--seed", "2147483648"], "--seed must be -2147483648 to 2147483647"),
    (["--num-processes", "0"], "--num-processes must be at least 1"),
    (["--out-dir", "x.png"], "--out-dir x.png: is a file"),
    (["--out-dir", "x.png/pictures"], "x.png is a file, so no folder can be made there"),
    (["--save", "."], "--save .: is a folder"),
    (["--save", "x.png/run.npz"], "x.png is a file, so no folder can be made there"),
    (["--load", "."], "--load .: is a folder"),
    (["--save", "out/loss_curve.png"], "--save out/loss_curve.png: the run writes its loss_curve.png there"),
    (["--predict", "."], "--predict .: is a folder"),
    (["--save", ""], "--save: an empty path"),
    (["--resume", ""], "--resume: an empty path"),
    (["--out-dir", ""], "--out-dir: an empty path"),
    (["--compile-cache", ""], "--compile-cache: an empty path"),
    (["--compile-cache", "x.png/cache"], "x.png is a file, so no folder can be made there"),
    (["--compile-cache", "cache", "--no-compile-cache"], "not allowed with argument --compile-cache"),
    (["--epochs", "two"], "--epochs"),
    (["--preset", "fast"], "--preset"),
]


SMALL_RUN = (*SMALL_CLI_RUN, "--epochs", "6")


def checkpoint_arrays(path):
    with np.load(path) as archive:
        return {name: archive[name] for name in archive.files}


class RecordedConfig:
    """A stand-in for jax.config that records what use_compile_cache sets."""

    def __init__(self, folder):
        self.jax_compilation_cache_dir = folder
        self.updates = {}

    def update(self, name, value):
        self.updates[name] = value


@pytest.mark.parametrize("flags, fragment", REFUSALS)
def test_nonsense_is_refused_in_one_line(tmp_path, capsys, monkeypatch, flags, fragment):
    """Each refusal as main() raises it, in this process; the command line's own handling of the
    same errors is checked once below, in a fresh one."""
    for name in ("run.npz", "net.npz", "x.png"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    with pytest.raises((errors.UsageError, SystemExit)) as raised:
        model.main(["--data-dir", os.path.join(ROOT, "data"), "--out-dir", str(tmp_path / "out"), *flags])
    message = str(raised.value) if raised.type is errors.UsageError else capsys.readouterr().err.strip()
    assert "\n" not in message and fragment in message, message
    assert raised.type is errors.UsageError or raised.value.code == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, fragment", [REFUSALS[3], REFUSALS[-2]])
def test_cli_refuses_nonsense_in_one_line(tmp_path, flags, fragment):
    result = run_cli(*flags, "--out-dir", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("error, amount", [
    # As `python model.py --batch-size 60000` met it on CPU under a 6 GB memory limit (ulimit -v):
    # a traceback ending in this line, from inside JAX. A GPU's says RESOURCE_EXHAUSTED instead.
    (jax.errors.JaxRuntimeError("INTERNAL: Error dispatching computation: Out of memory allocating 5354378880 bytes."),
     " (an allocation of 5.0 GiB failed)"),
    (jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1073741824 bytes."),
     " (an allocation of 1.0 GiB failed)"),
    (MemoryError(), "")])
def test_running_out_of_memory_is_one_line(monkeypatch, error, amount):
    def run_out(argv):
        raise error

    def exit_now(status, leave_together=True):
        raise SystemExit(status)

    monkeypatch.setattr(exits, "exit_now", exit_now)
    with pytest.raises(SystemExit) as ended:
        exits.run_as_program(run_out, [])
    assert ended.value.code == (f"model.py: error: out of memory{amount}: the run needs more memory than this "
                                "machine gives it; a smaller --batch-size needs less; every file written so far is "
                                "complete")


def test_a_platform_jax_cannot_start_is_one_line():
    """JAX_PLATFORMS naming a platform this JAX lacks (a GPU's without its plugin gives a bare
    AssertionError; an unknown name, as here, a RuntimeError): one line, not JAX's traceback."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "model.py")], capture_output=True, text=True,
                            timeout=120, env=dict(CLI_ENVIRONMENT, JAX_PLATFORMS="nosuchdevice"))
    assert result.returncode == 1 and result.stdout == "", result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "model.py: error: JAX cannot start its devices (JAX_PLATFORMS=nosuchdevice): "), result.stderr


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs Linux's /proc")
def test_a_folder_where_no_file_can_be_made_is_refused_before_training():
    """/proc takes no new file from anybody, root included, though its permission bits let root
    write: the check tries to make a file, as the run will, rather than read the bits."""
    with pytest.raises(errors.UsageError, match="^--out-dir /proc/out: cannot write in /proc "):
        model.main(["--out-dir", "/proc/out", "--data-dir", os.path.join(ROOT, "data")])
    with pytest.raises(errors.UsageError, match="^--save /proc/out/run.npz: cannot write in /proc "):
        model.main(["--save", "/proc/out/run.npz", "--data-dir", os.path.join(ROOT, "data")])


def test_a_folder_without_write_permission_is_refused_before_training(tmp_path, monkeypatch):
    """As a user without write permission there sees it (the suite may run as root, who has it
    everywhere, so the permission is denied by hand)."""
    def denied(**_):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(files.tempfile, "TemporaryFile", denied)
    with pytest.raises(errors.UsageError,
                       match=f"^--out-dir {tmp_path}/out: cannot write in {tmp_path} \\(Permission denied\\);"):
        model.main(["--out-dir", str(tmp_path / "out"), "--data-dir", os.path.join(ROOT, "data")])


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch):
    """What the checks before training cannot foresee (a full disk) still ends in one line naming
    the file the run was writing, not the temporary file it never saw, and no traceback."""
    def fill_the_disk(tmp):
        with open(tmp, "w") as f:
            f.write("{")
        raise OSError(errno.ENOSPC, "No space left on device")  # as f.write raises it: no file name

    def exit_now(status, leave_together=True):
        raise SystemExit(status)

    path = str(tmp_path / "out" / "metrics.json")
    monkeypatch.setattr(exits, "exit_now", exit_now)
    with pytest.raises(SystemExit) as ended:
        exits.run_as_program(lambda argv: files.write_atomically(path, fill_the_disk), [])
    assert ended.value.code == f"model.py: error: {path}: No space left on device"
    assert os.listdir(tmp_path / "out") == []  # no temporary file left behind


def test_shipped_mnist_is_found_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.path.samefile(parse_args([]).data_dir, os.path.join(ROOT, "data"))


def test_a_path_that_is_not_a_regular_file_is_refused_before_training(tmp_path):
    """The atomic write renames a new file over the path: over a device or a named pipe (as root,
    /dev/full itself) it would replace the node with a regular file and report success. Each such
    output path is refused before training, in one line."""
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "out").mkdir()
    os.mkfifo(tmp_path / "out" / "loss_curve.png")
    (tmp_path / "taken" / "metrics.json").mkdir(parents=True)
    for given, message in [
        (["--save", "/dev/full"], "^--save /dev/full: is a character device, not a regular file; give the name of a "
                                  "file to write$"),
        (["--save", str(tmp_path / "pipe")], r": is a named pipe \(FIFO\), not a regular file"),
        (["--out-dir", "/dev/null"], "^--out-dir /dev/null: is a character device; name a folder"),
        (["--out-dir", str(tmp_path / "out")], r"loss_curve.png is a named pipe \(FIFO\), where the run writes its "
                                               "loss_curve.png; remove it, or name another --out-dir$"),
        (["--out-dir", str(tmp_path / "taken")], "metrics.json is a folder, where the run writes its metrics.json"),
    ]:
        with pytest.raises(errors.UsageError, match=message):
            files.check_output_paths(parse_args(given))
    result = run_cli("--epochs", "1", "--save", "/dev/full", cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == "", result.stdout
    assert result.stderr == ("model.py: error: --save /dev/full: is a character device, not a regular file; give the "
                             "name of a file to write\n")
    assert os.path.exists("/dev/full") and not os.path.isfile("/dev/full")


def test_a_symbolic_link_is_written_through_to_its_file(tmp_path):
    target = tmp_path / "real.npz"
    target.write_text("before")
    (tmp_path / "link.npz").symlink_to(target)

    def write(tmp):
        with open(tmp, "w") as f:
            f.write("after")

    files.write_atomically(str(tmp_path / "link.npz"), write)
    assert (tmp_path / "link.npz").is_symlink() and target.read_text() == "after"
    assert sorted(os.listdir(tmp_path)) == ["link.npz", "real.npz"]


def test_ctrl_c_before_training_ends_the_run_at_once_in_one_line(tmp_path):
    """SIGINT half a second after starting, while JAX is still being imported: Python's own
    KeyboardInterrupt there would print a traceback, or be swallowed by one of JAX's callbacks while
    the run went on: one line, status 130, nothing written."""
    process = start_cli("--out-dir", str(tmp_path / "out"), cwd=tmp_path)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    output, errors = process.communicate(timeout=60)
    assert process.returncode == 130 and output == "", output + errors
    assert errors == stopping.STOPPED_BY.format("Ctrl-C") + "\n"
    assert os.listdir(tmp_path) == []


def test_ctrl_c_while_the_epoch_compiles_writes_nothing(tmp_path, small_mnist, monkeypatch):
    """Ctrl-C once training has begun but before its first epoch has ended: nothing was trained. The
    run must not write the pictures and metrics of its untrained network over those of an earlier
    run in the same --out-dir, nor its random parameters over that run's --save checkpoint: it says
    so in one line, writes nothing and exits with 130. (In this process, the signal sent while
    the epoch's function is made; it is compiled no further, as it never runs.)"""
    out, checkpoint = tmp_path / "out", tmp_path / "net.npz"
    out.mkdir()
    (out / "metrics.json").write_text("an earlier run's")
    checkpoint.write_bytes(b"an earlier run's")

    class NeverRun:
        def lower(self, *arrays):
            return self

        def compile(self):
            return self

        def __call__(self, *arrays):
            raise AssertionError("an epoch ran after the Ctrl-C")

    def interrupted_while_compiling(*args, **options):
        os.kill(os.getpid(), signal.SIGINT)
        return NeverRun()

    monkeypatch.setattr(model, "make_train_epoch", interrupted_while_compiling)
    lines = []
    status = model.main([*SMALL_CLI_RUN, "--epochs", "2", "--data-dir", small_mnist, "--out-dir", str(out),
                         "--save", str(checkpoint)], log=lines.append)
    assert status == 130
    assert lines[-1] == "interrupted: training stopped before epoch 1 of 2; nothing was trained, so nothing is written"
    assert os.listdir(out) == ["metrics.json"] and (out / "metrics.json").read_text() == "an earlier run's"
    assert checkpoint.read_bytes() == b"an earlier run's"


def test_sighup_and_sigterm_stop_training_as_ctrl_c_does(tmp_path, small_mnist):
    """SIGHUP (the terminal closed, an SSH connection dropped) once the first epoch line is out: the
    run stops after that epoch, says so, writes its outputs and checkpoint, and returns 129. A
    second SIGHUP, once it says it stops, changes nothing: a hangup comes twice, from the shell and
    from the terminal. SIGTERM (`timeout`, `docker stop`, a job scheduler) stops a run the same
    way, and a second one aborts at once. Sent by the run to itself, in this process, where
    handlers of the test's own stand in for the default ones, which would end the test session."""
    outside = []

    def stand_in(signum, frame):
        outside.append(f"{signal.Signals(signum).name} reached the test's handler")

    previous = {signum: signal.signal(signum, stand_in) for signum in (signal.SIGHUP, signal.SIGTERM)}
    try:
        def log_and_send(signum, lines):
            def log(line):
                lines.append(line)
                if line.startswith(("epoch ", "interrupted")):
                    os.kill(os.getpid(), signum)
            return log

        flags = [*SMALL_RUN, "--data-dir", small_mnist, "--save", str(tmp_path / "run.npz")]
        lines = []
        status = model.main([*flags, "--out-dir", str(tmp_path / "out")], log=log_and_send(signal.SIGHUP, lines))
        assert status == 128 + signal.SIGHUP, lines
        assert outside == [], "model.main left SIGHUP to the handler it found"
        assert [line for line in lines if line.startswith("interrupted")] == [
            "interrupted by SIGHUP: training stopped after epoch 1 of 6; writing what it trained "
            "(Ctrl-C again aborts at once)"], lines
        assert len(json.loads((tmp_path / "out" / "metrics.json").read_text())["epochs"]) == 1
        assert {path.name for path in (tmp_path / "out").iterdir()} == RUN_OUTPUTS
        assert len(json.loads(str(checkpoint_arrays(tmp_path / "run.npz")["run/epochs"]))) == 1

        lines = []
        with pytest.raises(KeyboardInterrupt) as aborted:
            model.main([*flags, "--out-dir", str(tmp_path / "again")], log=log_and_send(signal.SIGTERM, lines))
        assert aborted.value.args == (signal.SIGTERM,) and outside == []
        assert [line for line in lines if line.startswith("interrupted")] == [
            "interrupted by SIGTERM: training stopped after epoch 1 of 6; writing what it trained "
            "(Ctrl-C again aborts at once)"], lines
        assert not [name for name in os.listdir(tmp_path) if name.startswith("tmp")]  # nothing half-written
        assert all(signal.getsignal(signum) is stand_in for signum in previous)  # put back as they were
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_a_hangup_the_run_was_started_ignoring_stays_ignored():
    """`nohup python model.py` ignores SIGHUP so that the run goes on when its terminal closes:
    training must not take it over. SIGINT is taken over even when ignored: a shell ignores it in the
    jobs a script starts in the background, and a test suite started so still interrupts its runs."""
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGHUP, signal.SIGINT)}
    try:
        with stopping.StopOnInterrupt():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_a_hung_up_terminal_is_a_closed_stdout(monkeypatch, capsys):
    """After a hangup, writing to the terminal fails with EIO, not a broken pipe's EPIPE; the run
    then has no more use for stdout either, and stops as for a SIGHUP. Here stdout is the far end of
    a pseudo-terminal whose near end has been closed, as a dropped SSH connection leaves it."""
    near, far = os.openpty()
    os.close(near)
    monkeypatch.setattr(sys, "stdout", os.fdopen(far, "w"))
    interrupted = stopping.StopOnInterrupt()
    stopping.print_line("epoch   1/6", interrupted)
    assert interrupted.signal == signal.SIGHUP
    assert capsys.readouterr().err.startswith("model.py: standard output was closed (whatever read it has gone); ")
    stopping.print_line("epoch   2/6", interrupted)  # now into /dev/null, quietly
    assert capsys.readouterr().err == ""
    sys.stdout.close()


@pytest.mark.parametrize("mode, then", [("--predict", "the remaining answers go unprinted"),
                                        ("--eval-only", "the evaluation goes on and writes its files")])
def test_a_closed_stdout_without_training_says_what_goes_on_instead(tmp_path, small_mnist, monkeypatch, capsys,
                                                                    mode, then):
    """`--load --predict` or `--load --eval-only` into `| head -0`: nothing is trained, so stderr's
    line says what the run does instead of speaking of training, and the exit status says the
    output was cut short (141), as a training run's does."""
    save_run(tmp_path / "net.npz")
    Image.fromarray(np.full((28, 28), 255, np.uint8), "L").save(tmp_path / "blank.png")
    reader, writer = os.pipe()
    os.close(reader)
    monkeypatch.setattr(sys, "stdout", os.fdopen(writer, "w"))
    flags = [str(tmp_path / "blank.png")] if mode == "--predict" else ["--out-dir", str(tmp_path / "out"),
                                                                       "--data-dir", small_mnist]
    status = model.main(["--load", str(tmp_path / "net.npz"), mode, *flags])
    assert status == 128 + signal.SIGPIPE
    assert capsys.readouterr().err == f"model.py: standard output was closed (whatever read it has gone); {then}\n"
    if mode == "--eval-only":
        assert (tmp_path / "out" / "metrics.json").exists()
    sys.stdout.close()


def test_a_closed_stdout_stops_training_and_keeps_what_it_trained(tmp_path, small_mnist):
    """`python model.py | head -2`, or `| tee` ended by the same Ctrl-C: once what read stdout has
    gone, printing fails. The run says so on stderr, stops after the epoch running, writes its
    outputs, and exits with 141 (128 +
    SIGPIPE). With `2>&1 | head -2`, stderr is the same closed pipe, and the run keeps quiet. Both
    runs at once (a second core shortens the test), 200 short epochs planned: each must stop long
    before their end."""
    processes = {stderr: start_cli(*SMALL_CLI_RUN, "--epochs", "200", "--data-dir", small_mnist, "--out-dir",
                                   str(tmp_path / str(stderr)), cwd=tmp_path, stderr=stderr)
                 for stderr in (subprocess.PIPE, subprocess.STDOUT)}
    for process in processes.values():
        for line in process.stdout:
            if line.startswith("epoch "):
                break
        process.stdout.close()
    errors = processes[subprocess.PIPE].stderr.read()
    assert errors == ("model.py: standard output was closed (whatever read it has gone); training stops after "
                      "the epoch running and writes what it trained\n")
    for stderr, process in processes.items():
        assert process.wait(timeout=120) == 141, (stderr, errors)
        out = tmp_path / str(stderr)
        assert 1 <= len(json.loads((out / "metrics.json").read_text())["epochs"]) < 100
        assert {path.name for path in out.iterdir()} == RUN_OUTPUTS


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        files.write_atomically(str(tmp_path / "metrics.json"), lambda tmp: open(tmp, "w").write("{}"))
        checkpoints.save_checkpoint(str(tmp_path / "net.npz"), [{"weights": np.zeros(2)}], model.build_network("modern"))
    finally:
        os.umask(previous)
    for name in ("metrics.json", "net.npz"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == mode, name


def test_a_second_run_loads_its_compiled_function_from_the_cache(tmp_path, small_run):
    """--load --predict, the quickest run that compiles: the first run, without the session's cache,
    compiles its function and keeps it in the user's cache folder; the second, its own cache folder
    elsewhere but that one given by --compile-cache, loads it from there, and prints the same
    probabilities. (JAX_LOG_COMPILES has JAX log each compilation, and each function it loads.)"""
    environment = {name: value for name, value in CLI_ENVIRONMENT.items() if name not in COMPILATION_CACHE}
    environment["JAX_LOG_COMPILES"] = "1"
    cache = tmp_path / "home-cache" / "mnist-cnn-by-hand" / "jax"
    runs = []
    for home, flags in (("home-cache", ()), ("another-home", ("--compile-cache", str(cache)))):
        process = start_cli("--load", str(small_run[1] / "net.npz"), "--predict", str(small_run[1] / "seven.png"),
                            *flags, cwd=tmp_path, env=dict(environment, XDG_CACHE_HOME=str(tmp_path / home)))
        runs.append(process.communicate(timeout=300))
        assert process.returncode == 0, runs[-1]
    (first_output, first_errors), (second_output, second_errors) = runs
    loaded = "Persistent compilation cache hit for 'jit__lambda'"
    assert loaded not in first_errors and [name for name in os.listdir(cache) if name.startswith("jit__lambda-")]
    assert loaded in second_errors, second_errors
    assert second_output == first_output and "class 7; probabilities" in first_output


@pytest.mark.parametrize("configured", [None, "jax-variable"])
def test_the_compile_cache_by_default_is_jax_variables_folder_else_the_users_cache(tmp_path, monkeypatch,
                                                                                   configured):
    folder = str(tmp_path / configured) if configured else None
    config = RecordedConfig(folder)
    monkeypatch.setattr(compiling.jax, "config", config)
    monkeypatch.setattr(compiling, "COMPILE_CACHE", str(tmp_path / "home-cache" / "jax"))
    compiling.use_compile_cache(None)
    expected = folder or compiling.COMPILE_CACHE
    assert config.updates == {"jax_compilation_cache_dir": expected, "jax_persistent_cache_min_compile_time_secs": 0}
    assert os.stat(expected).st_mode & 0o777 == 0o700  # JAX runs what it finds there


def test_no_compile_cache_turns_it_off_and_so_does_an_unusable_default(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")  # no folder can be made in it
    monkeypatch.setattr(compiling, "COMPILE_CACHE", str(tmp_path / "a-file" / "jax"))
    for flag, configured in [(False, str(tmp_path / "jax-variable")),  # --no-compile-cache
                             (None, str(tmp_path / "a-file" / "jax-variable")),  # JAX's variable unusable
                             (None, None)]:  # the user's cache folder unusable
        config = RecordedConfig(configured)
        monkeypatch.setattr(compiling.jax, "config", config)
        compiling.use_compile_cache(flag)
        assert config.updates == {"jax_enable_compilation_cache": False}, configured
