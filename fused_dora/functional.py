"""The functional DoRA op: input checks, backend dispatch and the fused autograd Function.

Math (DESIGN.md section 1), x [M, K], W [N, K], A [r, K], B [N, r], magnitude g [N]:

    n = ||W + s * B @ A||_rows (fp32, detached)     c = g / max(n, NORM_EPS)
    y = c * (x @ W.T + s * dropout(x) @ A.T @ B.T) + bias
"""
import importlib.util
import math
import numbers
import os
import pathlib
import sys
import warnings
from typing import Optional

import torch

from . import reference
from .reference import NORM_EPS, magnitude_scale

BACKENDS = ("auto", "triton", "reference")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_REFERENCE_DTYPES = _KERNEL_DTYPES + (torch.float64,)


class FusedDoraWarning(UserWarning):
    """fused_dora runs, but not everywhere as fast as it could: the Triton kernels cannot be
    imported, or (enable_fused_dora) some PEFT DoRA layers run on PEFT's own path."""


def _import_kernels():
    """fused_dora.kernels (it imports triton). In a source checkout that is on sys.path but not
    installed, the kernels folder sits beside the package rather than in it: load it from there."""
    name = __package__ + ".kernels"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:  # triton or another dependency is missing: not ours to fix
            raise
    init = pathlib.Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if not init.is_file():
        raise ImportError(f"{name} is missing from this installation (no {init})")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


_kernels_module = None


def _kernels():
    """fused_dora.kernels, imported on first use."""
    global _kernels_module
    if _kernels_module is None:
        _kernels_module = _import_kernels()
    return _kernels_module


# (device type, TRITON_INTERPRET) -> None or why the kernels cannot run there. A plain dict, not
# functools.lru_cache: Dynamo warns about lru_cache-wrapped functions in traced code.
_DEVICE_REASONS = {}


def _device_reason(device_type: str, interpret_env: str) -> Optional[str]:
    key = (device_type, interpret_env)
    if key not in _DEVICE_REASONS:
        _DEVICE_REASONS[key] = _find_device_reason(device_type, interpret_env)
    return _DEVICE_REASONS[key]


def _find_device_reason(device_type: str, interpret_env: str) -> Optional[str]:
    if device_type == "cpu":
        if interpret_env in ("", "0"):
            return "CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1 before triton is imported)"
    elif device_type != "cuda":
        return f"Triton kernels do not run on {device_type} tensors"
    try:
        kernels = _kernels()
    except Exception as exc:  # noqa: BLE001 - any failure to import is reported, never swallowed
        why = f"the Triton kernels cannot be imported ({type(exc).__name__}: {exc})"
        # a device that should run the kernels: say so once, loudly, rather than run slowly in silence
        warnings.warn(f"fused_dora: {why}; the PyTorch reference path runs instead (same results, slower). "
                      "backend='triton' raises instead.", FusedDoraWarning, stacklevel=4)
        return why
    if device_type == "cpu" and not kernels.INTERPRET:
        return "triton was imported before TRITON_INTERPRET=1 was set, so kernels are compiled for a GPU"
    return None


def functorch_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is tracing this call."""
    return bool(torch._C._are_functorch_transforms_active())


def triton_unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None if the Triton kernels can compute on ``dtype`` tensors of ``device``, else why not."""
    why = _device_reason(device.type, os.environ.get("TRITON_INTERPRET", "0"))
    if why is None and dtype == torch.float64:
        why = "the Triton kernels do not take float64 tensors"
    if why is None and dtype == torch.bfloat16 and device.type == "cpu":
        why = "Triton's interpreter cannot do bfloat16 arithmetic (triton-lang/triton#11584)"
    if why is None and functorch_active():
        why = "torch.func transforms (grad, vmap, ...) cannot see inside the Triton kernels"
    return why


