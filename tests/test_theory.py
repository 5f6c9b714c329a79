"""Guards THEORY.md: the code and tests it names exist, its worked example and parameter counts are right."""

import ast
import glob
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

import model
from Convolutional import Convolutional
from conftest import ROOT

# Backticked words in THEORY.md that are names of arguments or values, not of definitions.
NOT_DEFINITIONS = {"params", "grads", "d_v"}
# Library names (JAX's own API) the text mentions; they are not the project's to define.
LIBRARY_PREFIXES = ("jax.", "lax.", "jnp.")


def definitions():
    """{module name: {top-level function, class and constant names, Class.method and module.function
    names}} of every .py file of the project and its tests."""
    found = {}
    for path in glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "machinery", "*.py")) + \
            glob.glob(os.path.join(ROOT, "tests", "*.py")):
        tree = ast.parse(open(path).read())
        names = set()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            if isinstance(node, ast.Assign):
                names |= {target.id for target in node.targets if isinstance(target, ast.Name)}
            if isinstance(node, ast.ClassDef):
                names |= {f"{node.name}.{item.name}" for item in node.body if isinstance(item, ast.FunctionDef)}
        module = os.path.splitext(os.path.basename(path))[0]
        found[module] = names | {f"{module}.{name}" for name in names if "." not in name}
    return found


def named_in_theory():
    text = open(os.path.join(ROOT, "THEORY.md")).read()
    return set(re.findall(r"`([^`\n]+)`", text))


def unknown_names(tokens):
    """(how many of the tokens name a file or definition, the sorted list of those that don't exist)."""
    defined = set().union(*definitions().values())
    tests = {name for module, names in definitions().items() if module.startswith("test_") for name in names}
    checked, missing = 0, []
    for token in tokens:
        if token.endswith(".py"):
            checked += 1
            if not os.path.isfile(os.path.join(ROOT, token)):
                missing.append(token)
        elif re.fullmatch(r"[A-Za-z_]\w*(\.\w+)?", token) and not token.startswith(LIBRARY_PREFIXES):
            if token in NOT_DEFINITIONS:
                continue
            checked += 1
            exists = token in tests if token.startswith("test_") else token in defined
            if not exists:
                missing.append(token)
    return checked, sorted(missing)


def test_every_name_in_theory_exists():
    checked, missing = unknown_names(named_in_theory())
    assert checked >= 40, f"only {checked} names checked: has the format of THEORY.md changed?"
    assert not missing, f"THEORY.md names what does not exist: {missing}"


def test_checker_notices_a_missing_name():
    """The check above must be able to fail: THEORY.md's own names plus three that exist nowhere
    (a method, a test, a file) are reported as exactly those three."""
    bogus = {"Convolutional.backwards", "test_nonexistent", "Missing.py"}
    checked, missing = unknown_names(named_in_theory() | bogus)
    assert checked >= 43 and missing == sorted(bogus)


def test_theory_worked_example():
    """THEORY.md §7, computed with the project's convolution."""
    layer = Convolutional((1, 4, 4), kernel_size=2, depth=1)
    params = {"weights": jnp.asarray([[[[1.0, 0.0], [-1.0, 2.0]]]]), "biases": jnp.asarray([0.5])}
    x = jnp.asarray([[1, 2, 0, 1], [0, 1, 3, 1], [2, 1, 0, 2], [1, 0, 1, 1]], jnp.float64)[None, :, :, None]
    d_y = jnp.asarray([[1, 0, -1], [0, 2, 0], [-1, 0, 1]], jnp.float64)[None, :, :, None]
    y, cache = layer.forward(params, x)
    d_x, grads = layer.backward(params, cache, d_y)
    np.testing.assert_allclose(y[0, :, :, 0], [[3.5, 7.5, -0.5], [0.5, 0.5, 7.5], [1.5, 3.5, 1.5]], atol=1e-12)
    np.testing.assert_allclose(grads["weights"][0, 0], [[1, 8], [-1, 1]], atol=1e-12)
    np.testing.assert_allclose(grads["biases"], [2], atol=1e-12)
    np.testing.assert_allclose(d_x[0, :, :, 0], [[1, 0, -1, 0], [-1, 4, 1, -2], [-1, -2, 5, 0], [1, -2, -1, 2]],
                               atol=1e-12)


def test_parameter_counts_match_theory():
    """THEORY.md §6: 54,844 parameters with tied conv biases, 58,219 with the original's untied ones,
    61,706 for LeNet-5."""
    def count(kind):
        params = model.build_network(kind).init(jax.random.PRNGKey(0))
        return sum(value.size for value in jax.tree_util.tree_leaves(params))
    assert count("modern") == 54844
    assert count("original") == 58219
    assert count("lenet") == 61706
