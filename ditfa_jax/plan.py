"""Compression plans: one attention method per (step, layer, head), saved as a small JSON file.

A plan's payload is ``head_window: int32 [steps, layers, heads]`` in the kernel's encoding (-1 full, 0 cached,
w > 0 arrow with image-band half-width w tokens, see :mod:`ditfa_jax.methods`); the sampler scans over its first
axis. Everything else is metadata that ties the plan to the model and run it was calibrated for (model class,
layer/head counts, resolution, text length, step count), so a plan cannot silently be applied to another setting.

Layers are counted in run order (FLUX: the double-stream blocks, then the single-stream blocks; SD3: the joint
blocks). Step 0 is always full: a cached head needs a computed value first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np

from ditfa_jax.configs import config_to_dict
from ditfa_jax.files import atomic_write
from ditfa_jax.methods import (CACHED_WINDOW, DEFAULT_CANDIDATES, FULL_WINDOW, candidate_windows, check_candidates,
                               method_window)
from ditfa_jax.token_order import TOKEN_ORDERS
from pallas_kernels.cost import PlanCost, plan_cost

__all__ = ["SCHEMA_VERSION", "CompressionPlan", "image_tokens_for", "sparkline"]

SCHEMA_VERSION = 1

_FAMILY_OF_CLASS = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3"}
_TEXT_FIRST = {"flux": True, "sd3": False}
_FORMAT = "ditfa-jax compression plan"
_LEGEND = "head_window[step][layer][head]: -1 full, 0 cached, w>0 arrow (image-band half-width w tokens)"


# ----------------------------------------------------------------------------------------------------------------
# Geometry (pixels -> image tokens). Here for now: it is moving into the model-family interface.


def image_tokens_for(config, height: int, width: int) -> int:
    """Image tokens of a model at ``height`` x ``width`` pixels (FLUX: 2x2 packed latents; SD3: patchified)."""
    patch = 2 if config.family == "flux" else config.patch_size
    step = config.vae_scale_factor * patch
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0 or v % step:
            raise ValueError(f"{name}: expected a positive multiple of {step} pixels for {config.family}, got {v!r}")
    return (height // step) * (width // step)


# ----------------------------------------------------------------------------------------------------------------
# The plan


def _int_field(name: str, v, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
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


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class CompressionPlan:
    """Per-(step, layer, head) attention methods plus the setting they were calibrated for.

    ``head_window``: int32 [num_steps, num_layers, num_heads] (-1 full, 0 cached, w>0 arrow), read-only.
    ``candidates``/``delta``/``c``: the search that made it (``delta``/``c`` None for hand-made plans).
    ``model_config``: the model's config dict (optional); when present, :meth:`check_compatible` also compares it,
    which tells apart models with equal layer/head counts (e.g. SD3-medium and SD3.5-medium).
    ``notes``: free-form JSON-serialisable facts (calibration time, prompt count, ...).
    """

    head_window: np.ndarray
    family: str
    model_class: str
    num_layers: int
    num_heads: int
    head_dim: int
    height: int
    width: int
    image_tokens: int
    text_len: int
    text_first: bool
    num_steps: int
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES
    delta: float | None = None
    c: float | None = None
    schema_version: int = SCHEMA_VERSION
    model_config: dict | None = None
    notes: dict = dataclasses.field(default_factory=dict)
    token_order: str = "raster"

    def __post_init__(self):
        put = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"schema_version: this ditfa-jax reads schema {SCHEMA_VERSION}, got "
                             f"{self.schema_version!r}")
        if self.model_class not in _FAMILY_OF_CLASS:
            raise ValueError(f"model_class: expected one of {sorted(_FAMILY_OF_CLASS)}, got {self.model_class!r}")
        if self.family != _FAMILY_OF_CLASS[self.model_class]:
            raise ValueError(f"family: {self.model_class} is family {_FAMILY_OF_CLASS[self.model_class]!r}, "
                             f"got {self.family!r}")
        if not isinstance(self.text_first, (bool, np.bool_)) or bool(self.text_first) != _TEXT_FIRST[self.family]:
            raise ValueError(f"text_first: {self.family} puts text {'first' if _TEXT_FIRST[self.family] else 'last'} "
                             f"(text_first={_TEXT_FIRST[self.family]}), got {self.text_first!r}")
        put("text_first", bool(self.text_first))
        for name, minimum in (("num_layers", 1), ("num_heads", 1), ("head_dim", 1), ("height", 1), ("width", 1),
                              ("image_tokens", 1), ("text_len", 0), ("num_steps", 1)):
            put(name, _int_field(name, getattr(self, name), minimum))
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
        if hw.size and (hw.min() < -1 or hw.max() > np.iinfo(np.int32).max):
            raise ValueError(f"head_window: values must lie in [-1, 2**31-1] (-1 full, 0 cached, w>0 arrow), got "
                             f"range [{hw.min()}, {hw.max()}]")
        if (hw[0] != FULL_WINDOW).any():
            layer, head = (int(i) for i in np.argwhere(hw[0] != FULL_WINDOW)[0])
            raise ValueError(f"head_window: step 0 must be all full (-1) -- a cached head needs a computed value "
                             f"first; got {int(hw[0, layer, head])} at layer {layer}, head {head}")
        hw = np.array(hw, dtype=np.int32)
        hw.setflags(write=False)
        put("head_window", hw)

    # --- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config, head_window, *, height: int, width: int, text_len: int,
                    image_tokens: int | None = None, candidates=DEFAULT_CANDIDATES, delta: float | None = None,
                    c: float | None = None, notes: dict | None = None, token_order: str = "raster"
                    ) -> CompressionPlan:
        """A plan for ``config`` at ``height`` x ``width`` with the given windows [steps, layers, heads]."""
        want = image_tokens_for(config, height, width)
        if image_tokens is not None and image_tokens != want:
            raise ValueError(f"image_tokens: {config.family} at {height}x{width} has {want} image tokens, "
                             f"got {image_tokens}")
        hw = np.asarray(head_window)
        raw = config_to_dict(config)
        return cls(head_window=hw, family=config.family, model_class=raw["_class_name"],
                   num_layers=config.total_layers, num_heads=config.num_attention_heads,
                   head_dim=config.attention_head_dim, height=height, width=width, image_tokens=want,
                   text_len=text_len, text_first=config.text_first,
                   num_steps=hw.shape[0] if hw.ndim else 0, candidates=candidates, delta=delta, c=c,
                   model_config=_normalise_json(raw), notes=dict(notes or {}), token_order=token_order)

    @classmethod
    def full(cls, config, *, height: int, width: int, text_len: int, num_steps: int,
             image_tokens: int | None = None, candidates=DEFAULT_CANDIDATES, notes: dict | None = None
             ) -> CompressionPlan:
        """The uncompressed plan (every head full at every step)."""
        num_steps = _int_field("num_steps", num_steps, 1)
        hw = np.full((num_steps, config.total_layers, config.num_attention_heads), FULL_WINDOW, np.int32)
        return cls.from_config(config, hw, height=height, width=width, text_len=text_len,
                               image_tokens=image_tokens, candidates=candidates, notes=notes)

    def replace(self, **changes) -> CompressionPlan:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # --- identity ----------------------------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.head_window.shape)

    def fingerprint(self) -> dict:
        """The setting the plan is valid for: model class/shape, resolution, token counts, step count."""
        return {"model_class": self.model_class, "family": self.family, "num_layers": self.num_layers,
                "num_heads": self.num_heads, "head_dim": self.head_dim, "text_first": self.text_first,
                "height": self.height, "width": self.width, "image_tokens": self.image_tokens,
                "text_len": self.text_len, "num_steps": self.num_steps}

    @staticmethod
    def run_fingerprint(config, *, height: int, width: int, text_len: int, num_steps: int) -> dict:
        """:meth:`fingerprint` of a requested run (what a plan must match)."""
        return {"model_class": config_to_dict(config)["_class_name"], "family": config.family,
                "num_layers": config.total_layers, "num_heads": config.num_attention_heads,
                "head_dim": config.attention_head_dim, "text_first": config.text_first, "height": height,
                "width": width, "image_tokens": image_tokens_for(config, height, width), "text_len": text_len,
                "num_steps": num_steps}

    def digest(self) -> str:
        """Short content hash (fingerprint, search settings and windows; not notes), e.g. for cache keys."""
        meta = json.dumps([self.fingerprint(), list(self.candidates), self.delta, self.c]
                          + ([self.token_order] if self.token_order != "raster" else []), sort_keys=True)
        h = hashlib.sha256(meta.encode())
        h.update(np.ascontiguousarray(self.head_window, dtype="<i4").tobytes())
        return h.hexdigest()[:16]

    def check_compatible(self, config, *, height: int, width: int, text_len: int, num_steps: int) -> None:
        """Raise ValueError naming every field where this plan differs from the requested run."""
        want = self.run_fingerprint(config, height=height, width=width, text_len=text_len, num_steps=num_steps)
        have = self.fingerprint()
        bad = [f"  {k}: plan has {have[k]!r}, requested {want[k]!r}" for k in want if have[k] != want[k]]
        if not bad and self.model_config is not None:  # same shape: tell apart variants (e.g. SD3 vs SD3.5-medium)
            cfg = _normalise_json(config_to_dict(config))
            keys = sorted(set(cfg) | set(self.model_config))
            bad += [f"  model_config.{k}: plan has {self.model_config.get(k)!r}, requested {cfg.get(k)!r}"
                    for k in keys if self.model_config.get(k) != cfg.get(k)]
        if bad:
            raise ValueError("compression plan does not match this run (calibrate a plan for it, or use the "
                             "matching model/resolution/steps):\n" + "\n".join(bad))

    def __eq__(self, other):
        if not isinstance(other, CompressionPlan):
            return NotImplemented
        return all(getattr(self, f.name) == getattr(other, f.name) for f in dataclasses.fields(self)
                   if f.name != "head_window") and np.array_equal(self.head_window, other.head_window)

    __hash__ = None

    # --- files -------------------------------------------------------------------------------------------------

    def to_json(self) -> str:
        """The file text: indented metadata, then head_window with one line per (step, layer)."""
        n_img = self.image_tokens
        meta = {"format": _FORMAT, "schema_version": self.schema_version}
        for f in dataclasses.fields(self):
            if f.name not in ("head_window", "schema_version", "notes", "model_config"):
                v = getattr(self, f.name)
                meta[f.name] = list(v) if isinstance(v, tuple) else v
        meta["candidate_windows"] = {n: method_window(n, n_img) for n in self.candidates}
        meta["model_config"] = self.model_config
        meta["notes"] = self.notes
        meta["legend"] = _LEGEND
        marker = "@@HEAD_WINDOW@@"
        meta["head_window"] = marker
        text = json.dumps(meta, indent=2, default=_json_default)
        steps = []
        for step in self.head_window.tolist():
            rows = ",\n      ".join(json.dumps(row, separators=(",", ":")) for row in step)
            steps.append("[\n      " + rows + "\n    ]")
        arr = "[\n    " + ",\n    ".join(steps) + "\n  ]"
        head, sep, tail = text.rpartition(json.dumps(marker))
        assert sep, "placeholder lost"
        return head + arr + tail + "\n"

    def save(self, path) -> Path:
        """Write the plan to ``path`` (JSON) atomically: a temp file in the same folder, then os.replace."""
        path = Path(path)
        atomic_write(path, self.to_json().encode())
        return path

    @classmethod
    def load(cls, path) -> CompressionPlan:
        """Read and validate a plan file; errors name the file and the field."""
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
        if raw["schema_version"] != SCHEMA_VERSION:
            raise ValueError(f"{source}: field 'schema_version' is {raw['schema_version']!r}; this ditfa-jax reads "
                             f"schema {SCHEMA_VERSION}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        informational = {"format", "candidate_windows", "legend"}
        required = [n for n, f in fields.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [n for n in required if n not in raw]
        if missing:
            raise ValueError(f"{source}: missing field(s) {missing}")
        unknown = sorted(set(raw) - set(fields) - informational)
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown}; expected {sorted(fields)}")
        types = {"family": str, "model_class": str, "text_first": bool, "notes": dict, "token_order": str}
        for name, t in types.items():
            if name in raw and not isinstance(raw[name], t):
                raise ValueError(f"{source}: field '{name}' must be a {t.__name__}, got {raw[name]!r}")
        if "candidates" in raw:
            if not isinstance(raw["candidates"], list) or not all(isinstance(n, str) for n in raw["candidates"]):
                raise ValueError(f"{source}: field 'candidates' must be a list of method names, got "
                                 f"{raw['candidates']!r}")
        hw = raw["head_window"]
        try:
            arr = np.array(hw) if isinstance(hw, list) else None
        except ValueError:
            arr = None
        if arr is None or arr.ndim != 3 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            got = "ragged/non-integer lists" if arr is None else f"shape {list(arr.shape)} dtype {arr.dtype}"
            raise ValueError(f"{source}: field 'head_window' must be integer lists [steps][layers][heads], got {got}")
        kwargs = {n: raw[n] for n in fields if n in raw}
        kwargs["head_window"] = arr.astype(np.int64)
        if "candidates" in kwargs:
            kwargs["candidates"] = tuple(kwargs["candidates"])
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    # --- accounting --------------------------------------------------------------------------------------------

    def cost(self, batch: int = 1, *, block_q: int | None = None, block_k: int | None = None) -> PlanCost:
        """Exact attention FLOPs per head, :class:`pallas_kernels.PlanCost` over [steps, layers, heads]."""
        uniq, inv = np.unique(self.head_window, return_inverse=True)  # a head's cost depends on its window only
        pc = plan_cost(uniq, batch=batch, tokens=self.image_tokens + self.text_len, text_len=self.text_len,
                       text_first=self.text_first, head_dim=self.head_dim, block_q=block_q, block_k=block_k)
        inv = inv.reshape(self.head_window.shape)
        per_head = {f.name: getattr(pc, f.name)[inv] for f in dataclasses.fields(pc)
                    if isinstance(getattr(pc, f.name), np.ndarray)}  # every per-head array, whatever PlanCost holds
        return dataclasses.replace(pc, **per_head)

    def flops_kept_per_step_layer(self) -> np.ndarray:
        """float64 [steps, layers]: attention FLOPs computed over the dense count."""
        return np.asarray(self.cost().flop_fraction, dtype=np.float64)

    def flops_kept_per_step(self) -> np.ndarray:
        """float64 [steps]."""
        return self.flops_kept_per_step_layer().mean(axis=1)

    def flops_kept_fraction(self) -> float:
        """Attention FLOPs of the whole run over those of the uncompressed run."""
        return float(self.flops_kept_per_step_layer().mean())

    def method_names(self) -> list[str]:
        """Names in :meth:`method_counts` order: full, cached, the arrow candidates, then other windows."""
        named = {w: n for n, w in reversed(list(zip(self.candidates, candidate_windows(self.candidates,
                                                                                      self.image_tokens))))}
        extra = sorted(set(np.unique(self.head_window).tolist()) - set(named) - {FULL_WINDOW, CACHED_WINDOW})
        arrows = [n for n in self.candidates if n != "cached"]
        return ["full", "cached"] + arrows + [f"arrow(w={w})" for w in extra]

    def method_codes(self) -> np.ndarray:
        """int [steps, layers, heads]: index of each head's method in :meth:`method_names`."""
        names = self.method_names()
        code = np.empty(self.head_window.shape, np.int64)
        windows = {"full": FULL_WINDOW, "cached": CACHED_WINDOW}
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
        return "\n".join([
            f"{self.model_class} {self.height}x{self.width} ({self.image_tokens} image + {self.text_len} text "
            f"tokens): {self.num_steps} steps x {self.num_layers} layers x {self.num_heads} heads, {search}",
            f"attention FLOPs kept {kept:.1%} (removed {1 - kept:.1%})",
            f"heads: {shares}",
            f"per step kept: min {per_step[lo]:.1%} (step {lo}), max {per_step[hi]:.1%} (step {hi})",
            f"per step kept, step 0 first (0 {_BARS[0]} .. {_BARS[-1]} 100%): {sparkline(per_step)}",
        ])


_BARS = "▁▂▃▄▅▆▇█"


def sparkline(values) -> str:
    """One character per value in [0, 1], eight levels: a per-step curve that fits in a terminal line."""
    levels = np.clip(np.round(np.asarray(values, np.float64) * (len(_BARS) - 1)), 0, len(_BARS) - 1)
    return "".join(_BARS[int(v)] for v in levels)
