"""DoRA over quantized base weights (QDoRA): the fused op for bitsandbytes 4-bit weights, and the
DoRA epilogue over any base layer's own output (bitsandbytes 8-bit).

    dora_linear_4bit(x, weight, bias, lora_A, lora_B, magnitude, scaling, ...)
        y = c · (x·dequant(W)ᵀ + s · dropout(x)·Aᵀ·Bᵀ) + b,  c = g / ||dequant(W) + s·B·A|| (detached)
        W a quantized bitsandbytes Params4bit (NF4 / FP4, double quantization or not).

    dora_over_base(base_out, x, bias, lora_A, lora_B, magnitude, norm, scaling, ...)
        y = c · (base_out − b + s · dropout(x)·Aᵀ·Bᵀ) + b
        base_out = base_layer(x) from the layer's own forward (and its own backward for dx):
        the 8-bit path, as PEFT's DoRA does it (base_out − b = x·Wᵀ for a linear base).

4-bit, the route: always "composed" (what bitsandbytes itself does): the weight is dequantized
with ``bitsandbytes.functional.dequantize_4bit``, torch.mm computes x·Wᵀ, and the Triton passes of
the composed route add the LoRA term and apply c and b (kernels/composed.py); the backward
dequantizes the weight again (it is never saved) for dx = (dy·c)·W, plus the LoRA part. The norm
never dequantizes: kernels/quant_norm.py reads the packed codes. route="fused" or "auto" run the
composed route too (no Triton GEMM dequantizes 4-bit tiles in its main loop yet).

Saved for the backward (both ops): x (for dA), s·dropout(x)·Aᵀ [M, r] (for dB), q = ypre·t [M, out]
(for dmagnitude; see fused_dora.autograd) and the [out] fp32 norm: PEFT QLoRA's activations plus
one [M, out] tensor and one [out] vector. Never a dequantized weight.

Dropout uses the fused semantics (dropout on the adapter input only; fused_dora.autograd).
Differentiable once, as dora_linear (a backward with create_graph=True raises); the reference
backend (bf16 under Triton's interpreter, CPU without it, float64) recomputes its forward in the
backward (torch.utils.checkpoint), so it saves no dequantized weight either.
"""
from typing import Optional, Union

import torch
import torch.utils.checkpoint

from . import reference
from .autograd import refuse_double_backward
from .backend import resolve_backend
from .drivers import draw_dropout_seed, fused_backward, fused_forward, narrow_column_offsets
from .quantized import Packed4bit, describe_4bit, describe_8bit, is_params4bit, quantized_weight_norm
from .reference import NORM_EPS, magnitude_scale
from .routes import check_route
from .validation import check_backend, check_dense, check_dropout, check_scaling, check_tensor

QUANTIZED_ROUTE = "composed"  # the route every quantized call takes (see the module docstring)


def as_packed_4bit(weight: Union[torch.Tensor, Packed4bit]) -> Packed4bit:
    """``weight`` (a bitsandbytes Params4bit, or a Packed4bit) as a Packed4bit; ValueError with the
    reason where the kernels cannot read it."""
    if isinstance(weight, Packed4bit):
        return weight
    packed, reason = describe_4bit(weight)
    if packed is None:
        raise ValueError(f"fused_dora: cannot serve this 4-bit weight: {reason}")
    return packed


def _check_adapters(x, N, K, bias, lora_A, lora_B, magnitude, norm):
    check_tensor("lora_A", lora_A, 2, x.device)
    r = lora_A.shape[0]
    if r < 1 or lora_A.shape[1] != K:
        raise ValueError(f"lora_A must have shape [r >= 1, {K}], got {tuple(lora_A.shape)}")
    check_tensor("lora_B", lora_B, 2, x.device, (N, r))
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_B has dtype {lora_B.dtype} but lora_A has {lora_A.dtype}; adapters must share a dtype")
    if lora_A.dtype not in (x.dtype, torch.float32, torch.float64):
        raise TypeError(f"lora_A has dtype {lora_A.dtype}; adapters must be float32 or x's dtype ({x.dtype})")
    check_tensor("magnitude", magnitude, 1, x.device, (N,))
    if bias is not None:
        check_tensor("bias", bias, 1, x.device, (N,))
        if bias.dtype not in (x.dtype, torch.float32, torch.float64):
            raise TypeError(f"bias has dtype {bias.dtype}; it must be float32 or x's dtype ({x.dtype})")
    if norm is not None:
        check_tensor("norm", norm, 1, x.device, (N,))


