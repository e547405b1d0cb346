"""Compression plans: one attention method per (step, layer, head), saved as a small JSON file.

A plan's payload is ``head_window: int32 [steps, layers, heads]`` in the kernel's encoding (-1 full, 0 cached,
w > 0 arrow with image-band half-width w tokens, -2 full in FP8, see :mod:`ditfa_jax.methods`), with arrow bands of granularity
``band``; the sampler scans over its first axis. Everything else is metadata that ties the plan to the model and
run it was calibrated for (model class, layer/head counts, resolution, token grid, text length, step count), so a
plan cannot silently be applied to another setting.

Layers are counted in run order (FLUX: the double-stream blocks, then the single-stream blocks; SD3: the joint
blocks). Step 0 is always full: a cached head needs a computed value first.

Two optional payloads say what runs at all (defaults: everything, the meaning of plans without them):
``step_kind: int8 [steps]`` (codes of :data:`ditfa_jax.methods.STEP_KINDS`: 0 compute, 1 reuse the last computed
velocity, 2 / 3 extrapolate it in sigma from the last 2 / 3 computed steps) and ``block_compute: bool [steps,
layers]`` (False: the block's output is its input plus the residual, output minus input, cached at the last step
at which the block ran; FBCache/DBCache-like), and ``mlp_compute: bool [steps, layers]`` (False: the block runs its
attention but its MLP branch returns the output, before the gate, that it computed at the last step at which it ran;
FORA-like). A step that does not compute runs no block (its rows are all True, meaningless); a skipped block runs
none of its heads whatever head_window says (and its MLP entry is True), and a cached head reuses its value from the
last step at which its block ran.

File layout (schema 2; schema-1 files still load, with their old meaning)::

    {"format": "ditfa-jax compression plan", "schema_version": 2,
     "model": {"family", "model_class", "num_layers", "num_heads", "head_dim", "text_first", "config"},
     "run": {"height", "width", "token_grid", "image_tokens", "text_len", "num_steps", "token_order"},
     "search": {"candidates", "delta", "c"},
     "methods": {"head": {"band", "legend", "candidate_windows", "head_window"},
                 "step": {"kinds", "legend", "step_kind"},          # only when a step does not compute
                 "block": {"legend", "block_compute"},              # only when a block is cached
                 "mlp": {"legend", "mlp_compute"},                  # only when an MLP branch is cached
                 "linear": {"format", "fp8_layers"}},               # only when linear layers run in FP8
     "notes": {...}}

``methods`` holds one entry per kind of method a plan assigns: "head" (per (step, layer, head), required), "step"
(``step_kind``, one name per step), "block" (``block_compute``, 0/1 per (step, layer)), "mlp" (``mlp_compute``, 0/1
per (step, layer)) and "linear" (``fp8_layers``: the block-stack linear layers the model ran in FP8 when the plan was
calibrated, `ditfa_jax.fp8`); the last four
are written only when not the default, so files of plans without them are what they were. Later kinds are added
there without a format change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from types import MappingProxyType

import numpy as np

from ditfa_jax.configs import MODEL_CLASSES, VAE_SCALE_FACTOR, config_from_dict, config_to_dict
from ditfa_jax.family import families, family_of, layout_for
from ditfa_jax.files import atomic_write
from ditfa_jax.methods import (CACHED_WINDOW, DEFAULT_CANDIDATES, FP8_WINDOW, FULL_WINDOW, STEP_COMPUTE, STEP_HISTORY,
                               STEP_KINDS, candidate_windows, check_band, check_candidates, flop_windows,
                               method_window, step_kind_codes)
from ditfa_jax.token_order import TOKEN_ORDERS
import pallas_kernels
from pallas_kernels.cost import PlanCost, plan_cost

__all__ = ["SCHEMA_VERSION", "V1_BAND", "CompressionPlan", "sparkline"]

SCHEMA_VERSION = 2

# The arrow band (query, key tokens) that every schema-1 plan meant (the kernel's block sizes then), per head_dim.
# Frozen here: new plans take `pallas_kernels.default_band` (equal today, a test checks), which may change.
V1_BAND = MappingProxyType({16: (128, 64), 32: (128, 64), 64: (128, 64), 128: (128, 128), 256: (64, 64)})

_FORMAT = "ditfa-jax compression plan"
_LEGEND = "head_window[step][layer][head]: -1 full, 0 cached, w>0 arrow (image-band half-width w tokens)"
_FP8_LEGEND = ", -2 full in FP8"  # added where a head is FP8: files of other plans are what they were
_STEP_LEGEND = ("step_kind[step]: compute runs the transformer; reuse returns the last computed velocity; "
                "taylor1/taylor2 extrapolate it in sigma from the last 2/3 computed steps")
_BLOCK_LEGEND = ("block_compute[step][layer]: 1 the block runs, 0 its output is its input plus the residual cached "
                 "at the last step it ran")
_MLP_LEGEND = ("mlp_compute[step][layer]: 1 the block's MLP branch runs, 0 it returns its output (before the gate) "
               "cached at the last step it ran")


def _token_grid_for(config, height: int, width: int, vae_scale_factor: int) -> tuple[int, int]:
    """(rows, cols) of the image tokens of a model at ``height`` x ``width`` pixels (the family's geometry)."""
    return layout_for(config, height=height, width=width, text_len=0, vae_scale_factor=vae_scale_factor).grid


# ----------------------------------------------------------------------------------------------------------------
# The plan


def _is_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, np.integer))


def _int_field(name: str, v, minimum: int) -> int:
    if not _is_int(v) or v < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {v!r}")
    return int(v)


def _opt_float(name: str, v, positive: bool) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}: expected a number or None, got {v!r}")
    v = float(v)
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{name}: expected a finite value {'>' if positive else '>='} 0, got {v}")
    return v


