"""Stopping a run cleanly: Ctrl-C, SIGTERM and SIGHUP stop training after the epoch running, and so
does a closed standard output; a second signal aborts at once. Standard library only: model.py
installs stop_at_once before it imports JAX, which takes a second or more."""

import errno
import os
import signal
import sys

# The line a run stopped at once ends with, naming what stopped it ("Ctrl-C", "SIGTERM").
STOPPED_BY = "model.py: stopped by {}; every file written so far is complete"
# The signals that stop training after its epoch (StopOnInterrupt), as the user knows them. Windows
# has no SIGHUP (HANGUP is None there), nor SIGPIPE.
HANGUP = getattr(signal, "SIGHUP", None)
STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
if HANGUP is not None:
    STOP_SIGNALS[HANGUP] = "SIGHUP"


def stop_at_once(signum, frame):
    """Ctrl-C (SIGINT) while model.py runs as a program, except while training and writing
    (StopOnInterrupt): nothing is being written then, so the process ends at once, in one line, with
    status 130. Python's own KeyboardInterrupt could land inside JAX's import or one of its callbacks,
    which prints a traceback or swallows the interrupt and carries on."""
    print(STOPPED_BY.format("Ctrl-C"), file=sys.stderr, flush=True)
    os._exit(130)


class StopOnInterrupt:
    """While active, the first Ctrl-C (SIGINT), SIGTERM (what `kill`, `timeout`, `docker stop` and
    job schedulers send) or SIGHUP (the terminal closed, an SSH connection dropped) only asks
    training to stop once the epoch running has finished (calling the object says whether it has
    been asked; .signal is the one that asked); a second Ctrl-C or SIGTERM aborts at once with
    KeyboardInterrupt(its number). Every file is written atomically, so an abort leaves none
    half-written. A SIGHUP the run was started ignoring stays ignored: `nohup` ignores it so that
    the run goes on when its terminal closes. (Not so SIGINT, which a shell ignores in the jobs a
    script starts in the background: a `kill -INT` meant for such a run still stops it as Ctrl-C
    would, as it stops the tests' runs however the tests were started.)"""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self.previous = {number: signal.signal(number, self._interrupt) for number in STOP_SIGNALS
                         if not (number == HANGUP and signal.getsignal(number) is signal.SIG_IGN)}
        return self

    def request(self, signum):
        """Asks training to stop as the signal signum would, unless it has been asked already."""
        if self.signal is None:
            self.signal = signum

    def _interrupt(self, signum, frame):
        if self() and signum != HANGUP:  # a hangup comes twice, from the shell and from the terminal
            raise KeyboardInterrupt(signum)
        self.request(signum)

    def __call__(self):
        return self.signal is not None

    def exit_status(self, otherwise=0):
        """128 + the signal's number once asked to stop (as a shell reports a process a signal ended),
        else `otherwise`."""
        return 128 + self.signal if self() else otherwise

    def __exit__(self, *exception):
        for number, handler in self.previous.items():
            signal.signal(number, handler)


# What a training run does once its stdout has been closed, as print_line's line on stderr says it.
TRAINING_STOPS = "training stops after the epoch running and writes what it trained"


def print_line(line, interrupted, then=TRAINING_STOPS):
    """Prints line to stdout, flushed (even into a pipe). Once stdout's reader has gone (a closed
    pipe, EPIPE: `| head`, or `| tee` ended by the same Ctrl-C; a terminal hung up, EIO), the lines
    can only be dropped, not the run: stdout is pointed at /dev/null, stderr says so once, adding
    `then`, what the run does now, and training is asked to stop after its epoch (interrupted, a
    StopOnInterrupt), as a Ctrl-C would, so that what it trained is written. The exit status is then
    128 + SIGPIPE, or + SIGHUP."""
    try:
        print(line, flush=True)
    except OSError as error:
        if error.errno not in (errno.EPIPE, errno.EIO):
            raise
        nowhere = os.open(os.devnull, os.O_WRONLY)
        os.dup2(nowhere, sys.stdout.fileno())
        try:
            print(f"model.py: standard output was closed (whatever read it has gone); {then}", file=sys.stderr,
                  flush=True)
        except OSError:  # stderr went the same way (2>&1, or the same terminal)
            os.dup2(nowhere, sys.stderr.fileno())
        os.close(nowhere)
        # As the signal would have stopped it; Windows has neither, and stops it as SIGTERM would.
        closed_by = getattr(signal, "SIGPIPE", None) if error.errno == errno.EPIPE else HANGUP
        interrupted.request(closed_by or signal.SIGTERM)


def stopped_line(interrupted, epochs_done, epochs_before, epochs_planned):
    """(the line that says where training stopped, whether anything was trained), for a run that
    stopped early (by a signal or a closed stdout here or, with several processes, in another).
    Ctrl-C is the usual way and needs no naming, nor a closed stdout, whose line goes nowhere."""
    named = interrupted.signal in STOP_SIGNALS and interrupted.signal != signal.SIGINT
    by = f" by {STOP_SIGNALS[interrupted.signal]}" if named else ""
    if epochs_done == epochs_before:
        # Stopped before this run's first epoch (while it compiled): writing would replace the
        # outputs and checkpoint of an earlier run in the same places with an untrained network's.
        return (f"interrupted{by}: training stopped before epoch {epochs_done + 1} of {epochs_planned}; "
                "nothing was trained, so nothing is written"), False
    return (f"interrupted{by}: training stopped after epoch {epochs_done} of {epochs_planned}; writing "
            "what it trained (Ctrl-C again aborts at once)"), True
