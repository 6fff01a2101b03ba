"""QDoRA: fused DoRA over bitsandbytes 4-bit (NF4 / FP4) and 8-bit base weights (issue 20).

On CPU through bitsandbytes' CPU backend and Triton's interpreter: the norm kernel's
dequantization is bitsandbytes' own, bit for bit; the norm against float64 of the dequantized
weight; the op's outputs and gradients against float64; what it saves; a tiny 4-bit Llama with
PEFT DoRA (logits, loss, every adapter gradient, five AdamW steps, merge / unmerge /
merge_and_unload / save_pretrained / disable_adapter, the Trainer callback) equal to PEFT's; an
8-bit Llama; FusedDoraLinear / replace_linear over Linear4bit; bad input.
"""
import copy
import os
import pathlib
import sys
import warnings

import pytest
import torch
import torch.nn as nn

from helpers import (
    LLAMA_TARGETS,
    TOL,
    assert_close,
    fp64,
    logged_losses,
    randomize_adapters,
    rel_err,
    run,
    tiny_llama,
    trainer_args,
    trainer_data,
)

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbF  # noqa: E402

import fused_dora  # noqa: E402
from fused_dora import FusedDoraLinear, FusedDoraLinear4bit, reference  # noqa: E402
from fused_dora.qdora import dora_linear_4bit, dora_weight_norm_4bit  # noqa: E402
from fused_dora.quantized import BNB_4BIT_BLOCKSIZES, describe_4bit, describe_8bit  # noqa: E402

try:
    import peft
    import transformers

    from fused_dora.integrations.peft import enable_fused_dora, fused_dora_status
except ImportError:  # the kernel and op tests still run
    peft = transformers = None
needs_peft = pytest.mark.skipif(peft is None, reason="needs peft and transformers")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS_RUN = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_kernels = pytest.mark.skipif(not KERNELS_RUN, reason="needs CUDA or TRITON_INTERPRET=1")
pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore:Merge lora module to 4-bit linear:UserWarning"),
              pytest.mark.filterwarnings("ignore:Unmerge lora module to 4-bit linear:UserWarning")]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(autouse=True)
def eager_bitsandbytes():
    """bitsandbytes' pure-PyTorch ops (odd shapes) are torch.compile'd; eager is quicker in tests."""
    with torch._dynamo.config.patch(disable=True):
        yield


def params4bit(w: torch.Tensor, quant_type="nf4", nested=True, blocksize=64):
    """A quantized bitsandbytes Params4bit of w [out, in] (quantized when moved to its device)."""
    return bnb.nn.Params4bit(w.contiguous(), requires_grad=False, blocksize=blocksize, compress_statistics=nested,
                             quant_type=quant_type).to(DEVICE)


def quant_kernels():
    """fused_dora.kernels.quant_norm (imports triton: only in tests that run kernels)."""
    from fused_dora.kernels import quant_norm

    return quant_norm


def dequantized(weight) -> torch.Tensor:
    return bnbF.dequantize_4bit(weight.data, weight.quant_state)


def _randn(*shape, seed=0, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE, dtype)


# ---- the kernel's dequantization is bitsandbytes' ------------------------------------------------
@needs_kernels
@pytest.mark.parametrize("blocksize", BNB_4BIT_BLOCKSIZES)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_kernel_dequantization_equals_bitsandbytes(quant_type, nested, blocksize):
    """40 x 250: blocks cross rows and the last block is ragged for every blocksize; with blocksize
    32, double quantization has two nested blocks."""
    K = quant_kernels()
    for name, dtype in DTYPES.items():
        w = params4bit(_randn(40, 250, seed=blocksize, dtype=dtype), quant_type, nested, blocksize)
        p, reason = describe_4bit(w)
        assert reason is None
        got = K.dequantize_4bit_tiles(p.packed, p.code, p.absmax, p.blocksize, p.shape, p.dtype,
                                      nested_absmax=p.nested_absmax, nested_code=p.nested_code,
                                      nested_offset=p.nested_offset, nested_blocksize=p.nested_blocksize)
        assert torch.equal(got, dequantized(w).float()), name


