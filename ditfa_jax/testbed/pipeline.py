"""Caption -> image with the testbed model, and its checkpoint folder (the shipped weights live in one).

A testbed folder mirrors a diffusers pipeline folder::

    model_index.json                  names the components, the testbed ("v1", "v2"), the CFG scale, the image size
    transformer/                      FLUX-style MMDiT, converted JAX params (`ditfa_jax.loading.save_converted`)
    text_encoder/config.json          TextEncoderConfig
    text_encoder/model.safetensors    its parameters (flat NNX paths)
    tokenizer/tokenizer.json          the world's word-level vocabulary
    scheduler/scheduler_config.json   flow-matching Euler settings
    training.json                     the recipe and loss curve that produced the weights (optional)

so `ditfa_jax.load_transformer(folder)` and `ditfa calibrate folder` work on it as on a real checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from ditfa_jax.attention import AttentionSettings
from ditfa_jax.calibrate import CalibrationResult, calibrate
from ditfa_jax.files import atomic_folder
from ditfa_jax.hub import PIPELINE, resolve
from ditfa_jax.loading import Transformer, load_transformer, save_converted
from ditfa_jax.methods import DEFAULT_CANDIDATES
from ditfa_jax.plan import CompressionPlan
from ditfa_jax.sampler import sample
from ditfa_jax.scheduler import SchedulerConfig
from ditfa_jax.family import family_of
from ditfa_jax.testbed.model import DEFAULT_STEPS, TextEncoder, TextEncoderConfig
from ditfa_jax.testbed.params import fill_params, flat_params
from ditfa_jax.testbed.testbeds import Testbed, get_testbed, latents_to_images
from ditfa_jax.testbed.tokenizer import WordTokenizer

__all__ = ["SHIPPED_CHECKPOINT", "TestbedPipeline", "save_pipeline"]

SHIPPED_CHECKPOINT = Path(__file__).parent / "checkpoint"
PIPELINE_CLASS = "DitfaTestbedPipeline"
COMPONENT_FILES = {"transformer": "transformer/config.json", "text_encoder": "text_encoder/config.json",
                   "tokenizer": "tokenizer/tokenizer.json", "scheduler": "scheduler/scheduler_config.json"}
TEXT_ENCODER_WEIGHTS = "text_encoder/model.safetensors"


def default_dtype():
    """bf16 on accelerators; fp32 on the CPU, where XLA's bf16 matmuls are slow."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def _load_text_encoder(folder: Path, dtype) -> tuple[TextEncoderConfig, object, object]:
    cfg_path, weights = folder / COMPONENT_FILES["text_encoder"], folder / TEXT_ENCODER_WEIGHTS
    raw = json.loads(cfg_path.read_text())
    known = {f.name for f in dataclasses.fields(TextEncoderConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{cfg_path}: unknown fields {unknown}; expected a subset of {sorted(known)}")
    cfg = TextEncoderConfig(**raw)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: text encoder weights missing")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: TextEncoder(cfg, rngs=nnx.Rngs(0))))
    return cfg, graphdef, fill_params(state, weights, dtype)


class TestbedPipeline:
    """Tokenize -> text encoder -> jitted sampler scan (optionally with a compression plan) -> pixels."""

    __test__ = False  # a name pytest would otherwise try to collect

    def __init__(self, transformer: Transformer, text_encoder: TextEncoder, tokenizer: WordTokenizer,
                 scheduler: SchedulerConfig, folder: Path | None = None, *, testbed: str = "v1",
                 guidance_scale: float = 1.0, image_size: int = 64):
        te_cfg, cfg = text_encoder.config, transformer.config
        if (te_cfg.width, te_cfg.pooled_dim) != (cfg.joint_attention_dim, cfg.pooled_projection_dim):
            raise ValueError(f"text encoder width/pooled_dim ({te_cfg.width}, {te_cfg.pooled_dim}) do not match the "
                             f"transformer's joint_attention_dim/pooled_projection_dim "
                             f"({cfg.joint_attention_dim}, {cfg.pooled_projection_dim})")
        if tokenizer.vocab_size != te_cfg.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} words, the text encoder {te_cfg.vocab_size}")
        self.transformer, self.tokenizer, self.scheduler, self.folder = transformer, tokenizer, scheduler, folder
        self.testbed: Testbed = get_testbed(testbed)
        self.guidance_scale, self.image_size = float(guidance_scale), int(image_size)
        if self.guidance_scale > 1 and family_of(cfg).guidance(cfg) != "cfg":
            raise ValueError(f"guidance_scale {guidance_scale}: this {family_of(cfg).name} testbed model has no "
                             "classifier-free guidance (expected 1.0)")
        self.text_encoder_graphdef, self.text_encoder_state = nnx.split(text_encoder)
        graphdef = self.text_encoder_graphdef
        self._encode = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))

    @property
    def text_len(self) -> int:
        return self.text_encoder.config.max_length

    @property
    def text_encoder(self) -> TextEncoder:
        return nnx.merge(self.text_encoder_graphdef, self.text_encoder_state)

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, *, dtype=None) -> "TestbedPipeline":
        """Load a testbed folder or repo id (default: the v1 weights shipped in the package; "v2" names the v2
        ones); dtype default: `default_dtype()`."""
        if path is None or (path in ("v1", "v2") and not Path(path).exists()):
            folder = get_testbed(path or "v1").checkpoint
            if not (folder / "model_index.json").is_file():
                raise FileNotFoundError(f"{folder}: the {path} testbed weights are not in this install (train them: "
                                        f"python -m ditfa_jax.testbed.train --testbed {path} --out DIR)")
        else:
            folder = resolve(path, PIPELINE)
        dtype = dtype or default_dtype()
        index = folder / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"{folder}: not a testbed checkpoint folder (no model_index.json)")
        meta = json.loads(index.read_text())
        if meta.get("_class_name") != PIPELINE_CLASS:
            raise ValueError(f"{index}: _class_name is not {PIPELINE_CLASS!r}")
        if meta.get("testbed", "v1") not in ("v1", "v2"):
            raise ValueError(f"{index}: testbed {meta['testbed']!r} is not one of ['v1', 'v2']")
        for component, rel in COMPONENT_FILES.items():
            if not (folder / rel).is_file():
                raise FileNotFoundError(f"{folder}: component {component!r} is missing (expected {rel})")
        transformer = load_transformer(folder, dtype=dtype, progress=False)
        _, graphdef, state = _load_text_encoder(folder, dtype)
        tokenizer = WordTokenizer.from_file(folder / COMPONENT_FILES["tokenizer"])
        scheduler = SchedulerConfig.from_file(folder / COMPONENT_FILES["scheduler"])
        return cls(transformer, nnx.merge(graphdef, state), tokenizer, scheduler, folder,
                   testbed=meta.get("testbed", "v1"), guidance_scale=meta.get("guidance_scale", 1.0),
                   image_size=meta.get("image_size", 64))

    # ---- generation -------------------------------------------------------------------------------------------

    def encode(self, captions: list[str]) -> tuple[jax.Array, jax.Array]:
        """Prompt embeddings [N, text_len, width] and pooled vectors [N, pooled_dim] for captions."""
        ids, mask = self.tokenizer.encode(list(captions), max_length=self.text_len)
        return self._encode(self.text_encoder_state, jnp.asarray(ids), jnp.asarray(mask))

    def negative(self, n: int) -> dict:
        """CFG's uncond embeddings (the empty caption, as trained with caption dropout) for n captions, or {}."""
        if self.guidance_scale <= 1:
            return {}
        text, pooled = self.encode([""] * n)
        return {"negative_prompt_embeds": text, "negative_pooled_prompt_embeds": pooled}

    def initial_noise(self, seeds) -> jax.Array:
        """Noise in the sampler's latent layout (v1: packed [N, 1024, 12]; v2: [N, 3, 64, 64]), one independent
        draw per seed (same seed -> same noise in any batch)."""
        cfg = self.transformer.config
        family = family_of(cfg)
        shape = family.latent_shape(cfg, family.token_grid(cfg, self.image_size, self.image_size))
        keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
        return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)

    def __call__(self, captions: list[str], *, seeds=0, num_steps: int = DEFAULT_STEPS,
                 plan: CompressionPlan | None = None, attention: AttentionSettings | None = None,
                 guidance_scale: float | None = None) -> np.ndarray:
        """Images float32 [N, S, S, 3] in [0, 1]; ``seeds`` is one per caption or an int (seed + index).
        ``attention``: how attention runs (`ditfa_jax.attention.AttentionSettings`); ``guidance_scale``: the CFG
        scale (default: the folder's)."""
        captions, seeds = _captions_and_seeds(captions, seeds)
        pipe = self if guidance_scale is None else self.with_guidance(guidance_scale)
        return pipe._sample(captions, seeds, num_steps=num_steps, plan=plan, attention=attention)

    def gated(self, captions: list[str], *, gate, seeds=0, num_steps: int = DEFAULT_STEPS):
        """(images [N, S, S, 3], skipped bool [N, num_steps]) sampled with a `ditfa_jax.denoise.DynamicGate`, one
        caption at a time: the gate reads the whole batch, so this is what it decides for each prompt alone."""
        captions, seeds = _captions_and_seeds(captions, seeds)
        runs = [self._sample([caption], seeds[i:i + 1], num_steps=num_steps, gate=gate)
                for i, caption in enumerate(captions)]
        return np.concatenate([images for images, _ in runs]), np.stack([np.asarray(s, bool) for _, s in runs])

    def _sample(self, captions: list[str], seeds: np.ndarray, **options):
        """`ditfa_jax.sample` from these seeds' noise, the final latents as images (with a gate: and its skips)."""
        text, pooled = self.encode(captions)
        out = sample(self.transformer, self.initial_noise(seeds), text, pooled, height=self.image_size,
                     width=self.image_size, guidance_scale=self.guidance_scale, scheduler=self.scheduler,
                     vae_scale_factor=1, **self.negative(len(captions)), **options)
        final, skipped = out if options.get("gate") is not None else (out, None)
        images = np.asarray(latents_to_images(self.transformer.config, final, self.image_size), np.float32)
        return images if skipped is None else (images, skipped)

    def with_guidance(self, guidance_scale: float) -> "TestbedPipeline":
        """This pipeline sampling with another CFG scale (shares the weights)."""
        return self._replace(guidance_scale=guidance_scale)

    def with_transformer(self, transformer: Transformer) -> "TestbedPipeline":
        """This pipeline with another transformer of the same config (e.g. `ditfa_jax.fp8.quantize_transformer`'s)."""
        return self._replace(transformer=transformer)

    def _replace(self, **changes) -> "TestbedPipeline":
        fields = dict(transformer=self.transformer, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                      scheduler=self.scheduler, folder=self.folder, testbed=self.testbed.name,
                      guidance_scale=self.guidance_scale, image_size=self.image_size)
        return TestbedPipeline(**{**fields, **changes})

    def calibrate(self, captions: list[str], *, delta: float, num_steps: int = DEFAULT_STEPS, c: float = 1.5,
                  candidates=DEFAULT_CANDIDATES, seed: int = 0, progress: bool = True, **search) -> CalibrationResult:
        """Search a compression plan on these calibration captions (`ditfa_jax.calibrate.calibrate`; ``search``:
        its ``rse_over_prompts`` / ``budget_schedule`` / ``token_order`` options). The plan's notes name the
        captions."""
        text, pooled = self.encode(captions)
        result = calibrate(self.transformer, text, pooled, height=self.image_size, width=self.image_size,
                           num_steps=num_steps, guidance_scale=self.guidance_scale, delta=delta, c=c,
                           candidates=tuple(candidates), scheduler=self.scheduler, seed=seed, vae_scale_factor=1,
                           progress=progress, **self.negative(len(captions)), **search)
        plan = result.plan.replace(notes={**result.plan.notes, "calibration_captions": list(captions)})
        return dataclasses.replace(result, plan=plan)