def triton_available_for(device: torch.device) -> Optional[str]:
    """None if the Triton kernels can run on tensors of ``device``, else the reason why not."""
    return _device_reason(device.type, os.environ.get("TRITON_INTERPRET", "0"))


def _check_tensor(name, t, ndim, device, shape=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _check_dense(name, t)
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}; all tensors must share x's device")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_dense(name, t) -> None:
    if t.is_nested or t.layout != torch.strided:
        kind = "a nested tensor" if t.is_nested else f"layout {t.layout}"
        raise TypeError(f"{name} must be a dense (strided) tensor, got {kind}")


def _check_scaling(scaling) -> float:
    if isinstance(scaling, torch.Tensor) and scaling.numel() == 1:
        scaling = scaling.item()
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling must be a real number, got {type(scaling).__name__}")
    scaling = float(scaling)
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be finite, got {scaling}")
    return scaling


def _check_dropout(dropout_p) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a real number, got {type(dropout_p).__name__}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return float(dropout_p)


def _check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_adapted_weight(weight, lora_A, lora_B, device, dtype, backend):
    """Checks weight [N, K], lora_A [r, K], lora_B [N, r] against the compute dtype; returns N."""
    _check_tensor("weight", weight, 2, device)
    N, K = weight.shape
    if N < 1 or K < 1:
        raise ValueError(f"weight must have out_features >= 1 and in_features >= 1, got shape {tuple(weight.shape)}")
    _check_tensor("lora_A", lora_A, 2, device)
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"lora_A must have rank r >= 1 rows, got shape {tuple(lora_A.shape)}")
    _check_tensor("lora_A", lora_A, 2, device, (r, K))
    _check_tensor("lora_B", lora_B, 2, device, (N, r))
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_B has dtype {lora_B.dtype} but lora_A has {lora_A.dtype}; adapters must share a dtype")
    if lora_A.dtype not in (dtype, torch.float32, torch.float64):
        raise TypeError(f"lora_A has dtype {lora_A.dtype}; adapters must be float32 or x's dtype ({dtype})")
    if backend == "triton" and lora_A.dtype == torch.float64:
        raise TypeError("backend='triton' does not take float64 tensors; use backend='reference'")
    return N


def _check_dtype(name, t, backend):
    allowed = _KERNEL_DTYPES if backend == "triton" else _REFERENCE_DTYPES  # "auto" sends float64 to the reference
    if t.dtype not in allowed:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: {', '.join(str(d) for d in allowed)} (backend={backend!r})")


def check_inputs(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p=0.0, backend="auto", norm=None,
                 training=False):
    """Validate the op's arguments; returns (scaling, dropout_p) as floats.

    Raises TypeError / ValueError naming the offending argument.
    """
    _check_backend(backend)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _check_dense("x", x)
    _check_dtype("x", x, backend)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., in_features]")
    dev = x.device
    N = _check_adapted_weight(weight, lora_A, lora_B, dev, x.dtype, backend)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has last dimension {x.shape[-1]} but weight has in_features={weight.shape[1]}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but x has {x.dtype}; they must match (as for nn.Linear)")
    _check_tensor("magnitude", magnitude, 1, dev, (N,))
    if bias is not None:
        _check_tensor("bias", bias, 1, dev, (N,))
        if bias.dtype not in (x.dtype, torch.float32, torch.float64):
            raise TypeError(f"bias has dtype {bias.dtype}; it must be float32 or x's dtype ({x.dtype})")
    if norm is not None:
        _check_tensor("norm", norm, 1, dev, (N,))
    if backend == "triton" and any(t.dtype == torch.float64 for t in (magnitude,) + ((bias,) if bias is not None else ())):
        raise TypeError("backend='triton' does not take float64 tensors; use backend='reference'")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    return _check_scaling(scaling), _check_dropout(dropout_p)


