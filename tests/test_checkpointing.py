"""Activation checkpointing over FusedDoraLinear: the recomputed forward draws the same dropout
mask, so gradients equal the non-checkpointed run's."""
import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from fused_dora import FusedDoraLinear
from helpers import DEVICE, tiny_llama
from helpers import rel_err as rel


def dora(in_f, out_f, r, seed, dropout=0.3):
    torch.manual_seed(seed)
    layer = FusedDoraLinear(in_f, out_f, r=r, lora_alpha=2 * r, lora_dropout=dropout, device=DEVICE)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        layer.magnitude.mul_(1.2)
    return layer


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([dora(20, 36, 3, 0), dora(36, 36, 5, 1, dropout=0.5), dora(36, 12, 1, 2)])

    def forward(self, x, use_checkpoint=None):
        for i, layer in enumerate(self.layers):
            if use_checkpoint is None:
                x = layer(x)
            else:
                x = checkpoint(layer, x, use_reentrant=use_checkpoint)
            x = torch.tanh(x) if i < len(self.layers) - 1 else x
        return x


def grads_of(model, forward, seed=7):
    model.zero_grad(set_to_none=True)
    x = torch.randn(3, 5, model_in(model), device=DEVICE, generator=None)
    x = x.requires_grad_(True)  # the reentrant variant needs an input that requires grad
    torch.manual_seed(seed)
    out = forward(x)
    g = torch.Generator().manual_seed(1)
    out.backward(torch.randn(out.shape, generator=g).to(DEVICE))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    grads["x"] = x.grad.clone()
    return out.detach(), grads


def model_in(model):
    return model.in_features if isinstance(model, FusedDoraLinear) else model.layers[0].in_features


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpointed_layer_with_dropout(use_reentrant):
    layer = dora(24, 40, 4, 0).train()
    torch.manual_seed(0)
    ref_out, ref = grads_of(layer, layer)
    torch.manual_seed(0)
    out, got = grads_of(layer, lambda x: checkpoint(layer, x, use_reentrant=use_reentrant))
    assert torch.equal(out, ref_out)
    for name in ref:
        assert rel(got[name], ref[name]) < 1e-6, name
    # dropout is really active: another seed gives other gradients
    torch.manual_seed(0)
    _, other = grads_of(layer, layer, seed=8)
    assert rel(other["lora_A"], ref["lora_A"]) > 1e-3


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpointed_stack_with_dropout(use_reentrant):
    model = Stack().train()
    torch.manual_seed(0)
    ref_out, ref = grads_of(model, model)
    torch.manual_seed(0)
    out, got = grads_of(model, lambda x: model(x, use_checkpoint=use_reentrant))
    assert torch.equal(out, ref_out)
    assert set(got) == set(ref) and len(ref) == 3 * 3 + 1
    for name in ref:
        assert rel(got[name], ref[name]) < 1e-6, name


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_transformers_gradient_checkpointing(use_reentrant):
    pytest.importorskip("transformers")
    from fused_dora.replace import replace_linear

    def build():
        model = tiny_llama(seed=0)
        replace_linear(model, ["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8, lora_dropout=0.2)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(0, 0.2)
        return model.train()

    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3)).to(DEVICE)

    def loss_and_grads(model):
        torch.manual_seed(11)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    ref_loss, ref = loss_and_grads(build())
    model = build()
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        assert model.is_activation_checkpointing
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        assert model.is_gradient_checkpointing
    if use_reentrant:
        model.enable_input_require_grads()  # frozen embeddings: give the reentrant checkpoint a grad input
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda *_: calls.append(1))
    loss, got = loss_and_grads(model)
    assert len(calls) == 2  # forward, then the recompute in backward
    assert rel(loss, ref_loss) < 1e-6
    assert set(got) == set(ref) and len(ref) == 3 * 2 * 3
    for name in ref:
        assert got[name] is not None, name
        assert rel(got[name], ref[name]) < 1e-5, name
