"""fused_dora: DoRA (weight-decomposed low-rank adaptation) as cheap as plain LoRA.

Public API:
    FusedDoraLinear      drop-in nn.Linear with a DoRA adapter
    dora_linear          the functional op (Triton kernels or the PyTorch reference)
    dora_weight_norm     row norms of W + s * B @ A without a dense temporary
    reference            the pure-PyTorch statement of the math
"""
from . import reference
from .functional import dora_linear, dora_weight_norm
from .module import FusedDoraLinear

__version__ = "0.1.0"
__all__ = ["FusedDoraLinear", "dora_linear", "dora_weight_norm", "reference", "__version__"]