@needs_kernels
@pytest.mark.parametrize("blocksize", BNB_4BIT_BLOCKSIZES)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double-quant"])
def test_row_aligned_dequantization_equals_bitsandbytes(nested, blocksize):
    """K a multiple of the block size (every Llama projection): whole-byte, whole-block rows, the
    codes read a byte pair at a time and the scales once a block (dequant_4bit_rows); ragged N, a
    ragged last column tile, blocks narrower and wider than the tile; equal to bitsandbytes and to
    the general tile, bit for bit."""
    K = quant_kernels()
    Kdim = blocksize * -(-200 // blocksize)  # 224, 256, 256, 256, 512, ...: whole blocks a row
    for quant_type in ("nf4", "fp4"):
        for name, dtype in DTYPES.items():
            w = params4bit(_randn(37, Kdim, seed=blocksize + 1, dtype=dtype), quant_type, nested, blocksize)
            p, _ = describe_4bit(w)
            args = (p.packed, p.code, p.absmax, p.blocksize, p.shape, p.dtype)
            nested_args = dict(nested_absmax=p.nested_absmax, nested_code=p.nested_code,
                               nested_offset=p.nested_offset, nested_blocksize=p.nested_blocksize)
            aligned = K.dequantize_4bit_tiles(*args, **nested_args, row_aligned=True)
            assert torch.equal(aligned, dequantized(w).float()), (quant_type, name)
            assert torch.equal(aligned, K.dequantize_4bit_tiles(*args, **nested_args, row_aligned=False))


@needs_kernels
@pytest.mark.parametrize("shape", [(7, 33), (5, 1), (3, 129)], ids=str)
def test_kernel_dequantization_odd_shapes(shape):
    """An odd element count: the last byte holds one code; rows start mid-byte."""
    for quant_type in ("nf4", "fp4"):
        w = params4bit(_randn(*shape, seed=1), quant_type, nested=True, blocksize=32)
        p, _ = describe_4bit(w)
        got = quant_kernels().dequantize_4bit_tiles(p.packed, p.code, p.absmax, p.blocksize, p.shape, p.dtype,
                                                   nested_absmax=p.nested_absmax, nested_code=p.nested_code,
                                                   nested_offset=p.nested_offset)
        assert torch.equal(got, dequantized(w).float())


# ---- the row norm from the packed codes ------------------------------------------------------------
def _norm_case(N, Kdim, r, quant_type, nested, blocksize, dtype, adapter_dtype, seed=0):
    w = params4bit(_randn(N, Kdim, seed=seed, scale=Kdim ** -0.5, dtype=dtype), quant_type, nested, blocksize)
    lora_A = _randn(r, Kdim, seed=seed + 1, scale=Kdim ** -0.5, dtype=adapter_dtype)
    lora_B = _randn(N, r, seed=seed + 2, scale=0.5, dtype=adapter_dtype)
    truth = reference.weight_norm(dequantized(w).double(), lora_A.double(), lora_B.double(), 1.3)
    return w, lora_A, lora_B, truth


# (N, K, r) and the (weight dtype, adapter dtype) cases run on it: ragged N and K, r = 1, r above
# the rank chunk (16 under the interpreter), K = 128 and 256 multiples of the block
# (dequant_4bit_rows); weights quantized from fp32, fp16 and bf16 (dequantized to that dtype, as
# PEFT's norm sees them), adapters fp32 or fp16
NORM_CASES = [((37, 83, 5), [("fp32", "fp32"), ("fp16", "fp32"), ("bf16", "fp32"), ("fp16", "fp16")]),
              ((64, 128, 1), [("bf16", "fp32")]),
              ((21, 256, 20), [("fp16", "fp32"), ("bf16", "fp32")]),
              ((20, 160, 20), [("fp32", "fp32"), ("fp16", "fp16")])]


@needs_kernels
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_norm_matches_fp64(quant_type, nested, blocksize):
    for (N, Kdim, r), cases in NORM_CASES:
        for wd, ad in cases:
            w, lora_A, lora_B, truth = _norm_case(N, Kdim, r, quant_type, nested, blocksize, DTYPES[wd], DTYPES[ad])
            norm = dora_weight_norm_4bit(w, lora_A, lora_B, 1.3, backend="triton")
            assert norm.dtype == torch.float32 and norm.shape == (N,)
            assert rel_err(norm, truth) < 1e-5, ((N, Kdim, r), wd, ad)


@needs_kernels
@pytest.mark.parametrize("blocksize", [32, 256, 1024, 4096])
@pytest.mark.parametrize("row_aligned", [False, True], ids=["general", "row-aligned"])
def test_norm_other_blocksizes_and_k_splits(blocksize, row_aligned):
    """K = 200 (blocks cross rows: the general tile) or a multiple of the block (dequant_4bit_rows:
    blocks narrower and wider than the tile, nested blocks across rows), K split or not."""
    K = quant_kernels()
    Kdim = max(512, blocksize) if row_aligned else 200
    w, lora_A, lora_B, truth = _norm_case(33, Kdim, 6, "nf4", True, blocksize, torch.float16, torch.float32, seed=3)
    p, _ = describe_4bit(w)
    for splits in (None, 1, 3):
        norm = K.dora_quant_row_norm(p.packed, p.code, p.absmax, p.blocksize, p.shape, p.dtype, lora_A, lora_B, 1.3,
                                     nested_absmax=p.nested_absmax, nested_code=p.nested_code,
                                     nested_offset=p.nested_offset, k_splits=splits)
        assert rel_err(norm, truth) < 1e-5, splits


def test_norm_reference_backend_bf16():
    """bf16 adapters: the reference path (dequantize, then the plain norm)."""
    w, lora_A, lora_B, truth = _norm_case(24, 64, 4, "fp4", False, 64, torch.bfloat16, torch.bfloat16)
    norm = dora_weight_norm_4bit(w, lora_A, lora_B, 1.3)
    assert rel_err(norm, truth) < 1e-5


@needs_kernels
def test_norm_makes_no_dense_weight():
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    from dora_bench.instruments import count_dense_temporaries

    N, Kdim = 48, 64
    w, lora_A, lora_B, truth = _norm_case(N, Kdim, 8, "nf4", True, 64, torch.float32, torch.float32)
    count, _ = count_dense_temporaries(lambda: dora_weight_norm_4bit(w, lora_A, lora_B, 1.3, backend="triton"),
                                       N, Kdim, exclude=set())
    assert count == 0


# ---- the op: outputs and gradients -----------------------------------------------------------------
def _op_inputs(M, Kdim, N, r, dtype, quant_type="nf4", nested=True, blocksize=64, bias=True, seed=0,
               adapter_dtype=torch.float32):
    w = params4bit(_randn(N, Kdim, seed=seed, scale=Kdim ** -0.5, dtype=dtype), quant_type, nested, blocksize)
    g = torch.Generator().manual_seed(seed + 1)
    t = dict(
        x=(torch.randn(2, M, Kdim, generator=g, dtype=torch.float64)).to(DEVICE, dtype),
        bias=(0.1 * torch.randn(N, generator=g, dtype=torch.float64)).to(DEVICE, dtype) if bias else None,
        lora_A=(torch.randn(r, Kdim, generator=g, dtype=torch.float64) * Kdim ** -0.5).to(DEVICE, adapter_dtype),
        lora_B=(torch.randn(N, r, generator=g, dtype=torch.float64) * 0.5 / r ** 0.5).to(DEVICE, adapter_dtype),
        magnitude=(torch.rand(N, generator=g, dtype=torch.float64) + 0.5).to(DEVICE, adapter_dtype),
    )
    return w, t


def _truth(w, t, dtype, **kwargs):
    """float64 truth on the dequantized weight (in x's dtype, as the op multiplies it)."""
    dense = dict(fp64(t), weight=dequantized(w).to(dtype).double())
    return run(reference.dora_linear, dense, grad_out_dtype=dtype, scaling=1.7, **kwargs)


@needs_kernels
@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("fp4", False)])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("bias", [True, False])
def test_op_matches_fp64(quant_type, nested, dtype, bias):
    dt = DTYPES[dtype]
    w, t = _op_inputs(9, 96, 40, 5, dt, quant_type, nested, bias=bias)
    out, grads = run(lambda **a: dora_linear_4bit(a["x"], w, a["bias"], a["lora_A"], a["lora_B"], a["magnitude"],
                                                  1.7, backend="triton"), t)
    ref_out, ref_grads = _truth(w, t, dt)
    assert out.dtype == dt and out.shape == (2, 9, 40)
    assert_close(out, grads, ref_out, ref_grads, dt, f"4-bit {quant_type} {dtype}")


