"""The two autograd paths of the fused op, over one saved layout and one gradient formula.

Shapes: x [M, K], W [N, K], bias b [N], A = lora_A [r, K], B = lora_B [N, r], magnitude g [N],
scaling s, dropout with keep probability 1 - p (p to 2**-16; mask regenerated from a Philox seed).

Forward:

    x_d  = dropout(x)                              (identity when p = 0)
    su   = s · x_d @ Aᵀ                            [M, r]   lora_down (partial sums over slices of K), summed
                                                            and rounded once to A's dtype by the GEMM
    n    = ||W + s · B @ A||  per row, detached    [N]      fp32, one tiled pass over W
    c    = g / max(n, eps)                         [N]
    ypre = x @ Wᵀ + su @ Bᵀ                        [M, N]   one GEMM (r extra K-steps)
    y    = c ⊙ ypre + b                            [M, N]   in the GEMM's epilogue

Backward (n is a constant, DoRA paper §4.3; dy [M, N]):

    e    = dy ⊙ c                                  [M, N]   (c applied as dy is loaded)
    dg   = Σ_rows dy ⊙ ypre / n                    [N]      = Σ_rows dy ⊙ q / (t · n)
    dB   = eᵀ @ su = c ⊙ (dyᵀ @ su)                [N, r]
    v    = e @ B                                   [M, r]
    dA   = s · vᵀ @ x_d                            [r, K]
    dx   = e @ W + s · dropout_bwd(v @ A)          [M, K]   (the same mask, the same 1/(1-p))
    dW   = eᵀ @ x,  db = Σ_rows dy                 only for callers that train W or b

Saved for the backward, only what the needed gradients read (``saved_tensors``): x (for dA,
dW), su (for dB), q = ypre · t (for dg; t = 2**floor(log2 c) per column keeps q finite in
16 bits wherever y is, see kernels/epilogue.py's magnitude_grad_rescale), the [N] fp32 norm (a training
forward computes its own: 4·N bytes), and the parameters W, A, B, g (saving those costs no
memory). c is re-formed from g and n. Both GEMM routes (fused / composed, fused_dora.routes)
compute these same quantities and save the same tensors, so forward and backward choose apart.

Autograd paths:
- ``FusedDoraFunction`` (eager calls): a torch.autograd.Function, least dispatch overhead.
- ``fused_dora::dora_fwd`` / ``dora_bwd`` / ``row_norm`` (torch.compile): custom ops with fake
  implementations and a registered autograd formula, so Dynamo and AOTAutograd trace around
  the kernels with no graph break. The dropout seed is a 1-element int64 CPU tensor there.
  Registering them imports no triton.

Both are differentiable once: a backward with create_graph=True raises (refuse_double_backward).
"""
from typing import Optional

import torch
from torch import Tensor

from .drivers import frozen_grads, fused_backward, fused_forward, narrow_column_offsets, row_norm
from .reference import magnitude_scale


def saved_tensors(needs, x, weight, bias, lora_A, lora_B, magnitude, norm, su, q) -> tuple:
    """The saved layout of both routes, in one place: what the gradients in ``needs`` (the six
    needs_input_grad flags of x, weight, bias, lora_A, lora_B, magnitude) read, None elsewhere."""
    need_dx, need_dw, need_dbias, need_da, need_db, need_dmag = needs
    return (x if (need_da or need_dw) else None, weight, bias, lora_A, lora_B, magnitude, norm,
            su if need_db else None, q if need_dmag else None)


def refuse_double_backward() -> None:
    """Raise if a backward is being differentiated (create_graph=True): the kernels' backward
    has no graph, and returning gradients without one would silently drop every second-order term."""
    if torch.is_grad_enabled():
        raise RuntimeError("fused_dora: double backward (create_graph=True, e.g. a gradient penalty) is not "
                           "supported by the Triton kernels, whose backward is not differentiable; use "
                           "backend='reference' for higher-order gradients")


