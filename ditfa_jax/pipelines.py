"""Prompt -> image for FLUX.1 and SD3/SD3.5 diffusers pipeline folders: tokenize, encode, one jitted scan, decode.

`FluxPipeline.from_pretrained(folder)` / `SD3Pipeline.from_pretrained(folder)` (or `load_pipeline`, which reads
model_index.json) load every component of a diffusers folder; calling the pipeline encodes the prompts exactly as
diffusers' FluxPipeline / StableDiffusion3Pipeline do, runs `ditfa_jax.sampler.sample` (optionally with a
compression plan) from seeded noise and decodes with the VAE. A folder is checked before anything is loaded: each
component the pipeline needs, and signs of a partial or gated download (missing shards, `.incomplete` files, git-lfs
pointer files instead of weights). Each takes a Hugging Face repo id as well ("black-forest-labs/FLUX.1-dev", see
`ditfa_jax.hub`): the files a pipeline needs are fetched into the local Hugging Face cache.
"""

from __future__ import annotations

import time
from functools import cached_property
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from ditfa_jax.configs import VAE_SCALE_FACTOR, read_json
from ditfa_jax.hub import CONFIGS, PIPELINE, resolve, snapshot_check
from ditfa_jax.denoise import NonFiniteError
from ditfa_jax.fp8 import check_plan_layers
from ditfa_jax.loading import Transformer, load_transformer
from ditfa_jax.plan import CompressionPlan
from ditfa_jax.family import TokenLayout, family_of, layout_for
from ditfa_jax.sampler import sample, scheduler_for
from ditfa_jax.tokenization import PromptTokenizer, load_tokenizer

__all__ = ["FluxPipeline", "SD3Pipeline", "check_pipeline_folder", "load_pipeline"]

_WEIGHTS = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


# ----------------------------------------------------------------------------------------------------------------
# Folder checks


def _weights_prefix(component: str) -> str:
    return _WEIGHTS["text_encoder" if component.startswith("text_encoder") else component]


def _expected_files(component: str, kind: str | None) -> list[str]:
    """Files (relative to the component folder) a component needs, for error messages and checks."""
    if component == "scheduler":
        return ["scheduler_config.json"]
    if component.startswith("tokenizer"):
        return ["tokenizer.json"] if kind == "t5" else ["vocab.json", "merges.txt"]
    return ["config.json", f"{_weights_prefix(component)}.safetensors"]


def _check_weights(folder: Path, component: str) -> None:
    """Single or sharded safetensors present, complete, and not git-lfs pointers (before anything is loaded)."""
    from convert.checkpoint import checkpoint_files

    checkpoint_files(folder, prefix=_weights_prefix(component), what=f"{component} weights")


def _read_index(folder: Path) -> dict:
    index = folder / "model_index.json"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    if not index.is_file():
        names = sorted(p.name for p in folder.iterdir())
        docs = [n for n in names if not n.startswith(".")]
        if all(n.split(".")[0].upper() in ("README", "LICENSE", "LICENCE", "NOTICE") or
               n.lower().endswith((".md", ".png", ".jpg", ".jpeg", ".txt")) for n in docs):
            raise FileNotFoundError(
                f"{folder} holds only {docs or 'nothing'}: no model_index.json or components. This looks like a "
                "gated model whose files were not downloaded: accept its licence on the Hugging Face Hub page, log "
                "in (huggingface-cli login) and download the full repository again")
        raise FileNotFoundError(f"{folder}: no model_index.json, so not a diffusers pipeline folder; found {names}")
    return read_json(index, "model_index.json")


