"""IDX image datasets (MNIST and any other in its format), read with gzip, struct and numpy alone, and
their pixels scaled to the network's input (to_input).

An IDX file is a big-endian header followed by raw bytes:
    images: magic 2051 (0x00000803: unsigned bytes, 3 dimensions), count, rows, columns, then
            count * rows * columns pixels, row-major, 0 (background) .. 255 (ink); or, for images
            with several channels (colour), magic 2052 (0x00000804: 4 dimensions), count, rows,
            columns, channels, the channels last;
    labels: magic 2049 (0x00000801: unsigned bytes, 1 dimension), count, then count labels.
A dataset is four such files in one folder, under MNIST's names (FILES; an images file may say
idx4 for idx3, and any file may have a dot for the hyphen before "idx", train-images.idx3-ubyte, as
some copies of MNIST and Fashion-MNIST do). Each file may be gzip-compressed (NAME.gz) or raw
(NAME). The loader checks everything it can (header, exact size, matching counts, train and test
images of one shape, labels 0..K-1 with K >= 2 read from the training labels, and SHA-256 where the
folder has SHA256SUMS) and raises DataError with one line that names the file, what is wrong and
what to do.
"""

import gzip
import hashlib
import os
import struct
import zlib

import jax.numpy as jnp
import numpy as np

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# The MNIST the project ships, in data/ beside this file: found from any working directory.
SHIPPED_MNIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
# MNIST's: one grey channel of 28 x 28 pixels, ten digits, each drawn to fit 20 x 20 pixels of its
# field (ink_span): what a network is built for, and how --predict prepares a drawing, when nothing
# else says.
MNIST_INPUT_SHAPE, MNIST_CLASSES, MNIST_INK_SPAN = (1, 28, 28), 10, 20 / 28
# The header's magic number for each number of dimensions an images file may have, and the labels'.
IMAGE_MAGICS = {3: 2051, 4: 2052}
LABEL_MAGIC = 2049


class DataError(Exception):
    """A data file is missing or not what it should be; the message is one line for the user."""


def counted(count, word, plural=None):
    """count and the word for one thing, in the plural unless count is 1: "1 dimension", "3 dimensions"."""
    return f"{count} {word if count == 1 else plural or word + 's'}"


def _names(key):
    """The file names key may have: MNIST's; for images the same with idx4 for idx3; and each of
    those with a dot for the hyphen before "idx"."""
    name = FILES[key]
    names = (name, name.replace("idx3", "idx4")) if key.endswith("images") else (name,)
    return names + tuple(name.replace("-idx", ".idx") for name in names)


def dataset_file(data_dir, key):
    """The path of the file of key (FILES) in data_dir: the first of its names that exists, NAME.gz
    before raw NAME; None if there is none."""
    for name in _names(key):
        for path in (os.path.join(data_dir, name + ".gz"), os.path.join(data_dir, name)):
            if os.path.isfile(path):
                return path
    return None


def _read_bytes(data_dir, key):
    """The decompressed bytes of the file of key in data_dir (dataset_file), and its path."""
    path = dataset_file(data_dir, key)
    if path is None:
        for name in _names(key):
            if os.path.isdir(os.path.join(data_dir, name)):
                # Some archives unpack every file into a folder of its own name.
                raise DataError(f"{os.path.join(data_dir, name)} is a folder, not the IDX file; move the file "
                                f"it holds up into {data_dir!r}")
        raise DataError(f"{os.path.join(data_dir, FILES[key])}.gz (or uncompressed {FILES[key]}) not found in "
                        f"{data_dir!r}; point --data-dir at a folder holding the four IDX files "
                        f"({', '.join(FILES.values())})")
    with open(path, "rb") as f:
        raw = f.read()
    if not path.endswith(".gz"):
        return raw, path
    try:
        # In one piece: gzip.open reads chunk by chunk and joins the chunks, which is slower (PERFORMANCE.md).
        return gzip.decompress(raw), path
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: not a valid gzip file ({error}); replace it with an intact copy") from None


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


def _parse_idx(raw, path, magics):
    """Header check and parse: returns the uint8 array of shape (count, *sizes), for a header whose
    magic number is one of magics, {magic: number of dimensions}."""
    # A file whose first 4 bytes are there but wrong is mislabelled rather than truncated: say so first.
    found_magic = struct.unpack(">i", raw[:4])[0] if len(raw) >= 4 else next(iter(magics))
    if found_magic not in magics:
        # The magic number is 0, 0, a data-type code (0x08: unsigned byte), the number of dimensions.
        type_code, found_dims = raw[2], raw[3]
        allowed = " or ".join(f"{magic} ({counted(dims, 'dimension')})" for magic, dims in magics.items())
        raise DataError(f"{path}: magic number {found_magic} (type code 0x{type_code:02X}, "
                        f"{counted(found_dims, 'dimension')}), expected {allowed} of type 0x08, unsigned bytes, for "
                        f"{'labels' if LABEL_MAGIC in magics else 'images'}; "
                        "is this the right file under the right name?")
    dims = magics[found_magic]
    header_size = 4 + 4 * dims
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
    raw, path = _read_bytes(data_dir, key)
    name = os.path.basename(path).removesuffix(".gz")
    if name in checksums:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != checksums[name]:
            raise DataError(f"{path}: SHA-256 of its contents is {digest}, but SHA256SUMS says "
                            f"{checksums[name]}; the file is corrupt or a different file, replace it")
    magics = {magic: dims for dims, magic in IMAGE_MAGICS.items()} if key.endswith("images") else {LABEL_MAGIC: 1}
    return _parse_idx(raw, path, magics), path


