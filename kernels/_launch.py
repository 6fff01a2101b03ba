"""Launch-argument helpers the kernel families share: row strides, rank chunks, MMA precisions."""
import torch
import triton

from .tuning import INTERPRET


def narrow_row_stride(t: torch.Tensor, tile_rows: int = 256) -> torch.Tensor:
    """t [rows, cols], copied row-major if offsets within a tile of ``tile_rows`` rows would not
    fit in 32 bits. The kernels offset each tile's first row in 64 bits (M * stride may pass
    2**31) and the rest of the tile in 32 (cheaper: fewer registers in the GEMMs)."""
    if t.stride(0) * tile_rows >= 2**31:
        return t.contiguous()
    return t


def block_r(r: int) -> int:
    """Chunk size along the LoRA rank: a power of two >= 16 (tl.dot's minimum), at most 64.

    Kernels loop over r in chunks of this size with masked loads, so any r >= 1 works and a
    large r (e.g. 384) never needs an [M, r] tile in registers. The interpreter uses 16 so the
    tests exercise the chunk loop with small ranks.
    """
    if INTERPRET:
        return 16
    return min(64, max(16, triton.next_power_of_2(r)))


def gemm_block_r(r: int) -> int:
    """Rank chunk of the LoRA steps inside the two [M, N, K] GEMMs: `block_r`, but 16 on GPUs
    before Hopper. There mma.sync takes both operands from registers, and wider chunks of the
    fp32 (or 16-bit) adapter tiles beside a large accumulator spill registers in most large
    tiles (benchmarks/compile_report.py); on Hopper wgmma reads them from shared memory."""
    if INTERPRET:
        return 16
    return block_r(r) if triton.runtime.driver.active.get_current_target().arch >= 90 else 16


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 inputs follow torch's TF32 switch, like F.linear does."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # Triton's default; ignored for 16-bit inputs


def lora_precision(x_dtype: torch.dtype, adapter_dtype: torch.dtype):
    """(upcast, input_precision) for the small LoRA GEMMs (x@A.T, e@B, v.T@x, dy.T@u).

    fp32 adapters over a 16-bit base (PEFT's default) keep fp32 accuracy there, as PEFT's own
    fp32 LoRA path does: tiles are upcast and multiplied with 3xTF32 on tensor cores. These GEMMs
    are memory-bound, so the extra passes cost little. Otherwise the activation dtype is used.
    The LoRA steps fused into the two big GEMMs (s*u @ B.T in the forward, v @ A in dx) run in
    the activation dtype, like the base product they are added to.
    """
    if adapter_dtype == torch.float32 and x_dtype != torch.float32:
        return True, "tf32x3"
    return False, dot_precision(x_dtype)
