"""What runs the lesson without being part of it: model.py imports from here, never the other way.

    errors.py      UsageError, the one-line refusal of a flag value or file that cannot work
    flags.py       the presets, the command line and the checks of its values
    files.py       the files a run reads and writes: checks before training, atomic writes
    checkpoints.py --save, --load and --resume: the checkpoint format and its checks
    compiling.py   XLA's options for small functions, and the persistent compile cache
    devices.py     starting JAX's devices, the mesh of --devices, arrays copied to every device
    processes.py   several processes joined through JAX's distributed runtime (--coordinator)
    schedule.py    the learning rate of every step
    shuffle.py     each epoch's order of the training images
    divergence.py  training that diverges stops in one line; training that learns nothing is warned of
    stopping.py    Ctrl-C, SIGTERM, SIGHUP and a closed stdout: stopping after the epoch
    exits.py       the program's exit: one line for every error a user can act on
    report.py      the run's opening line, its recorded configuration, metrics.json's numbers
    pictures.py    metrics.json and the pictures a run writes
    backprop_pictures.py  gradient flow, feature maps, input gradients, the attack: pictures of backprop
    adversarial.py --fgsm: the fast gradient sign attack with the network's own input gradient
    drawings.py    --predict: a picture file prepared as the training images were, and classified
"""
