"""FusedDoraLinear: a drop-in nn.Linear with a DoRA adapter, served by the fused kernels."""
import math
import warnings
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .functional import dora_linear
from .norm_cache import NormCache
from .quantized import bnb_kind
from .reference import magnitude_scale
from .routes import check_route, route_name
from .validation import check_adapter_hparams, check_backend, check_positive_int


def _default_adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    # as PEFT does by default: adapters of a half-precision base are kept in fp32
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _save_unmerged_weight(module, state_dict, prefix, local_metadata):
    """state_dict hook: a merged layer is saved with its unmerged base weight."""
    if module.merged and prefix + "weight" in state_dict:
        with torch.no_grad():
            state_dict[prefix + "weight"] = module._unmerged_weight()
    return state_dict


def _unmerge_before_load(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                         error_msgs):
    """load_state_dict pre-hook: a checkpoint holds the unmerged weight (see _save_unmerged_weight),
    so a merged layer is unmerged first and merged again after loading (_remerge_after_load)."""
    if module.merged:
        module.unmerge()
        # with load_state_dict(assign=True) the weight becomes the caller's tensor, which the
        # re-merge must not write into: note it, so the merge runs on a copy
        module._remerge_after_load = "copy" if local_metadata.get("assign_to_params_buffers", False) else "in place"


def _remerge_after_load(module, incompatible_keys) -> None:
    how = module.__dict__.pop("_remerge_after_load", None)
    if how == "copy":
        module.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=module.weight.requires_grad)
    if how is not None:
        module.merge()