def _check_x(x, K):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    check_dense("x", x)
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must have shape [..., {K}], got {tuple(x.shape)}")


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---- 4-bit ------------------------------------------------------------------------------------
def dora_weight_norm_4bit(weight: Union[torch.Tensor, Packed4bit], lora_A: torch.Tensor, lora_B: torch.Tensor,
                          scaling: float, backend: str = "auto") -> torch.Tensor:
    """n [out] fp32 = ||dequant(W) + scaling · lora_B @ lora_A|| per row, detached, not clamped; W a
    quantized bitsandbytes Params4bit (or Packed4bit). The Triton kernel reads the packed codes
    and forms no [out, in] tensor; dequant(W) is exactly bitsandbytes' dequantize_4bit."""
    check_backend(backend)
    packed = as_packed_4bit(weight)
    scaling = check_scaling(scaling)
    N, K = packed.shape
    for name, t, shape in (("lora_A", lora_A, (lora_A.shape[0], K)), ("lora_B", lora_B, (N, lora_A.shape[0]))):
        check_tensor(name, t, 2, packed.device, shape)
    if lora_A.shape[0] < 1 or lora_B.dtype != lora_A.dtype:
        raise ValueError("lora_A and lora_B must share a dtype, with rank r >= 1")
    return quantized_weight_norm(packed, lora_A, lora_B, scaling, backend)


def weight_norm_of(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                   backend: str = "auto") -> torch.Tensor:
    """The row norm of a quantized weight, given as the layer holds it (a bitsandbytes Params4bit or
    Int8Params): the ``norm_fn`` of a fused_dora.norm_cache.NormCache for quantized layers.
    ValueError with the reason for a weight that cannot be read."""
    if is_params4bit(weight):
        return dora_weight_norm_4bit(weight, lora_A, lora_B, scaling, backend)
    rows, reason = describe_8bit(weight)
    if rows is None:
        raise ValueError(f"fused_dora: cannot compute the norm of this weight: {reason}")
    return quantized_weight_norm(rows, lora_A, lora_B, check_scaling(scaling), backend)


class Dora4bitFunction(torch.autograd.Function):
    """forward(x [M, K], bias, lora_A, lora_B, magnitude, norm, packed: Packed4bit, scaling, dropout_p,
    seed, out_shape) -> y of out_shape. The weight is dequantized for the forward GEMM and again
    for dx; neither copy is kept."""

    @staticmethod
    def forward(ctx, x, bias, lora_A, lora_B, magnitude, norm, packed, scaling, dropout_p, seed, out_shape):
        need_dx, need_dbias, need_da, need_db, need_dmag = ctx.needs_input_grad[:5]
        weight = packed.dequantize(x.dtype)
        y, su, q, norm = fused_forward(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed,
                                       store_q=need_dmag, out_shape=out_shape, route=QUANTIZED_ROUTE)
        del weight
        ctx.save_for_backward(x if need_da else None, lora_A, lora_B, magnitude, norm,
                              su if need_db else None, q if need_dmag else None)
        ctx.packed, ctx.scaling, ctx.dropout_p, ctx.seed = packed, scaling, dropout_p, seed
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        refuse_double_backward()
        need_dx, need_dbias, need_da, need_db, need_dmag = ctx.needs_input_grad[:5]
        x, lora_A, lora_B, magnitude, norm, su, q = ctx.saved_tensors
        dy = narrow_column_offsets(dy.reshape(-1, dy.shape[-1]))
        weight = ctx.packed.dequantize(dy.dtype) if need_dx else None  # dequantized again, never saved
        dx, da, db, dmag = fused_backward(dy, x, weight, lora_A, lora_B, su, q, magnitude.detach(), norm, ctx.scaling,
                                          ctx.dropout_p, ctx.seed, need_dx=need_dx, need_da=need_da, need_db=need_db,
                                          need_dmag=need_dmag, route=QUANTIZED_ROUTE)
        del weight
        dbias = dy.float().sum(0).to(ctx.bias_dtype) if need_dbias else None
        return (dx, dbias, da, db, dmag) + (None,) * 6


