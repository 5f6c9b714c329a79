"""The project's rule: no automatic differentiation outside tests/ and benchmarks/."""

import os
import re
import subprocess

from conftest import ROOT

FORBIDDEN = re.compile(
    r"jax\.(grad|value_and_grad|vjp|jvp|linearize|linear_transpose|custom_vjp|custom_jvp)\b"
    r"|\bfrom\s+jax\s+import\s+[^\n]*\b(grad|value_and_grad|vjp|jvp|linearize|linear_transpose|custom_vjp|custom_jvp)\b"
    r"|\bfrom\s+jax\.(_src\.)?(api|ad_checkpoint|interpreters)\b"
    r"|^\s*(import|from)\s+(optax|flax|haiku|equinox)\b",
    re.MULTILINE)


def violations(source):
    return [match.group(0) for match in FORBIDDEN.finditer(source)]


def project_python_files():
    """Every .py file git knows of (tracked or new), outside tests/ and benchmarks/."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [path for path in listed if not path.startswith(("tests/", "benchmarks/"))]


def test_detector_catches_each_form():
    for line in ["g = jax.grad(f)(x)", "loss, g = jax.value_and_grad(f)(x)", "from jax import vjp",
                 "from jax import numpy, jvp", "@jax.custom_vjp", "jax.linear_transpose(f, x)",
                 "import optax", "from flax import linen", "import equinox as eqx"]:
        assert violations(line), line
    for line in ["import jax.numpy as jnp", "from jax import lax", "d_weights = x.T @ d_y",
                 "# we never call jax dot grad here"]:
        assert not violations(line), line


def test_no_automatic_differentiation_outside_tests_and_benchmarks():
    files = project_python_files()
    assert {"model.py", "Convolutional.py", "Pooling_layer.py", "DenseLayer.py", "loss.py"} <= set(files)
    found = {}
    for path in files:
        with open(os.path.join(ROOT, path)) as f:
            hits = violations(f.read())
        if hits:
            found[path] = hits
    assert not found, f"automatic differentiation outside tests/ and benchmarks/: {found}"