def reference_reason(backend: str, device: torch.device, dtype: torch.dtype,
                     weight: Optional[torch.Tensor] = None) -> Optional[str]:
    """None where ``backend`` runs the Triton kernels on ``dtype`` tensors of ``device`` (and this
    weight), else why the PyTorch reference path runs (or, for backend='triton', cannot)."""
    if backend == "reference":
        return "backend='reference'"
    why_not = triton_unavailable_reason(device, dtype)
    if why_not is None and weight is not None and weight.numel() >= 2**31:
        why_not = "the weight has 2**31 elements or more (the kernels index its columns with 32 bits)"
    return why_not


def resolve_backend(backend: str, x: torch.Tensor, *tensors, weight: Optional[torch.Tensor] = None) -> str:
    """'triton' or 'reference' for these inputs (x's device, the widest dtype among x and tensors).

    Where 'triton' was forced but cannot run: TypeError for a dtype (float64, bf16 under the
    interpreter), NotImplementedError under torch.func transforms, ValueError otherwise.
    """
    dtypes = [t.dtype for t in (x,) + tensors if t is not None]
    dtype = torch.float64 if torch.float64 in dtypes else x.dtype
    why_not = reference_reason(backend, x.device, dtype, weight)
    if why_not is None:
        return "triton"
    if backend == "triton":
        error = ValueError
        if "float64" in why_not or "bfloat16" in why_not:
            error = TypeError
        elif "torch.func" in why_not:
            error = NotImplementedError
        raise error(f"backend='triton' cannot run here: {why_not}")
    return "reference"


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


def dora_weight_norm(weight, lora_A, lora_B, scaling, backend: str = "auto") -> torch.Tensor:
    """n [N] = ||weight + scaling * lora_B @ lora_A||_2 per row, detached, not clamped; fp32
    (fp64 where any input is float64).

    weight [N, K], lora_A [r, K], lora_B [N, r]. The Triton kernel never forms B @ A densely.
    Raises TypeError / ValueError naming a bad argument.
    """
    _check_backend(backend)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    _check_dense("weight", weight)
    _check_dtype("weight", weight, backend)
    _check_adapted_weight(weight, lora_A, lora_B, weight.device, weight.dtype, backend)
    scaling = _check_scaling(scaling)
    with torch.no_grad():
        if resolve_backend(backend, weight, lora_A, lora_B, weight=weight) == "triton":
            if torch.compiler.is_compiling():
                from . import ops

                return ops.row_norm(weight, lora_A, lora_B, float(scaling))
            return _kernels().dora_row_norm(weight, lora_A, lora_B, float(scaling))
        return reference.weight_norm(weight, lora_A, lora_B, float(scaling))


def fused_forward(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed, store_q, out_shape=None):
    """The fused forward on 2-D x [M, K]: (y, su [M, r], q [M, N] or None).

    y has ``out_shape`` (default [M, N]; any shape of M * N elements, so that a caller can
    return y itself rather than a view of it). su = scaling * dropout(x) @ lora_A.T (in
    lora_A's dtype, rounded once, as PEFT rounds lora_A's output) and q = (x @ W.T + su @ B.T) * t
    (x's dtype; t per column, see magnitude_grad_rescale) are what the backward reads; q only
    with ``store_q`` (for the magnitude gradient). Two launches: lora_down, then the GEMM that
    also forms c = magnitude / norm in its epilogue.
    """
    k = _kernels()
    M, N, R = x.shape[0], weight.shape[0], lora_A.shape[0]
    y = x.new_empty(out_shape if out_shape is not None else (M, N))
    if M == 0:
        su = torch.empty((0, R), dtype=lora_A.dtype, device=x.device)
        return y, su, (x.new_empty((0, N)) if store_q else None)
    su = k.lora_down(x, lora_A, scaling, dropout_p, seed)
    _, q = k.dora_forward(x, weight, su, lora_B, magnitude, norm, bias, NORM_EPS, store_q=store_q, out=y.view(M, N))
    return y, su, q