def check_pipeline_folder(folder: str | Path, components: dict[str, str | None]) -> dict:
    """Check a pipeline folder before loading it; returns model_index.json.

    `components`: name -> tokenizer kind ("clip"/"t5") or None. A component listed as [null, null] in
    model_index.json is treated as absent (returned as None in the index); every other one must be complete.
    """
    folder = Path(folder)
    index = _read_index(folder)
    partial = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.incomplete"))
    if partial:
        raise ValueError(f"{folder}: unfinished download, {partial[:5]} still present: download the folder again")
    for name, kind in components.items():
        entry = index.get(name)
        if isinstance(entry, list) and entry[:1] == [None]:
            continue
        sub = folder / name
        need = _expected_files(name, kind)
        if kind == "clip" and (sub / "tokenizer.json").is_file():
            need = []
        elif kind == "t5" and not (sub / "tokenizer.json").is_file() and (sub / "spiece.model").is_file():
            raise FileNotFoundError(f"{sub}: only the SentencePiece spiece.model is there; tokenizer.json is "
                                    "required (make it once with transformers: T5TokenizerFast.from_pretrained("
                                    "folder).save_pretrained(folder))")
        missing = [f for f in (need if kind or name == "scheduler" else need[:1]) if not (sub / f).is_file()]
        if missing:
            listed = f"model_index.json lists it as {entry}" if entry else "model_index.json does not list it"
            raise FileNotFoundError(f"{folder}: component {name!r} is missing or incomplete: expected "
                                    f"{', '.join(str(sub / f) for f in missing)} ({listed})")
        if kind is None and name != "scheduler":
            _check_weights(sub, name)
    return index


def vae_scale_factor_of(folder: str | Path) -> int:
    """Pixels per latent cell of a checkpoint folder's (or repo id's) VAE, read from vae/config.json; a folder
    without a VAE may declare it in model_index.json (`vae_scale_factor`: 1 for a pixel-space model such as the
    testbed); else 8."""
    folder = resolve(folder, CONFIGS)
    if (folder / "vae" / "config.json").is_file():
        from ditfa_jax.models.vae import VAEConfig

        return VAEConfig.from_file(folder / "vae" / "config.json").downsample_factor
    index = folder / "model_index.json"
    if index.is_file():
        factor = read_json(index, "model_index.json").get("vae_scale_factor", VAE_SCALE_FACTOR)
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"{index}: vae_scale_factor must be a positive integer, got {factor!r}")
        return factor
    return VAE_SCALE_FACTOR


# ----------------------------------------------------------------------------------------------------------------
# Shared pipeline machinery


def _postprocess(images, output_type: str):
    """NHWC in [-1, 1] -> float32 [0, 1] (np) or PIL images, as diffusers' VaeImageProcessor."""
    images = np.asarray(jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0, 1))
    if output_type == "np":
        return images
    from PIL import Image

    return [Image.fromarray(img) for img in (images * 255).round().astype(np.uint8)]


