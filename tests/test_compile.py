"""torch.compile: the op is registered through torch.library, so models compile with
fullgraph=True (no graph breaks), and opcheck validates the registrations."""
import warnings

import pytest
import torch
import torch._dynamo.testing

import fused_dora
from fused_dora import FusedDoraLinear, autograd
from helpers import DEVICE, make_inputs, rel_err, trained_layer


def _op_args(store_q=True, p=0.0, trainable=("x", "lora_A", "lora_B"), route="fused"):
    t = make_inputs(13, 20, 11, 3, seed=1)
    norm = fused_dora.dora_weight_norm(t["weight"], t["lora_A"], t["lora_B"], 1.5)
    for k in tuple(trainable) + (("magnitude",) if store_q else ()):
        t[k].requires_grad_()
    return (t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["magnitude"], norm, 1.5, p,
            torch.tensor([7], dtype=torch.int64), store_q, route)


@pytest.mark.parametrize("store_q, trainable", [
    (True, ("x", "lora_A", "lora_B")), (False, ("x", "lora_A", "lora_B")),
    # subsets: the forward saves no x / su, and the backward gets None for them
    (False, ("x",)), (False, ("lora_A",)), (False, ("lora_B",)), (True, ()),
], ids=["all", "no-magnitude", "x", "A", "B", "magnitude"])
def test_opcheck_forward(store_q, trainable):
    # test_aot_dispatch_dynamic is slow and adds nothing for an op with static output shapes
    torch.library.opcheck(autograd.dora_fwd, _op_args(store_q, trainable=trainable), test_utils=(
        "test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("route", ["composed", "auto"])
def test_opcheck_forward_routes(route):
    torch.library.opcheck(autograd.dora_fwd, _op_args(True, p=0.2, route=route), test_utils=(
        "test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static"))


def test_opcheck_row_norm():
    t = make_inputs(1, 20, 11, 3, seed=2)
    torch.library.opcheck(autograd.row_norm_op, (t["weight"], t["lora_A"], t["lora_B"], 0.5))


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(FusedDoraLinear(24, 32, r=4, lora_alpha=8), torch.nn.GELU(),
                                FusedDoraLinear(32, 16, r=3, lora_alpha=3)).to(DEVICE)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_model_matches_eager_fullgraph(backend):
    torch._dynamo.reset()
    model = _model()
    x = torch.randn(2, 5, 24, device=DEVICE)
    y_eager = model(x)
    y_eager.square().sum().backward()
    grads_eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    assert rel_err(y, y_eager) < 1e-5
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert rel_err(p.grad, grads_eager[n]) < 1e-5, n


def test_compiled_dropout_runs_and_backward_reuses_its_mask():
    torch._dynamo.reset()
    layer = FusedDoraLinear(24, 16, r=4, lora_dropout=0.3).to(DEVICE)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(6, 24, device=DEVICE, requires_grad=True)
    y1, y2 = compiled(x), compiled(x)
    assert not torch.equal(y1, y2)  # fresh masks per call
    # same RNG state, same mask: the compiled forward and backward equal the eager ones
    torch.manual_seed(3)
    compiled(x).sum().backward()
    g_compiled, x.grad = x.grad, None
    torch.manual_seed(3)
    layer(x).sum().backward()
    assert rel_err(g_compiled, x.grad) < 1e-5


@pytest.mark.parametrize("call", ["module", "function"])
def test_dynamic_shapes_fullgraph(call):
    """Variable sequence lengths: torch.compile(dynamic=True, fullgraph=True) traces the scaling as
    a symbolic float (its checks must not break the graph) and compiles once for every M."""
    torch._dynamo.reset()
    layer = _model()[0]
    if call == "module":
        fn = layer
    else:
        def fn(x):
            return fused_dora.dora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.magnitude,
                                          layer.scaling, training=True)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, dynamic=True, fullgraph=True)
    for m in (5, 7, 19, 33):
        x = torch.randn(2, m, 24, device=DEVICE, requires_grad=True)
        y = compiled(x)
        y.square().sum().backward()
        grads = (x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.magnitude.grad)
        x_eager = x.detach().clone().requires_grad_()
        layer.zero_grad()
        y_eager = fn(x_eager)
        y_eager.square().sum().backward()
        assert rel_err(y, y_eager) < 1e-5
        eager = (x_eager.grad, layer.lora_A.grad, layer.lora_B.grad, layer.magnitude.grad)
        for g, e in zip(grads, eager):
            assert rel_err(g, e) < 1e-5
        layer.zero_grad()
        if m == 5:
            frames = counter.frame_count
    assert counter.frame_count == frames  # no recompilation for new sequence lengths


def test_compiled_non_finite_scaling_is_refused():
    torch._dynamo.reset()
    layer = _model()[0]
    layer.scaling = float("inf")
    with pytest.raises(Exception, match="scaling must be finite"):
        torch.compile(layer, backend="aot_eager", dynamic=True)(torch.randn(3, 24, device=DEVICE))


def test_compile_raises_no_warnings_from_fused_dora():
    layer = trained_layer(seed=13)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 24, device=DEVICE)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(x)
    ours = [w for w in caught if "fused_dora" in str(w.filename) or "lru_cache" in str(w.message)]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]
