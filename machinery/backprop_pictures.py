"""The pictures of backpropagation at work, each computed by the network's own forward and backward
passes: how much gradient reached each layer's weights in every epoch (gradient_flow.png), what
every convolution, ReLU and pooling does to a digit (feature_maps.png), the gradient of the loss
with respect to the input pixels (input_gradients.png), and the fast gradient sign attack that
gradient makes possible (adversarial.png)."""

import jax
import numpy as np

from data import to_input
from machinery.compiling import ONCE_OPTIMISED
from machinery.pictures import label_plainly

# How many test images (the first of as many classes) feature_maps.png follows through the network.
FOLLOWED = 3


def first_of_each_class(test_labels, classes):
    """The index of the first test image of each class that has one, in class order (at most 10)."""
    return [int(np.argmax(test_labels == label)) for label in range(min(classes, 10)) if (test_labels == label).any()]


def look_inside(network, params, images, labels):
    """For images (M, H, W[, C]) uint8 and their labels: (the output of every layer whose output is
    still an image, as [(layer name, (C, H, W, M) array)], each image's own loss gradient with
    respect to its pixels (C, H, W, M), the predicted classes (M,)), in one compiled function."""
    def inside(params, images, labels):
        x = to_input(images)
        maps = [x]
        for layer, layer_params in zip(network.layers, params):
            maps.append(layer.forward(layer_params, maps[-1])[0])
        _, d_x, _ = network.loss_and_gradients(params, x, labels)
        # The loss is the mean over the M images: each image's own gradient is M times its share.
        images_only = [output for output in maps if output.ndim == 4]
        return images_only, d_x * images.shape[0], network.loss.probabilities(maps[-1])

    arrays, d_x, probabilities = jax.jit(inside, compiler_options=ONCE_OPTIMISED)(params, images,
                                                                                 labels.astype(np.int32))
    # The layers whose outputs are images come first, up to the first that flattens them.
    names = ["input"] + [type(layer).__name__.removeprefix("Fast") for layer in network.layers]
    maps = list(zip(names, (np.asarray(array) for array in arrays)))
    return maps, np.asarray(d_x), np.asarray(probabilities).argmax(-1)


