"""fused_dora: DoRA (weight-decomposed low-rank adaptation) as cheap as plain LoRA.

Public API:
    FusedDoraLinear      drop-in nn.Linear with a DoRA adapter
    FusedDoraLinear4bit  the same over a bitsandbytes 4-bit Linear4bit (QDoRA; from_linear builds it)
    dora_linear          the functional op (Triton kernels or the PyTorch reference)
    dora_weight_norm     row norms of W + s * B @ A without a dense temporary
    reference            the pure-PyTorch statement of the math
    routes               how the big GEMMs run ("fused" / "composed" / "auto") and what "auto" chose
    replace_linear       swap targeted nn.Linear modules of any model for FusedDoraLinear
    save_adapter / load_adapter   PEFT-compatible adapter files for replace_linear models

    FusedDoraWarning     warned once where the Triton kernels should run but cannot be imported

PEFT models: fused_dora.integrations.peft.enable_fused_dora(model) (needs the `peft` extra).
Importing fused_dora registers the torch.library ops (fused_dora::dora_fwd, ...); triton is
imported only when a kernel first runs.
"""
import pathlib as _pathlib

from . import reference, routes
from .backend import FusedDoraWarning
from .functional import dora_linear, dora_weight_norm
from .module import FusedDoraLinear
from .qmodule import FusedDoraLinear4bit
from .replace import load_adapter, replace_linear, save_adapter

# The Triton kernels are the top-level kernels/ folder of the repository, shipped as
# fused_dora.kernels (pyproject.toml maps it). In a source checkout that is imported without being
# installed, the folder sits beside this package: the checkout's root joins the package's path
# (nothing above imports the kernels: triton is imported only when a kernel first runs), so
# `from fused_dora.kernels.forward import dora_forward` is an ordinary import there too. kernels/
# has no __init__.py, so a checkout on sys.path never hides another distribution's `kernels`.
_checkout = _pathlib.Path(__file__).resolve().parent.parent
if (_checkout / "kernels" / "tuning.py").is_file() and (_checkout / "pyproject.toml").is_file():
    __path__.append(str(_checkout))

__version__ = "0.1.0"
__all__ = ["FusedDoraLinear", "FusedDoraLinear4bit", "FusedDoraWarning", "dora_linear", "dora_weight_norm",
           "reference", "routes", "replace_linear", "save_adapter", "load_adapter", "__version__"]
