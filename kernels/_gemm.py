"""What the two [M, N, K] GEMMs share: the forward's x @ W.T (forward.py) and the input
gradient's (dy * c) @ W (backward.py). Their tile shapes, and the order programs walk tiles in.
"""
import triton
import triton.language as tl

# Output tiles (rows, columns), the reduction step, warps, stages. Large tiles first (for large M),
# then narrow ones for small M (decode), which is memory-bound on W: many programs along N.
GEMM_TILES = [
    (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
    (64, 256, 64, 4, 4), (64, 256, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
    (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4), (16, 32, 256, 4, 3),
]
INTERPRETER_TILE = (32, 32, 32)


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