@needs_kernels
def test_op_ragged_shapes_and_rank_one():
    w, t = _op_inputs(13, 83, 37, 1, torch.float32, "fp4", True, blocksize=32)
    out, grads = run(lambda **a: dora_linear_4bit(a["x"], w, a["bias"], a["lora_A"], a["lora_B"], a["magnitude"],
                                                  1.7, backend="triton"), t)
    ref_out, ref_grads = _truth(w, t, torch.float32)
    assert_close(out, grads, ref_out, ref_grads, torch.float32, "ragged")


def test_op_reference_backend_bf16():
    w, t = _op_inputs(6, 64, 24, 4, torch.bfloat16)
    out, grads = run(lambda **a: dora_linear_4bit(a["x"], w, a["bias"], a["lora_A"], a["lora_B"], a["magnitude"],
                                                  1.7), t)  # bf16: the reference path under the interpreter
    ref_out, ref_grads = _truth(w, t, torch.bfloat16)
    assert_close(out, grads, ref_out, ref_grads, torch.bfloat16, "bf16 reference")


@needs_kernels
def test_dropout_same_function_as_the_dense_op():
    """With dropout, the 4-bit op is the dense op (composed route) on the dequantized weight: same seed,
    same mask, the same bits."""
    w, t = _op_inputs(10, 64, 24, 4, torch.float32)
    dense_w = dequantized(w)

    def quantized(**a):
        torch.manual_seed(11)
        return dora_linear_4bit(a["x"], w, a["bias"], a["lora_A"], a["lora_B"], a["magnitude"], 1.7, dropout_p=0.3,
                                training=True, backend="triton")

    def dense(**a):
        torch.manual_seed(11)
        return fused_dora.dora_linear(a["x"], dense_w, a["bias"], a["lora_A"], a["lora_B"], a["magnitude"], 1.7,
                                      dropout_p=0.3, training=True, backend="triton", route="composed")

    (out, grads), (ref_out, ref_grads) = run(quantized, t), run(dense, t)
    assert torch.equal(out, ref_out)
    for k in grads:
        assert torch.equal(grads[k], ref_grads[k]), k


