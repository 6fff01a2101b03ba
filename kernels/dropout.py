"""Dropout masks regenerated from a seed (Philox), never stored.

Element (row, col) of an [M, K] activation is kept when ``tl.rand(seed, row * K + col) >= p``.
The offset is the element's logical row-major index (int64, so no wrap below 2**63), independent
of strides, so the forward (lora_down), the input gradient and the lora_A gradient regenerate
the identical mask from the same seed.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def dropout_keep(seed, rows, cols, n_cols, p):
    """[len(rows), len(cols)] boolean tile: True where the element survives dropout."""
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols.to(tl.int64)[None, :]
    return tl.rand(seed, offsets) >= p


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(out_ptr, M, K, seed, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = dropout_keep(seed, rows, cols, K, p)
    inside = (rows[:, None] < M) & (cols[None, :] < K)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], keep.to(tl.int8), mask=inside)


def dropout_mask(seed: int, M: int, K: int, p: float, device) -> torch.Tensor:
    """The boolean keep-mask [M, K] that the kernels use for ``seed`` and ``p``.

    For tests and debugging only: the training path never materialises it.
    """
    out = torch.empty((M, K), dtype=torch.int8, device=device)
    if M and K:
        grid = (triton.cdiv(M, 32), triton.cdiv(K, 32))
        _dropout_mask_kernel[grid](out, M, K, seed, float(p), BLOCK_M=32, BLOCK_K=32)
    return out.bool()
