"""PEFT's bitsandbytes DoRA layers (``lora.bnb.Linear4bit``, ``lora.bnb.Linear8bitLt``) served by
fused_dora; used by fused_dora.integrations.peft (enable_fused_dora), which switches them like
any lora.Linear.

    4-bit  fused_dora.qdora.dora_linear_4bit: the row norm from the packed codes (Triton), x·Wᵀ and
           dx from the weight dequantized by bitsandbytes (torch.mm), the DoRA epilogue and the
           LoRA terms in the composed route's Triton passes. PEFT's forward instead dequantizes
           the weight and forms the dense B·A on every call for the norm.
    8-bit  the base layer's own forward (bitsandbytes' int8 matmul, outliers included) plus the
           DoRA epilogue over its output (fused_dora.qdora.dora_over_base), the norm from the
           weight dequantized in bounded row chunks. dx: the base layer's own backward plus the
           LoRA part.

As PEFT: the layer computes in bitsandbytes' compute dtype (Linear4bit.compute_dtype, set from
the first input as bitsandbytes sets it; the autocast dtype under autocast) and returns x's
dtype. Every call re-describes the weight: a weight bitsandbytes has not quantized yet, a quant
type other than NF4 / FP4, a weight flattened by FSDP or repacked for bitsandbytes' CPU kernel
runs PEFT's own forward, with the reason in fused_dora_status.
"""
import sys
from typing import Optional

import torch
import torch.nn as nn

from ..backend import reference_reason
from ..qdora import dora_linear_4bit, dora_over_base
from ..quantized import bnb_kind, describe_4bit, describe_8bit, quantized_weight_norm

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def peft_bnb_layer_kind(module) -> Optional[str]:
    """"4bit" / "8bit" for PEFT's lora.bnb.Linear4bit / Linear8bitLt, else None (bitsandbytes
    not imported: no such layer exists)."""
    if "bitsandbytes" not in sys.modules:
        return None
    try:
        from peft.tuners.lora import bnb as lora_bnb
    except ImportError:
        return None
    for kind, name in (("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")):
        cls = getattr(lora_bnb, name, None)
        if cls is not None and isinstance(module, cls):
            return kind
    return None


def structural_reason(module, kind: str) -> Optional[str]:
    """None if the fused forward can be installed on this PEFT bitsandbytes DoRA layer, else why not."""
    import bitsandbytes as bnb
    from peft.tuners.lora import bnb as lora_bnb

    peft_cls = lora_bnb.Linear4bit if kind == "4bit" else lora_bnb.Linear8bitLt
    base_cls = bnb.nn.Linear4bit if kind == "4bit" else bnb.nn.Linear8bitLt
    if type(module).forward is not peft_cls.forward:
        return f"{type(module).__name__} overrides lora.bnb.{peft_cls.__name__}.forward"
    base = module.get_base_layer()
    if bnb_kind(base) != kind or type(base).forward is not base_cls.forward:
        return f"base layer is a {type(base).__name__}, not a plain bitsandbytes {base_cls.__name__}"
    return None


def _plain(t) -> bool:
    return t is None or type(t) in (torch.Tensor, nn.Parameter)


def _compute_dtype(base, x, autocast: bool) -> torch.dtype:
    """The dtype bitsandbytes' Linear4bit computes in for x (setting it from x on the first call,
    as Linear4bit.forward does)."""
    if autocast:
        return torch.get_autocast_dtype(x.device.type)
    if not getattr(base, "compute_type_is_set", True) and hasattr(base, "set_compute_type"):
        base.set_compute_type(x)
        base.compute_type_is_set = True
    return getattr(base, "compute_dtype", None) or x.dtype


def _input_reason(x, qweight, bias, tensors, compute_dtype) -> Optional[str]:
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
        return f"input is {type(x).__name__} {getattr(x, 'dtype', '')}"
    if not all(_plain(t) for t in (x, bias) + tensors):
        return "a tensor subclass (e.g. DTensor) is involved"
    if any(t.device != x.device for t in tensors + ((bias,) if bias is not None else ())) or qweight.device != x.device:
        return "adapter and base tensors are not all on the input's device"
    lora_A, lora_B, magnitude = tensors
    allowed = (compute_dtype, torch.float32, torch.float64)
    if lora_A.dtype != lora_B.dtype or lora_A.dtype not in allowed or magnitude.dtype not in _FLOAT_DTYPES:
        return f"adapter dtypes {lora_A.dtype}/{lora_B.dtype} do not suit compute dtype {compute_dtype}"
    return None


def weight_reason(layer) -> Optional[str]:
    """Why the quantized weight of ``layer`` (a PEFT layer) cannot be read now, None if it can or if
    its base is not a bitsandbytes layer: fused_dora_status says so before any forward."""
    base = layer.get_base_layer()
    kind = bnb_kind(base)
    if kind is None:
        return None
    return (describe_4bit(base.weight, base) if kind == "4bit" else describe_8bit(base.weight, base))[1]


def bnb_forward(fwd, layer, base, adapter: str, x):
    """One call of a switched PEFT bitsandbytes DoRA layer (``fwd``: its _FusedForward): the fused
    op, or PEFT's own forward with the reason kept for fused_dora_status."""
    kind = bnb_kind(base)
    lora_A, lora_B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    magnitude = layer.lora_magnitude_vector[adapter].weight
    if kind == "4bit":
        qweight, reason = describe_4bit(base.weight, base)
    else:
        qweight, reason = describe_8bit(base.weight, base)
    autocast = isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type)
    compute_dtype = None
    if reason is None:
        compute_dtype = _compute_dtype(base, x, autocast) if kind == "4bit" else (
            torch.get_autocast_dtype(x.device.type) if autocast else getattr(x, "dtype", None))
        reason = _input_reason(x, qweight, base.bias, (lora_A, lora_B, magnitude), compute_dtype)
    fwd.last_input_reason = reason
    if reason is not None:
        return fwd.peft_forward(x)

    scaling = layer.scaling[adapter]
    dropout = layer.lora_dropout[adapter]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    training = layer.training and dropout.training
    bias = base.bias
    fwd.last_reference_reason = reference_reason(fwd.backend, x.device, compute_dtype, None,
                                                 (x, bias, lora_A, lora_B, magnitude))
    norm = fwd._norm_cache.for_forward(base.weight, lora_A, lora_B, scaling, fwd.backend, tag=adapter)
    if kind == "4bit":
        if bias is not None and bias.dtype not in (compute_dtype, torch.float32):
            bias = bias.to(compute_dtype)
        y = dora_linear_4bit(x.to(compute_dtype), qweight, bias, lora_A, lora_B, magnitude, scaling, p, training,
                             fwd.backend, norm=norm, route=fwd.route)
        return y.to(x.dtype)
    base_out = base(x)  # bitsandbytes' own int8 forward (and backward for its share of dx)
    if norm is None:
        norm = quantized_weight_norm(qweight, lora_A, lora_B, scaling, fwd.backend)
    if bias is not None and bias.dtype not in (base_out.dtype, torch.float32):
        bias = bias.to(base_out.dtype)
    return dora_over_base(base_out, x, bias, lora_A, lora_B, magnitude, norm, scaling, p, training, fwd.backend)
