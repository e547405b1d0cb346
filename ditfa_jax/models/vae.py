"""The KL autoencoder of SD3 / SD3.5 / FLUX.1 (16 latent channels) in Flax NNX, mirroring diffusers' `AutoencoderKL`.

Encoder: conv_in, DownEncoderBlock2D stack (ResnetBlock2D x layers_per_block, then a stride-2 Downsample2D except in
the last block), mid block (resnet, single-head self-attention, resnet), GroupNorm + SiLU + conv_out to 2 x latent
channels (mean, logvar), then `quant_conv` where the config has it. Decoder: the mirror image with
layers_per_block + 1 resnets per UpDecoderBlock2D and nearest x2 Upsample2D. Module names match diffusers' keys, so
conversion is a rename (`to_out.0` -> `to_out_0`, conv/linear `weight` -> `kernel`).

Layout is NHWC throughout (images [B, H, W, 3], latents [B, H/8, W/8, C]). Parameters keep the dtype they are
loaded in; GroupNorm statistics are always float32, so a bf16 decode stays close to the fp32 one.

Memory: the mid-block attention runs in query chunks (`ATTENTION_QUERY_CHUNK` rows of fp32 logits against all
H/8 * W/8 keys: 1 GiB per image at 2048^2 instead of 16 GiB for the whole 65536^2 matrix), so the peak is driven by
the decoder's full-resolution activations: its last up blocks run at H x W with 256 and 128 channels (SD3/FLUX), one
2048^2 x 256 tensor being 2 GiB in bf16 (4 GiB fp32) plus its fp32 GroupNorm copy. XLA's buffer assignment for an
SD3/FLUX-size decode of one image (CPU compile) needs 3 GiB of temporaries at 1024^2 and 12 GiB (bf16) / 14 GiB
(fp32) at 2048^2; one-shot attention would need 16 / 32 GiB at 2048^2.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from ditfa_jax.configs import CheckedConfig, read_json, setting

VAE_CLASS_NAME = "AutoencoderKL"
ATTENTION_QUERY_CHUNK = 4096  # query rows per step of the mid-block attention (bounds its logits to chunk x tokens)


@dataclasses.dataclass(frozen=True)
class VAEConfig(CheckedConfig):
    """diffusers' `vae/config.json` fields (defaults: diffusers' own, used where a field is absent).

    The sizes and `scaling_factor` are required in a file: diffusers' defaults describe the SD1 VAE, so a default
    would build another model (or scale latents wrongly). `latents_mean`/`latents_std` and `force_upcast` are
    ignored: the SD3/FLUX pipelines scale latents with `scaling_factor` and `shift_factor` alone, and the dtype is
    the caller's choice.
    """

    in_channels: int = setting(3, min=1)
    out_channels: int = setting(3, min=1)
    down_block_types: tuple[str, ...] = setting(("DownEncoderBlock2D",), required=True)
    up_block_types: tuple[str, ...] = setting(("UpDecoderBlock2D",), required=True)
    block_out_channels: tuple[int, ...] = setting((64,), required=True, min=1)
    layers_per_block: int = setting(1, required=True, min=1)
    act_fn: str = setting("silu", choices=("silu",))
    latent_channels: int = setting(4, required=True, min=1)
    norm_num_groups: int = setting(32, required=True, min=1)
    sample_size: int | tuple[int, ...] = setting(32, min=1)
    scaling_factor: float = setting(0.18215, required=True, above=0)
    shift_factor: float | None = setting(None)
    use_quant_conv: bool = setting(True)
    use_post_quant_conv: bool = setting(True)
    mid_block_add_attention: bool = setting(True)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along each axis (8 for every SD3/FLUX VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self, source: str = "config") -> None:
        n = len(self.block_out_channels)
        if n == 0:
            raise ValueError(f"{source}: block_out_channels is empty; expected one channel count per block")
        if self.down_block_types != ("DownEncoderBlock2D",) * n:
            raise ValueError(f"{source}: down_block_types must be {n} x 'DownEncoderBlock2D' (one per "
                             f"block_out_channels entry); got {list(self.down_block_types)}")
        if self.up_block_types != ("UpDecoderBlock2D",) * n:
            raise ValueError(f"{source}: up_block_types must be {n} x 'UpDecoderBlock2D' (one per "
                             f"block_out_channels entry); got {list(self.up_block_types)}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"{source}: block_out_channels {list(self.block_out_channels)} must all be multiples "
                             f"of norm_num_groups={self.norm_num_groups}")

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> VAEConfig:
        """Build from a diffusers config dict; other fields (diffusers bookkeeping) are ignored."""
        if not isinstance(raw, dict) or raw.get("_class_name") != VAE_CLASS_NAME:
            found = raw.get("_class_name") if isinstance(raw, dict) else type(raw).__name__
            raise ValueError(f"{source}: _class_name={found!r}; expected {VAE_CLASS_NAME!r}")
        config = cls(**cls.fields_from(raw, source))
        config.validate(source)
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> VAEConfig:
        return cls.from_dict(read_json(path, "VAE config"), source=str(path))


def conv(cin: int, cout: int, kernel: int, *, dtype, rngs: nnx.Rngs, stride: int = 1, padding=None) -> nnx.Conv:
    """A conv with torch's padding (kernel // 2 on every side unless given); kernel HWIO."""
    pad = kernel // 2
    return nnx.Conv(cin, cout, kernel_size=(kernel, kernel), strides=(stride, stride),
                    padding=padding if padding is not None else ((pad, pad), (pad, pad)),
                    dtype=dtype, param_dtype=dtype, rngs=rngs)


