"""Which path computes a call: the Triton kernels or the PyTorch reference, and why.

    load_kernels()            every kernel family imported (imports triton); fused_dora.kernels.tuning
    reference_reason(...)     None where the kernels run, else why the reference path does
    resolve_backend(...)      "triton" | "reference" for a call; raises where "triton" was forced
    version_reason(...)       why an installed triton (or its interpreter's numpy) cannot run the kernels

Nothing here imports triton until a kernel is needed.
"""
import os
import re
import sys
import warnings
from typing import Optional

import torch
from torch.autograd import forward_ad

BACKENDS = ("auto", "triton", "reference")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)


class FusedDoraWarning(UserWarning):
    """fused_dora runs, but not everywhere as fast as it could: the Triton kernels cannot be
    imported, or (enable_fused_dora) some PEFT DoRA layers run on PEFT's own path."""


def _import_kernels():
    """fused_dora.kernels.tuning, once every kernel family is imported (and registered)."""
    from .kernels import tuning

    tuning.tuned_kernels()
    return tuning


_kernels_module = None


def load_kernels():
    """fused_dora.kernels.tuning, with every kernel family imported on first use (they import triton).
    The compute code imports the launchers it calls from their families; this is the backend's check
    that they import at all, before a call relies on them."""
    global _kernels_module
    if _kernels_module is None:
        _kernels_module = _import_kernels()
    return _kernels_module


# (device type, TRITON_INTERPRET) -> None or why the kernels cannot run there. A plain dict, not
# functools.lru_cache: Dynamo warns about lru_cache-wrapped functions in traced code.
_DEVICE_REASONS = {}


@torch.compiler.assume_constant_result  # torch.compile calls it while tracing: the first call may import triton
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
    why, kernels = _installation_reason()
    if why is not None:
        # a device that should run the kernels: say so once, loudly, rather than run slowly in silence
        warnings.warn(f"fused_dora: {why}; the PyTorch reference path runs instead (same results, slower). "
                      "backend='triton' raises instead.", FusedDoraWarning, stacklevel=5)
        return why
    if device_type == "cpu" and not kernels.INTERPRET:
        return "triton was imported before TRITON_INTERPRET=1 was set, so kernels are compiled for a GPU"
    return None


def _installation_reason():
    """(why the installed triton, or the numpy its interpreter uses, cannot run the kernels, None),
    else (None, fused_dora.kernels.tuning)."""
    try:
        import triton

        why = version_reason(getattr(triton, "__version__", ""))
        if why is not None:  # checked first: an older triton may fail in importing the kernels
            return why, None
        kernels = load_kernels()
    except Exception as exc:  # noqa: BLE001 - any failure to import is reported, never swallowed
        return f"the Triton kernels cannot be imported ({type(exc).__name__}: {exc})", None
    if kernels.INTERPRET:
        numpy = sys.modules.get("numpy")  # imported by triton's interpreter
        why = version_reason(triton.__version__, getattr(numpy, "__version__", None))
    return why, (None if why else kernels)


# The oldest triton whose interpreter and compiler run the kernels (measured): pyproject.toml's bound.
MIN_TRITON = (3, 3)


def _major_minor(version: str) -> Optional[tuple]:
    """(3, 6) for '3.6.0', '3.6.0+git1a2b3c' or '3.6'; None where it does not start with two numbers."""
    found = re.match(r"(\d+)\.(\d+)", version)
    return (int(found[1]), int(found[2])) if found else None


