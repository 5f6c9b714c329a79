"""MNIST in its original IDX format, read with gzip, struct and numpy alone.

An IDX file is a big-endian header followed by raw bytes:
    images: magic 2051 (0x00000803: unsigned bytes, 3 dimensions), count, rows, columns, then
            count * rows * columns pixels, row-major, 0 (background) .. 255 (ink);
    labels: magic 2049 (0x00000801: unsigned bytes, 1 dimension), count, then count labels.
The loader accepts each file gzip-compressed (NAME.gz) or raw (NAME), checks everything it can
(header, exact size, matching counts, label range, and SHA-256 where the directory has SHA256SUMS)
and raises DataError with one line that names the file, what is wrong and what to do.
"""

import gzip
import hashlib
import os
import struct
import zlib

import numpy as np

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
NUM_CLASSES = 10
IMAGE_SIZE = 28


class DataError(Exception):
    """A data file is missing or not what it should be; the message is one line for the user."""


def _read_bytes(data_dir, name):
    """The decompressed bytes of data_dir/name.gz, or of data_dir/name if there is no .gz, and the path read."""
    gz_path, raw_path = os.path.join(data_dir, name + ".gz"), os.path.join(data_dir, name)
    if os.path.isfile(gz_path):
        try:
            with gzip.open(gz_path, "rb") as f:
                return f.read(), gz_path
        except (OSError, EOFError, zlib.error) as error:
            raise DataError(f"{gz_path}: not a valid gzip file ({error}); "
                            "replace it with an intact copy") from None
    if os.path.isfile(raw_path):
        with open(raw_path, "rb") as f:
            return f.read(), raw_path
    raise DataError(f"{gz_path} (or uncompressed {name}) not found in {data_dir!r}; "
                    "point --data-dir at a folder holding the four MNIST IDX files")


def _read_checksums(data_dir):
    """{file name: hex SHA-256} from data_dir/SHA256SUMS, or {} where there is none."""
    path = os.path.join(data_dir, "SHA256SUMS")
    if not os.path.isfile(path):
        return {}
    sums = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or len(fields[0]) != 64:
                raise DataError(f"{path}: line {number} is not '<sha256 hex> <file name>'; "
                                "fix it, or delete SHA256SUMS to skip the checks")
            sums[fields[1].lstrip("*")] = fields[0].lower()
    return sums


def _parse_idx(raw, path, magic, dims):
    """Header check and parse: returns the uint8 array of shape (count, *sizes) for `dims` dimensions."""
    header_size = 4 + 4 * dims
    # A file whose first 4 bytes are there but wrong is mislabelled rather than truncated: say so first.
    found_magic = struct.unpack(">i", raw[:4])[0] if len(raw) >= 4 else magic
    if found_magic != magic:
        # The magic number is 0, 0, a data-type code (0x08: unsigned byte), the number of dimensions.
        type_code, found_dims = raw[2], raw[3]
        raise DataError(f"{path}: magic number {found_magic} (type code 0x{type_code:02X}, {found_dims} "
                        f"dimensions), expected {magic} (type 0x08 unsigned bytes, {dims} dimensions, "
                        f"{'images' if magic == IMAGE_MAGIC else 'labels'}); "
                        "is this the right file under the right name?")
    if len(raw) < header_size:
        raise DataError(f"{path}: only {len(raw)} bytes, too short for an IDX header; "
                        "the file is truncated, replace it")
    shape = struct.unpack(f">{dims}I", raw[4:header_size])
    expected = header_size + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(f"{path}: {len(raw)} bytes, but its header {shape} needs exactly {expected}; "
                        "the file is truncated or padded, replace it")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def _load_file(data_dir, key, checksums):
    name = FILES[key]
    raw, path = _read_bytes(data_dir, name)
    if name in checksums:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != checksums[name]:
            raise DataError(f"{path}: SHA-256 of its contents is {digest}, but SHA256SUMS says "
                            f"{checksums[name]}; the file is corrupt or a different file, replace it")
    is_images = key.endswith("images")
    return _parse_idx(raw, path, IMAGE_MAGIC if is_images else LABEL_MAGIC, 3 if is_images else 1), path


def load_mnist(data_dir="data"):
    """Loads the four MNIST IDX files from data_dir.

    Returns (train_images, train_labels, test_images, test_labels) as numpy arrays:
        images uint8 (N, 28, 28), 0..255, no channel axis (the model adds it when it scales to [0, 1]);
        labels uint8 (N,), 0..9.
    Raises DataError (one line: file, problem, remedy) on any missing or malformed file.
    """
    if os.path.isfile(data_dir):
        raise DataError(f"data directory {data_dir!r} is a file, not a folder; "
                        "pass --data-dir the folder that holds the four MNIST IDX files")
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir!r} does not exist; "
                        "pass --data-dir with a folder holding the four MNIST IDX files")
    checksums = _read_checksums(data_dir)
    arrays = []
    for split in ("train", "test"):
        images, images_path = _load_file(data_dir, split + "_images", checksums)
        labels, labels_path = _load_file(data_dir, split + "_labels", checksums)
        if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise DataError(f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, "
                            f"this network needs {IMAGE_SIZE}x{IMAGE_SIZE}")
        if len(images) != len(labels):
            raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds "
                            f"{len(labels)} labels; the two files do not belong together")
        if len(labels) and labels.max() >= NUM_CLASSES:
            bad = int(np.argmax(labels >= NUM_CLASSES))
            raise DataError(f"{labels_path}: label {labels[bad]} at index {bad} is outside "
                            f"0..{NUM_CLASSES - 1}; this network has {NUM_CLASSES} classes")
        arrays += [images, labels]
    return tuple(arrays)
