"""Bad input: a clear TypeError / ValueError naming the argument, never a crash inside Triton."""
import pytest
import torch

import fused_dora
from fused_dora import FusedDoraLinear
from helpers import make_inputs


def _args(**overrides):
    t = make_inputs(6, 10, 8, 2, seed=1)
    t.update(scaling=1.0)
    t.update(overrides)
    return t


@pytest.mark.parametrize(
    "overrides, exc, match",
    [
        (dict(x=torch.randn(6, 11)), ValueError, "x has last dimension 11"),
        (dict(x=torch.randn(6, 10).to(torch.int32)), TypeError, "x has dtype"),
        (dict(x=[[1.0] * 10]), TypeError, "x must be a torch.Tensor"),
        (dict(x=torch.randn(6, 10).to_sparse()), TypeError, "x must be a dense"),
        (dict(weight=torch.randn(8, 10, 1)), ValueError, "weight must be 2-D"),
        (dict(weight=torch.randn(8, 10).to_sparse()), TypeError, "weight must be a dense"),
        (dict(weight=torch.randn(8, 10, dtype=torch.float16)), TypeError, "weight has dtype"),
        (dict(lora_A=torch.randn(0, 10)), ValueError, "lora_A must have rank r >= 1"),
        (dict(lora_A=torch.randn(2, 9)), ValueError, "lora_A must have shape"),
        (dict(lora_B=torch.randn(8, 3)), ValueError, "lora_B must have shape"),
        (dict(lora_B=torch.randn(8, 2, dtype=torch.float64)), TypeError, "lora_B has dtype"),
        (dict(lora_A=torch.randn(2, 10, dtype=torch.float16), lora_B=torch.randn(8, 2, dtype=torch.float16)),
         TypeError, "lora_A has dtype"),
        (dict(magnitude=torch.randn(7)), ValueError, "magnitude must have shape"),
        (dict(magnitude=torch.ones(8, dtype=torch.int64)), TypeError, "magnitude must be a floating-point"),
        (dict(bias=torch.randn(9)), ValueError, "bias must have shape"),
        (dict(bias=torch.randn(8, dtype=torch.float16)), TypeError, "bias has dtype"),
        (dict(scaling=float("nan")), ValueError, "scaling must be finite"),
        (dict(scaling=float("inf")), ValueError, "scaling must be finite"),
        (dict(scaling="2"), TypeError, "scaling must be a real number"),
        (dict(scaling=True), TypeError, "scaling must be a real number"),
        (dict(dropout_p=1.0), ValueError, "dropout_p must be in"),
        (dict(dropout_p=-0.1), ValueError, "dropout_p must be in"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(norm=torch.ones(3)), ValueError, "norm must have shape"),
        (dict(weight=torch.randn(8, 10, device="meta")), ValueError, "weight is on meta"),
    ],
)
def test_bad_arguments_are_named(overrides, exc, match):
    with pytest.raises(exc, match=match):
        fused_dora.dora_linear(**_args(**overrides))


def test_integration_functions_check_model_type():
    pytest.importorskip("peft")
    from fused_dora.integrations.peft import disable_fused_dora, enable_fused_dora, fused_dora_status

    for fn, arg in ((disable_fused_dora, None), (fused_dora_status, "model"), (enable_fused_dora, 3)):
        with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
            fn(arg)


def test_triton_backend_refuses_float64():
    t = make_inputs(6, 10, 8, 2, dtype=torch.float64, seed=2)
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        fused_dora.dora_linear(**t, scaling=1.0, backend="triton")


def test_triton_backend_explains_when_it_cannot_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    t = make_inputs(6, 10, 8, 2, seed=3, device="cpu")
    with pytest.raises(ValueError, match="backend='triton' cannot run here"):
        fused_dora.dora_linear(**t, scaling=1.0, backend="triton")
    # "auto" falls back to the reference on plain CPU tensors
    y = fused_dora.dora_linear(**t, scaling=1.0, backend="auto")
    assert torch.isfinite(y).all()


