"""The two oracles the gradient tests judge by: JAX's autodiff (jax.vjp) and central finite differences.

Both are allowed here and only here (tests/ and benchmarks/): the project's own code never differentiates
automatically. Errors are relative, max|a - b| / max(|a| + |b|), so they mean the same at any scale.
"""

import jax
import jax.numpy as jnp
import numpy as np


def relative_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.max(np.abs(a) + np.abs(b))
    return 0.0 if scale == 0 else float(np.max(np.abs(a - b)) / scale)


def quick_jit(function, *args):
    """function(*args), compiled as one function (one compilation, not one per primitive) by XLA
    with less optimisation: on the tests' small shapes, compiling, not computing, is what takes time,
    and the level changes nothing but the machine code's speed (and rounding, far below the tests'
    tolerances)."""
    return jax.jit(function).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


def layer_errors_vs_vjp(layer, params, x, d_y):
    """Runs layer.backward and jax.vjp of layer.forward with the same upstream d_y.
    Returns {"d_x": error, "d_<param>": error, ...}, one relative error per array."""
    return layer_errors_vs_vjp_cases([(layer, params, x, d_y)])[0]


def layer_errors_vs_vjp_cases(cases):
    """layer_errors_vs_vjp for each (layer, params, x, d_y) of cases, all compiled as one function:
    one compilation for several layers and shapes is cheaper than one for each. Returns one dict
    per case."""

    def both(layer, params, x, d_y):
        _, cache = layer.forward(params, x)
        ours = layer.backward(params, cache, d_y)
        _, vjp = jax.vjp(lambda p, x: layer.forward(p, x)[0], params, x)
        reference_grads, reference_d_x = vjp(d_y)
        return ours, (reference_d_x, reference_grads)

    for layer, params, x, d_y in cases:
        assert jax.eval_shape(lambda: layer.forward(params, x)[0]).shape == d_y.shape
    layers = [layer for layer, *_ in cases]
    arrays = [arrays for _, *arrays in cases]
    results = quick_jit(lambda arrays: [both(layer, *case) for layer, case in zip(layers, arrays)], arrays)
    all_errors = []
    for (_, params, _, _), ((d_x, grads), (reference_d_x, reference_grads)) in zip(cases, results):
        assert set(grads) == set(params), "grads must have exactly the keys of params"
        errors = {"d_x": relative_error(d_x, reference_d_x)}
        for name in params:
            assert grads[name].shape == params[name].shape, name
            errors["d_" + name] = relative_error(grads[name], reference_grads[name])
        all_errors.append(errors)
    return all_errors


def numerical_gradient(f, x, h=1e-6):
    """Central differences of the scalar function f at every element of the float64 array x."""
    x = np.array(x, np.float64)
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        saved = x[index]
        # jnp.array copies: jnp.asarray may share x's memory, which the next line changes.
        x[index] = saved + h
        plus = float(f(jnp.array(x)))
        x[index] = saved - h
        minus = float(f(jnp.array(x)))
        x[index] = saved
        grad[index] = (plus - minus) / (2 * h)
    return grad


def layer_errors_vs_finite_differences(layer, params, x, d_y):
    """Like layer_errors_vs_vjp, judged by finite differences of sum(forward(params, x) * d_y)."""
    d_x, grads = quick_jit(lambda p, x, d_y: layer.backward(p, layer.forward(p, x)[1], d_y), params, x, d_y)
    weighted = jax.jit(lambda p, x: jnp.sum(layer.forward(p, x)[0] * d_y))
    errors = {"d_x": relative_error(d_x, numerical_gradient(lambda v: weighted(params, v), x))}
    for name in params:
        numeric = numerical_gradient(lambda v: weighted(dict(params, **{name: v}), x), params[name])
        errors["d_" + name] = relative_error(grads[name], numeric)
    return errors
