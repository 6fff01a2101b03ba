"""The fused forward and backward on 2-D tensors, composed from the kernel launchers.

The math and what is saved between the two: see fused_dora.autograd's module docstring. Here
the launchers' raw results are finished: the kernels return fp32 sums, and the scaling by s,
c or 1/(t·n) each gradient still needs is applied here, in one place.

The two big GEMMs take one of two routes (fused_dora.routes): "fused" (Triton GEMMs with the
DoRA work inside) or "composed" (torch.mm, i.e. cuBLAS, with light Triton passes around it).
Everything else, and what is saved, is the same on both.

Each function imports the launchers it calls from their kernel family (``from .kernels.forward
import dora_forward``) when it runs: the kernels import triton, which importing fused_dora must not.
"""
import contextlib
import functools

import torch

from .reference import NORM_EPS
from .routes import RouteCase, known_route, timed_route


def narrow_column_offsets(t: torch.Tensor) -> torch.Tensor:
    """t [rows, cols], copied row-major if its column offsets would not fit in 32 bits.

    The kernels index rows with 64-bit offsets but columns with 32-bit ones (cheaper in the
    GEMM main loops); only a transposed-like view of a huge tensor needs the copy.
    """
    if (t.shape[1] - 1) * t.stride(1) >= 2**31:
        return t.contiguous()
    return t


def draw_dropout_seed() -> int:
    """A Philox seed from torch's default CPU generator.

    Drawing from the CPU generator needs no device sync, and torch.utils.checkpoint restores
    that generator before recomputing, so a recomputed forward draws the same mask.
    """
    return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64).item())