class FusedDoraLinear(nn.Module):
    """y = magnitude / ||W + s*B@A||_rows * (x @ W.T + s * B(A(dropout(x)))) + bias.

    Parameters: ``weight`` [out, in] and ``bias`` [out] (frozen), ``lora_A`` [r, in],
    ``lora_B`` [out, r], ``magnitude`` [out] (trainable). ``scaling`` = lora_alpha / r, or
    lora_alpha / sqrt(r) with ``use_rslora``. A fresh layer computes exactly its base Linear
    (lora_B = 0, magnitude = row norms of weight).

    Adapters are created in ``adapter_dtype`` (default: fp32 for a half-precision ``dtype``,
    as PEFT does, else ``dtype``). ``backend`` and ``route`` (an attribute too, which may be set
    at any time; None: FUSED_DORA_ROUTE, else "auto") are passed to :func:`fused_dora.dora_linear`.

    The row norm is computed in every training forward (whatever optimizer updates the
    adapters, the norm is the current one) and cached for other forwards (eval, no_grad) while
    weight, lora_A, lora_B and scaling are provably unchanged: see :mod:`fused_dora.norm_cache`.
    Writes through ``.data`` outside a ``torch.optim`` step and followed by no training forward
    are not seen by that cache: call :meth:`clear_norm_cache` after those.

    A merged layer (:meth:`merge`) stays usable through ``.to()`` / ``.half()`` (it is unmerged,
    cast and merged again), ``state_dict()`` (it holds the unmerged weight) and
    ``load_state_dict()`` (the checkpoint's DoRA function is loaded, then merged again).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        bias: bool = True,
        use_rslora: bool = False,
        device: Optional[Union[torch.device, str, int]] = None,
        dtype: Optional[torch.dtype] = None,
        *,
        adapter_dtype: Optional[torch.dtype] = None,
        backend: str = "auto",
        route: Optional[str] = None,
    ) -> None:
        super().__init__()
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        check_adapter_hparams(r, lora_alpha, lora_dropout, use_rslora)
        check_backend(backend)
        if route is not None:
            check_route(route)
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        adapter_dtype = adapter_dtype if adapter_dtype is not None else _default_adapter_dtype(dtype)
        for name, value in (("dtype", dtype), ("adapter_dtype", adapter_dtype)):
            if not isinstance(value, torch.dtype) or not value.is_floating_point:
                raise TypeError(f"{name} must be a floating-point torch.dtype, got {value!r}")
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.lora_alpha, self.lora_dropout, self.use_rslora = float(lora_alpha), float(lora_dropout), use_rslora
        self.scaling = self.lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.backend = backend
        self.route = route
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype),
                                   requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=adapter_dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=adapter_dtype))
        self.magnitude = nn.Parameter(torch.empty(out_features, device=device, dtype=adapter_dtype))
        self.merged = False
        self._norm_cache = NormCache()
        self._merge_state = None
        self._register_state_dict_hook(_save_unmerged_weight)
        self._register_load_state_dict_pre_hook(_unmerge_before_load, with_module=True)
        self.register_load_state_dict_post_hook(_remerge_after_load)
        self.reset_parameters()

    # ---- construction -------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Base weight and bias as nn.Linear initialises them, then :meth:`reset_adapter`."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1 / math.sqrt(self.in_features)
                nn.init.uniform_(self.bias, -bound, bound)
        self.reset_adapter()

    def reset_adapter(self) -> None:
        """lora_A Kaiming-uniform (as PEFT), lora_B zeros, magnitude = row norms of weight.

        The magnitude comes from the same norm routine the forward uses, so a fresh layer has
        magnitude / norm == 1 exactly and computes its base Linear.
        """
        if self.merged:
            raise RuntimeError("reset_adapter() on a merged layer: call unmerge() first")
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        self.clear_norm_cache()
        if self.weight.is_meta:  # nothing to compute yet (from_linear builds on the meta device)
            return
        with torch.no_grad():
            self.magnitude.copy_(self.weight_norm())

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        *,
        adapter_dtype: Optional[torch.dtype] = None,
        backend: str = "auto",
        route: Optional[str] = None,
    ) -> "FusedDoraLinear":
        """Wrap ``linear``: its weight and bias are shared (not copied) and frozen. A bitsandbytes
        4-bit ``Linear4bit`` gives a FusedDoraLinear4bit (fused_dora.qmodule)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        kind = bnb_kind(linear)
        if kind is not None and cls is FusedDoraLinear:  # a bitsandbytes base: the subclass serving it
            served = next((c for c in cls.__subclasses__() if getattr(c, "bnb_kind", None) == kind), None)
            if served is None:
                raise TypeError(f"{type(linear).__name__} (bitsandbytes {kind}) bases are not served by "
                                "FusedDoraLinear; PEFT's layers over them are (integrations.peft.enable_fused_dora)")
            return served.from_linear(linear, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype=adapter_dtype,
                                      backend=backend, route=route)
        w = linear.weight
        # built on the meta device, so no throwaway weight is allocated or initialised
        layer = cls(linear.in_features, linear.out_features, r, lora_alpha, lora_dropout, linear.bias is not None,
                    use_rslora, device="meta", dtype=w.dtype, adapter_dtype=adapter_dtype, backend=backend,
                    route=route)
        w.requires_grad_(False)
        layer.weight = w
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
            layer.bias = linear.bias
        for name in ("lora_A", "lora_B", "magnitude"):
            meta = getattr(layer, name)
            setattr(layer, name, nn.Parameter(torch.empty(meta.shape, device=w.device, dtype=meta.dtype)))
        layer.train(linear.training)
        layer.reset_adapter()
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha:g}, lora_dropout={self.lora_dropout:g}, scaling={self.scaling:g}, "
                f"bias={self.bias is not None}, merged={self.merged}, backend={self.backend!r}, "
                f"route={route_name(getattr(self, 'route', None))!r}")

    # ---- the norm cache -----------------------------------------------------------------
    def clear_norm_cache(self) -> None:
        self._norm_cache.clear()

    def weight_norm(self) -> torch.Tensor:
        """n [out] fp32, detached: ||weight + scaling * lora_B @ lora_A|| per row, cached."""
        return self._norm_cache.get(self.weight, self.lora_A, self.lora_B, self.scaling, self.backend)

    def _apply(self, fn, *args, **kwargs):
        self.clear_norm_cache()  # .to() / .cuda() / .half() move or recast the parameters
        if not self.merged:
            return super()._apply(fn, *args, **kwargs)
        # a cast rounds the merged weight and the adapters apart, after which the base weight
        # could no longer be recovered: move or cast the unmerged layer, then merge it again
        self.unmerge()
        try:
            return super()._apply(fn, *args, **kwargs)
        finally:
            self.merge()

    # ---- forward, merge -----------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features], in x's dtype."""
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return dora_linear(
            x, self.weight, self.bias, self.lora_A, self.lora_B, self.magnitude, self.scaling,
            dropout_p=self.lora_dropout, training=self.training, backend=self.backend,
            norm=self._norm_cache.for_forward(self.weight, self.lora_A, self.lora_B, self.scaling, self.backend),
            route=getattr(self, "route", None),  # layers pickled before routes existed have none
        )

    def _adapter_fingerprint(self) -> torch.Tensor:
        """Content summary of the adapters (fp64 sums and sums of squares, and scaling).

        Compared by value, so it survives deepcopy, torch.save and device moves, and notices
        writes that bypass version counters.
        """
        parts = [torch.stack([p.double().sum(), p.double().square().sum()]).cpu()
                 for p in (self.lora_A, self.lora_B, self.magnitude)]
        return torch.cat(parts + [torch.tensor([self.scaling], dtype=torch.float64)])

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into weight: W <- c * (W + s * B @ A) (fp32, then weight's dtype).

        Afterwards forward is a plain F.linear. The adapters stay; :meth:`unmerge` restores W.
        ``state_dict()`` of a merged layer holds the unmerged weight, so a checkpoint always
        loads as an unmerged layer that computes the same function.
        """
        if self.merged:
            warnings.warn("FusedDoraLinear.merge(): already merged; nothing done", stacklevel=2)
            return
        w = self.weight
        mag_scale = magnitude_scale(self.magnitude, self.weight_norm())  # fp32 [out]
        delta = self.scaling * (self.lora_B.float() @ self.lora_A.float())
        # rows with mag_scale == 0 cannot be divided back out in unmerge(): keep them verbatim
        lost = (mag_scale == 0).nonzero().flatten()
        self._merge_state = {
            "mag_scale": mag_scale, "lost_rows": lost, "lost_values": w[lost].clone(),
            "adapters": self._adapter_fingerprint(),
        }
        w.copy_((mag_scale[:, None] * (w.float() + delta)).to(w.dtype))
        self.merged = True

    def _unmerged_weight(self) -> torch.Tensor:
        """The base weight recovered from the merged one, in weight's dtype."""
        st = self._merge_state
        if not torch.allclose(st["adapters"], self._adapter_fingerprint(), rtol=1e-6, atol=0):
            raise RuntimeError("unmerge(): lora_A, lora_B, magnitude or scaling changed since merge(); "
                               "the base weight cannot be recovered from the merged one")
        w = self.weight.detach()
        delta = self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())
        mag_scale = st["mag_scale"].to(w.device, torch.float32)
        safe = torch.where(mag_scale == 0, torch.ones_like(mag_scale), mag_scale)
        restored = w.float() / safe[:, None] - delta
        restored[st["lost_rows"].to(w.device)] = st["lost_values"].to(w.device).float()
        return restored.to(w.dtype)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight merged by :meth:`merge` (within weight's dtype rounding)."""
        if not self.merged:
            warnings.warn("FusedDoraLinear.unmerge(): not merged; nothing done", stacklevel=2)
            return
        self.weight.copy_(self._unmerged_weight())
        self.merged = False
        self._merge_state = None
