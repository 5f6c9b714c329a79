"""The files a run reads and writes: their checks before any training, and the atomic write that
every output goes through."""

import os
import stat
import tempfile

from machinery.errors import UsageError

# What a run writes in --out-dir (pictures.write_outputs).
OUTPUT_FILES = ("metrics.json", "loss_curve.png", "learned_filters.png", "confusion_matrix.png",
                "misclassified.png", "gradient_flow.png", "feature_maps.png", "input_gradients.png", "adversarial.png")


def write_atomically(path, write):
    """Calls write(temporary_path), then renames the result to path, so path is never half-written.

    A symbolic link at path is written through: the file it points to is replaced, the link stays.
    The file gets the permissions the user's umask gives a new file (0644 under the usual 022):
    mkstemp creates the temporary file private (0600), and a rename keeps a file's mode. An error
    while writing (a full disk) is raised naming path, not the temporary file the user never saw.
    """
    path = os.path.realpath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        try:
            write(tmp)
        except OSError as error:
            raise OSError(error.errno, error.strerror or str(error), path) from None
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def current_umask():
    """The process's umask; reading it means setting it, so it is set straight back."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def kind_of(path):
    """What an existing path is, in words: 'a file', 'a folder', 'a character device', ..."""
    mode = os.stat(path).st_mode
    kinds = [(stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def require_file(flag, path):
    """Refuses a path given to `flag` that is not an existing file (UsageError, one line)."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder; give the file in it")
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: no such file")


def check_output_paths(args):
    """Refuses, before any training, an --out-dir or checkpoint path the run could not write when
    it comes to it (UsageError, one line): a file where a folder must be, or the other way round, a
    folder where no file can be made, a device or a named pipe where the run writes a file (the
    rename would replace it with a regular file), or a checkpoint where the run writes one of its
    OUTPUT_FILES, which would overwrite it. Only process 0 writes; with --load and --predict, nothing."""
    if args.process_id != 0:
        return
    outputs = {}  # {real path: name} of the files the run writes in --out-dir
    if not (args.load and args.predict):
        if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
            raise UsageError(f"--out-dir {args.out_dir}: is {kind_of(args.out_dir)}; name a folder (it is made "
                             "if missing)")
        require_writable_folder("--out-dir", args.out_dir, args.out_dir)
        for name in OUTPUT_FILES:
            path = os.path.join(args.out_dir, name)
            if os.path.exists(path) and not os.path.isfile(path):
                raise UsageError(f"--out-dir {args.out_dir}: {path} is {kind_of(path)}, where the run writes its "
                                 f"{name}; remove it, or name another --out-dir")
        outputs = {os.path.realpath(os.path.join(args.out_dir, name)): name for name in OUTPUT_FILES}
    for flag, path in (("--save", args.save), ("--resume", args.resume)):
        if path:
            require_writable_file(flag, path, "run.npz")
            output = outputs.get(os.path.realpath(path))
            if output:
                raise UsageError(f"{flag} {path}: the run writes its {output} there, over the checkpoint; "
                                 "give the checkpoint another name")


def require_writable_file(flag, path, example_name):
    """Refuses `flag path` unless a regular file can be written at path: nothing there, or a regular
    file (through a symbolic link, the file it points to), in a folder that is writable or can be
    made (require_writable_folder). example_name: a file name to suggest."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder; give a file name, such as {os.path.join(path, example_name)}")
    if os.path.exists(path) and not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: is {kind_of(path)}, not a regular file; give the name of a file to write")
    require_writable_folder(flag, path, os.path.dirname(os.path.realpath(path)))


def require_writable_folder(flag, path, folder):
    """Refuses `flag path` unless folder exists and is writable, or can be made (its nearest existing
    ancestor is a writable folder).

    Writable means that a file could be made there, and made it is, then removed at once: the
    permission bits do not tell. Root passes every permission check, yet makes no file in /proc; a
    read-only mount or an access-control list may refuse anybody."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{flag} {path}: {existing} is a file, so no folder can be made there; choose another path")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UsageError(f"{flag} {path}: cannot write in {existing} ({error.strerror}); "
                         "choose another path") from None
