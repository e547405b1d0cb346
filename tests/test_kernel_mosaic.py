"""Backend "mosaic_gpu" specifics: its config and its lowering (semantics: test_kernel_backends.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_config_checks():
    for bad in (dict(block_k=32), dict(block_k=256), dict(num_stages=1), dict(num_stages=2.0)):
        with pytest.raises(ValueError, match=f"MosaicConfig.{next(iter(bad))}"):
            pk.MosaicConfig(**bad)
    backend = pk.get_backend("mosaic_gpu")
    cfg = backend.default_config((1, 64, 2, 128), jnp.bfloat16, (128, 128))
    assert (cfg.block_k, cfg.num_stages, cfg.pingpong) == (128, 2, True)
    cfg = backend.default_config((1, 64, 2, 64), jnp.float16, (128, 64))
    assert (cfg.block_k, cfg.num_stages) == (64, 4)
    assert backend.default_config((1, 64, 2, 64), jnp.float16, (256, 256)).block_k == 128
    q = jnp.ones((1, 64, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="must divide the band"):
        pk.headwise_attention(q, q, q, np.array([-1, 3], np.int32), text_len=8, text_first=True, band=(128, 64),
                              config=pk.MosaicConfig(block_k=128))


# ------------------------------------------- Mosaic GPU lowering (no GPU needed)


def _lower_for_cuda(shape, has_cache, *, text_len, text_first, config):
    sds = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    hw = jax.ShapeDtypeStruct(shape[2:3], jnp.int32)
    f = functools.partial(pk.headwise_attention, text_len=text_len, text_first=text_first, backend="mosaic_gpu",
                          config=config)
    cache = sds if has_cache else None
    return jax.jit(f).trace(sds, sds, sds, hw, cache).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize(
    "shape,text_len,text_first,config",
    [
        ((1, 4608, 24, 128), 512, True, pk.MosaicConfig()),  # FLUX-1K
        ((1, 16896, 24, 128), 512, True, pk.MosaicConfig(block_k=64, pingpong=False)),  # FLUX-2K
        ((2, 4429, 24, 64), 333, False, pk.MosaicConfig()),  # SD3-1K: 4429 is not a multiple of 8 or 64
    ],
    ids=["FLUX-1K", "FLUX-2K", "SD3-1K"],
)
@pytest.mark.parametrize("cache", [True, False])
def test_lowers_to_mosaic_gpu(shape, text_len, text_first, config, cache):
    """The compiled (not interpreted) kernel lowers for CUDA on a CPU-only jaxlib (stops before ptxas)."""
    txt = _lower_for_cuda(shape, cache, text_len=text_len, text_first=text_first,
                          config=pk.MosaicConfig(**{**config.__dict__, "interpret": False}))
    assert "custom_call @mosaic_gpu" in txt
    assert "callback" not in txt  # not interpret mode
    if cache:
        assert "output_operand_alias" in txt