def dora_linear_4bit(
    x: torch.Tensor,
    weight: Union[torch.Tensor, Packed4bit],
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    backend: str = "auto",
    *,
    norm: Optional[torch.Tensor] = None,
    route: Optional[str] = None,
) -> torch.Tensor:
    """DoRA over a 4-bit base: y [..., N] = c · (x·dequant(W)ᵀ + s · dropout(x)·Aᵀ·Bᵀ) + bias.

    ``weight``: a quantized bitsandbytes Params4bit [N, K] (NF4 / FP4; or a Packed4bit from
    fused_dora.quantized.describe_4bit); dequant(W) = bitsandbytes.functional.dequantize_4bit,
    cast to x's dtype (fp16 / bf16 / fp32). The rest as :func:`fused_dora.dora_linear`: adapters
    fp32 or x's dtype, dropout on the adapter input in training, the row norm detached (pass
    ``norm`` [N] to reuse one), ``backend`` "auto" / "triton" / "reference". ``route`` is checked
    but every quantized call runs the composed route (module docstring). A weight the kernels
    cannot read (not quantized yet, a quant type other than NF4 / FP4, flattened by FSDP, ...)
    raises a ValueError saying why.
    """
    check_backend(backend)
    if route is not None:
        check_route(route)
    packed = as_packed_4bit(weight)
    N, K = packed.shape
    _check_x(x, K)
    if packed.device != x.device:
        raise ValueError(f"the 4-bit weight is on {packed.device} but x is on {x.device}")
    if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
        cast = torch.get_autocast_dtype(x.device.type)  # as nn.Linear under autocast
        x = x.to(cast)
        bias = bias.to(cast) if bias is not None else None
        if lora_A.dtype not in (cast, torch.float32):
            lora_A, lora_B = lora_A.to(cast), lora_B.to(cast)
        with torch.autocast(x.device.type, enabled=False):
            return dora_linear_4bit(x, packed, bias, lora_A, lora_B, magnitude, scaling, dropout_p, training, backend,
                                    norm=norm, route=route)
    _check_adapters(x, N, K, bias, lora_A, lora_B, magnitude, norm)
    scaling, dropout_p = check_scaling(scaling), check_dropout(dropout_p)
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    p = dropout_p if training else 0.0
    use = resolve_backend(backend, x, bias, lora_A, lora_B, magnitude)
    if norm is None:
        norm = quantized_weight_norm(packed, lora_A, lora_B, scaling, use)
    norm = norm.detach()
    if use == "reference":
        return _reference_4bit(x, packed, bias, lora_A, lora_B, magnitude, scaling, p, norm)
    x2d = narrow_column_offsets(x.reshape(-1, K))
    seed = draw_dropout_seed() if p > 0 else 0
    out_shape = x.shape[:-1] + (N,)
    if _needs_grad(x, bias, lora_A, lora_B, magnitude):
        return Dora4bitFunction.apply(x2d, bias, lora_A, lora_B, magnitude, norm, packed, scaling, p, seed, out_shape)
    w = packed.dequantize(x.dtype)  # inference: no autograd bookkeeping, nothing saved
    return fused_forward(x2d, w, bias, lora_A, lora_B, magnitude, norm, scaling, p, seed, store_q=False,
                         out_shape=out_shape, route=QUANTIZED_ROUTE)[0]


