"""The norm is the current parameters' norm in every forward, whatever updated them; the cache
rules of FusedDoraLinear (training forwards compute it, other forwards reuse it while its inputs
provably hold).

torch.optim's fused optimizers update parameters without bumping their version counters, so a
norm cached on version counters alone goes stale after their first step. The training-loop tests
train a Triton-path layer beside a reference-backend twin (which has no cache) and check outputs,
gradients and parameters along the way.
"""
import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import fused_dora
from fused_dora import FusedDoraLinear, reference, replace_linear
from helpers import DEVICE, layer_reference, randomize_layer, rel_err

ADAPTERS = ("lora_A", "lora_B", "magnitude")
OPTIMIZERS = {f"{cls.__name__}-{form}": (cls, kw) for cls in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
              for form, kw in (("fused", {"fused": True}), ("foreach", {"foreach": True}),
                               ("forloop", {"foreach": False}))}


def test_norm_cache_rules(monkeypatch):
    """Training forwards compute the norm; other forwards reuse it while its inputs provably hold."""
    calls = []
    # every norm the Triton backend computes goes through the norm pass's launcher once: for the
    # cache (dora_weight_norm -> dora_row_norm) and in a training forward (finished by the GEMM)
    fused_dora.backend.load_kernels()
    from fused_dora.kernels import norm as norm_kernels

    real = norm_kernels.row_norm_partials
    monkeypatch.setattr(norm_kernels, "row_norm_partials", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    layer = FusedDoraLinear(16, 12, r=3, device=DEVICE)
    randomize_layer(layer)
    x = torch.randn(4, 16, device=DEVICE)
    calls.clear()
    for _ in range(3):  # every training forward (an optimizer may act unseen between them)
        layer(x).sum().backward()
    assert len(calls) == 3
    layer.eval()
    with torch.no_grad():
        layer(x), layer(x)
    assert len(calls) == 4  # eval: computed once, then reused
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["lora_B"].mul_(2)
    layer.load_state_dict(state)  # copy_ into the parameters: versions change
    with torch.no_grad():
        y_loaded = layer(x)
    assert len(calls) == 5
    assert rel_err(y_loaded, layer_reference(layer, x)) < 1e-5
    with torch.no_grad():
        layer(x)
        layer.scaling = 3.0  # scaling is part of the key too
        layer(x)
    assert len(calls) == 6
    layer.double().float()  # .to() & co. drop the cache
    with torch.no_grad():
        layer(x)
    assert len(calls) == 7
    layer.train()
    layer(x)  # a training forward drops the eval entry ...
    layer.eval()
    with torch.no_grad():
        layer(x)  # ... so the next eval forward computes afresh
    assert len(calls) == 9
    with torch.no_grad():
        layer(x)
    assert len(calls) == 9
    torch.optim.SGD([layer.lora_B], lr=0.0, fused=True).step()  # any torch.optim step invalidates
    with torch.no_grad():
        layer(x)
    assert len(calls) == 10


def test_clear_norm_cache_after_data_writes():
    layer = FusedDoraLinear(16, 12, r=3, device=DEVICE)
    x = torch.randn(4, 16, device=DEVICE)
    layer(x)
    layer.lora_B.data.normal_()  # bypasses version counters: documented, needs clear_norm_cache()
    layer.clear_norm_cache()
    expect = layer_reference(layer, x)
    assert rel_err(layer(x), expect) < 1e-5


def test_layer_built_in_inference_mode_computes_norm_each_call():
    with torch.inference_mode():
        layer = FusedDoraLinear(16, 8, r=2, device=DEVICE)
        x = torch.randn(3, 16, device=DEVICE)
        y1 = layer(x)
        layer.lora_B.add_(0.5)  # no version counter to notice this: the norm must not be cached
        y2 = layer(x)
        expect = layer_reference(layer, x)
    assert rel_err(y2, expect) < 1e-5 and not torch.equal(y1, y2)


class ReferenceDora(nn.Module):
    """The truth: the reference math on a copy of a layer's parameters, the norm computed in
    every call (no cache of any kind)."""

    def __init__(self, layer: FusedDoraLinear):
        super().__init__()
        for name, p in layer.named_parameters():
            setattr(self, name, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
        self.scaling = layer.scaling

    def forward(self, x):
        return reference.dora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.magnitude,
                                     self.scaling)


def _pair(seed=0, **kwargs):
    """A FusedDoraLinear on the kernels and its cache-free reference twin with equal parameters."""
    torch.manual_seed(seed)
    layer = FusedDoraLinear(24, 20, r=4, lora_alpha=8, device=DEVICE, **kwargs)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        layer.magnitude.mul_(1.3)
    return layer, ReferenceDora(layer)


def _params(layer):
    return [getattr(layer, n) for n in ADAPTERS]


def _eval_output(layer, x):
    layer.eval()
    with torch.no_grad():
        y = layer(x)
    layer.train()
    return y


def _check_same(layer, twin, what, tol=1e-5):
    for name in ADAPTERS:
        assert rel_err(getattr(layer, name), getattr(twin, name)) < tol, f"{what}: {name}"


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_steps_with_accumulation(name):
    """3 steps of 2 accumulated micro-batches; outputs and grads of every forward, and an eval
    pass after every step, match the cache-free reference twin."""
    cls, kw = OPTIMIZERS[name]
    layer, twin = _pair()
    opts = [cls(_params(m), lr=0.05, **kw) for m in (layer, twin)]
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        for micro in range(2):
            x = torch.randn(6, 24, generator=g).to(DEVICE)
            outs = []
            for m in (layer, twin):
                y = m(x)
                y.square().sum().backward()
                outs.append(y.detach())
            assert rel_err(*outs) < 1e-5, f"step {step} micro {micro}: output"
            for n in ADAPTERS:
                assert rel_err(getattr(layer, n).grad, getattr(twin, n).grad) < 1e-5, f"step {step}: grad {n}"
        for opt in opts:
            opt.step()
            opt.zero_grad()
        _check_same(layer, twin, f"after step {step}")
        assert rel_err(_eval_output(layer, x), _eval_output(twin, x)) < 1e-5, f"eval after step {step}"


class _PlainOptimizer:
    """Not a torch.optim.Optimizer: SGD through ``.data``, which bumps no version counter."""

    def __init__(self, params, lr):
        self.params, self.lr = list(params), lr

    def step(self):
        for p in self.params:
            p.data.sub_(self.lr * p.grad)


def _hand_written_step(params, lr=0.05):
    with torch.no_grad():
        for p in params:
            p.sub_(lr * p.grad)


@pytest.mark.parametrize("update", ["plain_optimizer", "hand_written"])
def test_updates_outside_torch_optim(update):
    layer, twin = _pair(seed=2)
    steppers = [(_PlainOptimizer(_params(m), 0.05).step if update == "plain_optimizer"
                 else (lambda m=m: _hand_written_step(_params(m)))) for m in (layer, twin)]
    x = torch.randn(5, 24, device=DEVICE)
    for step in range(3):
        outs = []
        for m, stepper in zip((layer, twin), steppers):
            m.zero_grad()
            y = m(x)
            y.square().sum().backward()
            stepper()
            outs.append(y.detach())
        assert rel_err(*outs) < 1e-5, f"step {step}"
        assert rel_err(_eval_output(layer, x), _eval_output(twin, x)) < 1e-5, f"eval after step {step}"


def test_eval_between_backward_and_fused_step():
    """backward, eval pass (caches the norm), fused step (no version bump), eval again: the step
    hook of torch.optim makes the second eval pass compute the norm afresh."""
    layer, twin = _pair(seed=3)
    opts = [torch.optim.AdamW(_params(m), lr=0.05, fused=True) for m in (layer, twin)]
    x = torch.randn(5, 24, device=DEVICE)
    for m, opt in zip((layer, twin), opts):
        m(x).square().sum().backward()
        _eval_output(m, x)
        opt.step()
    assert rel_err(_eval_output(layer, x), _eval_output(twin, x)) < 1e-5


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_with_fused_steps(reentrant):
    """Checkpointed forwards recompute the norm in the backward (the same bits as the forward's);
    across fused steps the gradients stay the reference twin's. (Dropout masks under
    checkpointing: test_checkpointing.py.)"""
    layer, twin = _pair(seed=4)
    opts = [torch.optim.AdamW(_params(m), lr=0.05, fused=True) for m in (layer, twin)]
    g = torch.Generator().manual_seed(5)
    for step in range(3):
        x = torch.randn(7, 24, generator=g).to(DEVICE).requires_grad_()
        for m in (layer, twin):
            checkpoint(m, x, use_reentrant=reentrant).square().sum().backward()
        for n in ADAPTERS:
            assert rel_err(getattr(layer, n).grad, getattr(twin, n).grad) < 1e-5, f"step {step}: grad {n}"
        for opt in opts:
            opt.step()
            opt.zero_grad()


def test_replace_linear_model_with_fused_adamw():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).to(DEVICE)
    replace_linear(model, ["0", "2"], r=4, lora_alpha=8)
    twin = copy.deepcopy(model)
    twin[0], twin[2] = ReferenceDora(model[0]), ReferenceDora(model[2])
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.05, fused=True)
            for m in (model, twin)]
    g = torch.Generator().manual_seed(7)
    for step in range(3):
        x = torch.randn(6, 16, generator=g).to(DEVICE)
        losses = []
        for m, opt in zip((model, twin), opts):
            loss = m(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        assert rel_err(*losses) < 1e-5, f"step {step}"


def test_inference_mode_validation_between_training_steps():
    """Lightning validates under inference_mode: its norm must not be saved by the next step."""
    layer, twin = _pair(seed=8)
    opts = [torch.optim.AdamW(_params(m), lr=0.05, fused=True) for m in (layer, twin)]
    x = torch.randn(5, 24, device=DEVICE)
    for _ in range(2):
        for m, opt in zip((layer, twin), opts):
            m.train()
            m(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
            m.eval()
            with torch.inference_mode():
                m(x), m(x)
        with torch.inference_mode():
            assert rel_err(layer(x), twin(x)) < 1e-5
    layer.train()
    layer(x).square().sum().backward()  # was: "Inference tensors cannot be saved for backward"
    layer.eval()
    with torch.no_grad():
        y = layer(x)  # a norm made under inference_mode is not reused outside it
    assert not y.is_inference()
