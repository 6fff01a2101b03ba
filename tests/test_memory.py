"""The memory targets that are byte counts (issue 5, T9 and T11), measured with bench.py's own
instruments: bytes saved for backward, and dense [out, in] temporaries made by any aten op.

Byte counts do not depend on the device, so the interpreter proves them; fp16 stands for bf16.
"""
import pytest
import torch

import fused_dora
from dora_bench.cases import Case
from dora_bench.competitors import build_competitor, make_call
from dora_bench.inputs import make_data
from dora_bench.instruments import count_dense_temporaries, saved_bytes, storage_key
from fused_dora import FusedDoraLinear, autograd
from helpers import make_inputs


def _saved(case, name):
    data = make_data(case, torch.device("cpu"))
    comp = build_competitor(name, data)
    exclude = comp.owned_storages()
    return saved_bytes(comp.fwd, data.xs[0], exclude, comp.kept), data


@pytest.mark.parametrize("mode", ["train0", "train05"])
@pytest.mark.parametrize("dtype", ["fp16+fp32", "fp16", "fp32"])
def test_saved_for_backward_at_most_lora_plus_one_output(mode, dtype):
    """T9: fused_dora saves x, su [M, r], q [M, N] (ypre rescaled per column) and the [N] fp32 norm
    its forward computed; PEFT LoRA saves x (or its fp32 copy) and its own [M, r] (plus the dropout mask and the dropped
    x): at most one [M, N] tensor and the norm more."""
    pytest.importorskip("peft")
    M, r = 40, 16
    case = Case(mode, "cpu", M, r, dtype)
    fused, data = _saved(case, "fused")
    lora, _ = _saved(case, "peft_lora")
    act, ad = data.act.itemsize, data.ad.itemsize
    norm = case.N * 4
    assert fused == M * case.K * act + M * r * ad + M * case.N * act + norm  # x, su, q, norm: nothing else
    assert fused <= lora + M * case.N * act + norm


def _op_saved_bytes(fn, inputs, trainable):
    """Bytes saved in fn(**leaves) other than the parameters' and the norm's (saved_bytes);
    leaves in `trainable` require grad."""
    leaves = {k: (v.detach().clone().requires_grad_(k in trainable) if v is not None else None)
              for k, v in inputs.items()}
    x = leaves.pop("x")
    exclude = {storage_key(v)[0] for v in leaves.values() if v is not None}
    return saved_bytes(lambda x: fn(x=x, **leaves), x, exclude)


def _eager_op(x, weight, bias, lora_A, lora_B, magnitude, norm):
    return fused_dora.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, 2.0, backend="triton", norm=norm)


def _library_op(x, weight, bias, lora_A, lora_B, magnitude, norm):  # the ops torch.compile calls, run eagerly
    return autograd.dora_linear_2d(x, weight, bias, lora_A, lora_B, magnitude, norm, 2.0, 0.0)


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.float16], ids=["fp32-adapters", "fp16-adapters"])
@pytest.mark.parametrize("path", [_eager_op, _library_op], ids=["function", "custom_op"])
@pytest.mark.parametrize("trainable, expect", [
    (("x", "lora_A", "lora_B", "magnitude"), ("x", "su", "ypre")),
    (("x",), ()),                      # frozen adapters: dx reads weight, lora_B, lora_A, c only
    (("lora_B",), ("su",)),
    (("lora_A",), ("x",)),
    (("magnitude",), ("ypre",)),
    (("weight",), ("x",)),             # a trainable base weight (not DoRA, but allowed) reads x
], ids=["all", "x", "B", "A", "magnitude", "weight"])
def test_saves_only_what_the_needed_gradients_read(path, trainable, expect, adapter_dtype):
    """Both routes (eager autograd.Function and the torch.library op used under torch.compile);
    su [M, r] is kept in the adapters' dtype."""
    M, K, N, r = 24, 40, 32, 8
    inputs = make_inputs(M, K, N, r, dtype=torch.float16, adapter_dtype=adapter_dtype, seed=3)
    inputs["norm"] = fused_dora.dora_weight_norm(inputs["weight"], inputs["lora_A"], inputs["lora_B"], 2.0)
    size = {"x": M * K * 2, "su": M * r * adapter_dtype.itemsize, "ypre": M * N * 2}
    seed = 8 if path is _library_op else 0  # the op's dropout seed, a 1-element int64 tensor
    assert _op_saved_bytes(path, inputs, trainable) == sum(size[k] for k in expect) + seed


def test_no_dense_weight_sized_temporary_at_high_rank():
    """T11: neither the training step nor the norm forms a tensor of the weight's shape, at r = 384
    (above in and out). The counter's positive control: the dense eager baseline does form one."""
    pytest.importorskip("peft")
    counts = {}
    for mode in ("train0", "norm"):
        case = Case(mode, "cpuhr", 0 if mode == "norm" else 24, 384, "fp16+fp32")
        data = make_data(case, torch.device("cpu"))
        for name in ("fused", "eager_dense"):
            comp = build_competitor(name, data)
            call, _ = make_call(data, comp)
            exclude = comp.owned_storages()
            counts[mode, name] = count_dense_temporaries(lambda call=call: call(0), case.N, case.K, exclude)[0]
    assert counts["train0", "fused"] == 0 and counts["norm", "fused"] == 0
    assert counts["train0", "eager_dense"] > 0 and counts["norm", "eager_dense"] > 0


def test_training_forward_saves_its_own_fresh_norm():
    """A training forward computes the [N] fp32 norm from the current parameters and saves that
    tensor (issue 9: no cached norm survives an optimizer step); the module keeps no copy of it."""
    layer = FusedDoraLinear(40, 32, r=8, dtype=torch.float16, backend="triton")
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(6, 40, dtype=torch.float16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    norms = [t for t in saved if t.shape == (32,) and t.dtype == torch.float32 and t is not layer.magnitude]
    assert len(norms) == 1
    expect = fused_dora.dora_weight_norm(layer.weight, layer.lora_A, layer.lora_B, layer.scaling)
    torch.testing.assert_close(norms[0], expect.float(), rtol=1e-3, atol=1e-3)
    with torch.no_grad():
        layer.lora_B.add_(1.0)  # a step: the next training forward saves a new norm
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    norms2 = [t for t in saved if t.shape == (32,) and t.dtype == torch.float32 and t is not layer.magnitude]
    assert not torch.allclose(norms2[0], norms[0])
