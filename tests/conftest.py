"""Without a GPU, run the Triton kernels through Triton's interpreter.

TRITON_INTERPRET must be set before triton is imported (it decides when kernels are
decorated); importing torch does not import triton.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity at 1e-4 needs full fp32 GEMMs
torch.backends.cudnn.allow_tf32 = False
