"""Default block sizes and launch parameters of the head-wise attention kernel.

The block sizes are part of the computed function (the arrow band is
tile-granular), so the kernel, :func:`pallas_kernels.reference_headwise_attention`
and :func:`pallas_kernels.plan_cost` all take their defaults from
:func:`default_block_sizes`, which depends on ``head_dim`` only.

Chosen on an H100 80GB HBM3 (jax 0.11.2, Pallas Triton lowering, bf16), see
benchmarks/RESULTS.md, section "Head-wise attention kernel".
"""
from __future__ import annotations

# head_dim -> (block_q, block_k)
_DEFAULT_BLOCKS = {
    16: (128, 64),
    32: (128, 64),
    64: (128, 64),
    128: (128, 128),
    256: (64, 64),
}

# (head_dim, itemsize) -> (num_warps, num_stages) for the compiled (GPU) kernel.
_DEFAULT_LAUNCH = {
    (64, 2): (8, 3),
    (128, 2): (8, 3),
}


# Grid order and loop structure of the compiled kernel (measured on the H100,
# see RESULTS.md): heads in index order (ranking heads heavy-first was 4-10 %
# slower on mixed plans at FLUX-1K/SD3-1K and equal at FLUX-2K), and one
# pipelined loop over both key-tile ranges.
SORT_HEADS = False
SINGLE_LOOP = True


def default_block_sizes(head_dim: int) -> tuple[int, int]:
  """``(block_q, block_k)`` used when the caller passes ``None``."""
  if head_dim in _DEFAULT_BLOCKS:
    return _DEFAULT_BLOCKS[head_dim]
  raise ValueError(
      f"head_dim={head_dim} is not supported: expected one of "
      f"{sorted(_DEFAULT_BLOCKS)}")


def default_launch(head_dim: int, itemsize: int, block_q: int,
                   block_k: int) -> tuple[int, int]:
  """``(num_warps, num_stages)`` for the Triton compilation."""
  if itemsize >= 4:
    # float32 tiles are twice as large: keep shared memory within the H100's
    # 227 KiB by not multi-buffering the key/value tiles.
    return (8 if head_dim >= 128 or block_q >= 128 else 4), 1
  if (head_dim, itemsize) in _DEFAULT_LAUNCH:
    return _DEFAULT_LAUNCH[(head_dim, itemsize)]
  return (8 if head_dim >= 128 else 4), 2
