"""The anchor of the static cost model: a plain matmul written the way Triton's matmul tutorial
writes one (grouped tile order, pointer-based loads, a K mask, one fp32 accumulator, a cast and a
masked store), in this repo's words. benchmarks/cost_model.py compiles it with each GEMM tile of
kernels/_gemm.py and in the operand layout of each of fused_dora's two big GEMMs, so the
instructions per k-step of their main loops can be read against a loop that does nothing else:

    forward layout   C[M, N] = x[M, K] @ W[N, K].T      A row-major, B read transposed
    dx layout        C[M, K] = dy[M, N] @ W[N, K]       A row-major, B row-major

Never launched by the package; compiled only (``anchor_launch`` gives the arguments).
"""
import torch
import triton
import triton.language as tl

NAME = "_tutorial_matmul_kernel"


@triton.jit
def _tutorial_matmul_kernel(
    a_ptr, b_ptr, c_ptr,                 # A [M, K], B [K, N] (any strides), C [M, N]
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # which output tile: GROUP_M tile rows walk the tile columns together (B tiles reused in L2)
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group

    # row and column indices wrap around (no row / column masks in the loop), as in the tutorial
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    ks = tl.arange(0, BLOCK_K)
    a_tile = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_tile = b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, tl.cdiv(K, BLOCK_K)):
        left = K - step * BLOCK_K  # the last step may be partial: mask along K only
        a = tl.load(a_tile, mask=ks[None, :] < left, other=0.0)
        b = tl.load(b_tile, mask=ks[:, None] < left, other=0.0)
        acc = tl.dot(a, b, acc)
        a_tile += BLOCK_K * stride_ak
        b_tile += BLOCK_K * stride_bk

    out_rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    out_cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(c_ptr + out_rows[:, None] * stride_cm + out_cols[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=(out_rows[:, None] < M) & (out_cols[None, :] < N))


kernel = _tutorial_matmul_kernel
LAYOUTS = ("forward", "dx")


def anchor_launch(layout: str, M: int, N: int, K: int, dtype=torch.bfloat16):
    """(args, kwargs) compiling the anchor in ``layout`` for C[M, out] with reduction ``red``:
    forward: x[M, K] @ W[N, K].T (out = N, reduction K); dx: dy[M, N] @ W[N, K] (out = K, reduction N).
    Tensor arguments are given as their dtype (what ``JITFunction.warmup`` takes)."""
    if layout == "forward":
        out, red = N, K
        strides = (red, 1, 1, red)         # A = x row-major; B[k, n] = W[n, k]
    elif layout == "dx":
        out, red = K, N
        strides = (red, 1, out, 1)         # A = dy row-major; B = W row-major
    else:
        raise ValueError(f"layout {layout!r}: one of {LAYOUTS}")
    return (dtype, dtype, dtype, M, out, red, *strides, out, 1), {}
