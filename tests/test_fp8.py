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
    half = fp8_matmul(x, wq, ws, gemm_dtype=jnp.bfloat16)  # the GEMM's output rounded to bf16 before the scales
    assert half.dtype == jnp.float32 and 0 < float(jnp.abs(half - y).max()) <= 2 ** -8 * float(jnp.abs(y).max())


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
    assert meta["fp8"]["format"] == "e4m3" and len(meta["fp8"]["layers"]) > 0  # (without: None, test_pipelines)


def test_select_layers_by_role_or_path():
    from ditfa_jax.fp8 import select_layers

    model, _, _ = tiny_run("flux_dev", 2)
    module = model.module()
    names = fp8_layers(module)
    assert select_layers(module, "all") == names
    to_q = select_layers(module, "attn/to_q")
    assert to_q and all(n.endswith("/attn/to_q") for n in to_q) and len({n.split("/")[0] for n in to_q}) == len(to_q)
    assert select_layers(module, f"{names[0]}, attn/to_q") == list(dict.fromkeys([names[0], *to_q]))
    with pytest.raises(ValueError, match=r"'attn/to_z' is not a layer of this model; expected 'all', or roles "
                                         r"from \[.*'attn/to_q'"):
        select_layers(module, "attn/to_q,attn/to_z")
    with pytest.raises(ValueError, match="no layer named"):
        select_layers(module, " , ")


def test_calibrated_plan_records_its_fp8_layers_and_needs_them():
    """A plan calibrated on a model with FP8 layers records them; sampling it needs exactly those layers in FP8
    (the errors were measured with them), a plan without them takes any model."""
    from ditfa_jax.calibrate import calibrate
    from ditfa_jax.fp8 import quantized_layers, select_layers

    model, text, common = tiny_run("flux_dev", 3)
    layers = select_layers(model.module(), "attn/to_q,ff/net_2")
    fp8 = quantize_transformer(model, layers)
    assert sorted(quantized_layers(fp8.module())) == sorted(layers) and quantized_layers(model.module()) == []
    plan = calibrate(fp8, *text, delta=0.5, progress=False, **common).plan
    assert plan.fp8_layers == tuple(sorted(layers))
    assert calibrate(model, *text, delta=0.5, progress=False, **common).plan.fp8_layers is None
    run = prepare_run(model.config, *text, vae_scale_factor=8, dtype=model.dtype, **common)
    noise = jax.random.normal(jax.random.key(0), (text[0].shape[0], *run.latent_shape), jnp.float32)
    out = np.asarray(sample(fp8, noise, *text, plan=plan, **common))
    assert np.isfinite(out).all()
    with pytest.raises(ValueError, match=r"calibrated with FP8 in \d+ layers .*not FP8 in the model.*"
                                         r"quantize_transformer\(model, plan.fp8_layers\)"):
        sample(model, noise, *text, plan=plan, **common)
    with pytest.raises(ValueError, match=r"FP8 layers the plan does not name"):
        sample(quantize_transformer(model), noise, *text, plan=plan, **common)
    sample(fp8, noise, *text, plan=plan.replace(fp8_layers=None), **common)  # a bf16 plan on an FP8 model: allowed


def test_cli_fp8_travels_in_the_plan(tmp_path, capsys):
    """`calibrate --fp8 ROLES` writes the layers into the plan; `generate --plan` then runs them (PNG metadata)
    without being told; a --fp8 that contradicts the plan is an error naming both, before any image is written."""
    from pathlib import Path

    from PIL import Image

    from ditfa_jax.cli import main as cli_main
    from ditfa_jax.plan import CompressionPlan

    tiny = Path(__file__).parent / "fixtures" / "pipelines" / "flux_tiny"
    plan_path = tmp_path / "plan.json"
    assert cli_main(["calibrate", str(tiny), "--out", str(plan_path), "--height", "64", "--width", "64", "--steps",
                     "2", "--prompts", "1", "--text-len", "8", "--delta", "1.0", "--fp8", "attn/to_q"]) == 0
    plan = CompressionPlan.load(plan_path)
    assert plan.fp8_layers and all(n.endswith("attn/to_q") for n in plan.fp8_layers)
    out = tmp_path / "images"
    assert cli_main(["generate", str(tiny), "--prompt", "a fox", "--plan", str(plan_path), "--out", str(out)]) == 0
    meta = json.loads(Image.open(out / "image_000.png").text["parameters"])
    assert meta["fp8"]["layers"] == list(plan.fp8_layers) and meta["plan"]["digest"] == plan.digest()
    capsys.readouterr()
    assert cli_main(["generate", str(tiny), "--prompt", "a fox", "--plan", str(plan_path), "--fp8",
                     "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert f"--fp8 all conflicts with the plan {plan_path}" in err and "Traceback" not in err
    assert not (tmp_path / "other").exists()
    assert cli_main(["generate", str(tiny), "--prompt", "a fox", "--fp8", "attn/to_z",
                     "--out", str(tmp_path / "other")]) == 2
    assert "'attn/to_z' is not a layer of this model" in capsys.readouterr().err


@pytest.mark.parametrize("quantized", [False, True])
def test_linear_rows_split_the_layer_by_its_inputs(quantized):
    """`Linear.rows` over a split of the input features sums to the layer's output (the FLUX single block's out
    projection, split into its attention and MLP parts for cached MLP branches): float32 tight, FP8 within its
    per-token quantisation error."""
    from flax import nnx

    from ditfa_jax.models.layers import linear

    layer = linear(40, 24, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (2, 7, 40))
    want = layer(x)
    if quantized:
        values, scale = quantize_kernel(layer.kernel.get_value())
        layer.kernel, layer.kernel_scale = nnx.Param(values), nnx.Param(scale)
    got = layer.rows(x[..., :8], 0, 8, bias=True) + layer.rows(x[..., 8:], 8, 40, bias=False)
    assert got.dtype == want.dtype and got.shape == want.shape
    if quantized:
        assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 0.05
        np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(layer.rows(x, 0, 40, bias=True)), rtol=1e-6)
    else:
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
