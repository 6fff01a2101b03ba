"""Serve Hugging Face PEFT's DoRA ``lora.Linear`` layers with the fused kernels, in place.

    enable_fused_dora(model)    switch every PEFT DoRA lora.Linear of ``model`` to the fused op
    disable_fused_dora(model)   back to PEFT's own forward
    fused_dora_status(model)    {layer name: "fused" or why PEFT's path runs}

Only the forward of each switched layer changes (an instance attribute ``forward`` is set);
PEFT's module tree, parameter names, state_dict, save_pretrained, merge / unmerge /
merge_and_unload, set_adapter, disable_adapter and add_adapter are untouched and keep working.
Each call re-checks the layer's state and takes PEFT's own path whenever the fused op would not
compute what PEFT computes (see :func:`enable_fused_dora`).
"""
import collections
import logging
import warnings
import weakref
from typing import Optional

import torch
import torch.nn as nn

from ..backend import FusedDoraWarning, reference_reason
from ..functional import dora_linear
from ..norm_cache import NormCache
from ..qdora import weight_norm_of
from ..quantized import bnb_kind
from ..routes import check_route, route_name
from ..validation import DROPOUT_SEMANTICS, check_backend, check_dropout_semantics  # noqa: F401 (re-exported)
from .peft_bnb import bnb_forward, peft_bnb_layer_kind
from .peft_bnb import structural_reason as bnb_structural_reason
from .peft_bnb import weight_reason as bnb_weight_reason

logger = logging.getLogger(__name__)  # "fused_dora.integrations.peft", under the "fused_dora" logger

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


_PEFT_CLASSES = None  # a plain global, not functools.lru_cache: Dynamo warns about lru_cache in traced code


def _peft_classes():
    global _PEFT_CLASSES
    if _PEFT_CLASSES is None:
        _PEFT_CLASSES = _import_peft_classes()
    return _PEFT_CLASSES


def _import_peft_classes():
    try:
        from peft.tuners.lora import layer as lora_layer
    except ImportError as exc:
        raise ImportError("fused_dora.integrations.peft needs peft: pip install 'fused_dora[peft]'") from exc
    try:
        from peft.tuners.lora.dora import DoraLinearLayer
    except ImportError:  # PEFT < 0.12 held the magnitudes in a ParameterDict (see _structural_reason)
        DoraLinearLayer = None
    try:
        from peft.tuners.lora.variants import DoraLinearVariant
    except ImportError:  # PEFT before LoRA variants (< 0.16) dispatched DoRA on use_dora alone
        DoraLinearVariant = None
    return lora_layer, DoraLinearLayer, DoraLinearVariant


def _is_dora_layer(module) -> bool:
    """Whether ``module`` is a PEFT LoRA layer holding at least one DoRA adapter."""
    return hasattr(module, "lora_magnitude_vector") and any(getattr(module, "use_dora", {}).values())


def _structural_reason(module) -> Optional[str]:
    """None if the fused forward can be installed on this DoRA layer, else why not."""
    lora_layer, DoraLinearLayer, _ = _peft_classes()
    if DoraLinearLayer is None:
        import peft

        return f"PEFT {peft.__version__} is not served (no DoraLinearLayer magnitudes; fused_dora serves PEFT >= 0.12)"
    kind = peft_bnb_layer_kind(module)
    if kind is not None:  # lora.bnb.Linear4bit / Linear8bitLt: fused_dora.integrations.peft_bnb
        return bnb_structural_reason(module, kind)
    if not isinstance(module, lora_layer.Linear):
        return f"{type(module).__name__} layers are not served (only lora.Linear over nn.Linear)"
    if type(module).forward is not lora_layer.Linear.forward:
        return f"{type(module).__name__} overrides lora.Linear.forward"
    if module.fan_in_fan_out:
        return "fan_in_fan_out=True"
    base = module.get_base_layer()
    if not isinstance(base, nn.Linear) or type(base).forward is not nn.Linear.forward:
        return f"base layer is a {type(base).__name__}, not a plain nn.Linear (e.g. quantized)"
    return None


