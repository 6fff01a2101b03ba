"""The pure-PyTorch DoRA path: the plainest statement of the math, the truth for parity tests.

Also the fallback where Triton cannot run (CPU tensors outside the interpreter, float64).
Autograd differentiates it directly; the norm is detached (DoRA paper, section 4.3), so its
gradients are the ones the fused kernels implement.
"""
from typing import Optional

import torch
import torch.nn.functional as F

# A row whose adapted weight is all zeros has norm 0 and no direction; clamping the norm (as
# F.normalize does) keeps its output and gradients finite. Rows with norm >= NORM_EPS are
# unchanged bit for bit.
NORM_EPS = 1e-12


def _compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """n [N] = ||weight + scaling * lora_B @ lora_A||_2 per row, fp32 (fp64 for fp64 inputs), detached.

    weight [N, K], lora_A [r, K], lora_B [N, r]. Not clamped: see `magnitude_scale`.
    """
    dt = _compute_dtype(weight, lora_A, lora_B)
    with torch.no_grad():
        adapted = weight.to(dt) + scaling * (lora_B.to(dt) @ lora_A.to(dt))
        return torch.linalg.vector_norm(adapted, dim=1)


def magnitude_scale(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """c [N] = magnitude / max(norm, NORM_EPS), in norm's dtype (fp32 or fp64)."""
    return magnitude.to(norm.dtype) / norm.clamp_min(NORM_EPS)


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
    *,
    dropout_mask: Optional[torch.Tensor] = None,
    norm: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y [..., N] = c * (x @ W.T + s * dropout(x) @ A.T @ B.T) + bias, in x's dtype.

    x [..., K], weight [N, K], bias [N] or None, lora_A [r, K], lora_B [N, r], magnitude [N].
    Computes in fp32 (fp64 if any input is fp64). dropout_mask (bool, x's shape) replaces
    torch's random mask when given; norm (detached [N]) replaces the computed one.
    """
    dt = _compute_dtype(x, weight, lora_A, lora_B, magnitude)
    if norm is None:
        norm = weight_norm(weight, lora_A, lora_B, scaling)
    c = magnitude_scale(magnitude, norm.detach().to(dt))

    xc = x.to(dt)
    if training and dropout_p > 0:
        if dropout_mask is None:
            x_d = F.dropout(xc, dropout_p, training=True)
        else:
            x_d = xc * dropout_mask.to(dt) / (1.0 - dropout_p)
    else:
        x_d = xc
    base = xc @ weight.to(dt).T
    lora = (x_d @ lora_A.to(dt).T) @ lora_B.to(dt).T
    y = c * (base + scaling * lora)
    if bias is not None:
        y = y + bias.to(dt)
    return y.to(x.dtype)
