"""Dropout masks regenerated from a seed (Philox), never stored.

Element (row, col) of an [M, K] activation is dropped when its 16-bit draw d is below
t = floor(p * 2**16 + 1/2) (p in fp32), so the drop probability is t / 2**16, p rounded to a
multiple of 2**-16 (at most 7.6e-6 from p); kept elements are still scaled by 1 / (1 - p), so the
kept expectation is off by at most 7.6e-6 / (1 - p) relative (1e-5 at p = 0.25; only a p within
a few 2**-16 of 1 would notice: at p >= 1 - 2**-17 every element is dropped). One Philox4x32-10 call gives 128
random bits, eight draws: the call with counter (col // 8, row mod 2**32, row // 2**32, 0) and key
``seed`` serves columns col // 8 * 8 .. + 7 of that row, column 8q + 2w + h taking the low
(h = 0) or high (h = 1) 16 bits of word w. The mask depends on the element's logical (row, col)
only, not on strides or tile sizes, so the forward (lora_down), the input gradient and the
lora_A gradient regenerate the identical mask from the same seed.

Eight draws per call (tl.rand draws one 32-bit number per call) make the mask an eighth of the
Philox work: the dropout passes were issue-bound on it (benchmarks/NOTES.md, attempt 8), and the
input-gradient GEMM generates a whole [BLOCK_M, BLOCK_K] tile beside its accumulator.
"""
import torch
import triton
import triton.language as tl

from .tuning import cdiv


@triton.jit
def dropout_keep(seed, rows, col0, p, BLOCK_K: tl.constexpr):
    """[len(rows), BLOCK_K] boolean tile: True where element (row, col0 + j) survives dropout.

    rows [BLOCK_M] int64 row indices; col0: the tile's first column, a multiple of 8; p in [0, 1).
    """
    BLOCK_M: tl.constexpr = rows.shape[0]
    groups = col0 // 8 + tl.arange(0, BLOCK_K // 8)
    shape: tl.constexpr = (BLOCK_M, BLOCK_K // 8)
    c0 = tl.broadcast_to(groups.to(tl.uint32)[None, :], shape)
    c1 = tl.broadcast_to(rows.to(tl.uint32)[:, None], shape)  # the low 32 bits
    c2 = tl.broadcast_to((rows >> 32).to(tl.uint32)[:, None], shape)
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, tl.zeros(shape, dtype=tl.uint32))
    t = tl.cast(p * 65536.0 + 0.5, tl.uint32)  # kept when the draw is >= t
    # each half [BLOCK_M, BLOCK_K // 8, 2, 2] with element [m, q, a, b] from word 2a + b
    low = tl.join(tl.join((w0 & 0xFFFF) >= t, (w2 & 0xFFFF) >= t), tl.join((w1 & 0xFFFF) >= t, (w3 & 0xFFFF) >= t))
    high = tl.join(tl.join((w0 >> 16) >= t, (w2 >> 16) >= t), tl.join((w1 >> 16) >= t, (w3 >> 16) >= t))
    # [m, q, a, b, h]: column 8q + 2(2a + b) + h, half h of word 2a + b
    return tl.reshape(tl.join(low, high), (BLOCK_M, BLOCK_K))


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
        grid = (cdiv(M, 32), cdiv(K, 32))
        _dropout_mask_kernel[grid](out, M, K, seed, float(p), BLOCK_M=32, BLOCK_K=32)
    return out.bool()
