"""benchmarks/speed.py in its --quick mode: it must keep running, and its two steps must agree."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import speed  # noqa: E402
import model  # noqa: E402


def test_quick_benchmark_runs_and_writes_results(tmp_path, capsys):
    out = tmp_path / "results.json"
    speed.main(["--quick", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["quick"] is True
    assert [row["batch_size"] for row in results["training_step"]] == [1, 32, 128]
    for row in results["training_step"]:
        assert row["ours"]["samples_per_second"] > 0 and row["jax_grad"]["samples_per_second"] > 0
    assert {"cpu", "cores", "jax_version", "device"} <= set(results["machine"])
    assert results["whole_runs"]["seed_preset_train_seconds"] > 0
    assert "ours/peer" in capsys.readouterr().out


def test_our_step_and_the_jax_grad_step_agree():
    """Same loss and same updated parameters after one SGD step on one batch (float32)."""
    network = model.build_network("modern")
    params = network.init(jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (16, 28, 28)), jnp.uint8)
    labels = jnp.asarray(rng.integers(0, 10, 16), jnp.int32)
    loss_error, param_error = speed.same_step(network, params, images, labels)
    assert loss_error < 1e-6 and param_error < 1e-6, (loss_error, param_error)
    # And the step changed the parameters at all (so the comparison above is not vacuous).
    stepped, _ = speed.make_run(speed.ours_loss_and_grads(network))(params, images[None], labels[None])
    assert float(jnp.max(jnp.abs(stepped[4]["weights"] - params[4]["weights"]))) > 1e-6
