"""Dropout masks regenerated from a seed (Philox), never stored.

Element (row, col) of an [M, K] activation is kept when its uniform draw u >= p. One Philox4x32
call gives four draws: the one with counter (col // 4, row mod 2**32, row // 2**32, 0) and key
``seed`` serves columns col // 4 * 4 .. + 3, in order, of that row. The mask depends on the
element's logical (row, col) only, not on strides or tile sizes, so the forward (lora_down), the
input gradient and the lora_A gradient regenerate the identical mask from the same seed.

Four draws per call (tl.rand draws one) make the mask a quarter of the Philox work and of its
registers: the input-gradient GEMM generates a whole [BLOCK_M, BLOCK_K] tile beside its
accumulator.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def dropout_keep(seed, rows, col0, p, BLOCK_K: tl.constexpr):
    """[len(rows), BLOCK_K] boolean tile: True where element (row, col0 + j) survives dropout.

    rows [BLOCK_M] int64 row indices; col0: the tile's first column, a multiple of 4.
    """
    BLOCK_M: tl.constexpr = rows.shape[0]
    quads = col0 // 4 + tl.arange(0, BLOCK_K // 4)
    shape: tl.constexpr = (BLOCK_M, BLOCK_K // 4)
    c0 = tl.broadcast_to(quads.to(tl.uint32)[None, :], shape)
    c1 = tl.broadcast_to(rows.to(tl.uint32)[:, None], shape)  # the low 32 bits
    c2 = tl.broadcast_to((rows >> 32).to(tl.uint32)[:, None], shape)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, tl.zeros(shape, dtype=tl.uint32))
    k0 = tl.uint_to_uniform_float(r0) >= p
    k1 = tl.uint_to_uniform_float(r1) >= p
    k2 = tl.uint_to_uniform_float(r2) >= p
    k3 = tl.uint_to_uniform_float(r3) >= p
    # [BLOCK_M, BLOCK_K // 4, 2, 2] with element [m, q, a, b] = k_(2a + b): column 4q + 2a + b
    return tl.reshape(tl.join(tl.join(k0, k2), tl.join(k1, k3)), (BLOCK_M, BLOCK_K))


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(out_ptr, M, K, seed, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    col0 = tl.program_id(1) * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    keep = dropout_keep(seed, rows, col0, p, BLOCK_K)
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
