"""Add DoRA adapters to any model without PEFT, and save / load them in PEFT's adapter format.

    replace_linear(model, target_modules, r, lora_alpha)   nn.Linear -> FusedDoraLinear, in place
    save_adapter(model, path)     a directory that ``peft.PeftModel.from_pretrained`` loads
    load_adapter(model, path)     a PEFT DoRA adapter directory into such a model

PEFT's layout, used by both directions: ``adapter_config.json`` (a ``LoraConfig`` with
``use_dora=True``) and ``adapter_model.safetensors`` with, per adapted module ``<name>``
(its name in the base model), ``base_model.model.<name>.lora_A.weight`` [r, in],
``base_model.model.<name>.lora_B.weight`` [out, r] and
``base_model.model.<name>.lora_magnitude_vector`` [out]. FusedDoraLinear computes the same
function as PEFT's DoRA layer from these three tensors (same scaling, same magnitude meaning).
"""
import collections
import itertools
import math
import os
import re
import sys
import warnings
from typing import Iterable, Optional, Union

import torch
import torch.nn as nn

from .module import FusedDoraLinear
from .quantized import bnb_kind
from .validation import check_adapter_hparams

# PEFT's shorthand: every nn.Linear except the output layer (and, here, those whose weight torch
# reads directly: see _read_directly)
ALL_LINEAR = "all-linear"
_PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B", ".lora_magnitude_vector": "magnitude"}
_ADAPTER_PARAMS = ("lora_A", "lora_B", "magnitude")


# ---- wrappers ------------------------------------------------------------------------------------
# Module names a wrapper inserts into its model's: torch.compile's OptimizedModule (_orig_mod),
# FSDP's and activation checkpointing's inner wrappers. PEFT's adapter files name modules without them.
_WRAPPER_NAMES = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def _outer_wrapper_child(model: nn.Module) -> Optional[nn.Module]:
    """The wrapped module if ``model`` is a whole-model wrapper (torch.compile, DDP, DataParallel,
    FSDP), else None."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing was compiled
    if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        return model._orig_mod
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    if type(model).__name__ == "FullyShardedDataParallel" and isinstance(getattr(model, "module", None), nn.Module):
        return model.module  # FSDP1, not imported here: torch.distributed may be unavailable
    return None


def unwrap_model(model: nn.Module) -> nn.Module:
    """``model`` without its torch.compile / DDP / DataParallel / FSDP wrappers, as accelerate's
    ``unwrap_model`` does: the module whose names PEFT's adapter files use."""
    inner = _outer_wrapper_child(model)
    while inner is not None:
        model, inner = inner, _outer_wrapper_child(inner)
    return model


def _peft_name(name: str) -> str:
    """A module name without the parts wrappers inside the model insert (see _WRAPPER_NAMES)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_NAMES)


# ---- targeting -------------------------------------------------------------------------------
def _check_target_modules(target_modules) -> Union[str, tuple]:
    if isinstance(target_modules, str):
        if not target_modules:
            raise ValueError("target_modules must not be an empty string")
        if target_modules != ALL_LINEAR:
            try:
                re.compile(target_modules)
            except re.error as exc:
                raise ValueError(f"target_modules={target_modules!r} is not a valid "
                                 f"regular expression: {exc}") from None
        return target_modules
    if isinstance(target_modules, (bytes, nn.Module)) or not isinstance(target_modules, Iterable):
        raise TypeError("target_modules must be a regex string or a list of module-name suffixes, "
                        f"got {type(target_modules).__name__}")
    targets = tuple(target_modules)
    if not targets:
        raise ValueError("target_modules must not be empty")
    bad = [t for t in targets if not isinstance(t, str) or not t]
    if bad:
        raise TypeError(f"target_modules must hold non-empty strings, got {bad!r}")
    return targets


def _matches(name: str, targets) -> bool:
    """PEFT's rule: a string must fullmatch the name; a list entry must equal it or end it after a dot."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith("." + t) for t in targets)


def _output_layer(model: nn.Module) -> Optional[nn.Module]:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def _replaceable(module: nn.Module) -> bool:
    """A plain nn.Linear, or a bitsandbytes 4-bit Linear4bit (FusedDoraLinear4bit serves it)."""
    return type(module) is nn.Linear or bnb_kind(module) == "4bit"


