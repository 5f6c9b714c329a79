"""Guards what a run shows: metrics.json, the pictures, and --predict's preparation and answers."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

import data
import model
from machinery import checkpoints, drawings, errors, pictures
from machinery.flags import parse_args
from conftest import ROOT, RUN_OUTPUTS, run_cli


def drawn_beyond_the_canvas(figure):
    """How far (inches) anything drawn in figure reaches past its edges; 0 when it all fits."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    drawn = figure.get_tightbbox(FigureCanvasAgg(figure).get_renderer())
    width, height = figure.get_size_inches()
    return max(0.0, -drawn.x0, -drawn.y0, drawn.x1 - width, drawn.y1 - height)


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


def test_cli_run_writes_metrics_pictures_checkpoint_and_predicts(tmp_path, small_run, small_mnist):
    """A tiny end-to-end run (conftest's small_run), then --load --eval-only; --predict on a PNG made
    from a test digit."""
    result, folder = small_run
    out = folder / "out"
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("JAX ") and "preset 'default'" in result.stdout
    assert "epoch   2/2" in result.stdout and "class 7;" in result.stdout
    # The checkpoint records, beside the run's flags, the devices it trained on (see --resume).
    with np.load(folder / "net.npz") as archive:
        assert json.loads(str(archive["run/config"]))["devices"] == 1
        assert float(archive["ink_span"]) == data.MNIST_INK_SPAN  # for a later --predict (data.ink_span)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"config", "epochs", "test_accuracy", "train_seconds", "compile_seconds", "jax_version",
            "device"} <= set(metrics)
    assert metrics["config"]["train_size"] == 1600 and metrics["config"]["batch_size"] == 64
    assert [sorted(e) for e in metrics["epochs"]] == [["epoch", "gradient_flow", "seconds", "test_accuracy",
                                                        "train_loss"]] * 2
    assert [layer["layer"] for layer in metrics["epochs"][0]["gradient_flow"]] == [
        "0: Convolutional 5x1x3x3", "4: Dense 845x64", "6: Dense 64x10"]
    assert all(layer["gradient_norm"] > 0 and 0 < layer["relative_update"] < 1
               for epoch in metrics["epochs"] for layer in epoch["gradient_flow"])
    assert 0.5 < metrics["test_accuracy"] <= 1
    for picture in ["loss_curve.png", "learned_filters.png", "confusion_matrix.png", "misclassified.png"]:
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", picture
    # At 110 dots per inch: three digits 3.9 inches wide each, four rows (input, convolution, ReLU,
    # pooling) of one line of channels, 0.3 + 3.9/8 inches each, under a 0.6-inch title; one digit
    # per class, 1.3 inches each, and 0.3 inches of margin, by 3.3 inches.
    assert abs(Image.open(out / "feature_maps.png").size[0] - 3 * 3.9 * 110) <= 1
    assert abs(Image.open(out / "feature_maps.png").size[1] - (4 * (0.3 + 3.9 / 8) + 0.6) * 110) <= 1
    assert Image.open(out / "input_gradients.png").size == (round((10 * 1.3 + 0.3) * 110), round(3.3 * 110))
    assert not (out / "adversarial.png").exists()  # no --fgsm
    assert Image.open(out / "gradient_flow.png").size == (round(10 * 110), round(4.2 * 110))

    # The checkpoint evaluates to the same accuracy (here in this process: float32 all the same).
    lines = []
    assert model.main(["--load", str(folder / "net.npz"), "--eval-only", "--out-dir", str(tmp_path / "eval"),
                       "--data-dir", small_mnist], log=lines.append) == 0
    reloaded = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert reloaded["test_accuracy"] == metrics["test_accuracy"] and reloaded["epochs"] == []
    # It says what it does: no training flags, no training time.
    assert f"evaluating {folder / 'net.npz'} (modern network) on 500 test images" in lines[0], lines
    assert lines[1] == f"test accuracy {100 * metrics['test_accuracy']:.2f}% on 500 images", lines
    # --fgsm on the saved network: no step leaves the accuracy as it was; its picture, 8 digits.
    lines = []
    assert model.main(["--load", str(folder / "net.npz"), "--eval-only", "--fgsm", "0,0.2", "--out-dir",
                       str(tmp_path / "attack"), "--data-dir", small_mnist], log=lines.append) == 0
    attacked = json.loads((tmp_path / "attack" / "metrics.json").read_text())["fgsm"]
    assert [row["epsilon"] for row in attacked] == [0.0, 0.2]
    assert attacked[0]["test_accuracy"] == metrics["test_accuracy"] > attacked[1]["test_accuracy"]
    assert lines[2] == f"fgsm eps 0.0: test accuracy {100 * metrics['test_accuracy']:.2f}%", lines
    assert Image.open(tmp_path / "attack" / "adversarial.png").size == (round(9.6 * 110), round(6.2 * 110))

    with pytest.raises(errors.UsageError, match="saved from the 'modern' network"):
        model.main(["--preset", "seed", "--load", str(folder / "net.npz"), "--eval-only",
                    "--data-dir", os.path.join(ROOT, "data"), "--out-dir", str(tmp_path / "seed")])