def _normalise_json(obj):
    """Round-trip through JSON so tuples/lists and numpy scalars compare equal after save/load."""
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _model_config(config) -> dict:
    """The config dict a plan records and compares."""
    return _normalise_json(config_to_dict(config))


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class CompressionPlan:
    """Per-(step, layer, head) attention methods plus the setting they were calibrated for.

    ``head_window``: int32 [num_steps, num_layers, num_heads] (-1 full, 0 cached, w>0 arrow, -2 full in FP8),
    read-only.
    ``band``: (query, key) tokens, the granularity of the arrow bands (what a head computes, and so the cost).
    ``token_grid``: (rows, cols) of the image tokens, rows * cols = image_tokens.
    ``candidates``/``delta``/``c``: the search that made it (``delta``/``c`` None for hand-made plans).
    ``model_config``: the model's config dict (optional); when present, :meth:`check_compatible` also compares it,
    which tells apart models with equal layer/head counts (e.g. SD3-medium and SD3.5-medium).
    ``notes``: free-form JSON-serialisable facts (calibration time, prompt count, ...).
    ``step_kind``: int8 [num_steps], codes of :data:`~ditfa_jax.methods.STEP_KINDS` (names accepted); None: all
    compute. ``block_compute``: bool [num_steps, num_layers] (0/1 accepted); None: every block runs. ``mlp_compute``:
    likewise for the blocks' MLP branches; None: every MLP runs. All three read-only.
    ``fp8_layers``: sorted paths (`ditfa_jax.fp8.fp8_layers`) of the linear layers in FP8 (e4m3) when calibrated, which
    a model must match to run the plan (`ditfa_jax.fp8.check_plan_layers`); None: the model's own dtype.
    """

    head_window: np.ndarray
    band: tuple[int, int]
    family: str
    model_class: str
    num_layers: int
    num_heads: int
    head_dim: int
    height: int
    width: int
    token_grid: tuple[int, int]
    image_tokens: int
    text_len: int
    text_first: bool
    num_steps: int
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES
    delta: float | None = None
    c: float | None = None
    model_config: dict | None = None
    notes: dict = dataclasses.field(default_factory=dict)
    token_order: str = "raster"
    step_kind: np.ndarray | None = None
    block_compute: np.ndarray | None = None
    mlp_compute: np.ndarray | None = None
    fp8_layers: tuple[str, ...] | None = None

    def __post_init__(self):
        put = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if self.model_class not in MODEL_CLASSES:
            raise ValueError(f"model_class: expected one of {sorted(MODEL_CLASSES)}, got {self.model_class!r}")
        family = families()[MODEL_CLASSES[self.model_class].family]
        if self.family != family.name:
            raise ValueError(f"family: {self.model_class} is family {family.name!r}, "
                             f"got {self.family!r}")
        if not isinstance(self.text_first, (bool, np.bool_)) or bool(self.text_first) != family.text_first:
            raise ValueError(f"text_first: {self.family} puts text {'first' if family.text_first else 'last'} "
                             f"(text_first={family.text_first}), got {self.text_first!r}")
        put("text_first", bool(self.text_first))
        for name, minimum in (("num_layers", 1), ("num_heads", 1), ("head_dim", 1), ("height", 1), ("width", 1),
                              ("image_tokens", 1), ("text_len", 0), ("num_steps", 1)):
            put(name, _int_field(name, getattr(self, name), minimum))
        put("token_grid", self._checked_grid())
        put("band", check_band(self.band))
        put("candidates", check_candidates(self.candidates))
        put("delta", _opt_float("delta", self.delta, positive=False))
        put("c", _opt_float("c", self.c, positive=True))
        if self.model_config is not None and not isinstance(self.model_config, dict):
            raise ValueError(f"model_config: expected a dict or None, got {type(self.model_config).__name__}")
        if not isinstance(self.notes, dict):
            raise ValueError(f"notes: expected a dict, got {type(self.notes).__name__}")
        if self.token_order not in TOKEN_ORDERS:
            raise ValueError(f"token_order: expected one of {TOKEN_ORDERS}, got {self.token_order!r}")

        hw = np.asarray(self.head_window)
        want = (self.num_steps, self.num_layers, self.num_heads)
        if not np.issubdtype(hw.dtype, np.integer):
            raise ValueError(f"head_window: expected an integer array, got dtype {hw.dtype}")
        if hw.shape != want:
            raise ValueError(f"head_window: expected shape [steps, layers, heads] = {list(want)} (num_steps, "
                             f"num_layers, num_heads), got {list(hw.shape)}")
        if hw.size and (hw.min() < FP8_WINDOW or hw.max() > np.iinfo(np.int32).max):
            raise ValueError(f"head_window: values must lie in [-2, 2**31-1] (-1 full, 0 cached, w>0 arrow, -2 full "
                             f"in FP8), got range [{hw.min()}, {hw.max()}]")
        if (hw[0] != FULL_WINDOW).any():
            layer, head = (int(i) for i in np.argwhere(hw[0] != FULL_WINDOW)[0])
            raise ValueError(f"head_window: step 0 must be all full (-1) -- a cached head needs a computed value "
                             f"first; got {int(hw[0, layer, head])} at layer {layer}, head {head}")
        hw = np.array(hw, dtype=np.int32)
        hw.setflags(write=False)
        put("head_window", hw)
        put("step_kind", self._checked_step_kind())
        put("block_compute", self._checked_layer_switch("block_compute", self.block_compute))
        put("mlp_compute", self._checked_layer_switch("mlp_compute", self.mlp_compute))
        put("fp8_layers", _checked_fp8_layers(self.fp8_layers))

    def _checked_step_kind(self) -> np.ndarray:
        """step_kind as read-only int8 [steps], or ValueError naming the step: step 0 computes, and each kind has
        the computed steps it needs before it (STEP_HISTORY)."""
        sk = np.zeros(self.num_steps, np.int8) if self.step_kind is None else self.step_kind
        if isinstance(sk, np.ndarray) and sk.dtype.kind in "US":
            sk = sk.tolist()
        if isinstance(sk, (tuple, list)) and any(isinstance(v, str) for v in sk):
            sk = step_kind_codes(list(sk))
        sk = np.asarray(sk)
        if sk.shape != (self.num_steps,):
            raise ValueError(f"step_kind: expected shape [steps] = [{self.num_steps}] (num_steps), got "
                             f"{list(sk.shape)}")
        if not np.issubdtype(sk.dtype, np.integer):
            raise ValueError(f"step_kind: expected integer codes or names of {list(STEP_KINDS)}, got dtype {sk.dtype}")
        bad = np.flatnonzero((sk < 0) | (sk >= len(STEP_KINDS)))
        if bad.size:
            raise ValueError(f"step_kind: step {bad[0]} has code {int(sk[bad[0]])}; expected 0..{len(STEP_KINDS) - 1} "
                             f"for {list(STEP_KINDS)}")
        sk = np.array(sk, dtype=np.int8)
        if sk[0] != STEP_COMPUTE:
            raise ValueError(f"step_kind: step 0 must be 'compute' (nothing has been computed to reuse yet), got "
                             f"{STEP_KINDS[sk[0]]!r}")
        computed = np.cumsum(sk == STEP_COMPUTE) - (sk == STEP_COMPUTE)  # computed steps before each step
        short = np.flatnonzero(computed < np.asarray(STEP_HISTORY)[sk])
        if short.size:
            step = int(short[0])
            before = np.flatnonzero(sk[:step] == STEP_COMPUTE).tolist()
            raise ValueError(f"step_kind: step {step} is {STEP_KINDS[sk[step]]!r}, which needs "
                             f"{STEP_HISTORY[sk[step]]} computed steps before it; it has {len(before)} (steps "
                             f"{before})")
        sk.setflags(write=False)
        return sk

    def _checked_layer_switch(self, name: str, value) -> np.ndarray:
        """block_compute / mlp_compute as read-only bool [steps, layers], or ValueError naming the step and layer:
        step 0 runs everything (a cached value needs computing first), a step that does not compute has an all-True
        row, and an MLP entry is True where its block does not run."""
        want = (self.num_steps, self.num_layers)
        what = "block" if name == "block_compute" else "block's MLP branch"
        bc = np.ones(want, bool) if value is None else np.asarray(value)
        if bc.shape != want:
            raise ValueError(f"{name}: expected shape [steps, layers] = {list(want)} (num_steps, num_layers), "
                             f"got {list(bc.shape)}")
        if bc.dtype != bool and not (np.issubdtype(bc.dtype, np.integer) and np.isin(bc, (0, 1)).all()):
            got = f"dtype {bc.dtype}" if not np.issubdtype(bc.dtype, np.integer) else \
                f"values {sorted(set(np.unique(bc).tolist()) - {0, 1})[:5]}"
            raise ValueError(f"{name}: expected bools (True: the {what} runs) or 0/1, got {got}")
        bc = np.array(bc, dtype=bool)
        if not bc[0].all():
            raise ValueError(f"{name}: step 0 must run every {what} (a cached value must be computed first); got "
                             f"False at layer {int(np.flatnonzero(~bc[0])[0])}")
        rows = np.flatnonzero((self.step_kind != STEP_COMPUTE) & ~bc.all(axis=1))
        if rows.size:
            step = int(rows[0])
            raise ValueError(f"{name}: step {step} is {STEP_KINDS[self.step_kind[step]]!r}: the transformer "
                             f"does not run there, so its row means nothing and must be all True; got False at "
                             f"layer {int(np.flatnonzero(~bc[step])[0])}")
        if name == "mlp_compute":
            both = np.argwhere(~bc & ~self.block_compute)
            if both.size:
                step, layer = (int(i) for i in both[0])
                raise ValueError(f"mlp_compute: step {step}, layer {layer}: the block is cached (block_compute 0), "
                                 "so its MLP entry means nothing and must be 1")
        bc.setflags(write=False)
        return bc

    def _checked_grid(self) -> tuple[int, int]:
        """token_grid as a tuple, or ValueError: it holds image_tokens and cuts the image into square tokens."""
        g = self.token_grid
        if not (isinstance(g, (tuple, list)) and len(g) == 2 and all(_is_int(v) and v >= 1 for v in g)):
            raise ValueError(f"token_grid: expected (rows, cols), two integers >= 1, got {g!r}")
        rows, cols = int(g[0]), int(g[1])
        if rows * cols != self.image_tokens:
            raise ValueError(f"token_grid: {rows} x {cols} = {rows * cols} tokens, but image_tokens is "
                             f"{self.image_tokens}")
        if self.height % rows or self.width % cols or self.height // rows != self.width // cols:
            raise ValueError(f"token_grid: {rows} x {cols} tokens do not cut {self.height}x{self.width} pixels "
                             f"into equal square tokens")
        return rows, cols

    # --- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config, head_window, *, height: int, width: int, text_len: int,
                    vae_scale_factor: int = VAE_SCALE_FACTOR, image_tokens: int | None = None,
                    candidates=DEFAULT_CANDIDATES, delta: float | None = None, c: float | None = None,
                    notes: dict | None = None, token_order: str = "raster",
                    band: tuple[int, int] | None = None, step_kind=None, block_compute=None,
                    mlp_compute=None, fp8_layers=None) -> CompressionPlan:
        """A plan for ``config`` at ``height`` x ``width`` pixels (``vae_scale_factor`` per latent cell) with the
        given windows [steps, layers, heads] (``band`` None: `pallas_kernels.default_band` of the head size),
        step / block / MLP methods (None: every step, block and MLP computes) and FP8 layers (None: none)."""
        rows, cols = _token_grid_for(config, height, width, vae_scale_factor)
        if image_tokens is not None and image_tokens != rows * cols:
            raise ValueError(f"image_tokens: {config.family} at {height}x{width} has {rows * cols} image tokens, "
                             f"got {image_tokens}")
        hw = np.asarray(head_window)
        return cls(head_window=hw, band=pallas_kernels.default_band(config.attention_head_dim) if band is None else band,
                   family=config.family, model_class=config.model_class,
                   num_layers=config.total_layers, num_heads=config.num_attention_heads,
                   head_dim=config.attention_head_dim, height=height, width=width, token_grid=(rows, cols),
                   image_tokens=rows * cols, text_len=text_len, text_first=family_of(config).text_first,
                   num_steps=hw.shape[0] if hw.ndim else 0, candidates=candidates, delta=delta, c=c,
                   model_config=_model_config(config), notes=dict(notes or {}), token_order=token_order,
                   step_kind=step_kind, block_compute=block_compute, mlp_compute=mlp_compute,
                   fp8_layers=fp8_layers)

    @classmethod
    def full(cls, config, *, height: int, width: int, text_len: int, num_steps: int,
             vae_scale_factor: int = VAE_SCALE_FACTOR, image_tokens: int | None = None,
             candidates=DEFAULT_CANDIDATES, notes: dict | None = None,
             band: tuple[int, int] | None = None, step_kind=None, block_compute=None,
             mlp_compute=None) -> CompressionPlan:
        """The uncompressed plan (every head full at every step), or with the given step / block / MLP methods
        only."""
        num_steps = _int_field("num_steps", num_steps, 1)
        hw = np.full((num_steps, config.total_layers, config.num_attention_heads), FULL_WINDOW, np.int32)
        return cls.from_config(config, hw, height=height, width=width, text_len=text_len,
                               vae_scale_factor=vae_scale_factor, image_tokens=image_tokens, candidates=candidates,
                               notes=notes, band=band, step_kind=step_kind, block_compute=block_compute,
                               mlp_compute=mlp_compute)

    def replace(self, **changes) -> CompressionPlan:
        """A copy with some fields changed (validated again; step_kind / block_compute / mlp_compute None: the
        defaults)."""
        return dataclasses.replace(self, **changes)

    # --- what runs ---------------------------------------------------------------------------------------------

    @property
    def uses_step_methods(self) -> bool:
        """Whether some step does not run the transformer (reuse or Taylor)."""
        return bool((self.step_kind != STEP_COMPUTE).any())

    @property
    def uses_fp8_heads(self) -> bool:
        """Whether some head runs in FP8 (window -2): the sampler then asks the kernel backend for FP8 heads."""
        return bool((self.head_window == FP8_WINDOW).any())

    @property
    def uses_block_caching(self) -> bool:
        """Whether some (step, layer) block is cached instead of run."""
        return bool(not self.block_compute.all())

    @property
    def uses_mlp_caching(self) -> bool:
        """Whether some (step, layer) MLP branch reuses its cached output instead of running."""
        return bool(not self.mlp_compute.all())

    @property
    def computed_steps(self) -> np.ndarray:
        """int64 [n]: the steps that run the transformer (step_kind compute), ascending; step 0 first."""
        return np.flatnonzero(self.step_kind == STEP_COMPUTE)

    def step_kind_names(self) -> tuple[str, ...]:
        """The step method name of each step."""
        return tuple(STEP_KINDS[k] for k in self.step_kind.tolist())

    def work_per_step_layer(self) -> np.ndarray:
        """float64 [steps, layers]: the share of each block's work that runs: 0 on a step that does not compute or
        for a cached block, else 1 (attention's share within a block that runs: :meth:`flops_kept_per_step_layer`)."""
        return ((self.step_kind == STEP_COMPUTE)[:, None] & self.block_compute).astype(np.float64)

    def cached_mlps(self) -> np.ndarray:
        """bool [steps, layers]: the blocks that run with their MLP branch cached (what saves the MLP's time)."""
        return (self.work_per_step_layer() > 0) & ~self.mlp_compute

    # --- identity ----------------------------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.head_window.shape)

    def fingerprint(self) -> dict:
        """The setting the plan is valid for: model class/shape, resolution, token counts, step count (the step and
        block methods are what the plan does in that setting: in :meth:`digest`, not here)."""
        return {"model_class": self.model_class, "family": self.family, "num_layers": self.num_layers,
                "num_heads": self.num_heads, "head_dim": self.head_dim, "text_first": self.text_first,
                "height": self.height, "width": self.width, "token_grid": self.token_grid,
                "image_tokens": self.image_tokens, "text_len": self.text_len, "num_steps": self.num_steps}

    @staticmethod
    def run_fingerprint(config, *, height: int, width: int, text_len: int, num_steps: int,
                        vae_scale_factor: int = VAE_SCALE_FACTOR) -> dict:
        """:meth:`fingerprint` of a requested run (what a plan must match)."""
        rows, cols = _token_grid_for(config, height, width, vae_scale_factor)
        return {"model_class": config.model_class, "family": config.family,
                "num_layers": config.total_layers, "num_heads": config.num_attention_heads,
                "head_dim": config.attention_head_dim, "text_first": family_of(config).text_first, "height": height,
                "width": width, "token_grid": (rows, cols), "image_tokens": rows * cols, "text_len": text_len,
                "num_steps": num_steps}

    def digest(self) -> str:
        """Short content hash (fingerprint, search settings, band, windows, step and block methods; not notes),
        e.g. for cache keys.

        Equal to the schema-1 digest for plans with the schema-1 band and raster order (PNG metadata keeps meaning);
        step_kind / block_compute / mlp_compute enter only when not the default, so plans without them keep their digest.
        """
        fingerprint = self.fingerprint()
        del fingerprint["token_grid"]  # implied by height, width and image_tokens
        meta = [fingerprint, list(self.candidates), self.delta, self.c]
        if self.token_order != "raster":
            meta.append(self.token_order)
        if self.band != V1_BAND.get(self.head_dim):
            meta.append({"band": list(self.band)})
        h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
        h.update(np.ascontiguousarray(self.head_window, dtype="<i4").tobytes())
        if self.uses_step_methods:
            h.update(b"step_kind" + np.ascontiguousarray(self.step_kind, dtype="<i1").tobytes())
        if self.uses_block_caching:
            h.update(b"block_compute" + np.ascontiguousarray(self.block_compute, dtype=np.uint8).tobytes())
        if self.uses_mlp_caching:
            h.update(b"mlp_compute" + np.ascontiguousarray(self.mlp_compute, dtype=np.uint8).tobytes())
        if self.fp8_layers is not None:
            h.update(b"fp8_layers" + json.dumps(list(self.fp8_layers)).encode())
        return h.hexdigest()[:16]

    def check_compatible(self, config, *, height: int, width: int, text_len: int, num_steps: int,
                         vae_scale_factor: int = VAE_SCALE_FACTOR) -> None:
        """Raise ValueError naming every field where this plan differs from the requested run."""
        want = self.run_fingerprint(config, height=height, width=width, text_len=text_len, num_steps=num_steps,
                                    vae_scale_factor=vae_scale_factor)
        have = self.fingerprint()
        bad = [f"  {k}: plan has {have[k]!r}, requested {want[k]!r}" for k in want if have[k] != want[k]]
        if not bad and self.model_config is not None:  # same shape: tell apart variants (e.g. SD3 vs SD3.5-medium)
            cfg = _model_config(config)
            keys = sorted(set(cfg) | set(self.model_config))
            bad += [f"  model_config.{k}: plan has {self.model_config.get(k)!r}, requested {cfg.get(k)!r}"
                    for k in keys if self.model_config.get(k) != cfg.get(k)]
        if bad:
            raise ValueError("compression plan does not match this run (calibrate a plan for it, or use the "
                             "matching model/resolution/steps):\n" + "\n".join(bad))

    def __eq__(self, other):
        if not isinstance(other, CompressionPlan):
            return NotImplemented
        arrays = ("head_window", "step_kind", "block_compute", "mlp_compute")
        return (all(getattr(self, f.name) == getattr(other, f.name) for f in dataclasses.fields(self)
                    if f.name not in arrays)
                and all(np.array_equal(getattr(self, a), getattr(other, a)) for a in arrays))

    __hash__ = None

    # --- files -------------------------------------------------------------------------------------------------

    def to_json(self) -> str:
        """The file text (schema 2): indented objects, each list of numbers or names on one line, so head_window
        reads one line per (step, layer)."""
        doc = {"format": _FORMAT, "schema_version": SCHEMA_VERSION}
        for section, keys in _SECTIONS.items():
            doc[section] = {key: getattr(self, field) for key, field in keys.items()}
        doc["methods"] = {"head": {
            "band": self.band, "legend": _LEGEND + (_FP8_LEGEND if self.uses_fp8_heads else ""),
            "candidate_windows": {n: method_window(n, self.image_tokens) for n in self.candidates},
            "head_window": self.head_window}}
        if self.uses_step_methods:  # only when not the default: files of plans without them are unchanged
            doc["methods"]["step"] = {"kinds": list(STEP_KINDS), "legend": _STEP_LEGEND,
                                      "step_kind": list(self.step_kind_names())}
        if self.uses_block_caching:
            doc["methods"]["block"] = {"legend": _BLOCK_LEGEND, "block_compute": self.block_compute.astype(np.uint8)}
        if self.uses_mlp_caching:
            doc["methods"]["mlp"] = {"legend": _MLP_LEGEND, "mlp_compute": self.mlp_compute.astype(np.uint8)}
        if self.fp8_layers is not None:
            doc["methods"]["linear"] = {"format": _FP8_FORMAT, "fp8_layers": list(self.fp8_layers)}
        doc["notes"] = self.notes
        return _dump(_normalise_json(doc)) + "\n"

    def save(self, path, *, overwrite: bool = True) -> Path:
        """Write the plan to ``path`` (JSON) atomically: a temp file in the same folder, then moved into place
        (an existing file is replaced, or with overwrite=False refused: `ditfa_jax.files.atomic_write`)."""
        path = Path(path)
        atomic_write(path, self.to_json().encode(), overwrite=overwrite)
        return path

    @classmethod
    def load(cls, path) -> CompressionPlan:
        """Read and validate a plan file (schema 2 or 1); errors name the file and the field."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no compression plan at {path}")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a compression plan: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw, source: str = "plan") -> CompressionPlan:
        """Build a plan from a parsed plan file (see :meth:`load`)."""
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: expected a JSON object at the top level, got {type(raw).__name__}")
        if "schema_version" not in raw:
            raise ValueError(f"{source}: missing field 'schema_version' (is this a ditfa-jax compression plan?)")
        version = raw["schema_version"]
        if not _is_int(version) or version not in (1, SCHEMA_VERSION):
            raise ValueError(f"{source}: field 'schema_version' is {version!r}; this ditfa-jax reads schemas 1 and "
                             f"{SCHEMA_VERSION}")
        try:
            kwargs, paths = (_v1_fields(raw), {}) if version == 1 else (_v2_fields(raw), _FILE_PATHS)
            try:
                plan = cls(**kwargs)
            except ValueError as e:  # name the field by its place in the file
                field, sep, rest = str(e).partition(": ")
                raise ValueError(f"{paths.get(field, field)}{sep}{rest}") from None
            if version == SCHEMA_VERSION:
                _check_candidate_windows(plan, raw["methods"]["head"])
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        return plan

    # --- accounting --------------------------------------------------------------------------------------------

    def cost(self, batch: int = 1) -> PlanCost:
        """Exact attention FLOPs per head with the plan's band, :class:`pallas_kernels.PlanCost` over
        [steps, layers, heads]; an FP8 head computes a full head's FLOPs."""
        hw = flop_windows(self.head_window)
        uniq, inv = np.unique(hw, return_inverse=True)  # a head's cost depends on its window only
        pc = plan_cost(uniq, batch=batch, tokens=self.image_tokens + self.text_len, text_len=self.text_len,
                       text_first=self.text_first, head_dim=self.head_dim, band=self.band)
        inv = inv.reshape(hw.shape)
        per_head = {f.name: getattr(pc, f.name)[inv] for f in dataclasses.fields(pc)
                    if isinstance(getattr(pc, f.name), np.ndarray)}  # every per-head array, whatever PlanCost holds
        return dataclasses.replace(pc, **per_head)

    def flops_kept_per_step_layer(self) -> np.ndarray:
        """float64 [steps, layers]: attention FLOPs the head methods compute over the dense count, where the block
        runs (skipped steps and cached blocks not counted here: times :meth:`work_per_step_layer` for that)."""
        return np.asarray(self.cost().flop_fraction, dtype=np.float64)

    def _flops_run(self) -> np.ndarray:
        """float64 [steps, layers]: attention FLOPs that run over the dense count (0 where the block does not)."""
        kept = self.flops_kept_per_step_layer()
        if self.uses_step_methods or self.uses_block_caching:
            kept = kept * self.work_per_step_layer()
        return kept

    def flops_kept_per_step(self) -> np.ndarray:
        """float64 [steps]: attention FLOPs run at each step over the dense count (0 on a step that does not
        compute; a cached block counts 0)."""
        return self._flops_run().mean(axis=1)

    def flops_kept_fraction(self) -> float:
        """Attention FLOPs of the whole run over those of the uncompressed run (skipped steps and cached blocks
        run none)."""
        return float(self._flops_run().mean())

    def method_names(self) -> list[str]:
        """Names in :meth:`method_counts` order: full, cached, the arrow candidates, fp8 (when a candidate or used),
        then other windows."""
        named = {w: n for n, w in reversed(list(zip(self.candidates, candidate_windows(self.candidates,
                                                                                      self.image_tokens))))}
        extra = sorted(set(np.unique(self.head_window).tolist()) - set(named)
                       - {FULL_WINDOW, CACHED_WINDOW, FP8_WINDOW})
        arrows = [n for n in self.candidates if n not in ("cached", "fp8")]
        fp8 = ["fp8"] if "fp8" in self.candidates or self.uses_fp8_heads else []
        return ["full", "cached"] + arrows + fp8 + [f"arrow(w={w})" for w in extra]

    def method_codes(self) -> np.ndarray:
        """int [steps, layers, heads]: index of each head's method in :meth:`method_names`."""
        names = self.method_names()
        code = np.empty(self.head_window.shape, np.int64)
        windows = {"full": FULL_WINDOW, "cached": CACHED_WINDOW, "fp8": FP8_WINDOW}
        for n in names[2:]:
            windows[n] = (int(n[len("arrow(w="):-1]) if n.startswith("arrow(w=")
                          else method_window(n, self.image_tokens))
        done = np.zeros(self.head_window.shape, bool)
        for i, n in enumerate(names):  # first name wins when two arrow candidates share a window
            hit = (self.head_window == windows[n]) & ~done
            code[hit] = i
            done |= hit
        return code

    def method_counts(self) -> dict[str, np.ndarray]:
        """Per method name, int64 [steps]: how many (layer, head) pairs use it at each step."""
        code = self.method_codes()
        return {n: (code == i).sum(axis=(1, 2)) for i, n in enumerate(self.method_names())}

    def summary(self) -> str:
        """A few lines: setting, FLOPs kept overall and per step, share of heads per method."""
        kept = self.flops_kept_fraction()
        per_step = self.flops_kept_per_step()
        counts = self.method_counts()
        total = self.head_window.size
        shares = ", ".join(f"{n} {int(v.sum()) / total:.1%}" for n, v in counts.items())
        search = ("hand-made" if self.delta is None else
                  f"delta={self.delta:g}" + ("" if self.c is None else f", c={self.c:g}"))
        search += "" if self.token_order == "raster" else f", {self.token_order} token order"
        lo, hi = int(per_step.argmin()), int(per_step.argmax())
        lines = [
            f"{self.model_class} {self.height}x{self.width} ({self.image_tokens} image + {self.text_len} text "
            f"tokens, band {self.band[0]}x{self.band[1]}): {self.num_steps} steps x {self.num_layers} layers x "
            f"{self.num_heads} heads, {search}",
            f"attention FLOPs kept {kept:.1%} (removed {1 - kept:.1%})",
            f"heads: {shares}",
            f"per step kept: min {per_step[lo]:.1%} (step {lo}), max {per_step[hi]:.1%} (step {hi})",
            f"per step kept, step 0 first (0 {_BARS[0]} .. {_BARS[-1]} 100%): {sparkline(per_step)}",
        ]
        if self.uses_step_methods:
            names = self.step_kind_names()
            kinds = ", ".join(f"{k} {names.count(k)}" for k in STEP_KINDS if k in names)
            skipped = np.flatnonzero(self.step_kind != STEP_COMPUTE)
            lines.append(f"steps: {kinds}; the transformer is skipped at steps {_spans(skipped)}")
        if self.uses_block_caching:
            ran = self.block_compute[self.computed_steps]
            cached, total = int((~ran).sum()), ran.size
            at = np.flatnonzero(~self.block_compute.all(axis=1))
            lines.append(f"blocks: {cached} of the {total} blocks of computed steps cached ({cached / total:.1%}), "
                         f"at steps {_spans(at)}")
        if self.uses_mlp_caching:
            cached, total = int(self.cached_mlps().sum()), int((self.work_per_step_layer() > 0).sum())
            at = np.flatnonzero(~self.mlp_compute.all(axis=1))
            lines.append(f"MLP branches: {cached} of the {total} that run their block reuse their cached output "
                         f"({cached / total:.1%}), at steps {_spans(at)}")
        if self.fp8_layers is not None:
            lines.append(f"linear layers in FP8 ({_FP8_FORMAT}): {len(self.fp8_layers)} of the block stacks' layers")
        return "\n".join(lines)


