"""The competitors of a layer case, in a registry: each builds, from the case's tensors, the call
the runner times (x -> y; in norm mode () -> the row norm), its trainable parameters and the
tensors it owns (never counted as saved for backward or as temporaries).

To add one: describe it in COMPETITORS, list it in MODE_COMPETITORS for the modes it runs in, and
register a builder ``(data, name, norm_per_step) -> Competitor`` with ``@_registers(LAYER_BUILDERS,
name)`` and/or a norm-mode call ``(data, A, B) -> fn`` with ``@_registers(NORM_CALLS, name)``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cases import Case
from .inputs import CaseData, make_data, quant_tensors
from .instruments import storage_key

COMPETITORS = {
    "floor": "F.linear (cuBLAS); training: forward + input gradient, weight frozen",
    "peft_lora": "PEFT lora.Linear",
    "peft_dora": "PEFT lora.Linear, use_dora=True",
    "peft_dora_cached": "PEFT DoRA under peft.helpers.DoraCaching (inference)",
    "eager_dense": "eager DoRA, dense B@A formed once per call (torchtune/axolotl style)",
    "ref_eager": "fused_dora reference path (eager)",
    "ref_compile": "fused_dora reference path under torch.compile",
    "fused": "fused_dora Triton path, route=\"fused\": Triton GEMMs with the DoRA work inside (the targets judge it)",
    "fused_composed": "fused_dora, route=\"composed\": cuBLAS (torch.mm) for the two big GEMMs, Triton passes around",
    "fused_auto": "fused_dora, route=\"auto\": the faster route, timed on first use per shape (the report says which)",
    "fused_4bit": "QDoRA cases only: fused_dora.FusedDoraLinear4bit over the Linear4bit (no PEFT)",
    # norm mode only
    "linear_fwd": "F.linear forward at --norm-fwd-tokens tokens (what 'a forward' costs)",
}
MODE_COMPETITORS = {
    "norm": ["floor", "linear_fwd", "peft_dora", "eager_dense", "ref_eager", "fused"],
    "infer": ["floor", "peft_lora", "peft_dora", "peft_dora_cached", "eager_dense", "ref_eager", "ref_compile", "fused",
              "fused_composed", "fused_auto"],
    "merged": ["floor", "peft_lora", "peft_dora", "fused"],  # merged: F.linear on the merged W, no route to take
    "train0": ["floor", "peft_lora", "peft_dora", "eager_dense", "ref_eager", "ref_compile", "fused", "fused_composed",
               "fused_auto"],
    "train05": ["floor", "peft_lora", "peft_dora", "eager_dense", "ref_eager", "ref_compile", "fused", "fused_composed",
                "fused_auto"],
}
ROUTES = {"fused": "fused", "fused_composed": "composed", "fused_auto": "auto"}  # competitor -> fused_dora route

# QDoRA cases (Case.quant): the same names over a bitsandbytes Linear4bit base, so the ratios and
# speedups of the report read the same way (x_peft_dora = over PEFT QDoRA, x_peft_lora = over QLoRA)
QDORA_COMPETITORS = {
    "floor": "bitsandbytes Linear4bit alone (its dequantize + matmul); training: + input gradient",
    "peft_lora": "PEFT QLoRA: lora.bnb.Linear4bit, use_dora=False",
    "peft_dora": "PEFT QDoRA: lora.bnb.Linear4bit, use_dora=True (dequantizes W and forms B@A per forward)",
    "fused": "enable_fused_dora over the PEFT QDoRA layer (norm mode: dora_weight_norm_4bit, packed codes)",
    "fused_4bit": "FusedDoraLinear4bit over the Linear4bit (no PEFT)",
}
_QDORA_LAYER = ["floor", "peft_lora", "peft_dora", "fused", "fused_4bit"]
QDORA_MODE_COMPETITORS = {"norm": ["floor", "peft_dora", "fused"], "infer": _QDORA_LAYER, "train0": _QDORA_LAYER,
                          "train05": _QDORA_LAYER}


def competitors_for(case: Case) -> list:
    """The competitors of a case's mode, in run order (QDoRA cases have their own list)."""
    return (QDORA_MODE_COMPETITORS if case.quant else MODE_COMPETITORS)[case.mode]


class Unavailable(Exception):
    """A competitor that cannot run here (missing package or feature): recorded as skipped."""


