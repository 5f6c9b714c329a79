"""Any IDX image dataset through --data-dir: a tiny colour dataset written here trains end to end,
its checkpoint remembers what it was trained for, --predict prepares pictures for it, and every
dataset the networks cannot use is refused in one line (main() raises it here; the command line
prints such errors in one line, tests/test_cli.py and test_data.py check that)."""

import gzip
import json
import os
import warnings

import jax
import numpy as np
import pytest
from PIL import Image

import data
import model
from machinery import checkpoints, drawings, errors, pictures
from conftest import ROOT, RUN_OUTPUTS, idx_bytes
from data import DataError

MNIST_DIR = os.path.join(ROOT, "data")


def write_idx(path, array, magic):
    with gzip.open(path, "wb") as f:
        f.write(idx_bytes(array, magic))


def colour_images(labels, rng, size=12):
    """(N, size, size, 3) noise in which class k brightens one colour channel (k % 3) in one quadrant
    (k): learnable by a small network in a few epochs, not in one."""
    images = rng.integers(0, 120, (len(labels), size, size, 3))
    half = size // 2
    for index, label in enumerate(labels):
        row, column = divmod(int(label), 2)
        images[index, half * row + 1:half * row + half - 1, half * column + 1:half * column + half - 1, label % 3] += 60
    return images


