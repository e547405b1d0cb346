"""Pallas kernels of ditfa-jax: head-wise (full / arrow / cached) attention.

Public API:

* :func:`headwise_attention` -- the kernel (Pallas, Triton lowering on GPU,
  interpret mode on CPU);
* :func:`reference_headwise_attention` -- the same function, dense pure JAX;
* :func:`plan_cost` -- tiles and FLOPs a plan computes (host, numpy);
* :mod:`schedule` -- the tile schedule all three share;
* :func:`default_block_sizes` -- block sizes per head_dim.
"""

from pallas_kernels import schedule
from pallas_kernels.config import default_block_sizes
from pallas_kernels.cost import PlanCost, plan_cost
from pallas_kernels.headwise import headwise_attention
from pallas_kernels.reference import reference_headwise_attention

__all__ = [
    "headwise_attention",
    "reference_headwise_attention",
    "plan_cost",
    "PlanCost",
    "schedule",
    "default_block_sizes",
]