def mosaic(tiles, columns, gap=2):
    """tiles (count, H, W) side by side, `columns` to a line, `gap` pixels apart; NaN between them."""
    count, H, W = tiles.shape
    lines = -(-count // columns)
    canvas = np.full((lines * (H + gap) - gap, columns * (W + gap) - gap), np.nan)
    for index, tile in enumerate(tiles):
        top, left = (index // columns) * (H + gap), (index % columns) * (W + gap)
        canvas[top:top + H, left:left + W] = tile
    return canvas


def feature_maps_figure(maps, labels, count=FOLLOWED, per_line=8):
    """A row per layer whose output is an image, the followed digits side by side: every channel of
    the output, per_line to a line, with the layer's name and shape above; convolutions' signed
    outputs red above 0 and blue below, the rest grey, dark high. One axes per row: far cheaper to
    draw than one per digit."""
    from matplotlib.figure import Figure

    count = min(count, maps[0][1].shape[3])
    lines = [-(-array.shape[0] // per_line) for _, array in maps]
    width = 3.9  # inches per digit: per_line tiles side by side
    heights = [0.3 + width / per_line * n for n in lines]
    figure = Figure(figsize=(width * count, sum(heights) + 0.6))
    axes = figure.subplots(len(maps), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.6 / (sum(heights) + 0.6), hspace=0.5)
    for axis, (name, array) in zip(axes, maps):
        C, H, W, _ = array.shape
        scale = per_line * (W + 2)  # pixels per digit, whatever the layer's size
        blocks = [mosaic(array[:, :, :, sample], min(C, per_line)) for sample in range(count)]
        row = np.full((max(block.shape[0] for block in blocks), count * scale), np.nan)
        for sample, block in enumerate(blocks):
            row[:block.shape[0], sample * scale:sample * scale + block.shape[1]] = block
            title = f"digit {labels[sample]}: {name}" if name == "input" else name
            axis.text(sample * scale, -1, f"{title}, {C}x{H}x{W}", fontsize=8, va="bottom")
        signed = name.startswith("Conv")
        limit = float(np.nanmax(np.abs(row))) or 1.0
        axis.imshow(np.ma.masked_invalid(row), cmap="RdBu_r" if signed else "gray_r", vmin=-limit if signed else 0,
                    vmax=limit, interpolation="nearest", aspect="auto")
        axis.axis("off")
    figure.suptitle("each layer's output, channel by channel (convolutions: red > 0 > blue)", fontsize=10)
    return figure


def input_gradients_figure(images, d_x, labels, predicted):
    """Each digit above its loss gradient with respect to the pixels (red: more ink raises the
    loss, blue: lowers it), on a scale symmetric about 0 per digit. Two axes, each one mosaic."""
    from matplotlib.figure import Figure

    count = len(labels)
    digits = images if images.ndim == 3 else images[..., 0]
    gradients = d_x.sum(axis=0).transpose(2, 0, 1)  # (count, H, W), summed over the input's channels
    gradients = gradients / np.maximum(np.abs(gradients).max(axis=(1, 2), keepdims=True), 1e-30)
    figure = Figure(figsize=(1.3 * count + 0.3, 3.3))
    top, bottom = figure.subplots(2, 1)
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.8, hspace=0.25)
    top.imshow(np.ma.masked_invalid(mosaic(digits.astype(float), count, gap=6)), cmap="gray_r", vmin=0, vmax=255,
               interpolation="nearest")
    bottom.imshow(np.ma.masked_invalid(mosaic(gradients, count, gap=6)), cmap="RdBu_r", vmin=-1, vmax=1,
                  interpolation="nearest")
    W = digits.shape[2]
    for index in range(count):
        top.text(index * (W + 6) + W / 2, -1, f"true {labels[index]}, said {predicted[index]}", fontsize=8,
                 ha="center", va="bottom")
    for axis in (top, bottom):
        axis.axis("off")
    figure.suptitle("the test digits and dL/dx, the gradient of each one's loss with respect to its pixels\n"
                    "(from the network's own backward pass; red: more ink there raises the loss, blue: lowers it)",
                    fontsize=10)
    return figure


def adversarial_figure(rows, examples):
    """The test accuracy against the attack's step eps, and digits beside their perturbed versions
    at the largest eps with both answers."""
    from matplotlib.figure import Figure

    originals, perturbed, before, after = examples
    count = len(originals)
    figure = Figure(figsize=(max(8.0, 1.2 * count), 6.2))
    grid = figure.add_gridspec(3, count, height_ratios=[2.2, 1, 1])
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.02, top=0.9, hspace=0.6, wspace=0.1)
    curve = figure.add_subplot(grid[0, :])
    curve.plot([row["epsilon"] for row in rows], [100 * row["test_accuracy"] for row in rows], "o-", color="C3")
    curve.set(xlabel="eps (each pixel moved by eps, in [0, 1])", ylabel="test accuracy (%)", ylim=(0, 100))
    curve.grid(alpha=0.3)
    for index in range(count):
        for row, (pictures, answers) in enumerate([(originals, before), (perturbed, after)], start=1):
            axis = figure.add_subplot(grid[row, index])
            axis.imshow(pictures[index], cmap=None if pictures.ndim == 4 else "gray_r", vmin=0, vmax=1)
            axis.set_title(f"said {answers[index]}", fontsize=8, color="C3" if row == 2 and
                           answers[index] != before[index] else "black")
            axis.axis("off")
    figure.suptitle(f"the fast gradient sign attack: x' = clip(x + eps sign(dL/dx), 0, 1); "
                    f"below, test digits and their x' at eps = {max(row['epsilon'] for row in rows)}", fontsize=10)
    return figure


def gradient_flow_figure(epochs):
    """Per epoch, for every layer with weights, the mean norm of its weight gradient and the mean
    size of its update relative to its weights, on log axes, from metrics.json's epochs."""
    from matplotlib.figure import Figure

    numbers = [epoch["epoch"] for epoch in epochs]
    figure = Figure(figsize=(10, 4.2))
    gradient_axis, update_axis = figure.subplots(1, 2)
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.84, wspace=0.25)
    for index, layer in enumerate(epochs[0]["gradient_flow"]):
        for axis, key in ((gradient_axis, "gradient_norm"), (update_axis, "relative_update")):
            axis.semilogy(numbers, [epoch["gradient_flow"][index][key] for epoch in epochs], "o-", label=layer["layer"])
    gradient_axis.set(xlabel="epoch", ylabel="|dW|, mean over the epoch's steps", title="weight gradient's norm")
    update_axis.set(xlabel="epoch", ylabel="|W' - W| / |W|, mean over the steps",
                    title="update relative to the weights")
    for axis in (gradient_axis, update_axis):
        label_plainly(axis)
        axis.grid(alpha=0.3)
        axis.set_xticks(numbers if len(numbers) <= 20 else numbers[::len(numbers) // 10])
    gradient_axis.legend(fontsize=8)
    figure.suptitle("the gradient flowing back into each layer with weights (its name and weights' shape)", fontsize=10)
    return figure


def figures(network, params, test_images, test_labels, epochs=(), attack=None):
    """{file name: figure} of this module's pictures; epochs: metrics.json's, for gradient_flow.png
    (none for a run that trained nothing); attack: fgsm's (rows, examples), or None."""
    chosen = first_of_each_class(test_labels, network.num_classes)
    maps, d_x, predicted = look_inside(network, params, test_images[chosen], test_labels[chosen])
    shown = {"feature_maps.png": feature_maps_figure(maps, test_labels[chosen]),
             "input_gradients.png": input_gradients_figure(test_images[chosen], d_x, test_labels[chosen], predicted)}
    if epochs:
        shown["gradient_flow.png"] = gradient_flow_figure(epochs)
    if attack is not None:
        shown["adversarial.png"] = adversarial_figure(*attack)
    return shown