def _as_list(prompt, what: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{what}: expected a string or a non-empty list of strings, got {prompt!r}")
    return prompts


def _negatives(negative_prompt, count: int) -> list[str] | None:
    """Negative prompts as a list of `count` (one string is used for every prompt), or None."""
    if negative_prompt is None:
        return None
    negatives = ([negative_prompt] * count if isinstance(negative_prompt, str)
                 else _as_list(negative_prompt, "negative_prompt"))
    if len(negatives) != count:
        raise ValueError(f"negative_prompt has {len(negatives)} entries but prompt has {count}; give one "
                         "negative prompt per prompt, or a single string for all")
    return negatives


class _Encoder:
    """A text encoder module as (graphdef, state) with a jitted apply; its state can be moved to host memory."""

    def __init__(self, module):
        self.device = jax.devices()[0]
        self.graphdef, state = nnx.split(module)
        self.state = jax.device_put(state, self.device)  # committed, as after an offload round trip: one compile
        graphdef = self.graphdef
        self.apply = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
        self.on_host = False
        self.onload_s = 0.0  # seconds the last call spent moving offloaded parameters back to the device

    def __call__(self, ids):
        self.onload_s = 0.0
        if self.on_host:
            start = time.perf_counter()
            self.state, self.on_host = jax.block_until_ready(jax.device_put(self.state, self.device)), False
            self.onload_s = time.perf_counter() - start
        return self.apply(self.state, jnp.asarray(ids, jnp.int32))

    def offload(self) -> None:
        """Move the parameters to host memory (frees their accelerator buffers); the next call moves them back.
        Nothing to do when the device is the CPU."""
        if self.device.platform != "cpu":
            self.state, self.on_host = jax.device_put(self.state, jax.devices("cpu")[0]), True


class _Pipeline:
    """What FLUX and SD3 pipelines share: components, noise, the scan, decoding, timings."""

    PIPELINE_CLASS: str
    TEXT_COMPONENTS: dict[str, str]  # text encoder -> its tokenizer kind, in order

    def __init__(self, *, transformer: Transformer, vae, scheduler, text_encoders: dict, tokenizers: dict,
                 folder: Path | None = None, offload_text_encoders: bool = False):
        self.transformer, self.scheduler, self.folder = transformer, scheduler, folder
        self.tokenizers: dict[str, PromptTokenizer | None] = tokenizers
        self.text_encoders = {k: None if m is None else _Encoder(m) for k, m in text_encoders.items()}
        self.offload_text_encoders = offload_text_encoders
        self.vae_graphdef, self.vae_state = nnx.split(vae)
        self.vae_scale_factor = vae.config.downsample_factor  # pixels per latent cell
        self.family = family_of(transformer.config)
        self.timings: dict[str, float] = {}

    # --- loading ------------------------------------------------------------------------------------------------

    @classmethod
    def _components(cls) -> dict[str, str | None]:
        comps = {"scheduler": None, "transformer": None, "vae": None}
        for i, kind in enumerate(cls.TEXT_COMPONENTS.values()):
            suffix = "" if i == 0 else f"_{i + 1}"
            comps[f"text_encoder{suffix}"] = None
            comps[f"tokenizer{suffix}"] = kind
        return comps

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype=None, offload_text_encoders: bool = False,
                        progress: bool = True, revision: str | None = None, **skip):
        """Load a diffusers pipeline folder, or a Hugging Face repo id ("org/name", fetched into the local cache).

        dtype: parameter dtype of every component (default: the transformer's checkpoint dtype, float32 for the
        text encoders and VAE). offload_text_encoders: keep the text encoders in host memory between prompts (frees
        ~9.5 GB of T5-XXL on the GPU; each encode moves them over and back, timed as ``timings["onload_s"]``).
        revision: branch, tag or commit of a repo id.
        """
        components = cls._components()
        for name in skip:  # e.g. SD3 text_encoder_3=None
            if skip[name] is not None or name not in components or not name.startswith("text_encoder"):
                raise TypeError(f"unexpected argument {name}={skip[name]!r} (only text_encoder_N=None is accepted)")
            components.pop(name)
            components.pop(name.replace("text_encoder", "tokenizer"))
        folder = resolve(path, PIPELINE, revision=revision)
        with snapshot_check(path, folder):
            index = check_pipeline_folder(folder, components)
        if index.get("_class_name") != cls.PIPELINE_CLASS:
            other = getattr(PIPELINES.get(index.get("_class_name")), "__name__", None)
            hint = f"; load it with {other}" if other else ""
            raise ValueError(f"{folder / 'model_index.json'}: _class_name is {index.get('_class_name')!r}, "
                             f"{cls.__name__} reads {cls.PIPELINE_CLASS!r} folders{hint}")
        from convert.clip import load_clip
        from convert.t5 import load_t5
        from convert.vae import load_vae

        absent = lambda name: name not in components or index.get(name, [None])[:1] == [None]  # noqa: E731
        bar = tqdm(total=len(cls.TEXT_COMPONENTS) + 2, desc=f"loading {Path(path).name}", unit="part",
                   disable=not progress)
        text_encoders, tokenizers = {}, {}
        dtype_kw = {} if dtype is None else {"dtype": dtype}  # their loaders default to float32
        for i, kind in enumerate(cls.TEXT_COMPONENTS.values()):
            suffix = "" if i == 0 else f"_{i + 1}"
            name = f"text_encoder{suffix}"
            if absent(name):
                text_encoders[name], tokenizers[name] = None, None
            else:
                loader = load_clip if kind == "clip" else load_t5
                text_encoders[name] = loader(folder / name, **dtype_kw)
                tokenizers[name] = load_tokenizer(folder / f"tokenizer{suffix}", kind)
            bar.update()
        model = load_transformer(folder / "transformer", dtype=dtype, progress=False)
        bar.update()
        vae = load_vae(folder / "vae", **dtype_kw)
        bar.update()
        bar.close()
        return cls(transformer=model, vae=vae, scheduler=scheduler_for(folder, model), text_encoders=text_encoders,
                   tokenizers=tokenizers, folder=folder, offload_text_encoders=offload_text_encoders)

    # --- pieces -------------------------------------------------------------------------------------------------

    @property
    def config(self):
        return self.transformer.config

    @property
    def default_size(self) -> int:
        """Pixels per side when a call gives no height/width: the family's native size."""
        return self.family.native_size(self.config, self.vae_scale_factor)

    @property
    def default_guidance_scale(self) -> float:
        return self.family.default_guidance_scale

    def layout(self, height: int, width: int, text_len: int) -> TokenLayout:
        """Where the tokens of a request sit (checks the size fits the model and the VAE)."""
        return layout_for(self.config, height=height, width=width, text_len=text_len,
                          vae_scale_factor=self.vae_scale_factor)

    def _encode_ids(self, name: str, prompts: list[str], max_length: int):
        return self.text_encoders[name](self.tokenizers[name](prompts, max_length))

    def _offload(self) -> None:
        if self.offload_text_encoders:
            for enc in self.text_encoders.values():
                if enc is not None:
                    enc.offload()

    def noise(self, batch: int, height: int, width: int, seed: int | list[int]) -> jax.Array:
        """Initial latents: image i uses key fold_in(key(seed), i) (or key(seed[i])), so an image does not depend
        on the other prompts of the batch. FLUX: drawn as [C, H/8, W/8] and packed, as diffusers does."""
        seeds = [seed] * batch if isinstance(seed, int) else list(seed)
        keys = [jax.random.fold_in(jax.random.key(s), i) if isinstance(seed, int) else jax.random.key(s)
                for i, s in enumerate(seeds)]
        grid = self.layout(height, width, 0).grid
        packed = jax.ShapeDtypeStruct((1, *self.family.latent_shape(self.config, grid)), jnp.float32)
        shape = jax.eval_shape(lambda x: self.family.unpack_latents(self.config, x, grid), packed).shape[1:]
        # drawn in the VAE's latent space, as diffusers draws it, then packed for the sampler
        return self.family.pack_latents(self.config, jnp.stack([jax.random.normal(k, shape) for k in keys]))

    @cached_property
    def _decode(self):
        graphdef = self.vae_graphdef

        @jax.jit
        def decode(state, z):  # z NCHW in the transformer's latent space
            vae = nnx.merge(graphdef, state)
            z = vae.latents_from_model(jnp.transpose(z, (0, 2, 3, 1)).astype(jnp.float32))
            return vae.decode(z.astype(jax.tree_util.tree_leaves(state)[0].dtype))

        return decode

    def decode(self, latents, height: int, width: int) -> jax.Array:
        """Final latents (as `sample` returns them) -> images NHWC, roughly in [-1, 1]."""
        latents = self.family.unpack_latents(self.config, latents, self.layout(height, width, 0).grid)
        return self._decode(self.vae_state, latents)

    def _check_request(self, prompts, num_images, seed, latents, height, width):
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images (per prompt) must be an integer >= 1, got {num_images!r}")
        total = len(prompts) * num_images
        seeds = [seed] if isinstance(seed, int) else list(seed)
        bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2 ** 32]
        if bad:
            raise ValueError(f"seed: expected integers in 0..{2 ** 32 - 1} (JAX keys take 32-bit seeds), got {bad[:3]}")
        if not isinstance(seed, int) and len(seed) != total:
            raise ValueError(f"seed is a list of {len(seed)} seeds but {len(prompts)} prompt(s) x num_images "
                             f"{num_images} make {total} images; give one seed per image or a single int")
        if latents is not None and np.shape(latents)[0] != total:
            raise ValueError(f"latents have batch {np.shape(latents)[0]} but {len(prompts)} prompt(s) x num_images "
                             f"{num_images} make {total} images")
        self.layout(height, width, 0)

    def __call__(self, prompt, negative_prompt=None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 28, guidance_scale: float | None = None, seed: int | list[int] = 0,
                 num_images: int = 1, plan=None, max_sequence_length: int | None = None, output_type: str = "pil",
                 latents=None, progress: bool = False, mesh=None):
        """Generate num_images per prompt (a string or a list); returns a list of PIL images, float NHWC in [0, 1]
        for output_type "np", or the final latents for "latent" (FLUX packed [B, S, 64], SD3 [B, 16, H/8, W/8]).

        guidance_scale: default FLUX 3.5 (distilled, dev), SD3 7.0 (CFG with negative_prompt, default "").
        seed: an int (image i uses fold_in(key(seed), i)) or one seed per image. plan: a CompressionPlan (or its
        file) made for this model, size, text length and step count. latents: explicit initial noise. mesh: a
        `ditfa_jax.sharding.make_mesh` mesh to denoise over several devices (the transformer is replicated on it).
        Stage times (onload_s: moving offloaded text encoders back to the device; encode_s, denoise_s, decode_s)
        are left in `self.timings`.
        """
        prompts = _as_list(prompt, "prompt")
        negative = _negatives(negative_prompt, len(prompts))
        guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
        height, width = height or self.default_size, width or self.default_size
        self._check_request(prompts, num_images, seed, latents, height, width)
        if max_sequence_length is not None and (isinstance(max_sequence_length, bool) or not isinstance(
                max_sequence_length, int) or not 1 <= max_sequence_length <= 512):
            raise ValueError(f"max_sequence_length: expected an integer in 1..512 (T5's limit), got "
                             f"{max_sequence_length!r}")
        text_len = self.text_len(max_sequence_length)
        if plan is not None:
            plan = CompressionPlan.load(plan) if isinstance(plan, (str, Path)) else plan
            plan.check_compatible(self.config, height=height, width=width, text_len=text_len,
                                  num_steps=num_inference_steps, vae_scale_factor=self.vae_scale_factor)
            check_plan_layers(self.transformer, plan)  # before encoding: the sampler would refuse it too
        bar = tqdm(total=3, desc="encode", disable=not progress)
        start = time.perf_counter()
        cond = self.encode(prompts, negative, max_sequence_length=max_sequence_length,
                           num_images=num_images, guidance_scale=guidance_scale)
        jax.block_until_ready(cond)
        onload = sum(enc.onload_s for enc in self.text_encoders.values() if enc is not None)
        self.timings = {"onload_s": onload, "encode_s": time.perf_counter() - start - onload}
        bar.update()
        bar.set_description("denoise")
        if latents is None:
            latents = self.noise(len(prompts) * num_images, height, width, seed)
        if mesh is not None:
            self.transformer.place_on(mesh)
        start = time.perf_counter()
        final = sample(self.transformer, latents, height=height, width=width, num_steps=num_inference_steps,
                       guidance_scale=guidance_scale, scheduler=self.scheduler, plan=plan,
                       vae_scale_factor=self.vae_scale_factor, mesh=mesh, **cond)
        final.block_until_ready()
        self.timings["denoise_s"] = time.perf_counter() - start
        bar.update()
        bar.set_description("decode")
        if output_type == "latent":
            bar.close()
            return final
        start = time.perf_counter()
        images = self.decode(final, height, width)
        images.block_until_ready()
        self.timings["decode_s"] = time.perf_counter() - start
        if not bool(jnp.isfinite(images).all()):
            raise NonFiniteError(f"the VAE of {self.folder or 'this pipeline'} decoded finite latents into NaN/Inf "
                                 "pixels; check its weights and the dtype (fp16/bf16 overflow?)")
        bar.update()
        bar.close()
        return _postprocess(images, output_type)


    def time_stages(self, prompt, *, repeat: int = 2, **call) -> tuple[dict[str, float], float]:
        """(best seconds of each stage over `repeat` calls, total seconds of the first call, which compiles).

        `call` holds the keyword arguments of `__call__` (output_type is "np": decoding is timed, PIL is not).
        """
        calls = []
        for _ in range(repeat + 1):
            self(prompt, output_type="np", **call)
            calls.append(dict(self.timings))
        return {k: min(c[k] for c in calls[1:]) for k in calls[0]}, sum(calls[0].values())


