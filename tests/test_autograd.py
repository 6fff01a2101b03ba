"""Autograd beyond one backward: in-place ops on the output, double backward, torch.func
transforms, forward-mode AD; a finite fp16 magnitude gradient where c is small and the
activations large; float64 layers that stay float64-accurate."""
import pytest
import torch
import torch.nn as nn

import fused_dora
from fused_dora import FusedDoraLinear, autograd, reference
from helpers import (
    DEVICE,
    TOL,
    assert_close,
    fp64,
    layer_reference,
    make_inputs,
    reference_fp64,
    rel_err,
    run,
    trained_layer,
)

SCALING = 1.5


def _triton(**kw):
    return fused_dora.dora_linear(**kw, backend="triton")


def _library_route(x, weight, bias, lora_A, lora_B, magnitude, scaling, **kw):
    """The torch.library ops that torch.compile calls, run eagerly."""
    norm = fused_dora.dora_weight_norm(weight, lora_A, lora_B, scaling)
    y = autograd.dora_linear_2d(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, magnitude, norm, scaling, 0.0)
    return y.reshape(*x.shape[:-1], -1)


def _then_in_place(fn):
    def call(**kw):
        y = fn(**kw)
        y += 0.5  # h += residual
        y.relu_()
        return y
    return call


@pytest.mark.parametrize("route", [_triton, _library_route], ids=["function", "custom_op"])
def test_in_place_ops_on_the_output(route):
    t = make_inputs(9, 24, 20, 3, lead=(3, 3), seed=1)
    got = run(_then_in_place(route), t, scaling=SCALING)
    ref = run(_then_in_place(reference.dora_linear), fp64(t), grad_out_dtype=torch.float32, scaling=SCALING)
    assert_close(*got, *ref, torch.float32, "in-place after the op")


def test_in_place_after_module_and_compiled():
    torch.manual_seed(2)
    layer = FusedDoraLinear(16, 16, r=2, device=DEVICE)
    model = nn.Sequential(layer, nn.ReLU(inplace=True))
    x = torch.randn(4, 16, device=DEVICE)
    model(x).sum().backward()
    h = layer(x)
    h += x  # residual
    h.sum().backward()
    assert layer.lora_A.grad is not None

    def step(x):
        y = layer(x)
        y.relu_()
        return y

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), step(x))


@pytest.mark.parametrize("route", [_triton, _library_route], ids=["function", "custom_op"])
def test_double_backward_raises(route):
    t = make_inputs(6, 16, 12, 2, seed=6)
    leaves = {k: (v.detach().clone().requires_grad_(k in ("x", "lora_B")) if v is not None else None)
              for k, v in t.items()}
    y = route(**leaves, scaling=SCALING)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.square().sum(), leaves["lora_B"], create_graph=True)
    # the reference backend takes higher-order gradients
    y = fused_dora.dora_linear(**leaves, scaling=SCALING, backend="reference")
    (g,) = torch.autograd.grad(y.square().sum(), leaves["lora_B"], create_graph=True)
    g.square().sum().backward()
    assert leaves["x"].grad is not None and leaves["x"].grad.abs().sum() > 0


@pytest.mark.parametrize("small", ["magnitude", "scale"])
def test_fp16_magnitude_grad_finite_where_reference_is(small):
    """c = g / n = 1e-3 with y well inside fp16 but ypre = y / c far outside it. Both ways of
    making c small: a small magnitude (n ~ 1), or a large norm (g ~ 1)."""
    t = make_inputs(8, 64, 20, 4, dtype=torch.float16, adapter_dtype=torch.float32, seed=7)
    with torch.no_grad():
        w = torch.ones(20, 64) / 8 + 0.01 * torch.randn(20, 64)  # rows aligned with x: large x @ W.T
        # ypre = x @ W.T ~ 72000 (n ~ 1) or 320000 (n ~ 1000): both past fp16's 65504; y = c * ypre is not
        x_level, w_level = (9000, 1.0) if small == "magnitude" else (40, 1000.0)
        t["weight"] = (w * w_level).to(t["x"])
        t["x"] = (x_level * (1 + 0.01 * torch.randn(8, 64))).to(t["x"])
        n = reference.weight_norm(t["weight"], t["lora_A"], t["lora_B"], SCALING)
        t["magnitude"] = (1e-3 * n).float()
    y, grads = run(_triton, t, scaling=SCALING)
    ref_y, ref_grads = reference_fp64(t, SCALING)
    assert y.isfinite().all() and y.abs().max() > 50
    for name, g in grads.items():
        assert ref_grads[name].isfinite().all()
        assert g.isfinite().all(), f"{name}: non-finite where the reference is finite"
    assert rel_err(grads["magnitude"], ref_grads["magnitude"]) < TOL[torch.float16]


def test_float64_layer_is_float64_accurate():
    layer = trained_layer(seed=8, dtype=torch.float64)
    assert layer.weight_norm().dtype == torch.float64
    x = torch.randn(5, 24, device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
        expect = reference.dora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.magnitude,
                                       layer.scaling)
    assert y.dtype == torch.float64 and rel_err(y, expect) < 1e-14
    norm = fused_dora.dora_weight_norm(layer.weight, layer.lora_A, layer.lora_B, layer.scaling)
    assert norm.dtype == torch.float64


def test_torch_func_transforms():
    t = make_inputs(6, 16, 12, 2, seed=12)

    def loss(lora_B, backend):
        return fused_dora.dora_linear(**{**t, "lora_B": lora_B}, scaling=SCALING, backend=backend).square().sum()

    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.func.grad(loss)(t["lora_B"], "triton")
    got = torch.func.grad(loss)(t["lora_B"], "auto")  # auto: the reference path, exact
    expect = torch.func.grad(loss)(t["lora_B"], "reference")
    assert rel_err(got, expect) < 1e-6
    layer = trained_layer(seed=12)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = torch.randn(3, 24, device=DEVICE)
    grads = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,)).sum())(params)
    assert grads["lora_B"].abs().sum() > 0


def test_forward_mode_ad():
    """Dual tensors (torch.autograd.forward_ad): "auto" computes the jvp on the reference path,
    "triton" says why it cannot, and a FusedDoraLinear gives the reference's tangent."""
    import torch.autograd.forward_ad as fwAD

    t = make_inputs(6, 16, 12, 2, seed=14)
    tangents = make_inputs(6, 16, 12, 2, seed=15)

    def jvp(backend, name):
        with fwAD.dual_level():
            args = {**t, name: fwAD.make_dual(t[name], tangents[name])}
            y = fused_dora.dora_linear(**args, scaling=SCALING, backend=backend)
            return fwAD.unpack_dual(y).tangent

    for name in ("x", "lora_A", "lora_B", "magnitude"):
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            jvp("triton", name)
        assert rel_err(jvp("auto", name), jvp("reference", name)) < 1e-6, name
    layer = trained_layer(seed=14)
    x, dx = torch.randn(3, 24, device=DEVICE), torch.randn(3, 24, device=DEVICE)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(layer(fwAD.make_dual(x, dx))).tangent
    expect = torch.func.jvp(lambda x: layer_reference(layer, x), (x.double(),), (dx.double(),))[1]
    assert rel_err(tangent, expect) < 1e-5