def _one_layer_peft_lora(weight_values, r):
    """PEFT QLoRA (plain LoRA) over one Linear4bit, the saved-bytes yardstick."""

    class One(nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x)

    N, Kdim = weight_values.shape
    lin = bnb.nn.Linear4bit(Kdim, N, bias=False, compute_dtype=weight_values.dtype, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(weight_values, requires_grad=False, quant_type="nf4", module=lin)
    model = One(lin.to(DEVICE))
    model.is_loaded_in_4bit = True  # what PEFT dispatches its bitsandbytes layers on
    return peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin"]))


@needs_kernels
@needs_peft
def test_saved_for_backward_at_most_qlora_plus_dora():
    """Saved: PEFT QLoRA's activations (x, its [M, r]) plus q [M, N] and the [N] fp32 norm; never
    a dequantized weight (the backward dequantizes again)."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    from dora_bench.instruments import saved_bytes, storage_key

    M, Kdim, N, r = 40, 64, 48, 8
    values = _randn(N, Kdim, seed=5, scale=Kdim ** -0.5)
    qlora = _one_layer_peft_lora(values, r)
    x = _randn(M, Kdim, seed=6).requires_grad_()
    params = {storage_key(p)[0] for p in qlora.parameters()}
    qlora_bytes = saved_bytes(qlora, x, params)

    layer = FusedDoraLinear.from_linear(qlora.base_model.model.lin.base_layer, r=r, lora_alpha=2 * r, backend="triton")
    assert isinstance(layer, FusedDoraLinear4bit)
    layer.train()
    own = {storage_key(p)[0] for p in layer.parameters()}
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    assert (N, Kdim) not in shapes and (Kdim, N) not in shapes
    ours = saved_bytes(layer, x, own)
    assert ours <= qlora_bytes + M * N * 4 + N * 4, (ours, qlora_bytes)


# ---- a tiny 4-bit Llama with PEFT DoRA -------------------------------------------------------------

N_LAYERS = 2 * len(LLAMA_TARGETS)
# the multi-step tests adapt fewer projections (each interpreted layer step costs ~0.6 s)
STEP_TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(seed=0, device="cpu").save_pretrained(path)
    return path


def quantized_llama(path, bits=4, quant_type="nf4", nested=True):
    if bits == 4:
        config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                                 bnb_4bit_use_double_quant=nested,
                                                 bnb_4bit_compute_dtype=torch.float32)
    else:
        config = transformers.BitsAndBytesConfig(load_in_8bit=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32,
                                                             device_map=DEVICE)


def peft_qdora(path, bits=4, targets=LLAMA_TARGETS, **kwargs):
    model = peft.get_peft_model(quantized_llama(path, bits, **kwargs),
                                peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                                                use_dora=True))
    randomize_adapters(model)
    return model


def batch(seed=2):
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                                    if p.requires_grad}


def _assert_peft_parity(got, ref):
    (got_logits, got_loss, got_grads), (ref_logits, ref_loss, ref_grads) = got, ref
    tol = TOL[torch.float32]
    assert rel_err(got_logits, ref_logits) < tol
    assert rel_err(got_loss, ref_loss) < tol
    assert set(got_grads) == set(ref_grads) and len(got_grads) == 3 * N_LAYERS
    bad = {n: rel_err(got_grads[n], ref_grads[n]) for n in ref_grads}
    assert max(bad.values()) < tol, {n: e for n, e in bad.items() if e >= tol}


@needs_peft
@needs_kernels
@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("fp4", False)])
def test_qdora_llama_logits_loss_grads_match_peft(llama_dir, quant_type, nested):
    fused = peft_qdora(llama_dir, quant_type=quant_type, nested=nested).train()
    plain = copy.deepcopy(fused)
    ids = batch()
    ref = loss_and_grads(plain, ids)
    assert enable_fused_dora(fused) == N_LAYERS  # no layer left on PEFT's path
    assert fused_dora_status(fused).counts == {"fused": N_LAYERS}
    _assert_peft_parity(loss_and_grads(fused, ids), ref)


@needs_peft
@needs_kernels
def test_qdora_llama_adamw_steps_match_peft(llama_dir):
    fused = peft_qdora(llama_dir, targets=STEP_TARGETS)
    plain = copy.deepcopy(fused)
    enable_fused_dora(fused)
    losses = {"fused": [], "plain": []}
    for key, model in (("fused", fused), ("plain", plain)):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for step in range(5):
            opt.zero_grad()
            ids = batch(seed=10 + step)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            losses[key].append(loss.item())
    for a, b in zip(losses["fused"], losses["plain"]):
        assert abs(a - b) <= TOL[torch.float32] * abs(b)
    plain_params = dict(plain.named_parameters())
    for name, p in fused.named_parameters():
        if p.requires_grad:
            assert rel_err(p, plain_params[name]) < TOL[torch.float32], name
    assert fused_dora_status(fused).counts == {"fused": 2 * len(STEP_TARGETS)}


@needs_peft
@needs_kernels
def test_qdora_merge_save_disable_as_peft(llama_dir, tmp_path):
    model = peft_qdora(llama_dir, targets=STEP_TARGETS).eval()
    n_layers = 2 * len(STEP_TARGETS)
    plain = copy.deepcopy(model)
    enable_fused_dora(model)
    ids = batch()
    expected = logits(plain, ids)
    assert rel_err(logits(model, ids), expected) < TOL[torch.float32]

    model.save_pretrained(tmp_path)  # PEFT's files, loadable by plain PEFT over the same 4-bit model
    loaded = peft.PeftModel.from_pretrained(quantized_llama(llama_dir), tmp_path).eval()
    assert rel_err(logits(loaded, ids), expected) < TOL[torch.float32]
    assert set(model.state_dict()) == set(loaded.state_dict())

    for m in (model, plain):  # PEFT requantizes the merged 4-bit weight; both run PEFT's merge
        m.merge_adapter()
    assert all("merged" in v for v in fused_dora_status(model).values())
    assert torch.equal(logits(model, ids), logits(plain, ids))  # merged: PEFT's own path
    for m in (model, plain):
        m.unmerge_adapter()
    assert fused_dora_status(model).counts == {"fused": n_layers}
    assert rel_err(logits(model, ids), logits(plain, ids)) < TOL[torch.float32]

    merged = copy.deepcopy(model).merge_and_unload()
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in merged.modules())
    assert torch.equal(logits(merged, ids), logits(copy.deepcopy(plain).merge_and_unload(), ids))

    with model.disable_adapter(), plain.disable_adapter():
        assert all("disabled" in v for v in fused_dora_status(model).values())
        assert torch.equal(logits(model, ids), logits(plain, ids))



@needs_peft
@needs_kernels
def test_trainer_callback_on_4bit_llama(llama_dir, tmp_path):
    from fused_dora.integrations.transformers import FusedDoraCallback

    def train(out_dir, callbacks):
        torch.manual_seed(0)
        model = peft.get_peft_model(quantized_llama(llama_dir), peft.LoraConfig(
            use_dora=True, r=4, lora_alpha=8, target_modules=STEP_TARGETS, init_lora_weights=False))
        data = [{"input_ids": ids, "labels": ids} for ids in trainer_data()]
        trainer = transformers.Trainer(model=model, args=trainer_args(transformers.TrainingArguments, out_dir),
                                       train_dataset=data, callbacks=callbacks)
        trainer.train()
        return logged_losses(trainer), trainer.model

    plain_losses, plain_model = train(tmp_path / "plain", None)
    callback = FusedDoraCallback()
    fused_losses, fused_model = train(tmp_path / "fused", [callback])
    assert callback.fused_layers == 2 * len(STEP_TARGETS)
    assert fused_dora_status(fused_model).counts == {"fused": 2 * len(STEP_TARGETS)}
    assert len(fused_losses) == len(plain_losses) == 5
    for a, b in zip(fused_losses, plain_losses):
        assert abs(a - b) <= TOL[torch.float32] * abs(b)
    plain_params = dict(plain_model.named_parameters())
    for name, p in fused_model.named_parameters():
        if p.requires_grad:
            assert rel_err(p, plain_params[name]) < TOL[torch.float32], name


@needs_peft
@needs_kernels
def test_8bit_llama_matches_peft(llama_dir):
    """Linear8bitLt: the base layer's own int8 forward (outliers included) plus the DoRA epilogue,
    the norm from row chunks. One step each (PEFT's own QDoRA-8bit forward loses the weight's row
    scales on CPU after its first call, so the two models are deep copies taken before any call)."""
    fused = peft_qdora(llama_dir, bits=8).train()
    plain = copy.deepcopy(fused)
    ids = batch()
    ref = loss_and_grads(plain, ids)
    assert enable_fused_dora(fused) == N_LAYERS
    got = loss_and_grads(fused, ids)
    assert fused_dora_status(fused).counts == {"fused": N_LAYERS}
    _assert_peft_parity(got, ref)
    again = loss_and_grads(fused, ids)  # and again: the base layer's state survives the fused path
    assert torch.equal(again[0], got[0])


def test_8bit_norm_in_row_chunks(monkeypatch):
    import fused_dora.quantized as quantized

    lin = bnb.nn.Linear8bitLt(40, 30, bias=True, has_fp16_weights=False).to(DEVICE)
    rows, reason = describe_8bit(lin.weight, lin)
    assert reason is None
    lora_A, lora_B = _randn(4, 40, seed=1, scale=0.2), _randn(30, 4, seed=2, scale=0.3)
    truth = reference.weight_norm(bnbF.int8_vectorwise_dequant(lin.weight.data, lin.weight.SCB).double(),
                                  lora_A.double(), lora_B.double(), 1.5)
    monkeypatch.setattr(quantized, "NORM_CHUNK_ELEMENTS", 7 * 40)  # chunks of 7 rows
    norm = quantized.quantized_weight_norm(rows, lora_A, lora_B, 1.5)
    assert rel_err(norm, truth) < 1e-6


@needs_peft
# ---- without PEFT ------------------------------------------------------------------------------------
@needs_kernels
def test_replace_linear_over_4bit_and_save_adapter_loads_in_peft(llama_dir, tmp_path):
    model = quantized_llama(llama_dir, quant_type="fp4", nested=False).eval()
    ids = batch()
    base = logits(model, ids)
    assert fused_dora.replace_linear(model, LLAMA_TARGETS, r=4, lora_alpha=8) == N_LAYERS
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, FusedDoraLinear4bit) and "fp4 32x32" in repr(layer)
    assert torch.equal(logits(model, ids), base)  # a fresh adapter: the base model
    randomize_adapters(model)
    model.train()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    model.eval()
    expected = logits(model, ids)
    fused_dora.save_adapter(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(quantized_llama(llama_dir, quant_type="fp4", nested=False), tmp_path)
    assert rel_err(logits(loaded.eval(), ids), expected) < TOL[torch.float32]

    original = layer.weight
    layer.merge()  # requantized, as PEFT's 4-bit merge
    assert rel_err(logits(model, ids), expected) < 2e-2  # 4-bit rounding of the merged weight
    layer.unmerge()
    assert layer.weight is original and torch.equal(logits(model, ids), expected)


def test_from_linear_refuses_what_it_cannot_serve():
    unquantized = bnb.nn.Linear4bit(32, 16, quant_type="nf4")  # not moved to a device yet
    with pytest.raises(ValueError, match="not quantized yet"):
        FusedDoraLinear.from_linear(unquantized, r=2)
    with pytest.raises(ValueError, match="not quantized yet"):
        dora_linear_4bit(torch.randn(3, 32), unquantized.weight, None, torch.randn(2, 32), torch.randn(16, 2),
                         torch.ones(16), 1.0)
    eight = bnb.nn.Linear8bitLt(32, 16, has_fp16_weights=False).to(DEVICE)
    with pytest.raises(TypeError, match="Linear8bitLt"):
        FusedDoraLinear.from_linear(eight, r=2)


# ---- bad input: a reason, never a crash or a wrong number ---------------------------------------------
def _tiny_qdora(quant_type="nf4"):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = bnb.nn.Linear4bit(32, 24, bias=True, quant_type=quant_type, compute_dtype=torch.float32)
            self.b = bnb.nn.Linear4bit(24, 8, bias=False, quant_type=quant_type, compute_dtype=torch.float32)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    model = Two().to(DEVICE)
    model.is_loaded_in_4bit = True
    model = peft.get_peft_model(model, peft.LoraConfig(r=3, lora_alpha=6, target_modules=["a", "b"], use_dora=True))
    randomize_adapters(model)
    return model.eval()


@needs_peft
@needs_kernels
def test_unservable_4bit_weights_give_a_reason():
    model = _tiny_qdora()
    x = _randn(5, 32, seed=3)
    expected = logits_of(model, x)
    assert enable_fused_dora(model) == 2
    assert rel_err(logits_of(model, x), expected) < 1e-5
    a = model.base_model.model.a.base_layer
    status = lambda: fused_dora_status(model)["base_model.model.a"]  # noqa: E731
    good = a.weight

    # a quant type fused_dora does not read: the status says so, the call takes PEFT's path
    qs = good.quant_state
    other = copy.copy(qs)
    other.quant_type = "af4"
    good.quant_state = other
    assert "quant type 'af4' is not served" in status()
    with pytest.raises(ValueError, match="not served"):
        dora_linear_4bit(x, good, None, torch.randn(3, 32), torch.randn(24, 3), torch.ones(24), 1.0)
    good.quant_state = qs
    assert status() == "fused"

    # bitsandbytes' CPU inference layout
    repacked = copy.copy(qs)
    repacked.packing_format_for_cpu = True
    good.quant_state = repacked
    assert "CPU inference kernel" in status()
    good.quant_state = qs

    # a flattened (FSDP-style) shard of the packed weight, without its quant state
    a.weight = nn.Parameter(good.data.reshape(-1)[: good.data.numel() // 2].clone(), requires_grad=False)
    assert "not a bitsandbytes Params4bit (flattened or sharded by FSDP?)" in status()
    with pytest.raises(ValueError, match="FSDP"):
        dora_linear_4bit(x, a.weight, None, torch.randn(3, 32), torch.randn(24, 3), torch.ones(24), 1.0)
    # a Params4bit whose packed bytes do not cover the weight
    shard = bnb.nn.Params4bit(good.data.reshape(-1)[:100].clone(), requires_grad=False, quant_state=good.quant_state,
                              bnb_quantized=True, quant_type="nf4")
    a.weight = shard
    assert "holds 100 bytes" in status()
    a.weight = good
    assert status() == "fused"
    assert rel_err(logits_of(model, x), expected) < 1e-5


@needs_peft
def test_unquantized_4bit_layer_runs_peft_path_with_reason():
    model = _tiny_qdora()
    enable_fused_dora(model)
    a = model.base_model.model.a.base_layer
    a.weight = bnb.nn.Params4bit(torch.randn(24, 32), requires_grad=False, quant_type="nf4")  # not quantized
    assert "not quantized yet" in fused_dora_status(model)["base_model.model.a"]


def logits_of(model, x):
    with torch.no_grad():
        return model(x)
