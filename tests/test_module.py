"""FusedDoraLinear: construction, parity with the functional reference, merge; merged layers saved,
copied, loaded from state dicts and cast to other dtypes. (The norm cache: test_norm_cache.py.)"""
import math

import pytest
import torch
import torch.nn as nn

import fused_dora
from fused_dora import FusedDoraLinear
from helpers import DEVICE, layer_reference, randomize_layer, rel_err, trained_layer


def test_fresh_layer_is_its_base_linear():
    torch.manual_seed(0)
    base = nn.Linear(37, 29, device=DEVICE)
    layer = FusedDoraLinear.from_linear(base, r=4, lora_alpha=8)
    x = torch.randn(5, 37, device=DEVICE)
    assert torch.equal(layer.magnitude / layer.weight_norm(), torch.ones(29, device=DEVICE))
    assert rel_err(layer(x), base(x)) < 1e-6


def test_parameters_shapes_and_init():
    layer = FusedDoraLinear(20, 12, r=6, lora_alpha=12, lora_dropout=0.1, device=DEVICE)
    assert layer.weight.shape == (12, 20) and not layer.weight.requires_grad
    assert layer.bias.shape == (12,) and not layer.bias.requires_grad
    assert layer.lora_A.shape == (6, 20) and layer.lora_A.requires_grad
    assert layer.lora_B.shape == (12, 6) and torch.count_nonzero(layer.lora_B) == 0
    assert layer.magnitude.shape == (12,)
    assert layer.scaling == 2.0
    assert FusedDoraLinear(20, 12, r=16, lora_alpha=8, use_rslora=True).scaling == 8 / math.sqrt(16)
    assert FusedDoraLinear(20, 12, bias=False).bias is None
    half = FusedDoraLinear(20, 12, dtype=torch.float16)
    assert half.weight.dtype == torch.float16 and half.lora_A.dtype == torch.float32  # as PEFT
    assert sorted(n for n, p in layer.named_parameters() if p.requires_grad) == ["lora_A", "lora_B", "magnitude"]


@pytest.mark.parametrize("backend", ["auto", "triton", "reference"])
def test_from_linear_any_backend(backend):
    base = nn.Linear(16, 8, device=DEVICE)
    layer = FusedDoraLinear.from_linear(base, r=2, backend=backend)
    x = torch.randn(3, 16, device=DEVICE)
    assert layer.backend == backend and rel_err(layer(x), base(x)) < 1e-6


def test_from_linear_shares_and_freezes():
    base = nn.Linear(16, 8, dtype=torch.float16, device=DEVICE)
    layer = FusedDoraLinear.from_linear(base, r=2, lora_alpha=4, lora_dropout=0.05)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lora_A.dtype == torch.float32 and layer.lora_A.device == base.weight.device
    assert layer.lora_dropout == 0.05 and layer.scaling == 2.0
    assert "r=2" in repr(layer)


def test_module_matches_functional_reference_train_and_eval():
    torch.manual_seed(1)
    layer = FusedDoraLinear(24, 18, r=5, lora_alpha=10, device=DEVICE)
    randomize_layer(layer)
    x = torch.randn(3, 7, 24, device=DEVICE, requires_grad=True)
    for training in (True, False):
        layer.train(training)
        layer.zero_grad()
        y = layer(x)
        y.square().sum().backward()
        grads = [p.grad.clone() for p in (layer.lora_A, layer.lora_B, layer.magnitude)]
        leaves = [p.detach().double().requires_grad_() for p in (layer.lora_A, layer.lora_B, layer.magnitude)]
        y_ref = fused_dora.reference.dora_linear(x.detach().double(), layer.weight.double(), layer.bias.double(),
                                                 *leaves, layer.scaling)
        y_ref.square().sum().backward()
        assert rel_err(y, y_ref) < 1e-5
        for g, leaf in zip(grads, leaves):
            assert rel_err(g, leaf.grad) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_merge_and_unmerge(dtype):
    torch.manual_seed(2)
    layer = FusedDoraLinear(32, 20, r=4, lora_alpha=8, dtype=dtype, device=DEVICE).eval()
    randomize_layer(layer)
    with torch.no_grad():
        layer.weight[3] = 0  # a zero row ...
        layer.lora_B[3] = 0
        layer.magnitude[5] = 0  # ... and a row whose scale is 0: unmerge must restore both
    w0 = layer.weight.detach().clone()
    x = torch.randn(6, 32, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert layer.merged
        y_merged = layer(x)
        layer.unmerge()
        y_back = layer(x)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    assert rel_err(y_merged, y) < tol
    assert rel_err(y_back, y) < tol
    assert rel_err(layer.weight, w0) < tol
    assert torch.equal(layer.weight[5], w0[5]) and torch.equal(layer.weight[3], w0[3])


def test_unmerge_refuses_after_adapter_change():
    layer = FusedDoraLinear(8, 6, r=2)
    randomize_layer(layer)
    layer.merge()
    with torch.no_grad():
        layer.lora_B.add_(1)
    with pytest.raises(RuntimeError, match="changed since merge"):
        layer.unmerge()


def test_dropout_only_in_training():
    torch.manual_seed(3)
    layer = FusedDoraLinear(32, 16, r=4, lora_dropout=0.5, device=DEVICE)
    randomize_layer(layer)
    x = torch.randn(8, 32, device=DEVICE)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_merged_layer_saves_and_copies_as_unmerged_function(tmp_path):
    import copy

    torch.manual_seed(4)
    layer = FusedDoraLinear(24, 16, r=3, device=DEVICE).eval()
    randomize_layer(layer)
    x = torch.randn(5, 24, device=DEVICE)
    with torch.no_grad():
        y = layer(x)
        w0 = layer.weight.clone()
        layer.merge()
        state = layer.state_dict()  # holds the unmerged weight
        assert rel_err(state["weight"], w0) < 1e-6
        fresh = FusedDoraLinear(24, 16, r=3, device=DEVICE).eval()
        fresh.load_state_dict(state)
        assert rel_err(fresh(x), y) < 1e-5
        twin = copy.deepcopy(layer)  # unmerge still works on copies and moved copies
        twin.unmerge()
        assert rel_err(twin.weight, w0) < 1e-6
        moved = copy.deepcopy(layer).double()
        moved.unmerge()
        assert rel_err(moved.weight, w0) < 1e-6
        torch.save(layer, tmp_path / "layer.pt")
        loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
        loaded.unmerge()
        assert rel_err(loaded(x), y) < 1e-5


def test_load_state_dict_into_merged_layer():
    source = trained_layer(seed=4)
    layer = trained_layer(seed=4)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)  # a different adapter on the same base weight
    x = torch.randn(5, 24, device=DEVICE)
    expect = layer_reference(source, x)
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
    source = trained_layer(seed=4)
    sd = source.state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    x = torch.randn(5, 24, device=DEVICE)
    expect = layer_reference(source, x)
    layers = []
    for _ in range(2):  # a second layer loaded from the same dict sees what the first saw
        layer = trained_layer(seed=7)
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
    layer = trained_layer(seed=5)
    x = torch.randn(5, 24, device=DEVICE)
    expect = layer_reference(layer, x)
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
