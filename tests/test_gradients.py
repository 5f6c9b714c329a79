"""Guards the gradients: every hand-written backward pass, in its plain form and in the fast form
training runs, against autodiff, finite differences and a naive loop oracle, and the two forms
against each other; the whole networks' gradients against jax.grad.

Would a wrong sign, index or transpose in a layer's backward make one of these fail? Each check below
compares every gradient array elementwise with an independent reference on random inputs with a
random upstream gradient, so any such slip changes some element by O(1) relative to the scale and
lands far above the 1e-9 bound.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fast_layers
import model
from Convolutional import Convolutional
from DenseLayer import Dense, Flatten, ReLU, Tanh
from Pooling_layer import AvgPool, MaxPool
from fast_layers import FastConvolutional, FastMaxPool
from gradcheck import (layer_errors_vs_finite_differences, layer_errors_vs_vjp, layer_errors_vs_vjp_cases,
                       quick_jit, relative_error)
from loss import CategoricalCrossEntropy, Softmax, SoftmaxCrossEntropy
from naive import conv_backward_naive, conv_forward_naive

VJP_BOUND = 1e-9
FINITE_DIFFERENCE_BOUND = 1e-6
F64 = jnp.float64


def random_arrays(rng, *shapes):
    return [jnp.asarray(rng.standard_normal(shape)) for shape in shapes]


def report(name, worst):
    """One verdict line per layer: the worst error of each gradient array (shown with pytest -s)."""
    print(f"{name:34s} " + "  ".join(f"{array} {error:.1e}" for array, error in sorted(worst.items())))


def random_params(layer, rng, key):
    """The layer's parameters in float64, every entry standard normal (biases too, so that a bias
    gradient sent to the wrong place would show)."""
    return {name: jnp.asarray(rng.standard_normal(value.shape))
            for name, value in jax.eval_shape(lambda: layer.init(key, F64)).items()}


def assert_within(name, errors, bound):
    report(name, errors)
    for array, error in errors.items():
        assert error <= bound, f"{name}: {array} relative error {error:.2e}"


def conv_configs(count, seed=0):
    """Random convolution configurations over the ranges the layer promises to handle."""
    rng = np.random.default_rng(seed)
    configs = []
    while len(configs) < count:
        c = dict(N=rng.integers(1, 5), C=rng.integers(1, 4), D=rng.integers(1, 5),
                 H=rng.integers(5, 14), W=rng.integers(5, 14), K=rng.integers(1, 6),
                 S=rng.integers(1, 4), P=rng.integers(0, 3), tied=bool(rng.integers(0, 2)))
        if c["K"] <= min(c["H"], c["W"]) + 2 * c["P"]:
            configs.append({k: (int(v) if not isinstance(v, bool) else v) for k, v in c.items()})
    return configs


def make_conv(c, kind=Convolutional):
    return kind((c["C"], c["H"], c["W"]), c["K"], c["D"], padding=c["P"], stride=c["S"], tied_biases=c["tied"])


def output_rows(c):
    layer = make_conv(c)
    return layer.output_shape(layer.input_shape)[1]


def conv_case(c, rng, kind=Convolutional):
    layer = make_conv(c, kind)
    # Random weights and non-zero biases (so a bias gradient routed to the wrong position would show),
    # drawn by numpy: a JAX draw of each new shape in float64 takes longer to compile than the test.
    params = random_params(layer, rng, jax.random.PRNGKey(0))
    x, d_y = random_arrays(rng, (c["C"], c["H"], c["W"], c["N"]), layer.output_shape(layer.input_shape) + (c["N"],))
    return layer, params, x, d_y


@pytest.mark.parametrize("kind", [Convolutional, FastConvolutional])
def test_convolution_matches_vjp_over_random_configurations(kind):
    rng = np.random.default_rng(1)
    worst = {}
    configs = conv_configs(10)
    # Single samples (the original's training) and batches, where dW and db also sum over n; every
    # channel count, stride and padding of the ranges; tied and untied biases.
    assert {c["N"] == 1 for c in configs} == {True, False} and {c["tied"] for c in configs} == {True, False}
    assert all({c[key] for c in configs} == values for key, values in
               [("C", {1, 2, 3}), ("S", {1, 2, 3}), ("P", {0, 1, 2}), ("N", {1, 2, 3, 4})])
    # The fast form's ways of taking a batch's sums: XLA's convolution and im2col patches (one input
    # channel, at most 3x3), and the banded products (FastConvolutional._band) otherwise.
    assert {c["C"] == 1 and c["K"] <= 3 for c in configs if c["N"] > 1} == {True, False}
    cases = [conv_case(c, rng, kind) for c in configs]
    for c, errors in zip(configs, layer_errors_vs_vjp_cases(cases)):
        for array, error in errors.items():
            worst[array] = max(worst.get(array, 0.0), error)
            assert error <= VJP_BOUND, f"{kind.__name__} {c}: {array} relative error {error:.2e}"
    report(f"{kind.__name__} vs jax.vjp", worst)


def test_convolution_in_blocks_of_rows(monkeypatch):
    """For a batch, the forward and dW are taken over blocks of whole output rows: the im2col
    product's at most DW_BLOCK_COLUMNS columns each, the banded products' BAND_ROWS rows each. The
    configurations above mostly fit in one block; here the blocks hold two rows each, so every layer
    with more than two output rows needs several, the last one short where the count is odd. Both
    ways are among them."""
    rng = np.random.default_rng(4)
    batches = [c for c in conv_configs(40, seed=5) if c["N"] > 1 and output_rows(c) > 2][:6]
    assert len(batches) >= 5 and any(output_rows(c) % 2 for c in batches)
    assert {c["C"] == 1 and c["K"] <= 3 for c in batches} == {True, False}
    monkeypatch.setattr(fast_layers, "BAND_ROWS", 2)
    for c in batches:
        layer, params, x, d_y = conv_case(c, rng, FastConvolutional)
        _, H_out, W_out = layer.output_shape(layer.input_shape)
        monkeypatch.setattr(fast_layers, "DW_BLOCK_COLUMNS", 2 * W_out * c["N"])
        assert len(layer._row_blocks(H_out, W_out, c["N"])) == -(-H_out // 2)
        assert [rows for (_, rows), _ in layer._window_blocks(x)] == [2] * (H_out // 2) + [1] * (H_out % 2)
        errors = layer_errors_vs_vjp(layer, params, x, d_y)
        assert errors["d_weights"] <= VJP_BOUND, f"Convolutional {c}: d_weights relative error {errors['d_weights']:.2e}"
        y = quick_jit(lambda p, x: layer.forward(p, x)[0], params, x)
        y_naive = conv_forward_naive(np.asarray(x), np.asarray(params["weights"]), np.asarray(params["biases"]),
                                     c["S"], c["P"])
        assert relative_error(y, y_naive) <= 1e-12, c


@pytest.mark.parametrize("kind", [Convolutional, FastConvolutional])
def test_convolution_matches_naive_loops(kind):
    rng = np.random.default_rng(2)
    # The loops are slow: keep to configurations with few multiply-adds.
    small = [c for c in conv_configs(40, seed=3) if c["N"] * c["D"] * c["C"] * c["H"] * c["W"] * c["K"] ** 2 < 8000]
    # Both forwards (XLA's convolution for one input channel and at most 3x3, the banded products
    # otherwise, one channel included), single samples and batches.
    assert len(small) >= 5 and {c["N"] == 1 for c in small[:6]} == {True, False}
    assert {c["C"] == 1 and c["K"] <= 3 for c in small[:6]} == {True, False}
    assert any(c["C"] == 1 and c["K"] > 3 for c in small[:6])
    for c in small[:6]:
        layer, params, x, d_y = conv_case(c, rng, kind)
        y, d_x, grads = quick_jit(lambda p, x, d_y: (layer.forward(p, x)[0],) + layer.backward(p, layer.forward(p, x)[1], d_y),
                                  params, x, d_y)
        w, b = np.asarray(params["weights"]), np.asarray(params["biases"])
        y_naive = conv_forward_naive(np.asarray(x), w, b, c["S"], c["P"])
        d_x_naive, d_w_naive, d_b_naive = conv_backward_naive(np.asarray(x), w, np.asarray(d_y), c["S"],
                                                               c["P"], c["tied"])
        assert relative_error(y, y_naive) <= 1e-12, c
        assert relative_error(d_x, d_x_naive) <= 1e-12, c
        assert relative_error(grads["weights"], d_w_naive) <= 1e-12, c
        assert relative_error(grads["biases"], d_b_naive) <= 1e-12, c


WINDOW_STRIDE = [(2, 2), (3, 3), (2, 1), (3, 2), (3, 1), (2, 3), (1, 1)]


# The "all" rule differs from "first" only in which offsets count as the maximum: it takes one of each
# of the backward's three cases (tiling windows, overlapping, with gaps).
@pytest.mark.parametrize("window, stride, ties", [(*pair, "first") for pair in WINDOW_STRIDE]
                         + [(2, 2, "all"), (3, 2, "all"), (2, 3, "all")])
def test_max_pool_matches_vjp(window, stride, ties):
    """Random real inputs have no ties, so both rules must agree with autodiff exactly. Includes
    overlapping windows (stride < window), gaps (stride > window) and sizes that leave a remainder."""
    rng = np.random.default_rng(window * 10 + stride)
    layer = MaxPool(window, stride, ties)
    worst, cases = {}, []
    for C, H, W, N in [(1, 5, 5, 1), (3, 7, 6, 2), (2, 9, 13, 3), (1, 12, 8, 4)]:
        (x,) = random_arrays(rng, (C, H, W, N))
        cases.append((layer, {}, x, jnp.asarray(rng.standard_normal(layer.output_shape((C, H, W)) + (N,)))))
    for (_, _, x, _), errors in zip(cases, layer_errors_vs_vjp_cases(cases)):
        for array, error in errors.items():
            worst[array] = max(worst.get(array, 0.0), error)
            assert error <= VJP_BOUND, f"MaxPool({window}, {stride}, {ties}) on {x.shape}: {error:.2e}"
    report(f"MaxPool({window},{stride},{ties}) vs jax.vjp", worst)


@pytest.mark.parametrize("layer, x_shape, y_shape", [
    (Dense(7, 5), (3, 7), (3, 5)),
    (Dense(1, 1), (1, 1), (1, 1)),
    (Dense(845, 64), (2, 845), (2, 64)),
    (ReLU(), (3, 2, 4, 5), (3, 2, 4, 5)),
    (Tanh(), (3, 2, 4, 5), (3, 2, 4, 5)),
    (Tanh(scaled=True), (4, 7), (4, 7)),
    (Flatten(), (2, 4, 5, 3), (3, 40)),
    (Softmax(), (4, 10), (4, 10)),
])
def test_small_layers_match_vjp(layer, x_shape, y_shape):
    rng = np.random.default_rng(7)
    params = random_params(layer, rng, jax.random.PRNGKey(1))
    x, d_y = random_arrays(rng, x_shape, y_shape)
    assert_within(f"{type(layer).__name__} vs jax.vjp", layer_errors_vs_vjp(layer, params, x, d_y), VJP_BOUND)


def test_losses_match_vjp():
    rng = np.random.default_rng(8)
    logits = jnp.asarray(rng.standard_normal((5, 10)))
    targets = jax.nn.one_hot(jnp.asarray(rng.integers(0, 10, 5)), 10, dtype=F64)
    probabilities = Softmax().forward({}, logits)[0]  # all well inside [1e-7, 1 - 1e-7]: no clipping
    for loss, inputs in [(SoftmaxCrossEntropy(), logits), (CategoricalCrossEntropy(), probabilities)]:
        def ours_and_autodiff(inputs, targets):
            value, cache = loss.forward(inputs, targets)
            return (value, loss.backward(cache)) + jax.value_and_grad(lambda v: loss.forward(v, targets)[0])(inputs)

        value, grad, reference_value, reference_grad = quick_jit(ours_and_autodiff, inputs, targets)
        assert relative_error(value, reference_value) <= 1e-14
        error = relative_error(grad, reference_grad)
        report(f"{type(loss).__name__} vs jax.grad", {"d_input": error})
        assert error <= VJP_BOUND


@pytest.mark.parametrize("make_layer, x_shape", [
    (lambda: Convolutional((2, 6, 5), 3, 2, padding=1, stride=2, tied_biases=True), (2, 6, 5, 2)),
    (lambda: Convolutional((1, 5, 5), 2, 2, tied_biases=False), (1, 5, 5, 1)),
    (lambda: MaxPool(2, 2, "first"), (2, 5, 4, 2)),
    (lambda: MaxPool(3, 1, "all"), (2, 5, 5, 1)),
    (lambda: Dense(6, 4), (3, 6)),
    (lambda: ReLU(), (2, 3, 4)),
    (lambda: Tanh(scaled=True), (2, 3, 4)),
    (lambda: AvgPool(3, 2), (2, 7, 6, 2)),
    (lambda: Flatten(), (3, 2, 2, 2)),
    (lambda: Softmax(), (3, 5)),
])
def test_layers_match_finite_differences(make_layer, x_shape):
    rng = np.random.default_rng(9)
    layer = make_layer()
    params = random_params(layer, rng, jax.random.PRNGKey(2))
    (x,) = random_arrays(rng, x_shape)
    d_y = jnp.asarray(rng.standard_normal(layer.forward(params, x)[0].shape))
    assert_within(f"{type(layer).__name__} vs finite differences",
                  layer_errors_vs_finite_differences(layer, params, x, d_y), FINITE_DIFFERENCE_BOUND)


def test_fused_gradient_equals_softmax_then_cross_entropy_without_clipping():
    rng = np.random.default_rng(10)
    logits = jnp.asarray(rng.standard_normal((4, 10)) * 3)
    targets = jax.nn.one_hot(jnp.asarray([3, 0, 9, 5]), 10, dtype=F64)
    fused_loss, fused_cache = SoftmaxCrossEntropy().forward(logits, targets)
    probabilities, softmax_cache = Softmax().forward({}, logits)
    loss, cache = CategoricalCrossEntropy().forward(probabilities, targets)
    d_logits, _ = Softmax().backward({}, softmax_cache, CategoricalCrossEntropy().backward(cache))
    assert relative_error(fused_loss, loss) <= 1e-14
    assert relative_error(SoftmaxCrossEntropy().backward(fused_cache), d_logits) <= 1e-12
    np.testing.assert_allclose(SoftmaxCrossEntropy().backward(fused_cache),
                               (probabilities - targets) / 4, rtol=1e-12, atol=1e-15)


def test_fused_gradient_differs_where_clipping_is_active():
    """Sample 0: the target's probability is ~1e-13 < eps, clipped up to 1e-7. Sample 1: the target's
    probability rounds to 1 > 1 - eps, clipped down. In both the original's gradient -y / clip(p)
    is not the derivative of the clipped loss, and the chained result departs from p - y."""
    logits = jnp.asarray([[0.0, 30.0, 0, 0], [40.0, 0, 0, 0]])
    targets = jnp.asarray([[1.0, 0, 0, 0], [1.0, 0, 0, 0]])
    p, softmax_cache = Softmax().forward({}, logits)
    _, cache = CategoricalCrossEntropy().forward(p, targets)
    chained, _ = Softmax().backward({}, softmax_cache, CategoricalCrossEntropy().backward(cache))
    fused = SoftmaxCrossEntropy().backward(SoftmaxCrossEntropy().forward(logits, targets)[1])
    np.testing.assert_allclose(fused, (p - targets) / 2, rtol=1e-12)
    # Sample 0: fused says about -1/2 for the target logit; chained says p(p - 1) / 1e-7 / 2, tiny.
    assert float(fused[0, 0]) == pytest.approx(-0.5, rel=1e-9)
    assert float(chained[0, 0]) == pytest.approx(float(p[0, 0] * (p[0, 0] - 1) / 1e-7 / 2), rel=1e-9)
    assert abs(float(chained[0, 0])) < 1e-5
    # Sample 1: the chained gradient is scaled by p / (1 - 1e-7) > 1, off by about 1e-7 relative.
    assert relative_error(chained[1], fused[1]) > 1e-8


# Deliberate ties: every 2x2 window below has its maximum at least twice.
TIED_INPUT = [[1, 1, 0, 2],
              [0, 1, 2, 2],
              [3, 0, 5, 4],
              [0, 3, 1, 5]]


def pool_forward_and_backward(layer, image, d_y):
    """One channel, one sample: the pooled image and the gradient the backward sends to the image."""
    def forward_and_backward(x, d_y):
        y, cache = layer.forward({}, x)
        return y, layer.backward({}, cache, d_y)[0]

    y, d_x = quick_jit(forward_and_backward, jnp.asarray(image, F64)[None, :, :, None],
                       jnp.asarray(d_y, F64)[None, :, :, None])
    return y[0, :, :, 0], d_x[0, :, :, 0]


@pytest.mark.parametrize("kind", [MaxPool, FastMaxPool])
@pytest.mark.parametrize("ties, expected", [
    # "first": the first maximum in row-major order inside each window takes the whole gradient.
    ("first", [[1, 0, 0, 2],
               [0, 0, 0, 0],
               [3, 0, 4, 0],
               [0, 0, 0, 0]]),
    # "all": every position equal to its window's maximum takes the whole gradient.
    ("all", [[1, 1, 0, 2],
             [0, 1, 2, 2],
             [3, 0, 4, 0],
             [0, 3, 0, 4]]),
])
def test_max_pool_tie_rules_tiled(kind, ties, expected):
    y, d_x = pool_forward_and_backward(kind(2, 2, ties), TIED_INPUT, [[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(y, [[1, 2], [3, 5]])
    np.testing.assert_array_equal(d_x, expected)


@pytest.mark.parametrize("kind", [MaxPool, FastMaxPool])
@pytest.mark.parametrize("ties, expected", [
    # Windows over columns 0-1 and 1-2, both with maximum 1; column 1 is in both.
    ("first", [[1, 10, 0], [0, 0, 0]]),
    ("all", [[1, 11, 10], [0, 0, 0]]),
])
def test_max_pool_tie_rules_overlapping(kind, ties, expected):
    y, d_x = pool_forward_and_backward(kind(2, 1, ties), [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], [[1.0, 10.0]])
    np.testing.assert_array_equal(y, [[1, 1]])
    np.testing.assert_array_equal(d_x, expected)


def test_parameter_shapes_and_init():
    conv = Convolutional((1, 28, 28), 3, 5, tied_biases=False, weight_init="normal")
    params = conv.init(jax.random.PRNGKey(0))
    assert params["weights"].shape == (5, 1, 3, 3) and params["biases"].shape == (5, 26, 26)
    assert params["weights"].dtype == jnp.float32
    np.testing.assert_array_equal(params["weights"], jax.random.normal(jax.random.PRNGKey(0), (5, 1, 3, 3),
                                                                       jnp.float32))
    assert Convolutional((3, 9, 7), 3, 4, padding=1, stride=2).init(jax.random.PRNGKey(0))["biases"].shape == (4,)
    assert Convolutional((3, 9, 7), 3, 4, padding=1, stride=2).output_shape((3, 9, 7)) == (4, 5, 4)
    dense = Dense(845, 64).init(jax.random.PRNGKey(0))
    assert dense["weights"].shape == (845, 64) and dense["biases"].shape == (64,)
    assert float(jnp.std(dense["weights"])) == pytest.approx((2 / (845 + 64)) ** 0.5, rel=0.02)
    with pytest.raises(ValueError, match="does not fit"):
        Convolutional((1, 4, 4), 5, 2)


@pytest.mark.parametrize("layer, input_shape", [
    (Convolutional((3, 11, 9), 3, 4, padding=1, stride=2), (3, 11, 9)),
    (Convolutional((1, 28, 28), 5, 6, padding=2), (1, 28, 28)),
    (Convolutional((2, 7, 7), 1, 2, tied_biases=False), (2, 7, 7)),
    (MaxPool(2, 2), (5, 26, 26)),
    (MaxPool(3, 2), (4, 11, 8)),
    (MaxPool(2, 3), (1, 9, 10)),
    (ReLU(), (5, 26, 26)),
    (ReLU(), (64,)),
    (Tanh(scaled=True), (6, 28, 28)),
    (AvgPool(2, 2), (6, 28, 28)),
    (AvgPool(3, 2), (4, 11, 8)),
    (Flatten(), (5, 13, 13)),
    (Dense(845, 64), (845,)),
    (Softmax(), (10,)),
])
def test_every_layer_reports_the_shape_its_forward_returns(layer, input_shape):
    """One interface: output_shape(input shape of one sample) is the shape forward returns for it,
    batch axis aside (last for feature maps, first for feature vectors)."""
    params = jax.eval_shape(lambda: layer.init(jax.random.PRNGKey(0), F64))
    batch = 3
    x_shape = input_shape + (batch,) if len(input_shape) == 3 else (batch,) + input_shape
    y = jax.eval_shape(lambda params, x: layer.forward(params, x)[0], params, jax.ShapeDtypeStruct(x_shape, F64))
    sample_shape = y.shape[1:] if len(y.shape) == 2 else y.shape[:-1]
    assert sample_shape == layer.output_shape(input_shape)


def test_dense_refuses_an_input_of_the_wrong_size():
    with pytest.raises(ValueError, match="takes 845 features"):
        Dense(845, 64).output_shape((846,))


def fast_and_plain_cases(count, seed):
    """Random convolutions of every path the fast form takes (one sample, one channel at most 3x3,
    the banded products), each with its plain twin, parameters and inputs."""
    rng = np.random.default_rng(seed)
    for c in conv_configs(count, seed=seed):
        fast, params, x, d_y = conv_case(c, rng, FastConvolutional)
        yield c, fast, make_conv(c), params, x, d_y


def test_fast_convolution_equals_the_plain_form():
    """FastConvolutional (XLA's convolution, im2col in row blocks, banded products, the per-offset
    products, dx one axis at a time) against Convolutional's three products with the im2col matrix
    and col2im (THEORY.md §4.4): the same sums, so equal up to float64 rounding."""
    paths = set()
    for c, fast, plain, params, x, d_y in fast_and_plain_cases(10, seed=11):
        paths.add("one sample" if c["N"] == 1 else "im2col" if c["C"] == 1 and c["K"] <= 3 else "banded")
        ours, theirs = (quick_jit(lambda p, x, d_y: (layer.forward(p, x)[0],) + layer.backward(p, x, d_y), params,
                                  x, d_y) for layer in (fast, plain))
        for name, a, b in [("y", ours[0], theirs[0]), ("d_x", ours[1], theirs[1]),
                           ("d_weights", ours[2]["weights"], theirs[2]["weights"]),
                           ("d_biases", ours[2]["biases"], theirs[2]["biases"])]:
            assert relative_error(a, b) <= 1e-12, (c, name)
    assert paths == {"one sample", "im2col", "banded"}


@pytest.mark.parametrize("window, stride", [(2, 2), (3, 3), (2, 1), (3, 2), (2, 3)])  # tiling, overlapping, gaps
@pytest.mark.parametrize("ties", ["first", "all"])
def test_fast_max_pool_equals_the_plain_form(window, stride, ties):
    """FastMaxPool (XLA's reduction, the first maximum by a min over slice numbers, interleaving for
    tiling windows) against MaxPool's stacked slices and argmax, on small integers, so that windows
    tie often and the tie rules are compared too: equal to the last bit."""
    rng = np.random.default_rng(window * 10 + stride)
    for C, H, W, N in [(1, 5, 5, 1), (3, 7, 6, 2), (2, 9, 13, 3)]:
        x = jnp.asarray(rng.integers(0, 3, (C, H, W, N)), F64)
        d_y = jnp.asarray(rng.standard_normal(MaxPool(window, stride).output_shape((C, H, W)) + (N,)))
        fast, plain = (quick_jit(lambda x, d_y: (layer.forward({}, x)[0], layer.backward({}, x, d_y)[0]), x, d_y)
                       for layer in (FastMaxPool(window, stride, ties), MaxPool(window, stride, ties)))
        np.testing.assert_array_equal(fast[0], plain[0])
        np.testing.assert_array_equal(fast[1], plain[1])


@pytest.mark.parametrize("kind", ["modern", "original", "lenet", "lenet1998"])
def test_network_gradients_match_autodiff(kind):
    """loss_and_gradients of the whole network (float64) against jax.grad of the same forward pass:
    every parameter's gradient, and the input's, which training never reads (THEORY.md §4.7)."""
    network = model.build_network(kind)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64),
                                    network.init(jax.random.PRNGKey(3)))
    # Non-zero biases everywhere, so every bias gradient is exercised.
    params = [{name: value + 0.1 * rng.standard_normal(value.shape) for name, value in layer.items()}
              for layer in params]
    # Dim images (pixels in [0, 0.3]) keep the original network's N(0, 1) weights from saturating
    # the softmax: where clipping is active its gradient departs from the exact one by design (loss.py).
    x = jnp.asarray(0.3 * rng.random((1, 28, 28, 3)))
    labels = jnp.asarray([3, 7, 0])
    if kind == "original":
        target_probabilities = network.forward(params, x)[0][jnp.arange(3), labels]
        assert jnp.all((target_probabilities > 1e-3) & (target_probabilities < 1 - 1e-3))

    def loss_only(params, x):
        output, _ = network.forward(params, x)
        return network.loss.forward(output, jax.nn.one_hot(labels, 10, dtype=jnp.float64))[0]

    loss, d_x, grads = quick_jit(network.loss_and_gradients, params, x, labels)
    reference_loss, (reference, reference_d_x) = quick_jit(jax.value_and_grad(loss_only, argnums=(0, 1)), params, x)
    assert relative_error(loss, reference_loss) <= 1e-13
    for index, (ours, theirs) in enumerate(zip(grads, reference)):
        assert set(ours) == set(theirs)
        for name in ours:
            error = relative_error(ours[name], theirs[name])
            print(f"{kind} layer {index} ({type(network.layers[index]).__name__}) {name}: {error:.1e}")
            assert error <= 1e-9, (kind, index, name, error)
    error = relative_error(d_x, reference_d_x)
    print(f"{kind} input: {error:.1e}")
    assert d_x.shape == x.shape and error <= 1e-9, error


def avg_pool_naive(x, window, stride):
    """y and, for an upstream d_y, d_x of average pooling, by loops over every index (numpy)."""
    C, H, W, N = x.shape
    H_out, W_out = (H - window) // stride + 1, (W - window) // stride + 1
    y = np.zeros((C, H_out, W_out, N))
    for c, h, w, n in np.ndindex(C, H_out, W_out, N):
        y[c, h, w, n] = x[c, stride * h:stride * h + window, stride * w:stride * w + window, n].mean()
    return y


def avg_pool_backward_naive(x_shape, d_y, window, stride):
    d_x = np.zeros(x_shape)
    for c, h, w, n in np.ndindex(*d_y.shape):
        d_x[c, stride * h:stride * h + window, stride * w:stride * w + window, n] += d_y[c, h, w, n] / window ** 2
    return d_x


@pytest.mark.parametrize("window, stride", [(1, 1), (2, 2), (3, 3), (2, 1), (3, 2), (5, 3), (2, 3), (4, 1)])
def test_avg_pool_matches_vjp_and_naive_loops(window, stride):
    """Windows 1 to 5, strides 1 to 3, overlapping (stride < window), tiling and with gaps, sizes
    that leave a remainder, several channels: against jax.vjp (float64) and the loops above."""
    rng = np.random.default_rng(window * 10 + stride)
    layer, worst = AvgPool(window, stride), {}
    for C, H, W, N in [(1, 5, 5, 1), (3, 7, 6, 2), (2, 9, 13, 3)]:
        (x,) = random_arrays(rng, (C, H, W, N))
        d_y = jnp.asarray(rng.standard_normal(layer.output_shape((C, H, W)) + (N,)))
        errors = layer_errors_vs_vjp(layer, {}, x, d_y)
        for array, error in errors.items():
            worst[array] = max(worst.get(array, 0.0), error)
            assert error <= VJP_BOUND, (window, stride, x.shape, array, error)
        y, d_x = quick_jit(lambda x, d_y: (layer.forward({}, x)[0], layer.backward({}, layer.forward({}, x)[1], d_y)[0]),
                           x, d_y)
        assert relative_error(y, avg_pool_naive(np.asarray(x), window, stride)) <= 1e-12
        assert relative_error(d_x, avg_pool_backward_naive(x.shape, np.asarray(d_y), window, stride)) <= 1e-12
    report(f"AvgPool({window},{stride}) vs jax.vjp", worst)