def fused_backward(dy, x, weight, lora_A, lora_B, su, q, scale, norm, magnitude_dtype, scaling, dropout_p, seed,
                   need_dx, need_da, need_db, need_dmag):
    """The fused backward: (dx, dA, dB, dmagnitude), None where not needed.

    dy [M, N]; x [M, K] (for dA); su [M, r] (for dB); q [M, N] (for dmagnitude); scale [N] fp32,
    the forward's c = magnitude / max(norm, eps), and norm [N]. Gradients come in their
    parameters' dtypes.
    """
    k = _kernels()
    M, N = dy.shape
    dx = da = dbb = dmag = None
    if M == 0:
        dx = dy.new_empty((0, weight.shape[1])) if need_dx else None
        da = torch.zeros_like(lora_A) if need_da else None
        dbb = torch.zeros_like(lora_B) if need_db else None
        dmag = torch.zeros(N, dtype=magnitude_dtype, device=dy.device) if need_dmag else None
        return dx, da, dbb, dmag
    if need_dx or need_da:
        v = k.lora_up_grad(dy, scale, lora_B)
        if need_dx:
            dx = k.dora_input_grad(dy, scale, weight, v, lora_A, scaling, dropout_p, seed)
        if need_da:
            da = (scaling * k.lora_A_grad(v, x, dropout_p, seed, adapter_dtype=lora_A.dtype)).to(lora_A.dtype)
    if need_dmag or need_db:
        dmag_raw, db_raw = k.magnitude_and_B_grads(dy, q, su, need_dmag, need_db, adapter_dtype=lora_B.dtype)
        if need_dmag:  # sum(dy * ypre) / n, with q = ypre * t
            n = norm.float().clamp_min(NORM_EPS)
            dmag = (dmag_raw / (magnitude_grad_rescale(scale, n) * n)).to(magnitude_dtype)
        if need_db:
            dbb = (scale[:, None] * db_raw).to(lora_B.dtype)  # su already carries the scaling
    return dx, da, dbb, dmag


def pow2_floor(v: torch.Tensor) -> torch.Tensor:
    """2**floor(log2|v|) of fp32 v, elementwise (0 for 0 and subnormals): v's exponent bits alone."""
    return (v.view(torch.int32) & 0x7F800000).view(torch.float32)