def _captions_and_seeds(captions, seeds) -> tuple[list[str], np.ndarray]:
    """Captions as a list and one seed per caption (an int: seed + index), or ValueError."""
    captions = [captions] if isinstance(captions, str) else list(captions)
    seeds = np.asarray(seeds + np.arange(len(captions)) if np.isscalar(seeds) else seeds)
    if seeds.shape != (len(captions),):
        raise ValueError(f"seeds: expected an int or one seed per caption ({len(captions)}), got shape {seeds.shape}")
    return captions, seeds


def save_pipeline(folder: str | Path, transformer: Transformer, text_encoder: TextEncoder, *,
                  scheduler: SchedulerConfig, tokenizer_file: str | Path, training: dict | None = None,
                  testbed: str = "v1", guidance_scale: float = 1.0, image_size: int = 64,
                  dtype=jnp.bfloat16) -> Path:
    """Write a testbed folder atomically (temp folder + rename; refuses an existing folder); weights in ``dtype``."""
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        state = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), transformer.state)
        save_converted(Transformer(transformer.config, transformer.graphdef, state), tmp / "transformer")
        (tmp / "text_encoder").mkdir()
        (tmp / COMPONENT_FILES["text_encoder"]).write_text(json.dumps(dataclasses.asdict(text_encoder.config),
                                                                      indent=2))
        save_file(flat_params(text_encoder, dtype), str(tmp / TEXT_ENCODER_WEIGHTS))
        (tmp / "tokenizer").mkdir()
        shutil.copyfile(tokenizer_file, tmp / COMPONENT_FILES["tokenizer"])
        (tmp / "scheduler").mkdir()
        (tmp / COMPONENT_FILES["scheduler"]).write_text(json.dumps(
            {"_class_name": "FlowMatchEulerDiscreteScheduler", **dataclasses.asdict(scheduler)}, indent=2))
        (tmp / "model_index.json").write_text(json.dumps(
            {"_class_name": PIPELINE_CLASS, "vae_scale_factor": 1, "testbed": testbed,
             "guidance_scale": guidance_scale, "image_size": image_size,
             "transformer": ["ditfa_jax", family_of(transformer.config).module_class.__name__],
             "text_encoder": ["ditfa_jax.testbed", "TextEncoder"], "tokenizer": ["tokenizers", "WordLevel"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}, indent=2))
        if training is not None:
            (tmp / "training.json").write_text(json.dumps(training, indent=1))
    return folder
