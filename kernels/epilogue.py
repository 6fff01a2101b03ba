"""The DoRA epilogue of an fp32 tile ypre = x @ W.T + su @ B.T, shared by the fused forward GEMM
(forward.py) and the composed route's epilogue pass (composed.py):

    n = sqrt(sum of the norm pass's partial sums)   per output column (or a finished n, given)
    c = g / max(n, eps)        per output column, correctly rounded like torch's division
    y = c * ypre + bias        one write of y in the activation dtype
    q = ypre * t               (training) t = pow2_floor(c), kept for the magnitude gradient

Finishing the norm here, rather than in a launch of its own between the norm pass and the GEMM,
costs each program NORM_SPLITS loads of BLOCK_N floats; the programs of the first row of tiles
also write n [N] for the backward and for callers that cache it.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl


def norm_arguments(norm: torch.Tensor, norm_out: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """(norm_ptr, norm_out_ptr, NORM_SPLITS) for `dora_epilogue`'s launchers: ``norm`` is either n [N]
    itself, or the norm pass's partial sums [splits, N], which the epilogue finishes and writes to
    ``norm_out`` [N] fp32 (required then)."""
    if norm.dim() == 2:
        if norm_out is None:
            raise ValueError("norm partial sums need a norm_out tensor to receive the finished norm")
        return norm, norm_out, norm.shape[0]
    norm = norm.float().contiguous()
    return norm, norm, 0


@triton.jit
def finished_norm(norm_ptr, outs, out_ok, N, NORM_SPLITS: tl.constexpr):
    """n [len(outs)] fp32, not clamped: norm_ptr holds n [N] itself (NORM_SPLITS == 0) or the norm
    pass's partial sums of squares [NORM_SPLITS, N], added in order and square-rooted (correctly
    rounded, the sum clamped at 0), as norm.finish_row_norm does."""
    if NORM_SPLITS == 0:
        return tl.load(norm_ptr + outs, mask=out_ok, other=1.0)
    sumsq = tl.load(norm_ptr + outs, mask=out_ok, other=1.0)
    for split in tl.static_range(1, NORM_SPLITS):
        sumsq += tl.load(norm_ptr + split * N + outs, mask=out_ok, other=0.0)
    # clamped at 0: the factored norm's sum (norm.py) may round below 0 where n is ~0
    return tl.sqrt_rn(tl.maximum(sumsq, 0.0, propagate_nan=tl.PropagateNan.ALL))


@triton.jit
def dora_epilogue(acc, outs, out_ok, out_offsets, out_mask, mag_ptr, norm_ptr, norm_out_ptr, bias_ptr, y_ptr, q_ptr,
                  N, norm_eps, write_norm, HAS_BIAS: tl.constexpr, STORE_Q: tl.constexpr,
                  NORM_SPLITS: tl.constexpr):
    """Store y = c * acc + bias (and, with STORE_Q, q = acc * t) for the fp32 tile acc = ypre
    [BLOCK_M, BLOCK_N] of output columns ``outs``; y and q at ``out_offsets`` in y_ptr's dtype.
    The norm: see `finished_norm`; with NORM_SPLITS > 0, programs passing ``write_norm`` store n
    at norm_out_ptr [N]. Shared by the fused GEMM and the composed route's epilogue pass."""
    dtype = y_ptr.dtype.element_ty
    n = finished_norm(norm_ptr, outs, out_ok, N, NORM_SPLITS)
    if NORM_SPLITS > 0:
        if write_norm:
            tl.store(norm_out_ptr + outs, n, mask=out_ok)
    # c = g / max(n, eps), correctly rounded like torch's division (reference.magnitude_scale)
    g = tl.load(mag_ptr + outs, mask=out_ok, other=0.0).to(tl.float32)
    n = tl.maximum(n, norm_eps)
    mag_scale = tl.math.div_rn(g, n)
    if STORE_Q:  # saved for the magnitude gradient, which is sum over rows of dy * q / (t * n)
        t = magnitude_grad_rescale(mag_scale, n)
        # q in place, then y = q * (c / t): one fp32 tile live, not two (acc and acc * t spilled
        # registers in the 128 x 256 tiles). The same y: t is a power of two with t <= c < 2t, so
        # q = ypre * t is exact (short of fp32 underflow) and c / t is exact.
        acc *= t[None, :]
        tl.store(q_ptr + out_offsets, acc.to(dtype), mask=out_mask)
        mag_scale = tl.where(t > 0, mag_scale / t, 0.0)  # t = 0: c subnormal or 0 and n > 2**126
    y = acc * mag_scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + outs, mask=out_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + out_offsets, y.to(dtype), mask=out_mask)


@triton.jit
def pow2_floor(v):
    """2**floor(log2|v|) of fp32 v, elementwise (0 for 0 and subnormals): v's exponent bits alone."""
    return (v.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)


@triton.jit
def magnitude_scale(mag_ptr, norm_ptr, outs, out_ok, norm_eps):
    """(c, max(n, eps)) [len(outs)] fp32 for columns ``outs``: c = g / max(n, eps), correctly rounded,
    bit for bit the forward epilogue's (and reference.magnitude_scale's) from the finished norm."""
    g = tl.load(mag_ptr + outs, mask=out_ok, other=0.0).to(tl.float32)
    n = tl.maximum(tl.load(norm_ptr + outs, mask=out_ok, other=1.0), norm_eps)
    return tl.math.div_rn(g, n), n


@triton.jit
def magnitude_grad_rescale(mag_scale, n):
    """t [BLOCK_N] = pow2_floor(c), or pow2_floor(1 / n) where c is 0: q = ypre * t is an exact
    rescaling (a power of two) with |q| <= |c * ypre| = |y - bias|, so q is finite in 16 bits
    wherever y is, while ypre = (y - bias) / c overflows fp16 for a small c. Bit for bit the
    same as tests/helpers.magnitude_grad_rescale, its plain statement."""
    t = pow2_floor(mag_scale)
    return tl.where(t > 0, t, pow2_floor(tl.math.div_rn(tl.full(n.shape, 1.0, tl.float32), n)))