def _read_directly(model: nn.Module, name: str) -> Optional[str]:
    """Why the module ``name`` is an nn.Linear whose weight torch reads directly, bypassing its
    forward (and so any adapter put in its place), or None."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if isinstance(parent, nn.TransformerEncoderLayer) and child in ("linear1", "linear2"):
        return f"{name}: nn.TransformerEncoderLayer's eval fast path reads {child}.weight directly"
    return None


def _find_targets(model: nn.Module, targets) -> tuple:
    """([(name, nn.Linear)] to replace, [why each nn.Linear "all-linear" leaves out is left out]).

    Raises ValueError for explicitly matched modules that are no plain nn.Linear or whose weight
    torch reads directly; ``"all-linear"`` leaves the latter out (and says so)."""
    if targets == ALL_LINEAR:
        output = _output_layer(model)
        found, left_out = [], []
        for n, m in model.named_modules():
            if n and _replaceable(m) and m is not output:
                why = _read_directly(model, n)
                if why is None:
                    found.append((n, m))
                else:
                    left_out.append(why)
        return found, left_out
    found, bad = [], []
    for name, module in model.named_modules():
        if not name or not _matches(_peft_name(name), targets):
            continue
        if _replaceable(module):
            why = _read_directly(model, name)
            if why is None:
                found.append((name, module))
            else:
                bad.append(f"{why}, so an adapter there would be silently ignored")
        elif isinstance(module, FusedDoraLinear):
            bad.append(f"{name} (already a FusedDoraLinear)")
        else:
            # nn.Linear subclasses too: quantized layers, or MultiheadAttention.out_proj, whose
            # weight is read directly and would silently bypass the adapter
            bad.append(f"{name} ({type(module).__name__}, not a plain torch.nn.Linear)")
    if bad:
        raise ValueError("target_modules matched modules that cannot take a FusedDoraLinear: " + "; ".join(bad)
                         + ". Narrow target_modules (a suffix list or a regex that fullmatches).")
    return found, []


def _freeze_all_but_adapters(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, FusedDoraLinear):
            for name in _ADAPTER_PARAMS:
                getattr(m, name).requires_grad_(True)


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of submodule ``name``, in the replaced module's train / eval mode."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    new.train(getattr(parent, child).training)
    setattr(parent, child, new)


def replace_linear(
    model: nn.Module,
    target_modules: Union[str, Iterable[str]],
    r: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    *,
    adapter_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
    route: Optional[str] = None,
) -> int:
    """Replace the targeted ``nn.Linear`` modules of ``model`` by FusedDoraLinear, in place.

    ``target_modules`` selects modules by name as PEFT does: a list of names or name suffixes
    (``"q_proj"`` matches ``"q_proj"`` and ``"model.layers.0.self_attn.q_proj"``), a regular
    expression string that must fullmatch the module name, or ``"all-linear"`` (every
    ``nn.Linear`` except the model's output layer, as in PEFT, and those torch reads directly).
    A matched module must be a plain ``nn.Linear`` whose weight torch does not read directly
    (``linear1`` / ``linear2`` of ``nn.TransformerEncoderLayer``, whose eval fast path does,
    raise a ValueError). Each new layer shares its Linear's weight [out, in] and bias [out] (frozen)
    and gets fresh adapters: lora_A [r, in] (Kaiming), lora_B [out, r] (zeros), magnitude [out]
    (row norms of the weight), so the model computes exactly what it did before.
    scaling = lora_alpha / r (lora_alpha / sqrt(r) with ``use_rslora``); ``lora_dropout`` applies
    to the LoRA path in training. ``adapter_dtype``, ``backend`` and ``route`` go to
    :meth:`FusedDoraLinear.from_linear`.

    Afterwards the adapters (lora_A, lora_B, magnitude) of every FusedDoraLinear in ``model``
    are the only parameters with ``requires_grad=True``. Returns the number of replaced modules;
    raises ValueError if nothing matches.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap_model(model)
    targets = _check_target_modules(target_modules)
    check_adapter_hparams(r, lora_alpha, lora_dropout, use_rslora)
    found, left_out = _find_targets(model, targets)
    why = f" (left out, as an adapter there would be silently ignored: {'; '.join(left_out)})" if left_out else ""
    if not found:
        raise ValueError(f"target_modules={target_modules!r} matched no torch.nn.Linear module of "
                         f"{type(model).__name__} that can take an adapter{why}")
    if left_out:
        warnings.warn(f"replace_linear: {len(left_out)} nn.Linear modules are not replaced{why}", stacklevel=2)
    for name, linear in found:
        _swap(model, name, FusedDoraLinear.from_linear(linear, r, lora_alpha, lora_dropout, use_rslora,
                                                       adapter_dtype=adapter_dtype, backend=backend, route=route))
    _freeze_all_but_adapters(model)
    return len(found)


# ---- PEFT adapter format ----------------------------------------------------------------------
def _import_peft():
    try:
        import peft
    except ImportError as exc:
        raise ImportError("saving and loading PEFT adapters needs peft: pip install 'fused_dora[peft]'") from exc
    return peft


def _rank_and_alpha(config, name: str):
    """(r, lora_alpha) of module ``name`` as the installed PEFT's LoraModel picks them from the config."""
    try:
        from peft.utils.other import get_pattern_key  # PEFT >= 0.14
    except ImportError:
        # PEFT 0.12 / 0.13 (LoraModel._create_and_replace) looked both dicts up with one key: the
        # first rank_pattern, then alpha_pattern, key that matches
        keys = itertools.chain(config.rank_pattern, config.alpha_pattern)
        key = next((k for k in keys if re.match(rf".*\.{k}$", name)), name)
        return config.rank_pattern.get(key, config.r), config.alpha_pattern.get(key, config.lora_alpha)
    return (config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r),
            config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha))


