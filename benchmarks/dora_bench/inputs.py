"""The tensors of one layer case: frozen weight, fp32 adapter masters, a rotation pool of inputs
and output gradients, shared by every competitor of the case."""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from .cases import Case


@dataclasses.dataclass
class CaseData:
    case: Case
    dev: torch.device
    act: torch.dtype
    ad: torch.dtype
    W: nn.Parameter  # [N, K] frozen, shared by every competitor (merged mode: each gets a copy)
    A: torch.Tensor  # [r, K] fp32 masters; each competitor casts to its adapter dtype
    B: torch.Tensor  # [N, r]
    mag: torch.Tensor  # [N]
    xs: list
    dys: list


def make_data(case: Case, dev: torch.device, norm_fwd_tokens: int = 4096) -> CaseData:
    act, ad = case.torch_dtypes
    K, N, r, s = case.K, case.N, case.r, case.scaling
    g = torch.Generator(device=dev).manual_seed(1234)
    bound = 1.0 / math.sqrt(K)
    W = (torch.rand(N, K, generator=g, device=dev) * 2 - 1).mul_(bound)
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
    return CaseData(case, dev, act, ad, Wp, A, B, mag, xs, dys)
