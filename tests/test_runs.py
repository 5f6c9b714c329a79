"""model.py as a user runs it: interrupting and resuming, file modes, --predict on drawings,
--val-size, and outputs that describe only the run that wrote them."""

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

import data
import model
from machinery import checkpoints, compiling, drawings, errors, files, stopping
from machinery.flags import parse_args
from conftest import CLI_ENVIRONMENT, COMPILATION_CACHE, ROOT, SMALL_CLI_RUN, run_cli, save_run, start_cli
from data import load_idx

SMALL_RUN = (*SMALL_CLI_RUN, "--epochs", "6")


@pytest.fixture(scope="module")
def mnist():
    return load_idx(os.path.join(ROOT, "data"))


def checkpoint_arrays(path):
    with np.load(path) as archive:
        return {name: archive[name] for name in archive.files}


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
    assert {path.name for path in (tmp_path / "stopped").iterdir()} == set(files.OUTPUT_FILES)
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


def test_ctrl_c_before_training_ends_the_run_at_once_in_one_line(tmp_path):
    """SIGINT half a second after starting, while JAX is still being imported: Python's own
    KeyboardInterrupt there printed a traceback, or was swallowed by one of JAX's callbacks and the
    run went on. Now: one line, status 130, nothing written."""
    process = start_cli("--out-dir", str(tmp_path / "out"), cwd=tmp_path)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    output, errors = process.communicate(timeout=60)
    assert process.returncode == 130 and output == "", output + errors
    assert errors == stopping.STOPPED_BY.format("Ctrl-C") + "\n"
    assert os.listdir(tmp_path) == []