def no_autocast(device: torch.device):
    """A context with autocast off for ``device`` (a no-op for devices autocast does not know, e.g.
    meta): torch.mm on the composed route must keep the dtypes the kernels around it expect."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def row_norm(weight, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """n [N] fp32 = ||weight + scaling * lora_B @ lora_A|| per row (one tiled pass over weight)."""
    from .kernels.norm import dora_row_norm

    return dora_row_norm(weight, lora_A, lora_B, scaling)


def forward_fused(x, weight, su_part, su, lora_B, magnitude, norm, norm_out, bias, store_q: bool,
                  out: torch.Tensor):
    """Route "fused": one Triton GEMM x @ W.T + su @ B.T with the DoRA epilogue; writes y into
    ``out`` [M, N], su (finished from lora_down's partial sums ``su_part``) into ``su`` [M, r], and
    a norm given as partial sums, finished, into ``norm_out``; returns q [M, N] (store_q) or None."""
    from .kernels.forward import dora_forward

    return dora_forward(x, weight, su_part, lora_B, magnitude, norm, bias, NORM_EPS, store_q=store_q, out=out,
                        norm_out=norm_out, su_out=su)[1]


def forward_composed(x, weight, su_part, su, lora_B, magnitude, norm, norm_out, bias, store_q: bool,
                     out: torch.Tensor):
    """Route "composed": torch.mm writes x @ W.T into ``out`` [M, N], then one Triton pass adds
    su @ B.T and applies the same epilogue in place (writing su and the norm as `forward_fused`);
    returns q [M, N] (store_q) or None."""
    from .kernels.composed import dora_compose_epilogue

    with no_autocast(x.device):  # dora_linear already applied autocast's dtype
        torch.mm(x, weight.t(), out=out)
    return dora_compose_epilogue(out, su_part, lora_B, magnitude, norm, bias, NORM_EPS, store_q=store_q,
                                 norm_out=norm_out, su_out=su)


def _scaled_grad_and_v(dy, magnitude, norm, lora_B):
    """(e, v): e = dy * c [M, N] (dy's dtype) and v = e @ B (partial sums [S, M, r] fp32, summed by
    their readers), from one row pass over dy."""
    from .kernels.input_grad import lora_up_grad

    e = torch.empty(dy.shape, dtype=dy.dtype, device=dy.device)
    return e, lora_up_grad(dy, magnitude, norm, lora_B, NORM_EPS, e_out=e)


def input_grad_fused(dy, magnitude, norm, weight, lora_A, lora_B, scaling: float, dropout_p: float, seed: int):
    """Route "fused": (v, dx); one row pass forms e = dy * c and v = e @ B, then one Triton GEMM
    dx = e @ W + s * dropout_bwd(v @ A)."""
    from .kernels.input_grad import dora_input_grad

    e, v = _scaled_grad_and_v(dy, magnitude, norm, lora_B)
    return v, dora_input_grad(e, weight, v, lora_A, scaling, dropout_p, seed)


def input_grad_composed(dy, magnitude, norm, weight, lora_A, lora_B, scaling: float, dropout_p: float, seed: int):
    """Route "composed": (v, dx); the same row pass, torch.mm forms e @ W, and one Triton pass adds
    s * dropout_bwd(v @ A) in place."""
    from .kernels.composed import add_lora_input_grad

    e, v = _scaled_grad_and_v(dy, magnitude, norm, lora_B)
    with no_autocast(dy.device):  # a backward inherits the forward's autocast
        dx = torch.mm(e, weight)
    add_lora_input_grad(dx, v, lora_A, scaling, dropout_p, seed)
    return v, dx


FORWARD_ROUTES = {"fused": forward_fused, "composed": forward_composed}
INPUT_GRAD_ROUTES = {"fused": input_grad_fused, "composed": input_grad_composed}


def fused_forward(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed, store_q, out_shape=None,
                  route="fused"):
    """The forward on 2-D x [M, K]: (y, su [M, r], q [M, N] or None, norm [N] fp32).

    y has ``out_shape`` (default [M, N]; any shape of M * N elements, so that a caller can
    return y itself rather than a view of it). su = scaling * dropout(x) @ lora_A.T (in
    lora_A's dtype, rounded once, as PEFT rounds lora_A's output) and q = (x @ W.T + su @ B.T) * t
    (x's dtype; t per column, see kernels.epilogue.magnitude_grad_rescale) are what the backward reads; q only
    with ``store_q`` (for the magnitude gradient). ``norm``: n [N] fp32 to use, or None: the norm
    pass writes its partial sums and the GEMM's epilogue finishes them (no launch in between);
    the norm returned is the one used. ``route`` ("fused", "composed" or "auto", see
    fused_dora.routes): lora_down, then `forward_fused` or `forward_composed`.
    """
    from .kernels.forward import lora_down
    from .kernels.norm import row_norm_partials

    M, N, R = x.shape[0], weight.shape[0], lora_A.shape[0]
    y = x.new_empty(out_shape if out_shape is not None else (M, N))
    if M == 0:
        su = torch.empty((0, R), dtype=lora_A.dtype, device=x.device)
        norm = row_norm(weight, lora_A, lora_B, scaling) if norm is None else norm
        return y, su, (x.new_empty((0, N)) if store_q else None), norm
    norm_out = None
    if norm is None:
        # the direct norm: the factored one (kernels/norm.py, G from forward.lora_down_and_gram) is
        # not used here yet: its bits depend on lora_down's M-dependent K slices, and a no_grad
        # forward's norm (norm_cache, e.g. a reentrant checkpoint's first pass) must equal this
        # one bit for bit (benchmarks/NOTES.md, attempt 11)
        norm = row_norm_partials(weight, lora_A, lora_B, scaling)
        norm_out = torch.empty((N,), dtype=torch.float32, device=x.device)
    su_part = lora_down(x, lora_A, scaling, dropout_p, seed)
    su = torch.empty((M, R), dtype=lora_A.dtype, device=x.device)  # finished by either route's GEMM
    args = (x, weight, su_part, su, lora_B, magnitude, norm, norm_out, bias, store_q)
    case = RouteCase("forward", x.device, x.dtype, lora_A.dtype, M, N, x.shape[1], R, dropout_p > 0, store_q)
    chosen = known_route(route, case)
    if chosen is None:  # "auto" has not timed this case yet: each route writes to a scratch y
        chosen = timed_route(case, {name: functools.partial(body, *args, out=torch.empty((M, N), dtype=x.dtype,
                                                                                           device=x.device))
                                    for name, body in FORWARD_ROUTES.items()})
    q = FORWARD_ROUTES[chosen](*args, out=y.view(M, N))
    return y, su, q, (norm if norm_out is None else norm_out)


def fused_backward(dy, x, weight, lora_A, lora_B, su, q, magnitude, norm, scaling, dropout_p, seed,
                   *, need_dx: bool, need_da: bool, need_db: bool, need_dmag: bool, route: str = "fused"):
    """The backward: (dx, dA, dB, dmagnitude), None where not needed.

    dy [M, N]; x [M, K] (for dA); su [M, r] (for dB); q [M, N] (for dmagnitude); magnitude [N]
    and the forward's norm [N] fp32 (the kernels form c = magnitude / max(norm, eps) from them,
    bit for bit the forward's). Gradients come in their parameters' dtypes. ``route`` (see
    fused_dora.routes) decides how dx is formed: `input_grad_fused` or `input_grad_composed`;
    dA, dB and dmagnitude are computed alike on both: column passes writing partial sums, and one
    launch finishing all three.
    """
    from .kernels.adapter_grads import finish_adapter_grads, lora_A_grad_partials, magnitude_and_B_grad_partials
    from .kernels.input_grad import lora_up_grad

    M, N = dy.shape
    dx = None
    if M == 0:
        dx = dy.new_empty((0, weight.shape[1])) if need_dx else None
        return (dx, torch.zeros_like(lora_A) if need_da else None, torch.zeros_like(lora_B) if need_db else None,
                torch.zeros_like(magnitude) if need_dmag else None)
    if need_dx:
        args = (dy, magnitude, norm, weight, lora_A, lora_B, scaling, dropout_p, seed)
        case = RouteCase("backward", dy.device, dy.dtype, lora_A.dtype, M, N, weight.shape[1], lora_A.shape[0],
                         dropout_p > 0)
        chosen = known_route(route, case)
        if chosen is None:  # "auto" has not timed this case yet
            chosen = timed_route(case, {name: functools.partial(body, *args)
                                        for name, body in INPUT_GRAD_ROUTES.items()})
        v, dx = INPUT_GRAD_ROUTES[chosen](*args)
    elif need_da:
        v = lora_up_grad(dy, magnitude, norm, lora_B, NORM_EPS)  # v = (dy * c) @ B
    da_part = lora_A_grad_partials(v, x, dropout_p, seed, adapter_dtype=lora_A.dtype) if need_da else None
    dmag_part = db_part = None
    if need_dmag or need_db:
        dmag_part, db_part = magnitude_and_B_grad_partials(dy, q, su, need_dmag, need_db, adapter_dtype=lora_B.dtype)
    dmag, db, da = finish_adapter_grads(dmag_part, db_part, da_part, magnitude, norm, lora_A, lora_B, scaling, NORM_EPS)
    return dx, da, db, dmag


def frozen_grads(dy, x, mag_scale, weight, bias, need_dw, need_dbias):
    """Gradients of the frozen weight [N, K] and bias [N], for callers who train them anyway.

    Plain PyTorch (not fused), norm detached like everywhere else: dW = (dy * c).T @ x.
    """
    dw = ((dy.float() * mag_scale).T @ x.float()).to(weight.dtype) if need_dw else None
    dbias = dy.float().sum(0).to(bias.dtype) if (need_dbias and bias is not None) else None
    return dw, dbias
