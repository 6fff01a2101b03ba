"""FusedDoraLinear4bit: FusedDoraLinear over a bitsandbytes 4-bit base layer (QDoRA without PEFT).

``FusedDoraLinear.from_linear(bnb.nn.Linear4bit)`` and ``replace_linear`` build it; it shares the
Linear4bit's quantized weight (a Params4bit: NF4 / FP4, double quantization or not) and bias.
Forward and backward: fused_dora.qdora.dora_linear_4bit, in bitsandbytes' compute dtype (the
Linear4bit's ``compute_dtype``, else x's dtype), returning x's dtype as Linear4bit does.
"""
import warnings
from typing import Optional

import torch
import torch.nn as nn

from .module import FusedDoraLinear
from .norm_cache import NormCache
from .qdora import dora_linear_4bit, weight_norm_of
from .quantized import describe_4bit
from .reference import magnitude_scale


def _requantized(weight: nn.Parameter, values: torch.Tensor) -> nn.Parameter:
    """A new Params4bit holding ``values`` [out, in] quantized with ``weight``'s settings (quant type,
    blocksize, double quantization, storage), as PEFT's merge of a 4-bit layer does it."""
    import bitsandbytes as bnb

    return bnb.nn.Params4bit(values.to("cpu"), requires_grad=False, blocksize=weight.blocksize,
                             compress_statistics=weight.compress_statistics, quant_type=weight.quant_type,
                             quant_storage=weight.quant_storage).to(weight.device)


class FusedDoraLinear4bit(FusedDoraLinear):
    """y = magnitude / ||dequant(W) + s·B@A||_rows · (x @ dequant(W).T + s · B(A(dropout(x)))) + bias,
    W a bitsandbytes 4-bit weight [out, in] (a Params4bit, shared with the Linear4bit it came from).

    Build it with ``FusedDoraLinear.from_linear(linear4bit, ...)`` (or replace_linear). The row
    norm comes from the packed codes (kernels/quant_norm.py); the GEMMs from the weight
    dequantized by bitsandbytes (the composed route; fused_dora.qdora). ``merge()`` requantizes
    c · (W + s·B@A) into a new 4-bit weight as PEFT's merge does (rounding to 4 bits again) and
    keeps the original, so ``unmerge()`` restores it bit for bit; ``state_dict()`` holds the
    unmerged weight and its quant state under bitsandbytes' keys (``weight.absmax``, ...).
    """

    bnb_kind = "4bit"

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, *, adapter_dtype: Optional[torch.dtype] = None, backend: str = "auto",
                    route: Optional[str] = None) -> "FusedDoraLinear4bit":
        """Wrap a quantized ``bnb.nn.Linear4bit``: its weight and bias are shared (not copied) and frozen.
        ValueError with the reason for a weight the kernels cannot read (e.g. not quantized yet:
        move the layer to its device first, as bitsandbytes requires)."""
        packed, reason = describe_4bit(linear.weight, linear)
        if packed is None:
            raise ValueError(f"FusedDoraLinear.from_linear: cannot wrap this {type(linear).__name__}: {reason}")
        compute_dtype = getattr(linear, "compute_dtype", None)
        dtype = compute_dtype if compute_dtype is not None else packed.dtype
        layer = cls(linear.in_features, linear.out_features, r, lora_alpha, lora_dropout, linear.bias is not None,
                    use_rslora, device="meta", dtype=dtype, adapter_dtype=adapter_dtype, backend=backend, route=route)
        layer.compute_dtype = compute_dtype
        layer._norm_cache = NormCache(weight_norm_of)
        layer.weight = linear.weight
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
            layer.bias = linear.bias
        device = packed.device
        for name in ("lora_A", "lora_B", "magnitude"):
            meta = getattr(layer, name)
            setattr(layer, name, nn.Parameter(torch.empty(meta.shape, device=device, dtype=meta.dtype)))
        layer.train(linear.training)
        layer.reset_adapter()
        return layer

    def extra_repr(self) -> str:
        packed, reason = describe_4bit(self.weight)
        return super().extra_repr() + f", base={packed.describe() if packed is not None else reason!r}"

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        return self.compute_dtype if self.compute_dtype is not None else x.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features], in x's dtype (computed in the compute dtype)."""
        compute = self._compute_dtype(x)
        bias = self.bias
        if bias is not None and bias.dtype not in (compute, torch.float32):
            bias = bias.to(compute)
        if self.merged:
            import bitsandbytes as bnb

            return bnb.matmul_4bit(x.to(compute), self.weight.t(), bias=bias,
                                   quant_state=self.weight.quant_state).to(x.dtype)
        y = dora_linear_4bit(
            x.to(compute), self.weight, bias, self.lora_A, self.lora_B, self.magnitude, self.scaling,
            dropout_p=self.lora_dropout, training=self.training, backend=self.backend,
            norm=self._norm_cache.for_forward(self.weight, self.lora_A, self.lora_B, self.scaling, self.backend),
            route=self.route,
        )
        return y.to(x.dtype)

    # ---- merge: requantize, keep the original 4-bit weight ------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """weight <- quantize_4bit(c · (dequant(W) + s·B@A)) (fp32, then the quant state's dtype), as
        PEFT merges a 4-bit DoRA layer; forward becomes bitsandbytes' own 4-bit matmul. The
        original weight is kept for :meth:`unmerge`."""
        if self.merged:
            warnings.warn("FusedDoraLinear4bit.merge(): already merged; nothing done", stacklevel=2)
            return
        packed, reason = describe_4bit(self.weight)
        if packed is None:
            raise ValueError(f"FusedDoraLinear4bit.merge(): {reason}")
        mag_scale = magnitude_scale(self.magnitude, self.weight_norm())
        delta = self.scaling * (self.lora_B.float() @ self.lora_A.float())
        merged = (mag_scale[:, None] * (packed.dequantize(torch.float32) + delta)).to(packed.dtype)
        self._merge_state = {"weight": self.weight}
        self.weight = _requantized(self.weight, merged)
        self.merged = True

    def _unmerged_weight(self) -> torch.Tensor:
        return self._merge_state["weight"]

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the original 4-bit weight back (bit for bit: it was kept, not recomputed)."""
        if not self.merged:
            warnings.warn("FusedDoraLinear4bit.unmerge(): not merged; nothing done", stacklevel=2)
            return
        self.weight = self._merge_state["weight"]
        self.merged = False
        self._merge_state = None
        self.clear_norm_cache()

    # ---- state_dict: the quant state under bitsandbytes' keys -------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        weight = self._unmerged_weight() if self.merged else self.weight
        if weight is not None and getattr(weight, "quant_state", None) is not None:
            for k, v in weight.quant_state.as_dict(packed=True).items():
                destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        from bitsandbytes.functional import QuantState

        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        keys = [k for k in state_dict if k.startswith(prefix + "weight.")]
        if keys:
            qs = QuantState.from_dict({k[len(prefix + "weight."):]: state_dict[k] for k in keys},
                                      device=self.weight.device)
            self.weight.quant_state = qs
            for k in keys:
                if k in unexpected_keys:
                    unexpected_keys.remove(k)
        self.clear_norm_cache()
