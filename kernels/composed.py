"""The light passes of the composed route, around cuBLAS GEMMs that read W in place.

The composed route (fused_dora.drivers, route="composed") leaves the two [M, N, K] GEMMs to
torch.mm (cuBLAS on a GPU) and fuses only the work around them:

    forward   y    = x @ W.T                      torch.mm, written into y's own buffer
              ypre = y + su @ B.T                 dora_compose_epilogue: reads y, r extra K-steps,
              y    = c * ypre + bias              then the fused GEMM's epilogue (epilogue.py),
              q    = ypre * t                     y written back in place
    backward  e, v = dy * c, e @ B                input_grad.lora_up_grad(e_out=...): one pass over dy
              dx   = e @ W                        torch.mm
              dx  += s * dropout_bwd(v @ A)       add_lora_input_grad, in place, the forward's mask

Each pass costs one [M, N] (forward) or [M, K] (backward) read and write more than the fused
GEMMs, which keep those terms in registers; what it buys is cuBLAS's main loop.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ._gemm import rank_steps
from ._launch import as_slices, dot_precision, gemm_block_r
from ._lora_dot import finished_su
from .dropout import dropout_keep
from .epilogue import dora_epilogue, norm_arguments
from .tuning import autotune, cdiv, m_bucket

# Elementwise tiles with a few rank steps: no main loop to pipeline, so one or two stages. 8 warps
# for 8K-element tiles and none larger (benchmarks/compile_report.py): with 4 warps, 64 x 128
# spilled registers for fp32 (FMA dots) on every GPU and 16 x 256 with fp32 adapters at r = 384;
# 128 x 128 spilled on sm_100 wherever q is stored, 16 x 128 with fp32 at r = 384.
_TILE_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_C": bc}, num_warps=w, num_stages=s)
    for bm, bc, w, s in [(128, 64, 8, 2), (64, 128, 8, 2), (64, 64, 4, 2), (32, 128, 4, 2), (16, 256, 8, 2),
                         (16, 64, 4, 1)]
]
_TILE_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_C": 32})


def _tile_smem_bytes(a) -> int:
    """Both operands of a rank step (16-bit or fp32), and the [BLOCK_M, BLOCK_C] fp32 tile that may
    change layout between the load and the dot's accumulator."""
    xs = max(a["lora_ptr"].element_size(), a["out_ptr"].element_size())
    return (a["BLOCK_M"] + a["BLOCK_C"]) * a["BLOCK_R"] * xs + a["BLOCK_M"] * a["BLOCK_C"] * 4


@autotune(_TILE_GPU_CONFIGS, _TILE_INTERPRETER_CONFIG, key=["m_bucket", "N", "R", "STORE_Q", "PRECISION"],
          smem_bytes=_tile_smem_bytes, case_dtypes=("out_ptr", "lora_ptr"),
          restore_value=("out_ptr",))  # y is read, then rewritten in place
@triton.jit
def _dora_compose_epilogue_kernel(
    out_ptr, su_ptr, lora_ptr,           # y [M, N] (in: x @ W.T; out: y), su [SU_SLICES, M, R] (summed),
                                         # B = lora_ptr [N, R]
    su_out_ptr,                          # su [M, R] finished, the adapters' dtype (if STORE_SU)
    mag_ptr, bias_ptr,                   # magnitude [N], bias [N] (if HAS_BIAS)
    norm_ptr, norm_out_ptr,              # n [N], or partial sums [NORM_SPLITS, N] finished into norm_out [N]
    q_ptr,                               # q [M, N] (y's dtype; if STORE_Q)
    M, N, R,
    m_bucket,                            # autotune key only
    stride_bn, stride_br,
    norm_eps,
    HAS_BIAS: tl.constexpr, STORE_Q: tl.constexpr, NORM_SPLITS: tl.constexpr,
    SU_SLICES: tl.constexpr, STORE_SU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M  # 64-bit: M * N may pass 2**31
    out_ptr += row0 * N
    su_ptr += row0 * R
    su_out_ptr += row0 * R
    q_ptr += row0 * N
    rows = tl.arange(0, BLOCK_M)                    # within the tile: 32-bit offsets
    outs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < M - row0
    out_ok = outs < N
    out_offsets = rows[:, None] * N + outs[None, :]
    out_mask = row_ok[:, None] & out_ok[None, :]
    dtype = out_ptr.dtype.element_ty

    acc = tl.load(out_ptr + out_offsets, mask=out_mask, other=0.0).to(tl.float32)  # x @ W.T, from cuBLAS
    # su @ B.T in the activation dtype, as the fused GEMM's LoRA steps (why not _gemm.rank_steps: there)
    for r0 in tl.range(0, R, BLOCK_R, num_stages=1):
        ranks = r0 + tl.arange(0, BLOCK_R)
        rank_ok = ranks < R
        su = finished_su(su_ptr, su_out_ptr, rows, ranks, row_ok, rank_ok, M, R, tl.program_id(1) == 0, SU_SLICES,
                         STORE_SU)
        b_t = tl.load(lora_ptr + outs[None, :] * stride_bn + ranks[:, None] * stride_br,
                      mask=out_ok[None, :] & rank_ok[:, None], other=0.0)
        acc = tl.dot(su.to(dtype), b_t.to(dtype), acc, input_precision=PRECISION)
    dora_epilogue(acc, outs, out_ok, out_offsets, out_mask, mag_ptr, norm_ptr, norm_out_ptr, bias_ptr, out_ptr, q_ptr,
                  N, norm_eps, tl.program_id(0) == 0, HAS_BIAS, STORE_Q, NORM_SPLITS)


def dora_compose_epilogue(y, su, lora_B, magnitude, norm, bias, norm_eps: float, store_q: bool = False,
                          norm_out: Optional[torch.Tensor] = None, su_out: Optional[torch.Tensor] = None):
    """q [M, N] or None; y [M, N] (contiguous, holding x @ W.T) becomes, in place,
    c * (x @ W.T + su @ lora_B.T) + bias, with c = magnitude / max(n, norm_eps).

    su: lora_down's partial sums [S, M, r] fp32 (or a finished su [M, r]), summed and rounded to the
    adapters' dtype here; su_out: a contiguous [M, r] tensor receiving the finished su, or None (as
    forward.dora_forward); lora_B [N, r], magnitude [N], bias [N] or None; norm and norm_out as for
    forward.dora_forward. With store_q, q = (x @ W.T + su @
    lora_B.T) * t as forward.dora_forward returns it.
    """
    M, N = y.shape
    su = as_slices(su)
    R = su.shape[2]
    q = torch.empty((M, N), dtype=y.dtype, device=y.device) if store_q else None
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]), cdiv(N, meta["BLOCK_C"]))
    norm, norm_out, norm_splits = norm_arguments(norm, norm_out)
    _dora_compose_epilogue_kernel[grid](
        y, su, lora_B, su_out if su_out is not None else lora_B,  # lora_B: a dummy of the dtype
        magnitude.contiguous(), bias.contiguous() if bias is not None else norm,
        norm, norm_out, q if store_q else y,
        M, N, R, m_bucket(M), lora_B.stride(0), lora_B.stride(1), float(norm_eps),
        HAS_BIAS=bias is not None, STORE_Q=store_q, NORM_SPLITS=norm_splits, SU_SLICES=su.shape[0],
        STORE_SU=su_out is not None, BLOCK_R=gemm_block_r(R), PRECISION=dot_precision(y.dtype),
    )
    return q


