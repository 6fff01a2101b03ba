"""Row norm of the adapted weight, n_j = ||W_j + s * (B @ A)_j||_2, without a dense [N, K] temporary.

One tiled pass over W: each program owns BLOCK_N rows and a slice of the K columns, forms the
tile W + s * B @ A in registers (fp32 accumulate), and writes its partial sum of squares.
Reads W exactly once; A and B are small and stay in L2. The K slices are added in order
(deterministic, no atomics) and square-rooted by the consumer: the forward GEMM's epilogue
(epilogue.finished_norm) in a training forward, `finish_row_norm` otherwise; with one slice the
pass finishes its rows itself.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import block_r, dot_precision
from .epilogue import finished_norm
from .tuning import autotune, split_count

_GPU_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [(64, 128, 4, 3), (32, 128, 4, 3), (64, 64, 4, 4), (128, 64, 8, 3), (32, 256, 8, 3),
                         # smaller per-thread tiles, for cases where the ones above spill registers
                         (64, 64, 8, 4), (32, 64, 4, 4), (16, 64, 4, 4)]
]
_INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 32, "BLOCK_K": 32})


def _row_sumsq_smem_bytes(a) -> int:
    """The W tile and the B and A tiles of each pipeline stage."""
    return a["num_stages"] * (a["BLOCK_N"] * a["BLOCK_K"] * a["w_ptr"].element_size()
                              + (a["BLOCK_N"] + a["BLOCK_K"]) * a["BLOCK_R"] * a["lora_a_ptr"].element_size())


@autotune(_GPU_CONFIGS, _INTERPRETER_CONFIG, key=["N", "K", "R", "k_splits", "PRECISION"],
          smem_bytes=_row_sumsq_smem_bytes, case_dtypes=("w_ptr", "lora_a_ptr"))
@triton.jit
def _row_sumsq_kernel(
    w_ptr, lora_a_ptr, lora_b_ptr,         # W [N, K], A [R, K], B [N, R] (A's dtype)
    out_ptr,                               # partial sums of squares [k_splits, N] fp32 (FINISH: n [N])
    N, K, R,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    scaling,
    k_splits,                              # the slices of K reduced in parallel
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    FINISH: tl.constexpr,                  # one slice (k_splits == 1): store the square root
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    # this program's K slice: whole BLOCK_K steps, so the slices tile K exactly
    k_steps = tl.cdiv(K, BLOCK_K)
    steps_per_split = tl.cdiv(k_steps, k_splits)
    k_begin = pid_k * steps_per_split * BLOCK_K
    k_end = tl.minimum(k_begin + steps_per_split * BLOCK_K, K)

    sumsq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < k_end
        w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :] * stride_wk,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        ba = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            ranks = r0 + tl.arange(0, BLOCK_R)
            rank_ok = ranks < R
            b = tl.load(lora_b_ptr + rows[:, None] * stride_bn + ranks[None, :] * stride_br,
                        mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
            a = tl.load(lora_a_ptr + ranks[:, None] * stride_ar + cols[None, :] * stride_ak,
                        mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
            ba = tl.dot(b, a, ba, input_precision=PRECISION)
        tile = w.to(tl.float32) + scaling * ba
        sumsq += tl.sum(tile * tile, axis=1)
    if FINISH:
        sumsq = tl.sqrt_rn(sumsq)
    tl.store(out_ptr + pid_k * N + rows, sumsq, mask=row_ok)


def row_norm_partials(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                      k_splits: Optional[int] = None, finish: bool = False) -> torch.Tensor:
    """[k_splits, N] fp32 partial sums of squares of the rows of ``weight + scaling * lora_B @ lora_A``
    over k_splits slices of K; with ``finish`` (and one slice), n [1, N] itself.

    weight [N, K] (fp16/bf16/fp32), lora_A [r, K], lora_B [N, r] (same dtype as each other).
    The product B @ A runs on tensor cores in the adapters' dtype with fp32 accumulation
    (fp32 adapters: 3xTF32 on a GPU, close to fp32 accuracy); the sum of squares is fp32.
    k_splits overrides how many slices of K run in parallel (default: enough to fill the GPU).
    """
    N, K = weight.shape
    R = lora_A.shape[0]
    # split K until the grid has ~2 programs per SM (N alone gives too few programs for small N)
    k_splits = k_splits or split_count(triton.cdiv(N, 64), triton.cdiv(K, 128), weight.device, rows_per_split_min=4)
    partial = torch.empty((k_splits, N), dtype=torch.float32, device=weight.device)
    # fp32 adapters: 3xTF32 keeps the norm at fp32 accuracy without plain-fp32 FMA speed
    precision = "tf32x3" if lora_A.dtype == torch.float32 else dot_precision(lora_A.dtype)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), k_splits)
    _row_sumsq_kernel[grid](
        weight, lora_A, lora_B, partial, N, K, R,
        weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1),
        float(scaling), k_splits,
        BLOCK_R=block_r(R), PRECISION=precision, FINISH=finish and k_splits == 1,
    )
    return partial


# one config: a tiny elementwise pass; autotuned only to be registered (compile report, launch counts)
@autotune([triton.Config({"BLOCK": 1024}, num_warps=4)], triton.Config({"BLOCK": 64}), key=["N", "NORM_SPLITS"],
          smem_bytes=lambda a: 0, case_dtypes=(None, None))
@triton.jit
def _finish_row_norm_kernel(partial_ptr, out_ptr, N, NORM_SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    outs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    out_ok = outs < N
    tl.store(out_ptr + outs, finished_norm(partial_ptr, outs, out_ok, N, NORM_SPLITS), mask=out_ok)


def finish_row_norm(partial: torch.Tensor) -> torch.Tensor:
    """n [N] fp32 from `row_norm_partials`' [k_splits, N]: the slices added in order, then the
    square root, bit for bit as the forward epilogue finishes them."""
    splits, N = partial.shape
    out = torch.empty((N,), dtype=torch.float32, device=partial.device)
    _finish_row_norm_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK"]),)](partial, out, N, NORM_SPLITS=splits)
    return out


def dora_row_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                  k_splits: Optional[int] = None) -> torch.Tensor:
    """n [N] fp32 = row-wise L2 norm of ``weight + scaling * lora_B @ lora_A`` (not clamped).

    Arguments as `row_norm_partials`. One launch when K is not split, else two.
    """
    partial = row_norm_partials(weight, lora_A, lora_B, scaling, k_splits, finish=True)
    return partial[0] if partial.shape[0] == 1 else finish_row_norm(partial)
