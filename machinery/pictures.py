"""What a run leaves in --out-dir besides its checkpoint: metrics.json and four pictures, each
written atomically (files.write_atomically).

The figures are matplotlib Figure objects drawn straight to PNG, without pyplot's window machinery,
and laid out by hand: an automatic layout pass costs more than the drawing."""

import functools
import importlib
import json
import math
import os
import threading

import numpy as np

from data import counted
from machinery.files import OUTPUT_FILES, write_atomically


def filters_figure(kernels):
    """The first convolution's filters F (D, C, K, K) as a figure: one column per filter, one row
    per input channel, on one colour scale (red > 0 > blue), with each weight written in its cell
    for a grey first layer. For colour images (C = 3), a first row shows each filter as the colour
    patch it responds to most (its weights mapped from [-max, max] to [0, 1] in each channel)."""
    from matplotlib.figure import Figure

    D, C, K, _ = kernels.shape
    names = ["red", "green", "blue"] if C == 3 else [f"channel {c}" for c in range(C)]
    rows = C + (C == 3)
    figure = Figure(figsize=(max(2.2 * D, 5.5), 0.6 + 2.0 * rows))  # at least as wide as the title
    axes = figure.subplots(rows, D, squeeze=False)
    figure.subplots_adjust(left=0.06 if C > 1 else 0.02, right=0.98, bottom=0.03, top=1 - 0.6 / (0.6 + 2.0 * rows),
                           wspace=0.1, hspace=0.1)
    limit = np.abs(kernels).max()
    for index in range(D):
        if C == 3:
            axes[0, index].imshow((kernels[index].transpose(1, 2, 0) / limit + 1) / 2)
        for channel in range(C):
            axis = axes[rows - C + channel, index]
            axis.imshow(kernels[index, channel], cmap="RdBu_r", vmin=-limit, vmax=limit)
            if C == 1:
                for (row, column), value in np.ndenumerate(kernels[index, channel]):
                    axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8)
        axes[0, index].set_title(f"filter {index}")
    for row in range(rows):
        if C > 1:
            axes[row, 0].set_ylabel("as colour" if row < rows - C else names[row - (rows - C)])
        for axis in axes[row]:
            axis.set_xticks([])
            axis.set_yticks([])
    figure.suptitle(f"learned {K}x{K} kernels of the first convolution (red > 0 > blue)")
    return figure


def loss_figure(epochs):
    """The mean training loss (log scale) and the evaluation accuracy per epoch, side by side, from
    metrics.json's epochs (at least one)."""
    from matplotlib.figure import Figure

    numbers = [e["epoch"] for e in epochs]
    which = "val" if "val_accuracy" in epochs[0] else "test"
    figure = Figure(figsize=(10, 4))
    loss_axis, accuracy_axis = figure.subplots(1, 2)
    # Room on the left for tick labels as wide as 0.000125 (a loss within one decade gets such labels).
    figure.subplots_adjust(left=0.1, right=0.98, bottom=0.13, top=0.91, wspace=0.25)
    loss_axis.semilogy(numbers, [e["train_loss"] for e in epochs], "o-")
    label_plainly(loss_axis)
    loss_axis.set(xlabel="epoch", ylabel="mean training loss (log scale)", title="training loss")
    accuracy_axis.plot(numbers, [100 * e[f"{which}_accuracy"] for e in epochs], "o-", color="C1")
    accuracy_axis.set(xlabel="epoch", ylabel=f"{which} accuracy (%)", title=f"{which} accuracy")
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.set_xticks(numbers if len(numbers) <= 20 else numbers[::len(numbers) // 10])
    return figure


def label_plainly(axis):
    """Labels a log-scaled y axis where matplotlib would choose to (the minor ticks, 0.2, 0.3 ...,
    too where the axis spans less than a decade), each written as 0.3, not as 3 x 10^-1, which would
    build matplotlib's TeX-like parser (PERFORMANCE.md)."""
    from matplotlib.ticker import LogFormatter

    class PlainLogFormatter(LogFormatter):
        def _num_to_string(self, value, vmin, vmax):
            return f"{value:g}"

    axis.yaxis.set_major_formatter(PlainLogFormatter(labelOnlyBase=False))
    axis.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))


