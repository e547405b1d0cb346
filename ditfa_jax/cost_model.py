"""What a run costs in time on a target GPU, from measurements: one axis on which every method can be compared.

A `StepCostModel` is the measured time of one transformer step of a model at one resolution as a function of the
attention FLOPs kept in that step, piecewise linear through measured points: (0, the step without attention: every
head cached), the compressed sampler's measured steps, and (1, the dense step). Between measured points it
interpolates; it never extrapolates beyond them. A run's cost is the sum of its steps' times; dense with fewer
steps costs that many dense steps. Costs are reported relative to the dense run with all its steps.

A model measured at a layout (`AttentionLayout`: the token counts of the measured step) prices a plan's head
methods at that layout: an arrow_8 head keeps 18 % of a FLUX-2K head's FLOPs but most of a small testbed head's,
so a plan searched on the testbed is priced as its methods would run at the measured size.

A block whose MLP branch reuses its cached output (`CompressionPlan.mlp_compute`) saves ``mlp_share`` of the
block's time outside attention (`StepCostModel.mlp_share`).

FP8 heads (method "fp8") keep every FLOP of a full head; they are priced by their measured time instead
(`Fp8HeadTime`: a share of a full head's time per FP8 head, plus an overhead once per layer that has any). Where
that exceeds a full head's time, `plan_cost` prices the excess at dense attention's rate.

The models here are FLUX.1-dev-sized steps (random bf16 weights, batch 1, 512 text tokens) measured on the
project's H200 with the Mosaic GPU backend (`benchmarks/RESULTS.md`, "End to end"): the small testbed models'
own step times are dominated by overheads, so the testbed sweep prices its plans with these.
"""

from __future__ import annotations

import dataclasses

import numpy as np

import pallas_kernels
from ditfa_jax.methods import FP8_WINDOW, flop_windows, method_window

__all__ = ["AttentionLayout", "StepCostModel", "COST_MODELS", "get_cost_model", "Fp8HeadTime", "FP8_HEAD_TIMES",
           "fp8_head_time", "attention_kept", "plan_cost", "steps_cost", "gated_cost"]


@dataclasses.dataclass(frozen=True)
class AttentionLayout:
    """The attention shape of a measured step: image and text tokens (text first), head size, arrow band."""

    image_tokens: int
    text_len: int
    head_dim: int
    band: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class StepCostModel:
    """Step time (ms) against the attention FLOPs kept in the step, through measured points."""

    name: str
    description: str
    kept: tuple[float, ...]  # attention FLOPs kept, increasing, first 0.0 and last 1.0
    step_ms: tuple[float, ...]  # measured step time at each `kept`
    source: str  # device, date, versions and the command that measured it
    layout: AttentionLayout | None = None  # where the heads are priced (None: at the plan's own layout)
    mlp_share: float | None = None  # share of the step outside attention spent in the MLP branches (None: unknown)
    mlp_source: str = ""  # how mlp_share was found

    def __post_init__(self):
        kept, ms = np.asarray(self.kept, float), np.asarray(self.step_ms, float)
        if kept.shape != ms.shape or kept.size < 2 or kept[0] != 0.0 or kept[-1] != 1.0 or np.any(np.diff(kept) <= 0):
            raise ValueError(f"cost model {self.name!r}: kept must rise from 0.0 to 1.0 with one time per point, got "
                             f"kept={self.kept}, step_ms={self.step_ms}")
        if np.any(ms <= 0):
            raise ValueError(f"cost model {self.name!r}: step times must be positive, got {self.step_ms}")
        if self.mlp_share is not None and not 0 <= self.mlp_share < 1:
            raise ValueError(f"cost model {self.name!r}: mlp_share must lie in [0, 1), got {self.mlp_share}")

    @property
    def dense_ms(self) -> float:
        return float(self.step_ms[-1])

    @property
    def attention_share(self) -> float:
        """Share of the dense step spent in attention."""
        return 1.0 - self.step_ms[0] / self.step_ms[-1]

    def step_time(self, kept) -> np.ndarray:
        """Step time (ms) at attention FLOPs kept ``kept`` (scalar or array in [0, 1])."""
        kept = np.asarray(kept, float)
        if np.any((kept < 0) | (kept > 1)):
            raise ValueError(f"attention FLOPs kept must lie in [0, 1], got {kept.min()}..{kept.max()}")
        return np.interp(kept, self.kept, self.step_ms)


