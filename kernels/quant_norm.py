"""Row norm of a 4-bit (bitsandbytes NF4 / FP4) weight adapted by DoRA, read from its packed codes:

    n_j = || dequant(W)_j + s * (B @ A)_j ||_2

without a dense [N, K] temporary. bitsandbytes' storage of a weight [N, K] (row-major, flattened):

    packed  uint8 [(N*K + 1) // 2]   element i's 4-bit code in byte i // 2, high nibble for even i
    code    fp32 [16]                 the code table (NF4 or FP4 values in [-1, 1])
    absmax  fp32 [ceil(N*K / bs)]     one scale per block of bs consecutive elements (bs = blocksize)
      or, with double quantization ("nested", compress_statistics=True):
    absmax  uint8 [ceil(N*K / bs)]    8-bit codes of (scale - offset)
    absmax2 fp32 [ceil(blocks / bs2)] one scale per block of bs2 (256) absmax codes
    code2   fp32 [256]                their code table (bitsandbytes' dynamic map)
    offset  fp32 [1]                  the mean that was subtracted

    dequant(W)[i] = round_to_dtype(code[q_i] * scale(i // bs))              (fp32 product)
    scale(b)      = absmax[b]                                                (not nested)
                  = code2[absmax[b]] * absmax2[b // bs2] + offset            (nested; fp32 product, then sum)

exactly as bitsandbytes.functional.dequantize_4bit computes it (its kernels and its
dequantize_blockwise + offset for the nested scales), rounded to the weight's dtype (the quant
state's dtype, as PEFT's DoRA norm sees it). On a GPU the kernel is compiled without FMA
contraction, so the product and the sum above are rounded apart, as bitsandbytes rounds them.

One tiled pass: each program owns BLOCK_N rows and a slice of the K columns, unpacks its codes,
looks up the code table and the block scales, forms the tile dequant(W) + s * B @ A in registers
(fp32) and writes its partial sum of squares; with one slice it finishes its rows itself (the
square root). Several slices are added in order and square-rooted by norm.finish_row_norm
(deterministic, no atomics), bit for bit as the dense norm is finished. Each packed byte is read
from memory once.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import block_r, dot_precision
from .norm import finish_row_norm
from .tuning import autotune, cdiv, split_count

_GPU_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [(32, 128, 4, 3), (64, 64, 4, 3), (16, 128, 4, 3), (32, 64, 4, 4), (16, 64, 4, 4)]
]
_INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 32, "BLOCK_K": 32})

_ROUND_TO = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# a tile's elements are addressed by 32-bit offsets from its first one: BLOCK_N rows of K
_MAX_BLOCK_N = max(c.kwargs["BLOCK_N"] for c in _GPU_CONFIGS + [_INTERPRETER_CONFIG])


def _check_row_span(K: int) -> None:
    if _MAX_BLOCK_N * K >= 2**31:
        raise ValueError(f"4-bit weights with {K} columns are not served ({_MAX_BLOCK_N} rows of them pass 32-bit "
                         "offsets)")


def _shift(blocksize: int) -> int:
    """log2 of a power-of-two block size (bitsandbytes' are 32 ... 4096; nested: 256)."""
    blocksize = int(blocksize)
    if blocksize < 1 or blocksize & (blocksize - 1):
        raise ValueError(f"block size {blocksize} is not a power of two")
    return blocksize.bit_length() - 1


def _row_aligned(K: int, blocksize: int) -> bool:
    """Every row of W [N, K] starts at a whole byte and a whole block (dequant_4bit_rows)."""
    return K % 2 == 0 and K % int(blocksize) == 0


def _quant_sumsq_smem_bytes(a) -> int:
    """The B and A tiles of each pipeline stage (the codes are gathered, not staged), and the
    [BLOCK_N, BLOCK_K] fp32 product tile that may change layout before it meets the weight tile."""
    return (a["num_stages"] * (a["BLOCK_N"] + a["BLOCK_K"]) * a["BLOCK_R"] * a["lora_a_ptr"].element_size()
            + a["BLOCK_N"] * a["BLOCK_K"] * 4)


@triton.jit
def dequant_4bit_tile(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, start, local, mask,
                      BLOCK_SHIFT: tl.constexpr, NESTED_SHIFT: tl.constexpr, NESTED: tl.constexpr,
                      ROUND_TO: tl.constexpr):
    """fp32 tile of dequant(W) at the flat indices start + local (``start``: the tile's first flat index,
    int64; ``local``: int32 offsets from it, >= 0); 0 where not ``mask``. Blocks of 2**BLOCK_SHIFT
    elements, nested blocks of 2**NESTED_SHIFT absmax codes. 64-bit arithmetic only on the
    program's scalars: per element, 32-bit offsets (fewer registers)."""
    half = local + (start & 1).to(tl.int32)                 # flat - 2 * (start // 2)
    byte = tl.load(packed_ptr + (start >> 1) + (half >> 1), mask=mask, other=0).to(tl.int32)
    nibble = tl.where((half & 1) == 0, byte >> 4, byte & 15)  # the even element in the high nibble
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    block0 = start >> BLOCK_SHIFT                            # the tile's first block
    block = (local + (start & ((1 << BLOCK_SHIFT) - 1)).to(tl.int32)) >> BLOCK_SHIFT  # from block0
    if NESTED:
        q = tl.load(absmax_ptr + block0 + block, mask=mask, other=0).to(tl.int32)
        nested = (block + (block0 & ((1 << NESTED_SHIFT) - 1)).to(tl.int32)) >> NESTED_SHIFT
        scale = tl.load(code2_ptr + q, mask=mask, other=0.0) * tl.load(
            absmax2_ptr + (block0 >> NESTED_SHIFT) + nested, mask=mask, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block0 + block, mask=mask, other=0.0)
    w = value * scale
    if ROUND_TO == 1:
        w = w.to(tl.float16).to(tl.float32)
    elif ROUND_TO == 2:  # to bf16, round to nearest even, on the bits (Triton's interpreter truncates)
        bits = w.to(tl.uint32, bitcast=True)
        w = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return w


@triton.jit
def dequant_4bit_rows(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, row0, rows, row_ok, k0, K,
                      mask,
                      BLOCK_K: tl.constexpr, BLOCK_SHIFT: tl.constexpr, NESTED_SHIFT: tl.constexpr,
                      NESTED: tl.constexpr, ROUND_TO: tl.constexpr):
    """fp32 tile [len(rows), BLOCK_K] of dequant(W) at rows row0 + rows, columns k0 .. k0 + BLOCK_K
    (0 where not ``mask``), the arithmetic of `dequant_4bit_tile`, for K a multiple of the block
    size: every row then starts at a whole byte and a whole block, so a row's codes are BLOCK_K / 2
    consecutive bytes, each loaded once and split into its two nibbles, and its scales
    BLOCK_K / blocksize consecutive blocks (one when the block is wider than the tile), each formed
    once and broadcast over its elements: a quarter of the general tile's loads and index
    arithmetic (benchmarks/NOTES.md, attempt 9). ``rows`` int32 from row0 (int64), ``row_ok`` where
    they are rows of W; ``mask`` [len(rows), BLOCK_K] the elements to keep."""
    BLOCK_N: tl.constexpr = rows.shape[0]
    pairs = tl.arange(0, BLOCK_K // 2)
    pair_ok = (k0 + 2 * pairs) < K
    byte = tl.load(packed_ptr + row0 * (K // 2) + (rows * (K // 2) + k0 // 2)[:, None] + pairs[None, :],
                   mask=row_ok[:, None] & pair_ok[None, :], other=0).to(tl.int32)
    # element 2j in the high nibble of byte j, 2j + 1 in the low one
    value = tl.reshape(tl.join(tl.load(code_ptr + (byte >> 4)), tl.load(code_ptr + (byte & 15))), (BLOCK_N, BLOCK_K))
    # blocks across the tile, max(BLOCK_K / blocksize, 1) for powers of two; written as a rounded-up
    # shift because triton 3.3 does not fold the builtin max of constexprs into a constexpr
    NB: tl.constexpr = (BLOCK_K + (1 << BLOCK_SHIFT) - 1) >> BLOCK_SHIFT
    blocks_per_row = K >> BLOCK_SHIFT
    block = (k0 >> BLOCK_SHIFT) + tl.arange(0, NB)
    block_ok = row_ok[:, None] & (block < blocks_per_row)[None, :]
    first = row0 * blocks_per_row                            # int64: the tile's first row's first block
    local = rows[:, None] * blocks_per_row + block[None, :]  # from it
    if NESTED:
        q = tl.load(absmax_ptr + first + local, mask=block_ok, other=0).to(tl.int32)
        nested = (local + (first & ((1 << NESTED_SHIFT) - 1)).to(tl.int32)) >> NESTED_SHIFT
        scale = tl.load(code2_ptr + q, mask=block_ok, other=0.0) * tl.load(
            absmax2_ptr + (first >> NESTED_SHIFT) + nested, mask=block_ok, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + first + local, mask=block_ok, other=0.0)
    scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_N, NB, BLOCK_K // NB)), (BLOCK_N, BLOCK_K))
    w = value * scale
    if ROUND_TO == 1:
        w = w.to(tl.float16).to(tl.float32)
    elif ROUND_TO == 2:
        bits = w.to(tl.uint32, bitcast=True)
        w = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return tl.where(mask, w, 0.0)


@autotune(_GPU_CONFIGS, _INTERPRETER_CONFIG,
          key=["N", "K", "R", "k_splits", "NESTED", "ROUND_TO", "ROW_ALIGNED", "PRECISION"],
          smem_bytes=_quant_sumsq_smem_bytes, case_dtypes=(None, "lora_a_ptr"))
@triton.jit
def _quant_row_sumsq_kernel(
    packed_ptr, code_ptr, absmax_ptr,      # packed codes uint8, code table fp32 [16], absmax (fp32, or uint8 if NESTED)
    absmax2_ptr, code2_ptr, offset_ptr,    # NESTED only: absmax2 fp32, code2 fp32 [256], offset fp32 [1]
    lora_a_ptr, lora_b_ptr,                # A [R, K], B [N, R] (same dtype)
    out_ptr,                               # partial sums of squares [k_splits, N] fp32 (FINISH: n [N])
    N, K, R,
    stride_ar, stride_ak, stride_bn, stride_br,
    scaling,
    k_splits,                              # the slices of K reduced in parallel
    BLOCK_SHIFT: tl.constexpr, NESTED_SHIFT: tl.constexpr, NESTED: tl.constexpr, ROUND_TO: tl.constexpr,
    ROW_ALIGNED: tl.constexpr,             # K a multiple of the block size (and even): dequant_4bit_rows
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    FINISH: tl.constexpr,                  # one slice (k_splits == 1): store the square root
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row0 = pid_n * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    # each element's flat index row * K + col, as the tile's first (64-bit: N * K may pass 2**31)
    # plus a 32-bit offset (BLOCK_N * K < 2**31)
    local_rows = tl.arange(0, BLOCK_N)[:, None] * K + tl.arange(0, BLOCK_K)[None, :]
    # this program's K slice: whole BLOCK_K steps, so the slices tile K exactly
    k_steps = tl.cdiv(K, BLOCK_K)
    steps_per_split = tl.cdiv(k_steps, k_splits)
    k_begin = pid_k * steps_per_split * BLOCK_K
    k_end = tl.minimum(k_begin + steps_per_split * BLOCK_K, K)

    sumsq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < k_end
        mask = row_ok[:, None] & col_ok[None, :]
        if ROW_ALIGNED:
            w = dequant_4bit_rows(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                  row0.to(tl.int64), tl.arange(0, BLOCK_N), row_ok, k0, K, mask, BLOCK_K, BLOCK_SHIFT,
                                  NESTED_SHIFT, NESTED, ROUND_TO)
        else:
            w = dequant_4bit_tile(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                  row0.to(tl.int64) * K + k0, local_rows, mask, BLOCK_SHIFT, NESTED_SHIFT, NESTED,
                                  ROUND_TO)
        ba = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            ranks = r0 + tl.arange(0, BLOCK_R)
            rank_ok = ranks < R
            b = tl.load(lora_b_ptr + rows[:, None] * stride_bn + ranks[None, :] * stride_br,
                        mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
            a = tl.load(lora_a_ptr + ranks[:, None] * stride_ar + cols[None, :] * stride_ak,
                        mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
            ba = tl.dot(b, a, ba, input_precision=PRECISION)
        tile = w + scaling * ba
        sumsq += tl.sum(tile * tile, axis=1)
    if FINISH:
        sumsq = tl.sqrt_rn(sumsq)
    tl.store(out_ptr + pid_k * N + rows, sumsq, mask=row_ok)


def dora_quant_row_norm(packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                        shape, weight_dtype: torch.dtype, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                        *, nested_absmax: Optional[torch.Tensor] = None, nested_code: Optional[torch.Tensor] = None,
                        nested_offset: Optional[torch.Tensor] = None, nested_blocksize: int = 256,
                        k_splits: Optional[int] = None) -> torch.Tensor:
    """n [N] fp32 = row-wise L2 norm of ``dequant(W) + scaling * lora_B @ lora_A`` (not clamped), W [N, K] = shape
    stored 4-bit as in the module docstring.

    packed: uint8, contiguous, (N*K + 1) // 2 bytes; code fp32 [16]; absmax fp32 (or uint8 with the
    nested_* tensors: absmax2 fp32, code2 fp32 [256], offset fp32 [1], and nested_blocksize);
    blocksize and nested_blocksize powers of two. dequant(W) is rounded to ``weight_dtype``
    (fp32 / fp16 / bf16). lora_A [r, K], lora_B [N, r] (same dtype). The product B @ A runs as in
    kernels.norm.dora_row_norm. k_splits overrides how many slices of K run in parallel. One launch
    when K is not split, else two (the slices finished by norm.finish_row_norm, as the dense norm).
    """
    N, K = int(shape[0]), int(shape[1])
    _check_row_span(K)
    R = lora_A.shape[0]
    k_splits = k_splits or split_count(cdiv(N, 32), cdiv(K, 128), lora_A.device, rows_per_split_min=4)
    partial = torch.empty((k_splits, N), dtype=torch.float32, device=lora_A.device)
    precision = "tf32x3" if lora_A.dtype == torch.float32 else dot_precision(lora_A.dtype)
    nested = nested_absmax is not None
    grid = lambda meta: (cdiv(N, meta["BLOCK_N"]), k_splits)
    # no FMA contraction: the scale's product and sum, and the code * scale product, are rounded as
    # bitsandbytes rounds them (the interpreter never contracts)
    _quant_row_sumsq_kernel[grid](
        packed, code, absmax,
        nested_absmax if nested else absmax, nested_code if nested else code, nested_offset if nested else code,
        lora_A, lora_B, partial, N, K, R,
        lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
        float(scaling), k_splits,
        BLOCK_SHIFT=_shift(blocksize), NESTED_SHIFT=_shift(nested_blocksize), NESTED=nested,
        ROUND_TO=_ROUND_TO[weight_dtype], ROW_ALIGNED=_row_aligned(K, blocksize), BLOCK_R=block_r(R),
        PRECISION=precision, FINISH=k_splits == 1,
        enable_fp_fusion=False,
    )
    return partial[0] if k_splits == 1 else finish_row_norm(partial)


@triton.jit
def _dequant_4bit_kernel(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, N, K,
                         BLOCK_SHIFT: tl.constexpr, NESTED_SHIFT: tl.constexpr, NESTED: tl.constexpr,
                         ROUND_TO: tl.constexpr, ROW_ALIGNED: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    row0 = tl.program_id(0) * BLOCK_N
    k0 = tl.program_id(1) * BLOCK_K
    rows = row0 + tl.arange(0, BLOCK_N)
    cols = k0 + tl.arange(0, BLOCK_K)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    local = tl.arange(0, BLOCK_N)[:, None] * K + tl.arange(0, BLOCK_K)[None, :]
    start = row0.to(tl.int64) * K + k0
    if ROW_ALIGNED:
        w = dequant_4bit_rows(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, row0.to(tl.int64),
                              tl.arange(0, BLOCK_N), rows < N, k0, K, mask, BLOCK_K, BLOCK_SHIFT, NESTED_SHIFT, NESTED,
                              ROUND_TO)
    else:
        w = dequant_4bit_tile(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, start, local,
                              mask, BLOCK_SHIFT, NESTED_SHIFT, NESTED, ROUND_TO)
    tl.store(out_ptr + start + local, w, mask=mask)


def dequantize_4bit_tiles(packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int, shape,
                          weight_dtype: torch.dtype, *, nested_absmax: Optional[torch.Tensor] = None,
                          nested_code: Optional[torch.Tensor] = None, nested_offset: Optional[torch.Tensor] = None,
                          nested_blocksize: int = 256, row_aligned: Optional[bool] = None) -> torch.Tensor:
    """The dense W [N, K] (fp32 holding ``weight_dtype`` values) exactly as the norm kernel forms its
    tiles (``dequant_4bit_rows`` where K is a multiple of the block size, else ``dequant_4bit_tile``;
    ``row_aligned=False`` asks for the general one). For tests and debugging only: the norm never
    materialises it."""
    N, K = int(shape[0]), int(shape[1])
    _check_row_span(K)
    out = torch.empty((N, K), dtype=torch.float32, device=packed.device)
    nested = nested_absmax is not None
    grid = (cdiv(N, 32), cdiv(K, 128))
    _dequant_4bit_kernel[grid](
        packed, code, absmax, nested_absmax if nested else absmax, nested_code if nested else code,
        nested_offset if nested else code, out, N, K,
        BLOCK_SHIFT=_shift(blocksize), NESTED_SHIFT=_shift(nested_blocksize), NESTED=nested,
        ROUND_TO=_ROUND_TO[weight_dtype],
        ROW_ALIGNED=_row_aligned(K, blocksize) if row_aligned is None else row_aligned,
        BLOCK_N=32, BLOCK_K=128, enable_fp_fusion=False,
    )
    return out
