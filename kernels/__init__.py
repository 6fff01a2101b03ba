"""Triton kernels for fused DoRA, one kernel family per module, each launcher beside its kernel.

Importable as ``fused_dora.kernels`` (the folder ships inside the package namespace).
Every launcher takes plain tensors, checks nothing the public API has already checked, and
returns fp32 partial sums, intermediates in the adapters' dtype, or outputs in the activation
dtype; see each function's docstring.
"""
from ._launch import INTERPRET
from .norm import dora_row_norm, row_norm_partials, finish_row_norm
from .dropout import dropout_mask
from .forward import lora_down, dora_forward
from .input_grad import lora_up_grad, dora_input_grad
from .adapter_grads import magnitude_and_B_grad_partials, lora_A_grad_partials, finish_adapter_grads
from .composed import dora_compose_epilogue, add_lora_input_grad
from .quant_norm import dora_quant_row_norm, dequantize_4bit_tiles

__all__ = [
    "INTERPRET",
    "dora_row_norm",
    "row_norm_partials",
    "finish_row_norm",
    "dropout_mask",
    "lora_down",
    "dora_forward",
    "lora_up_grad",
    "dora_input_grad",
    "magnitude_and_B_grad_partials",
    "lora_A_grad_partials",
    "finish_adapter_grads",
    "dora_compose_epilogue",
    "add_lora_input_grad",
    "dora_quant_row_norm",
    "dequantize_4bit_tiles",
]