def _dora_layers(model: nn.Module) -> dict:
    """{name as PEFT's adapter files give it: FusedDoraLinear} of ``model`` (already unwrapped)."""
    return {_peft_name(name): m for name, m in model.named_modules() if name and isinstance(m, FusedDoraLinear)}


def _plain_number(v: float):
    return int(v) if float(v).is_integer() else float(v)


# transformers model-class suffixes -> PEFT's task types (what PeftModel.from_pretrained wraps with)
_TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
               ("ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("ForSequenceClassification", "SEQ_CLS"),
               ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"))


def _task_type(model: nn.Module) -> Optional[str]:
    """PEFT's task type for a transformers model, from its class name; None when unknown."""
    if getattr(model, "config", None) is None:  # not a transformers model
        return None
    name = type(model).__name__
    if name.endswith("ForConditionalGeneration") and not getattr(model.config, "is_encoder_decoder", False):
        return None  # e.g. vision-language models: PEFT has no single task type for them
    return next((task for suffix, task in _TASK_TYPES if name.endswith(suffix)), None)


def _full_adapter_tensor(name: str, layer: FusedDoraLinear, attr: str) -> torch.Tensor:
    """The layer's adapter tensor ``attr`` as a plain CPU tensor of its full shape; ValueError for a
    sharded one (FSDP's flattened parameters, DTensors), which PEFT could not load."""
    t = getattr(layer, attr).detach()
    expected = {"lora_A": (layer.r, layer.in_features), "lora_B": (layer.out_features, layer.r),
                "magnitude": (layer.out_features,)}[attr]
    if type(t) is not torch.Tensor or tuple(t.shape) != expected:
        raise ValueError(f"save_adapter: {name}.{attr} is a {type(t).__name__} of shape {tuple(t.shape)}, not the "
                         f"full {expected} tensor (sharded by FSDP?); gather the full parameters first, e.g. "
                         "inside FullyShardedDataParallel.summon_full_params(model) or from DTensor.full_tensor()")
    return t.contiguous().cpu()


def _pattern_key(name: str) -> str:
    """A rank_pattern / alpha_pattern key matching the module ``name`` and no other, in every PEFT.

    PEFT >= 0.15 matches a key as ``(.*\\.)?({key})$``, older ones as ``.*\\.{key}$``: a dot must
    come before the key, so the key leaves out the name's first part and a lookbehind pins it.
    (A bare escaped name would also match any longer name ending in ``.<name>``.) PEFT < 0.15
    cannot match a top-level name (no dot) at all.
    """
    head, dot, tail = name.partition(".")
    if not dot:
        return "^" + re.escape(name)
    return rf"(?<=^{re.escape(head)}\.){re.escape(tail)}"


def save_adapter(model: nn.Module, path: Union[str, os.PathLike], *,
                 base_model_name_or_path: Optional[str] = None, task_type: Optional[str] = None) -> None:
    """Write the DoRA adapters of ``model``'s FusedDoraLinear layers to directory ``path``, as PEFT does.

    ``path`` gets ``adapter_config.json`` (a LoraConfig with ``use_dora=True``, target_modules
    = the adapted modules' full names, and r / lora_alpha / use_rslora / lora_dropout;
    per-layer ranks or alphas that differ from the most common one go to rank_pattern /
    alpha_pattern, keyed to match exactly that module in every PEFT; PEFT < 0.15 cannot match a
    top-level module's key, which is warned) and ``adapter_model.safetensors`` (keys as in the
    module docstring). Load it with ``peft.PeftModel.from_pretrained(base_model, path)`` on the
    original (unreplaced) model, or with :func:`load_adapter`. Needs ``peft`` and ``safetensors``.
    ``base_model_name_or_path`` and ``task_type`` (PEFT's, e.g. ``"CAUSAL_LM"``) default to what a
    transformers model knows: its ``config._name_or_path`` and its class (``...ForCausalLM`` ->
    ``"CAUSAL_LM"``, ...).
    A model wrapped by torch.compile, DDP, DataParallel or FSDP is saved under its own module
    names (see :func:`unwrap_model`); sharded adapters (FSDP, DTensor) must be gathered first.
    """
    peft = _import_peft()
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap_model(model)
    layers = _dora_layers(model)
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) has no FusedDoraLinear layers to save; "
                         "call replace_linear first")
    if len({m.use_rslora for m in layers.values()}) > 1:
        raise ValueError("save_adapter: PEFT's config has one use_rslora for all layers, but the layers mix "
                         "use_rslora=True and False")
    rank = collections.Counter(m.r for m in layers.values()).most_common(1)[0][0]
    alpha = collections.Counter(m.lora_alpha for m in layers.values()).most_common(1)[0][0]
    dropouts = collections.Counter(m.lora_dropout for m in layers.values())
    if len(dropouts) > 1:
        warnings.warn(f"save_adapter: the layers use different lora_dropout values {sorted(dropouts)}; PEFT's "
                      f"config holds one, {dropouts.most_common(1)[0][0]} is written", stacklevel=2)
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for name, m in layers.items():
        for suffix, attr in _SUFFIXES.items():
            tensors[_PREFIX + name + suffix] = _full_adapter_tensor(name, m, attr)
        if m.r != rank:
            rank_pattern[_pattern_key(name)] = m.r
        if m.lora_alpha != alpha:
            alpha_pattern[_pattern_key(name)] = _plain_number(m.lora_alpha)
    top_level = sorted(n for n in layers if "." not in n and _pattern_key(n) in {**rank_pattern, **alpha_pattern})
    if top_level:
        warnings.warn(f"save_adapter: PEFT < 0.15 cannot match rank_pattern / alpha_pattern keys of top-level modules "
                      f"({', '.join(top_level)}): load this adapter with PEFT >= 0.15", stacklevel=2)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config = peft.LoraConfig(
        r=rank, lora_alpha=_plain_number(alpha), lora_dropout=dropouts.most_common(1)[0][0],
        use_rslora=next(iter(layers.values())).use_rslora, use_dora=True, target_modules=sorted(layers),
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, bias="none", inference_mode=True,
        base_model_name_or_path=base_model_name_or_path, task_type=task_type or _task_type(model),
    )
    os.makedirs(path, exist_ok=True)
    config.save_pretrained(os.fspath(path))
    save_file(tensors, os.path.join(os.fspath(path), "adapter_model.safetensors"), metadata={"format": "pt"})


