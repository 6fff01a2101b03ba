"""Regression tests for the defects of issue 9 (3 to 13): each one failed before its fix."""
import copy
import os
import pathlib
import subprocess
import warnings

import pytest
import torch
import torch.nn as nn

import fused_dora
import fused_dora.backend as backend
from fused_dora import FusedDoraLinear, autograd, reference, replace_linear
from helpers import DEVICE, TOL, assert_close, fp64, make_inputs, reference_fp64, rel_err, run

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCALING = 1.5


def _triton(**kw):
    return fused_dora.dora_linear(**kw, backend="triton")


def _library_route(x, weight, bias, lora_A, lora_B, magnitude, scaling, **kw):
    """The torch.library ops that torch.compile calls, run eagerly."""
    norm = fused_dora.dora_weight_norm(weight, lora_A, lora_B, scaling)
    y = autograd.dora_linear_2d(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, magnitude, norm, scaling, 0.0)
    return y.reshape(*x.shape[:-1], -1)


# ---- 3: in-place ops on the output ----------------------------------------------------------------
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


def test_in_place_after_peft_projection():
    peft = pytest.importorskip("peft")
    from fused_dora.integrations.peft import enable_fused_dora

    torch.manual_seed(3)
    model = peft.get_peft_model(nn.Sequential(nn.Linear(12, 12), nn.ReLU(inplace=True)),
                                peft.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    enable_fused_dora(model)
    x = torch.randn(5, 12, device=DEVICE)
    model.to(DEVICE)
    model(x).sum().backward()
    out = model.base_model.model[0](x)
    out += x
    out.sum().backward()


# ---- 4, 6: merged layers loading checkpoints and changing dtype ------------------------------------
def _trained_layer(seed, **kwargs):
    torch.manual_seed(seed)
    layer = FusedDoraLinear(24, 16, r=3, lora_alpha=6, device=DEVICE, **kwargs).eval()
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        layer.magnitude.mul_(1.2)
    return layer


def _function_of(layer, x):
    with torch.no_grad():
        return reference.dora_linear(x.double(), layer.weight.double(), layer.bias.double(), layer.lora_A.double(),
                                     layer.lora_B.double(), layer.magnitude.double(), layer.scaling)


def test_load_state_dict_into_merged_layer():
    source = _trained_layer(seed=4)
    layer = _trained_layer(seed=4)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)  # a different adapter on the same base weight
    x = torch.randn(5, 24, device=DEVICE)
    expect = _function_of(source, x)
    layer.merge()
    layer.load_state_dict(source.state_dict())
    assert layer.merged  # loaded, then merged again
    with torch.no_grad():
        assert rel_err(layer(x), expect) < 1e-5
    layer.unmerge()
    assert rel_err(layer.weight, source.weight) < 1e-6
    with torch.no_grad():
        assert rel_err(layer(x), expect) < 1e-5


def test_load_state_dict_assign_leaves_the_callers_tensors_alone():
    source = _trained_layer(seed=4)
    sd = source.state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    x = torch.randn(5, 24, device=DEVICE)
    expect = _function_of(source, x)
    layers = []
    for _ in range(2):  # a second layer loaded from the same dict sees what the first saw
        layer = _trained_layer(seed=7)
        layer.merge()
        layer.load_state_dict(sd, assign=True)
        assert layer.merged and layer.weight.data_ptr() != sd["weight"].data_ptr()
        assert not layer.weight.requires_grad
        layers.append(layer)
    for k, v in sd.items():
        assert torch.equal(v, before[k]), k
    for layer in layers:
        with torch.no_grad():
            assert rel_err(layer(x), expect) < 1e-5
        layer.unmerge()
        assert rel_err(layer.weight, source.weight) < 1e-6


@pytest.mark.parametrize("cast", ["half", "bfloat16", "double", "to"])
def test_merged_layer_survives_dtype_casts(cast):
    layer = _trained_layer(seed=5)
    x = torch.randn(5, 24, device=DEVICE)
    expect = _function_of(layer, x)
    base = layer.weight.detach().clone()
    layer.merge()
    layer = layer.to(torch.float16) if cast == "to" else getattr(layer, cast)()
    dtype = layer.weight.dtype
    tol = {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float64: 1e-6}[dtype]
    assert layer.merged
    state = layer.state_dict()  # was: "unmerge(): ... changed since merge()"
    assert rel_err(state["weight"], base) < tol
    with torch.no_grad():
        assert rel_err(layer(x.to(dtype)), expect) < 2 * tol
    layer.unmerge()
    assert rel_err(layer.weight, base) < tol


# ---- 5: double backward -------------------------------------------------------------------------
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


# ---- 7: fp16 magnitude gradient with a small c and large activations -----------------------------
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


# ---- 8: float64 stays float64 -------------------------------------------------------------------
def test_float64_layer_is_float64_accurate():
    layer = _trained_layer(seed=8, dtype=torch.float64)
    assert layer.weight_norm().dtype == torch.float64
    x = torch.randn(5, 24, device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
        expect = reference.dora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.magnitude,
                                       layer.scaling)
    assert y.dtype == torch.float64 and rel_err(y, expect) < 1e-14
    norm = fused_dora.dora_weight_norm(layer.weight, layer.lora_A, layer.lora_B, layer.scaling)
    assert norm.dtype == torch.float64