def image_size(shape):
    """'28x28' for a grey image's shape (H, W), '32x32x3' for a colour one's (H, W, C)."""
    return "x".join(str(size) for size in shape)


def describe_data(input_shape, num_classes):
    """'28x28 images in 10 classes' for (1, 28, 28), '12x12x3 images in 4 classes' for (3, 12, 12)."""
    C, H, W = input_shape
    return f"{image_size((H, W) if C == 1 else (H, W, C))} images in {num_classes} classes"


def to_input(images_uint8):
    """(N, H, W) grey or (N, H, W, C) uint8 -> (C, H, W, N) float32 in [0, 1]: the channels first,
    the batch last, as the convolution reads them (Convolutional.py)."""
    if images_uint8.ndim == 3:
        x = jnp.moveaxis(images_uint8, 0, -1)[None]
    else:
        x = jnp.transpose(images_uint8, (3, 1, 2, 0))
    return x.astype(jnp.float32) / 255


def load_idx(data_dir=SHIPPED_MNIST):
    """Loads the four IDX files of a dataset from data_dir (MNIST's by default).

    Returns (train_images, train_labels, test_images, test_labels) as numpy arrays:
        images uint8 (N, H, W) grey or (N, H, W, C) with C channels, 0..255, the same shape for
            both splits (MNIST: (N, 28, 28); the model moves the batch last when it scales to [0, 1]);
        labels uint8 (N,), 0..K-1: K = number_of_classes(train_labels) classes, at least 2, and
            every test label one of the training labels' range (MNIST: 0..9).
    Raises DataError (one line: file, problem, remedy) on any missing, malformed or mismatched file.
    """
    if os.path.isfile(data_dir):
        raise DataError(f"data directory {data_dir!r} is a file, not a folder; "
                        "pass --data-dir the folder that holds the four IDX files")
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir!r} does not exist; "
                        "pass --data-dir with a folder holding the four IDX files")
    checksums = _read_checksums(data_dir)
    arrays, paths = [], {}
    for split in ("train", "test"):
        images, paths[split + "_images"] = _load_file(data_dir, split + "_images", checksums)
        labels, paths[split + "_labels"] = _load_file(data_dir, split + "_labels", checksums)
        if len(images) != len(labels):
            raise DataError(f"{paths[split + '_images']} holds {len(images)} images but {paths[split + '_labels']} "
                            f"holds {len(labels)} labels; the two files do not belong together")
        if not len(images):
            raise DataError(f"{paths[split + '_images']} holds no images; a dataset needs some in both splits")
        if min(images.shape[1:]) < 1:
            raise DataError(f"{paths[split + '_images']}: its images are {image_size(images.shape[1:])}, "
                            "with no pixels; replace it")
        arrays += [images, labels]
    train_images, train_labels, test_images, test_labels = arrays
    if test_images.shape[1:] != train_images.shape[1:]:
        raise DataError(f"{paths['test_images']}: images are {image_size(test_images.shape[1:])}, but the training "
                        f"images ({paths['train_images']}) are {image_size(train_images.shape[1:])}; both splits "
                        "need images of one size and number of channels")
    if np.all(train_labels == train_labels[0]):
        raise DataError(f"{paths['train_labels']}: every training label is {train_labels[0]}, one class only; "
                        "a classifier needs at least two classes, labelled 0..K-1")
    classes = number_of_classes(train_labels)
    if test_labels.max() >= classes:
        bad = int(np.argmax(test_labels >= classes))
        raise DataError(f"{paths['test_labels']}: label {test_labels[bad]} at index {bad} is outside the "
                        f"training labels' range 0..{classes - 1}; the test labels do not belong to this "
                        "training set")
    return tuple(arrays)


def fingerprint(*arrays):
    """SHA-256 (hex) of the arrays' shapes and values, in order: which data a run used, whatever
    folder it sits in now (a checkpoint records it for --resume)."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape};".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def ink_span(images, sample=1000):
    """How much of its frame the drawing in a typical image spans, as a fraction: over the first
    `sample` images with any non-zero pixel, the median of max(box height / H, box width / W), the
    box bounding those pixels. MNIST's digits were each scaled to fit a 20 x 20 box in 28 x 28:
    20/28 (all but 13 of its 60,000 training images). 1.0 for images whose longer side was made to
    fill the frame (Fashion-MNIST's, as its makers describe them), for images without a blank
    background (photographs), and where no image has a non-zero pixel.
    images: uint8 (N, H, W) or (N, H, W, C)."""
    N, H, W = images.shape[:3]
    ink = images[:sample].reshape(min(N, sample), H, W, -1).any(axis=3)
    drawn = ink.any(axis=(1, 2))
    if not drawn.any():
        return 1.0
    ink = ink[drawn]

    def extent(seen):  # (n, L): whether each row (or column) holds ink -> the span of those that do, / L
        length = seen.shape[1]
        return (length - seen.argmax(axis=1) - seen[:, ::-1].argmax(axis=1)) / length

    spans = np.sort(np.maximum(extent(ink.any(axis=2)), extent(ink.any(axis=1))))
    # The lower middle value for an even count; np.median would average the two, and its first call
    # takes 20 ms, as long as all of this.
    return float(spans[(len(spans) - 1) // 2])


def number_of_classes(train_labels):
    """K, for labels 0..K-1: one more than the largest training label."""
    return int(train_labels.max()) + 1
