"""Whole-model competitors: a Llama with random weights (nothing downloaded), adapted by PEFT
LoRA, PEFT DoRA, PEFT DoRA switched to fused_dora (enable_fused_dora), or fused_dora's
replace_linear; a registry like the layer competitors'. Both fused ones take route="fused" (the
kernels the targets judge); the routes are compared per layer (fused_composed, fused_auto)."""
from __future__ import annotations

import warnings
from typing import Callable, Dict

import torch

from .cases import MODEL_CONFIGS, ModelSpec
from .competitors import Unavailable


def fused_integrations() -> dict:
    """fused_dora's two ways into a model, or why each cannot load."""
    out = {}
    try:
        from fused_dora.integrations.peft import enable_fused_dora

        out["enable_fused_dora"] = enable_fused_dora
    except Exception as exc:  # not written yet, or peft missing
        out["enable_fused_dora_error"] = f"{type(exc).__name__}: {exc}"
    try:
        from fused_dora import replace_linear
    except Exception:
        try:
            from fused_dora.replace import replace_linear
        except Exception as exc:
            replace_linear = None
            out["replace_linear_error"] = f"{type(exc).__name__}: {exc}"
    if replace_linear is not None:
        out["replace_linear"] = replace_linear
    return out


def build_llama(spec: ModelSpec, dev: torch.device, dtype: torch.dtype):
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as exc:
        raise Unavailable(f"transformers not installed ({exc})") from None
    cfg = LlamaConfig(**MODEL_CONFIGS[spec.config], attention_dropout=0.0, use_cache=False)
    try:
        cfg._attn_implementation = "sdpa"
    except Exception:
        pass
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.to(dtype)
    if spec.grad_ckpt:  # non-reentrant activation checkpointing of every decoder layer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                on = model.is_activation_checkpointing
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                on = model.is_gradient_checkpointing
        if not on:
            raise RuntimeError("gradient checkpointing did not switch on")
    model.train()
    return model, cfg


def _peft_model(name: str, model, spec: ModelSpec, dev: torch.device, integ: dict):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise Unavailable(f"peft not installed ({exc})") from None
    if name == "fused_peft" and "enable_fused_dora" not in integ:
        raise Unavailable("fused_dora.integrations.peft.enable_fused_dora not available "
                          f"({integ.get('enable_fused_dora_error', '?')})")
    lcfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(spec.targets),
                      use_dora=name != "peft_lora", bias="none")
    with warnings.catch_warnings(), torch.device(dev):  # adapters made on the GPU directly
        warnings.simplefilter("ignore")
        model = get_peft_model(model, lcfg)
        if name == "fused_peft":
            n = integ["enable_fused_dora"](model, route="fused")
            if not n:
                raise RuntimeError("enable_fused_dora switched no layer")
    return model


def _replaced_model(name: str, model, spec: ModelSpec, dev: torch.device, integ: dict):
    if "replace_linear" not in integ:
        raise Unavailable(f"fused_dora.replace_linear not available ({integ.get('replace_linear_error', '?')})")
    model.requires_grad_(False)
    n = integ["replace_linear"](model, list(spec.targets), r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                                route="fused")
    if not n:
        raise RuntimeError("replace_linear replaced no module")
    from fused_dora import FusedDoraLinear

    for mod in model.modules():
        if isinstance(mod, FusedDoraLinear):
            for p in (mod.lora_A, mod.lora_B, mod.magnitude):
                p.requires_grad_(True)
    return model


# name -> adapt(name, model, spec, dev, integrations) -> the adapted model; run in this order
MODEL_COMPETITORS: Dict[str, Callable] = {
    "peft_lora": _peft_model,
    "peft_dora": _peft_model,
    "fused_peft": _peft_model,
    "fused_replace": _replaced_model,
}


def make_model_competitor(name: str, spec: ModelSpec, dev: torch.device, dtype: torch.dtype, integ: dict):
    """(model adapted as `name` does it, its LlamaConfig), lora_B non-zero."""
    model, cfg = build_llama(spec, dev, dtype)
    model = MODEL_COMPETITORS[name](name, model, spec, dev, integ)
    with torch.no_grad():  # lora_B non-zero (PEFT and replace_linear start it at zero)
        g = torch.Generator(device=dev).manual_seed(7)
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.copy_(torch.randn(p.shape, generator=g, device=dev, dtype=torch.float32).mul_(1e-3).to(p.dtype))
    return model, cfg