def confusion_figure(test_labels, predictions, classes):
    """The classes x classes confusion matrix of the test images, each cell's count written in it
    (up to 20 classes), shaded by its logarithm."""
    from matplotlib.figure import Figure

    confusion = np.zeros((classes, classes), np.int64)
    np.add.at(confusion, (np.asarray(test_labels, np.int64), predictions), 1)
    figure = Figure(figsize=(6.5, 5.5))
    axis = figure.subplots()
    figure.subplots_adjust(left=0.1, right=0.97, bottom=0.1, top=0.93)
    image = axis.imshow(np.log1p(confusion), cmap="Blues")
    if classes <= 20:  # beyond that, the counts would not fit their cells; the colours still show them
        for (row, column), count in np.ndenumerate(confusion):
            axis.text(column, row, str(count), ha="center", va="center", fontsize=7,
                      color="white" if image.norm(np.log1p(count)) > 0.6 else "black")
        axis.set(xticks=range(classes), yticks=range(classes))
    axis.set(xlabel="predicted class", ylabel="true class", title=f"confusion matrix, {len(test_labels)} test images")
    return figure


def misclassified_figure(test_images, test_labels, predictions):
    """The first 48 misclassified test images, each labelled with its true and predicted class.

    One mosaic in one axes, each tile labelled: far cheaper to draw than an axes per image. Colour
    images are shown in colour, on white; grey ones as MNIST's digits are usually shown, dark ink on
    white."""
    from matplotlib.figure import Figure

    wrong = np.flatnonzero(predictions != test_labels)[:48]
    colour = test_images.ndim == 4 and test_images.shape[3] == 3
    tiles = test_images if colour or test_images.ndim == 3 else test_images[..., 0]  # other channel counts: the first
    columns = 8
    rows = max(1, math.ceil(len(wrong) / columns))
    (height, width), gap, label = tiles.shape[1:3], 2, 9  # pixels: an image, between images, above each for its label
    mosaic = np.full((rows * (height + gap + label), columns * (width + gap)) + tiles.shape[3:], np.nan)
    figure = Figure(figsize=(1.4 * columns, 1.6 * rows + 0.4))
    axis = figure.subplots()
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.4 / (1.6 * rows + 0.4))
    for tile, index in enumerate(wrong):
        top, left = (tile // columns) * (height + gap + label) + label, (tile % columns) * (width + gap)
        mosaic[top:top + height, left:left + width] = tiles[index]
        axis.text(left + width / 2, top - 1.5, f"true {test_labels[index]}, said {predictions[index]}",
                  ha="center", va="bottom", fontsize=8)
    if colour:
        axis.imshow(np.nan_to_num(mosaic, nan=255) / 255, interpolation="nearest")
    else:
        axis.imshow(np.ma.masked_invalid(mosaic), cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
    axis.axis("off")
    count = int((predictions != test_labels).sum())
    figure.suptitle("no test image misclassified" if not count else
                    f"the {counted(count, 'misclassified test image')}" if count == len(wrong) else
                    f"the first {len(wrong)} of {count} misclassified test images")
    return figure


def write_outputs(out_dir, metrics, kernels, test_images, test_labels, predictions, classes, more_figures=()):
    """metrics.json, loss_curve.png (if anything was trained), learned_filters.png, the classes x classes
    confusion_matrix.png, misclassified.png and more_figures ({file name: figure}) in out_dir;
    removes any other of OUTPUT_FILES left there by an earlier run, since it would describe another
    run."""
    os.makedirs(out_dir, exist_ok=True)

    def write_json(tmp):
        with open(tmp, "w") as f:
            json.dump(metrics, f, indent=2)

    write_atomically(os.path.join(out_dir, "metrics.json"), write_json)
    figures = {"loss_curve.png": loss_figure(metrics["epochs"])} if metrics["epochs"] else {}
    figures["learned_filters.png"] = filters_figure(np.asarray(kernels))
    figures["confusion_matrix.png"] = confusion_figure(test_labels, predictions, classes)
    figures["misclassified.png"] = misclassified_figure(test_images, test_labels, predictions)
    figures.update(more_figures)
    for name, figure in figures.items():
        write_atomically(os.path.join(out_dir, name), functools.partial(figure.savefig, format="png", dpi=110))
    for name in OUTPUT_FILES:
        if name != "metrics.json" and name not in figures and os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def import_in_background(*modules):
    """Starts importing modules in a background thread and returns at once; a later import of one
    of them waits until it is complete (Python's import lock)."""
    threading.Thread(target=lambda: [importlib.import_module(module) for module in modules], daemon=True).start()
