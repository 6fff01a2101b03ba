"""The tensors of one layer case: frozen weight, fp32 adapter masters, a rotation pool of inputs
and output gradients, shared by every competitor of the case."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch
import torch.nn as nn

from .cases import QUANT_TYPES, Case


@dataclasses.dataclass
class CaseData:
    case: Case
    dev: torch.device
    act: torch.dtype
    ad: torch.dtype
    W: nn.Parameter  # [N, K] frozen, shared by every competitor (merged mode: each gets a copy);
    # QDoRA cases: the 4-bit weight dequantized (what the float64 reference and the norm compare with)
    A: torch.Tensor  # [r, K] fp32 masters; each competitor casts to its adapter dtype
    B: torch.Tensor  # [N, r]
    mag: torch.Tensor  # [N]
    xs: list
    dys: list
    qweight: Optional[Any] = None  # QDoRA cases: the bitsandbytes Params4bit [N, K], shared by every competitor
    quant_missing: str = ""  # QDoRA cases: why there is no qweight (bitsandbytes not installed)


def quant_tensors(qweight) -> list:
    """The tensors of a Params4bit and its quant state (packed codes, absmax, nested absmax, code
    tables, offset): owned by the case, never temporaries. [] for None."""
    if qweight is None:
        return []
    qs = qweight.quant_state
    ts = [qweight, qs.absmax, qs.code, getattr(qs, "offset", None)]
    if getattr(qs, "state2", None) is not None:
        ts += [qs.state2.absmax, qs.state2.code]
    return [t for t in ts if isinstance(t, torch.Tensor)]


def quant_bytes(qweight) -> int:
    """Bytes a 4-bit weight occupies (codes and quant state): what a norm over it has to read."""
    return sum(t.numel() * t.element_size() for t in quant_tensors(qweight))


def quantize_4bit(W: torch.Tensor, quant: str, dev: torch.device):
    """(Params4bit of W [N, K] quantized as QUANT_TYPES[quant] on dev, its dequantization [N, K] in
    W's dtype); ImportError without bitsandbytes."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    opts = QUANT_TYPES[quant]
    qw = bnb.nn.Params4bit(W.detach().to("cpu").contiguous(), requires_grad=False, **opts).to(dev)
    return qw, bnbF.dequantize_4bit(qw.data, qw.quant_state).to(W.dtype)


def make_data(case: Case, dev: torch.device, norm_fwd_tokens: int = 4096) -> CaseData:
    act, ad = case.torch_dtypes
    K, N, r, s = case.K, case.N, case.r, case.scaling
    g = torch.Generator(device=dev).manual_seed(1234)
    bound = 1.0 / math.sqrt(K)
    W = (torch.rand(N, K, generator=g, device=dev) * 2 - 1).mul_(bound)
    qweight, quant_missing = None, ""
    if case.quant:
        try:  # the norm and the reference see the weight the 4-bit layers compute with
            qweight, W = quantize_4bit(W.to(act), case.quant, dev)
            W = W.float()
        except ImportError as exc:
            quant_missing = f"bitsandbytes not installed ({exc})"
    A = (torch.rand(r, K, generator=g, device=dev) * 2 - 1).mul_(bound)
    # lora_B non-zero, so the DoRA math is not trivial: s * B @ A is ~20% of W in norm
    B = torch.randn(N, r, generator=g, device=dev).mul_(0.1 / math.sqrt(r))
    with torch.no_grad():
        # the adapters as the competitors will hold them (rounded to the adapter dtype)
        norm = torch.linalg.vector_norm(W.to(act).float() + s * (B.to(ad).float() @ A.to(ad).float()), dim=1)
        mag = norm * (1 + 0.1 * torch.randn(N, generator=g, device=dev))
    Wp = nn.Parameter(W.to(act), requires_grad=False)
    del W, norm
    M = norm_fwd_tokens if case.mode == "norm" else case.M
    x_bytes = M * K * torch.finfo(act).bits // 8
    l2 = 50 << 20
    if dev.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", l2) or l2
    pool = 2 if dev.type != "cuda" else int(min(8, max(2, math.ceil(3 * l2 / max(x_bytes, 1)))))
    if case.mode == "norm":
        pool = 1  # only the F.linear forward it is compared with reads x
    xs = [torch.randn(M, K, generator=g, device=dev).to(act).requires_grad_(case.training) for _ in range(pool)]
    dys = [torch.randn(M, N, generator=g, device=dev).to(act) for _ in range(pool)] if case.training else []
    return CaseData(case, dev, act, ad, Wp, A, B, mag, xs, dys, qweight, quant_missing)
