"""Shared set-up: the project root on sys.path, and float64 so gradients can be compared to ~1e-12.

The training code fixes its own dtype (float32) explicitly, so model tests still run in float32.
"""

import os
import sys

import jax

jax.config.update("jax_enable_x64", True)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
