"""Guards the project's rules: no automatic differentiation outside tests/ and benchmarks/, and
imports that point one way (the layers and data.py at the bottom, machinery/ above them, model.py
on top).

For autodiff, two guards. A syntax-tree scan of every module outside tests/ and benchmarks/ finds JAX's
differentiation entry points however they are reached: an attribute of any name bound to a jax
module (`jax.grad`, `import jax as j; j.grad`, `jax.experimental.jet.jet`), a name imported from
one (`from jax import (grad,)`, `from jax import vjp as v`), `getattr` or `attrgetter` with such a
string, JAX's internals, and the optimiser and network libraries that differentiate for you. Then,
at run time, the compiled training epoch of every preset is traced with those entry points
replaced by functions that raise, so autodiff reached by a path the scan cannot see fails too.
"""

import ast
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from machinery import adversarial, backprop_pictures, flags, schedule
from conftest import ROOT

DIFFERENTIATION = {"grad", "value_and_grad", "vjp", "jvp", "linearize", "linear_transpose", "jacrev", "jacfwd",
                   "jacobian", "hessian", "custom_vjp", "custom_jvp", "closure_convert", "jet", "check_grads"}
FORBIDDEN_PACKAGES = {"optax", "flax", "haiku", "equinox", "objax", "trax", "stax", "torch", "tensorflow"}
# JAX modules that hold autodiff machinery, or private internals that could reach it unseen.
FORBIDDEN_JAX_MODULES = ("jax._src", "jax.interpreters", "jax.ad_checkpoint", "jax.experimental.jet",
                         "jax.example_libraries")


def is_jax_module(name):
    return name == "jax" or name.startswith("jax.")


def forbidden_module(name):
    top = name.split(".")[0]
    return top in FORBIDDEN_PACKAGES or any(name == m or name.startswith(m + ".") for m in FORBIDDEN_JAX_MODULES)