# dx = e @ W + s * dropout_bwd(v @ A): the first term from cuBLAS, the second added here with the
# forward's mask (regenerated from the seed, as in input_grad.py's fused GEMM).
@autotune(_TILE_GPU_CONFIGS, _TILE_INTERPRETER_CONFIG, key=["m_bucket", "K", "R", "HAS_DROPOUT", "PRECISION"],
          smem_bytes=_tile_smem_bytes, case_dtypes=("out_ptr", "lora_ptr"),
          restore_value=("out_ptr",))  # dx += ..., in place
@triton.jit(do_not_specialize=["seed"])
def _add_lora_input_grad_kernel(
    out_ptr, v_ptr, lora_ptr,            # dx [M, K] (in: e @ W; out: dx), v [V_SLICES, M, R] fp32 (summed),
                                         # A = lora_ptr [R, K]
    M, K, R,
    m_bucket,                            # autotune key only
    stride_ar, stride_ak,
    scaling, seed, p,
    HAS_DROPOUT: tl.constexpr, V_SLICES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M  # 64-bit: M * K may pass 2**31
    out_ptr += row0 * K
    v_ptr += row0 * R
    rows = tl.arange(0, BLOCK_M)                    # within the tile: 32-bit offsets
    col0 = tl.program_id(1) * BLOCK_C
    cols = col0 + tl.arange(0, BLOCK_C)
    row_ok = rows < M - row0
    col_ok = cols < K
    dtype = out_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    acc = rank_steps(acc, v_ptr, lora_ptr, rows, cols, row_ok, col_ok, R, M * R, stride_ar, stride_ak, dtype,
                     V_SLICES, BLOCK_R, PRECISION)  # v @ A, as the fused GEMM
    if HAS_DROPOUT:  # the forward's mask, the same 1/(1-p)
        keep = dropout_keep(seed, row0 + rows, col0, p, BLOCK_C)
        acc = tl.where(keep, acc / (1.0 - p), 0.0)
    offsets = rows[:, None] * K + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    acc = acc * scaling + tl.load(out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, acc.to(dtype), mask=mask)


def add_lora_input_grad(dx, v, lora_A, scaling: float, dropout_p: float = 0.0, seed: int = 0) -> None:
    """dx [M, K] += scaling * dropout_bwd(v @ lora_A), in place.

    dx [M, K] contiguous (holding (dy * c) @ W), v: lora_up_grad's partial sums [S, M, r] fp32
    (or v [M, r] fp32), summed here; lora_A [r, K]. dropout_bwd re-applies the forward's mask for
    ``seed`` with the 1/(1-p) scale.
    """
    M, K = dx.shape
    v = as_slices(v)
    R = v.shape[2]
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]), cdiv(K, meta["BLOCK_C"]))
    _add_lora_input_grad_kernel[grid](
        dx, v, lora_A, M, K, R, m_bucket(M), lora_A.stride(0), lora_A.stride(1),
        float(scaling), int(seed), float(dropout_p),
        HAS_DROPOUT=dropout_p > 0, V_SLICES=v.shape[0], BLOCK_R=gemm_block_r(R), PRECISION=dot_precision(dx.dtype),
    )