def _active_adapter_or_reason(layer, dropout_semantics: str):
    """(adapter name, None) if the layer's current state can be served, else (None, reason)."""
    _, DoraLinearLayer, DoraLinearVariant = _peft_classes()
    if layer.disable_adapters:
        return None, "adapters are disabled"
    if layer.merged:
        return None, "adapters are merged into the base weight"
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None, f"{len(active)} active adapters on this layer (the fused op serves exactly one)"
    a = active[0]
    if not layer.use_dora.get(a, False) or a not in layer.lora_magnitude_vector:
        return None, f"adapter {a!r} is not DoRA"
    variant = getattr(layer, "lora_variant", {}).get(a)
    if DoraLinearVariant is not None and type(variant) is not DoraLinearVariant:
        return None, f"adapter {a!r} uses the LoRA variant {type(variant).__name__}"
    dora = layer.lora_magnitude_vector[a]
    if type(dora) is not DoraLinearLayer or dora.fan_in_fan_out:
        return None, f"adapter {a!r} has a {type(dora).__name__} magnitude module"
    if getattr(layer, "lora_bias", {}).get(a, False) or layer.lora_B[a].bias is not None:
        return None, f"adapter {a!r} has lora_bias=True"
    dropout = layer.lora_dropout[a]
    if not isinstance(dropout, (nn.Dropout, nn.Identity)) or type(dropout).forward not in (
            nn.Dropout.forward, nn.Identity.forward):
        return None, f"adapter {a!r} has a {type(dropout).__name__} dropout"
    if dropout_semantics == "peft" and isinstance(dropout, nn.Dropout) and dropout.p > 0 and layer.training \
            and dropout.training:
        return None, "dropout is active in training and dropout_semantics='peft'"
    return a, None


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _plain(t) -> bool:
    return t is None or type(t) in (torch.Tensor, nn.Parameter)


def _input_reason(x, weight, bias, tensors, compute_dtype, autocast: bool) -> Optional[str]:
    """Why these call arguments cannot go to the fused op (None if they can)."""
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
        return f"input is {type(x).__name__} {getattr(x, 'dtype', '')}"
    if not all(_plain(t) for t in (x, weight, bias) + tensors):
        return "a tensor subclass (e.g. DTensor, quantized weight) is involved"
    if any(t.device != x.device for t in (weight,) + tensors + ((bias,) if bias is not None else ())):
        return "adapter and base tensors are not all on the input's device"
    if not autocast and weight.dtype != x.dtype:
        return f"input dtype {x.dtype} differs from the base weight's {weight.dtype}"
    lora_A, lora_B, magnitude = tensors
    allowed = (compute_dtype, torch.float32, torch.float64)
    if lora_A.dtype != lora_B.dtype or lora_A.dtype not in allowed or magnitude.dtype not in _FLOAT_DTYPES:
        return f"adapter dtypes {lora_A.dtype}/{lora_B.dtype} do not suit input dtype {compute_dtype}"
    if bias is not None and bias.dtype not in allowed:
        return f"bias dtype {bias.dtype} does not suit input dtype {compute_dtype}"
    return None


class _LayerBound:
    """Base of the callables installed on a PEFT layer (its ``forward``, its ``extra_repr``).

    The layer holds them in its ``__dict__``, so they hold the layer weakly: a strong reference
    would make a cycle that keeps the whole model (and its GPU memory) alive after ``del model``
    until the garbage collector runs. Copies and pickles follow the layer: ``copy.deepcopy`` of a
    model gives callables bound to the copied layers.
    """

    def __init__(self, layer):
        self._layer = weakref.ref(layer)

    @property
    def layer(self):
        return self._layer()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_layer"] = self.layer  # strong while copied or pickled: the copy's memo maps it
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._layer = weakref.ref(state["_layer"])