def version_reason(triton_version: str, numpy_version: Optional[str] = None) -> Optional[str]:
    """Why this triton cannot run the kernels, or None. ``numpy_version``: that of the numpy
    Triton's interpreter runs on (None: the kernels are compiled). Unparsed versions pass."""
    triton_v, numpy_v = _major_minor(triton_version), _major_minor(numpy_version or "")
    if triton_v is not None and triton_v < MIN_TRITON:
        return f"triton {triton_version} is older than fused_dora supports (triton >= {MIN_TRITON[0]}.{MIN_TRITON[1]})"
    # Before 3.7 the interpreter makes an index of a 1-element array with int(array), which numpy
    # 2.4 refuses: "only 0-dimensional arrays can be converted to Python scalars".
    if triton_v is not None and triton_v < (3, 7) and numpy_v is not None and numpy_v >= (2, 4):
        return (f"Triton {triton_version}'s interpreter needs numpy < 2.4 (numpy {numpy_version} is installed; "
                "triton >= 3.7 takes numpy 2.4)")
    return None


def triton_available_for(device: torch.device) -> Optional[str]:
    """None if the Triton kernels can run on tensors of ``device``, else the reason why not."""
    return _device_reason(device.type, os.environ.get("TRITON_INTERPRET", "0"))


def functorch_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is tracing this call."""
    return bool(torch._C._are_functorch_transforms_active())


_FORWARD_AD = ("forward-mode AD (torch.autograd.forward_ad dual tensors) needs a jvp, which the Triton kernels "
               "do not have; backend='reference' (or 'auto') computes it")


def forward_ad_active(tensors) -> bool:
    """Whether any of ``tensors`` (None allowed) is a forward-mode AD dual tensor
    (torch.autograd.forward_ad), whose tangent the Triton kernels cannot propagate."""
    if forward_ad._current_level < 0:  # no dual_level() is open: nothing to unpack
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _unavailable(device: torch.device, dtype: torch.dtype, weight: Optional[torch.Tensor]):
    """(why the kernels cannot compute this call, the error a forced backend='triton' raises), or None."""
    why = _device_reason(device.type, os.environ.get("TRITON_INTERPRET", "0"))
    if why is not None:
        return why, ValueError
    if dtype == torch.float64:
        return "the Triton kernels do not take float64 tensors", TypeError
    if dtype == torch.bfloat16 and device.type == "cpu":
        return "Triton's interpreter cannot do bfloat16 arithmetic (triton-lang/triton#11584)", TypeError
    if functorch_active():
        return "torch.func transforms (grad, vmap, ...) cannot see inside the Triton kernels", NotImplementedError
    if weight is not None and weight.numel() >= 2**31:
        return "the weight has 2**31 elements or more (the kernels index its columns with 32 bits)", ValueError
    return None


def reference_reason(backend: str, device: torch.device, dtype: torch.dtype,
                     weight: Optional[torch.Tensor] = None, tensors: tuple = ()) -> Optional[str]:
    """None where ``backend`` runs the Triton kernels on ``dtype`` tensors of ``device`` (and this
    weight, and these call ``tensors``), else why the PyTorch reference path runs (or, for
    backend='triton', cannot)."""
    if backend == "reference":
        return "backend='reference'"
    found = _unavailable(device, dtype, weight)
    if found is None and forward_ad_active((weight,) + tuple(tensors)):
        return _FORWARD_AD
    return None if found is None else found[0]


def resolve_backend(backend: str, x: torch.Tensor, *tensors, weight: Optional[torch.Tensor] = None) -> str:
    """'triton' or 'reference' for a call on x (its device, the widest dtype among x and tensors).

    Where 'triton' was forced but cannot run: TypeError for a dtype (float64, bf16 under the
    interpreter), NotImplementedError under torch.func transforms, ValueError otherwise.
    """
    if backend == "reference":
        return "reference"
    dtype = torch.float64 if any(t is not None and t.dtype == torch.float64 for t in (x,) + tensors) else x.dtype
    found = _unavailable(x.device, dtype, weight)
    if found is None and forward_ad_active((x, weight) + tensors):
        found = (_FORWARD_AD, NotImplementedError)
    if found is None:
        return "triton"
    if backend == "triton":
        why, error = found
        raise error(f"backend='triton' cannot run here: {why}")
    return "reference"
