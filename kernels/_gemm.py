"""What the two [M, N, K] GEMMs share: the forward's x @ W.T (forward.py) and the input
gradient's (dy * c) @ W (input_grad.py). Their tile shapes, the order programs walk tiles in, and
the input gradient's LoRA rank steps v @ A, which the composed route's dx pass (composed.py)
adds to cuBLAS's result the same way.
"""
import triton
import triton.language as tl

from ._lora_dot import summed_slices

# Output tiles (rows, columns), the reduction step, warps, stages. Large tiles first (for large M),
# then narrow ones for small M (decode), which is memory-bound on W: many programs along N.
GEMM_TILES = [
    (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
    (64, 256, 64, 4, 4), (64, 256, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
    (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4), (16, 32, 256, 4, 3),
]
INTERPRETER_TILE = (32, 32, 32)


def gemm_smem_bytes(a, operand_ptr, out_cols: str, reduction: str) -> int:
    """Shared bytes of a GEMM config (``a``: its arguments and config): the two operand tiles of each
    main-loop stage, in ``operand_ptr``'s dtype; the LoRA steps' tiles and the epilogue's layout
    change reuse that memory unless they need more. ``out_cols``/``reduction``: as gemm_configs."""
    xs = a[operand_ptr].element_size()
    main = a["num_stages"] * (a["BLOCK_M"] + a[out_cols]) * a[reduction] * xs
    return max(main, (a["BLOCK_M"] + a[out_cols]) * a["BLOCK_R"] * xs, a["BLOCK_M"] * a[out_cols] * xs)


def gemm_configs(tiles, out_cols: str, reduction: str):
    """triton.Configs for ``tiles``, naming the output-column and reduction block sizes.

    The forward's output columns are BLOCK_N (its reduction BLOCK_K); the input gradient's
    are BLOCK_K (its reduction BLOCK_N), so one tile list serves both.
    """
    return [triton.Config({"BLOCK_M": bm, out_cols: bc, reduction: bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bc, bk, w, s in tiles]


def gemm_interpreter_config(out_cols: str, reduction: str):
    bm, bc, bk = INTERPRETER_TILE
    return triton.Config({"BLOCK_M": bm, out_cols: bc, reduction: bk, "GROUP_M": 2})


@triton.jit
def rank_steps(acc, left_ptr, right_ptr, rows, cols, row_ok, col_ok, R, left_slice_stride, stride_right_r,
               stride_right_c, dtype, LEFT_SLICES: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """acc [BLOCK_M, BLOCK_C] fp32 + left[rows, :R] @ right[:R, cols]: the input gradient's LoRA
    term v @ A (left = v, right = A) in the fused dx GEMM and the composed dx pass. (The forward's
    su @ B.T steps are written out in forward.py and composed.py: addressing B.T's tile rank-major,
    as here, compiled to a 48 B spill in one sm_90 config of the composed epilogue.)

    left: LEFT_SLICES partial sums [LEFT_SLICES, M, R] fp32, ``left_slice_stride`` elements apart,
    row-major, offset to the tile's first row (lora_up_grad's v, summed here: _lora_dot.summed_slices);
    right addressed by (rank, column) strides. Operands are cast to ``dtype`` (the activation
    dtype, as the base product's), R walked in chunks of BLOCK_R with masked loads. Not
    software-pipelined (num_stages=1): a few steps only, and pipelining them would hold extra
    fp32 tiles in shared memory.
    """
    for r0 in tl.range(0, R, BLOCK_R, num_stages=1):
        ranks = r0 + tl.arange(0, BLOCK_R)
        rank_ok = ranks < R
        left = summed_slices(left_ptr, rows[:, None] * R + ranks[None, :], row_ok[:, None] & rank_ok[None, :],
                             left_slice_stride, LEFT_SLICES)
        right = tl.load(right_ptr + ranks[:, None] * stride_right_r + cols[None, :] * stride_right_c,
                        mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(left.to(dtype), right.to(dtype), acc, input_precision=PRECISION)
    return acc


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of an [M, N] output in [BLOCK_M, BLOCK_N] tiles, GROUP_M row tiles walked
    together so the column operand's tiles are reused from L2."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m, pid_n
