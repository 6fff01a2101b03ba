"""Argument checks for the public op: a TypeError or ValueError naming the argument, before
anything reaches a kernel."""
import math
import numbers

import torch

from .backend import BACKENDS, KERNEL_DTYPES, REFERENCE_DTYPES


def check_tensor(name, t, ndim, device, shape=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_dense(name, t)
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}; all tensors must share x's device")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_dense(name, t) -> None:
    if t.is_nested or t.layout != torch.strided:
        kind = "a nested tensor" if t.is_nested else f"layout {t.layout}"
        raise TypeError(f"{name} must be a dense (strided) tensor, got {kind}")


def check_scaling(scaling) -> float:
    if isinstance(scaling, torch.Tensor) and scaling.numel() == 1:
        scaling = scaling.item()
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling must be a real number, got {type(scaling).__name__}")
    if torch.compiler.is_compiling():
        # torch.compile(dynamic=True) traces float attributes (FusedDoraLinear.scaling, PEFT's
        # layer.scaling) as symbols: math.isfinite or float() would break the graph or specialize
        # the symbol. Dynamo never makes nan / inf symbolic, so a non-finite value is a constant
        # here and fails this check at trace time.
        finite = scaling * 0 == 0
        if isinstance(finite, bool):  # a constant (static shapes, or a float Dynamo specialized)
            if not finite:
                raise ValueError(f"scaling must be finite, got {scaling}")
        else:  # a symbol: a guard, no message (torch 2.11's Dynamo cannot trace the message's lambda)
            torch._check(finite)
        return scaling
    scaling = float(scaling)
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be finite, got {scaling}")
    return scaling


def check_dropout(dropout_p) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a real number, got {type(dropout_p).__name__}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return float(dropout_p)


def check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


# How a PEFT layer's forward treats lora_dropout in training (fused_dora.integrations.peft)
DROPOUT_SEMANTICS = ("fused", "peft")


def check_dropout_semantics(dropout_semantics) -> None:
    if dropout_semantics not in DROPOUT_SEMANTICS:
        raise ValueError(f"dropout_semantics must be one of {DROPOUT_SEMANTICS}, got {dropout_semantics!r}")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def check_adapter_hparams(r: int, lora_alpha: float, lora_dropout: float, use_rslora: bool) -> None:
    """TypeError for a wrong type, ValueError for a wrong value, naming the argument."""
    check_positive_int("r", r)
    for name, value in (("lora_alpha", lora_alpha), ("lora_dropout", lora_dropout)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not 0.0 <= float(lora_dropout) < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
    if not math.isfinite(float(lora_alpha)):
        raise ValueError(f"lora_alpha must be finite, got {lora_alpha}")
    if not isinstance(use_rslora, bool):
        raise TypeError(f"use_rslora must be a bool, got {type(use_rslora).__name__}")


def check_dtype(name, t, backend) -> None:
    allowed = KERNEL_DTYPES if backend == "triton" else REFERENCE_DTYPES  # "auto" sends float64 to the reference
    if t.dtype not in allowed:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: {', '.join(str(d) for d in allowed)} "
                        f"(backend={backend!r})")


def check_adapted_weight(weight, lora_A, lora_B, device, dtype, backend) -> int:
    """Checks weight [N, K], lora_A [r, K], lora_B [N, r] against the compute dtype; returns N."""
    check_tensor("weight", weight, 2, device)
    N, K = weight.shape
    if N < 1 or K < 1:
        raise ValueError(f"weight must have out_features >= 1 and in_features >= 1, got shape {tuple(weight.shape)}")
    check_tensor("lora_A", lora_A, 2, device)
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"lora_A must have rank r >= 1 rows, got shape {tuple(lora_A.shape)}")
    check_tensor("lora_A", lora_A, 2, device, (r, K))
    check_tensor("lora_B", lora_B, 2, device, (N, r))
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_B has dtype {lora_B.dtype} but lora_A has {lora_A.dtype}; adapters must share a dtype")
    if lora_A.dtype not in (dtype, torch.float32, torch.float64):
        raise TypeError(f"lora_A has dtype {lora_A.dtype}; adapters must be float32 or x's dtype ({dtype})")
    if backend == "triton" and lora_A.dtype == torch.float64:
        raise TypeError("backend='triton' does not take float64 tensors; use backend='reference'")
    return N


def check_weight_norm_args(weight, lora_A, lora_B, scaling, backend) -> float:
    """The checks of dora_weight_norm; returns scaling as a float."""
    check_backend(backend)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    check_dense("weight", weight)
    check_dtype("weight", weight, backend)
    check_adapted_weight(weight, lora_A, lora_B, weight.device, weight.dtype, backend)
    return check_scaling(scaling)


def check_inputs(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p=0.0, backend="auto", norm=None,
                 training=False):
    """Validate dora_linear's arguments; returns (scaling, dropout_p) as floats."""
    check_backend(backend)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    check_dense("x", x)
    check_dtype("x", x, backend)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., in_features]")
    dev = x.device
    N = check_adapted_weight(weight, lora_A, lora_B, dev, x.dtype, backend)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has last dimension {x.shape[-1]} but weight has in_features={weight.shape[1]}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but x has {x.dtype}; they must match (as for nn.Linear)")
    check_tensor("magnitude", magnitude, 1, dev, (N,))
    if bias is not None:
        check_tensor("bias", bias, 1, dev, (N,))
        if bias.dtype not in (x.dtype, torch.float32, torch.float64):
            raise TypeError(f"bias has dtype {bias.dtype}; it must be float32 or x's dtype ({x.dtype})")
    if norm is not None:
        check_tensor("norm", norm, 1, dev, (N,))
    if backend == "triton" and any(t.dtype == torch.float64
                                   for t in (magnitude,) + ((bias,) if bias is not None else ())):
        raise TypeError("backend='triton' does not take float64 tensors; use backend='reference'")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    return check_scaling(scaling), check_dropout(dropout_p)