@dataclasses.dataclass
class Competitor:
    name: str
    fwd: Callable  # x -> y (layer modes) or () -> norm (norm mode)
    params: list  # trainable parameters (grads reset every step)
    frozen: list  # other tensors owned by the competitor (excluded from "saved bytes")
    pre_step: Optional[Callable] = None  # runs at the start of every training step
    context: Callable = contextlib.nullcontext
    traceable: bool = True  # saved_tensors_hooks / dispatch-mode figures are meaningful
    kept: Callable[[], list] = list  # state kept between calls (not "saved for backward"); see saved_bytes
    computes_dora: bool = True  # output comparable with the DoRA reference
    note: str = ""
    extra: Callable[[], dict] = dict  # figures added to its results after it ran (fused_auto: the routes chosen)

    def owned_storages(self) -> set:
        """Storages of its parameters and frozen tensors: never counted as saved or as temporaries."""
        return {storage_key(t)[0] for t in self.params + self.frozen}


# name -> builder(data, name, norm_per_step) -> Competitor, for the modes infer, merged, train*
LAYER_BUILDERS: Dict[str, Callable[[CaseData, str, bool], Competitor]] = {}
# name -> make(data, A, B) -> fn(): the row norm of W + s * B @ A as that implementation computes it
NORM_CALLS: Dict[str, Callable[[CaseData, torch.Tensor, torch.Tensor], Callable[[], torch.Tensor]]] = {}
# the same two tables for the QDoRA cases (a bitsandbytes 4-bit base weight, data.qweight)
QUANT_LAYER_BUILDERS: Dict[str, Callable[[CaseData, str, bool], Competitor]] = {}
QUANT_NORM_CALLS: Dict[str, Callable[[CaseData, torch.Tensor, torch.Tensor], Callable[[], torch.Tensor]]] = {}


def _registers(table: dict, *names: str):
    def register(fn):
        for name in names:
            table[name] = fn
        return fn
    return register