def _reference_4bit(x, packed, bias, lora_A, lora_B, magnitude, scaling, p, norm):
    """The reference path; with gradients, the forward is recomputed in the backward (checkpoint,
    same dropout mask) so that the dequantized weight is not saved."""
    def run(x, bias, lora_A, lora_B, magnitude):
        w = packed.dequantize(x.dtype)
        return reference.dora_linear(x, w, bias, lora_A, lora_B, magnitude, scaling, p, training=p > 0, norm=norm)

    if _needs_grad(x, bias, lora_A, lora_B, magnitude):
        return torch.utils.checkpoint.checkpoint(run, x, bias, lora_A, lora_B, magnitude, use_reentrant=False)
    return run(x, bias, lora_A, lora_B, magnitude)


# ---- the DoRA epilogue over a base layer's own output (8-bit) -----------------------------------
class DoraOverBaseFunction(torch.autograd.Function):
    """forward(base_out [M, N], x [M, K], bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p,
    seed, out_shape) -> y = c · (base_out − bias + su·Bᵀ) + bias. Gradients: base_out gets dy·c (the
    base layer's own backward takes it from there), x the LoRA part s · dropout_bwd(v·A)."""

    @staticmethod
    def forward(ctx, base_out, x, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed, out_shape):
        from .kernels.composed import dora_compose_epilogue
        from .kernels.forward import lora_down

        need_dbase, need_dx, need_dbias, need_da, need_db, need_dmag = ctx.needs_input_grad[:6]
        M, N = base_out.shape
        y = torch.empty(out_shape, dtype=base_out.dtype, device=base_out.device)
        y2d = y.view(M, N)
        if bias is not None:
            torch.sub(base_out, bias.to(base_out.dtype), out=y2d)
        else:
            y2d.copy_(base_out)
        if M == 0:
            su = torch.empty((0, lora_A.shape[0]), dtype=lora_A.dtype, device=x.device)
            q = base_out.new_empty((0, N)) if need_dmag else None
        else:
            su = torch.empty((M, lora_A.shape[0]), dtype=lora_A.dtype, device=x.device)
            q = dora_compose_epilogue(y2d, lora_down(x, lora_A, scaling, dropout_p, seed), lora_B, magnitude, norm,
                                      bias, NORM_EPS, store_q=need_dmag, su_out=su)
        ctx.save_for_backward(x if need_da else None, lora_A, lora_B, magnitude, norm,
                              su if need_db else None, q if need_dmag else None)
        ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
        ctx.x_meta = (x.shape, x.dtype)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        refuse_double_backward()
        need_dbase, need_dx, need_dbias, need_da, need_db, need_dmag = ctx.needs_input_grad[:6]
        from .kernels.adapter_grads import finish_adapter_grads, lora_A_grad_partials, magnitude_and_B_grad_partials
        from .kernels.composed import add_lora_input_grad
        from .kernels.input_grad import lora_up_grad

        x, lora_A, lora_B, magnitude, norm, su, q = ctx.saved_tensors
        dy = narrow_column_offsets(dy.reshape(-1, dy.shape[-1]))
        M, N = dy.shape
        magnitude = magnitude.detach()
        s, p, seed = ctx.scaling, ctx.dropout_p, ctx.seed
        dbase = dx = dbias = da = db = dmag = v = None
        if M == 0:
            dbase = dy * magnitude_scale(magnitude, norm.float()).to(dy.dtype)
        elif need_dbase or need_dbias or need_dx or need_da:
            dbase = torch.empty((M, N), dtype=dy.dtype, device=dy.device)
            # v = (dy·c)·B, and dbase = e = dy·c, c formed from magnitude and norm as the epilogue forms it
            v = lora_up_grad(dy, magnitude, norm, lora_B, NORM_EPS, e_out=dbase)
        if need_dx:
            x_shape, x_dtype = ctx.x_meta
            dx = torch.zeros(x_shape, dtype=x_dtype, device=dy.device)
            if M:
                add_lora_input_grad(dx, v, lora_A, s, p, seed)
        if M == 0:
            da = torch.zeros_like(lora_A) if need_da else None
            db = torch.zeros_like(lora_B) if need_db else None
            dmag = torch.zeros_like(magnitude) if need_dmag else None
        else:  # column passes writing partial sums, one launch finishing dmag, dB and dA (as fused_backward)
            da_part = lora_A_grad_partials(v, x, p, seed, adapter_dtype=lora_A.dtype) if need_da else None
            dmag_part = db_part = None
            if need_dmag or need_db:
                dmag_part, db_part = magnitude_and_B_grad_partials(dy, q, su, need_dmag, need_db,
                                                                     adapter_dtype=lora_B.dtype)
            dmag, db, da = finish_adapter_grads(dmag_part, db_part, da_part, magnitude, norm, lora_A, lora_B, s,
                                                  NORM_EPS)
        if need_dbias:  # y = c·(base − b) + b: b's own term is (1 − c)·dy (base_out carries the rest)
            dbias = (dy.float().sum(0) - dbase.float().sum(0)).to(ctx.bias_dtype)
        return (dbase if need_dbase else None, dx, dbias, da, db, dmag) + (None,) * 5


