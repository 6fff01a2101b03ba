"""Adapter-gradient kernels: column reductions over the M tokens, then one launch that finishes them.

    dmag_raw = sum_m dy * q                      [N]     (q = ypre * t)
    dB_raw   = dy.T @ su                         [N, r]  (su = s * u)
    dA_raw   = v.T @ dropout(x)                  [r, K]

dmag and dB share one pass over dy. Each reduction is split over slices of M so the grid fills
the GPU; every slice writes fp32 partial sums. `finish_adapter_grads` then adds the slices in
order (deterministic, no atomics) and finishes all three in one launch: dmag = dmag_raw / (t * n),
dB = c * dB_raw, dA = s * dA_raw, each written in its parameter's dtype.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import as_slices, block_r, lora_precision, narrow_row_stride
from ._lora_dot import lora_dot, summed_slices
from .dropout import dropout_keep
from .epilogue import magnitude_grad_rescale, magnitude_scale
from .tuning import autotune, cdiv, split_count

_COLPASS_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_C": bc}, num_warps=w, num_stages=s)
    for bm, bc, w, s in [(64, 128, 4, 3), (128, 64, 4, 3), (64, 64, 4, 4), (128, 128, 8, 3), (32, 256, 8, 3),
                         # smaller per-thread tiles, for cases where the ones above spill registers
                         (64, 64, 8, 4), (32, 128, 8, 4), (32, 64, 4, 4), (16, 128, 4, 4), (16, 64, 4, 4)]
]
_COLPASS_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_C": 32})


@triton.jit
def _slice_bounds(M, m_splits):
    """[begin, end) of this program's slice of the M rows (program_id(2) of m_splits)."""
    rows_per_split = tl.cdiv(M, m_splits)
    begin = tl.program_id(2) * rows_per_split
    return begin, tl.minimum(begin + rows_per_split, M)


def _mag_b_smem_bytes(a) -> int:
    """The dy, q and su tiles of each pipeline stage (su counted at fp32)."""
    parts = 3 * a["BLOCK_M"] * a["BLOCK_R"] * 2 if a["PRECISION"] == "bf16x3" else 0  # su's bf16 parts
    return a["num_stages"] * a["BLOCK_M"] * (2 * a["BLOCK_C"] * a["dy_ptr"].element_size() + 4 * a["BLOCK_R"]) + parts


@autotune(_COLPASS_GPU_CONFIGS, _COLPASS_INTERPRETER_CONFIG,
          key=["N", "R", "m_splits", "COMPUTE_MAG", "COMPUTE_B", "PRECISION"],
          smem_bytes=_mag_b_smem_bytes, case_dtypes=("dy_ptr", "su_ptr"))