def _read_peft_adapter(path):
    """(LoraConfig, {module name: {"lora_A"|"lora_B"|"magnitude": tensor}}), checked to be plain DoRA."""
    peft = _import_peft()
    config = peft.PeftConfig.from_pretrained(os.fspath(path))
    if not isinstance(config, peft.LoraConfig) or not getattr(config, "use_dora", False):
        raise ValueError(f"{path} is not a PEFT DoRA adapter (needs a LoRA config with use_dora=True, "
                         f"got {type(config).__name__} with use_dora={getattr(config, 'use_dora', None)})")
    unsupported = [f"{k}={getattr(config, k)!r}" for k in ("fan_in_fan_out", "lora_bias", "modules_to_save",
                                                            "trainable_token_indices", "layer_replication")
                   if getattr(config, k, None)]
    if unsupported:
        raise ValueError(f"{path}: adapter options FusedDoraLinear cannot load: {', '.join(unsupported)}")
    weights = peft.utils.load_peft_weights(os.fspath(path), device="cpu")
    per_module, unknown = collections.defaultdict(dict), []
    for key, tensor in weights.items():
        for suffix, attr in _SUFFIXES.items():
            if key.startswith(_PREFIX) and key.endswith(suffix):
                per_module[key[len(_PREFIX):-len(suffix)]][attr] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{path}: tensors that are not DoRA adapters of linear layers: {unknown[:5]}"
                         + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
    incomplete = [n for n, t in per_module.items() if len(t) != len(_SUFFIXES)]
    if incomplete:
        raise ValueError(f"{path}: modules without all of lora_A, lora_B, lora_magnitude_vector: {incomplete[:5]}")
    if not per_module:
        raise ValueError(f"{path}: the adapter holds no tensors")
    return config, dict(per_module)