class GroupNorm(nnx.Module):
    """torch GroupNorm over NHWC (affine `weight`/`bias`), statistics in float32 whatever the input dtype."""

    def __init__(self, groups: int, channels: int, *, eps: float = 1e-6, dtype):
        self.groups, self.eps = groups, eps
        self.weight = nnx.Param(jnp.ones((channels,), dtype))
        self.bias = nnx.Param(jnp.zeros((channels,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x32 = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
        mean = x32.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(x32 - mean).mean(axis=(1, 2, 4), keepdims=True)
        y = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class ResnetBlock(nnx.Module):
    """diffusers' ResnetBlock2D without time embedding: norm-SiLU-conv twice, 1x1 `conv_shortcut` if channels change."""

    def __init__(self, cin: int, cout: int, groups: int, *, dtype, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(groups, cin, dtype=dtype)
        self.conv1 = conv(cin, cout, 3, dtype=dtype, rngs=rngs)
        self.norm2 = GroupNorm(groups, cout, dtype=dtype)
        self.conv2 = conv(cout, cout, 3, dtype=dtype, rngs=rngs)
        self.conv_shortcut = conv(cin, cout, 1, dtype=dtype, rngs=rngs) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class Downsample(nnx.Module):
    """diffusers' Downsample2D(padding=0): zero-pad one row/column at the bottom/right, then a stride-2 3x3 conv."""

    def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
        self.conv = conv(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """diffusers' Upsample2D(use_conv=True): nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
        self.conv = conv(channels, channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return self.conv(x)


def single_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          query_chunk: int = ATTENTION_QUERY_CHUNK) -> jax.Array:
    """Exact softmax attention for q, k, v [B, T, 1, C] (fp32 logits and softmax), in query chunks.

    On a GPU with half-precision inputs cuDNN flash attention runs when it supports the head dim (<= 256 on Hopper,
    so not the 512 channels of the SD3/FLUX mid block). Otherwise XLA attention runs `query_chunk` query rows at a
    time against all keys, so its logits take B * query_chunk * T * 4 bytes instead of B * T^2 * 4.
    """
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
        except NotImplementedError:  # head dim or dtype outside what cuDNN supports: chunked XLA below
            pass
    batch, tokens = q.shape[:2]
    if tokens <= query_chunk:
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")
    chunks = -(-tokens // query_chunk)
    q = jnp.pad(q, ((0, 0), (0, chunks * query_chunk - tokens), (0, 0), (0, 0)))  # padded rows are dropped below
    q = jnp.moveaxis(q.reshape(batch, chunks, query_chunk, *q.shape[2:]), 1, 0)
    out = jax.lax.map(lambda qc: jax.nn.dot_product_attention(qc, k, v, implementation="xla"), q)
    return jnp.moveaxis(out, 0, 1).reshape(batch, chunks * query_chunk, *out.shape[3:])[:, :tokens]


class MidAttention(nnx.Module):
    """The mid block's residual self-attention over all H*W positions: GroupNorm, one head of C channels."""

    def __init__(self, channels: int, groups: int, *, dtype, rngs: nnx.Rngs):
        self.group_norm = GroupNorm(groups, channels, dtype=dtype)
        self.to_q, self.to_k, self.to_v, self.to_out_0 = (
            nnx.Linear(channels, channels, dtype=dtype, param_dtype=dtype, rngs=rngs) for _ in range(4))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, c)
        q, k, v = (proj(tokens)[:, :, None, :] for proj in (self.to_q, self.to_k, self.to_v))
        out = single_head_attention(q, k, v).reshape(b, h * w, c)
        return x + self.to_out_0(out).reshape(b, h, w, c)


class MidBlock(nnx.Module):
    """diffusers' UNetMidBlock2D as the VAE uses it: resnet, [attention], resnet (channels unchanged)."""

    def __init__(self, channels: int, groups: int, *, attention: bool, dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(channels, channels, groups, dtype=dtype, rngs=rngs) for _ in range(2)])
        self.attentions = (nnx.List([MidAttention(channels, groups, dtype=dtype, rngs=rngs)]) if attention
                           else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class ResnetStack(nnx.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D: resnets, then an optional down- or upsampler."""

    def __init__(self, cin: int, cout: int, n: int, groups: int, *, sampler: str | None, dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, dtype=dtype, rngs=rngs)
                                 for i in range(n)])
        self.downsamplers = (nnx.List([Downsample(cout, dtype=dtype, rngs=rngs)]) if sampler == "down" else None)
        self.upsamplers = (nnx.List([Upsample(cout, dtype=dtype, rngs=rngs)]) if sampler == "up" else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nnx.Module):
    """Images [B, H, W, in_channels] -> [B, H/f, W/f, 2 * latent_channels] (mean and logvar, before quant_conv)."""

    def __init__(self, config: VAEConfig, *, dtype, rngs: nnx.Rngs):
        ch, groups, n = config.block_out_channels, config.norm_num_groups, len(config.block_out_channels)
        self.conv_in = conv(config.in_channels, ch[0], 3, dtype=dtype, rngs=rngs)
        self.down_blocks = nnx.List([
            ResnetStack(ch[max(i - 1, 0)], ch[i], config.layers_per_block, groups,
                        sampler="down" if i < n - 1 else None, dtype=dtype, rngs=rngs) for i in range(n)])
        self.mid_block = MidBlock(ch[-1], groups, attention=config.mid_block_add_attention, dtype=dtype, rngs=rngs)
        self.conv_norm_out = GroupNorm(groups, ch[-1], dtype=dtype)
        self.conv_out = conv(ch[-1], 2 * config.latent_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latents [B, h, w, latent_channels] -> images [B, f*h, f*w, out_channels] (after post_quant_conv)."""

    def __init__(self, config: VAEConfig, *, dtype, rngs: nnx.Rngs):
        ch, groups, n = config.block_out_channels[::-1], config.norm_num_groups, len(config.block_out_channels)
        self.conv_in = conv(config.latent_channels, ch[0], 3, dtype=dtype, rngs=rngs)
        self.mid_block = MidBlock(ch[0], groups, attention=config.mid_block_add_attention, dtype=dtype, rngs=rngs)
        self.up_blocks = nnx.List([
            ResnetStack(ch[max(i - 1, 0)], ch[i], config.layers_per_block + 1, groups,
                        sampler="up" if i < n - 1 else None, dtype=dtype, rngs=rngs) for i in range(n)])
        self.conv_norm_out = GroupNorm(groups, ch[-1], dtype=dtype)
        self.conv_out = conv(ch[-1], config.out_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """diffusers' AutoencoderKL (encoder, decoder, optional 1x1 quant/post-quant convs), NHWC.

    `encode` / `decode` check their input and run jitted; `latents_to_model` / `latents_from_model` are the SD3 and
    FLUX pipelines' latent scaling. Build it with `convert.vae.load_vae`.
    """

    def __init__(self, config: VAEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config, self.dtype = config, jnp.dtype(dtype)
        latent = config.latent_channels
        self.encoder = Encoder(config, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(config, dtype=dtype, rngs=rngs)
        self.quant_conv = conv(2 * latent, 2 * latent, 1, dtype=dtype, rngs=rngs) if config.use_quant_conv else None
        self.post_quant_conv = (conv(latent, latent, 1, dtype=dtype, rngs=rngs) if config.use_post_quant_conv
                                else None)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images [B, H, W, in_channels] in [-1, 1], H and W multiples of 8 -> (mean, logvar) [B, H/8, W/8, C].

        logvar is clamped to [-30, 20] as in diffusers' DiagonalGaussianDistribution; `mean` is its `mode()`.
        """
        images = jnp.asarray(images)
        _check_nhwc(images, self.config.in_channels, "images", self.config.downsample_factor)
        return _encode_jit(self, images.astype(self.dtype))

    def decode(self, latents: jax.Array) -> jax.Array:
        """Raw (unscaled) latents [B, h, w, latent_channels] -> images [B, 8h, 8w, out_channels], about [-1, 1]."""
        latents = jnp.asarray(latents)
        _check_nhwc(latents, self.config.latent_channels, "latents", 1)
        return _decode_jit(self, latents.astype(self.dtype))

    def latents_to_model(self, z: jax.Array) -> jax.Array:
        """VAE latents -> the transformer's latent space: (z - shift_factor) * scaling_factor."""
        return (z - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def latents_from_model(self, z: jax.Array) -> jax.Array:
        """The transformer's latents -> VAE latents for `decode`: z / scaling_factor + shift_factor."""
        return z / self.config.scaling_factor + (self.config.shift_factor or 0.0)

    def _encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def _decode(self, latents: jax.Array) -> jax.Array:
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)


_encode_jit = nnx.jit(AutoencoderKL._encode)
_decode_jit = nnx.jit(AutoencoderKL._decode)


def _check_nhwc(x: jax.Array, channels: int, name: str, multiple: int) -> None:
    """Clear errors for a wrong rank, channel count (NCHW given?) or spatial size."""
    if x.ndim != 4:
        raise ValueError(f"{name} must be NHWC [batch, height, width, {channels}]; got shape {tuple(x.shape)}")
    if x.shape[-1] != channels:
        hint = " (that looks NCHW: transpose to NHWC)" if x.shape[1] == channels else ""
        raise ValueError(f"{name} must have {channels} channels in the last axis (NHWC); got shape "
                         f"{tuple(x.shape)}{hint}")
    if x.shape[1] % multiple or x.shape[2] % multiple:
        raise ValueError(f"{name} height and width must be multiples of {multiple} (the VAE downsamples "
                         f"{multiple}x); got {x.shape[1]}x{x.shape[2]}")
