"""FP8 (e4m3) linear layers (issue: dense step + FP8): quantisation bounds, the FP8 matmul against float32, and a
quantised transformer sampling close to its float32 original (CPU; speed is measured on the GPU)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiny_runs import tiny_run

from ditfa_jax import sample
from ditfa_jax.denoise import prepare_run
from ditfa_jax.fp8 import (E4M3, E4M3_MAX, dequantize, fp8_layers, fp8_matmul, quantize, quantize_kernel,
                           quantize_transformer)


def test_round_trip_error_is_bounded_per_slice():
    x = jax.random.normal(jax.random.key(0), (64, 32)) * jnp.logspace(-3, 3, 32)  # columns of very different size
    q, scale = quantize(x, axis=0)
    assert q.dtype == E4M3 and scale.shape == (1, 32)
    err = np.abs(np.asarray(dequantize(q, scale)) - np.asarray(x))
    # e4m3: 3 mantissa bits (relative step 1/8, rounding 1/16), subnormals below 2^-6 of the scale's 448
    bound = np.abs(np.asarray(x)) / 16 + np.asarray(scale) * 2.0 ** -10
    assert (err <= bound * (1 + 1e-6)).all()
    assert np.abs(np.asarray(q.astype(jnp.float32))).max(0).min() == E4M3_MAX  # each column's amax maps to 448


def test_saturating_and_zero_inputs_stay_finite():
    x = jnp.array([[0.0, 0.0], [1e30, -3e38], [1e-30, 5.0]], jnp.float32)
    q, scale = quantize(x, axis=0)
    back = np.asarray(dequantize(q, scale))
    assert np.isfinite(back).all() and np.isfinite(np.asarray(q.astype(jnp.float32))).all()
    np.testing.assert_allclose(back[1], [1e30, -3e38], rtol=1 / 16)
    zero_q, zero_scale = quantize(jnp.zeros((4, 3)), axis=-1)
    assert (np.asarray(zero_scale) == 1).all() and (np.asarray(zero_q.astype(jnp.float32)) == 0).all()


def test_fp8_matmul_against_float32():
    x = jax.random.normal(jax.random.key(1), (2, 48, 256))
    w = jax.random.normal(jax.random.key(2), (256, 128)) * 0.05
    wq, ws = quantize_kernel(w)
    assert wq.shape == (128, 256) and ws.shape == (128,)  # [out, in]: the contracted axis minor, as FP8 GEMMs read
    np.testing.assert_allclose(np.asarray(dequantize(wq, ws[:, None])).T, np.asarray(w), rtol=1 / 16, atol=1e-6)
    y = fp8_matmul(x, wq, ws)
    ref = x @ w
    assert y.dtype == jnp.float32 and np.isfinite(np.asarray(y)).all()
    assert float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref)) < 0.05
    big = fp8_matmul(x * 1e4, wq, ws)  # activations far beyond 448: scaled, not saturated
    assert float(jnp.linalg.norm(big - ref * 1e4) / jnp.linalg.norm(ref * 1e4)) < 0.05


@pytest.mark.parametrize("name", ["flux_dev", "sd35_medium"])
def test_quantised_transformer_samples_close_to_float32(name):
    model, text, common = tiny_run(name, 3)
    fp8 = quantize_transformer(model)
    names = fp8_layers(fp8.module())
    assert names and all("norm" not in n for n in names) and any(n.endswith("to_q") for n in names)
    kernels = {str(k): v.dtype for k, v in jax.tree_util.tree_leaves_with_path(fp8.state)}
    assert sum(d == E4M3 for d in kernels.values()) == len(names) and fp8.dtype == model.dtype
    run = prepare_run(model.config, *text, vae_scale_factor=8, dtype=model.dtype, **common)
    noise = jax.random.normal(jax.random.key(0), (text[0].shape[0], *run.latent_shape), jnp.float32)
    ref = np.asarray(sample(model, noise, *text, **common))
    out = np.asarray(sample(fp8, noise, *text, **common))
    assert np.isfinite(out).all() and np.abs(out - ref).max() > 0  # the FP8 path ran
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.1
    with pytest.raises(ValueError, match="FP8 already"):
        quantize_transformer(fp8)
    some = quantize_transformer(model, layers=names[:2])
    assert sum(a.dtype == E4M3 for a in jax.tree_util.tree_leaves(some.state)) == 2
    with pytest.raises(ValueError, match=r"unknown layers \['stack0/nope'\]"):
        quantize_transformer(model, layers=["stack0/nope"])


def test_cli_generate_fp8_records_it(tmp_path):
    from pathlib import Path

    from PIL import Image

    from ditfa_jax.cli import main as cli_main

    tiny = Path(__file__).parent / "fixtures" / "pipelines" / "sd3_tiny"
    args = ["generate", str(tiny), "--prompt", "a red fox", "--steps", "2", "--height", "64", "--width", "64"]
    assert cli_main(args + ["--out", str(tmp_path / "f8"), "--seed", "1", "--fp8"]) == 0
    meta = json.loads(Image.open(tmp_path / "f8" / "image_000.png").text["parameters"])
    assert meta["fp8"]["format"] == "e4m3" and meta["fp8"]["layers"] > 0  # (without --fp8: None, test_pipelines)
