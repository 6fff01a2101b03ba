"""Row norm of the adapted weight, n_j = ||W_j + s * (B @ A)_j||_2, without a dense [N, K] temporary.

One tiled pass over W: each program owns BLOCK_N rows and a slice of the K columns and writes its
partial sum of squares; W is read exactly once, A and B are small and stay in L2. The K slices are
added in order (deterministic, no atomics) and square-rooted by the consumer: the forward GEMM's
epilogue (epilogue.finished_norm) in a training forward, `finish_row_norm` otherwise; with one
slice the pass finishes its rows itself. Two ways to form a slice's sum:

    direct    sum_k (W + s * B @ A)_jk^2       the tile W + s * B @ A in registers (fp32): an MMA of
                                               [BLOCK_N, r] by [r, BLOCK_K] and an add and a square
                                               per element, any r (r chunks)
    factored  sum_k W_jk^2 + 2s * ((W @ A.T) * B)_j . 1      the MMA takes the W tile as loaded
              (+ s^2 * ((B @ G) * B)_j . 1 in slice 0)     [BLOCK_N, BLOCK_K] by [BLOCK_K, r];
                                               G = A @ A.T [r, r] comes from lora_down's launch
                                               (forward.lora_down_and_gram), so the per-element work
                                               is one square: predicted bound by W's bytes at
                                               r <= 64 (benchmarks/NOTES.md, attempts 10 and 11).
                                               Not yet used by the forward (drivers.fused_forward):
                                               its bits depend on lora_down's M-dependent slices,
                                               and the no_grad norm must match the training one

The factored sum is ||W_j||^2 + 2s W_j.(BA)_j + s^2 ||(BA)_j||^2 = n_j^2 in exact arithmetic;
in fp32 its rounding error is about eps * (||W_j|| + s ||(BA)_j||)^2, so a row that s * B @ A nearly
cancels (n_j << ||W_j||) keeps less relative accuracy than the direct sum, and its sum may
round below 0: the square root clamps at 0 (`epilogue.finished_norm`), so n_j >= 0 and, where
W_j and B_j are zero, exactly 0 (tests/test_kernels.py pins both).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import block_r, dot_precision, factored_rank_limit
from ._lora_dot import lora_dot, summed_slices
from .epilogue import finished_norm
from .tuning import autotune, cdiv, split_count

_GPU_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [(64, 128, 4, 3), (32, 128, 4, 3), (64, 64, 4, 4), (128, 64, 8, 3), (32, 256, 8, 3),
                         # smaller per-thread tiles, for cases where the ones above spill registers
                         (64, 64, 8, 4), (32, 64, 4, 4), (16, 64, 4, 4)]
]
_INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 32, "BLOCK_K": 32})


def _row_sumsq_smem_bytes(a) -> int:
    """The W tile and the B and A tiles of each pipeline stage (A's at fp32 where upcast), and the
    bf16 parts of an fp32 A tile (factored, "bf16x3")."""
    a_size = 4 if a["UPCAST"] else a["lora_a_ptr"].element_size()
    parts = 3 * a["BLOCK_K"] * a["BLOCK_R"] * 2 if a["PRECISION"] == "bf16x3" else 0
    return a["num_stages"] * (a["BLOCK_N"] * a["BLOCK_K"] * a["w_ptr"].element_size()
                              + (a["BLOCK_N"] + a["BLOCK_K"]) * a["BLOCK_R"] * a_size) + parts


@autotune(_GPU_CONFIGS, _INTERPRETER_CONFIG, key=["N", "K", "R", "k_splits", "PRECISION", "GRAM_SLICES"],
          smem_bytes=_row_sumsq_smem_bytes, case_dtypes=("w_ptr", "lora_a_ptr"))
@triton.jit
def _row_sumsq_kernel(
    w_ptr, lora_a_ptr, lora_b_ptr,         # W [N, K], A [R, K], B [N, R] (A's dtype)
    gram_ptr,                              # G = A @ A.T partial sums [GRAM_SLICES, R, R] fp32 (factored)
    out_ptr,                               # partial sums of squares [k_splits, N] fp32 (FINISH: n [N])
    N, K, R,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    scaling,
    k_splits,                              # the slices of K reduced in parallel
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    FINISH: tl.constexpr,                  # one slice (k_splits == 1): store the square root
    GRAM_SLICES: tl.constexpr,             # 0: direct; else factored, R <= BLOCK_R
    UPCAST: tl.constexpr,                  # factored: W and A multiplied in fp32 (PRECISION tf32x3)
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

    if GRAM_SLICES > 0:
        sumsq = _factored_sumsq(w_ptr, lora_a_ptr, lora_b_ptr, gram_ptr, rows, row_ok, k_begin, k_end, R,
                                stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br, scaling,
                                pid_k == 0, BLOCK_N, BLOCK_K, BLOCK_R, PRECISION, GRAM_SLICES, UPCAST)
    else:
        sumsq = _direct_sumsq(w_ptr, lora_a_ptr, lora_b_ptr, rows, row_ok, k_begin, k_end, R,
                              stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br, scaling,
                              BLOCK_N, BLOCK_K, BLOCK_R, PRECISION)
    if FINISH:
        sumsq = tl.sqrt_rn(tl.maximum(sumsq, 0.0, propagate_nan=tl.PropagateNan.ALL))  # as epilogue.finished_norm
    tl.store(out_ptr + pid_k * N + rows, sumsq, mask=row_ok)


@triton.jit
def _direct_sumsq(w_ptr, lora_a_ptr, lora_b_ptr, rows, row_ok, k_begin, k_end, R,
                  stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br, scaling,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """[BLOCK_N] fp32: this slice's sum_k (W + s * B @ A)_jk^2, the tile formed in registers (B @ A
    in r chunks, input_precision PRECISION)."""
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
    return sumsq


@triton.jit
def _factored_sumsq(w_ptr, lora_a_ptr, lora_b_ptr, gram_ptr, rows, row_ok, k_begin, k_end, R,
                    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br, scaling, first_slice,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
                    GRAM_SLICES: tl.constexpr, UPCAST: tl.constexpr):
    """[BLOCK_N] fp32: this slice's sum_k W_jk^2 + 2s ((W @ A.T) * B)_j . 1, plus, in the first
    slice, s^2 ((B @ G) * B)_j . 1 with G the sum of the GRAM_SLICES partial sums at gram_ptr.
    W @ A.T: lora_dot with W's tile as loaded (bf16 W, fp32 A: "bf16x3", exact products; same
    16-bit dtypes: "exact16"; else both in fp32, 3xTF32)."""
    dtype = w_ptr.dtype.element_ty
    if UPCAST:
        dtype = tl.float32
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < R
    sumsq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    wa = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < k_end
        w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :] * stride_wk,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        a_t = tl.load(lora_a_ptr + ranks[None, :] * stride_ar + cols[:, None] * stride_ak,
                      mask=rank_ok[None, :] & col_ok[:, None], other=0.0)
        wa = lora_dot(w, a_t, wa, dtype, PRECISION)
        w32 = w.to(tl.float32)
        sumsq += tl.sum(w32 * w32, axis=1)
    b = tl.load(lora_b_ptr + rows[:, None] * stride_bn + ranks[None, :] * stride_br,
                mask=row_ok[:, None] & rank_ok[None, :], other=0.0).to(tl.float32)
    sumsq += (2.0 * scaling) * tl.sum(wa * b, axis=1)
    if first_slice:
        gram = summed_slices(gram_ptr, ranks[:, None] * R + ranks[None, :], rank_ok[:, None] & rank_ok[None, :],
                             R * R, GRAM_SLICES)
        bg = tl.dot(b, gram, input_precision="tf32x3")
        sumsq += (scaling * scaling) * tl.sum(bg * b, axis=1)
    return sumsq


def row_norm_partials(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                      k_splits: Optional[int] = None, finish: bool = False,
                      gram: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[k_splits, N] fp32 partial sums of squares of the rows of ``weight + scaling * lora_B @ lora_A``
    over k_splits slices of K; with ``finish`` (and one slice), n [1, N] itself.

    weight [N, K] (fp16/bf16/fp32), lora_A [r, K], lora_B [N, r] (same dtype as each other).
    ``gram``: None for the direct sum: B @ A on tensor cores in the adapters' dtype with fp32
    accumulation (fp32 adapters: 3xTF32, close to fp32 accuracy), squares summed in fp32. Or
    G = lora_A @ lora_A.T as partial sums [S, r, r] fp32 (forward.lora_down_and_gram, r at most
    _launch.factored_rank_limit()) for the factored sum (module docstring): partial sums may then
    be slightly negative, and their finished square root is clamped at 0.
    k_splits overrides how many slices of K run in parallel (default: enough to fill the GPU).
    """
    N, K = weight.shape
    R = lora_A.shape[0]
    # split K until the grid has ~2 programs per SM (N alone gives too few programs for small N)
    k_splits = k_splits or split_count(cdiv(N, 64), cdiv(K, 128), weight.device, rows_per_split_min=4)
    partial = torch.empty((k_splits, N), dtype=torch.float32, device=weight.device)
    if gram is not None:
        if gram.dim() != 3 or gram.shape[1:] != (R, R) or gram.dtype != torch.float32 or R > factored_rank_limit():
            raise ValueError(f"row_norm_partials: gram must be fp32 partial sums [S, {R}, {R}] with r <= "
                             f"{factored_rank_limit()}, got {tuple(gram.shape)} {gram.dtype}")
        upcast, precision = _factored_precision(weight.dtype, lora_A.dtype)
    else:
        # fp32 adapters: 3xTF32 keeps the norm at fp32 accuracy without plain-fp32 FMA speed
        upcast, precision = False, "tf32x3" if lora_A.dtype == torch.float32 else dot_precision(lora_A.dtype)
    grid = lambda meta: (cdiv(N, meta["BLOCK_N"]), k_splits)
    _row_sumsq_kernel[grid](
        weight, lora_A, lora_B, gram.contiguous() if gram is not None else partial, partial, N, K, R,
        weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1),
        float(scaling), k_splits,
        BLOCK_R=block_r(R), PRECISION=precision, FINISH=finish and k_splits == 1,
        GRAM_SLICES=gram.shape[0] if gram is not None else 0, UPCAST=upcast,
    )
    return partial


def _factored_precision(weight_dtype: torch.dtype, adapter_dtype: torch.dtype):
    """(upcast, input_precision) of the factored sum's W @ A.T at fp32 accuracy: W's tile as loaded
    where the products are exact (same 16-bit dtypes; bf16 W with fp32 A in three bf16 parts), else
    both in fp32 with 3xTF32."""
    if weight_dtype == adapter_dtype and weight_dtype != torch.float32:
        return False, "exact16"
    if weight_dtype == torch.bfloat16 and adapter_dtype == torch.float32:
        return False, "bf16x3"
    return True, "tf32x3"


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
    _finish_row_norm_kernel[lambda meta: (cdiv(N, meta["BLOCK"]),)](partial, out, N, NORM_SPLITS=splits)
    return out


def dora_row_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                  k_splits: Optional[int] = None) -> torch.Tensor:
    """n [N] fp32 = row-wise L2 norm of ``weight + scaling * lora_B @ lora_A`` (not clamped).

    Arguments as `row_norm_partials`. One launch when K is not split, else two.
    """
    partial = row_norm_partials(weight, lora_A, lora_B, scaling, k_splits, finish=True)
    return partial[0] if partial.shape[0] == 1 else finish_row_norm(partial)