def test_inputs_are_not_modified():
    t = _args()
    for k in ("x", "lora_A", "lora_B", "magnitude"):
        t[k].requires_grad_()
    before = {k: v.detach().clone() for k, v in t.items() if isinstance(v, torch.Tensor)}
    y = fused_dora.dora_linear(**t, dropout_p=0.3, training=True, backend="triton")
    y.sum().backward()
    for k, v in before.items():
        assert torch.equal(t[k], v), k


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(in_features=0, out_features=4), ValueError, "in_features must be >= 1"),
        (dict(in_features=4, out_features=4, r=0), ValueError, "r must be >= 1"),
        (dict(in_features=4.0, out_features=4), TypeError, "in_features must be an int"),
        (dict(in_features=4, out_features=4, lora_dropout=1.5), ValueError, "lora_dropout must be in"),
        (dict(in_features=4, out_features=4, lora_alpha=float("inf")), ValueError, "lora_alpha must be finite"),
        (dict(in_features=4, out_features=4, backend="gpu"), ValueError, "backend must be one of"),
    ],
)
def test_module_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        FusedDoraLinear(**kwargs)


def test_from_linear_rejects_non_linear():
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        FusedDoraLinear.from_linear(torch.nn.Conv1d(3, 3, 1))


def test_module_wrong_input_width():
    layer = FusedDoraLinear(6, 4)
    with pytest.raises(ValueError, match="x has last dimension 5 but weight has in_features=6"):
        layer(torch.randn(2, 5))


def test_huge_weight_goes_to_the_reference_or_is_refused(monkeypatch):
    """The kernels index weight columns with 32 bits: 2**31 elements or more cannot run there."""
    from fused_dora.backend import resolve_backend

    w = torch.empty(1, 1).expand(2**16, 2**15)  # 2**31 elements, no memory
    x = torch.randn(2, 2**15)
    assert resolve_backend("auto", x, w, weight=w) == "reference"
    with pytest.raises(ValueError, match="2\\*\\*31 elements"):
        resolve_backend("triton", x, w, weight=w)


def test_narrow_column_offsets_copies_only_huge_strides():
    from fused_dora.drivers import narrow_column_offsets

    t = torch.randn(4, 6).T
    assert narrow_column_offsets(t) is t
    big = torch.empty(2**32, device="meta").as_strided((2, 3), (1, 2**30))  # (3 - 1) * 2**30 == 2**31
    assert narrow_column_offsets(big).is_contiguous()


@pytest.mark.parametrize(
    "overrides, exc, match",
    [
        (dict(lora_A=torch.randn(2, 9)), ValueError, "lora_A must have shape"),
        (dict(lora_B=torch.randn(8, 3)), ValueError, "lora_B must have shape"),
        (dict(weight=torch.ones(8, 10, dtype=torch.int64)), TypeError, "weight has dtype"),
        (dict(scaling="0.5"), TypeError, "scaling must be a real number"),
        (dict(backend="bogus"), ValueError, "backend must be one of"),
    ],
)
def test_weight_norm_checks_its_arguments(overrides, exc, match):
    t = make_inputs(1, 10, 8, 2, seed=4)
    args = dict(weight=t["weight"], lora_A=t["lora_A"], lora_B=t["lora_B"], scaling=1.0)
    args.update(overrides)
    with pytest.raises(exc, match=match):
        fused_dora.dora_weight_norm(**args)


def test_training_must_be_bool():
    with pytest.raises(TypeError, match="training must be a bool"):
        fused_dora.dora_linear(**_args(), training="no")


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(lora_dropout=None), TypeError, "lora_dropout must be a real number"),
        (dict(lora_alpha=None), TypeError, "lora_alpha must be a real number"),
        (dict(use_rslora="no"), TypeError, "use_rslora must be a bool"),
        (dict(dtype=torch.int32), TypeError, "dtype must be a floating-point"),
        (dict(adapter_dtype=torch.int64), TypeError, "adapter_dtype must be a floating-point"),
    ],
)
def test_module_constructor_type_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        FusedDoraLinear(4, 4, **kwargs)
