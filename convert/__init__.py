"""Checkpoint conversion: diffusers-format (single or sharded safetensors) and BFL single-file FLUX -> JAX params."""

from convert.bfl_flux import BFLFluxSource, infer_flux_config, is_bfl_flux
from convert.checkpoint import TensorSource, checkpoint_files
from convert.diffusers_to_jax import convert_state
from convert.streaming import ConversionError

__all__ = ["BFLFluxSource", "ConversionError", "TensorSource", "checkpoint_files", "convert_state",
           "infer_flux_config", "is_bfl_flux"]