_BARS = "▁▂▃▄▅▆▇█"


def _spans(indices) -> str:
    """Ascending indices as "1, 3-5, 9"."""
    out, idx = [], [int(i) for i in indices]
    for i in idx:
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def sparkline(values) -> str:
    """One character per value in [0, 1], eight levels: a per-step curve that fits in a terminal line."""
    levels = np.clip(np.round(np.asarray(values, np.float64) * (len(_BARS) - 1)), 0, len(_BARS) - 1)
    return "".join(_BARS[int(v)] for v in levels)


# ----------------------------------------------------------------------------------------------------------------
# The file

# Schema 2: file section -> {key: CompressionPlan field}. methods.head and notes are written apart.
_SECTIONS = {
    "model": {"family": "family", "model_class": "model_class", "num_layers": "num_layers", "num_heads": "num_heads",
              "head_dim": "head_dim", "text_first": "text_first", "config": "model_config"},
    "run": {k: k for k in ("height", "width", "token_grid", "image_tokens", "text_len", "num_steps", "token_order")},
    "search": {k: k for k in ("candidates", "delta", "c")},
}
_TOP_KEYS = ("format", "schema_version", *_SECTIONS, "methods", "notes")
_METHOD_KINDS = ("head", "step", "block", "mlp", "linear")
_FP8_FORMAT = "e4m3"  # ditfa_jax.fp8: e4m3 weights per output channel, activations per token
_HEAD_KEYS = ("band", "head_window")
_HEAD_DERIVED = ("legend", "candidate_windows")  # written for readers of the file, optional when read
_STEP_DERIVED = ("kinds", "legend")
_BLOCK_DERIVED = ("legend",)  # also methods.mlp's
_FILE_PATHS = ({field: f"{section}.{key}" for section, keys in _SECTIONS.items() for key, field in keys.items()}
               | {"band": "methods.head.band", "head_window": "methods.head.head_window",
                  "step_kind": "methods.step.step_kind", "block_compute": "methods.block.block_compute",
                  "mlp_compute": "methods.mlp.mlp_compute",
                  "fp8_layers": "methods.linear.fp8_layers"})

