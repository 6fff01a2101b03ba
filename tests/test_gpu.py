"""GPU-only parity: compiled kernels, bf16, larger and LLM-like shapes. Skipped without CUDA.

Run on a GPU with `python -m pytest tests/test_gpu.py` (FUSED_DORA_AUTOTUNE=0 skips the
autotune search for a quicker run).
"""
import pytest
import torch

import fused_dora
from fused_dora import FusedDoraLinear, reference
from fused_dora.drivers import draw_dropout_seed
from fused_dora.kernels.dropout import dropout_mask
from fused_dora.kernels.norm import dora_row_norm
from helpers import assert_close, make_inputs, reference_fp64, rel_err, run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (compiled Triton kernels)"),
]

SHAPES = [  # (M, K, N, r)
    (1, 4096, 4096, 16),      # decode
    (16, 4096, 1024, 64),
    (333, 1000, 777, 12),     # ragged everything
    (512, 4096, 4096, 16),
    (1024, 1536, 4096, 64),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype, adapter_dtype", [
    (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32), (torch.float32, torch.float32),
], ids=["bf16-fp32", "bf16", "fp16-fp32", "fp32"])
@pytest.mark.parametrize("route", ["fused", "composed", "auto"])
def test_gpu_parity(shape, dtype, adapter_dtype, route):
    M, Kd, N, r = shape
    inputs = make_inputs(M, Kd, N, r, dtype=dtype, adapter_dtype=adapter_dtype, seed=M + r, device="cuda")
    out, grads = run(fused_dora.dora_linear, inputs, scaling=2.0, backend="triton", route=route)
    ref_out, ref_grads = reference_fp64(inputs, scaling=2.0)
    assert_close(out, grads, ref_out, ref_grads, dtype, f"{shape} {dtype}/{adapter_dtype} {route}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("route", ["fused", "composed"])
def test_gpu_dropout_mask_reuse(dtype, route):
    M, Kd, N, r, p = 300, 520, 260, 16, 0.1
    inputs = make_inputs(M, Kd, N, r, dtype=dtype, adapter_dtype=torch.float32, seed=7, device="cuda")
    torch.manual_seed(11)
    out, grads = run(fused_dora.dora_linear, inputs, scaling=1.0, dropout_p=p, training=True, backend="triton",
                     route=route)
    torch.manual_seed(11)
    mask = dropout_mask(draw_dropout_seed(), M, Kd, p, "cuda")
    ref_out, ref_grads = reference_fp64(inputs, scaling=1.0, dropout_p=p, training=True, dropout_mask=mask)
    assert_close(out, grads, ref_out, ref_grads, dtype, f"dropout {route}")


@pytest.mark.parametrize("route", ["fused", "composed"])
def test_gpu_first_call_with_the_autotune_search(monkeypatch, route):
    """With the search on (FUSED_DORA_AUTOTUNE=0 skips it elsewhere in this file), the first call
    of a new autotune key is right: the search runs every config on the real buffers, and the
    composed route's passes update theirs in place (restore_value)."""
    from fused_dora.kernels import tuning

    monkeypatch.setattr(tuning, "AUTOTUNE", True)
    inputs = make_inputs(777, 1000, 555, 24, dtype=torch.bfloat16, adapter_dtype=torch.float32, seed=5, device="cuda")
    out, grads = run(fused_dora.dora_linear, inputs, scaling=2.0, backend="triton", route=route)
    ref_out, ref_grads = reference_fp64(inputs, scaling=2.0)
    assert_close(out, grads, ref_out, ref_grads, torch.bfloat16, f"first call, autotune search, {route}")


def test_gpu_high_rank_norm_without_dense_temporary():
    """in = out = 8192, r = 384: the norm kernel never allocates the [out, in] product."""
    N = Kd = 8192
    w = torch.randn(N, Kd, device="cuda", dtype=torch.bfloat16) * Kd ** -0.5
    a = torch.randn(384, Kd, device="cuda") * Kd ** -0.5
    b = torch.randn(N, 384, device="cuda") * 0.05
    dora_row_norm(w, a, b, 2.0)  # warm-up / autotune
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    norm = dora_row_norm(w, a, b, 2.0)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < N * Kd  # far below a bf16 [N, K] temporary (2 * N * K bytes)
    ref = reference.weight_norm(w.double(), a.double(), b.double(), 2.0)
    assert rel_err(norm, ref) < 1e-5


def test_gpu_non_contiguous_3d_input():
    inputs = make_inputs(None, 256, 192, 8, dtype=torch.bfloat16, adapter_dtype=torch.float32, seed=3,
                         device="cuda", lead=(4, 65))
    inputs["x"] = inputs["x"].transpose(0, 1)  # [65, 4, 256], non-contiguous
    out, grads = run(fused_dora.dora_linear, inputs, scaling=1.0, backend="triton")
    ref_out, ref_grads = reference_fp64(inputs, scaling=1.0)
    assert_close(out, grads, ref_out, ref_grads, torch.bfloat16, "non-contiguous")


def test_gpu_module_bf16_train_step_and_merge():
    torch.manual_seed(0)
    base = torch.nn.Linear(1024, 768, device="cuda", dtype=torch.bfloat16)
    layer = FusedDoraLinear.from_linear(base, r=16, lora_alpha=32)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.02)
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(8, 128, 1024, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):
        loss = layer(x).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(loss)
    layer.eval()
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        y_merged = layer(x)
    assert rel_err(y_merged, y) < 2e-2


def test_gpu_autocast_bf16_like_linear():
    """fp32 parameters under autocast("cuda", bf16): computes in bf16 and returns bf16, as nn.Linear."""
    torch.manual_seed(1)
    base = torch.nn.Linear(512, 384, device="cuda")
    layer = FusedDoraLinear.from_linear(base, r=8, lora_alpha=16)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
    x = torch.randn(64, 512, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
        assert y.dtype == base(x).dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.lora_A.grad.dtype == torch.float32
    ref = reference.dora_linear(x.detach().double(), layer.weight.double(), layer.bias.double(),
                                layer.lora_A.double(), layer.lora_B.double(), layer.magnitude.double(), layer.scaling)
    assert rel_err(y, ref) < 2e-2


def test_gpu_compile_inductor_fullgraph():
    torch._dynamo.reset()
    layer = FusedDoraLinear(256, 192, r=8, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
    x = torch.randn(4, 33, 256, device="cuda", dtype=torch.bfloat16)
    y_eager = layer(x)
    y = torch.compile(layer, fullgraph=True)(x)
    assert rel_err(y, y_eager) < 1e-2
