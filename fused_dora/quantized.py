"""Quantized base weights (bitsandbytes): recognise them, describe them, dequantize them, and the
DoRA row norm ||dequant(W) + s·B·A|| without a dense dequantized [out, in] weight.

    bnb_kind(module)           "4bit" (bnb.nn.Linear4bit), "8bit" (bnb.nn.Linear8bitLt) or None
    describe_4bit(weight, ...) (Packed4bit, None) or (None, why it cannot be served)
    describe_8bit(weight, ...) (Int8Rows, None) or (None, why)
    quantized_weight_norm(...) n [out] fp32: the Triton kernel over the packed 4-bit codes
                               (kernels/quant_norm.py), or 8-bit rows dequantized in bounded chunks

What a 4-bit weight means here is what ``bitsandbytes.functional.dequantize_4bit(weight.data,
weight.quant_state)`` returns: NF4 or FP4 codes times their block's absmax (double quantization:
the absmax dequantized from its 8-bit codes and nested absmax, plus the offset), rounded to the
quant state's dtype; the norm kernel computes exactly those values (kernels/quant_norm.py), and
the GEMMs of the composed route use ``dequantize_4bit`` itself, cast to the activation dtype.
An 8-bit weight is ``int8_vectorwise_dequant(weight.data, SCB)`` (int8 · SCB / 127, fp32), as
PEFT dequantizes it.

Nothing here imports bitsandbytes until a quantized weight is met. Every case the fused path
cannot compute exactly gets a reason (a sentence), never a wrong number: a quant type other than
NF4 / FP4, a Params4bit not quantized yet, a weight flattened or sharded by FSDP, a weight
repacked for bitsandbytes' CPU inference kernel, a cast packed weight, ...
"""
import sys
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

import torch

from . import reference
from .backend import resolve_backend

BNB_4BIT_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' quantize_4bit allows
QUANT_TYPES = ("nf4", "fp4")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# 8-bit norm: rows are dequantized in chunks of at most this many elements (64 MiB of fp32)
NORM_CHUNK_ELEMENTS = 1 << 24


def _bnb():
    """bitsandbytes, if it is already imported (a quantized weight exists only if it is)."""
    return sys.modules.get("bitsandbytes")


def _is_instance(obj, path: Tuple[str, ...]) -> bool:
    bnb = _bnb()
    if bnb is None:
        return False
    cls = bnb
    for part in path:
        cls = getattr(cls, part, None)
        if cls is None:
            return False
    return isinstance(obj, cls)


def is_params4bit(t) -> bool:
    return _is_instance(t, ("nn", "Params4bit"))


def bnb_kind(module) -> Optional[str]:
    """"4bit" for a bitsandbytes Linear4bit (LinearNF4 / LinearFP4 included), "8bit" for a
    Linear8bitLt, None otherwise (without importing bitsandbytes)."""
    if _is_instance(module, ("nn", "Linear4bit")):
        return "4bit"
    if _is_instance(module, ("nn", "Linear8bitLt")):
        return "8bit"
    return None


def _code_table(quant_type: str, device) -> torch.Tensor:
    """The 16 code values bitsandbytes' 4-bit kernels decode (fp32). FP4's code 8 is -0.0 there (a
    sign bit on a zero), which the table of ``get_4bit_type`` writes as +0.0: equal values."""
    key = (quant_type, str(device))
    table = _CODE_TABLES.get(key)
    if table is None:
        from bitsandbytes.functional import get_4bit_type

        table = get_4bit_type(quant_type, device=device).to(torch.float32).clone()
        if quant_type == "fp4":
            table[8] = -0.0
        _CODE_TABLES[key] = table
    return table


_CODE_TABLES = {}


@dataclass(frozen=True, eq=False)
class Packed4bit:
    """A quantized bitsandbytes 4-bit weight [out_features, in_features], as the kernels read it.

    ``weight``: the Params4bit itself (its data and quant state stay where they are: nothing is
    copied but a 1-element offset and, for a non-fp32 absmax, the absmax as fp32);
    ``packed``: its codes as a flat uint8 view.
    """
    weight: torch.Tensor
    quant_state: Any
    packed: torch.Tensor
    out_features: int
    in_features: int
    dtype: torch.dtype           # what dequantize_4bit returns (the quant state's dtype)
    quant_type: str
    blocksize: int
    code: torch.Tensor           # fp32 [16]
    absmax: torch.Tensor         # fp32 [blocks], or uint8 [blocks] when nested
    nested_absmax: Optional[torch.Tensor] = None   # fp32 [ceil(blocks / nested_blocksize)]
    nested_code: Optional[torch.Tensor] = None     # fp32 [256]
    nested_offset: Optional[torch.Tensor] = None   # fp32 [1]
    nested_blocksize: int = 256

    @property
    def shape(self) -> Tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """W [out, in] = bitsandbytes.functional.dequantize_4bit(weight.data, quant_state), cast to
        ``dtype`` (default: the quant state's). A dense temporary: the composed route's GEMMs and
        the reference path use it; the norm never does."""
        import bitsandbytes.functional as bnbF

        w = bnbF.dequantize_4bit(self.weight.data, self.quant_state)
        return w if dtype is None or w.dtype == dtype else w.to(dtype)

    def describe(self) -> str:
        return (f"{self.quant_type} {self.out_features}x{self.in_features} blocksize {self.blocksize}"
                f"{' double-quantized' if self.nested else ''} ({str(self.dtype).replace('torch.', '')})")


