"""The public op: dora_linear and dora_weight_norm (argument checks, backend and route choice).

    n = ||W + s * B @ A||_rows (fp32, detached)     c = g / max(n, NORM_EPS)
    y = c * (x @ W.T + s * dropout(x) @ A.T @ B.T) + bias

The forward, every gradient and what is saved: fused_dora.autograd's module docstring.
Paths: the pure-PyTorch reference (fused_dora.reference), the eager autograd Function, or the
torch.library ops while torch.compile traces (fused_dora.autograd); on the last two, the big
GEMMs take the route the ``route`` argument names (fused_dora.routes).
"""
from typing import Optional

import torch

from . import reference
from .autograd import FusedDoraFunction, dora_linear_2d, row_norm_op
from .backend import resolve_backend
from .drivers import draw_dropout_seed, fused_forward, narrow_column_offsets, row_norm
from .routes import check_route, default_route
from .validation import check_inputs, check_weight_norm_args


def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                     backend: str = "auto") -> torch.Tensor:
    """n [N] = ||weight + scaling * lora_B @ lora_A||_2 per row, detached, not clamped; fp32
    (fp64 where any input is float64).

    weight [N, K], lora_A [r, K], lora_B [N, r]. The Triton kernel never forms B @ A densely.
    Raises TypeError / ValueError naming a bad argument.
    """
    scaling = check_weight_norm_args(weight, lora_A, lora_B, scaling, backend)
    with torch.no_grad():
        if resolve_backend(backend, weight, lora_A, lora_B, weight=weight) == "reference":
            return reference.weight_norm(weight, lora_A, lora_B, scaling)
        if torch.compiler.is_compiling():
            return row_norm_op(weight, lora_A, lora_B, scaling)
        return row_norm(weight, lora_A, lora_B, scaling)


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
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
    """DoRA linear layer: y [..., N] = c * (x @ W.T + s * dropout(x) @ A.T @ B.T) + bias.

    x [..., K] (fp16 / bf16 / fp32; any strides), weight [N, K] (x's dtype, frozen),
    bias [N] or None, lora_A [r, K] and lora_B [N, r] (fp32 or x's dtype), magnitude [N],
    scaling = alpha / r (or alpha / sqrt(r) for rsLoRA). Dropout (probability dropout_p)
    applies to the LoRA path only, and only when ``training``. The row norm n of
    W + s * B @ A is computed in fp32 and treated as a constant (no gradient flows through it);
    pass ``norm`` [N] to reuse a precomputed one. ``backend``: "auto" (Triton for CUDA tensors
    and for CPU tensors under TRITON_INTERPRET=1 except bf16, else the reference; if the
    kernels cannot be imported, a FusedDoraWarning says so once), "triton" (forced; where it
    cannot run, a TypeError for a dtype, NotImplementedError under torch.func transforms, else
    ValueError) or "reference" (pure PyTorch, also float64 and higher-order gradients).
    ``route`` (Triton backend only): how the two big GEMMs run, "fused" (Triton GEMMs with the
    DoRA work inside), "composed" (torch.mm / cuBLAS plus light Triton passes) or "auto" (the
    faster, timed once per shape bucket on a GPU; "fused" elsewhere); None: the FUSED_DORA_ROUTE
    environment variable, else "auto". See fused_dora.routes.
    Returns y in x's dtype, a tensor of its own (in-place ops on it are fine). Under
    torch.autocast, x, weight and bias are cast to the autocast dtype first (as nn.Linear is)
    and y comes back in that dtype. The Triton path is differentiable once: a backward with
    ``create_graph=True`` raises.
    """
    if (isinstance(x, torch.Tensor) and x.is_floating_point() and x.device.type in ("cpu", "cuda")
            and torch.is_autocast_enabled(x.device.type)
            and all(isinstance(t, torch.Tensor) for t in (weight, lora_A, lora_B))
            and (bias is None or isinstance(bias, torch.Tensor))):
        # like nn.Linear under autocast: x, weight and bias compute in the autocast dtype;
        # adapters stay in fp32 (the kernels take fp32 adapters as they are)
        cast = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(cast), weight.to(cast)
        bias = bias.to(cast) if bias is not None else None
        if lora_A.dtype not in (cast, torch.float32):
            lora_A, lora_B = lora_A.to(cast), lora_B.to(cast)
        with torch.autocast(x.device.type, enabled=False):
            return dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, training, backend,
                               norm=norm, route=route)
    scaling, dropout_p = check_inputs(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, backend, norm,
                                      training)
    if route is not None:  # a bad argument is an error on every backend; FUSED_DORA_ROUTE only where read
        check_route(route)
    p = dropout_p if training else 0.0
    use = resolve_backend(backend, x, weight, bias, lora_A, lora_B, magnitude, weight=weight)
    if use == "reference":
        return reference.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, p, training=p > 0, norm=norm)
    if route is None:
        route = default_route()
    K, N = weight.shape[1], weight.shape[0]
    x2d = narrow_column_offsets(x.reshape(-1, K))
    # norm None: the forward computes it (the norm pass's partial sums, finished in the GEMM's
    # epilogue), a constant through which no gradient flows
    norm = norm.detach() if norm is not None else None
    if torch.compiler.is_compiling():  # opaque custom ops that Dynamo traces around
        y = dora_linear_2d(x2d, weight, bias, lora_A, lora_B, magnitude, norm, scaling, p, route)
        return y.reshape(*x.shape[:-1], N)
    seed = draw_dropout_seed() if p > 0 else 0
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, weight, bias, lora_A, lora_B, magnitude)):
        out_shape = x.shape[:-1] + (N,)
        return FusedDoraFunction.apply(x2d, weight, bias, lora_A, lora_B, magnitude, norm, scaling, p, seed,
                                       out_shape, route)
    # inference: no autograd bookkeeping, nothing saved
    return fused_forward(x2d, weight, bias, lora_A, lora_B, magnitude, norm, scaling, p, seed, store_q=False,
                         out_shape=x.shape[:-1] + (N,), route=route)[0]