class _FusedForward(_LayerBound):
    """The ``forward`` installed on one PEFT lora.Linear: the fused op when it applies, else PEFT's.

    Holds a NormCache tagged with the adapter's name, as FusedDoraLinear does (writes through
    ``.data`` bypass version counters, so after those call enable_fused_dora again).
    """

    def __init__(self, layer, dropout_semantics: str, backend: str, previous=None, route: Optional[str] = None):
        super().__init__(layer)
        self.dropout_semantics, self.backend, self.route = dropout_semantics, backend, route
        self.previous = previous  # an instance-level forward that was there before, if any
        self.last_input_reason = None  # why the last call's arguments went to PEFT's path
        self.last_reference_reason = None  # why the last fused call ran the PyTorch reference path
        # a bitsandbytes base (4-bit, 8-bit): the norm of its quantized weight
        self._norm_cache = NormCache(weight_norm_of if bnb_kind(layer.get_base_layer()) else None)

    def status(self) -> str:
        """"fused", or why PEFT's path or the reference path runs (see fused_dora_status)."""
        _, reason = _active_adapter_or_reason(self.layer, self.dropout_semantics)
        reason = reason or bnb_weight_reason(self.layer)  # a bitsandbytes weight that cannot be read now
        return reason or self.last_input_reason or _fused_status(self.last_reference_reason)

    def peft_forward(self, x, *args, **kwargs):
        if self.previous is not None:
            return self.previous(x, *args, **kwargs)
        return type(self.layer).forward(self.layer, x, *args, **kwargs)

    def __call__(self, x, *args, **kwargs):
        layer = self.layer
        adapter, reason = _active_adapter_or_reason(layer, self.dropout_semantics)
        if reason is not None:
            return self.peft_forward(x, *args, **kwargs)
        if args or any(v is not None for v in kwargs.values()):
            reason = "extra forward arguments (e.g. adapter_names for mixed batches)"
        else:
            base = layer.get_base_layer()
            if bnb_kind(base) is not None:  # bitsandbytes 4-bit / 8-bit: fused_dora.integrations.peft_bnb
                return bnb_forward(self, layer, base, adapter, x)
            weight, bias = base.weight, base.bias
            lora_A, lora_B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            magnitude = layer.lora_magnitude_vector[adapter].weight
            autocast = isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type)
            compute_dtype = torch.get_autocast_dtype(x.device.type) if autocast else getattr(x, "dtype", None)
            reason = _input_reason(x, weight, bias, (lora_A, lora_B, magnitude), compute_dtype, autocast)
        self.last_input_reason = reason
        if reason is not None:
            return self.peft_forward(x, *args, **kwargs)

        scaling = layer.scaling[adapter]
        dropout = layer.lora_dropout[adapter]
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        training = layer.training and dropout.training
        self.last_reference_reason = reference_reason(self.backend, x.device, compute_dtype, weight,
                                                      (x, bias, lora_A, lora_B, magnitude))
        norm = self._norm_cache.for_forward(weight, lora_A, lora_B, scaling, self.backend, tag=adapter)
        # under autocast, dora_linear casts x, weight and bias to the autocast dtype as F.linear does
        return dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, p, training, self.backend, norm=norm,
                           route=self.route)


class _FusedExtraRepr(_LayerBound):
    """The ``extra_repr`` installed beside the fused forward: PEFT's, plus which path runs."""

    def __call__(self) -> str:
        own = type(self.layer).extra_repr(self.layer)
        fwd = self.layer.__dict__.get("forward")
        if not isinstance(fwd, _FusedForward):
            return own
        return (own + ", " if own else "") + f"fused_dora={fwd.status()!r}, route={route_name(fwd.route)!r}"


def enable_fused_dora(model: nn.Module, dropout_semantics: str = "fused", *, backend: str = "auto",
                      warn: bool = True, route: Optional[str] = None) -> int:
    """Serve every PEFT DoRA ``lora.Linear`` in ``model`` (a PeftModel or any module tree) with
    :func:`fused_dora.dora_linear`, in place. Returns the number of layers switched (layers
    already switched are updated with the new options and counted).

    For a switched layer, each forward of x [..., in_features] -> [..., out_features] computes
    ``base_layer(x) + DoRA`` in one fused call when the layer has exactly one active adapter
    which is DoRA (no lora_bias), adapters are neither disabled nor merged, no extra forward
    arguments are passed (e.g. ``adapter_names``), and the input, base weight and adapters are
    plain tensors on one device with compatible dtypes (under autocast, x, weight and bias are
    cast to the autocast dtype, as F.linear would). Otherwise that call runs PEFT's own forward,
    so results are never silently different; :func:`fused_dora_status` tells which path each
    layer takes and why.

    Layers that can never be switched keep PEFT's forward and are counted by reason in one
    :class:`FusedDoraWarning` line (``warn=False`` silences it): DoRA on Conv / Embedding
    layers, quantized or otherwise non-``nn.Linear`` base layers, ``fan_in_fan_out=True``,
    subclasses that override the forward. What the user chose or can change is logged, not
    warned, on the ``"fused_dora"`` logger: one INFO line with the number of switched layers,
    one with the switched layers whose current state (merged, disabled, several active
    adapters, ``dropout_semantics="peft"``, ...) runs PEFT's path for now, and each layer's
    reason at DEBUG. :func:`fused_dora_status` gives every layer's status and their counts.
    A switched layer's repr ends with ``fused_dora='<its status>'``.

    ``dropout_semantics`` matters only in training with ``lora_dropout > 0``:

    - ``"fused"`` (default): y = c * (x @ W.T + s * B(A(dropout(x)))) + b, one base matmul
      (the DoRA paper's formula with dropout on the adapter input; fused_dora.autograd).
    - ``"peft"``: exactly PEFT's form, y = x @ W.T + b + (c - 1) * dropout(x) @ W.T
      + c * s * B(A(dropout(x))), by running PEFT's own forward for those calls.

    Without active dropout (p = 0, or eval mode) both are the same function. ``backend`` is
    passed to :func:`fused_dora.dora_linear` ("auto", "triton" or "reference"), and so is
    ``route`` ("fused", "composed", "auto"; None: FUSED_DORA_ROUTE, else "auto").
    """
    check_dropout_semantics(dropout_semantics)
    check_backend(backend)
    if route is not None:
        check_route(route)
    _check_model(model)
    _peft_classes()
    switched, unserved, waiting = 0, {}, {}
    for name, module in model.named_modules():
        if not _is_dora_layer(module):
            continue
        reason = _structural_reason(module)
        if reason is not None:
            unserved[name] = reason
            continue
        current = module.__dict__.get("forward")
        previous = current.previous if isinstance(current, _FusedForward) else current
        module.forward = _FusedForward(module, dropout_semantics, backend, previous, route)
        module.extra_repr = _FusedExtraRepr(module)
        switched += 1
        _, reason = _active_adapter_or_reason(module, dropout_semantics)
        if reason is not None:
            waiting[name] = reason
    _report(switched, unserved, waiting, backend, warn)
    return switched


