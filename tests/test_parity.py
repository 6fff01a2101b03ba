"""Forward and every gradient of the Triton path vs the float64 reference (math in fused_dora.autograd's docstring)."""
import itertools

import pytest
import torch

import fused_dora
from helpers import assert_close, make_inputs, reference_fp64, run

# (M, K, N, r): none a multiple of the block sizes unless on purpose; r = 1, 3, 12, 16, 64
SHAPES = [
    (1, 45, 53, 1),
    (37, 45, 53, 3),
    (50, 70, 33, 12),
    (64, 32, 48, 16),
    (29, 40, 70, 64),
    (5, 100, 7, 3),
]


def _triton(**kw):
    return fused_dora.dora_linear(backend="triton", **kw)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_forward_and_grads_match_fp64(shape, dtype):
    M, K, N, r = shape
    inputs = make_inputs(M, K, N, r, dtype=dtype, adapter_dtype=torch.float32, seed=M + K)
    out, grads = run(_triton, inputs, scaling=1.7)
    ref_out, ref_grads = reference_fp64(inputs, scaling=1.7)
    assert out.dtype == dtype
    assert grads["x"].dtype == dtype and grads["lora_A"].dtype == torch.float32
    assert grads["lora_B"].dtype == torch.float32 and grads["magnitude"].dtype == torch.float32
    assert_close(out, grads, ref_out, ref_grads, dtype, f"{shape} {dtype}")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("lead", [(3, 11), (2, 1, 9)], ids=["3d", "4d"])
def test_leading_dims_bias_and_modes(bias, training, lead):
    inputs = make_inputs(None, 24, 19, 5, bias=bias, lead=lead, seed=3)
    # dropout_p > 0 is ignored outside training; in training it is tested in test_dropout.py
    out, grads = run(_triton, inputs, scaling=0.5, dropout_p=0.0 if training else 0.3, training=training)
    ref_out, ref_grads = reference_fp64(inputs, scaling=0.5)
    assert out.shape == lead + (19,)
    assert_close(out, grads, ref_out, ref_grads, torch.float32, f"lead={lead} bias={bias} training={training}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_adapters_in_activation_dtype(dtype):
    inputs = make_inputs(33, 40, 27, 6, dtype=dtype, adapter_dtype=dtype, seed=5)
    out, grads = run(_triton, inputs, scaling=2.0)
    ref_out, ref_grads = reference_fp64(inputs, scaling=2.0)
    assert grads["lora_A"].dtype == dtype and grads["magnitude"].dtype == dtype
    assert_close(out, grads, ref_out, ref_grads, dtype, f"adapters in {dtype}")


def test_non_contiguous_input_and_grad_output():
    inputs = make_inputs(30, 26, 21, 4, seed=9)
    wide = torch.randn(26, 60)
    inputs["x"] = wide[:, ::2].T  # [30, 26] with strides (2, 60)
    assert not inputs["x"].is_contiguous()
    x = inputs["x"].clone().requires_grad_()
    y = fused_dora.dora_linear(x, *[inputs[k] for k in ("weight", "bias", "lora_A", "lora_B", "magnitude")], 1.3,
                               backend="triton")
    dy_wide = torch.randn(21, 30)
    y.backward(dy_wide.T)  # non-contiguous grad_output
    ref = inputs | {"x": x.detach()}
    ref64 = {k: v.double() if v is not None else None for k, v in ref.items()}
    x64 = ref64.pop("x").requires_grad_()
    y64 = fused_dora.reference.dora_linear(x64, **ref64, scaling=1.3)
    y64.backward(dy_wide.T.double())
    assert (y.double() - y64).norm() / y64.norm() < 1e-5
    assert (x.grad.double() - x64.grad).norm() / x64.grad.norm() < 1e-5


def test_expanded_grad_output_from_sum():
    """y.sum().backward() hands the op a zero-stride grad_output."""
    inputs = make_inputs(12, 20, 18, 4, seed=10)
    out, grads = run(_triton, inputs, scaling=1.0)
    leaves = {k: v.clone().requires_grad_(k != "weight" and k != "bias") if v is not None else None
              for k, v in inputs.items()}
    fused_dora.dora_linear(**leaves, scaling=1.0, backend="triton").sum().backward()
    leaves64 = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in leaves.items() if v is not None}
    fused_dora.reference.dora_linear(**leaves64, scaling=1.0).sum().backward()
    for k in ("x", "lora_A", "lora_B", "magnitude"):
        assert (leaves[k].grad.double() - leaves64[k].grad).norm() / leaves64[k].grad.norm() < 1e-5, k


