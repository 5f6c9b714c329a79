"""--predict: a picture file prepared the way the network's training images were made, and
classified with the probability of every class."""

import warnings

import jax
import numpy as np

from data import MNIST_INK_SPAN, MNIST_INPUT_SHAPE, to_input
from machinery.errors import UsageError

# Below this top probability, --predict says it is unsure.
UNSURE_BELOW = 0.5


def load_drawing(path, input_shape=MNIST_INPUT_SHAPE, span=MNIST_INK_SPAN):
    """An image file -> (the image prepared as the network's training images were, warning or None)
    for a network of input_shape (C, H, W) trained on images whose drawings span `span` of their
    frame (data.ink_span).

    Grey networks (C = 1): as NIST's digits were made into MNIST's (grey_digit). Returns (H, W) uint8.
    Colour networks (C = 3): the whole picture, transparency composited onto white, resampled to
    H x W. Returns (H, W, 3) uint8.
    The warning is a line to print for an image with nothing in it.
    """
    C, H, W = input_shape
    if C not in (1, 3):
        raise UsageError(f"--predict {path}: this network was trained on {C}-channel images; --predict "
                         "prepares grey (1 channel) or colour (3 channel) pictures only")
    colour, alpha = read_picture(path, C)
    if alpha.sum() == 0:
        return np.zeros((H, W) if C == 1 else (H, W, C), np.uint8), f"warning: {path} is fully transparent"
    if C == 1:
        return grey_digit(path, colour[..., 0], alpha, (H, W), span)
    picture = alpha[..., None] * colour + (1 - alpha[..., None])
    picture = np.einsum("Hh,hwc,Ww->HWc", resampling(picture.shape[0], H), picture, resampling(picture.shape[1], W))
    return np.round(np.clip(picture, 0, 1) * 255).astype(np.uint8), None


def read_picture(path, channels):
    """(colour (h, w, channels), alpha (h, w)) of the picture at path, floats in [0, 1]; alpha all 1
    for a picture without transparency. Refuses (UsageError, one line) what Pillow cannot read."""
    from PIL import Image  # Pillow, which matplotlib reads its images with too

    try:
        # Pillow warns of a "decompression bomb" from 89 million pixels up, and refuses from twice that.
        # A user's own picture is no attack: a large one is read without the warning.
        with warnings.catch_warnings(action="ignore", category=Image.DecompressionBombWarning), \
                Image.open(path) as image:
            has_alpha = "A" in image.getbands() or "transparency" in image.info
            bands = ("L" if channels == 1 else "RGB") + ("A" if has_alpha else "")
            pixels = np.asarray(image.convert(bands), np.float32) / 255
    except Image.DecompressionBombError:
        raise UsageError(f"--predict {path}: more than {2 * Image.MAX_IMAGE_PIXELS} pixels, too large an image "
                         "for Pillow to read; scale it down") from None
    except Exception as error:  # Pillow raises many types for files that are not images
        raise UsageError(f"--predict {path}: not a readable image ({type(error).__name__})") from None
    pixels = pixels.reshape(pixels.shape[:2] + (len(bands),))
    if has_alpha:
        return pixels[..., :channels], pixels[..., channels]
    return pixels, np.ones(pixels.shape[:2], np.float32)


def grey_digit(path, grey, alpha, size, span):
    """A grey picture (h, w) with its alpha -> (the (H, W) uint8 digit, warning or None), the way
    NIST's digits were made into MNIST's: transparency is composited onto a background of the colour
    opposite the ink (a canvas's black ink on transparent pixels becomes black on white); light ink
    on dark is what MNIST holds, so a dark-on-light image is inverted; the digit is cut to its
    bounding box, scaled (keeping its aspect) to fit `span` of the H x W field (MNIST's 20 of 28; all
    of it for frame-filling images), and placed with its centre of mass at the field's centre."""
    H, W = size
    ink_colour = float((grey * alpha).sum() / alpha.sum())
    background = 1.0 if ink_colour < 0.5 else 0.0
    grey = alpha * grey + (1 - alpha) * background
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    if border.mean() > 0.5:  # dark ink on light: make it light on dark, as MNIST is
        grey, border = 1.0 - grey, 1.0 - border
    ink = np.clip(grey - np.median(border), 0, None)
    if ink.max() < 0.1:
        return np.zeros((H, W), np.uint8), f"warning: {path} looks blank (no ink found)"
    ink = ink / ink.max()
    rows, columns = np.flatnonzero((ink > 0.1).any(axis=1)), np.flatnonzero((ink > 0.1).any(axis=0))
    ink = ink[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1]
    scale = min(round(span * H) / ink.shape[0], round(span * W) / ink.shape[1])
    height, width = (max(1, round(side * scale)) for side in ink.shape)
    digit = np.clip(resampling(ink.shape[0], height) @ ink @ resampling(ink.shape[1], width).T, 0, 1)
    centre_row, centre_column = (float((digit.sum(axis=1 - axis) * np.arange(digit.shape[axis])).sum() / digit.sum())
                                 for axis in (0, 1))
    top = int(np.clip(round(H / 2 - 0.5 - centre_row), 0, H - height))
    left = int(np.clip(round(W / 2 - 0.5 - centre_column), 0, W - width))
    field = np.zeros((H, W), np.float32)
    field[top:top + height, left:left + width] = digit
    return np.round(field * 255).astype(np.uint8), None


def resampling(size, new_size):
    """(new_size, size) matrix that resamples an axis of `size` pixels to new_size by linear
    interpolation, widened when shrinking so that every input pixel counts (antialiasing): output
    pixel o, centred at (o + 1/2) * size / new_size - 1/2 in input coordinates, averages the inputs
    with a triangle of half-width max(1, size / new_size) around that point."""
    ratio = size / new_size
    width = max(1.0, ratio)
    centres = (np.arange(new_size) + 0.5) * ratio - 0.5
    weights = np.clip(1 - np.abs(np.arange(size)[None, :] - centres[:, None]) / width, 0, None)
    return weights / weights.sum(axis=1, keepdims=True)


def classify_drawings(network, params, drawings, log=print):
    """Prints the class (for MNIST, the digit) and the K probabilities for each of drawings, (path,
    image, warning) as load_drawing prepared them, with a warning line for a blank image or an
    unsure answer."""
    images = np.stack([image for _, image, _ in drawings])
    # One compilation for the whole computation, the scaling included (compiled operation by
    # operation, the scaling alone took longer than the network).
    probabilities = np.asarray(jax.jit(lambda params, images: network.probabilities(params, to_input(images)))(
        params, images))
    for (path, _, warning), row in zip(drawings, probabilities):
        if warning:
            log(warning)
        elif row.max() < UNSURE_BELOW:
            log(f"warning: {path}: unsure, the most likely class has probability {row.max():.2f} only")
        log(f"{path}: class {int(row.argmax())}; probabilities "
            + " ".join(f"{label}:{p:.4f}" for label, p in enumerate(row)))