def test_ctrl_c_while_the_epoch_compiles_writes_nothing(tmp_path, small_mnist, monkeypatch):
    """Ctrl-C once training has begun but before its first epoch has ended: nothing was trained. The
    run wrote the pictures and metrics of its untrained network over those of an earlier run in the
    same --out-dir, and its initial, random parameters over the --save checkpoint of that run. Now it
    says so in one line, writes nothing and exits with 130. (In this process, the signal sent while
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
        assert {path.name for path in (tmp_path / "out").iterdir()} == set(files.OUTPUT_FILES)
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
    gone, printing fails. That ended the run with "Broken pipe" and wrote nothing. Now the run says
    so on stderr, stops after the epoch running, writes its outputs, and exits with 141 (128 +
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
        assert {path.name for path in out.iterdir()} == set(files.OUTPUT_FILES)


def test_resume_refuses_a_flag_that_changes_the_run(tmp_path):
    network, params = save_run(tmp_path / "run.npz", (*SMALL_RUN, "--epochs", "2"))
    # In this process: how the command line prints a UsageError, in one line, is checked in test_model.py.
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


class RecordedConfig:
    """A stand-in for jax.config that records what use_compile_cache sets."""

    def __init__(self, folder):
        self.jax_compilation_cache_dir = folder
        self.updates = {}

    def update(self, name, value):
        self.updates[name] = value


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


def test_eval_only_removes_the_pictures_of_an_earlier_run(tmp_path):
    network = model.build_network("modern")
    checkpoints.save_checkpoint(str(tmp_path / "net.npz"), network.init(model.run_keys(0)[0]), network)
    out = tmp_path / "out"
    out.mkdir()
    (out / "loss_curve.png").write_bytes(b"an earlier run's curve")
    (out / "notes.txt").write_text("not ours: stays")
    assert model.main(["--load", str(tmp_path / "net.npz"), "--eval-only", "--out-dir", str(out),
                       "--data-dir", os.path.join(ROOT, "data")]) == 0
    assert sorted(os.listdir(out)) == sorted(set(files.OUTPUT_FILES) - {"loss_curve.png"} | {"notes.txt"})


def draw(path, ink, style):
    """Saves the 28x28 uint8 digit `ink` (light on dark, as MNIST) as a PNG drawn the way people draw."""
    ink = ink.astype(np.float32) / 255
    if style == "ink on transparent":  # a canvas: black strokes whose alpha is the ink
        big = np.kron(ink, np.ones((4, 4)))
        rgba = np.zeros(big.shape + (4,), np.uint8)
        rgba[..., 3] = np.round(255 * big)
        Image.fromarray(rgba, "RGBA").save(path)
    elif style == "ink on white":
        Image.fromarray(np.round(255 * (1 - np.kron(ink, np.ones((3, 3))))).astype(np.uint8), "L").save(path)
    elif style == "small, off-centre":  # the digit at its own size in a corner of a larger page
        page = np.ones((112, 112), np.float32)
        page[4:32, 78:106] = 1 - ink
        Image.fromarray(np.round(255 * page).astype(np.uint8), "L").save(path)
    elif style == "tiny":  # half MNIST's size, the digit about 10 pixels high, low on a dark page
        small = drawings.resampling(28, 14) @ ink @ drawings.resampling(28, 14).T
        page = np.zeros((40, 40), np.float32)
        page[20:34, 3:17] = small
        Image.fromarray(np.round(255 * page).astype(np.uint8), "L").save(path)


STYLES = ["ink on transparent", "ink on white", "small, off-centre", "tiny"]


def test_predict_classifies_drawings_without_reading_the_data(tmp_path, mnist):
    """A quickly trained checkpoint, and test digits it gets right with confidence, drawn four ways:
    each is classified as the digit it is. With --load, --predict reads no data and writes nothing."""
    train_images, train_labels, test_images, test_labels = mnist
    # run_short's size (test_model.py), whose epoch the session has compiled already.
    args = parse_args(["--train-size", "3000", "--epochs", "3", "--batch-size", "32"])
    network = model.build_network("modern")
    params, _, _, _, _ = model.train(network, network.init(model.run_keys(0)[0]), args, train_images, train_labels,
                                     test_images[:1000], test_labels[:1000], log=lambda line: None)
    checkpoints.save_checkpoint(str(tmp_path / "net.npz"), params, network)
    probabilities = np.asarray(jax.jit(network.probabilities)(params, data.to_input(test_images[:200])))
    confident = [index for index in range(200) if probabilities[index].max() > 0.99
                 and probabilities[index].argmax() == test_labels[index]]
    chosen = [next(index for index in confident if test_labels[index] == digit) for digit in (0, 2, 3, 4, 7, 9)]
    paths, expected = [], []
    for index in chosen:
        for number, style in enumerate(STYLES):
            paths.append(str(tmp_path / f"digit{index}_{number}.png"))
            expected.append(int(test_labels[index]))
            draw(paths[-1], test_images[index], style)
    Image.fromarray(np.full((30, 30), 255, np.uint8), "L").save(tmp_path / "blank.png")

    result = run_cli("--load", str(tmp_path / "net.npz"), "--predict", *paths, str(tmp_path / "blank.png"),
                     "--data-dir", str(tmp_path / "no data here"), "--out-dir", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    answers = {line.split(": class ")[0]: int(line.split(": class ")[1][0])
               for line in result.stdout.splitlines() if ": class " in line}
    wrong = [(os.path.basename(path), STYLES[number % 4], answers[path], want)
             for number, (path, want) in enumerate(zip(paths, expected)) if answers[path] != want]
    assert not wrong, wrong
    assert f"warning: {tmp_path / 'blank.png'} looks blank" in result.stdout
    assert not (tmp_path / "out").exists()


def test_drawing_is_normalised_like_mnist(tmp_path, mnist):
    """The digit fills a 20-pixel box and its centre of mass sits at the centre, whatever the page."""
    page = np.zeros((90, 60), np.uint8)
    page[50:78, 2:30] = mnist[2][0]  # a test digit in the bottom-left corner
    Image.fromarray(page, "L").save(tmp_path / "page.png")
    field, warning = drawings.load_drawing(str(tmp_path / "page.png"))
    assert warning is None and field.shape == (28, 28) and field.dtype == np.uint8
    rows, columns = np.flatnonzero(field.max(axis=1) > 25), np.flatnonzero(field.max(axis=0) > 25)
    assert max(rows[-1] - rows[0], columns[-1] - columns[0]) + 1 in (19, 20, 21)
    mass = field.astype(np.float64)
    centre = [(mass.sum(axis=1 - axis) * np.arange(28)).sum() / mass.sum() for axis in (0, 1)]
    assert np.allclose(centre, 13.5, atol=1.0), centre


def test_val_size_holds_the_last_images_out_of_training(monkeypatch, tmp_path, small_mnist):
    """--val-size N: training gets the first images of the training file, never its last N, each
    epoch reports validation accuracy, and the test set is evaluated once, at the end."""
    seen = {}
    real_train = model.train

    def spy(network, params, args, train_images, train_labels, eval_images, eval_labels, *rest, **options):
        seen.update(train=train_images[:args.train_size], eval=eval_images)
        return real_train(network, params, args, train_images, train_labels, eval_images, eval_labels, *rest,
                          **options)

    monkeypatch.setattr(model, "train", spy)
    lines = []
    status = model.main(["--val-size", "200", "--epochs", "1", "--batch-size", "100",
                         "--data-dir", small_mnist, "--out-dir", str(tmp_path / "out")], log=lines.append)
    assert status == 0
    train_images = load_idx(small_mnist)[0]  # 2,000 images
    assert len(seen["train"]) == 1800 and np.array_equal(seen["train"], train_images[:1800])
    assert np.array_equal(seen["eval"], train_images[1800:])
    assert "the last 200 held out for validation" in lines[0]
    assert [line for line in lines if line.startswith("epoch ")][0].count("val accuracy") == 1
    assert sum("test accuracy" in line for line in lines) == 1
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert "val_accuracy" in metrics["epochs"][0] and "test_accuracy" not in metrics["epochs"][0]
    assert jax.numpy.isfinite(metrics["test_accuracy"])
