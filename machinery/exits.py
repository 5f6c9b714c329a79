"""How the program ends: its exit status, or one line on stderr for every error a user can act on,
never a traceback."""

import os
import re
import signal
import sys

import jax

from data import DataError
from machinery.errors import UsageError
from machinery.stopping import STOP_SIGNALS, STOPPED_BY


def exit_now(status, leave_together=True):
    """Ends the process with status (an int, or a message for stderr and status 1) at once.

    By then every file is written and closed, and stdout and stderr are flushed here. Python's own
    shutdown would go on to tear down JAX's runtime object by object, a noticeable part of a short
    run's wall time (PERFORMANCE.md has the numbers). A process of a run of several first leaves
    JAX's distributed runtime, as Python's shutdown would have done (JAX registers that for exit):
    the processes wait there for each other, so that process 0, which hosts the runtime, ends last.
    Not so when this process gives up alone (leave_together=False): the others would be waited for
    in vain, until the runtime gave up on them and ended this process with a fatal error."""
    if isinstance(status, str):
        print(status, file=sys.stderr)
        status = 1
    if leave_together and jax.distributed.is_initialized():
        jax.distributed.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def out_of_memory(error):
    """The one line for an error that says memory ran out, or None for any other error: XLA's
    "Out of memory allocating N bytes" (CPU) or "RESOURCE_EXHAUSTED: Out of memory while trying to
    allocate N bytes" (GPU), from compiling or running, or numpy's MemoryError."""
    text = str(error)
    if not (isinstance(error, MemoryError) or "out of memory" in text.lower()):
        return None
    asked = re.search(r"allocat\w* (\d+) bytes", text)
    amount = f" (an allocation of {int(asked.group(1)) / 2 ** 30:.1f} GiB failed)" if asked else ""
    return (f"model.py: error: out of memory{amount}: the run needs more memory than this machine gives it; "
            "a smaller --batch-size needs less; every file written so far is complete")


def run_as_program(main, argv=None):
    """main(argv) as the command line runs it: its exit status, or one line on stderr for every error
    the user can act on, never a traceback; ends the process (exit_now)."""
    try:
        exit_now(main(argv))
    except (UsageError, DataError) as error:
        exit_now(f"model.py: error: {error}")
    except OSError as error:  # a file the checks before training could not foresee (a full disk, ...)
        # A failed rename names the temporary file first and the file meant (filename2) second.
        path = error.filename2 or error.filename
        exit_now(f"model.py: error: {path}: {error.strerror}" if path else f"model.py: error: {error}")
    except KeyboardInterrupt as stop:  # a second signal while training or writing (StopOnInterrupt)
        signum = stop.args[0] if stop.args else signal.SIGINT
        print(STOPPED_BY.format(STOP_SIGNALS[signum]), file=sys.stderr)
        exit_now(128 + signum, leave_together=False)
    except Exception as error:
        line = out_of_memory(error)
        if line:
            exit_now(line, leave_together=False)
        # On CPUs, a collective between processes that fails because another process of the run has
        # ended (a second Ctrl-C there, a crash, a lost machine) raises Gloo's error, from JAX's
        # runtime or from its dispatch, whichever was running.
        if not jax.distributed.is_initialized() or "Gloo" not in str(error):
            raise
        exit_now(f"model.py: error: process {jax.process_index()} lost the other processes of the run "
                 f"({str(error).splitlines()[0]}); every file written so far is complete", leave_together=False)