def write_colour_dataset(folder, n_train=512, n_test=128, classes=4, seed=0):
    """Four IDX files: 12x12 images with 3 channels (magic 2052, channels last) in `classes` classes."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    arrays = {}
    for split, count in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, classes, count)
        arrays[split] = colour_images(labels, rng), labels
        write_idx(os.path.join(folder, f"{split}-images-idx4-ubyte.gz"), arrays[split][0], 2052)
        write_idx(os.path.join(folder, f"{split}-labels-idx1-ubyte.gz"), labels, 2049)
    return arrays


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    """A 4-epoch default-network run on the tiny colour dataset, saved: (folder, arrays, printed lines)."""
    folder = tmp_path_factory.mktemp("colour")
    arrays = write_colour_dataset(str(folder / "data"))
    lines = []
    status = model.main(["--data-dir", str(folder / "data"), "--out-dir", str(folder / "out"), "--epochs", "4",
                         "--batch-size", "32", "--lr", "0.02", "--save", str(folder / "net.npz")], log=lines.append)
    assert status == 0
    return folder, arrays, lines


def test_a_colour_dataset_trains_end_to_end_with_its_own_pictures(colour_run):
    folder, arrays, lines = colour_run
    assert "512 training images (12x12x3 images in 4 classes)" in lines[0], lines[0]
    with open(folder / "out" / "metrics.json") as f:
        metrics = json.load(f)
    losses = [epoch["train_loss"] for epoch in metrics["epochs"]]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses
    assert metrics["test_accuracy"] > 0.8, metrics["test_accuracy"]  # chance is about 0.3
    assert set(os.listdir(folder / "out")) == RUN_OUTPUTS
    # The pictures adapt: one row per input channel and a colour row for the filters, the
    # misclassified images in colour.
    from matplotlib.figure import Figure
    first_filters = np.random.default_rng(0).normal(size=(5, 3, 3, 3))
    figure = pictures.filters_figure(first_filters)
    assert isinstance(figure, Figure) and np.shape(figure.axes) == (4 * 5,)
    with Image.open(folder / "out" / "misclassified.png") as picture:
        pixels = np.asarray(picture.convert("RGB"), np.int64)
    assert (np.ptp(pixels, axis=-1) > 40).any(), "the misclassified colour images are drawn in grey"
    stored = np.load(folder / "net.npz")
    assert tuple(stored["input_shape"]) == (3, 12, 12) and int(stored["num_classes"]) == 4


def test_predict_prepares_pictures_for_a_colour_network(colour_run, tmp_path):
    folder, arrays, _ = colour_run
    test_images, test_labels = arrays["t10k"]
    paths = []
    for index in range(4):
        paths.append(str(tmp_path / f"test{index}.png"))
        Image.fromarray(test_images[index].astype(np.uint8), "RGB").save(paths[-1])
    # The same picture five times larger, with an (opaque) alpha channel: resampled down to 12x12.
    large = np.kron(test_images[0], np.ones((5, 5, 1))).astype(np.uint8)
    paths.append(str(tmp_path / "large.png"))
    Image.fromarray(np.concatenate([large, np.full(large.shape[:2] + (1,), 255, np.uint8)], -1), "RGBA").save(paths[-1])
    lines = []
    assert model.main(["--load", str(folder / "net.npz"), "--predict", *paths], log=lines.append) == 0
    answers = [int(line.split(": class ")[1].split(";")[0]) for line in lines if ": class " in line]
    network = model.build_network("modern", (3, 12, 12), 4)
    params = checkpoints.load_checkpoint(str(folder / "net.npz"), network)
    probabilities = jax.jit(network.probabilities)(params, data.to_input(test_images[:4].astype(np.uint8)))
    expected = np.asarray(probabilities).argmax(-1)
    assert answers == list(expected) + [expected[0]], lines
    # --predict's preparation of a colour picture: any size to 12x12x3, transparency onto white.
    prepared, warning = drawings.load_drawing(paths[-1], (3, 12, 12))
    assert warning is None and prepared.shape == (12, 12, 3) and prepared.dtype == np.uint8
    assert np.abs(prepared.astype(int) - test_images[0]).max() <= 60
    half_clear = np.concatenate([test_images[0].astype(np.uint8), np.full((12, 12, 1), 255, np.uint8)], -1)
    half_clear[:, :6, 3] = 0
    Image.fromarray(half_clear, "RGBA").save(tmp_path / "half_clear.png")
    prepared, _ = drawings.load_drawing(str(tmp_path / "half_clear.png"), (3, 12, 12))
    assert (prepared[:, :6] == 255).all() and np.array_equal(prepared[:, 6:], test_images[0][:, 6:])


def test_grey_drawings_are_prepared_for_the_network_size(tmp_path):
    ink = np.zeros((90, 60), np.uint8)
    ink[10:80, 25:35] = 255  # a "1", light on dark
    Image.fromarray(ink, "L").save(tmp_path / "one.png")
    prepared, warning = drawings.load_drawing(str(tmp_path / "one.png"), (1, 16, 20))
    assert warning is None and prepared.shape == (16, 20)
    rows = np.flatnonzero(prepared.max(axis=1) > 25)
    assert len(rows) == round(data.MNIST_INK_SPAN * 16)  # the longer side fills the box, as MNIST's 20 of 28
    # For a network trained on images whose drawings fill their frame (Fashion-MNIST's items), it
    # fills the frame.
    prepared, _ = drawings.load_drawing(str(tmp_path / "one.png"), (1, 16, 20), span=1.0)
    assert len(np.flatnonzero(prepared.max(axis=1) > 25)) == 16
    with pytest.raises(errors.UsageError, match="2-channel images"):
        drawings.load_drawing(str(tmp_path / "one.png"), (2, 16, 20))


def test_predict_scales_drawings_as_the_checkpoints_data_was(tmp_path, monkeypatch):
    """A checkpoint records how much of its frame a training image's drawing spans (data.ink_span):
    --load --predict scales a drawing to that (a grey network trained on Fashion-MNIST's frame-filling
    items, say), and to MNIST's 20 of 28 for MNIST's."""
    ink = np.zeros((90, 60), np.uint8)
    ink[10:80, 25:35] = 255
    Image.fromarray(ink, "L").save(tmp_path / "one.png")
    network = model.build_network("modern")
    params = network.init(jax.random.PRNGKey(0))
    prepared = []

    def classify_drawings(network, params, drawings, log):
        prepared.extend(image for _, image, _ in drawings)

    monkeypatch.setattr(model, "classify_drawings", classify_drawings)
    for span in (1.0, data.MNIST_INK_SPAN):
        checkpoints.save_checkpoint(str(tmp_path / "net.npz"), params, network, span=span)
        assert model.main(["--load", str(tmp_path / "net.npz"), "--predict", str(tmp_path / "one.png")]) == 0
    assert [len(np.flatnonzero(image.max(axis=1) > 25)) for image in prepared] == [28, 20]  # rows with ink


def test_large_drawings_are_read_without_pillows_warning_and_huge_ones_refused(tmp_path, monkeypatch):
    """Pillow warns from MAX_IMAGE_PIXELS pixels up and refuses from twice that; the limit is lowered
    here so that small pictures stand for big ones."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
    for side in (20, 30):  # 400 pixels: over the limit, under twice it; 900: over twice it
        Image.fromarray(np.full((side, side), 255, np.uint8)).save(tmp_path / f"{side}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert drawings.load_drawing(str(tmp_path / "20.png"))[0].shape == (28, 28)
    with pytest.raises(errors.UsageError, match="30.png: more than 600 pixels, too large an image for Pillow to "
                                               "read; scale it down"):
        drawings.load_drawing(str(tmp_path / "30.png"))


def test_a_checkpoint_refuses_other_data(colour_run):
    folder, _, _ = colour_run
    with pytest.raises(errors.UsageError) as raised:
        model.main(["--load", str(folder / "net.npz"), "--eval-only", "--data-dir", MNIST_DIR,
                    "--out-dir", str(folder / "other")])
    assert str(raised.value) == (f"--load {folder / 'net.npz'}: trained on 12x12x3 images in 4 classes, but this "
                                 "data has 28x28 images in 10 classes; pass --data-dir the dataset it was trained on")


def grey_dataset(folder, size=8, train_labels=(0, 1, 2, 1), test_labels=(2, 0), test_size=None):
    os.makedirs(folder, exist_ok=True)
    for split, labels, side in (("train", train_labels, size), ("t10k", test_labels, test_size or size)):
        write_idx(os.path.join(folder, f"{split}-images-idx3-ubyte.gz"), np.zeros((len(labels), side, side)), 2051)
        write_idx(os.path.join(folder, f"{split}-labels-idx1-ubyte.gz"), labels, 2049)
    return str(folder)


@pytest.mark.parametrize("preset, dataset, fragments", [
    ("lenet", dict(size=8), ["train-images-idx3-ubyte.gz: its 8x8 images are too small for the 'lenet' network",
                             "does not fit a 4x4 input", "use larger images"]),
    ("default", dict(size=2), ["its 2x2 images are too small for the 'modern' network"]),
    ("default", dict(train_labels=(3, 3, 3)), ["train-labels-idx1-ubyte.gz: every training label is 3, one class"]),
    ("default", dict(test_labels=(0, 5)), ["t10k-labels-idx1-ubyte.gz: label 5 at index 1 is outside",
                                           "range 0..2"]),
    ("default", dict(test_size=9), ["t10k-images-idx3-ubyte.gz: images are 9x9", "training images",
                                    "are 8x8"]),
])
def test_datasets_the_network_cannot_use_are_refused_in_one_line(tmp_path, preset, dataset, fragments):
    folder = grey_dataset(tmp_path / "data", **dataset)
    with pytest.raises((errors.UsageError, DataError)) as raised:
        model.main(["--preset", preset, "--data-dir", folder, "--out-dir", str(tmp_path / "out")])
    message = str(raised.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert not (tmp_path / "out").exists()
