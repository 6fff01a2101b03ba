"""Launch-argument helpers the kernel families share: row strides, rank chunks, MMA precisions."""
import torch

from .tuning import INTERPRET, cdiv, current_arch, next_power_of_2, split_count


def narrow_row_stride(t: torch.Tensor, tile_rows: int = 256) -> torch.Tensor:
    """t [rows, cols], copied row-major if offsets within a tile of ``tile_rows`` rows would not
    fit in 32 bits. The kernels offset each tile's first row in 64 bits (M * stride may pass
    2**31) and the rest of the tile in 32 (cheaper: fewer registers in the GEMMs)."""
    if t.stride(0) * tile_rows >= 2**31:
        return t.contiguous()
    return t


def as_slices(t: torch.Tensor) -> torch.Tensor:
    """Partial sums [S, M, r] as they are (lora_down's su, lora_up_grad's v), or a finished [M, r]
    tensor as one slice [1, M, r], for the kernels that sum the slices as they read them."""
    return t if t.dim() == 3 else t.unsqueeze(0)


def block_r(r: int) -> int:
    """Chunk size along the LoRA rank: a power of two >= 16 (tl.dot's minimum), at most 64.

    Kernels loop over r in chunks of this size with masked loads, so any r >= 1 works and a
    large r (e.g. 384) never needs an [M, r] tile in registers. The interpreter uses 16 so the
    tests exercise the chunk loop with small ranks.
    """
    if INTERPRET:
        return 16
    return min(64, max(16, next_power_of_2(r)))


def factored_rank_limit() -> int:
    """The largest rank the factored norm serves (forward.lora_down_and_gram, norm.row_norm_partials
    with ``gram``): one rank chunk (`block_r`), so one program forms G = A @ A.T as one tile."""
    return block_r(64)


def gemm_block_r(r: int) -> int:
    """Rank chunk of the LoRA steps inside the two [M, N, K] GEMMs: `block_r`, but 16 on GPUs
    before Hopper. There mma.sync takes both operands from registers, and wider chunks of the
    fp32 (or 16-bit) adapter tiles beside a large accumulator spill registers in most large
    tiles (benchmarks/compile_report.py); on Hopper wgmma reads them from shared memory."""
    if INTERPRET:
        return 16
    return block_r(r) if current_arch() >= 90 else 16


def epilogue_halves() -> bool:
    """Whether the forward GEMM applies its epilogue to the two column halves of its tile in turn:
    on Blackwell (sm_100) and later, where the whole 128-row accumulator beside the epilogue's
    vectors spilled registers in every 128-row training tile (benchmarks/results/compile_report_sm100.md;
    halves: 128x128 w8 and 128x64 w4 compile without spills). Elsewhere the whole tile at once, as
    before (the tiles taken on sm_90 and sm_80 do not spill)."""
    if INTERPRET:
        return False
    return current_arch() >= 100


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 inputs follow torch's TF32 switch, like F.linear does."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # Triton's default; ignored for 16-bit inputs


def lora_precision(x_dtype: torch.dtype, adapter_dtype: torch.dtype):
    """(upcast, input_precision) for the small LoRA GEMMs (x@A.T, dy@(c*B), v.T@x, dy.T@su), see
    _lora_dot.lora_dot.

    fp32 adapters over a 16-bit base (PEFT's default) keep fp32 accuracy there, as PEFT's own
    fp32 LoRA path does: over bf16 activations, "bf16x3" (the fp32 operand split into three bf16
    parts, the activation tile used as loaded: exact products, three bf16 MMAs); over fp16, whose
    values bf16 cannot hold, tiles are upcast and multiplied with 3xTF32 ("tf32x3"). Otherwise the
    activation dtype is used. The LoRA steps fused into the two big GEMMs (s*u @ B.T in the
    forward, v @ A in dx) run in the activation dtype, like the base product they are added to.
    """
    if adapter_dtype == torch.float32 and x_dtype != torch.float32:
        return True, "bf16x3" if x_dtype == torch.bfloat16 else "tf32x3"
    return False, dot_precision(x_dtype)


# Slices of a split reduction start at multiples of this (of 8 for the dropout mask's Philox groups,
# and 128-byte aligned rows) and are at least SLICE_MIN long; a slice need not be a whole number
# of the config's reduction blocks (the kernels mask at the slice's end), so the slice count is
# the one that fills the GPU, not the one the block size allows (256-column slices gave 4 slices
# of K = 4096 for 5 wanted: 1.9 programs per SM). Under the interpreter small, so that the tests'
# small shapes are split too.
SLICE_ALIGN = 32 if INTERPRET else 64
SLICE_MIN = 32 if INTERPRET else 512


def reduction_slices(length: int, base_programs: int, device: torch.device, splits=None):
    """(S, per_slice): a reduction of ``length`` split into S slices of ``per_slice`` (a multiple of
    SLICE_ALIGN; the last may be shorter, none empty) so that ``base_programs`` * S programs fill
    the GPU (tuning.split_count: two per SM), unasked at most length // SLICE_MIN slices (so no
    slice is much shorter than SLICE_MIN). ``splits``: ask for S (fewer if ``length`` is too short)."""
    if splits is None:
        splits = min(split_count(base_programs, length, device), max(1, length // SLICE_MIN))
    per_slice = cdiv(cdiv(max(length, 1), splits), SLICE_ALIGN) * SLICE_ALIGN
    return cdiv(max(length, 1), per_slice), per_slice