def describe_4bit(weight, module=None) -> Tuple[Optional[Packed4bit], Optional[str]]:
    """(Packed4bit, None) for a quantized bitsandbytes 4-bit weight the kernels can read, else
    (None, why not). ``module``: its Linear4bit, to check the shape against in/out_features and
    to find a quant state kept on the module only."""
    name = type(weight).__name__
    if not is_params4bit(weight):
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
        return None, (f"the 4-bit layer's weight is a {name}{f' of shape {shape}' if shape else ''}, not a "
                      "bitsandbytes Params4bit (flattened or sharded by FSDP?)")
    qs = getattr(weight, "quant_state", None)
    if qs is None and module is not None:
        qs = getattr(module, "quant_state", None)  # as bitsandbytes' fix_4bit_weight_quant_state_from_module
    if not getattr(weight, "bnb_quantized", True) or qs is None:
        return None, ("the Params4bit is not quantized yet (bitsandbytes quantizes it when it is moved to a "
                      "device: call .to(device) or .cuda() on the layer first)")
    if getattr(qs, "packing_format_for_cpu", False):
        return None, ("the 4-bit weight was repacked for bitsandbytes' CPU inference kernel (AVX512-BF16), a "
                      "layout the fused norm does not read")
    quant_type = getattr(qs, "quant_type", None)
    if quant_type not in QUANT_TYPES:
        return None, f"4-bit quant type {quant_type!r} is not served (only {', '.join(QUANT_TYPES)})"
    blocksize = getattr(qs, "blocksize", None)
    if blocksize not in BNB_4BIT_BLOCKSIZES:
        return None, f"4-bit blocksize {blocksize!r} is not one bitsandbytes uses {BNB_4BIT_BLOCKSIZES}"
    shape = tuple(getattr(qs, "shape", None) or ())
    if len(shape) != 2:
        return None, f"the 4-bit weight's quant state has shape {shape}, not [out_features, in_features]"
    N, K = int(shape[0]), int(shape[1])
    if module is not None and (N, K) != (getattr(module, "out_features", N), getattr(module, "in_features", K)):
        return None, (f"the 4-bit weight's quant state has shape {shape} but the layer is "
                      f"{module.out_features}x{module.in_features} (quantized from a transposed weight?)")
    if qs.dtype not in FLOAT_DTYPES:
        return None, f"the 4-bit weight dequantizes to {qs.dtype}, not fp32 / fp16 / bf16"
    data = weight.data
    if data.is_meta:
        return None, "the 4-bit weight is on the meta device"
    if data.is_floating_point() and data.dtype != getattr(weight, "quant_storage", None):
        return None, f"the packed 4-bit weight was cast to {data.dtype} (by .half() or .to(dtype)?)"
    if not data.is_contiguous():
        return None, "the packed 4-bit weight is not contiguous"
    packed = data.reshape(-1).view(torch.uint8)
    need = (N * K + 1) // 2
    if packed.numel() != need:
        return None, (f"the packed 4-bit weight holds {packed.numel()} bytes but a {N}x{K} weight needs {need} "
                      "(flattened or sharded by FSDP?)")
    blocks = -(-N * K // blocksize)
    absmax = qs.absmax
    nested = dict()
    if getattr(qs, "nested", False):
        st2 = qs.state2
        nbs = getattr(st2, "blocksize", None)
        if not isinstance(nbs, int) or nbs < 1 or nbs & (nbs - 1):
            return None, f"double quantization with nested blocksize {nbs!r} (not a power of two) is not served"
        if absmax.dtype != torch.uint8 or st2.code is None or st2.code.numel() != 256 or qs.offset is None:
            return None, ("the double-quantized absmax is not stored as bitsandbytes stores it (uint8 codes, a "
                          "256-entry map, an offset)")
        if absmax.numel() != blocks or st2.absmax.numel() != -(-blocks // nbs):
            return None, (f"the 4-bit quant state holds {absmax.numel()} absmax codes / {st2.absmax.numel()} nested "
                          f"scales, a {N}x{K} weight in blocks of {blocksize} needs {blocks} / {-(-blocks // nbs)}")
        nested = dict(nested_absmax=st2.absmax.float().contiguous(), nested_code=st2.code.float().contiguous(),
                      nested_offset=torch.as_tensor(qs.offset, dtype=torch.float32, device=packed.device).reshape(1),
                      nested_blocksize=nbs)
    elif absmax.numel() != blocks:
        return None, (f"the 4-bit quant state holds {absmax.numel()} absmax values, a {N}x{K} weight in blocks of "
                      f"{blocksize} needs {blocks}")
    tensors = [absmax] + [v for v in nested.values() if isinstance(v, torch.Tensor)]
    if any(t.device != packed.device for t in tensors):
        return None, "the 4-bit quant state is not on the packed weight's device"
    return Packed4bit(
        weight=weight, quant_state=qs, packed=packed, out_features=N, in_features=K, dtype=qs.dtype,
        quant_type=quant_type, blocksize=blocksize, code=_code_table(quant_type, packed.device),
        absmax=absmax.contiguous() if nested else absmax.float().contiguous(), **nested,
    ), None


@dataclass(frozen=True, eq=False)
class Int8Rows:
    """A quantized bitsandbytes 8-bit weight [out, in]: int8 codes and a scale per row (SCB)."""
    weight: torch.Tensor     # the Int8Params
    data: torch.Tensor       # int8 [out, in]
    scb: torch.Tensor        # fp32 [out]

    @property
    def shape(self) -> Tuple[int, int]:
        return tuple(self.data.shape)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def dequantize_rows(self, start: int, stop: int) -> torch.Tensor:
        """fp32 rows [start, stop) of W, as bitsandbytes' int8_vectorwise_dequant (int8 · SCB / 127)
        computes them for the whole weight (the formula is per element)."""
        return torch.ops.bitsandbytes.int8_vectorwise_dequant(self.data[start:stop], self.scb[start:stop])

    def describe(self) -> str:
        return f"int8 {self.shape[0]}x{self.shape[1]}"


def is_int8params(t) -> bool:
    return _is_instance(t, ("nn", "Int8Params"))


def describe_8bit(weight, module=None) -> Tuple[Optional[Int8Rows], Optional[str]]:
    """(Int8Rows, None) for a quantized bitsandbytes 8-bit weight (Int8Params) the norm can read,
    else (None, why). ``module``: its Linear8bitLt (its state, and the shape to check)."""
    state = getattr(module, "state", None)
    if getattr(state, "has_fp16_weights", False) or getattr(weight, "has_fp16_weights", False):
        return None, "Linear8bitLt with has_fp16_weights=True (its weight is not quantized)"
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.int8:
        dtype = getattr(weight, "dtype", type(weight).__name__)
        return None, (f"the 8-bit layer's weight is {dtype}, not int8: not quantized yet (bitsandbytes quantizes "
                      "it when it is moved to a device)")
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = getattr(state, "SCB", None)
    shape = tuple(weight.shape)
    if module is not None and shape != (module.out_features, module.in_features) or len(shape) != 2:
        return None, (f"the 8-bit weight has shape {shape}, not [out_features, in_features] (flattened or sharded "
                      "by FSDP?)")
    if scb is None or tuple(scb.shape) != shape[:1]:
        return None, "the 8-bit weight has no row scales (SCB) of shape [out_features]"
    if scb.device != weight.device:
        return None, "the 8-bit weight's row scales are not on its device"
    return Int8Rows(weight=weight, data=weight.data, scb=scb.float()), None


QuantizedWeight = Union[Packed4bit, Int8Rows]


def quantized_weight_norm(qweight: QuantizedWeight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                          backend: str = "auto") -> torch.Tensor:
    """n [out] fp32 (fp64 for fp64 adapters), detached, not clamped: ||W + scaling · lora_B @ lora_A||
    per row, W the dequantized weight (see the module docstring).

    4-bit: one Triton pass over the packed codes (or, on the reference backend, the dense
    dequantized weight). 8-bit: rows dequantized in chunks of at most NORM_CHUNK_ELEMENTS, each
    chunk's norm by the dense kernel (or the reference); never the whole [out, in] weight at once.
    """
    with torch.no_grad():
        use = resolve_backend(backend, lora_A, lora_B)
        if isinstance(qweight, Packed4bit):
            if use == "reference":
                return reference.weight_norm(qweight.dequantize(), lora_A, lora_B, scaling)
            from .kernels.quant_norm import dora_quant_row_norm

            return dora_quant_row_norm(
                qweight.packed, qweight.code, qweight.absmax, qweight.blocksize, qweight.shape, qweight.dtype,
                lora_A, lora_B, scaling, nested_absmax=qweight.nested_absmax, nested_code=qweight.nested_code,
                nested_offset=qweight.nested_offset, nested_blocksize=qweight.nested_blocksize)
        N, K = qweight.shape
        rows = max(1, NORM_CHUNK_ELEMENTS // max(K, 1))
        parts = []
        for start in range(0, N, rows):
            w = qweight.dequantize_rows(start, min(N, start + rows))
            b = lora_B[start:start + w.shape[0]]
            if use == "reference":
                parts.append(reference.weight_norm(w, lora_A, b, scaling))
            else:
                from .kernels.norm import dora_row_norm

                parts.append(dora_row_norm(w, lora_A, b, scaling))
        return torch.cat(parts)
