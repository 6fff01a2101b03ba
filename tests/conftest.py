"""Without a GPU, run the Triton kernels through Triton's interpreter.

TRITON_INTERPRET must be set before triton is imported (it decides when kernels are
decorated); importing torch does not import triton.
"""
import math
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity at 1e-4 needs full fp32 GEMMs
torch.backends.cudnn.allow_tf32 = False

_INT_POISON = 0x5A5A5A5A  # fits every integer dtype but int8/uint8 (poisoned with -1 / 255 below)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill a fresh tensor with NaN (floating point) or a sentinel (integers), in place."""
    if t.layout != torch.strided or t.numel() == 0 or t.dtype == torch.bool:
        return t
    with torch.no_grad():
        if t.is_floating_point() or t.is_complex():
            t.fill_(math.nan)
        else:
            t.fill_(-1 if t.element_size() == 1 else _INT_POISON)
    return t


@pytest.fixture(autouse=True)
def nan_poisoned_allocations(monkeypatch):
    """Every torch.empty / empty_like / Tensor.new_empty returns NaN (floats) or a sentinel, as
    flash-linear-attention's tests do: an output tile or a split-reduction partial that a kernel
    never writes then fails a parity test instead of silently reading as zero."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: poison(new_empty(self, *a, **k)))