def input_grads(needs, dy, saved, scaling, dropout_p, seed, route="fused", backward=fused_backward) -> tuple:
    """(dx, dW, dbias, dA, dB, dmagnitude) from dy [..., N] and ``saved_tensors``' tuple.

    ``backward``: drivers.fused_backward (eager route) or the dora_bwd custom op (compile
    route), called as fused_backward is.
    """
    refuse_double_backward()
    x, weight, bias, lora_A, lora_B, magnitude, norm, su, q = saved
    need_dx, need_dw, need_dbias, need_da, need_db, need_dmag = needs
    dy = narrow_column_offsets(dy.reshape(-1, dy.shape[-1]))
    dx, da, db, dmag = backward(dy, x, weight, lora_A, lora_B, su, q, magnitude.detach(), norm, scaling, dropout_p,
                                seed, need_dx=need_dx, need_da=need_da, need_db=need_db, need_dmag=need_dmag,
                                route=route)
    dw = dbias = None
    if need_dw or need_dbias:  # frozen in DoRA: only for callers who train them anyway
        mag_scale = magnitude_scale(magnitude.detach(), norm.float())  # c [N] fp32, bit for bit the forward's
        dw, dbias = frozen_grads(dy, x, mag_scale, weight, bias, need_dw, need_dbias)
    return dx, dw, dbias, da, db, dmag


# ---- eager route ----------------------------------------------------------------------------------
class FusedDoraFunction(torch.autograd.Function):
    """forward(x [M, K], weight, bias, lora_A, lora_B, magnitude, norm [N] fp32 or None (computed in
    the forward), scaling, dropout_p, seed: int, out_shape, route) -> y of out_shape ([..., N]), a
    tensor of its own (not a view), so
    in-place ops on it (ReLU(inplace=True), h += residual) are allowed as after nn.Linear.
    ``route``: fused_dora.routes' "fused", "composed" or "auto" (chosen apart for the backward).

    Gradients: x, lora_A, lora_B, magnitude by the fused kernels; weight and bias (frozen in
    DoRA) get correct gradients from plain PyTorch matmuls if they require grad.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed, out_shape, route):
        needs = ctx.needs_input_grad[:6]
        y, su, q, norm = fused_forward(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed,
                                       store_q=needs[5], out_shape=out_shape, route=route)
        ctx.save_for_backward(*saved_tensors(needs, x, weight, bias, lora_A, lora_B, magnitude, norm, su, q))
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.route = scaling, dropout_p, seed, route
        return y

    @staticmethod
    def backward(ctx, dy):
        grads = input_grads(ctx.needs_input_grad[:6], dy, ctx.saved_tensors, ctx.scaling, ctx.dropout_p, ctx.seed,
                            ctx.route)
        return grads + (None,) * 6


# ---- torch.compile route: custom ops ---------------------------------------------------------------
@torch.library.custom_op("fused_dora::row_norm", mutates_args=())
def row_norm_op(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """n [N] fp32: row norms of weight + scaling * lora_B @ lora_A (Triton kernel)."""
    return row_norm(weight, lora_A, lora_B, scaling)


@row_norm_op.register_fake
def _(weight, lora_A, lora_B, scaling):
    return weight.new_empty((weight.shape[0],), dtype=torch.float32)


@torch.library.custom_op("fused_dora::dora_fwd", mutates_args=())
def dora_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
             norm: Optional[Tensor], scaling: float, dropout_p: float, seed: Tensor, store_q: bool, route: str
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y [M, N], su [M, r] in lora_A's dtype, q [M, N] or [0], the norm [N] fp32 computed here or
    [0]) for 2-D x [M, K]; ``norm`` None: computed here (the norm pass's partial sums, finished in
    the GEMM's epilogue), else used as given (a custom op cannot return its input)."""
    y, su, q, used = fused_forward(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p,
                                   int(seed.item()), store_q, route=route)
    no_q, no_norm = x.new_empty((0,)), x.new_empty((0,), dtype=torch.float32)  # two: returns must not alias
    return y, su, (q if q is not None else no_q), (used if norm is None else no_norm)