@triton.jit
def _magnitude_and_B_grad_kernel(
    dy_ptr, q_ptr, su_ptr,               # dy, q [M, N] (q contiguous); su [M, R] contiguous
    dmag_ptr, db_ptr,                    # partial sums per slice: dmag [S, N], db [S, N, R] fp32
    M, N, R,
    m_splits,                            # S, the slices of M reduced in parallel
    stride_dym, stride_dyn,
    COMPUTE_MAG: tl.constexpr, COMPUTE_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    outs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    out_ok = outs < N
    rank_ok = ranks < R
    m_begin, m_end = _slice_bounds(M, m_splits)
    mag_here = tl.program_id(1) == 0  # the first rank chunk owns the magnitude sum
    dtype = dy_ptr.dtype.element_ty
    if UPCAST:  # fp32 adapters: multiply in fp32 (see _launch.lora_precision)
        dtype = tl.float32

    dmag = tl.zeros((BLOCK_C,), dtype=tl.float32)
    db = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    rows = tl.arange(0, BLOCK_M)   # within the tile: 32-bit offsets
    first = m_begin.to(tl.int64)   # 64-bit: M * stride may pass 2**31
    for m0 in range(m_begin, m_end, BLOCK_M):
        row0 = first + (m0 - m_begin)
        row_ok = rows < m_end - m0
        dy = tl.load(dy_ptr + row0 * stride_dym + rows[:, None] * stride_dym + outs[None, :] * stride_dyn,
                     mask=row_ok[:, None] & out_ok[None, :], other=0.0)
        if COMPUTE_MAG:
            if mag_here:
                q = tl.load(q_ptr + row0 * N + rows[:, None] * N + outs[None, :],
                            mask=row_ok[:, None] & out_ok[None, :], other=0.0)
                dmag += tl.sum(dy.to(tl.float32) * q.to(tl.float32), axis=0)
        if COMPUTE_B:
            su = tl.load(su_ptr + row0 * R + rows[:, None] * R + ranks[None, :],
                         mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
            db = lora_dot(tl.trans(dy), su, db, dtype, PRECISION)
    split = tl.program_id(2)
    if COMPUTE_MAG:
        if mag_here:
            tl.store(dmag_ptr + split * N + outs, dmag, mask=out_ok)
    if COMPUTE_B:
        tl.store(db_ptr + split * N * R + outs[:, None] * R + ranks[None, :], db,
                 mask=out_ok[:, None] & rank_ok[None, :])


def magnitude_and_B_grad_partials(dy, q, su, compute_mag: bool, compute_B: bool, splits: Optional[int] = None,
                                  adapter_dtype: torch.dtype = torch.float32):
    """(dmag_raw partials [S, N] fp32 or None, dB_raw partials [S, N, r] fp32 or None) from one pass
    over dy, S slices of M; summed over S: dmag_raw = sum over M of dy * q, dB_raw = dy.T @ su.

    dy [M, N] (any strides), q [M, N] contiguous (dora_forward's; needed only for compute_mag),
    su [M, r] contiguous, the forward's (None if not compute_B). splits overrides S (default: two
    programs per SM with column blocks of 128 or less). adapter_dtype (lora_B's) picks the precision
    of dy.T @ su (see _launch.lora_precision).
    """
    dy = narrow_row_stride(dy)
    M, N = dy.shape
    upcast, precision = lora_precision(dy.dtype, adapter_dtype)
    if not compute_B:  # su is not needed (and may be None): a dummy rank, no rank chunks
        su = dy
    R = su.shape[1] if compute_B else 1
    BR = block_r(R)
    r_chunks = cdiv(R, BR) if compute_B else 1
    splits = splits or split_count(cdiv(N, 128) * r_chunks, M, dy.device)
    dmag = torch.empty((splits, N), dtype=torch.float32, device=dy.device) if compute_mag else None
    db = torch.empty((splits, N, R), dtype=torch.float32, device=dy.device) if compute_B else None
    grid = lambda meta: (cdiv(N, meta["BLOCK_C"]), r_chunks, splits)
    _magnitude_and_B_grad_kernel[grid](
        dy, q if compute_mag else dy, su, dmag if compute_mag else dy, db if compute_B else dy,
        M, N, R, splits, dy.stride(0), dy.stride(1),
        COMPUTE_MAG=compute_mag, COMPUTE_B=compute_B, BLOCK_R=BR, UPCAST=upcast, PRECISION=precision,
    )
    return dmag, db


def _a_grad_smem_bytes(a) -> int:
    """The x tile (counted at fp32 when upcast) and the V_SLICES v tiles (fp32) of each pipeline
    stage, bf16x3's parts of v."""
    xs = 4 if a["UPCAST"] and a["PRECISION"] != "bf16x3" else a["x_ptr"].element_size()
    parts = 3 * a["BLOCK_M"] * a["BLOCK_R"] * 2 if a["PRECISION"] == "bf16x3" else 0
    return a["num_stages"] * a["BLOCK_M"] * (a["BLOCK_C"] * xs + 4 * a["BLOCK_R"] * a["V_SLICES"]) + parts


@autotune(_COLPASS_GPU_CONFIGS, _COLPASS_INTERPRETER_CONFIG,
          key=["K", "R", "m_splits", "HAS_DROPOUT", "V_SLICES", "PRECISION"],  # V_SLICES: shared memory
          smem_bytes=_a_grad_smem_bytes, case_dtypes=("x_ptr", None))
@triton.jit(do_not_specialize=["seed"])
def _lora_A_grad_kernel(
    v_ptr, x_ptr, da_ptr,                 # v [V_SLICES, M, R] fp32 (summed); x [M, K]; da [S, R, K] fp32
    M, K, R,
    m_splits,                             # S, the slices of M reduced in parallel
    stride_xm, stride_xk,
    seed, p,
    HAS_DROPOUT: tl.constexpr, V_SLICES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    col_ok = cols < K
    rank_ok = ranks < R
    m_begin, m_end = _slice_bounds(M, m_splits)
    dtype = x_ptr.dtype.element_ty
    if UPCAST:  # fp32 adapters: multiply in fp32 (see _launch.lora_precision)
        dtype = tl.float32

    da = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    rows = tl.arange(0, BLOCK_M)   # within the tile: 32-bit offsets
    first = m_begin.to(tl.int64)   # 64-bit: M * stride may pass 2**31
    for m0 in range(m_begin, m_end, BLOCK_M):
        row0 = first + (m0 - m_begin)
        row_ok = rows < m_end - m0
        v_t = summed_slices(v_ptr + row0 * R, ranks[:, None] + rows[None, :] * R, rank_ok[:, None] & row_ok[None, :],
                            M * R, V_SLICES)
        x = tl.load(x_ptr + row0 * stride_xm + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if HAS_DROPOUT:  # the forward's mask, in x's dtype (exact); 1 / (1 - p) after the loop
            x = tl.where(dropout_keep(seed, row0 + rows, tl.program_id(0) * BLOCK_C, p, BLOCK_C), x, 0.0)
        da = lora_dot(v_t, x, da, dtype, PRECISION)
    if HAS_DROPOUT:
        da = da / (1.0 - p)
    split = tl.program_id(2)
    tl.store(da_ptr + split * R * K + ranks[:, None] * K + cols[None, :], da, mask=rank_ok[:, None] & col_ok[None, :])


def lora_A_grad_partials(v: torch.Tensor, x: torch.Tensor, dropout_p: float = 0.0, seed: int = 0,
                         splits: Optional[int] = None, adapter_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dA_raw partials [S, r, K] fp32, S slices of M; summed over S: v.T @ dropout(x), with the
    forward's mask for ``seed``.

    v: lora_up_grad's partial sums [S_v, M, r] fp32 (or v [M, r] fp32), summed here; x [M, K] (any
    strides). splits, adapter_dtype: as for magnitude_and_B_grad_partials.
    """
    x = narrow_row_stride(x)
    M, K = x.shape
    upcast, precision = lora_precision(x.dtype, adapter_dtype)
    v = as_slices(v)
    R = v.shape[2]
    BR = block_r(R)
    r_chunks = cdiv(R, BR)
    splits = splits or split_count(cdiv(K, 128) * r_chunks, M, x.device)
    da = torch.empty((splits, R, K), dtype=torch.float32, device=x.device)
    grid = lambda meta: (cdiv(K, meta["BLOCK_C"]), r_chunks, splits)
    _lora_A_grad_kernel[grid](
        v, x, da, M, K, R, splits, x.stride(0), x.stride(1), int(seed), float(dropout_p),
        HAS_DROPOUT=dropout_p > 0, V_SLICES=v.shape[0], BLOCK_R=BR, UPCAST=upcast, PRECISION=precision,
    )
    return da


# one config: a tiny elementwise pass; autotuned only to be registered (compile report, launch counts)
@autotune([triton.Config({}, num_warps=4)], triton.Config({}), key=["N", "R", "K", "MAG_B_SPLITS", "A_SPLITS"],
          smem_bytes=lambda a: 0, case_dtypes=("db_ptr", "da_ptr"))
@triton.jit
def _finish_adapter_grads_kernel(
    dmag_part_ptr, db_part_ptr, da_part_ptr,   # partial sums [MAG_B_SPLITS, N], [MAG_B_SPLITS, N, R], [A_SPLITS, R, K]
    mag_ptr, norm_ptr,                         # magnitude [N], the forward's norm [N] fp32
    dmag_ptr, db_ptr, da_ptr,                  # dmagnitude [N], dB [N, R], dA [R, K], in their parameters' dtypes
    N, R, K,
    mag_programs, b_programs,                  # the programs finishing dmag, then dB; the rest finish dA
    scaling, norm_eps,
    MAG_B_SPLITS: tl.constexpr, A_SPLITS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    lane = tl.arange(0, BLOCK)
    if pid < mag_programs:  # dmag = sum(dy * ypre) / n = dmag_raw / (t * n)
        outs = pid * BLOCK + lane
        ok = outs < N
        raw = summed_slices(dmag_part_ptr, outs, ok, N, MAG_B_SPLITS)
        mag_scale, n = magnitude_scale(mag_ptr, norm_ptr, outs, ok, norm_eps)
        dmag = tl.math.div_rn(raw, magnitude_grad_rescale(mag_scale, n) * n)
        tl.store(dmag_ptr + outs, dmag.to(dmag_ptr.dtype.element_ty), mask=ok)
    elif pid < mag_programs + b_programs:  # dB = c * dy.T @ su (su already carries the scaling)
        idx = (pid - mag_programs) * BLOCK + lane
        ok = idx < N * R
        outs = idx // R
        mag_scale, _ = magnitude_scale(mag_ptr, norm_ptr, outs, ok, norm_eps)
        db = mag_scale * summed_slices(db_part_ptr, idx, ok, N * R, MAG_B_SPLITS)
        tl.store(db_ptr + idx, db.to(db_ptr.dtype.element_ty), mask=ok)
    else:  # dA = s * v.T @ dropout(x)
        idx = (pid - mag_programs - b_programs) * BLOCK + lane
        ok = idx < R * K
        da = scaling * summed_slices(da_part_ptr, idx, ok, R * K, A_SPLITS)
        tl.store(da_ptr + idx, da.to(da_ptr.dtype.element_ty), mask=ok)


_FINISH_BLOCK = 1024


def finish_adapter_grads(dmag_part: Optional[torch.Tensor], db_part: Optional[torch.Tensor],
                         da_part: Optional[torch.Tensor], magnitude: torch.Tensor, norm: torch.Tensor,
                         lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, norm_eps: float):
    """(dmagnitude [N], dB [N, r], dA [r, K]) in the dtypes of magnitude, lora_B and lora_A, or None
    for a partial that is None, in one launch, from the partial sums of
    `magnitude_and_B_grad_partials` and `lora_A_grad_partials`, magnitude [N] and the forward's
    norm [N] fp32."""
    N, R, K = lora_B.shape[0], lora_B.shape[1], lora_A.shape[1]
    def new_like(t):  # contiguous: the kernel indexes the gradients flat
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)

    dmag = new_like(magnitude) if dmag_part is not None else None
    db = new_like(lora_B) if db_part is not None else None
    da = new_like(lora_A) if da_part is not None else None
    mag_programs = cdiv(N, _FINISH_BLOCK) if dmag is not None else 0
    b_programs = cdiv(N * R, _FINISH_BLOCK) if db is not None else 0
    a_programs = cdiv(R * K, _FINISH_BLOCK) if da is not None else 0
    if mag_programs + b_programs + a_programs == 0:
        return dmag, db, da
    norm = norm.float().contiguous()
    _finish_adapter_grads_kernel[(mag_programs + b_programs + a_programs,)](
        dmag_part if dmag_part is not None else norm, db_part if db_part is not None else norm,
        da_part if da_part is not None else norm, magnitude.contiguous(), norm,
        dmag if dmag is not None else norm, db if db is not None else norm, da if da is not None else norm,
        N, R, K, mag_programs, b_programs, float(scaling), float(norm_eps),
        MAG_B_SPLITS=next((t.shape[0] for t in (dmag_part, db_part) if t is not None), 1),
        A_SPLITS=da_part.shape[0] if da_part is not None else 1, BLOCK=_FINISH_BLOCK,
    )
    return dmag, db, da
