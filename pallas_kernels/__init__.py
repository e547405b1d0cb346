"""Pallas kernels of ditfa-jax: head-wise (full / arrow / cached) attention.

Public API:

* :func:`headwise_attention` -- the function, on a chosen or the platform's
  default backend;
* :data:`BACKENDS`, :func:`get_backend` -- the registered backends, in order
  of preference: ``"mosaic_gpu"`` (Pallas Mosaic GPU on Hopper, interpret
  mode elsewhere when named; the automatic choice at the head sizes and
  lengths of ``api.MOSAIC_GPU_AUTOMATIC``; :class:`MosaicConfig`),
  ``"triton"`` (Pallas, Triton lowering on a GPU, interpret
  mode elsewhere when named) and ``"xla"`` (dense masked reference, any
  platform); :class:`TritonConfig` is the Triton backend's launch
  configuration;
* :func:`reference_headwise_attention` -- :func:`headwise_attention` on
  backend ``"xla"``;
* :func:`plan_cost`, :class:`PlanCost` -- tiles and FLOPs a plan computes
  (host, numpy);
* :mod:`schedule` -- the single definition of the function (tile schedule);
* :func:`default_band` -- the band granularity per head_dim.
"""

from pallas_kernels import schedule
from pallas_kernels.api import BACKENDS, Backend, get_backend, headwise_attention, reference_headwise_attention
from pallas_kernels.cost import PlanCost, plan_cost
from pallas_kernels.mosaic_backend import MosaicConfig
from pallas_kernels.schedule import default_band
from pallas_kernels.triton_backend import TritonConfig

__all__ = [
    "headwise_attention",
    "reference_headwise_attention",
    "BACKENDS",
    "Backend",
    "get_backend",
    "TritonConfig",
    "MosaicConfig",
    "plan_cost",
    "PlanCost",
    "schedule",
    "default_band",
]
