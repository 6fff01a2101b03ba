"""A user script that mypy --strict checks against fused_dora's signatures (tests/test_typing.py); never run."""
import torch
import torch.nn as nn

import fused_dora
from fused_dora import FusedDoraLinear, dora_linear, dora_weight_norm, load_adapter, replace_linear, save_adapter
from fused_dora.integrations.peft import disable_fused_dora, enable_fused_dora, fused_dora_status
from fused_dora.integrations.transformers import FusedDoraCallback


def main() -> None:
    layer = FusedDoraLinear(16, 8, r=4, lora_alpha=8.0, lora_dropout=0.1, device="cpu", dtype=torch.float32)
    layer2: FusedDoraLinear = FusedDoraLinear.from_linear(nn.Linear(16, 8), r=2, backend="reference")
    x = torch.randn(3, 16)
    y: torch.Tensor = layer(x) + layer2(x)
    n: torch.Tensor = layer.weight_norm()
    layer.merge()
    layer.unmerge()
    layer.clear_norm_cache()
    z: torch.Tensor = dora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.magnitude,
                                  layer.scaling, dropout_p=0.0, training=False, backend="auto", norm=n)
    norm: torch.Tensor = dora_weight_norm(layer.weight, layer.lora_A, layer.lora_B, 2.0)
    ref: torch.Tensor = fused_dora.reference.dora_linear(x, layer.weight, None, layer.lora_A, layer.lora_B,
                                                         layer.magnitude, 2.0)
    model = nn.Sequential(nn.Linear(16, 16))
    count: int = replace_linear(model, ["0"], r=4, lora_alpha=8)
    save_adapter(model, "adapter", task_type="CAUSAL_LM")
    loaded: int = load_adapter(model, "adapter", strict=True)
    switched: int = enable_fused_dora(model, "fused", backend="auto", warn=False)
    status = fused_dora_status(model)
    counts: dict[str, int] = status.counts
    first: str = next(iter(status.values()), "")
    restored: int = disable_fused_dora(model)
    callback = FusedDoraCallback("fused", backend="auto", warn=True)
    layers = callback.fused_layers
    print(y, z, norm, ref, count, loaded, switched, counts, first, restored, layers, fused_dora.__version__)
