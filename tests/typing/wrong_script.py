"""The negative control for tests/test_typing.py: mypy must see this misuse through our signatures."""
import torch

from fused_dora import FusedDoraLinear

width: str = FusedDoraLinear(4, 4).weight_norm()  # line 6: a Tensor is no str
