"""A run of several processes (--coordinator, --num-processes, --process-id), on one machine or
several, joined through JAX's distributed runtime.

Before JAX's runtime starts, the processes meet through a plain socket on the coordinator's port
(rendezvous): JAX's runtime, left to find a missing process itself, or two processes of one number,
ends every process with a fatal error and a stack trace; this makes it a sentence instead. The port
accepts any connection, as JAX's own coordinator does: run it inside a trusted network."""

import json
import socket
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from machinery.errors import UsageError
from machinery.flags import RUN_FLAGS, coordinator_address, flag_of

# The flags every process of a run must be given alike: each process takes its own steps, and with
# another learning rate, say, they would part silently; with another batch size or number of
# epochs, each would wait for collectives the others never start.
SHARED_FLAGS = RUN_FLAGS + ("devices", "eval_only")
# Flags every process must be given or not given alike, whatever path each names on its machine: a
# process without --load would start from other parameters, one without --resume from epoch 0.
SHARED_PATH_FLAGS = ("load", "resume")


def join_processes(args):
    """Starts JAX's distributed runtime for a run of several processes (before JAX does anything
    else), once every process is known to be there (rendezvous), refusing in one line what cannot
    work."""
    rendezvous(args)
    # On CPUs the processes exchange gradients through Gloo; on GPUs JAX uses NCCL whatever this says.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                               initialization_timeout=args.join_timeout)


def stop_together(asked_here):
    """stop() for training (model.train): with several processes, True in all of them once one has
    been asked. A Ctrl-C reaches one process of several; all must stop after the same epoch, or the
    others would wait forever, in the next epoch's all-reduce, for the one that stopped."""
    if jax.process_count() == 1:
        return asked_here
    return lambda: bool(multihost_utils.process_allgather(np.array(asked_here())).any())


def rendezvous(args):
    """Waits, with plain sockets on the coordinator's port, until all args.num_processes processes
    have arrived; raises UsageError (one line) if they have not within args.join_timeout seconds, or
    if they cannot train together (joining_refusal), in every process."""
    host, port = coordinator_address(args.coordinator)
    flags = {name: getattr(args, name, None) for name in SHARED_FLAGS}
    flags.update({name: bool(getattr(args, name, None)) for name in SHARED_PATH_FLAGS})
    deadline = time.monotonic() + args.join_timeout
    if args.process_id == 0:
        refusal = gather_processes(args, port, flags, deadline)
        if refusal is not None:
            raise UsageError(refusal)
    else:
        reach_process_zero(args, host, port, flags, deadline)


def gather_processes(args, port, flags, deadline):
    """Process 0's side of the rendezvous: listens until every other process has connected and said
    in one JSON line its number, --num-processes and flags; answers each "go", or the sentence
    refusing them, which it returns too (None for go). The others close first, so that the port is
    free at once for the runtime's coordinator."""
    try:
        server = socket.create_server(("", port))
    except OSError as error:
        raise UsageError(f"--coordinator {args.coordinator}: process 0 cannot listen on port {port} "
                         f"({error.strerror}); choose a free port, or if a process 0 is running there "
                         "already, give this process another --process-id") from None
    arrived = []
    with server:
        while len(arrived) < args.num_processes - 1:
            server.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                connection, _ = server.accept()
                connection.settimeout(max(0.01, deadline - time.monotonic()))
                said = json.loads(receive_line(connection))
                arrived.append((int(said["process"]), int(said["processes"]), dict(said["flags"]), connection))
            except (OSError, ValueError, KeyError, TypeError):  # a timeout, or a stranger's connection: ignored
                if time.monotonic() >= deadline:
                    joined = sorted([0] + [number for number, *_ in arrived])
                    raise UsageError(f"--coordinator {args.coordinator}: only processes {joined} of "
                                     f"{args.num_processes} arrived within --join-timeout {args.join_timeout} s; "
                                     "start the others with the same --coordinator and --num-processes") from None
        refusal = joining_refusal(args.num_processes, flags, [said for *said, _ in arrived])
        for *_, connection in arrived:
            connection.sendall(b"go" if refusal is None else refusal.encode())
        for *_, connection in arrived:
            connection.recv(1)  # returns once the other side has closed
            connection.close()
    return refusal


def reach_process_zero(args, host, port, flags, deadline):
    """Every other process's side of the rendezvous: connects to process 0 (again and again until
    the deadline), says who it is, and waits for the answer; raises UsageError unless it is "go"."""
    waiting = f"within --join-timeout {args.join_timeout} s"
    while True:
        unknown_host = False
        try:
            with socket.create_connection((host, port), timeout=max(0.01, deadline - time.monotonic())) as link:
                link.sendall(json.dumps({"process": args.process_id, "processes": args.num_processes,
                                         "flags": flags}).encode() + b"\n")
                answer = link.recv(4096)
        except OSError as error:  # nobody listening yet, or the name not (yet) known: tried again
            answer, unknown_host = b"", isinstance(error, socket.gaierror)
        if answer == b"go":
            return
        if answer:
            raise UsageError(answer.decode())
        if time.monotonic() >= deadline:
            if unknown_host:
                raise UsageError(f"--coordinator {args.coordinator}: no machine called {host} could be found "
                                 f"{waiting}; give process 0's machine by a name or address this one knows")
            raise UsageError(f"--coordinator {args.coordinator}: process {args.process_id} found no process 0 "
                             f"there, or not every process arrived, {waiting}; start process 0 on that "
                             "machine with the same --coordinator and --num-processes")
        time.sleep(0.2)


def receive_line(connection, limit=65536):
    """The bytes a peer sends up to and including its first newline (or until it closes, or limit)."""
    received = b""
    while not received.endswith(b"\n") and len(received) < limit:
        chunk = connection.recv(limit)
        if not chunk:
            break
        received += chunk
    return received


def joining_refusal(num_processes, flags, arrived):
    """Why the processes that reached process 0 cannot train together, one line, or None if they can.
    flags: process 0's SHARED_FLAGS, and whether it was given each of SHARED_PATH_FLAGS. arrived:
    [(the --process-id, the --num-processes, those flags) each other process was started with]."""
    for number, processes, _ in arrived:
        if processes != num_processes:
            return (f"--num-processes: process {number} was started with {processes}, process 0 with "
                    f"{num_processes}; start every process with the same --num-processes")
    numbers = [number for number, _, _ in arrived]
    for number in sorted(set(numbers)):
        if numbers.count(number) > 1:
            return (f"--process-id {number}: {numbers.count(number)} processes were started with it; give each "
                    f"process its own number, 0 to {num_processes - 1}")
    for number, _, their_flags in sorted(arrived, key=lambda said: said[0]):
        for name in flags:
            if their_flags.get(name) != flags[name]:
                return (f"{flag_of(name)}: process {number} was started {as_given(name, their_flags.get(name))}, "
                        f"process 0 {as_given(name, flags[name])}; start every process with the same flags but "
                        "--process-id")
    return None


def as_given(name, value):
    """How a process was started with a flag, in joining_refusal's words: a path flag given or not,
    any other with its value."""
    if name in SHARED_PATH_FLAGS:
        return "with it" if value else "without it"
    return f"with {value}"
