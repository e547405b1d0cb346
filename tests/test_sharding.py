"""The mesh, its checks and plan-aware head balancing (`ditfa_jax.sharding`, issue 19), in this one-device process;
the sharded sampler and calibration on 8 CPU devices run `test_multi_device.py` in a subprocess."""

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiny_runs import tiny_run

from ditfa_jax import sample, sharding
from ditfa_jax.plan import CompressionPlan

HERE = Path(__file__).parent


def test_multi_device_suite():
    """`test_multi_device.py` on 8 CPU devices (meshes over all 8 and over 4 of them): every test runs (none
    skipped) and passes."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    argv = [sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider",
            str(HERE / "test_multi_device.py")]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=HERE.parent)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary, summary


def test_balance_heads_is_a_permutation_that_evens_out_the_devices():
    rng = np.random.default_rng(0)
    costs = rng.choice([0.0, 1.0, 0.2, 0.35], size=(6, 5, 24))
    costs[0, 0] = [1.0] * 6 + [0.0] * 18  # the model's order puts all work on the first device of four
    for shards in (2, 3, 4, 8):
        order = sharding.balance_heads(costs, shards)
        assert order.shape == costs.shape and order.dtype == np.int32
        assert (np.sort(order, axis=-1) == np.arange(24)).all()
        before = sharding.device_loads(costs, None, shards).max(-1)
        after = sharding.device_loads(costs, order, shards).max(-1)
        assert (after <= before + 1e-12).all()
        np.testing.assert_allclose(sharding.device_loads(costs, order, shards).sum(-1), costs.sum(-1))
        assert 1.0 <= sharding.imbalance(costs, order, shards) < sharding.imbalance(costs, None, shards)
    np.testing.assert_allclose(sharding.device_loads(costs, sharding.balance_heads(costs, 4), 4)[0, 0], [2, 2, 1, 1])
    with pytest.raises(ValueError, match="24 heads do not split into 5 equal blocks"):
        sharding.balance_heads(costs, 5)


@pytest.mark.parametrize("text, want", [("4", (1, 4)), ("2x4", (2, 4)), (" 8 X 1 ", (8, 1))])
def test_parse_devices(text, want):
    assert sharding.parse_devices(text) == want


@pytest.mark.parametrize("text", ["0", "2x", "x4", "two", "2x0", "-1"])
def test_parse_devices_refuses(text):
    with pytest.raises(ValueError, match="expected N .* or DxH"):
        sharding.parse_devices(text)


def test_make_mesh_refusals():
    with pytest.raises(ValueError, match=r"data 2 x heads 4 needs 8 devices; 1 are available \(1 x cpu \(cpu\)\)"):
        sharding.make_mesh(2, 4)
    with pytest.raises(ValueError, match="heads axis: expected an integer >= 1, got 0"):
        sharding.make_mesh(1, 0)
    kinds = [SimpleNamespace(platform="gpu", device_kind="NVIDIA H200"),
             SimpleNamespace(platform="gpu", device_kind="NVIDIA H100")]
    with pytest.raises(ValueError, match=r"all be of one kind; got 1 x NVIDIA H200 \(gpu\), 1 x NVIDIA H100"):
        sharding.make_mesh(1, 2, devices=kinds)


def test_one_device_mesh_is_the_single_device_program():
    model, text, common = tiny_run("sd35_medium", 3, dtype=jnp.float32)
    noise = jax.random.normal(jax.random.key(0), (2, 4, common["height"] // 8, common["width"] // 8), jnp.float32)
    full = CompressionPlan.full(model.config, height=common["height"], width=common["width"],
                                text_len=text[0].shape[1], num_steps=3, vae_scale_factor=8)
    windows = np.asarray(full.head_window).copy()
    windows[1:, ::2, 0] = 0
    plan = full.replace(head_window=windows)
    mesh = sharding.make_mesh(1, 1)
    for p in (None, plan):
        np.testing.assert_array_equal(np.asarray(sample(model, noise, *text, plan=p, mesh=mesh, **common)),
                                      np.asarray(sample(model, noise, *text, plan=p, **common)))
    with pytest.raises(ValueError, match=r"mesh axes \('x',\): expected \('data', 'heads'\)"):
        sample(model, noise, *text, mesh=jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",)), **common)