# ---- 9: no silent fallback when the kernels cannot be imported -----------------------------------
@pytest.fixture
def kernels_unimportable(monkeypatch):
    def broken():
        raise ImportError("simulated: no module named 'triton'")

    monkeypatch.setattr(backend, "_kernels_module", None)
    monkeypatch.setattr(backend, "_import_kernels", broken)
    monkeypatch.setattr(backend, "_DEVICE_REASONS", {})


@pytest.mark.skipif(not os.environ.get("TRITON_INTERPRET") and DEVICE == "cpu", reason="needs kernels to expect")
def test_broken_kernels_import_warns_and_status_tells(kernels_unimportable):
    t = make_inputs(4, 12, 10, 2, seed=9)
    with pytest.warns(backend.FusedDoraWarning, match="cannot be imported"):
        y = fused_dora.dora_linear(**t, scaling=SCALING)
    expect = reference.dora_linear(**t, scaling=SCALING)
    assert rel_err(y, expect) < 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process and device, not once per call
        fused_dora.dora_linear(**t, scaling=SCALING)
    with pytest.raises(ValueError, match="cannot be imported"):
        fused_dora.dora_linear(**t, scaling=SCALING, backend="triton")

    peft = pytest.importorskip("peft")
    from fused_dora.integrations.peft import enable_fused_dora, fused_dora_status

    model = peft.get_peft_model(nn.Sequential(nn.Linear(12, 10)), peft.LoraConfig(r=2, target_modules=["0"],
                                                                                   use_dora=True)).to(DEVICE)
    enable_fused_dora(model)
    with torch.no_grad():
        model(t["x"])
    (status,) = fused_dora_status(model).values()
    assert status.startswith("fused op on the PyTorch reference path") and "cannot be imported" in status


# ---- 10: bf16 under the interpreter ---------------------------------------------------------------
@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter runs only without a GPU here")
def test_bf16_under_the_interpreter_is_refused_or_referenced():
    t = make_inputs(6, 16, 12, 2, dtype=torch.bfloat16, adapter_dtype=torch.float32, seed=10)
    with pytest.raises(TypeError, match="bfloat16"):
        fused_dora.dora_linear(**t, scaling=SCALING, backend="triton")
    y = fused_dora.dora_linear(**t, scaling=SCALING)  # auto: the reference path
    assert rel_err(y, reference.dora_linear(**fp64(t), scaling=SCALING)) < TOL[torch.bfloat16]
    with pytest.raises(TypeError, match="bfloat16"):
        fused_dora.dora_weight_norm(t["weight"], t["lora_A"].bfloat16(), t["lora_B"].bfloat16(), 1.0,
                                    backend="triton")


# ---- 11: errors name the argument ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["x", "weight"])
def test_sparse_inputs_are_refused(name):
    t = make_inputs(6, 16, 12, 2, seed=11)
    t[name] = t[name].to_sparse()
    with pytest.raises(TypeError, match=f"{name} must be a dense"):
        fused_dora.dora_linear(**t, scaling=SCALING)


def test_integration_functions_check_model_type():
    pytest.importorskip("peft")
    from fused_dora.integrations.peft import disable_fused_dora, enable_fused_dora, fused_dora_status

    for fn, arg in ((disable_fused_dora, None), (fused_dora_status, "model"), (enable_fused_dora, 3)):
        with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
            fn(arg)


def test_torch_func_transforms():
    t = make_inputs(6, 16, 12, 2, seed=12)

    def loss(lora_B, backend):
        return fused_dora.dora_linear(**{**t, "lora_B": lora_B}, scaling=SCALING, backend=backend).square().sum()

    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.func.grad(loss)(t["lora_B"], "triton")
    got = torch.func.grad(loss)(t["lora_B"], "auto")  # auto: the reference path, exact
    expect = torch.func.grad(loss)(t["lora_B"], "reference")
    assert rel_err(got, expect) < 1e-6
    layer = _trained_layer(seed=12)
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
    layer = _trained_layer(seed=14)
    x, dx = torch.randn(3, 24, device=DEVICE), torch.randn(3, 24, device=DEVICE)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(layer(fwAD.make_dual(x, dx))).tangent
    expect = torch.func.jvp(lambda x: _function_of(layer, x), (x.double(),), (dx.double(),))[1]
    assert rel_err(tangent, expect) < 1e-5


# ---- 12: nn.TransformerEncoderLayer's fast path --------------------------------------------------
def test_transformer_encoder_layer_feed_forward_is_guarded():
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True).eval()
    with pytest.raises(ValueError, match="fast path reads linear1.weight directly"):
        replace_linear(layer, ["linear1"], r=2, lora_alpha=4)
    # out_proj is no plain nn.Linear; linear1 and linear2 are read directly: nothing is left, and the
    # error says why rather than only "matched nothing"
    with pytest.raises(ValueError, match="matched no torch.nn.Linear.*left out.*fast path reads linear1.weight"):
        replace_linear(layer, "all-linear", r=2, lora_alpha=4)
    model = nn.Sequential(copy.deepcopy(layer), nn.Linear(16, 4))
    with pytest.warns(UserWarning, match="2 nn.Linear modules are not replaced.*0.linear1.*0.linear2"):
        assert replace_linear(model, "all-linear", r=2, lora_alpha=4) == 1  # only the head


# ---- 13: no warnings from our code under torch.compile --------------------------------------------
def test_compile_raises_no_warnings_from_fused_dora():
    layer = _trained_layer(seed=13)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 24, device=DEVICE)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(x)
    ours = [w for w in caught if "fused_dora" in str(w.filename) or "lru_cache" in str(w.message)]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]
