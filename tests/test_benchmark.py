"""benchmarks/speed.py in its --quick mode must keep running, and every side's step must agree with ours;
benchmarks/pytorch_lenet.py without PyTorch says so in one line."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import speed  # noqa: E402
import model  # noqa: E402
from data import load_idx  # noqa: E402


def test_benchmark_refuses_an_output_it_could_not_write_before_timing(tmp_path, capsys):
    for out, fragment in [(tmp_path, "is a folder; give a file name"),
                          (tmp_path / "file" / "results.json", "is a file, so no folder can be made there")]:
        (tmp_path / "file").write_text("")
        with pytest.raises(SystemExit):
            speed.main(["--out", str(out)])
        assert fragment in capsys.readouterr().err


def test_quick_benchmark_runs_and_writes_results(tmp_path, capsys):
    out = tmp_path / "results.json"
    speed.main(["--quick", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["quick"] is True
    assert [row["batch_size"] for row in results["training_step"]] == [8]
    for row in results["training_step"]:
        for side in ("ours", "jax_grad_same_layout", "jax_grad_batch_first"):
            assert row[side]["samples_per_second"] > 0, side
        assert row["time_ratio_ours_over_jax_grad_same_layout"] > 0 and row["time_ratio_ours_over_jax_grad_batch_first"] > 0
    lenet = results["lenet_training_step"]
    assert lenet["batch_size"] == 8 and lenet["time_ratio_ours_over_jax_grad_nhwc"] > 0
    assert lenet["ours"]["milliseconds_per_step"] > 0 and lenet["jax_grad_nhwc"]["milliseconds_per_step"] > 0
    assert {"cpu", "cores", "jax_version", "device"} <= set(results["machine"])
    assert results["whole_runs"]["seed_preset_train_seconds"] > 0
    assert results["lenet_variants"] == {}  # timed only in a full run
    printed = capsys.readouterr().out
    assert "ours/same layout" in printed and "per 3,000-image epoch at batch 32 " in printed, printed


def test_lenet_variants_take_turns(mnist):
    """The LeNet-5 variants' epochs taking turns (one short epoch each): what a full run reports."""
    variants = speed.lenet_variants(mnist, epochs=1, train_size=256)
    assert sorted(variants) == ["lenet", "lenet1998"] and variants["lenet"]["ratio_to_lenet"] == 1
    assert variants["lenet1998"]["median_epoch_seconds"] > 0


@pytest.mark.parametrize("kind, peer", [("modern", speed.same_layout_loss_and_grads),
                                        ("modern", speed.batch_first_loss_and_grads),
                                        ("lenet", speed.lenet_peer_loss_and_grads)])
def test_our_step_and_the_jax_grad_step_agree(kind, peer):
    """Same loss and same updated parameters after one SGD step on one batch (float32), against
    every peer: the benchmark times the same computation on both sides."""
    network = model.build_network(kind)
    params = network.init(jax.random.PRNGKey(1))
    # Real digits: their blank background with zero biases puts pre-activations exactly at 0, where
    # the peers must take ReLU's derivative as the layers do.
    train_images, train_labels, _, _ = load_idx(os.path.join(ROOT, "data"))
    images, labels = jnp.asarray(train_images[:16]), jnp.asarray(train_labels[:16], jnp.int32)
    loss_error, param_error = speed.same_step(network, params, images, labels, peer)
    assert loss_error < 1e-6 and param_error < 1e-6, (loss_error, param_error)
    # And the step changed the parameters at all (so the comparison above is not vacuous).
    stepped, _ = speed.make_run(speed.ours_loss_and_grads(network))(params, images[None, :8], labels[None, :8])
    assert float(jnp.max(jnp.abs(stepped[-1]["weights"] - params[-1]["weights"]))) > 1e-6


def test_pytorch_benchmark_without_pytorch_says_so_in_one_line():
    """benchmarks/pytorch_lenet.py needs PyTorch, which the project does not install: without it, one
    line saying how to get it (torch is hidden from the run, so this holds where it is installed too)."""
    script = os.path.join(ROOT, "benchmarks", "pytorch_lenet.py")
    hide_torch = f"import sys, runpy; sys.modules['torch'] = None; sys.argv = [{script!r}]; runpy.run_path({script!r}, run_name='__main__')"
    result = subprocess.run([sys.executable, "-c", hide_torch], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "benchmarks/pytorch_lenet.py compares with PyTorch, which is not installed: pip install torch"]
