"""Default block sizes and launch parameters of the head-wise attention kernel.

The block sizes are part of the computed function (the arrow band is
tile-granular), so the kernel, :func:`pallas_kernels.reference_headwise_attention`
and :func:`pallas_kernels.plan_cost` all take their defaults from
:func:`default_block_sizes`, which depends on ``head_dim`` only.

Chosen on an H100 80GB HBM3 (jax 0.11.2, Pallas Triton lowering, bf16,
2026-11-22), see benchmarks/RESULTS.md, section "Head-wise attention kernel":

* D=128 (FLUX): 128x128 tiles, 8 warps, 3 stages -- best full (482 TFLOP/s at
  FLUX-2K) and best arrow_8 of the sweep (128/64 blocks, 4/8 warps, 2/3
  stages);
* D=64 (SD3): 128x64 tiles, 8 warps, 3 stages -- best full (0.695 ms at
  SD3-1K); 64x64 with 4 warps was 5 % faster on arrow_8 but 6 % slower on
  full, and 4 warps at 128x64 (the first guess) was 35-45 % slower.
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
# see RESULTS.md): heads in index order (ranking heads heavy-first was 2-11 %
# slower on mixed plans at FLUX-1K/SD3-1K and equal at FLUX-2K), and one
# pipelined loop over both key-tile ranges.
SORT_HEADS = False
SINGLE_LOOP = True


def default_block_sizes(head_dim: int) -> tuple[int, int]:
    """``(block_q, block_k)`` used when the caller passes ``None``."""
    if head_dim in _DEFAULT_BLOCKS:
        return _DEFAULT_BLOCKS[head_dim]
    raise ValueError(f"head_dim={head_dim} is not supported: expected one of {sorted(_DEFAULT_BLOCKS)}")


def default_launch(head_dim: int, itemsize: int, block_q: int, block_k: int) -> tuple[int, int]:
    """``(num_warps, num_stages)`` for the Triton compilation."""
    if itemsize >= 4:
        # float32 tiles are twice as large: keep shared memory within the H100's
        # 227 KiB by not multi-buffering the key/value tiles.
        return (8 if head_dim >= 128 or block_q >= 128 else 4), 1
    if (head_dim, itemsize) in _DEFAULT_LAUNCH:
        return _DEFAULT_LAUNCH[(head_dim, itemsize)]
    return (8 if head_dim >= 128 else 4), 2