# A run's losses: over a decade (the default run's 15 epochs); within one (a short run), where
# matplotlib labels the minor ticks too; flat near chance; far below 0.01 (fine-tuning, say).
@pytest.mark.parametrize("losses", [[0.2030, 0.0728, 0.0093], [1.0566, 0.3602, 0.2610], [2.3026, 2.2990],
                                    [0.00017, 0.00013]])
def test_the_loss_curve_keeps_its_labels_on_the_picture(losses):
    """Manual margins (no layout pass) must leave room for the tick labels: written as matplotlib
    writes them by default (3 x 10^-1), the minor ones of a loss within one decade pushed the
    y-axis label off the picture's left edge. And none is typeset by matplotlib's TeX-like parser,
    which takes a quarter of a second to build (PERFORMANCE.md)."""
    figure = pictures.loss_figure([{"epoch": epoch + 1, "train_loss": loss, "test_accuracy": 0.9}
                                for epoch, loss in enumerate(losses)])
    assert drawn_beyond_the_canvas(figure) == 0
    labels = [label.get_text() for label in figure.axes[0].yaxis.get_ticklabels(which="both")]
    assert any(labels) and not any("$" in label for label in labels), labels


def test_the_other_pictures_keep_their_labels_on_them():
    """The other three pictures at their most crowded: the filters of a colour first layer of one
    and of two filters (each filter's column is narrower than the title, which overhung the picture),
    20 classes (the most whose counts are written in the cells), small colour images among the
    misclassified."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 20, 1000)
    predictions = np.where(rng.random(1000) < 0.5, labels, (labels + 1) % 20)
    images = rng.integers(0, 256, (1000, 12, 12, 3)).astype(np.uint8)
    figures = {"one colour filter": pictures.filters_figure(rng.normal(size=(1, 3, 5, 5))),
               "two grey filters": pictures.filters_figure(rng.normal(size=(2, 1, 3, 3))),
               "20 classes": pictures.confusion_figure(labels, predictions, 20),
               "small colour images": pictures.misclassified_figure(images, labels, predictions)}
    for name, figure in figures.items():
        assert drawn_beyond_the_canvas(figure) == 0, name


def test_the_misclassified_picture_says_how_many_it_shows():
    labels = np.arange(100) % 10
    for wrong, title in [(0, "no test image misclassified"), (1, "the 1 misclassified test image"),
                         (60, "the first 48 of 60 misclassified test images")]:
        predictions = np.where(np.arange(100) < wrong, (labels + 1) % 10, labels)
        figure = pictures.misclassified_figure(np.zeros((100, 28, 28), np.uint8), labels, predictions)
        assert figure.get_suptitle() == title


def test_eval_only_removes_the_pictures_of_an_earlier_run(tmp_path):
    network = model.build_network("modern")
    checkpoints.save_checkpoint(str(tmp_path / "net.npz"), network.init(model.run_keys(0)[0]), network)
    out = tmp_path / "out"
    out.mkdir()
    (out / "loss_curve.png").write_bytes(b"an earlier run's curve")
    (out / "gradient_flow.png").write_bytes(b"an earlier run's gradient flow")
    (out / "notes.txt").write_text("not ours: stays")
    assert model.main(["--load", str(tmp_path / "net.npz"), "--eval-only", "--out-dir", str(out),
                       "--data-dir", os.path.join(ROOT, "data")]) == 0
    assert sorted(os.listdir(out)) == sorted(RUN_OUTPUTS - {"loss_curve.png", "gradient_flow.png"} | {"notes.txt"})


def test_predict_classifies_drawings_without_reading_the_data(tmp_path, mnist):
    """A quickly trained checkpoint, and test digits it gets right with confidence, drawn four ways:
    each is classified as the digit it is. With --load, --predict reads no data and writes nothing."""
    train_images, train_labels, test_images, test_labels = mnist
    # run_short's size (test_training.py), whose epoch the session has compiled already.
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