def load_adapter(model: nn.Module, path: Union[str, os.PathLike], *, strict: bool = True,
                 backend: str = "auto") -> int:
    """Load the PEFT DoRA adapter in directory ``path`` (as written by PEFT's ``save_pretrained``
    or :func:`save_adapter`) into ``model``; returns the number of layers loaded.

    ``model`` is the base model the adapter was trained on (module names as in the adapter,
    without PEFT's ``base_model.model.`` prefix). Each adapted module must be a FusedDoraLinear
    of matching shape and scaling (e.g. from :func:`replace_linear`), or a plain ``nn.Linear``,
    which is replaced by a FusedDoraLinear (on ``backend``) with the adapter's r, lora_alpha
    (rank_pattern / alpha_pattern honoured), lora_dropout and use_rslora. Tensors are copied into
    the existing parameters (their dtype and device are kept). Everything is checked before
    anything changes. With ``strict``, a FusedDoraLinear of ``model`` the adapter does not cover is
    an error. Afterwards, as after replace_linear, only adapter parameters require grad.
    A model wrapped by torch.compile, DDP, DataParallel or FSDP is matched by its own module
    names (see :func:`unwrap_model`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap_model(model)
    config, per_module = _read_peft_adapter(path)
    real_names = {_peft_name(n): n for n, _ in model.named_modules() if n}  # names with wrapper parts
    plan = []
    for name, t in sorted(per_module.items()):
        r, alpha = _rank_and_alpha(config, name)
        scaling = alpha / (math.sqrt(r) if config.use_rslora else r)
        if name not in real_names:
            raise ValueError(f"the adapter has weights for {name!r}, which {type(model).__name__} does not have")
        module = model.get_submodule(real_names[name])
        if isinstance(module, FusedDoraLinear):
            if module.merged:
                raise ValueError(f"{name} is merged; call unmerge() before loading an adapter into it")
            if module.r != r or not math.isclose(module.scaling, scaling, rel_tol=1e-6):
                raise ValueError(f"{name}: the layer has r={module.r}, scaling={module.scaling:g} but the adapter "
                                 f"has r={r}, scaling={scaling:g}")
        elif not _replaceable(module):
            raise ValueError(f"{name} is a {type(module).__name__}; load_adapter needs a FusedDoraLinear, an nn.Linear "
                             "or a bitsandbytes Linear4bit")
        elif _read_directly(model, real_names[name]) is not None:
            raise ValueError(f"{_read_directly(model, real_names[name])}, "
                             "so an adapter there would be silently ignored")
        out_f, in_f = module.out_features, module.in_features
        expected = {"lora_A": (r, in_f), "lora_B": (out_f, r), "magnitude": (out_f,)}
        for attr, shape in expected.items():
            if tuple(t[attr].shape) != shape:
                raise ValueError(f"{name}: adapter tensor {attr} has shape {tuple(t[attr].shape)}, expected {shape}")
        plan.append((name, module, alpha, r))
    if strict:
        missing = sorted(set(_dora_layers(model)) - set(per_module))
        if missing:
            raise ValueError(f"the adapter has no weights for these FusedDoraLinear layers: {missing} "
                             "(pass strict=False to leave them as they are)")
    for name, module, alpha, r in plan:
        if not isinstance(module, FusedDoraLinear):
            module = FusedDoraLinear.from_linear(module, r, alpha, config.lora_dropout, config.use_rslora,
                                                 backend=backend)
            _swap(model, real_names[name], module)
        with torch.no_grad():
            for attr in _ADAPTER_PARAMS:
                getattr(module, attr).copy_(per_module[name][attr])
        module.clear_norm_cache()
    _freeze_all_but_adapters(model)
    return len(plan)