# The MLP branches' share of a FLUX.1-dev step outside attention, estimated (an H100 measurement agrees: source): the
# profiled 1024^2 step's GEMMs take 81.0 of its 118.5 ms outside attention (H200, 2026-12-02, benchmarks/RESULTS.md
# "The dense step against torch.compile"), and the MLP branches do 2/3 of the GEMM FLOPs in every block (8 d^2 of
# 12 d^2 per token); at 2048^2 the GEMM time is scaled by the tokens (x 3.67).
_FLUX_MLP_SHARE = {1024: 0.456, 2048: 0.507}
_FLUX_MLP_SOURCE = ("estimated: 2/3 of the profiled GEMM time of the 1024^2 step (H200, 2026-12-02, "
                    "bench_model.py --profile), scaled by the tokens at 2048^2; checked on an H100 (2026-12-08, "
                    "bench_plan.py --mlp-plans 1024,2048): 0.457-0.479 at 1024^2, 0.498-0.522 at 2048^2")


def _flux_dev(size: int, dense: float, attention: float, measured: dict[float, float]) -> StepCostModel:
    points = {0.0: dense - attention, **measured, 1.0: dense}
    layout = AttentionLayout(image_tokens=(size // 16) ** 2, text_len=512, head_dim=128,
                             band=tuple(pallas_kernels.default_band(128)))
    return StepCostModel(
        name=f"h200-flux-dev-{size}", description=f"FLUX.1-dev-sized step at {size}^2 on an H200 (Mosaic GPU backend)",
        kept=tuple(sorted(points)), step_ms=tuple(points[k] for k in sorted(points)),
        source="NVIDIA H200, 2026-12-01, jax 0.11.2: benchmarks/bench_plan.py --sampler 1024,2048 --backend "
               "mosaic_gpu (dense step; one layer of cuDNN attention x 57 layers for the attention time; random "
               "full / arrow_8 / cached plans at ~60 / 45 / 32 % kept); raw benchmarks/mosaic/sampler_mosaic_h200.jsonl",
        layout=layout, mlp_share=_FLUX_MLP_SHARE[size], mlp_source=_FLUX_MLP_SOURCE)


COST_MODELS = {
    m.name: m for m in (
        _flux_dev(1024, 143.63, 25.1, {0.321: 131.95, 0.450: 134.35, 0.600: 137.69}),
        _flux_dev(2048, 709.2, 318.4, {0.319: 507.59, 0.449: 546.35, 0.599: 595.81}),
    )
}


def get_cost_model(name: str) -> StepCostModel:
    if name not in COST_MODELS:
        raise ValueError(f"cost model {name!r}: expected one of {sorted(COST_MODELS)}")
    return COST_MODELS[name]


@dataclasses.dataclass(frozen=True)
class Fp8HeadTime:
    """What FP8 heads (method "fp8") cost at one attention shape, relative to the layer's full bf16 attention.

    Each FP8 head takes ``head_ratio`` of a full head's time; a layer with any FP8 head pays ``layer_overhead``
    (a share of the layer's dense attention time) once: quantising q, k, v (over every head) and the second launch.
    """

    head_ratio: float
    layer_overhead: float

    def layer_time(self, fp8_heads, heads: int) -> np.ndarray:
        """The FP8 heads' share of a layer's dense attention time, for ``fp8_heads`` of ``heads`` in FP8."""
        n = np.asarray(fp8_heads, float)
        return n / heads * self.head_ratio + np.where(n > 0, self.layer_overhead, 0.0)


# Measured FP8 heads, {head_dim: {tokens: Fp8HeadTime}}: NVIDIA H100 80GB HBM3, 2026-12-07, jax 0.11.2, batch 1,
# 24 heads, Mosaic GPU backend (`benchmarks/bench_attention.py --quick --no-flex --shapes FLUX-1K,FLUX-2K,SD3-1K
# --plans full,mixed --backends mosaic_gpu --fp8`; benchmarks/RESULTS.md, "FP8 heads"). Fitted per shape from two
# plans timed beside all-full bf16: every head FP8 = overhead + 24 t8, every other head FP8 = 12 t + overhead + 12 t8.
FP8_HEAD_TIMES = {
    128: {4608: Fp8HeadTime(head_ratio=0.643, layer_overhead=0.557),  # FLUX-1K
          16896: Fp8HeadTime(head_ratio=0.898, layer_overhead=0.040),  # FLUX-2K
          66048: Fp8HeadTime(head_ratio=0.771, layer_overhead=0.060)},  # FLUX-4K (2026-12-08, the same fit)
    64: {4429: Fp8HeadTime(head_ratio=0.987, layer_overhead=0.435)},  # SD3-1K
}


def fp8_head_time(tokens: int, head_dim: int) -> Fp8HeadTime:
    """The measured `Fp8HeadTime` for ``tokens`` (text + image) at ``head_dim``: interpolated in log(tokens)
    between the measured sizes, held at the nearest one outside them; ValueError for an unmeasured head size."""
    if head_dim not in FP8_HEAD_TIMES:
        raise ValueError(f"FP8 heads: no measured time at head_dim {head_dim} (measured: {sorted(FP8_HEAD_TIMES)}); "
                         f"price them at a measured layout (`fp8_head_time(tokens, head_dim)` of the target model)")
    points = sorted(FP8_HEAD_TIMES[head_dim].items())
    at = np.log(np.asarray([t for t, _ in points], float))
    x = np.log(float(tokens))
    return Fp8HeadTime(head_ratio=float(np.interp(x, at, [p.head_ratio for _, p in points])),
                       layer_overhead=float(np.interp(x, at, [p.layer_overhead for _, p in points])))


def attention_kept(plan, model: StepCostModel) -> np.ndarray:
    """float64 [steps, layers]: the attention the plan's head methods keep where the block runs, as a share of the
    dense layer's, at the model's layout: each head's method (full, cached, arrow_K; a window not named by a method
    is scaled with the image tokens) re-expressed there by its FLOPs (`CompressionPlan.flops_kept_per_step_layer`
    when the model has none); FP8 heads by their measured time there (`fp8_head_time`), which may exceed 1."""
    if model.layout is None:
        kept = np.asarray(plan.flops_kept_per_step_layer(), float)
        at_tokens, at_head_dim = plan.image_tokens + plan.text_len, plan.head_dim
    else:
        at = model.layout
        windows = []
        for name in plan.method_names():
            if name.startswith("arrow(w="):
                windows.append(max(1, round(int(name[len("arrow(w="):-1]) * at.image_tokens / plan.image_tokens)))
            else:
                windows.append(method_window(name, at.image_tokens))
        priced = pallas_kernels.plan_cost(flop_windows(windows), batch=1, tokens=at.image_tokens + at.text_len,
                                          text_len=at.text_len, text_first=True, head_dim=at.head_dim, band=at.band)
        per_method = np.asarray(priced.flops, float) / priced.dense_flops
        kept = per_method[plan.method_codes()].mean(axis=2)
        at_tokens, at_head_dim = at.image_tokens + at.text_len, at.head_dim
    fp8 = plan.head_window == FP8_WINDOW
    if fp8.any():
        fp8_heads = fp8.sum(axis=2)
        kept = kept - fp8_heads / plan.num_heads + fp8_head_time(at_tokens, at_head_dim).layer_time(
            fp8_heads, plan.num_heads)
    return kept


def plan_cost(plan, model: StepCostModel) -> float:
    """A plan's run time relative to the dense run of the same step count. A step costs its attention by what it
    keeps where its blocks run (`attention_kept`) plus the rest of the step in proportion to the blocks that run
    (`work_per_step_layer`: 0 on a reused or extrapolated step), less ``model.mlp_share`` of it for each block
    that runs with its MLP branch cached."""
    work_layers = np.asarray(plan.work_per_step_layer(), float)
    kept = (attention_kept(plan, model) * work_layers).mean(axis=1)
    work = work_layers.mean(axis=1)
    if plan.uses_mlp_caching:
        if model.mlp_share is None:
            raise ValueError(f"cost model {model.name!r} has no MLP share (mlp_share): it cannot price a plan that "
                             "caches MLP branches")
        work = work - model.mlp_share * plan.cached_mlps().mean(axis=1)
    rest = model.step_ms[0]
    above = np.maximum(kept - 1.0, 0.0)  # FP8 heads slower than full: dense attention's time per unit above 1
    step_ms = rest * work + (model.step_time(np.minimum(kept, 1.0)) - rest) + above * (model.dense_ms - rest)
    return float(step_ms.sum() / (len(kept) * model.dense_ms))


def steps_cost(steps: int, full_steps: int) -> float:
    """Dense sampling with ``steps`` instead of ``full_steps`` steps, relative to the full run."""
    if not 1 <= steps <= full_steps:
        raise ValueError(f"steps {steps}: expected 1..{full_steps}")
    return steps / full_steps


def gated_cost(skipped, first_blocks: int, num_layers: int) -> float:
    """A dynamic-gate run (`ditfa_jax.denoise.DynamicGate`) relative to dense, blocks costing alike: ``skipped``
    bool [steps] marks the steps whose blocks after the first ``first_blocks`` reused their residuals; such a step
    costs its first blocks' share, and every other step after the first pays its first blocks twice (they run
    before the gate decides)."""
    skipped = np.asarray(skipped, bool)
    if skipped.ndim != 1 or skipped[:1].any():
        raise ValueError(f"skipped: expected bool [steps] with step 0 computed, got {skipped.tolist()}")
    share = first_blocks / num_layers
    per_step = np.where(skipped, share, 1.0 + share)
    per_step[0] = 1.0
    return float(per_step.mean())
