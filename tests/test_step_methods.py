"""Step reuse, Taylor extrapolation, block-residual and MLP-branch caching in the sampler, each against a direct
re-computation written out plainly here (tiny FLUX-dev and SD3.5-medium checkpoints, fp32, CPU; issue 17)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tiny_runs import tiny_run

from ditfa_jax import sample
from ditfa_jax.attention import AttentionSettings
from ditfa_jax.denoise import VelocityHistory, embed, guided_velocity, prepare_run
from ditfa_jax.attention import joint_attention
from ditfa_jax.models.layers import block_forward
from ditfa_jax.plan import CompressionPlan
STEPS = 6


@pytest.fixture(scope="module", params=["flux_dev", "sd35_medium"])
def setup(request):
    model, text, common = tiny_run(request.param, STEPS, dtype=jnp.float32)
    side = common["height"]
    run = prepare_run(model.config, *text, vae_scale_factor=8, dtype=model.dtype,
                      **{k: v for k, v in common.items()})
    noise = jax.random.normal(jax.random.key(5), (text[0].shape[0], *run.latent_shape), jnp.float32)
    full = CompressionPlan.full(model.config, height=side, width=side, text_len=text[0].shape[1],
                                num_steps=STEPS, vae_scale_factor=8)
    return model, text, common, run, noise, full


def _layers(module):
    """(stack index, block) for every block in run order, each block its own NNX module (sliced from the stack)."""
    out = []
    for index, (stack, _, count) in enumerate(module.stacks()):
        graphdef, state = nnx.split(stack)
        for i in range(count):
            out.append((index, nnx.merge(graphdef, jax.tree_util.tree_map(lambda a, i=i: a[i], state))))
    return out


def _block_with_mlp(block, carry, temb, rope, layout, cached):
    """One block written out: attention, its output projections, then the MLP branch computed (``cached`` None) or
    taken from ``cached``; returns (new carry, the MLP branch's value)."""
    ctx = block.prepare(carry, temb)
    q, k, v = block.qkv(ctx, rope)
    attn = joint_attention(q, k, v, text_len=layout.text_len, text_first=layout.text_first, padding=layout.padding)
    mid = block.finish_attention(carry, ctx, attn)
    value = block.mlp(mid, ctx) if cached is None else cached
    return block.add_mlp(mid, ctx, value), value


def reference(model, run, noise, step_kind, block_compute, mlp_compute=None):
    """The plain loop: each step computes (block by block, cached blocks adding their last residual, blocks with a
    cached MLP branch adding its value from the last step it ran) or reuses / extrapolates the velocities of earlier
    computed steps (Lagrange in sigma, on the host)."""
    module = nnx.merge(model.graphdef, model.state)
    family, cond, layout = run.family, run.cond, run.layout
    settings = AttentionSettings()
    blocks = _layers(module)
    x = np.asarray(noise, np.float32)
    computed, residual, mlp_value = [], {}, {}
    for i in range(len(run.sigmas) - 1):
        sigma, sigma_next = float(run.sigmas[i]), float(run.sigmas[i + 1])
        if step_kind[i] == 0:
            carry, temb = embed(module, family, cond, jnp.asarray(x), run.timesteps[i])
            stack = -1
            for layer, (index, block) in enumerate(blocks):
                if index != stack:
                    carry, stack = module.enter_stack(index, carry), index
                if mlp_compute is not None and block_compute[i, layer]:
                    out, mlp_value[layer] = _block_with_mlp(block, carry, temb, cond.rope, layout,
                                                            None if mlp_compute[i, layer] else mlp_value[layer])
                    residual[layer] = jax.tree_util.tree_map(jnp.subtract, out, carry)
                    carry = out
                elif block_compute[i, layer]:
                    out, _ = block_forward(block, carry, temb, cond.rope, None, layout, settings)
                    residual[layer] = jax.tree_util.tree_map(jnp.subtract, out, carry)
                    carry = out
                else:
                    carry = jax.tree_util.tree_map(jnp.add, carry, residual[layer])
            v = np.asarray(guided_velocity(module, cond, layout, carry, temb), np.float64)
            computed.insert(0, (sigma, v))
        else:
            order = step_kind[i] - 1
            pts = computed[:order + 1]
            v = sum(vj * np.prod([(sigma - sm) / (sj - sm) for m, (sm, _) in enumerate(pts) if m != j])
                    for j, (sj, vj) in enumerate(pts))
        x = (x + (sigma_next - sigma) * v).astype(np.float32)
    return x


CASES = {
    "reuse": ([0, 1, 0, 1, 1, 0], None),
    "taylor": ([0, 0, 2, 0, 3, 2], None),
    "blocks": ([0] * STEPS, "alternate"),  # from step 1, every other block reuses its residual
    "steps+blocks": ([0, 0, 1, 0, 2, 0], "tail"),  # the last half of the blocks cached on computed steps >= 1
    "mlps": ([0] * STEPS, "mlp alternate"),  # from step 1, every other block reuses its MLP branch
    "steps+blocks+mlps": ([0, 0, 1, 0, 2, 0], "mlp tail"),  # MLP cached in the first blocks, the last half cached
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_path_equals_direct_recomputation(setup, case):
    model, text, common, run, noise, full = setup
    kinds, pattern = CASES[case]
    layers = model.config.total_layers
    block_compute = np.ones((STEPS, layers), bool)
    if pattern == "alternate":
        block_compute[1:, 1::2] = False
    elif pattern in ("tail", "mlp tail"):
        block_compute[1:, layers // 2:] = False
        block_compute[np.asarray(kinds) != 0] = True
    mlp_compute = None
    if pattern == "mlp alternate":
        mlp_compute = np.ones((STEPS, layers), bool)
        mlp_compute[1:, ::2] = False
    elif pattern == "mlp tail":
        mlp_compute = block_compute.copy()
        mlp_compute[1:, :layers // 2] = False
        mlp_compute[np.asarray(kinds) != 0] = True
        mlp_compute |= ~block_compute
    plan = full.replace(step_kind=np.asarray(kinds, np.int8), block_compute=block_compute, mlp_compute=mlp_compute)
    got = np.asarray(sample(model, noise, *text, plan=plan, **common))
    want = reference(model, run, noise, plan.step_kind, plan.block_compute,
                     None if mlp_compute is None else plan.mlp_compute)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    dense = np.asarray(sample(model, noise, *text, **common))
    assert np.abs(got - dense).max() > 1e-3  # the method changed the result: the comparison is not trivial


def test_blocks_all_computed_is_dense(setup):
    """Block caching switched on (one cached block at the last step) but undone: every block computed equals dense."""
    model, text, common, run, noise, full = setup
    dense = np.asarray(sample(model, noise, *text, **common))
    block_compute = np.ones((STEPS, model.config.total_layers), bool)
    block_compute[-1, 0] = False
    cached = full.replace(block_compute=block_compute)
    assert cached.uses_block_caching
    assert np.abs(np.asarray(sample(model, noise, *text, plan=cached, **common)) - dense).max() > 0
    plain = cached.replace(block_compute=None)
    np.testing.assert_array_equal(np.asarray(sample(model, noise, *text, plan=plain, **common)), dense)


def test_finish_in_three_parts_is_finish(setup):
    """`finish` equals `add_mlp(mid, ctx, mlp(mid, ctx))` with `mid = finish_attention(...)` (random carry,
    conditioning and attention output): the path a plan with cached MLP branches runs. A real check for FLUX's
    single-stream blocks, whose `finish` is one fused out projection; the double-stream and SD3 blocks define
    `finish` as the three parts, so for them this only runs them (`test_parity.py` checks them against diffusers)."""
    model, *_ = setup
    module = nnx.merge(model.graphdef, model.state)
    carry0 = None
    for index, block in _layers(module):
        cfg = model.config
        shape = lambda n: (2, n, cfg.inner_dim)  # noqa: E731
        keys = iter(jax.random.split(jax.random.key(index + 7), 8))
        x, c = (jax.random.normal(next(keys), shape(n), jnp.float32) for n in (16, 5))
        carry = module.enter_stack(index, (x, c)) if index else (x, c)
        if carry0 is None:
            carry0 = carry
        temb = jax.random.normal(next(keys), (2, cfg.inner_dim), jnp.float32)
        ctx = block.prepare(carry, temb)
        attn = jax.random.normal(next(keys), (2, 21, cfg.num_attention_heads, cfg.attention_head_dim), jnp.float32)
        want = block.finish(carry, ctx, attn)
        mid = block.finish_attention(carry, ctx, attn)
        got = block.add_mlp(mid, ctx, block.mlp(mid, ctx))
        for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("setup", ["sd35_medium"], indirect=True)  # CFG; one family keeps CI short
def test_head_plan_with_reused_steps_keeps_the_cache(setup):
    """Head-wise cached heads after a reused step take the value of the last step that ran (the cache is not
    touched by a step that skips the transformer): the plan path equals a loop of single steps."""
    from ditfa_jax.denoise import velocity

    model, text, common, run, noise, full = setup
    windows = np.asarray(full.head_window).copy()
    windows[2:, :, ::2] = 0  # even heads cached from step 2
    kinds = np.array([0, 0, 1, 0, 1, 0], np.int8)
    plan = full.replace(head_window=windows, step_kind=kinds)
    got = np.asarray(sample(model, noise, *text, plan=plan, **common))
    module = nnx.merge(model.graphdef, model.state)
    settings = AttentionSettings(band=tuple(plan.band))
    cfg = model.config
    cache = jnp.zeros((cfg.total_layers, run.batch, run.layout.attention_tokens, cfg.num_attention_heads,
                       cfg.attention_head_dim), model.dtype)
    x, v = jnp.asarray(noise), None
    for i in range(STEPS):
        if kinds[i] == 0:
            v, cache, _, _ = velocity(module, run.family, run.cond, run.layout, settings, x, run.timesteps[i],
                                   jnp.asarray(windows[i]), cache)
        x = x + (run.sigmas[i + 1] - run.sigmas[i]) * v
    np.testing.assert_allclose(got, np.asarray(x), rtol=2e-4, atol=2e-4)


def test_taylor_order_zero_is_reuse():
    rng = np.random.default_rng(0)
    history = VelocityHistory.empty((2, 3))
    for sigma in (1.0, 0.8, 0.6):
        history = history.push(jnp.asarray(rng.normal(size=(2, 3)), jnp.float32), sigma)
    np.testing.assert_array_equal(history.extrapolate(0.4, 0), history.velocities[0])
    # order 1 and 2 are exact on lines and parabolas in sigma
    a, b, c = (jnp.asarray(rng.normal(size=(2, 3)), jnp.float32) for _ in range(3))
    exact = VelocityHistory.empty((2, 3))
    for s in (1.0, 0.8, 0.6):
        exact = exact.push(a + b * s + c * s * s, s)
    np.testing.assert_allclose(exact.extrapolate(0.4, 2), a + b * 0.4 + c * 0.16, rtol=1e-4, atol=1e-5)


def reference_gate(model, run, noise, first_blocks, threshold):
    """The FBCache-like gate written out: (final latents, skipped per step)."""
    module = nnx.merge(model.graphdef, model.state)
    family, cond, layout = run.family, run.cond, run.layout
    blocks = _layers(module)
    x = np.asarray(noise, np.float32)
    kept, skipped = {}, []
    for i in range(len(run.sigmas) - 1):
        carry, temb = embed(module, family, cond, jnp.asarray(x), run.timesteps[i])
        stack, fresh = -1, {}
        for layer, (index, block) in enumerate(blocks):
            if index != stack:
                carry, stack = module.enter_stack(index, carry), index
            if layer == first_blocks:
                new = sum(float(jnp.abs(a - b).sum()) for l in range(first_blocks)
                          for a, b in zip(jax.tree_util.tree_leaves(fresh[l]), jax.tree_util.tree_leaves(kept[l])))\
                    if kept else np.inf
                base = sum(float(jnp.abs(b).sum()) for l in range(first_blocks)
                           for b in jax.tree_util.tree_leaves(kept[l])) if kept else 0.0
                skip = i > 0 and base > 0 and new / base < threshold
                skipped.append(skip)
            if layer >= first_blocks and skip:
                carry = jax.tree_util.tree_map(jnp.add, carry, kept[layer])
            else:
                out, _ = block_forward(block, carry, temb, cond.rope, None, layout, AttentionSettings())
                fresh[layer] = jax.tree_util.tree_map(jnp.subtract, out, carry)
                carry = out
        if not skip:
            kept = fresh
        v = np.asarray(guided_velocity(module, cond, layout, carry, temb), np.float64)
        x = (x + (float(run.sigmas[i + 1]) - float(run.sigmas[i])) * v).astype(np.float32)
    return x, np.array(skipped)


@pytest.mark.parametrize("setup", ["flux_dev"], indirect=True)  # skipped blocks cross FLUX's stack hand-over
def test_dynamic_gate(setup):
    from ditfa_jax.denoise import DynamicGate

    model, text, common, run, noise, full = setup
    dense = np.asarray(sample(model, noise, *text, **common))
    never, skipped = sample(model, noise, *text, gate=DynamicGate(1, 0.0), **common)
    assert not skipped.any()  # threshold 0 never skips
    np.testing.assert_allclose(np.asarray(never), dense, rtol=1e-5, atol=1e-5)
    always, skipped = sample(model, noise, *text, gate=DynamicGate(1, 1e9), **common)
    assert not skipped[0] and skipped[1:].all()  # step 0 always runs everything
    want, want_skipped = reference_gate(model, run, noise, 1, 1e9)
    np.testing.assert_allclose(np.asarray(always), want, rtol=2e-4, atol=2e-4)
    # a threshold among the changes the gate sees (random tiny weights change a lot): some steps skip, others run,
    # as the written-out gate decides
    got, skipped = sample(model, noise, *text, gate=DynamicGate(1, 0.7), **common)
    want, want_skipped = reference_gate(model, run, noise, 1, 0.7)
    assert 0 < want_skipped.sum() < STEPS - 1
    np.testing.assert_array_equal(skipped, want_skipped)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("setup", ["flux_dev"], indirect=True)
def test_gate_refusals(setup):
    from ditfa_jax.denoise import DynamicGate

    model, text, common, run, noise, full = setup
    with pytest.raises(ValueError, match="first_blocks"):
        DynamicGate(0, 0.1)
    with pytest.raises(ValueError, match="threshold"):
        DynamicGate(1, -1.0)
    with pytest.raises(ValueError, match="first stack"):
        sample(model, noise, *text, gate=DynamicGate(100, 0.1), **common)
    block_compute = np.ones((STEPS, model.config.total_layers), bool)
    block_compute[2, 1] = False
    with pytest.raises(ValueError, match="use one or the other"):
        sample(model, noise, *text, plan=full.replace(block_compute=block_compute), gate=DynamicGate(1, 0.1),
               **common)
