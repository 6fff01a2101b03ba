"""Launches per layer per step, counted without a GPU.

One layer's forward (and backward) runs on meta tensors, which stand in for CUDA ones: every
Triton launch is recorded instead of run (each autotuned kernel's ``run``), and every aten op on
a meta tensor that would put work on the GPU stream is counted by a dispatch mode. Ops that
launch nothing are not counted: views, allocations (``empty*``), and ops on CPU tensors (the
dropout seed is drawn from the CPU generator).

    counts = count_launches(M=4096, N=4096, K=4096, r=16, training=True, dropout=0.05)
    counts.total, counts.triton, counts.aten      # 8, 6, {"aten.div.Tensor": 1, ...}

A cuBLAS call counts as one launch (it may be one or two kernels on the GPU).
"""
from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass, field
from typing import Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

H100_SMS = 132

# aten ops that put no work on the stream: allocations (and their meta-only bookkeeping)
_NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_local_scalar_dense",
              "lift_fresh", "detach", "alias", "_to_copy_meta"}


@dataclass
class LaunchCounts:
    """Launches of one call: Triton kernels by name, aten ops by name (cuBLAS included)."""
    triton: Dict[str, int] = field(default_factory=collections.Counter)
    aten: Dict[str, int] = field(default_factory=collections.Counter)

    @property
    def total(self) -> int:
        return sum(self.triton.values()) + sum(self.aten.values())

    def describe(self) -> str:
        parts = [f"{n} x{c}" if c > 1 else n for n, c in sorted({**self.triton, **self.aten}.items())]
        return f"{self.total} launches: " + ", ".join(parts)


def _is_view(func) -> bool:
    """Whether an aten op returns a view of an input (its schema marks the output as aliasing)."""
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


class _CountOps(TorchDispatchMode):
    def __init__(self, counts: LaunchCounts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_device = any(t.device.type == "meta" for t in tensors) or (
            isinstance(out, torch.Tensor) and out.device.type == "meta")
        if on_device and name not in _NO_LAUNCH and not _is_view(func):
            self.counts.aten[f"aten.{name}"] += 1
        return out


@contextlib.contextmanager
def _triton_recorded(current: list):
    """Each autotuned kernel's launch is counted in ``current[0]`` (a LaunchCounts) instead of run;
    meta tensors pass the backend's checks as CUDA tensors would."""
    from fused_dora import backend
    from fused_dora.kernels import tuning

    tuned_kernels = tuning.tuned_kernels()
    real_unavailable, real_num_sms = backend._unavailable, tuning.num_sms

    def meta_is_a_gpu(device, dtype, weight):
        return None if device.type == "meta" else real_unavailable(device, dtype, weight)

    def record(name):
        def run(*args, **kwargs):
            current[0].triton[name] += 1
        return run

    backend._unavailable = meta_is_a_gpu
    tuning.num_sms = lambda device: H100_SMS  # grids and reduction splits sized for a GPU
    for name, tuned in tuned_kernels.items():
        tuned.kernel.run = record(name)
    try:
        yield
    finally:
        backend._unavailable = real_unavailable
        tuning.num_sms = real_num_sms
        for tuned in tuned_kernels.values():
            del tuned.kernel.run


def count_launches(M: int = 4096, N: int = 4096, K: int = 4096, r: int = 16, *, training: bool = True,
                   dropout: float = 0.0, x_dtype: torch.dtype = torch.bfloat16,
                   adapter_dtype: torch.dtype = torch.float32, route: str = "fused",
                   norm_cached: bool = True) -> Dict[str, LaunchCounts]:
    """{"forward": counts[, "backward": counts]} for one FusedDoraLinear call of [M, K] -> [M, N]
    on a 132-SM GPU.

    ``training``: a training step (the norm is computed in the forward; dx and every adapter
    gradient in the backward); else an inference forward under no_grad, with the layer's norm
    already cached (``norm_cached=False``: ``dora_linear`` called without a norm, which the
    forward computes; a layer's first eval call instead caches a norm from its own pass).
    """
    from fused_dora import FusedDoraLinear, dora_linear

    layer = FusedDoraLinear(K, N, r=r, lora_alpha=2 * r, lora_dropout=dropout, device="meta", dtype=x_dtype,
                            adapter_dtype=adapter_dtype, backend="triton", route=route).train(training)
    x = torch.empty(M, K, dtype=x_dtype, device="meta", requires_grad=training)
    current = [LaunchCounts()]
    out = {}
    with _triton_recorded(current):
        if not training and norm_cached:
            with torch.no_grad():
                layer(x)  # fills the norm cache: not counted
        current[0] = out["forward"] = LaunchCounts()
        with _CountOps(current[0]), torch.set_grad_enabled(training):
            if training or norm_cached:
                y = layer(x)
            else:
                y = dora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.magnitude,
                                layer.scaling, backend="triton", route=route)
        if training:
            current[0] = out["backward"] = LaunchCounts()
            dy = torch.empty_like(y)
            with _CountOps(current[0]):
                torch.autograd.grad(y, [x, layer.lora_A, layer.lora_B, layer.magnitude], dy)
    return out