def test_empty_batch():
    inputs = make_inputs(None, 16, 12, 4, lead=(0, 3), seed=11)
    out, grads = run(_triton, inputs, scaling=1.0)
    assert out.shape == (0, 3, 12)
    assert grads["x"].shape == (0, 3, 16)
    for k in ("lora_A", "lora_B", "magnitude"):
        assert torch.count_nonzero(grads[k]) == 0


def test_frozen_weight_and_bias_get_correct_grads_if_asked():
    """weight and bias are frozen in DoRA; a caller who trains them gets the (norm-detached) gradient."""
    inputs = make_inputs(21, 18, 15, 3, seed=12)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    fused_dora.dora_linear(**leaves, scaling=0.8, backend="triton").backward(torch.ones(21, 15))
    leaves64 = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    fused_dora.reference.dora_linear(**leaves64, scaling=0.8).backward(torch.ones(21, 15, dtype=torch.float64))
    for k in leaves:
        err = (leaves[k].grad.double() - leaves64[k].grad).norm() / leaves64[k].grad.norm()
        assert err < 1e-5, (k, err)


def test_rslora_style_scaling_and_large_rank_chunks():
    inputs = make_inputs(40, 64, 36, 40, seed=13)  # 40 = 2.5 rank chunks of 16 in the interpreter
    s = 16 / 40 ** 0.5
    out, grads = run(_triton, inputs, scaling=s)
    ref_out, ref_grads = reference_fp64(inputs, scaling=s)
    assert_close(out, grads, ref_out, ref_grads, torch.float32, "r=40")


def test_reduction_split_over_many_tokens():
    """M large enough that the adapter-gradient reductions split over slices of M."""
    inputs = make_inputs(300, 20, 17, 2, seed=14)
    out, grads = run(_triton, inputs, scaling=1.0)
    ref_out, ref_grads = reference_fp64(inputs, scaling=1.0)
    assert_close(out, grads, ref_out, ref_grads, torch.float32, "M=300")


SUBSETS = [s for n in range(1, 5) for s in itertools.combinations(("x", "lora_A", "lora_B", "magnitude"), n)]


@pytest.mark.parametrize("trainable", SUBSETS, ids=lambda s: "+".join(s))
def test_any_subset_of_inputs_requiring_grad(trainable):
    t = make_inputs(14, 18, 11, 3, seed=15)
    leaves = {k: (v.clone().requires_grad_(k in trainable) if v is not None else None) for k, v in t.items()}
    fused_dora.dora_linear(**leaves, scaling=1.2, dropout_p=0.2, training=True, backend="triton").sum().backward()
    for k in ("x", "lora_A", "lora_B", "magnitude"):
        assert (leaves[k].grad is not None) == (k in trainable), k
    # the gradients that exist equal those of a run where everything is trainable (same seed)
    full = {k: (v.clone().requires_grad_(k not in ("weight", "bias")) if v is not None else None) for k, v in t.items()}
    leaves = {k: (v.clone().requires_grad_(k in trainable) if v is not None else None) for k, v in t.items()}
    torch.manual_seed(1)
    fused_dora.dora_linear(**full, scaling=1.2, dropout_p=0.2, training=True, backend="triton").sum().backward()
    torch.manual_seed(1)
    fused_dora.dora_linear(**leaves, scaling=1.2, dropout_p=0.2, training=True, backend="triton").sum().backward()
    for k in trainable:
        assert torch.equal(leaves[k].grad, full[k].grad), k


def test_repeat_runs_are_bit_identical():
    """Reductions use per-slice partial sums, not atomics: results do not vary run to run."""
    t = make_inputs(300, 20, 17, 5, seed=16)
    first = run(_triton, t, scaling=1.0)
    second = run(_triton, t, scaling=1.0)
    assert torch.equal(first[0], second[0])
    for k in first[1]:
        assert torch.equal(first[1][k], second[1][k]), k


def test_non_contiguous_bias_and_magnitude():
    t = make_inputs(10, 16, 12, 2, seed=17)
    t["bias"] = torch.randn(24, dtype=t["x"].dtype, device=t["x"].device)[::2]
    t["magnitude"] = (torch.rand(24, device=t["x"].device) + 0.5)[::2]
    out, grads = run(_triton, t, scaling=1.0)
    ref_out, ref_grads = reference_fp64(t, scaling=1.0)
    assert_close(out, grads, ref_out, ref_grads, torch.float32, "strided bias / magnitude")
