"""The MMA of the small LoRA GEMMs (x @ A.T, dy @ (c * B), v.T @ x, dy.T @ su) in the precision
`_launch.lora_precision` picks.

With fp32 adapters over bf16 activations (PEFT's default) one operand of each product is exact in
bf16 (x, dy: the activations) and the other is fp32 (A, c * B, v, su). "bf16x3" writes the fp32
operand as the sum of three bf16 numbers, hi + mid + lo, which is exact (8 + 8 + 8 significant
bits for fp32's 24), and runs three bf16 MMAs: each product of two bf16 numbers is exact in the
fp32 accumulator, so the result is as accurate as an fp32 GEMM. Against 3xTF32 (Triton's
"tf32x3": both operands split, three TF32 MMAs at half the bf16 rate) the activation tile goes
to the tensor cores as it was loaded, with no per-element work, and only the small [tile, r]
operand is split; those per-element conversions of the activation tile made the light passes
instruction-bound (benchmarks/NOTES.md, attempt 6).
"""
import triton
import triton.language as tl

from .tuning import INTERPRET

# Triton's interpreter multiplies bf16 tiles wrongly in tl.dot (checked with triton 3.3 and 3.9:
# results off by orders of magnitude), so there the bf16 parts are multiplied in fp32, which is
# the same arithmetic: a product of two bf16 numbers is exact in fp32.
_INTERPRET = tl.constexpr(INTERPRET)


@triton.jit
def _bf16_mma(a, b, acc):
    if _INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def split_bf16(v):
    """(hi, mid, lo) bf16 with hi + mid + lo == v for fp32 v (each remainder is exact in fp32)."""
    hi = v.to(tl.bfloat16)
    rest = v - hi.to(tl.float32)
    mid = rest.to(tl.bfloat16)
    lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
    return hi, mid, lo


@triton.jit
def lora_dot(a, b, acc, dtype, PRECISION: tl.constexpr):
    """acc [P, Q] fp32 + a [P, S] @ b [S, Q].

    PRECISION "bf16x3": a or b is bf16 (used as it is), the other fp32 (split by `split_bf16`);
    the smallest parts are added first. "exact16": a and b are 16-bit tiles of one dtype, multiplied
    as they are (exact products; in fp32 under the interpreter, see _bf16_mma). Otherwise both are
    cast to ``dtype`` and multiplied with tl.dot's input_precision=PRECISION ("tf32x3", "tf32",
    "ieee"; ignored for 16-bit dtypes).
    """
    if PRECISION == "exact16":
        acc = _bf16_mma(a, b, acc)
    elif PRECISION == "bf16x3":
        if a.dtype == tl.float32:
            hi, mid, lo = split_bf16(a)
            acc = _bf16_mma(lo, b, acc)
            acc = _bf16_mma(mid, b, acc)
            acc = _bf16_mma(hi, b, acc)
        else:
            hi, mid, lo = split_bf16(b.to(tl.float32))
            acc = _bf16_mma(a, lo, acc)
            acc = _bf16_mma(a, mid, acc)
            acc = _bf16_mma(a, hi, acc)
    else:
        acc = tl.dot(a.to(dtype), b.to(dtype), acc, input_precision=PRECISION)
    return acc


@triton.jit
def gram_dot(a_t, acc):
    """acc [R, R] fp32 + a_t.T @ a_t for a tile a_t [S, R] of A.T, at fp32 accuracy: 16-bit tiles
    multiply exactly (products of two 16-bit numbers are exact in the fp32 accumulator), fp32 ones
    with 3xTF32, as the norm's own products (norm.py)."""
    if a_t.dtype == tl.float32:
        return tl.dot(tl.trans(a_t), a_t, acc, input_precision="tf32x3")
    return _bf16_mma(tl.trans(a_t), a_t, acc)


@triton.jit
def summed_slices(ptr, offsets, mask, slice_stride, SLICES: tl.constexpr):
    """fp32 sum of the SLICES partial sums [SLICES, ...] (slices ``slice_stride`` elements apart) at
    ``offsets``, added in order: lora_down's su and lora_up_grad's v, split along their reduction so
    that their grids fill the GPU, are finished by the kernels that read them, each with the same
    additions, so every reader sees the same bits (no atomics, no extra launch). The pointer
    advances slice by slice (no product of slice index and stride); the stride M * r itself is a
    32-bit integer, as the launchers' other tensor sizes that are not offset in 64 bits."""
    total = tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    for _ in tl.static_range(1, SLICES):
        ptr += slice_stride
        total += tl.load(ptr + offsets, mask=mask, other=0.0)
    return total


@triton.jit
def finished_su(su_ptr, su_out_ptr, rows, ranks, row_ok, rank_ok, M, R, write, SU_SLICES: tl.constexpr,
                STORE_SU: tl.constexpr):
    """su [len(rows), len(ranks)] in the adapters' dtype (su_out_ptr's): lora_down's partial sums
    [SU_SLICES, M, R] fp32 at su_ptr summed (`summed_slices`) and rounded once, as PEFT rounds
    lora_A's output; with STORE_SU, programs passing ``write`` store it at su_out_ptr [M, R] (the
    backward's dB reads it: saved at the size of PEFT LoRA's [M, r]). Both forward routes' GEMMs
    finish su alike."""
    offsets = rows[:, None] * R + ranks[None, :]
    mask = row_ok[:, None] & rank_ok[None, :]
    su = summed_slices(su_ptr, offsets, mask, M * R, SU_SLICES).to(su_out_ptr.dtype.element_ty)
    if STORE_SU:
        if write:
            tl.store(su_out_ptr + offsets, su, mask=mask)
    return su
