"""A run that goes wrong says so in one line: training that diverges stops, training that learns
nothing is warned about (THEORY.md §5)."""

import math

import numpy as np

from data import counted
from machinery.errors import UsageError

# A blind guess, the same probability 1/K for each of K classes, scores a loss of ln K. Training
# starts near it and goes down; an epoch whose mean loss ends clearly above it (this factor times
# ln K) has been thrown off by updates that overshoot. The clipped loss of the original network
# never exceeds -ln(1e-7) = 16.1, so the bound has to sit well below that to catch its divergence.
DIVERGED_LOSS_FACTOR = 1.5
# An epoch whose accuracy is within this much of always answering the most common class has
# learned nothing worth the name, diverged or not.
NEAR_CHANCE = 0.05


def check_not_diverged(train_loss, epoch, args, num_classes):
    """Raises UsageError (one line, naming the epoch and the likely cause) if an epoch's mean loss is
    not finite or is clearly worse than a blind guess's ln K.

    The weight decay is named beside the learning rate when it diverges on its own: its part of the
    update (THEORY.md §5) is the recurrence w' = (1 + m - lr·wd) w - m w_before for momentum m, which
    grows without bound once lr·wd > 2 (1 + m), whichever of the two is too large."""
    blind_guess = math.log(num_classes)
    if not (train_loss <= DIVERGED_LOSS_FACTOR * blind_guess):  # also catches NaN: it compares False
        lost = (f"the training loss became {train_loss:.4g} in epoch {epoch}, worse than a blind guess "
                f"(ln {num_classes} = {blind_guess:.2f})")
        decay_bound = 2 * (1 + args.momentum)
        if args.lr * args.weight_decay > decay_bound:
            raise UsageError(f"{lost}: lr x weight decay = {args.lr} x {args.weight_decay} = "
                             f"{args.lr * args.weight_decay:.4g} exceeds 2 (1 + momentum) = {decay_bound:.4g}, past "
                             "which the decay alone makes training diverge; try a smaller --lr or a much "
                             "smaller --weight-decay")
        raise UsageError(f"{lost}: the learning rate {args.lr} makes training diverge; try a smaller --lr")


def near_chance_warning(accuracy, eval_labels, epoch, eval_name, args):
    """The warning for an epoch whose accuracy is within NEAR_CHANCE of chance, the accuracy of
    always answering the most common class; None otherwise, and where nearly every image is of one
    class (a validation set of a few images), where answering it is nearly perfect anyway."""
    chance = float(np.bincount(np.asarray(eval_labels)).max() / len(eval_labels))
    if accuracy >= chance + NEAR_CHANCE or chance >= 1 - NEAR_CHANCE:
        return None
    return (f"warning: {eval_name} accuracy {100 * accuracy:.2f}% in epoch {epoch} is within "
            f"{100 * NEAR_CHANCE:.0f} points of chance ({100 * chance:.2f}%, always answering the most "
            f"common class): the learning rate {args.lr} may be too high (lower it, or climb to it with "
            f"--warmup-epochs), or too low for {counted(args.epochs, 'epoch')}, or the labels may not belong "
            "to the images")
