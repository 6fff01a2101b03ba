"""When the row norm n = ||W + s * B @ A|| may be reused, and when it must be computed afresh.

The norm must always be the norm of the *current* parameters. Tensor version counters cannot
prove that on their own: ``torch.optim``'s fused optimizers (``fused=True``, transformers'
default ``adamw_torch_fused``) update parameters without bumping them, and so can any code that
writes through ``.data`` or a custom kernel. The rules, from that:

- A training forward (grad enabled and weight, lora_A or lora_B requiring grad) always computes
  the norm, and drops any cached one. Nothing else is provably current while an optimizer may
  act on the adapters: one tiled pass over W per forward (2·r·out·in flops, r/M of the base
  GEMM's), whatever optimizer, accumulation or checkpointing scheme runs. The norm is
  deterministic, so a checkpoint's recomputed forward gets the same bits.
- Any other forward (eval, ``no_grad``, ``inference_mode``, frozen adapters) reuses the cached
  norm while its key holds: the identity, storage, version, dtype and shape of weight, lora_A
  and lora_B, the scaling, the adapter tag, and the count of ``torch.optim.Optimizer`` steps
  taken in this process (a global step hook, so fused steps count). Training forwards in
  between drop the entry, so an update by any optimizer that follows a training forward is seen.
  What remains unseen: writes that bypass version counters (``.data``, custom kernels) outside
  any ``torch.optim.Optimizer`` step and with no training forward since; call ``clear()`` then.
- Norms computed under ``inference_mode`` are inference tensors: they are reused only under
  ``inference_mode``, never saved for a later training step's backward.
"""
import weakref
from typing import Optional

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from .backend import functorch_active
from .functional import dora_weight_norm

_optimizer_steps = 0
_hook_handle = None


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def optimizer_step_count() -> int:
    """How many ``torch.optim.Optimizer`` steps this process has taken since the first cached norm."""
    global _hook_handle
    if _hook_handle is None:  # registered lazily: a process that never caches pays nothing
        _hook_handle = register_optimizer_step_post_hook(_count_optimizer_step)
    return _optimizer_steps


def version_stamp(t: torch.Tensor):
    """What identifies a tensor's current contents without reading them (None: untrackable)."""
    if t.is_inference():  # inference tensors have no version counter
        return None
    return (id(t), t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape))


def is_training_call(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> bool:
    """Whether an optimizer may update the norm's inputs after this forward (see module docstring)."""
    return torch.is_grad_enabled() and (weight.requires_grad or lora_A.requires_grad or lora_B.requires_grad)


class NormCache:
    """The detached row norm [out] of W + s * B @ A for one layer, reused by the rules above.

    ``get`` computes the norm with :func:`fused_dora.dora_weight_norm` on ``backend`` when the
    cached one cannot be proven current. While torch.compile traces, it is computed in-graph.
    """

    def __init__(self, norm_fn=None):
        self._entry = None  # (key, weakrefs of the keyed tensors, norm)
        # norm_fn(weight, lora_A, lora_B, scaling, backend) -> norm; None: dora_weight_norm. A
        # quantized weight's norm comes from fused_dora.qdora.weight_norm_of (weight: its Params4bit)
        self._norm_fn = norm_fn

    def clear(self) -> None:
        self._entry = None

    def __getstate__(self):  # pickled or copied layers recompute: the entry holds weak references
        return {"_entry": None, "_norm_fn": getattr(self, "_norm_fn", None)}

    def _compute(self, weight, lora_A, lora_B, scaling, backend) -> torch.Tensor:
        norm_fn = getattr(self, "_norm_fn", None) or dora_weight_norm
        return norm_fn(weight, lora_A, lora_B, scaling, backend)

    def get(self, weight, lora_A, lora_B, scaling: float, backend: str = "auto", tag=None) -> torch.Tensor:
        if torch.compiler.is_compiling() or functorch_active():  # no storages to key on while tracing
            return self._compute(weight, lora_A, lora_B, scaling, backend)
        if is_training_call(weight, lora_A, lora_B):
            self._entry = None
            return self._compute(weight, lora_A, lora_B, scaling, backend)
        tensors = (weight, lora_A, lora_B)
        stamps = tuple(version_stamp(t) for t in tensors)
        inference = torch.is_inference_mode_enabled()
        key = (tag, stamps, float(scaling), optimizer_step_count())
        hit = self._lookup(key, tensors, inference)
        if hit is not None:
            return hit
        norm = self._compute(weight, lora_A, lora_B, scaling, backend)
        if None not in stamps:
            self._entry = (key, tuple(weakref.ref(t) for t in tensors), norm)
        return norm

    def for_forward(self, weight, lora_A, lora_B, scaling: float, backend: str = "auto", tag=None):
        """The norm for a forward that passes it to :func:`fused_dora.dora_linear`, or None where
        dora_linear computes it itself (a training call, or while torch.compile or a torch.func
        transform traces): then the call checks its arguments and picks its backend once, not
        once for the norm and again for the layer. A training call drops the cached norm, as
        ``get`` does."""
        if torch.compiler.is_compiling() or functorch_active():
            return None
        if is_training_call(weight, lora_A, lora_B):
            self._entry = None
            return None
        return self.get(weight, lora_A, lora_B, scaling, backend, tag)

    def _lookup(self, key, tensors, inference: bool) -> Optional[torch.Tensor]:
        if self._entry is None:
            return None
        old_key, refs, norm = self._entry
        # id() alone could be reused by a new tensor: the weak references prove identity
        if old_key != key or any(ref() is not t for ref, t in zip(refs, tensors)):
            return None
        if norm.is_inference() and not inference:
            return None
        return norm