# ----------------------------------------------------------------------------------------------------------------
# FLUX.1


class FluxPipeline(_Pipeline):
    """FLUX.1 dev / schnell: CLIP-L pooled output + T5 last hidden state; distilled guidance (dev)."""

    PIPELINE_CLASS = "FluxPipeline"
    TEXT_COMPONENTS = {"text_encoder": "clip", "text_encoder_2": "t5"}

    @staticmethod
    def max_sequence_length_for(text_len: int) -> int:
        """The T5 length that gives `text_len` text tokens (a plan's)."""
        return text_len

    @property
    def default_max_sequence_length(self) -> int:
        return 512 if self.config.guidance_embeds else 256

    def text_len(self, max_sequence_length: int | None) -> int:
        """Text tokens the transformer sees (a plan's text_len): the T5 length."""
        return max_sequence_length or self.default_max_sequence_length

    def encode(self, prompt, negative_prompt=None, *, max_sequence_length: int | None = None, num_images: int = 1,
               guidance_scale: float | None = None) -> dict:
        """Prompts -> {prompt_embeds [B*n, L, 4096], pooled_prompt_embeds [B*n, 768]} as FluxPipeline.encode_prompt
        (L = max_sequence_length: 512 dev, 256 schnell), in the transformer's dtype."""
        if negative_prompt is not None:
            raise ValueError("FLUX.1 pipelines take no negative prompt (dev uses distilled guidance: guidance_scale)")
        prompts = _as_list(prompt, "prompt")
        length = self.text_len(max_sequence_length)
        if length > 512:
            raise ValueError(f"max_sequence_length cannot be greater than 512, got {length}")
        pooled = self._encode_ids("text_encoder", prompts,
                                  self.tokenizers["text_encoder"].model_max_length or 77).pooled
        embeds = self._encode_ids("text_encoder_2", prompts, length)
        self._offload()
        dtype = self.transformer.dtype
        return {"prompt_embeds": jnp.repeat(embeds.astype(dtype), num_images, axis=0),
                "pooled_prompt_embeds": jnp.repeat(pooled.astype(dtype), num_images, axis=0)}