def build_competitor(name: str, data: CaseData, norm_per_step: bool = True) -> Competitor:
    quant = bool(data.case.quant)
    if quant and data.qweight is None:
        raise Unavailable(data.quant_missing or "no 4-bit weight")
    if data.case.mode == "norm":
        make = (QUANT_NORM_CALLS if quant else NORM_CALLS).get(name)
        if make is None:
            raise Unavailable(f"{name} has no norm-mode variant")
        A, B = data.A.to(data.ad), data.B.to(data.ad)
        return Competitor(name, make(data, A, B), [], [data.W, A, B] + quant_tensors(data.qweight))
    build = (QUANT_LAYER_BUILDERS if quant else LAYER_BUILDERS).get(name)
    if build is None:
        raise ValueError(f"unknown competitor {name!r}")
    return build(data, name, norm_per_step)


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------
class _Holder(nn.Module):
    """A one-Linear model for get_peft_model."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.proj = lin

    def forward(self, x):
        return self.proj(x)


def linear_sharing(W: nn.Parameter) -> nn.Linear:
    """A bias-free nn.Linear whose weight is W itself."""
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False, device="meta")
    lin.weight = W
    return lin


def _weight_for(data: CaseData) -> nn.Parameter:
    """merge() writes into W: in merged mode every competitor gets its own copy."""
    if data.case.mode == "merged":
        return nn.Parameter(data.W.detach().clone(), requires_grad=False)
    return data.W


def set_param(p: nn.Parameter, value: torch.Tensor, dtype: torch.dtype) -> None:
    p.data = value.detach().to(device=p.device, dtype=dtype).clone()


def _require_triton(dev: torch.device) -> None:
    from fused_dora.backend import triton_available_for

    why = triton_available_for(dev)
    if why:
        raise Unavailable(f"Triton path cannot run here: {why}")


def build_peft_layer(data: CaseData, use_dora: bool, W: Optional[nn.Parameter] = None):
    """(PEFT lora.Linear over W with the case's adapters, W)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise Unavailable(f"peft not installed ({exc})") from None
    c = data.case
    W = W if W is not None else _weight_for(data)
    cfg = LoraConfig(r=c.r, lora_alpha=c.alpha, lora_dropout=c.p, target_modules=["proj"], use_dora=use_dora,
                     bias="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(_Holder(linear_sharing(W)), cfg, autocast_adapter_dtype=(data.ad == torch.float32))
    layer = pm.base_model.model.proj
    set_param(layer.lora_A["default"].weight, data.A, data.ad)
    set_param(layer.lora_B["default"].weight, data.B, data.ad)
    if use_dora:
        set_param(layer.lora_magnitude_vector["default"].weight, data.mag, data.ad)
    layer.train(c.training)
    return layer, W


# ---------------------------------------------------------------------------------------------
# Layer modes
# ---------------------------------------------------------------------------------------------
@_registers(LAYER_BUILDERS, "floor")
def _floor(data: CaseData, name: str, norm_per_step: bool) -> Competitor:
    W = _weight_for(data)
    return Competitor("floor", lambda x: F.linear(x, W), [], [W], computes_dora=False)


@_registers(LAYER_BUILDERS, "peft_lora", "peft_dora", "peft_dora_cached")
def _peft(data: CaseData, name: str, norm_per_step: bool) -> Competitor:
    use_dora = name != "peft_lora"
    layer, W = build_peft_layer(data, use_dora)
    context = contextlib.nullcontext
    if name == "peft_dora_cached":
        try:
            from peft.helpers import DoraCaching
        except ImportError:
            raise Unavailable("this PEFT has no peft.helpers.DoraCaching") from None
        context = DoraCaching
    if data.case.mode == "merged":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer.merge()
    params = [p for p in layer.parameters() if p.requires_grad]
    frozen = [p for p in layer.parameters() if not p.requires_grad] + [W]
    return Competitor(name, layer, params, frozen, context=context, computes_dora=use_dora)


class EagerDenseDora(nn.Module):
    """DoRA in plain PyTorch, the torchtune / axolotl way: the dense B @ A once per call.

    One base GEMM (y = c * (x W^T + s * B(A(dropout(x))))), the norm in fp32 from the dense
    W + s * B @ A (detached), the LoRA GEMMs in the activation dtype. A stronger baseline than
    PEFT's, which forms B @ A by pushing an identity matrix through both adapters.
    """

    def __init__(self, W, A, B, mag, scaling, p):
        super().__init__()
        self.weight = W
        self.lora_A, self.lora_B, self.magnitude = nn.Parameter(A), nn.Parameter(B), nn.Parameter(mag)
        self.scaling = scaling
        self.dropout = nn.Dropout(p) if p > 0 else nn.Identity()

    def forward(self, x):
        dt = x.dtype
        A, B = self.lora_A.to(dt), self.lora_B.to(dt)
        with torch.no_grad():
            dense = self.weight + self.scaling * (B @ A)  # [N, K] temporary, once per call
            norm = torch.linalg.vector_norm(dense, dim=1, dtype=torch.float32)
            del dense
        c = (self.magnitude / norm).to(dt)
        y = F.linear(x, self.weight) + self.scaling * F.linear(F.linear(self.dropout(x), A), B)
        return c * y


@_registers(LAYER_BUILDERS, "eager_dense")
def _eager(data: CaseData, name: str, norm_per_step: bool) -> Competitor:
    c = data.case
    W = _weight_for(data)
    layer = EagerDenseDora(W, data.A.to(data.ad).clone(), data.B.to(data.ad).clone(), data.mag.to(data.ad).clone(),
                           c.scaling, c.p).train(c.training)
    return Competitor("eager_dense", layer, [layer.lora_A, layer.lora_B, layer.magnitude], [W])


def _fused_layer(data: CaseData, backend: str, route: Optional[str] = None):
    from fused_dora import FusedDoraLinear

    c = data.case
    W = _weight_for(data)
    # backend "auto" while building (the layer is first made on the meta device), then the one asked for
    layer = FusedDoraLinear.from_linear(linear_sharing(W), r=c.r, lora_alpha=c.alpha, lora_dropout=c.p,
                                        adapter_dtype=data.ad, backend="auto", route=route)
    layer.backend = backend
    set_param(layer.lora_A, data.A, data.ad)
    set_param(layer.lora_B, data.B, data.ad)
    set_param(layer.magnitude, data.mag, data.ad)
    layer.clear_norm_cache()
    layer.train(c.training)
    return layer, W


@_registers(LAYER_BUILDERS, "ref_eager", *ROUTES)
def _fused(data: CaseData, name: str, norm_per_step: bool) -> Competitor:
    backend = "triton" if name in ROUTES else "reference"
    if backend == "triton":
        _require_triton(data.dev)
    layer, W = _fused_layer(data, backend, ROUTES.get(name))
    if data.case.mode == "merged":
        layer.merge()
    params = [layer.lora_A, layer.lora_B, layer.magnitude]
    pre = layer.clear_norm_cache if (data.case.training and norm_per_step) else None
    extra = (lambda: {"auto_route": auto_choice(data)}) if name == "fused_auto" else dict
    # the norm [N] the layer caches (and reuses until the next optimizer step) is also what its
    # backward reads: the cache, not the saving, keeps it alive
    return Competitor(name, layer, params, [W], pre_step=pre, kept=lambda: [layer.weight_norm()], extra=extra)


def auto_choice(data: CaseData) -> dict:
    """The routes "auto" took for this case, {"forward": route[, "backward": route]}, from
    fused_dora.routes' choices: "fused (untimed)" where auto does not time (fp16 activations, for
    one), "?" where no choice is recorded (an error, or a key that changed)."""
    from fused_dora import routes

    c, x = data.case, data.xs[0]

    def took(direction: str, store_q: bool) -> str:
        # the case the drivers pass: a training forward stores q; a backward forms dx
        case = routes.RouteCase(direction, x.device, data.act, data.ad, c.M, c.N, c.K, c.r, c.p > 0, store_q)
        chosen = routes.route_choices().get(case.key())
        if chosen is None and case.untimed_reason():
            return "fused (untimed)"
        return chosen or "?"

    out = {"forward": took("forward", c.training)}
    if c.training:
        out["backward"] = took("backward", False)
    return out


_COMPILED = {}


def _make_reference_fn():
    from fused_dora import reference

    def reference_fn(x, W, A, B, mag, norm, scaling: float, p: float, training: bool):
        return reference.dora_linear(x, W, None, A, B, mag, scaling, p, training=training, norm=norm)

    return reference_fn


@_registers(LAYER_BUILDERS, "ref_compile")
def _compiled(data: CaseData, name: str, norm_per_step: bool) -> Competitor:
    if data.dev.type != "cuda" and not os.environ.get("BENCH_COMPILE_BACKEND"):
        raise Unavailable("torch.compile is measured on a GPU only")
    from fused_dora import reference

    c = data.case
    if "fn" not in _COMPILED:  # one compiled function for the whole run: its graphs are reused
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
        _COMPILED["fn"] = torch.compile(_make_reference_fn(),
                                        backend=os.environ.get("BENCH_COMPILE_BACKEND", "inductor"))
    fn = _COMPILED["fn"]
    W = _weight_for(data)
    A, B, mag = (nn.Parameter(t.to(data.ad).clone()) for t in (data.A, data.B, data.mag))
    # training: the norm is computed inside every call (once per step); inference: once, up front
    norm = None if c.training else reference.weight_norm(W, A, B, c.scaling).float()
    s, p, tr = c.scaling, c.p, c.training
    fwd = lambda x: fn(x, W, A, B, mag, norm, s, p, tr)  # noqa: E731
    return Competitor("ref_compile", fwd, [A, B, mag], [W], traceable=False)


# ---------------------------------------------------------------------------------------------
# Norm mode: the call computes the row norm of W + s * B @ A, as each implementation does it
# ---------------------------------------------------------------------------------------------
@_registers(NORM_CALLS, "fused")
def _fused_norm(data: CaseData, A: torch.Tensor, B: torch.Tensor):
    from fused_dora import dora_weight_norm

    _require_triton(data.dev)
    W, s = data.W, data.case.scaling
    return lambda: dora_weight_norm(W, A, B, s, backend="triton")


@_registers(NORM_CALLS, "peft_dora")
def _peft_norm(data: CaseData, A: torch.Tensor, B: torch.Tensor):
    W, s = data.W, data.case.scaling
    layer, _ = build_peft_layer(data, True, W)
    dora = layer.lora_magnitude_vector["default"]
    la, lb = layer.lora_A["default"], layer.lora_B["default"]

    def fn():  # what PEFT's DoRA forward does for the norm (no adapter_name: never cached)
        lora_weight = dora.get_lora_weight(lora_A=la, lora_B=lb).to(data.act)
        return dora.get_weight_norm(weight=W.to(data.act), lora_weight=lora_weight.detach(), scaling=s)
    return fn


@_registers(NORM_CALLS, "eager_dense")
def _eager_norm(data: CaseData, A: torch.Tensor, B: torch.Tensor):
    W, s = data.W, data.case.scaling
    return lambda: torch.linalg.vector_norm(W + s * (B.to(data.act) @ A.to(data.act)), dim=1, dtype=torch.float32)


@_registers(NORM_CALLS, "ref_eager")
def _reference_norm(data: CaseData, A: torch.Tensor, B: torch.Tensor):
    from fused_dora import reference

    W, s = data.W, data.case.scaling
    return lambda: reference.weight_norm(W, A, B, s)


@_registers(NORM_CALLS, "linear_fwd")
def _linear_forward(data: CaseData, A: torch.Tensor, B: torch.Tensor):
    W, x = data.W, data.xs[0]
    return lambda: F.linear(x, W)


# ---------------------------------------------------------------------------------------------
# QDoRA cases: a bitsandbytes Linear4bit base (NF4 + double quantization), compute dtype = act
# ---------------------------------------------------------------------------------------------
def _linear4bit(data: CaseData) -> nn.Module:
    """A bias-free bnb.nn.Linear4bit whose weight is the case's Params4bit (shared, not copied)."""
    import bitsandbytes as bnb

    c, qw = data.case, data.qweight
    lin = bnb.nn.Linear4bit(c.K, c.N, bias=False, compute_dtype=data.act, quant_type=qw.quant_type,
                            compress_statistics=qw.compress_statistics, device="meta")
    lin.weight = qw
    return lin.train(c.training)


def _quant_frozen(data: CaseData) -> list:
    return [data.W] + quant_tensors(data.qweight)


def build_peft_4bit(data: CaseData, use_dora: bool):
    """(PeftModel over one Linear4bit, its lora.bnb.Linear4bit layer) with the case's adapters."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise Unavailable(f"peft not installed ({exc})") from None
    c = data.case
    cfg = LoraConfig(r=c.r, lora_alpha=c.alpha, lora_dropout=c.p, target_modules=["proj"], use_dora=use_dora,
                     bias="none")
    holder = _Holder(_linear4bit(data))
    holder.is_loaded_in_4bit = True  # what PEFT dispatches its bitsandbytes layers on
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(holder, cfg, autocast_adapter_dtype=(data.ad == torch.float32))
    layer = pm.base_model.model.proj
    if "bnb" not in type(layer).__module__:
        raise Unavailable(f"PEFT wrapped the Linear4bit as {type(layer).__module__}.{type(layer).__name__}")
    set_param(layer.lora_A["default"].weight, data.A, data.ad)
    set_param(layer.lora_B["default"].weight, data.B, data.ad)
    if use_dora:
        set_param(layer.lora_magnitude_vector["default"].weight, data.mag, data.ad)
    pm.train(c.training)
    return pm, layer


def bump_versions(params) -> None:
    """Stand-in for an optimizer step when it is excluded: adapters 'changed', so cached norms are stale."""
    inc = getattr(torch.autograd.graph, "increment_version", None)
    if inc is not None:
        for p in params:
            inc(p)
    else:
        with torch.no_grad():
            for p in params:
                p.add_(0.0)


def _bump(params) -> Callable[[], None]:
    """A pre-step standing in for the optimizer step: adapters 'changed', a cached norm is stale."""
    return lambda: bump_versions(params)


@_registers(QUANT_LAYER_BUILDERS, "floor")
def _floor_4bit(data: CaseData, name: str, norm_per_step: bool) -> Competitor:
    lin = _linear4bit(data)
    return Competitor("floor", lin, [], _quant_frozen(data), computes_dora=False)


@_registers(QUANT_LAYER_BUILDERS, "peft_lora", "peft_dora", "fused")
def _peft_4bit(data: CaseData, name: str, norm_per_step: bool) -> Competitor:
    use_dora = name != "peft_lora"
    if name == "fused":
        _require_triton(data.dev)
    pm, layer = build_peft_4bit(data, use_dora)
    pre = None
    if name == "fused":
        from fused_dora.integrations.peft import enable_fused_dora, fused_dora_status

        switched = enable_fused_dora(pm, backend="triton", warn=False)
        status = dict(fused_dora_status(pm))
        if switched != 1 or any(v != "fused" for v in status.values()):
            raise Unavailable(f"enable_fused_dora did not switch the QDoRA layer: {status}")
    params = [p for p in layer.parameters() if p.requires_grad]
    if name == "fused" and data.case.training and norm_per_step:
        pre = _bump(params)  # the norm recomputed every step, as after an optimizer step
    frozen = [p for p in layer.parameters() if not p.requires_grad] + _quant_frozen(data)
    comp = Competitor(name, layer, params, frozen, pre_step=pre, computes_dora=use_dora)
    comp.peft_model = pm  # keeps the wrapper (and enable_fused_dora's state) alive with the layer
    return comp


@_registers(QUANT_LAYER_BUILDERS, "fused_4bit")
def _fused_4bit(data: CaseData, name: str, norm_per_step: bool) -> Competitor:
    from fused_dora import FusedDoraLinear

    _require_triton(data.dev)
    c = data.case
    layer = FusedDoraLinear.from_linear(_linear4bit(data), r=c.r, lora_alpha=c.alpha, lora_dropout=c.p,
                                        adapter_dtype=data.ad, backend="triton")
    set_param(layer.lora_A, data.A, data.ad)
    set_param(layer.lora_B, data.B, data.ad)
    set_param(layer.magnitude, data.mag, data.ad)
    layer.clear_norm_cache()
    layer.train(c.training)
    pre = layer.clear_norm_cache if (c.training and norm_per_step) else None
    return Competitor(name, layer, [layer.lora_A, layer.lora_B, layer.magnitude], _quant_frozen(data), pre_step=pre,
                      kept=lambda: [layer.weight_norm()])


@_registers(QUANT_NORM_CALLS, "fused")
def _fused_norm_4bit(data: CaseData, A: torch.Tensor, B: torch.Tensor):
    from fused_dora.qdora import dora_weight_norm_4bit

    _require_triton(data.dev)
    qw, s = data.qweight, data.case.scaling
    return lambda: dora_weight_norm_4bit(qw, A, B, s, backend="triton")


@_registers(QUANT_NORM_CALLS, "peft_dora")
def _peft_norm_4bit(data: CaseData, A: torch.Tensor, B: torch.Tensor):
    from peft.utils.integrations import dequantize_module_weight

    _, layer = build_peft_4bit(data, True)
    dora = layer.lora_magnitude_vector["default"]
    la, lb, base, s = layer.lora_A["default"], layer.lora_B["default"], layer.get_base_layer(), data.case.scaling

    def fn():  # what PEFT's QDoRA forward does for the norm: the whole weight dequantized, B@A dense
        lora_weight = dora.get_lora_weight(lora_A=la, lora_B=lb).to(data.act)
        weight = dequantize_module_weight(base).to(data.act)
        return dora.get_weight_norm(weight=weight, lora_weight=lora_weight.detach(), scaling=s)
    return fn


assert set(LAYER_BUILDERS) | set(NORM_CALLS) <= set(COMPETITORS), "every competitor is described"
assert set(QUANT_LAYER_BUILDERS) | set(QUANT_NORM_CALLS) <= set(QDORA_COMPETITORS), "every QDoRA one too"


# ---------------------------------------------------------------------------------------------
# The timed call
# ---------------------------------------------------------------------------------------------
def make_call(data: CaseData, comp: Competitor):
    """(call(i), reset()) for the case's mode; call(i) uses input i of the rotation pool."""
    xs, dys = data.xs, data.dys
    fwd = comp.fwd

    def reset():
        for p in comp.params:
            p.grad = None
        for x in xs:
            x.grad = None

    if data.case.mode == "norm":
        def call(i):
            with torch.no_grad():
                fwd()
    elif data.case.training:
        params, pre = comp.params, comp.pre_step

        def call(i):
            if pre is not None:
                pre()
            for p in params:
                p.grad = None
            x = xs[i]
            x.grad = None
            fwd(x).backward(dys[i])
    else:
        def call(i):
            with torch.no_grad():
                fwd(xs[i])
    return call, reset


def prepare(case: Case, name: str, dev: torch.device, norm_per_step: bool = True):
    """(call(i), pool size, competitor, data) for one competitor of one case: for other harnesses
    (benchmarks/test_bench_kernels.py). Raises Unavailable where the competitor cannot run."""
    data = make_data(case, dev)
    if name == "floor" and case.mode == "norm":
        raise Unavailable("the norm-mode floor is derived from the bandwidth, not timed")
    comp = build_competitor(name, data, norm_per_step)
    call, _ = make_call(data, comp)
    return call, len(data.xs), comp, data