@dora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed, store_q, route):
    M, N = x.shape[0], weight.shape[0]
    return (x.new_empty((M, N)), x.new_empty((M, lora_A.shape[0]), dtype=lora_A.dtype),
            x.new_empty((M, N) if store_q else (0,)), x.new_empty((N,) if norm is None else (0,), dtype=torch.float32))


@torch.library.custom_op("fused_dora::dora_bwd", mutates_args=())
def dora_bwd(dy: Tensor, x: Optional[Tensor], weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
             su: Optional[Tensor], q: Optional[Tensor], norm: Tensor, scaling: float,
             dropout_p: float, seed: Tensor, need_dx: bool, need_da: bool, need_db: bool, need_dmag: bool,
             route: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dmagnitude); an empty tensor stands for a gradient that was not needed.

    x may be None unless need_da, su None unless need_db, q None unless need_dmag.
    """
    grads = fused_backward(dy, x, weight, lora_A, lora_B, su, q, magnitude, norm, scaling, dropout_p,
                           int(seed.item()), need_dx=need_dx, need_da=need_da, need_db=need_db, need_dmag=need_dmag,
                           route=route)
    return tuple(g if g is not None else dy.new_empty((0,)) for g in grads)


@dora_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, magnitude, su, q, norm, scaling, dropout_p, seed,
      need_dx, need_da, need_db, need_dmag, route):
    empty = dy.new_empty((0,))
    return (dy.new_empty((dy.shape[0], weight.shape[1])) if need_dx else empty,
            torch.empty_like(lora_A) if need_da else empty,
            torch.empty_like(lora_B) if need_db else empty,
            torch.empty_like(magnitude) if need_dmag else empty)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, magnitude, given_norm, scaling, dropout_p, seed, store_q, route = inputs
    y, su, q, computed_norm = output
    norm = given_norm if given_norm is not None else computed_norm
    needs = ctx.needs_input_grad[:6]
    if needs[5] and not store_q:
        raise RuntimeError("fused_dora::dora_fwd was called with store_q=False, so it cannot give the "
                           "magnitude gradient; pass store_q=True when magnitude requires grad")
    ctx.save_for_backward(*saved_tensors(needs, x, weight, bias, lora_A, lora_B, magnitude, norm, su, q), seed)
    ctx.scaling, ctx.dropout_p, ctx.route = scaling, dropout_p, route
    ctx.mark_non_differentiable(su, q, computed_norm)


def _backward(ctx, dy, _dsu, _dq, _dnorm):
    *saved, seed = ctx.saved_tensors

    def through_op(dy, x, weight, lora_A, lora_B, su, q, magnitude, norm, scaling, dropout_p, seed, *,
                   need_dx, need_da, need_db, need_dmag, route):
        """fused_backward's signature, run as the opaque dora_bwd op; its empty tensors become None."""
        needs = (need_dx, need_da, need_db, need_dmag)
        grads = dora_bwd(dy, x, weight, lora_A, lora_B, magnitude, su, q, norm, scaling, dropout_p, seed,
                         *needs, route)
        return tuple(g if need else None for g, need in zip(grads, needs))

    grads = input_grads(ctx.needs_input_grad[:6], dy, saved, ctx.scaling, ctx.dropout_p, seed, ctx.route,
                        backward=through_op)
    return grads + (None,) * 6


dora_fwd.register_autograd(_backward, setup_context=_setup_context)


def dora_linear_2d(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, route="fused"):
    """y [M, N] through the custom ops; draws the dropout seed inside the traced graph."""
    if dropout_p > 0:
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
    else:
        seed = torch.zeros((1,), dtype=torch.int64)
    store_q = torch.is_grad_enabled() and magnitude.requires_grad
    return dora_fwd(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed, store_q, route)[0]
