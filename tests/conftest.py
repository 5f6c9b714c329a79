"""Shared set-up: the project root on sys.path, float64 so gradients can be compared to ~1e-12, and
float32 matrix products at full precision.

The training code fixes its own dtype (float32) explicitly, so model tests still run in float32. On a
GPU, JAX's default float32 matrix product may round its inputs to TensorFloat-32 (10 mantissa bits);
"highest" keeps every product in full float32 (or float64) wherever the tests run, so their tolerances
mean the same on every device.
"""

import os
import sys

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_default_matmul_precision", "highest")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