def violations(source):
    """Every use of automatic differentiation in the Python source, as 'line N: what' strings."""
    tree = ast.parse(source)
    jax_names = set()  # local names bound to jax or one of its modules
    found = []

    def report(node, what):
        found.append(f"line {node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if forbidden_module(alias.name):
                    report(node, f"import {alias.name}")
                if is_jax_module(alias.name):
                    # `import jax.numpy` binds `jax`; `import jax.numpy as jnp` binds `jnp`.
                    jax_names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module:
            if forbidden_module(node.module):
                report(node, f"from {node.module} import ...")
            if is_jax_module(node.module):
                for alias in node.names:
                    if alias.name in DIFFERENTIATION or alias.name == "*":
                        report(node, f"from {node.module} import {alias.name}")
                    if forbidden_module(f"{node.module}.{alias.name}"):
                        report(node, f"from {node.module} import {alias.name}")
                    jax_names.add(alias.asname or alias.name)  # a submodule like lax, or a function
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in DIFFERENTIATION:
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in jax_names:
                report(node, f"{ast.unparse(node)}")
        elif isinstance(node, ast.Call):
            # getattr(jax, "grad"), operator.attrgetter("grad"), importlib.import_module("optax"), ...
            for argument in node.args:
                if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                    text = argument.value
                    if text in DIFFERENTIATION or text.split(".")[-1] in DIFFERENTIATION or forbidden_module(text):
                        report(node, f"{ast.unparse(node.func)}({text!r})")
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            if node.slice.value in DIFFERENTIATION:  # vars(jax)["grad"], jax.__dict__["vjp"]
                report(node, ast.unparse(node))
    return found


def project_python_files():
    """Every .py file git knows of (tracked or new), outside tests/ and benchmarks/."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [path for path in listed if not path.startswith(("tests/", "benchmarks/"))]


@pytest.mark.parametrize("source", [
    "import jax\ng = jax.grad(f)(x)",
    "import jax\nloss, g = jax.value_and_grad(f)(x)",
    "import jax\njax.jacrev(f)",
    "import jax\njax.jacfwd(f)",
    "import jax\njax.hessian(f)",
    "import jax\n@jax.custom_vjp\ndef f(x): return x",
    "import jax\njax.linear_transpose(f, x)",
    "import jax as j\nj.grad(f)",
    "import jax.numpy\njax.vjp(f, x)",
    "import jax\ngetattr(jax, 'grad')(f)",
    "import operator\noperator.attrgetter('grad')(jax)",
    "import jax\nvars(jax)['vjp']",
    "from jax import vjp",
    "from jax import numpy, jvp",
    "from jax import (\n    numpy,\n    grad,\n)",
    "from jax import grad as differentiate",
    "from jax import *",
    "from jax.experimental.jet import jet",
    "from jax._src import api",
    "from jax.interpreters import ad",
    "import jax.experimental.jet",
    "import importlib\nimportlib.import_module('optax')",
    "import optax",
    "from flax import linen",
    "import equinox as eqx",
])
def test_scan_catches_each_form(source):
    assert violations(source), source


@pytest.mark.parametrize("source", [
    "import jax.numpy as jnp\nfrom jax import lax",
    "d_weights = x.T @ d_y",
    "# we never call jax dot grad here",
    "grads = [None] * 3\nstep.grad = 1",
    "import jax\njax.jit(f)\njax.tree_util.tree_map(f, x)\njax.random.split(key)",
    "params['weights']\ngetattr(layer, 'output_shape')",
])
def test_scan_passes_plain_code(source):
    assert not violations(source), source


def test_no_automatic_differentiation_outside_tests_and_benchmarks():
    files = project_python_files()
    assert {"model.py", "Convolutional.py", "Pooling_layer.py", "DenseLayer.py", "loss.py", "data.py",
            "windows.py", "fast_layers.py", "machinery/adversarial.py", "machinery/backprop_pictures.py"} <= set(files)
    found = {}
    for path in files:
        with open(os.path.join(ROOT, path)) as f:
            hits = violations(f.read())
        if hits:
            found[path] = hits
    assert not found, f"automatic differentiation outside tests/ and benchmarks/: {found}"


def forbid_autodiff(monkeypatch):
    """Replaces JAX's differentiation entry points, public and internal, with functions that raise."""
    import jax._src.interpreters.ad as ad

    def refuse(name):
        def raising(*args, **kwargs):
            raise AssertionError(f"automatic differentiation used: {name}")
        return raising

    for name in DIFFERENTIATION:
        if hasattr(jax, name):
            monkeypatch.setattr(jax, name, refuse(f"jax.{name}"))
    # Every JAX transformation that differentiates ends in these, whatever name it was called by.
    for name in ("jvp", "linearize", "backward_pass"):
        monkeypatch.setattr(ad, name, refuse(f"jax._src.interpreters.ad.{name}"))


def trace_training_epoch(preset):
    args = flags.parse_args(["--preset", preset])
    network = model.build_network(flags.PRESET_NETWORK[preset])
    params = network.init(model.run_keys(args.seed)[0])
    velocity = jax.tree_util.tree_map(jnp.zeros_like, params) if args.momentum else None
    images = jnp.zeros((2 * args.batch_size, 28, 28), jnp.uint8)
    labels = jnp.zeros((2 * args.batch_size,), jnp.int32)
    order = jnp.arange(2 * args.batch_size, dtype=jnp.int32)
    rates = schedule.learning_rates(args.schedule, args.lr, 0, args.epochs, 2)
    train_epoch = model.make_train_epoch(network, args.momentum, args.weight_decay)
    return train_epoch.lower(params, velocity, images, labels, order, rates)


@pytest.mark.parametrize("preset", sorted(flags.PRESETS))
def test_training_epoch_traces_without_autodiff(monkeypatch, preset):
    """Every preset's epoch traces, and lowers to a program that updates the parameters, with every
    differentiation entry point replaced by one that raises."""
    forbid_autodiff(monkeypatch)
    lowered = trace_training_epoch(preset)
    params, _, losses, _ = lowered.out_info
    assert losses.shape == (2,) and len(params) == len(model.build_network(flags.PRESET_NETWORK[preset]).layers)
    assert "dot_general" in lowered.as_text()  # the layers' products


def test_run_time_guard_catches_autodiff(monkeypatch):
    """The guard above must be able to fail: a layer whose backward calls jax.vjp is caught."""
    forbid_autodiff(monkeypatch)

    def backward_by_autodiff(self, params, cache, d_y):
        _, pullback = jax.vjp(lambda p, x: self.forward(p, x)[0], params, cache)
        grads, d_x = pullback(d_y)
        return d_x, grads

    from DenseLayer import Dense

    monkeypatch.setattr(Dense, "backward", backward_by_autodiff)
    with pytest.raises(AssertionError, match="automatic differentiation used: jax.vjp"):
        trace_training_epoch("default")
    # Reached through an alias bound before the guard: the internal entry point still catches it.
    monkeypatch.setattr(Dense, "backward", lambda self, params, cache, d_y: ALIASED_VJP(
        lambda x: self.forward(params, x)[0], cache)[1](d_y) + (params,))
    with pytest.raises(AssertionError, match="automatic differentiation used: jax._src.interpreters.ad"):
        trace_training_epoch("default")


ALIASED_VJP = jax.vjp  # bound at import, before any monkeypatch: as `from jax import vjp` would be


@pytest.mark.parametrize("kind", ["modern", "original", "lenet"])
def test_the_input_gradient_paths_run_without_autodiff(monkeypatch, kind):
    """--fgsm's attack traces, and the backprop pictures' forward and backward run, with every
    differentiation entry point replaced by one that raises."""
    forbid_autodiff(monkeypatch)
    network = model.build_network(kind)  # a new network: nothing compiled for it yet, so all is traced
    params = network.init(jax.random.PRNGKey(0))
    images, labels = np.zeros((200, 28, 28), np.uint8), np.arange(200, dtype=np.int32) % 10
    lowered = adversarial.make_attack(network).lower(params, images, labels, np.float32(0.1))
    assert lowered.out_info.shape == (200,)
    maps, d_x, predicted = backprop_pictures.look_inside(network, params, images[:3], labels[:3])
    assert d_x.shape == (1, 28, 28, 3) and maps[0][0] == "input" and predicted.shape == (3,)


# What each layer of the house may import of the project's own modules.
LAYER_FILES = {"Convolutional", "Pooling_layer", "DenseLayer", "loss", "windows", "fast_layers", "data"}


def project_imports(path):
    """The project's own modules a file imports: top-level names, and machinery's modules by name."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + ([f"machinery.{alias.name}" for alias in node.names]
                                     if node.module == "machinery" else [])
        found |= {name for name in names if name.split(".")[0] in LAYER_FILES | {"model", "machinery"}}
    return found


def import_violations(root):
    """(file, what it imports that its layer may not) for every module of the project at root."""
    violations = []
    for name in sorted(os.listdir(os.path.join(root, "machinery"))):
        if name.endswith(".py"):
            imported = project_imports(os.path.join(root, "machinery", name))
            violations += [(f"machinery/{name}", module) for module in sorted(imported)
                           if module == "model" or module.split(".")[0] not in LAYER_FILES | {"machinery"}]
    for layer in sorted(LAYER_FILES):
        imported = project_imports(os.path.join(root, layer + ".py"))
        violations += [(f"{layer}.py", module) for module in sorted(imported) if module.split(".")[0] not in LAYER_FILES]
    return violations


def test_imports_point_one_way():
    assert import_violations(ROOT) == []


def test_import_check_notices_an_import_against_the_grain(tmp_path):
    """The check above must be able to fail: a copy of the project where a layer imports the
    machinery and the machinery imports model.py."""
    (tmp_path / "machinery").mkdir()
    for layer in LAYER_FILES:
        (tmp_path / f"{layer}.py").write_text("import numpy\n")
    (tmp_path / "Convolutional.py").write_text("from machinery.files import write_atomically\n")
    (tmp_path / "machinery" / "pictures.py").write_text("import model\nfrom data import counted\n")
    assert import_violations(tmp_path) == [("machinery/pictures.py", "model"),
                                           ("Convolutional.py", "machinery.files")]