# ----------------------------------------------------------------------------------------------------------------
# SD3 / SD3.5


class SD3Pipeline(_Pipeline):
    """SD3 / SD3.5: CLIP-L + bigG penultimate states (padded to T5's width) then T5 states; CFG with negatives."""

    PIPELINE_CLASS = "StableDiffusion3Pipeline"
    TEXT_COMPONENTS = {"text_encoder": "clip", "text_encoder_2": "clip", "text_encoder_3": "t5"}
    CLIP_LENGTH = 77

    @staticmethod
    def max_sequence_length_for(text_len: int) -> int:
        """The T5 length that gives `text_len` text tokens (a plan's): they follow 77 CLIP tokens."""
        return text_len - SD3Pipeline.CLIP_LENGTH

    def text_len(self, max_sequence_length: int | None) -> int:
        """Text tokens the transformer sees (a plan's text_len): 77 CLIP tokens + the T5 length."""
        clip_len = self.tokenizers["text_encoder"].model_max_length or self.CLIP_LENGTH
        return clip_len + (max_sequence_length or 256)

    def _clip(self, name: str, prompts: list[str]):
        out = self._encode_ids(name, prompts, self.tokenizers[name].model_max_length or 77)
        return out.penultimate_hidden_state, out.text_embeds

    def _embed(self, prompts: list[str], length: int):
        (h1, p1), (h2, p2) = self._clip("text_encoder", prompts), self._clip("text_encoder_2", prompts)
        clip = jnp.concatenate([h1, h2], axis=-1)
        width = self.config.joint_attention_dim
        if self.text_encoders.get("text_encoder_3") is None:  # diffusers: zeros in place of T5
            t5 = jnp.zeros((len(prompts), length, width), clip.dtype)
        else:
            t5 = self._encode_ids("text_encoder_3", prompts, length)
        if clip.shape[-1] > width:
            raise ValueError(f"CLIP states are {clip.shape[-1]} wide, more than the transformer's "
                             f"joint_attention_dim {width}")
        clip = jnp.pad(clip, ((0, 0), (0, 0), (0, width - clip.shape[-1])))
        return jnp.concatenate([clip, t5.astype(clip.dtype)], axis=1), jnp.concatenate([p1, p2], axis=-1)

    def encode(self, prompt, negative_prompt=None, *, max_sequence_length: int | None = None, num_images: int = 1,
               guidance_scale: float | None = 7.0) -> dict:
        """Prompts -> prompt_embeds [B*n, 77 + L, 4096], pooled [B*n, 2048] (+ negative_* for guidance_scale > 1,
        from negative_prompt or ""), as StableDiffusion3Pipeline.encode_prompt; L = max_sequence_length (256)."""
        prompts = _as_list(prompt, "prompt")
        length = max_sequence_length or 256
        embeds, pooled = self._embed(prompts, length)
        dtype, rep = self.transformer.dtype, lambda x: jnp.repeat(x.astype(dtype), num_images, axis=0)  # noqa: E731
        out = {"prompt_embeds": rep(embeds), "pooled_prompt_embeds": rep(pooled)}
        if guidance_scale is not None and guidance_scale > 1:
            negative = _negatives(negative_prompt, len(prompts)) or [""] * len(prompts)
            neg, neg_pooled = self._embed(negative, length)
            out.update(negative_prompt_embeds=rep(neg), negative_pooled_prompt_embeds=rep(neg_pooled))
        self._offload()
        return out


PIPELINES = {cls.PIPELINE_CLASS: cls for cls in (FluxPipeline, SD3Pipeline)}


def load_pipeline(path: str | Path, *, revision: str | None = None, **kwargs) -> FluxPipeline | SD3Pipeline:
    """The pipeline model_index.json names (FluxPipeline or StableDiffusion3Pipeline), from a folder or a repo id
    (whose model_index.json is read before any weight is fetched); kwargs as from_pretrained."""
    folder = resolve(path, CONFIGS, revision=revision)
    with snapshot_check(path, folder):
        name = _read_index(folder).get("_class_name")
    if name not in PIPELINES:
        raise ValueError(f"{folder / 'model_index.json'}: _class_name {name!r} is not supported; expected one of "
                         f"{sorted(PIPELINES)}")
    return PIPELINES[name].from_pretrained(path, revision=revision, **kwargs)