def _by_reason(layers: dict) -> str:
    """'reason (count); ...' for {layer name: reason}, most common first."""
    counts = collections.Counter(layers.values())
    return "; ".join(f"{why} ({n})" for why, n in counts.most_common())


def _report(switched: int, unserved: dict, waiting: dict, backend: str, warn: bool) -> None:
    """One summary line each: INFO for what the user chose or can change (switched layers, layers
    whose current state runs PEFT's path), a FusedDoraWarning for layers that can never be served
    (or a model without DoRA layers); per-layer reasons at DEBUG and in fused_dora_status."""
    total = switched + len(unserved)
    logger.info("enable_fused_dora: %d of %d PEFT DoRA layers switched to the fused op (backend=%r)",
                switched, total, backend)
    if waiting:
        logger.info("enable_fused_dora: %d switched layers run PEFT's own forward for now: %s",
                    len(waiting), _by_reason(waiting))
    for name, why in {**unserved, **waiting}.items():
        logger.debug("enable_fused_dora: %s: %s", name or "<root>", why)
    if warn and unserved:
        warnings.warn(f"enable_fused_dora: {len(unserved)} of {total} PEFT DoRA layers keep PEFT's own forward: "
                      f"{_by_reason(unserved)}. fused_dora_status(model) lists them.", FusedDoraWarning, stacklevel=3)
    if warn and total == 0:
        warnings.warn("enable_fused_dora: model has no PEFT DoRA layers (LoraConfig(use_dora=True))",
                      FusedDoraWarning, stacklevel=3)


def disable_fused_dora(model: nn.Module) -> int:
    """Undo :func:`enable_fused_dora` on ``model``: PEFT's own forward everywhere again.

    Returns the number of layers switched back (0 if none were switched).
    """
    _check_model(model)
    restored = 0
    for module in model.modules():
        current = module.__dict__.get("forward")
        if isinstance(current, _FusedForward):
            if current.previous is not None:
                module.forward = current.previous
            else:
                del module.forward
            if isinstance(module.__dict__.get("extra_repr"), _FusedExtraRepr):
                del module.extra_repr
            restored += 1
    return restored


def _fused_status(reference_reason: Optional[str]) -> str:
    if reference_reason is None:
        return "fused"
    return f"fused op on the PyTorch reference path: {reference_reason}"


class FusedDoraStatus(dict[str, str]):
    """{layer name: status}, as returned by :func:`fused_dora_status`; ``counts`` sums it up."""

    @property
    def counts(self) -> dict[str, int]:
        """{status: number of layers}, most common first."""
        return dict(collections.Counter(self.values()).most_common())


def fused_dora_status(model: nn.Module) -> FusedDoraStatus:
    """{name: "fused" | reason} for every PEFT DoRA layer in ``model``; ``.counts`` gives
    {status: number of layers}.

    The reason is the one that holds now (not switched, adapters disabled or merged, several
    active adapters, ...); for conditions that depend on the call's input (dtype, device) it is
    the one seen by the layer's last forward. A layer whose fused op runs the PyTorch reference
    path (no usable Triton kernels for its inputs) says so: "fused op on the PyTorch reference
    path: <why>".
    """
    _check_model(model)
    status = FusedDoraStatus()
    for name, module in model.named_modules():
        if not _is_dora_layer(module):
            continue
        fwd = module.__dict__.get("forward")
        if not isinstance(fwd, _FusedForward):
            status[name] = "not switched: " + (_structural_reason(module) or "enable_fused_dora was not called")
            continue
        status[name] = fwd.status()
    return status