# Schema 1: one flat object.
_V1_REQUIRED = ("head_window", "family", "model_class", "num_layers", "num_heads", "head_dim", "height", "width",
                "image_tokens", "text_len", "text_first", "num_steps")
_V1_OPTIONAL = ("candidates", "delta", "c", "model_config", "notes", "token_order")
_V1_INFORMATIONAL = ("format", "schema_version", "candidate_windows", "legend")


def _dump(v, indent: str = "") -> str:
    """JSON text: objects and nested lists indented by two spaces, each list of scalars compact on one line."""
    inner = indent + "  "
    if isinstance(v, dict) and v:
        items = ",\n".join(f"{inner}{json.dumps(k)}: {_dump(x, inner)}" for k, x in v.items())
        return "{\n" + items + "\n" + indent + "}"
    if isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v):
        return "[\n" + ",\n".join(inner + _dump(x, inner) for x in v) + "\n" + indent + "]"
    return json.dumps(v, separators=(",", ":"))


def _keys(obj, path: str, required, optional=()) -> None:
    """Check that obj is a JSON object with the keys ``required`` (and maybe ``optional``), naming the path."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    missing = [f"{path}.{k}" for k in required if k not in obj]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    unknown = sorted(set(obj) - set(required) - set(optional))
    if unknown:
        raise ValueError(f"unknown key(s) {[f'{path}.{k}' for k in unknown]}; {path} holds {[*required, *optional]}")


def _v2_fields(raw: dict) -> dict:
    """CompressionPlan keyword arguments from a schema-2 file."""
    unknown = sorted(set(raw) - set(_TOP_KEYS))
    if unknown:
        raise ValueError(f"unknown top-level key(s) {unknown}; expected {list(_TOP_KEYS)}")
    missing = [k for k in _TOP_KEYS if k not in raw]
    if missing:
        raise ValueError(f"missing top-level key(s) {missing}")
    if raw["format"] != _FORMAT:
        raise ValueError(f"format: expected {_FORMAT!r}, got {raw['format']!r}")
    kwargs = {}
    for section, keys in _SECTIONS.items():
        _keys(raw[section], section, tuple(keys))
        kwargs.update({field: raw[section][key] for key, field in keys.items()})
    methods = raw["methods"]
    if not isinstance(methods, dict):
        raise ValueError(f"methods: expected a JSON object, got {type(methods).__name__}")
    unknown = sorted(set(methods) - set(_METHOD_KINDS))
    if unknown:
        raise ValueError(f"methods: unknown kind(s) of method {unknown}; this ditfa-jax knows {list(_METHOD_KINDS)}")
    if "head" not in methods:
        raise ValueError("missing methods.head (the per-head methods, required in schema 2)")
    _keys(methods["head"], "methods.head", _HEAD_KEYS, optional=_HEAD_DERIVED)
    kwargs.update({k: methods["head"][k] for k in _HEAD_KEYS}, notes=raw["notes"])
    if "step" in methods:  # absent: every step computes
        _keys(methods["step"], "methods.step", ("step_kind",), optional=_STEP_DERIVED)
        kinds = methods["step"].get("kinds", list(STEP_KINDS))
        if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
            raise ValueError(f"methods.step.kinds: expected a list of step method names, got {kinds!r}")
        unknown = [k for k in kinds if k not in STEP_KINDS]
        if unknown:
            raise ValueError(f"methods.step.kinds: {unknown} not known to this ditfa-jax; it knows "
                             f"{list(STEP_KINDS)}")
        kwargs["step_kind"] = methods["step"]["step_kind"]
    if "block" in methods:  # absent: every block runs
        _keys(methods["block"], "methods.block", ("block_compute",), optional=_BLOCK_DERIVED)
        kwargs["block_compute"] = methods["block"]["block_compute"]
    if "mlp" in methods:  # absent: every MLP branch runs
        _keys(methods["mlp"], "methods.mlp", ("mlp_compute",), optional=_BLOCK_DERIVED)
        kwargs["mlp_compute"] = methods["mlp"]["mlp_compute"]
    if "linear" in methods:  # absent: linear layers in the model's own dtype
        _keys(methods["linear"], "methods.linear", ("fp8_layers",), optional=("format",))
        fmt = methods["linear"].get("format", _FP8_FORMAT)
        if fmt != _FP8_FORMAT:
            raise ValueError(f"methods.linear.format: {fmt!r} is not known to this ditfa-jax; it runs "
                             f"{_FP8_FORMAT!r} (ditfa_jax.fp8)")
        kwargs["fp8_layers"] = methods["linear"]["fp8_layers"]
    return _typed(kwargs, _FILE_PATHS)


def _v1_fields(raw: dict) -> dict:
    """CompressionPlan keyword arguments from a schema-1 file, with its meaning: the schema-1 band, and the token
    grid of the model config's vae_scale_factor (8 if absent) times the patch; vae_scale_factor leaves the config."""
    missing = [k for k in _V1_REQUIRED if k not in raw]
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    unknown = sorted(set(raw) - set(_V1_REQUIRED) - set(_V1_OPTIONAL) - set(_V1_INFORMATIONAL))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; expected {sorted(_V1_REQUIRED + _V1_OPTIONAL)}")
    kwargs = _typed({k: raw[k] for k in _V1_REQUIRED + _V1_OPTIONAL if k in raw}, {})
    config = kwargs.get("model_config")
    vae, patch = VAE_SCALE_FACTOR, None
    if isinstance(config, dict):
        vae = _int_field("model_config.vae_scale_factor", config.get("vae_scale_factor", vae), 1)
        kwargs["model_config"] = config = {k: v for k, v in config.items() if k != "vae_scale_factor"}
    if kwargs.get("model_class") in MODEL_CLASSES:  # else the plan refuses it by name
        model = (config_from_dict({**config, "_class_name": kwargs["model_class"]}, source="model_config")
                 if isinstance(config, dict) else MODEL_CLASSES[kwargs["model_class"]]())
        patch = family_of(model).latent_multiple(model)
    h, w, n, head_dim = (kwargs[k] for k in ("height", "width", "image_tokens", "head_dim"))
    kwargs["token_grid"] = None
    if patch and all(_is_int(v) and v >= 1 for v in (h, w, n)):  # else the plan refuses them by name
        step = vae * patch
        if h % step or w % step or (h // step) * (w // step) != n:
            raise ValueError(f"image_tokens: {n} does not match {h}x{w} pixels at {step} pixels per token "
                             f"(vae_scale_factor {vae} x patch {patch})")
        kwargs["token_grid"] = (h // step, w // step)
    if _is_int(head_dim) and head_dim >= 1 and head_dim not in V1_BAND:
        raise ValueError(f"head_dim: {head_dim} has no schema-1 band (known for head_dim {sorted(V1_BAND)})")
    kwargs["band"] = V1_BAND.get(head_dim)
    return kwargs


def _typed(kwargs: dict, paths: dict) -> dict:
    """kwargs with JSON lists made tuples (head_window, step_kind, block_compute, mlp_compute: arrays); a value of the wrong JSON
    type is refused by its path in the file."""
    where = lambda field: paths.get(field, field)  # noqa: E731
    for field, kind in (("family", str), ("model_class", str), ("token_order", str), ("text_first", bool)):
        if field in kwargs and not isinstance(kwargs[field], kind):
            raise ValueError(f"{where(field)}: expected a {kind.__name__}, got {kwargs[field]!r}")
    if "candidates" in kwargs:
        names = kwargs["candidates"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{where('candidates')}: expected a list of method names, got {names!r}")
        kwargs["candidates"] = tuple(names)
    for field in ("band", "token_grid"):
        if isinstance(kwargs.get(field), list):
            kwargs[field] = tuple(kwargs[field])
    hw = kwargs["head_window"]
    try:
        arr = np.array(hw) if isinstance(hw, list) else None
    except ValueError:
        arr = None
    if arr is None or arr.ndim != 3 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        got = "ragged/non-integer lists" if arr is None else f"shape {list(arr.shape)} dtype {arr.dtype}"
        raise ValueError(f"{where('head_window')}: expected integer lists [steps][layers][heads], got {got}")
    kwargs["head_window"] = arr.astype(np.int64)
    if "step_kind" in kwargs:
        names = kwargs["step_kind"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{where('step_kind')}: expected a list of step method names (one per step, of "
                             f"{list(STEP_KINDS)}), got {names!r}")
        kwargs["step_kind"] = step_kind_codes(names, where("step_kind"))
    for field in ("block_compute", "mlp_compute"):
        if field not in kwargs:
            continue
        bc = kwargs[field]
        try:
            arr = np.array(bc) if isinstance(bc, list) else None
        except ValueError:
            arr = None
        ok = arr is not None and arr.ndim == 2 and (arr.size == 0 or arr.dtype == bool or (
            np.issubdtype(arr.dtype, np.integer) and np.isin(arr, (0, 1)).all()))
        if not ok:
            got = "ragged/non-list" if arr is None else f"shape {list(arr.shape)} dtype {arr.dtype}"
            raise ValueError(f"{where(field)}: expected lists of 0/1 [steps][layers], got {got}")
        kwargs[field] = arr.astype(bool)
    return kwargs


def _checked_fp8_layers(names) -> tuple[str, ...] | None:
    """fp8_layers as a sorted tuple of distinct non-empty paths, or None; ValueError for anything else."""
    if names is None:
        return None
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not all(
            isinstance(n, str) and n for n in names):
        raise ValueError(f"fp8_layers: expected a list of layer paths (ditfa_jax.fp8.fp8_layers, e.g. "
                         f"'stack0/attn/to_q'), got {names!r}")
    if not names:
        raise ValueError("fp8_layers: an empty list; a plan without FP8 layers has no methods.linear (None)")
    if len(set(names)) != len(names):
        raise ValueError(f"fp8_layers: {sorted(n for n in set(names) if names.count(n) > 1)} listed twice")
    return tuple(sorted(names))


def _check_candidate_windows(plan: CompressionPlan, head: dict) -> None:
    """methods.head.candidate_windows, when present, must be what search.candidates gives (it is derived)."""
    want = {n: method_window(n, plan.image_tokens) for n in plan.candidates}
    if "candidate_windows" in head and head["candidate_windows"] != want:
        raise ValueError(f"methods.head.candidate_windows: {head['candidate_windows']!r} is not what search.candidates "
                         f"gives at run.image_tokens {plan.image_tokens} ({want}); it is derived: edit "
                         f"search.candidates, or drop it")