def magnitude_grad_rescale(scale: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """t [N] fp32 = pow2_floor(c), or pow2_floor(1 / n) where c is 0; scale = c, n = max(norm, eps).

    The forward saves q = ypre * t for the magnitude gradient rather than ypre: multiplying by a
    power of two is exact, and |q| <= |c * ypre| = |y - bias|, so q is finite in 16 bits wherever
    y is, while ypre = (y - bias) / c overflows fp16 for a small c. The forward's epilogue forms t
    with the same bits (kernels.forward.magnitude_grad_rescale).
    """
    t = pow2_floor(scale)
    return torch.where(t > 0, t, pow2_floor(1.0 / n))


def frozen_grads(dy, x, scale, weight, bias, need_dw, need_dbias):
    """Gradients of the frozen weight [N, K] and bias [N], for callers who train them anyway.

    Plain PyTorch (not fused), norm detached like everywhere else: dW = (dy * c).T @ x.
    """
    dw = ((dy.float() * scale).T @ x.float()).to(weight.dtype) if need_dw else None
    dbias = dy.float().sum(0).to(bias.dtype) if (need_dbias and bias is not None) else None
    return dw, dbias


def refuse_double_backward() -> None:
    """Raise if a backward is being differentiated (create_graph=True): the kernels' backward
    has no graph, and returning gradients without one would silently drop every second-order term."""
    if torch.is_grad_enabled():
        raise RuntimeError("fused_dora: double backward (create_graph=True, e.g. a gradient penalty) is not "
                           "supported by the Triton kernels, whose backward is not differentiable; use "
                           "backend='reference' for higher-order gradients")


class FusedDoraFunction(torch.autograd.Function):
    """Fused DoRA on 2-D inputs with the norm given (constant). See the module docstring.

    forward(x [M, K], weight, bias, lora_A, lora_B, magnitude, norm [N] fp32, scaling, dropout_p, seed,
            out_shape) -> y of out_shape ([..., N]), a tensor of its own (not a view), so in-place
            ops on it (ReLU(inplace=True), h += residual) are allowed as after nn.Linear
    Gradients: x, lora_A, lora_B, magnitude by the fused kernels; weight and bias (frozen in
    DoRA) get correct gradients computed with plain PyTorch matmuls if they require grad.
    Not twice differentiable: a backward with create_graph=True raises.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed, out_shape):
        need_dx, need_dw, need_dbias, need_da, need_db, need_dmag = ctx.needs_input_grad[:6]
        y, su, q = fused_forward(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed,
                                 store_q=need_dmag, out_shape=out_shape)
        # saved: only what the needed gradients read; c = magnitude / norm is re-formed in the
        # backward rather than saved (magnitude is a parameter: saving it costs no memory)
        ctx.save_for_backward(x if (need_da or need_dw) else None, weight, bias, lora_A, lora_B,
                              su if need_db else None, q, magnitude, norm)
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.magnitude_dtype = scaling, dropout_p, seed, magnitude.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        refuse_double_backward()
        x, weight, bias, lora_A, lora_B, su, q, magnitude, norm = ctx.saved_tensors
        dy = narrow_column_offsets(dy.reshape(-1, dy.shape[-1]))
        scale = magnitude_scale(magnitude.detach(), norm.float())  # c [N] fp32, as in the forward's epilogue
        need_dx, need_dw, need_dbias, need_da, need_db, need_dmag = ctx.needs_input_grad[:6]
        dx, da, db, dmag = fused_backward(dy, x, weight, lora_A, lora_B, su, q, scale, norm, ctx.magnitude_dtype,
                                          ctx.scaling, ctx.dropout_p, ctx.seed, need_dx, need_da, need_db, need_dmag)
        dw, dbias = frozen_grads(dy, x, scale, weight, bias, need_dw, need_dbias)
        return dx, dw, dbias, da, db, dmag, None, None, None, None, None


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
            return dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, training, backend, norm=norm)
    scaling, dropout_p = check_inputs(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, backend, norm,
                                      training)
    p = dropout_p if training else 0.0
    use = resolve_backend(backend, x, weight, bias, lora_A, lora_B, magnitude, weight=weight)
    if use == "reference":
        return reference.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, p, training=p > 0, norm=norm)
    K, N = weight.shape[1], weight.shape[0]
    x2d = narrow_column_offsets(x.reshape(-1, K))
    if torch.compiler.is_compiling():  # opaque custom ops that Dynamo traces around
        from . import ops

        norm = ops.row_norm(weight, lora_A, lora_B, scaling) if norm is None else norm.detach()
        y = ops.dora_linear_2d(x2d, weight, bias, lora_A, lora_B, magnitude, norm, scaling, p)
        return y.reshape(*x.shape[:-1], N)
    if norm is None:  # inputs already checked: straight to the kernel
        with torch.no_grad():
            norm = _kernels().dora_row_norm(weight, lora_A, lora_B, scaling)
    seed = draw_dropout_seed() if p > 0 else 0
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, lora_A, lora_B, magnitude)):
        out_shape = x.shape[:-1] + (N,)
        return FusedDoraFunction.apply(x2d, weight, bias, lora_A, lora_B, magnitude, norm.detach(), scaling, p, seed,
                                       out_shape)
    # inference: no autograd bookkeeping, nothing saved
    return fused_forward(x2d, weight, bias, lora_A, lora_B, magnitude, norm, scaling, p, seed, store_q=False,
                         out_shape=x.shape[:-1] + (N,))[0]
