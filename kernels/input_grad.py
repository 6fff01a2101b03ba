"""Input-gradient kernels (the norm is a constant, so e = dy * c is the only coupling):

    e  = dy * c,  v = e @ B                     lora_up_grad     one pass over dy: v as fp32 partial
                                                                 sums [S, M, r] over slices of N (its
                                                                 readers sum them), and e [M, N]
                                                                 (dy's dtype) when asked
    dx = s * dropout_bwd(v @ A) + e @ W         dora_input_grad  one GEMM, one accumulator: the
                                                                 masked LoRA term first, then a
                                                                 plain main loop over e and W
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ._gemm import GEMM_TILES, gemm_configs, gemm_interpreter_config, gemm_smem_bytes, grouped_tile, rank_steps
from ._launch import (
    as_slices,
    block_r,
    dot_precision,
    gemm_block_r,
    lora_precision,
    narrow_row_stride,
    reduction_slices,
)
from ._lora_dot import lora_dot
from .dropout import dropout_keep
from .epilogue import magnitude_scale
from .tuning import autotune, cdiv, m_bucket

_ROWPASS_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(64, 128, 4, 3), (128, 64, 4, 3), (32, 128, 4, 4), (16, 256, 4, 3), (128, 128, 8, 3),
                         # smaller per-thread tiles, for cases where the ones above spill registers (the
                         # last: fp32 at r = 384 with e stored on sm_80, where the others spill or do not fit)
                         (128, 64, 8, 3), (64, 64, 8, 4), (32, 64, 4, 4), (32, 64, 8, 4)]
]
_ROWPASS_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32})


def _up_grad_smem_bytes(a) -> int:
    """The dy and B tiles of each pipeline stage (counted at fp32 when upcast), the e tile's trip
    through shared memory (a layout conversion; compiled with e stored or not), bf16x3's parts of
    c * B, the c and n vectors."""
    operand = 4 if a["UPCAST"] else a["dy_ptr"].element_size()
    stages = a["num_stages"] * (a["BLOCK_M"] + a["BLOCK_R"]) * a["BLOCK_N"] * operand
    e_tile = a["BLOCK_M"] * a["BLOCK_N"] * a["dy_ptr"].element_size()
    parts = 3 * a["BLOCK_R"] * a["BLOCK_N"] * 2 if a["PRECISION"] == "bf16x3" else 0  # c * B's bf16 parts
    return stages + e_tile + parts + 8 * a["BLOCK_N"]


@autotune(_ROWPASS_GPU_CONFIGS, _ROWPASS_INTERPRETER_CONFIG,
          key=["m_bucket", "N", "R", "n_splits", "STORE_E", "PRECISION"],
          smem_bytes=_up_grad_smem_bytes, case_dtypes=("dy_ptr", "lora_b_ptr"))
@triton.jit
def _lora_up_grad_kernel(
    dy_ptr, lora_b_ptr, v_ptr,             # dy [M, N], B [N, R], v partial sums [n_splits, M, R] fp32
    mag_ptr, norm_ptr,                     # magnitude [N], norm [N] fp32: c = g / max(n, eps)
    e_ptr,                                 # e [M, N] (dy's dtype; if STORE_E)
    M, N, R,
    m_bucket,                              # autotune key only
    n_splits, n_per_split,                 # the slices of N reduced in parallel (program_id(2)), their length
    stride_dym, stride_dyn, stride_bn, stride_br,
    norm_eps,
    STORE_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M  # 64-bit: M * stride may pass 2**31
    dy_ptr += row0 * stride_dym
    v_ptr += tl.program_id(2).to(tl.int64) * M * R + row0 * R
    e_ptr += row0 * N
    rows = tl.arange(0, BLOCK_M)                    # within the tile: 32-bit offsets
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < M - row0
    rank_ok = ranks < R
    dtype = dy_ptr.dtype.element_ty
    if UPCAST:  # fp32 adapters: multiply in fp32 (see _launch.lora_precision)
        dtype = tl.float32
    n_begin = tl.program_id(2) * n_per_split
    n_end = tl.minimum(n_begin + n_per_split, N)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(n_begin, n_end, BLOCK_N):
        outs = n0 + tl.arange(0, BLOCK_N)
        out_ok = outs < n_end
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + outs[None, :] * stride_dyn,
                     mask=row_ok[:, None] & out_ok[None, :], other=0.0)
        mag_scale, _ = magnitude_scale(mag_ptr, norm_ptr, outs, out_ok, norm_eps)  # the forward's c, bit for bit
        if STORE_E:  # for the dx GEMM (Triton or cuBLAS); the first rank chunk's programs write it
            if tl.program_id(1) == 0:
                e = dy.to(tl.float32) * mag_scale[None, :]
                tl.store(e_ptr + rows[:, None] * N + outs[None, :], e.to(e_ptr.dtype.element_ty),
                         mask=row_ok[:, None] & out_ok[None, :])
        b = tl.load(lora_b_ptr + outs[:, None] * stride_bn + ranks[None, :] * stride_br,
                    mask=out_ok[:, None] & rank_ok[None, :], other=0.0)
        # (dy * c) @ B as dy @ (c * B): c scales the small [BLOCK_N, BLOCK_R] tile, and dy goes to
        # the MMA as loaded (exact in bf16: see _lora_dot)
        acc = lora_dot(dy, b.to(tl.float32) * mag_scale[:, None], acc, dtype, PRECISION)
    tl.store(v_ptr + rows[:, None] * R + ranks[None, :], acc, mask=row_ok[:, None] & rank_ok[None, :])


def lora_up_grad(dy: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, lora_B: torch.Tensor,
                 norm_eps: float, e_out: Optional[torch.Tensor] = None, splits: Optional[int] = None) -> torch.Tensor:
    """v partial sums [S, M, r] fp32, S slices of N; summed in order (_lora_dot.summed_slices, as
    their readers do), v = (dy * c) @ lora_B, c = magnitude / max(norm, norm_eps) per column.

    dy [M, N] (any strides, the activation dtype), magnitude [N], norm [N] fp32, lora_B [N, r].
    ``e_out``: a contiguous [M, N] tensor of dy's dtype that also receives e = dy * c (the input
    of both routes' dx GEMM), from the same pass over dy. ``splits`` asks for S (default: enough
    to fill the GPU, see _launch.reduction_slices).
    """
    dy = narrow_row_stride(dy)
    M, N = dy.shape
    R = lora_B.shape[1]
    BR = block_r(R)
    r_chunks = cdiv(R, BR)
    n_splits, n_per_split = reduction_slices(N, cdiv(M, 64) * r_chunks, dy.device, splits)
    v = torch.empty((n_splits, M, R), dtype=torch.float32, device=dy.device)
    upcast, precision = lora_precision(dy.dtype, lora_B.dtype)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]), r_chunks, n_splits)
    _lora_up_grad_kernel[grid](
        dy, lora_B, v, magnitude.contiguous(), norm.float().contiguous(), e_out if e_out is not None else v,
        M, N, R, m_bucket(M), n_splits, n_per_split, dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1),
        float(norm_eps),
        STORE_E=e_out is not None, BLOCK_R=BR, UPCAST=upcast, PRECISION=precision,
    )
    return v


# The forward GEMM's tiles, transposed: output [BLOCK_M, BLOCK_K], reduction step BLOCK_N.
_INPUT_GRAD_GPU_CONFIGS = gemm_configs(GEMM_TILES, out_cols="BLOCK_K", reduction="BLOCK_N")
_INPUT_GRAD_INTERPRETER_CONFIG = gemm_interpreter_config(out_cols="BLOCK_K", reduction="BLOCK_N")


def _input_grad_smem_bytes(a) -> int:
    """The e and W tiles of each main-loop stage (see gemm_smem_bytes)."""
    return gemm_smem_bytes(a, "e_ptr", out_cols="BLOCK_K", reduction="BLOCK_N")


# With the norm n constant, y = c * ypre + bias, ypre = x @ W.T + s * dropout(x) @ A.T @ B.T, so
# the gradient of ypre is e = dy * c and, with v = e @ B (lora_up_grad),
#     dx = e @ W + s * dropout_bwd(v @ A),   dropout_bwd(t) = mask * t / (1 - p), the forward's mask.
# e comes from lora_up_grad's pass over dy (one [M, N] write): scaling dy by c as it was loaded
# here routed the MMA's A operand through registers and doubled the main loop's instructions.
@autotune(_INPUT_GRAD_GPU_CONFIGS, _INPUT_GRAD_INTERPRETER_CONFIG,
          key=["m_bucket", "N", "K", "R", "HAS_DROPOUT", "PRECISION"],
          smem_bytes=_input_grad_smem_bytes, case_dtypes=("e_ptr", "lora_a_ptr"))
@triton.jit(do_not_specialize=["seed"])
def _dora_input_grad_kernel(
    e_ptr, w_ptr,                        # e = dy * c [M, N] contiguous, W [N, K] (e's dtype)
    v_ptr, lora_a_ptr, dx_ptr,           # v [V_SLICES, M, R] fp32 (summed), A [R, K], dx [M, K] (e's dtype)
    M, N, K, R,
    m_bucket,                            # autotune key only
    stride_wn, stride_wk, stride_ar, stride_ak,
    scaling, seed, p,
    HAS_DROPOUT: tl.constexpr, V_SLICES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    # output tile dx[rows, cols] of BLOCK_M x BLOCK_K; the reduction runs over the N output
    # features of the layer in steps of BLOCK_N
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    row0 = pid_m.to(tl.int64) * BLOCK_M  # 64-bit: M * N may pass 2**31
    e_ptr += row0 * N
    v_ptr += row0 * R
    dx_ptr += row0 * K
    rows = tl.arange(0, BLOCK_M)         # within the tile: 32-bit offsets (fewer registers)
    col0 = pid_k * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    row_ok = rows < M - row0
    col_ok = cols < K
    dtype = e_ptr.dtype.element_ty

    # One accumulator: the LoRA term s * dropout_bwd(v @ A) first, then the main loop onto it
    # (two accumulators, the LoRA term added in the epilogue, spilled every large tile). The
    # dropout mask is drawn before the LoRA steps, while the accumulator is not yet live, and
    # eight elements per Philox call (dropout.py): a whole-tile mask beside a live accumulator
    # spilled 0.5-5 KB a thread. Computing the term in another kernel instead would write and
    # read an [M, K] fp32 tensor, ~20% of this GEMM's time at M = N = K = 4096.
    if HAS_DROPOUT:
        keep = dropout_keep(seed, row0 + rows, col0, p, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    acc = rank_steps(acc, v_ptr, lora_a_ptr, rows, cols, row_ok, col_ok, R, M * R, stride_ar, stride_ak, dtype,
                     V_SLICES, BLOCK_R, PRECISION)  # v @ A
    if HAS_DROPOUT:  # the forward's mask, the same 1/(1-p)
        acc = tl.where(keep, acc / (1.0 - p), 0.0)
    acc *= scaling

    # base term: e @ W, written as the tutorial's loop: rows past the edge read row 0 and columns
    # past it wrap (cols % K), never stored, so only the reduction is masked, and the tiles advance
    # by pointer. Per k-step on sm_90 this issues what the tutorial's loop does (118 instructions
    # at 128x256x64): 2-D masks on both loads cost 1.18x, and wrapping the columns with tl.where
    # instead of % lost the W loads' contiguity (3.1x, unvectorised).
    steps = tl.arange(0, BLOCK_N)
    e_tile = e_ptr + tl.where(row_ok, rows, 0)[:, None] * N + steps[None, :]
    w_tile = w_ptr + steps[:, None] * stride_wn + (cols % K)[None, :] * stride_wk
    for n0 in range(0, N, BLOCK_N):
        e = tl.load(e_tile, mask=steps[None, :] < N - n0, other=0.0)
        w = tl.load(w_tile, mask=steps[:, None] < N - n0, other=0.0)
        acc = tl.dot(e, w, acc, input_precision=PRECISION)
        e_tile += BLOCK_N
        w_tile += BLOCK_N * stride_wn
    tl.store(dx_ptr + rows[:, None] * K + cols[None, :], acc.to(dtype), mask=row_ok[:, None] & col_ok[None, :])


def dora_input_grad(e, weight, v, lora_A, scaling: float, dropout_p: float = 0.0, seed: int = 0):
    """dx [M, K] (e's dtype) = e @ weight + scaling * dropout_bwd(v @ lora_A).

    e [M, N] contiguous (dy * c, as lora_up_grad writes it), weight [N, K] (e's dtype), v:
    lora_up_grad's partial sums [S, M, r] fp32 (or v [M, r] fp32), summed here; lora_A [r, K].
    dropout_bwd re-applies the forward's mask for ``seed``.
    """
    M, N = e.shape
    K = weight.shape[1]
    v = as_slices(v)
    R = v.shape[2]
    dx = torch.empty((M, K), dtype=e.dtype, device=e.device)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(K, meta["BLOCK_K"]),)
    _dora_input_grad_kernel[grid](
        e, weight, v, lora_A, dx, M, N, K, R, m_bucket(M),
        weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
        float(scaling), int(seed), float(dropout_p),
        HAS_DROPOUT=dropout_p > 0, V_SLICES=v.shape[0], BLOCK_R=gemm_block_r(R), PRECISION=dot_precision(e.dtype),
    )
    return dx