def dora_over_base(
    base_out: torch.Tensor,
    x: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """y [..., N] = c · (base_out − bias + s · dropout(x)·Aᵀ·Bᵀ) + bias, c = magnitude / max(norm, eps).

    ``base_out`` [..., N]: the base layer's own output for x [..., K] (bias included), so that its
    own forward and backward (e.g. bitsandbytes' int8 matmul) compute x·Wᵀ and its share of dx.
    ``norm`` [N]: the detached row norm of W + s·B·A (fused_dora.quantized.quantized_weight_norm).
    y comes in base_out's dtype. Adapters fp32 or base_out's dtype; dropout (adapter input only)
    in training.
    """
    check_backend(backend)
    if not isinstance(base_out, torch.Tensor) or not isinstance(x, torch.Tensor):
        raise TypeError("base_out and x must be torch.Tensors")
    N, K = base_out.shape[-1], x.shape[-1]
    if base_out.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"base_out {tuple(base_out.shape)} and x {tuple(x.shape)} must share their leading dimensions")
    _check_x(x, K)
    _check_adapters(base_out, N, K, bias, lora_A, lora_B, magnitude, norm)
    scaling, dropout_p = check_scaling(scaling), check_dropout(dropout_p)
    p = dropout_p if training else 0.0
    norm = norm.detach()
    use = resolve_backend(backend, base_out, x, bias, lora_A, lora_B, magnitude)
    if use == "reference":
        dt = reference._compute_dtype(base_out, lora_A, lora_B, magnitude)
        c = magnitude_scale(magnitude, norm.to(dt))
        xd = torch.nn.functional.dropout(x.to(dt), p, training=True) if p > 0 else x.to(dt)
        ypre = base_out.to(dt) - (bias.to(dt) if bias is not None else 0)
        y = c * (ypre + scaling * ((xd @ lora_A.to(dt).T) @ lora_B.to(dt).T))
        return (y + bias.to(dt) if bias is not None else y).to(base_out.dtype)
    seed = draw_dropout_seed() if p > 0 else 0
    base2d = base_out.reshape(-1, N)
    x2d = narrow_column_offsets(x.reshape(-1, K))
    if not base2d.is_contiguous():
        base2d = base2d.contiguous()
    if base2d.dtype != x2d.dtype:
        x2d = x2d.to(base2d.dtype)
    return DoraOverBaseFunction.apply(base2d, x2d, bias, lora_A, lora_B, magnitude, norm, scaling, p, seed,
                                      base_out.shape)
