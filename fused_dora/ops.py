"""The fused op registered with torch.library, for torch.compile (fullgraph, no graph breaks).

Eager calls go through ``FusedDoraFunction`` (less dispatch overhead); under torch.compile
``dora_linear`` routes here: the kernels are opaque custom ops with fake (meta) implementations
and a registered autograd formula, so Dynamo and AOTAutograd trace around them.
The dropout seed is a 1-element int64 CPU tensor here (drawn inside the graph), not a Python int.
"""
from typing import Optional

import torch
from torch import Tensor

from .functional import _kernels, fused_backward, fused_forward, frozen_grads, narrow_column_offsets, refuse_double_backward
from .reference import magnitude_scale


@torch.library.custom_op("fused_dora::row_norm", mutates_args=())
def row_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """n [N] fp32: row norms of weight + scaling * lora_B @ lora_A (Triton kernel)."""
    return _kernels().dora_row_norm(weight, lora_A, lora_B, scaling)


@row_norm.register_fake
def _(weight, lora_A, lora_B, scaling):
    return weight.new_empty((weight.shape[0],), dtype=torch.float32)


@torch.library.custom_op("fused_dora::dora_fwd", mutates_args=())
def dora_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
             norm: Tensor, scaling: float, dropout_p: float, seed: Tensor, store_q: bool
             ) -> tuple[Tensor, Tensor, Tensor]:
    """(y [M, N], su [M, r] in lora_A's dtype, q [M, N] or [0]) for 2-D x [M, K]."""
    y, su, q = fused_forward(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p,
                             int(seed.item()), store_q)
    return y, su, (q if q is not None else x.new_empty((0,)))


@dora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed, store_q):
    M, N = x.shape[0], weight.shape[0]
    return (x.new_empty((M, N)), x.new_empty((M, lora_A.shape[0]), dtype=lora_A.dtype),
            x.new_empty((M, N) if store_q else (0,)))


@torch.library.custom_op("fused_dora::dora_bwd", mutates_args=())
def dora_bwd(dy: Tensor, x: Optional[Tensor], weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
             su: Optional[Tensor], q: Tensor, scale: Tensor, norm: Tensor, scaling: float, dropout_p: float, seed: Tensor,
             need_dx: bool, need_da: bool, need_db: bool, need_dmag: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dmagnitude); an empty tensor stands for a gradient that was not needed.

    x may be None unless need_da, su None unless need_db (the forward saved only what is needed).
    """
    grads = fused_backward(narrow_column_offsets(dy), x, weight, lora_A, lora_B, su, q, scale, norm, magnitude.dtype,
                           scaling, dropout_p, int(seed.item()), need_dx, need_da, need_db, need_dmag)
    return tuple(g if g is not None else dy.new_empty((0,)) for g in grads)


@dora_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, magnitude, su, q, scale, norm, scaling, dropout_p, seed,
      need_dx, need_da, need_db, need_dmag):
    empty = dy.new_empty((0,))
    return (dy.new_empty((dy.shape[0], weight.shape[1])) if need_dx else empty,
            torch.empty_like(lora_A) if need_da else empty,
            torch.empty_like(lora_B) if need_db else empty,
            torch.empty_like(magnitude) if need_dmag else empty)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed, store_q = inputs
    y, su, q = output
    need_dx, need_dw, need_dbias, need_da, need_db, need_dmag = ctx.needs_input_grad[:6]
    # as FusedDoraFunction: only what the needed gradients read (q is [0] unless store_q)
    ctx.save_for_backward(x if (need_da or need_dw) else None, weight, bias, lora_A, lora_B, magnitude,
                          su if need_db else None, q, norm, seed)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.mark_non_differentiable(su, q)


def _backward(ctx, dy, _du, _dq):
    refuse_double_backward()
    x, weight, bias, lora_A, lora_B, magnitude, su, q, norm, seed = ctx.saved_tensors
    need_dx, need_dw, need_dbias, need_da, need_db, need_dmag = ctx.needs_input_grad[:6]
    scale = magnitude_scale(magnitude.detach(), norm.float())  # c [N] fp32
    if need_dmag and q.numel() != dy.numel():
        raise RuntimeError("fused_dora::dora_fwd was called with store_q=False, so it cannot give the "
                           "magnitude gradient; pass store_q=True when magnitude requires grad")
    dx, da, db, dmag = dora_bwd(dy, x, weight, lora_A, lora_B, magnitude, su, q, scale, norm, ctx.scaling,
                                ctx.dropout_p, seed, need_dx, need_da, need_db, need_dmag)
    dw, dbias = frozen_grads(dy, x, scale, weight, bias, need_dw, need_dbias)
    return (dx if need_dx else None, dw, dbias, da if need_da else None, db if need_db else None,
            dmag if need_dmag else None, None, None, None, None, None)


dora_fwd.register_autograd(_backward, setup_context=_setup_context)


def dora_linear_2d(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p):
    """y [M, N] through the registered ops; draws the dropout seed inside the traced graph."""
    if dropout_p > 0:
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
    else:
        seed = torch.zeros((1,), dtype=torch.int64)
    store_q = torch.is_grad_enabled() and magnitude.requires_grad
    return dora_fwd(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed, store_q)[0]
