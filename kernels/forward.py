"""Forward kernels: the LoRA down-projection and the fused DoRA GEMM.

    su   = s * dropout(x) @ A.T                 lora_down     fp32 partial sums [S, M, r] over slices of K
                                                              (and, for the factored norm, G = A @ A.T's [S, r, r]);
                                                dora_forward  sums them, rounds su to the adapters'
                                                              dtype and writes su [M, r] for the backward
    ypre = x @ W.T + su @ B.T                   dora_forward  (r extra K-steps in the same GEMM)
    y    = c * ypre + bias                      dora_forward  epilogue, one write of y
    q    = ypre * t,  t = pow2_floor(c)         dora_forward  epilogue, kept for dmagnitude

The dropout mask is regenerated from `seed` (see dropout.py) and never stored.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ._gemm import GEMM_TILES, gemm_configs, gemm_interpreter_config, gemm_smem_bytes, grouped_tile
from ._launch import (
    as_slices,
    block_r,
    dot_precision,
    epilogue_halves,
    factored_rank_limit,
    gemm_block_r,
    lora_precision,
    narrow_row_stride,
    reduction_slices,
)
from ._lora_dot import finished_su, gram_dot, lora_dot
from .dropout import dropout_keep
from .epilogue import dora_epilogue, norm_arguments
from .tuning import autotune, cdiv, m_bucket

_DOWN_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bk, w, s in [(64, 128, 4, 3), (128, 64, 4, 3), (32, 128, 4, 4), (16, 256, 4, 3), (128, 128, 8, 3),
                         # smaller per-thread tiles, for cases where the ones above spill registers
                         (128, 64, 8, 3), (64, 64, 8, 4), (32, 64, 4, 4), (16, 64, 4, 4)]
]
_DOWN_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_K": 32})


def _down_smem_bytes(a) -> int:
    """The x and A tiles of each pipeline stage (counted at fp32 when upcast), and with dropout and
    upcast the fp32 copy of x that the dot reads (bf16x3: x's own, and A's three bf16 parts)."""
    stage = (a["BLOCK_M"] + a["BLOCK_R"]) * a["BLOCK_K"] * (4 if a["UPCAST"] else a["x_ptr"].element_size())
    dropped = a["BLOCK_M"] * a["BLOCK_K"] * 4 if a["UPCAST"] and a["HAS_DROPOUT"] else 0
    parts = 3 * a["BLOCK_R"] * a["BLOCK_K"] * 2 if a["PRECISION"] == "bf16x3" else 0
    gram = 2 * a["BLOCK_R"] * a["BLOCK_K"] * 4 if a["STORE_GRAM"] else 0  # the G loop's A tile, both layouts
    return max(a["num_stages"] * stage + dropped + parts, gram)


@autotune(_DOWN_GPU_CONFIGS, _DOWN_INTERPRETER_CONFIG,
          key=["m_bucket", "K", "R", "k_splits", "HAS_DROPOUT", "PRECISION", "STORE_GRAM"],
          smem_bytes=_down_smem_bytes, case_dtypes=("x_ptr", "lora_a_ptr"))
@triton.jit(do_not_specialize=["seed"])
def _lora_down_kernel(
    x_ptr, lora_a_ptr, su_ptr,           # x [M, K], A [R, K], su partial sums [k_splits, M, R] fp32
    gram_ptr,                            # G = A @ A.T partial sums [k_splits, R, R] fp32 (if STORE_GRAM)
    M, K, R,
    m_bucket,                            # autotune key only
    k_splits, k_per_split,               # the slices of K reduced in parallel (program_id(2)), their length
    stride_xm, stride_xk, stride_ar, stride_ak,
    scaling, seed, p,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    STORE_GRAM: tl.constexpr,            # one rank chunk (R <= BLOCK_R): the first row of programs adds up G
):
    dtype = x_ptr.dtype.element_ty
    if UPCAST:  # fp32 adapters: multiply in fp32 (see _launch.lora_precision)
        dtype = tl.float32
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M  # 64-bit: M * stride may pass 2**31
    x_ptr += row0 * stride_xm
    su_ptr += tl.program_id(2).to(tl.int64) * M * R + row0 * R
    rows = tl.arange(0, BLOCK_M)                    # within the tile: 32-bit offsets
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < M - row0
    rank_ok = ranks < R
    k_begin = tl.program_id(2) * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < k_end
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if HAS_DROPOUT:  # dropped elements zeroed in x's dtype (exact); 1 / (1 - p) after the loop
            x = tl.where(dropout_keep(seed, row0 + rows, k0, p, BLOCK_K), x, 0.0)
        a_t = tl.load(lora_a_ptr + ranks[None, :] * stride_ar + cols[:, None] * stride_ak,
                      mask=rank_ok[None, :] & col_ok[:, None], other=0.0)
        acc = lora_dot(x, a_t, acc, dtype, PRECISION)
    if HAS_DROPOUT:
        acc = acc / (1.0 - p)
    tl.store(su_ptr + rows[:, None] * R + ranks[None, :], acc * scaling, mask=row_ok[:, None] & rank_ok[None, :])
    if STORE_GRAM:
        # the factored norm's G over this slice, by the first row of programs only, in a loop of its own
        # (A's slice again, from L2) so that the main loop stays as it is for every other program
        if tl.program_id(0) == 0:
            gram = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
            for k0 in range(k_begin, k_end, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                a_t = tl.load(lora_a_ptr + ranks[None, :] * stride_ar + cols[:, None] * stride_ak,
                              mask=rank_ok[None, :] & (cols < k_end)[:, None], other=0.0)
                gram = gram_dot(a_t, gram)
            tl.store(gram_ptr + tl.program_id(2) * R * R + ranks[:, None] * R + ranks[None, :], gram,
                     mask=rank_ok[:, None] & rank_ok[None, :])


def lora_down(x: torch.Tensor, lora_A: torch.Tensor, scaling: float, dropout_p: float = 0.0,
              seed: int = 0, splits: Optional[int] = None) -> torch.Tensor:
    """su partial sums [S, M, r] fp32, S slices of K: summed in order (_lora_dot.summed_slices, as
    the forward GEMMs do) and rounded to lora_A's dtype, su = scaling * dropout(x) @ lora_A.T.

    x [M, K] (any strides; fp16/bf16/fp32), lora_A [r, K] (fp32 or x's dtype).
    dropout_p > 0 applies the Philox mask of ``seed`` with the 1/(1-p) scale. ``splits`` asks for
    S (default: enough to fill the GPU, see _launch.reduction_slices).
    """
    return _launch_lora_down(x, lora_A, scaling, dropout_p, seed, splits, store_gram=False)[0]


def lora_down_and_gram(x: torch.Tensor, lora_A: torch.Tensor, scaling: float, dropout_p: float = 0.0,
                       seed: int = 0, splits: Optional[int] = None):
    """(su partial sums [S, M, r], G partial sums [S, r, r]) fp32 in one launch: `lora_down`, and
    G = lora_A @ lora_A.T over the same S slices of K (fp32 accuracy: 3xTF32 for fp32 A, exact
    products for 16-bit A), which the factored norm (norm.row_norm_partials) reads. Only for r at
    most `_launch.factored_rank_limit` (one rank chunk). Arguments as `lora_down`."""
    if lora_A.shape[0] > factored_rank_limit():
        raise ValueError(f"lora_down_and_gram: rank {lora_A.shape[0]} above {factored_rank_limit()}")
    return _launch_lora_down(x, lora_A, scaling, dropout_p, seed, splits, store_gram=True)


def _launch_lora_down(x, lora_A, scaling, dropout_p, seed, splits, store_gram: bool):
    x = narrow_row_stride(x)
    M, K = x.shape
    R = lora_A.shape[0]
    BR = block_r(R)
    r_chunks = cdiv(R, BR)
    k_splits, k_per_split = reduction_slices(K, cdiv(M, 64) * r_chunks, x.device, splits)
    su = torch.empty((k_splits, M, R), dtype=torch.float32, device=x.device)
    gram = torch.empty((k_splits, R, R), dtype=torch.float32, device=x.device) if store_gram else None
    upcast, precision = lora_precision(x.dtype, lora_A.dtype)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]), r_chunks, k_splits)
    _lora_down_kernel[grid](
        x, lora_A, su, gram if store_gram else su, M, K, R, m_bucket(M), k_splits, k_per_split,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1),
        float(scaling), int(seed), float(dropout_p),
        HAS_DROPOUT=dropout_p > 0, BLOCK_R=BR, UPCAST=upcast, PRECISION=precision, STORE_GRAM=store_gram,
    )
    return su, gram


_GEMM_GPU_CONFIGS = gemm_configs(GEMM_TILES, out_cols="BLOCK_N", reduction="BLOCK_K")
_GEMM_INTERPRETER_CONFIG = gemm_interpreter_config(out_cols="BLOCK_N", reduction="BLOCK_K")


def _forward_smem_bytes(a) -> int:
    """The x and W tiles of each main-loop stage (see gemm_smem_bytes)."""
    return gemm_smem_bytes(a, "x_ptr", out_cols="BLOCK_N", reduction="BLOCK_K")


@autotune(_GEMM_GPU_CONFIGS, _GEMM_INTERPRETER_CONFIG, key=["m_bucket", "N", "K", "R", "STORE_Q", "PRECISION"],
          smem_bytes=_forward_smem_bytes, case_dtypes=("x_ptr", "lora_b_ptr"))
@triton.jit
def _dora_forward_kernel(
    x_ptr, w_ptr, su_ptr, lora_b_ptr,    # x [M, K], W [N, K] (x's dtype), su [SU_SLICES, M, R] (summed), B [N, R]
    su_out_ptr,                          # su [M, R] finished, the adapters' dtype (if STORE_SU)
    mag_ptr, bias_ptr,                   # magnitude [N], bias [N] (if HAS_BIAS)
    norm_ptr, norm_out_ptr,              # n [N], or partial sums [NORM_SPLITS, N] finished into norm_out [N]
    y_ptr, q_ptr,                        # y, q [M, N] (x's dtype; q if STORE_Q)
    M, N, K, R,
    m_bucket,                            # autotune key only
    stride_xm, stride_xk, stride_wn, stride_wk, stride_bn, stride_br,
    norm_eps,
    HAS_BIAS: tl.constexpr, STORE_Q: tl.constexpr, NORM_SPLITS: tl.constexpr,
    SU_SLICES: tl.constexpr, STORE_SU: tl.constexpr, EPILOGUE_HALVES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    row0 = pid_m.to(tl.int64) * BLOCK_M  # 64-bit: M * stride may pass 2**31
    x_ptr += row0 * stride_xm
    su_ptr += row0 * R
    su_out_ptr += row0 * R
    y_ptr += row0 * N
    q_ptr += row0 * N
    rows = tl.arange(0, BLOCK_M)         # within the tile: 32-bit offsets (fewer registers)
    outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M - row0
    out_ok = outs < N
    dtype = x_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # base GEMM: x @ W.T
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        w_t = tl.load(w_ptr + outs[None, :] * stride_wn + cols[:, None] * stride_wk,
                      mask=out_ok[None, :] & col_ok[:, None], other=0.0)
        acc = tl.dot(x, w_t, acc, input_precision=PRECISION)
    # LoRA up-projection as r extra K-steps, su @ B.T; not software-pipelined (num_stages=1):
    # a few steps only, and pipelining them would hold extra fp32 tiles in shared memory
    for r0 in tl.range(0, R, BLOCK_R, num_stages=1):
        ranks = r0 + tl.arange(0, BLOCK_R)
        rank_ok = ranks < R
        su = finished_su(su_ptr, su_out_ptr, rows, ranks, row_ok, rank_ok, M, R, pid_n == 0, SU_SLICES, STORE_SU)
        b_t = tl.load(lora_b_ptr + outs[None, :] * stride_bn + ranks[:, None] * stride_br,
                      mask=out_ok[None, :] & rank_ok[:, None], other=0.0)
        acc = tl.dot(su.to(dtype), b_t.to(dtype), acc, input_precision=PRECISION)

    if EPILOGUE_HALVES:  # two [BLOCK_M, BLOCK_N / 2] halves: half the accumulator in registers at a time
        HALF: tl.constexpr = BLOCK_N // 2
        left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
        outs = pid_n * BLOCK_N + tl.arange(0, HALF)
        out_ok = outs < N
        dora_epilogue(left, outs, out_ok, rows[:, None] * N + outs[None, :], row_ok[:, None] & out_ok[None, :],
                      mag_ptr, norm_ptr, norm_out_ptr, bias_ptr, y_ptr, q_ptr, N, norm_eps, pid_m == 0, HAS_BIAS,
                      STORE_Q, NORM_SPLITS)
        outs += HALF
        out_ok = outs < N
        dora_epilogue(right, outs, out_ok, rows[:, None] * N + outs[None, :], row_ok[:, None] & out_ok[None, :],
                      mag_ptr, norm_ptr, norm_out_ptr, bias_ptr, y_ptr, q_ptr, N, norm_eps, pid_m == 0, HAS_BIAS,
                      STORE_Q, NORM_SPLITS)
    else:
        out_offsets = rows[:, None] * N + outs[None, :]
        out_mask = row_ok[:, None] & out_ok[None, :]
        dora_epilogue(acc, outs, out_ok, out_offsets, out_mask, mag_ptr, norm_ptr, norm_out_ptr, bias_ptr, y_ptr,
                      q_ptr, N, norm_eps, pid_m == 0, HAS_BIAS, STORE_Q, NORM_SPLITS)


def dora_forward(x, weight, su, lora_B, magnitude, norm, bias, norm_eps: float, store_q: bool = False,
                 out: Optional[torch.Tensor] = None, norm_out: Optional[torch.Tensor] = None,
                 su_out: Optional[torch.Tensor] = None):
    """y [M, N] (x's dtype) = c * (x @ weight.T + su @ lora_B.T) + bias.

    x [M, K] (any strides), weight [N, K] (x's dtype), su: lora_down's partial sums [S, M, r] fp32
    (or a finished su [M, r]), summed and rounded to the adapters' dtype (``su_out``'s, else
    lora_B's) by the GEMM, which writes the result to ``su_out`` [M, r] contiguous if given;
    lora_B [N, r], magnitude [N], bias [N] or None; norm: n [N] fp32, or the norm pass's partial
    sums [splits, N] (norm.row_norm_partials), which the epilogue finishes into ``norm_out`` [N]
    fp32; the column scale c = magnitude / max(n, norm_eps) is formed in the epilogue too (no
    extra launch). ``out``: a contiguous [M, N] tensor of x's dtype to write y into (default: a new one).
    With store_q, also returns q [M, N] (x's dtype) = (x @ weight.T + su @ lora_B.T) * t, the
    pre-scale output rescaled per column by t = magnitude_grad_rescale(c, max(norm, norm_eps)),
    which the magnitude gradient reads, else None.
    """
    x = narrow_row_stride(x)
    M, K = x.shape
    N = weight.shape[0]
    su = as_slices(su)
    R = su.shape[2]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    q = torch.empty((M, N), dtype=x.dtype, device=x.device) if store_q else None
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
    norm, norm_out, norm_splits = norm_arguments(norm, norm_out)
    _dora_forward_kernel[grid](
        x, weight, su, lora_B, su_out if su_out is not None else lora_B,  # lora_B: a dummy of the dtype
        magnitude.contiguous(), bias.contiguous() if bias is not None else norm,
        norm, norm_out, y, q if store_q else y,
        M, N, K, R, m_bucket(M),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), lora_B.stride(0), lora_B.stride(1),
        float(norm_eps),
        HAS_BIAS=bias is not None, STORE_Q=store_q, NORM_SPLITS=norm_splits, SU_SLICES=su.shape[0],
        STORE_SU=su_out is not None, EPILOGUE_HALVES=epilogue_halves(), BLOCK_R=gemm_block_r(R),
        PRECISION=dot_precision(x.dtype),
    )
    return y, q
