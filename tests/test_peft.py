"""fused_dora.integrations.peft: PEFT DoRA layers served by the fused kernels, parity with PEFT itself."""
import copy
import logging
import os
import warnings

import pytest
import torch
import torch.nn as nn

from helpers import LLAMA_TARGETS, randomize_adapters, tiny_llama
from helpers import rel_err as rel

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
# peft calls a transformers API that transformers 5.x deprecates
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
from fused_dora.integrations.peft import (  # noqa: E402
    FusedDoraWarning,
    disable_fused_dora,
    enable_fused_dora,
    fused_dora_status,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS_RUN = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_kernels = pytest.mark.skipif(not KERNELS_RUN, reason="needs CUDA or TRITON_INTERPRET=1")


def peft_llama(seed=0, **config):
    config = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": LLAMA_TARGETS, **config}
    model = peft.get_peft_model(tiny_llama(seed), peft.LoraConfig(use_dora=True, **config))
    randomize_adapters(model)
    return model


@pytest.fixture
def kernel_calls(monkeypatch):
    """Records every launch of the fused forward kernel (training and inference paths alike)."""
    calls = []
    if not KERNELS_RUN:
        return calls
    from fused_dora.kernels import forward as kernels

    original = kernels.dora_forward

    def counting_dora_forward(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return original(x, *args, **kwargs)

    monkeypatch.setattr(kernels, "dora_forward", counting_dora_forward)
    return calls


def batch(seed=2, n=2, t=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (n, t), generator=g).to(DEVICE)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


@needs_kernels
def test_llama_logits_loss_grads_match_peft(kernel_calls):
    model = peft_llama()
    model.train()
    ids = batch()
    ref_logits, ref_loss, ref_grads = loss_and_grads(model, ids)
    assert not kernel_calls
    assert enable_fused_dora(model) == 2 * len(LLAMA_TARGETS)
    assert set(fused_dora_status(model).values()) == {"fused"}
    got_logits, got_loss, got_grads = loss_and_grads(model, ids)
    assert len(kernel_calls) == 2 * len(LLAMA_TARGETS)  # every adapted projection went through the kernels
    assert rel(got_logits, ref_logits) < 1e-5
    assert rel(got_loss, ref_loss) < 1e-5
    assert set(got_grads) == set(ref_grads) and len(got_grads) == 3 * 2 * len(LLAMA_TARGETS)
    for name in ref_grads:
        assert rel(got_grads[name], ref_grads[name]) < 1e-5, name


@needs_kernels
def test_llama_adamw_steps_match_peft(kernel_calls):
    fused = peft_llama()
    plain = copy.deepcopy(fused)
    enable_fused_dora(fused)
    losses = {"fused": [], "plain": []}
    for key, model in (("fused", fused), ("plain", plain)):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for step in range(3):
            opt.zero_grad()
            ids = batch(seed=10 + step)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            losses[key].append(loss.item())
    assert kernel_calls
    for a, b in zip(losses["fused"], losses["plain"]):
        assert abs(a - b) <= 1e-5 * abs(b)
    plain_params = dict(plain.named_parameters())
    for name, p in fused.named_parameters():
        if p.requires_grad:
            assert rel(p, plain_params[name]) < 1e-5, name


def test_save_pretrained_loads_in_plain_peft(tmp_path):
    model = peft_llama()
    enable_fused_dora(model)
    ids = batch()
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()  # plain PEFT, no fused forward
    assert all(v.startswith("not switched") for v in fused_dora_status(loaded).values())
    assert rel(logits(loaded, ids), expected) < 1e-5
    # the state_dict of a switched model is PEFT's own
    assert set(model.state_dict()) == set(loaded.state_dict())


def test_merge_and_unload_matches_unmerged(kernel_calls):
    model = peft_llama()
    enable_fused_dora(model)
    ids = batch()
    expected = logits(model, ids)
    calls = len(kernel_calls)

    model.merge_adapter()
    assert all("merged" in v for v in fused_dora_status(model).values())
    assert rel(logits(model, ids), expected) < 1e-5
    assert len(kernel_calls) == calls  # merged: PEFT's path (a plain base layer)
    model.unmerge_adapter()
    assert set(fused_dora_status(model).values()) == {"fused"}
    assert rel(logits(model, ids), expected) < 1e-5

    merged = copy.deepcopy(model).merge_and_unload()
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in merged.modules())
    assert rel(logits(merged, ids), expected) < 1e-5


def test_disable_fused_dora_restores_peft_path(kernel_calls):
    model = peft_llama()
    ids = batch()
    expected = logits(model, ids)
    assert enable_fused_dora(model) == 14
    assert enable_fused_dora(model) == 14  # idempotent
    fused_out = logits(model, ids)
    assert disable_fused_dora(model) == 14
    assert disable_fused_dora(model) == 0
    calls = len(kernel_calls)
    assert rel(logits(model, ids), expected) < 1e-5
    assert len(kernel_calls) == calls
    assert rel(fused_out, expected) < 1e-5
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_disable_adapter_context_gives_base_model(kernel_calls):
    ids = batch()
    base_logits = logits(tiny_llama(), ids)
    model = peft_llama()
    enable_fused_dora(model)
    with model.disable_adapter():
        calls = len(kernel_calls)
        assert rel(logits(model, ids), base_logits) < 1e-6
        assert len(kernel_calls) == calls
        assert all("disabled" in v for v in fused_dora_status(model).values())
    assert rel(logits(model, ids), base_logits) > 1e-3  # the adapters are back


# ---- smaller models for the per-layer rules ---------------------------------------------------
class TinyMixed(nn.Module):
    """An embedding, a GPT-2 style Conv1D (fan_in_fan_out), a Conv1d and two Linears."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 12)
        self.c1d = transformers.pytorch_utils.Conv1D(12, 12)  # (nf, nx): weight [in, out]
        self.conv = nn.Conv1d(12, 12, kernel_size=1)
        self.lin = nn.Linear(12, 20)
        self.out = nn.Linear(20, 8, bias=False)

    def forward(self, ids):
        h = self.c1d(self.emb(ids))
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.out(torch.relu(self.lin(h)))


def tiny_mixed_peft(targets, **config):
    torch.manual_seed(0)
    base = TinyMixed().to(DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's note about fan_in_fan_out for Conv1D
        model = peft.get_peft_model(base, peft.LoraConfig(r=3, lora_alpha=6, target_modules=targets,
                                                          use_dora=True, **config))
    randomize_adapters(model)
    return model


def tiny_ids():
    return torch.randint(0, 16, (3, 5), generator=torch.Generator().manual_seed(4)).to(DEVICE)


def test_unsupported_layers_are_reported_and_fall_back(kernel_calls, caplog):
    # PEFT builds DoRA on an Embedding from 0.13 on, on an nn.Conv1d from 0.16 on
    unserved = ["c1d"] + ["emb"] * hasattr(peft.tuners.lora.dora, "DoraEmbeddingLayer") \
        + ["conv"] * hasattr(peft.tuners.lora.dora, "DoraConv1dLayer")
    total = len(unserved) + 2
    model = tiny_mixed_peft(unserved + ["lin", "out"]).eval()
    ids = tiny_ids()
    with torch.no_grad():
        expected = model(ids)
    with pytest.warns(FusedDoraWarning) as record, caplog.at_level(logging.DEBUG, logger="fused_dora"):
        n = enable_fused_dora(model)
    assert n == 2  # lin and out
    assert len(record) == 1  # one summary line, counted by reason
    message = str(record[0].message)
    assert "\n" not in message and f"{len(unserved)} of {total} PEFT DoRA layers keep PEFT's own forward" in message
    assert "fan_in_fan_out=True (1)" in message
    assert ("Embedding layers are not served" in message) == ("emb" in unserved)
    assert f"2 of {total} PEFT DoRA layers switched" in caplog.text
    for name in unserved:
        assert f"base_model.model.{name}:" in caplog.text  # each layer's reason at DEBUG
    status = {k.rsplit(".", 1)[-1]: v for k, v in fused_dora_status(model).items()}
    assert status["lin"] == status["out"] == "fused" and "fan_in_fan_out" in status["c1d"]
    assert "Embedding" in status.get("emb", "Embedding") and "Conv1d" in status.get("conv", "Conv1d")
    with torch.no_grad():
        got = model(ids)
    if KERNELS_RUN:
        assert len(kernel_calls) == 2
    assert rel(got, expected) < 1e-5


def test_several_active_adapters_and_adapter_switching(kernel_calls, caplog):
    model = tiny_mixed_peft(["lin", "out"]).eval()
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=3, target_modules=["lin", "out"], use_dora=True))
    randomize_adapters(model, seed=7)
    ids = tiny_ids()

    def peft_out():
        disable_fused_dora(model)
        with torch.no_grad():
            out = model(ids)
        enable_fused_dora(model, warn=False)
        return out

    enable_fused_dora(model)
    for adapter in ("other", "default"):
        model.set_adapter(adapter)
        expected = peft_out()
        calls = len(kernel_calls)
        with torch.no_grad():
            assert rel(model(ids), expected) < 1e-5
        if KERNELS_RUN:
            assert len(kernel_calls) == calls + 2

    model.base_model.set_adapter(["default", "other"])  # both at once: PEFT's path
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="fused_dora"):
        warnings.simplefilter("error")  # the user's own setting: logged, not warned
        enable_fused_dora(model)
    assert "2 switched layers run PEFT's own forward for now: 2 active adapters" in caplog.text
    assert all("2 active adapters" in v for v in fused_dora_status(model).values())
    expected = peft_out()
    calls = len(kernel_calls)
    with torch.no_grad():
        assert rel(model(ids), expected) < 1e-6
    assert len(kernel_calls) == calls


def test_plain_lora_adapter_and_mixed_batch_fall_back(kernel_calls, caplog):
    model = tiny_mixed_peft(["lin"]).eval()
    model.add_adapter("plain", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["lin"], init_lora_weights=False))
    model.set_adapter("plain")  # a LoRA adapter (no DoRA) on a DoRA-capable layer
    ids = tiny_ids()
    with torch.no_grad():
        expected = model(ids)
    with caplog.at_level(logging.INFO, logger="fused_dora"):
        assert enable_fused_dora(model) == 1
    assert "'plain' is not DoRA" in caplog.text
    with torch.no_grad():
        assert rel(model(ids), expected) < 1e-6
    assert not kernel_calls

    model.set_adapter("default")
    x = torch.randn(3, 12, device=DEVICE)
    with pytest.raises(ValueError, match="DoRA"):  # PEFT's own error for adapter_names with DoRA
        model.base_model.model.lin(x, adapter_names=["default"] * 3)
    assert not kernel_calls


def test_dropout_semantics(kernel_calls, caplog):
    ids = tiny_ids()
    model = tiny_mixed_peft(["lin", "out"], lora_dropout=0.3).train()
    plain = copy.deepcopy(model)
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="fused_dora"):
        warnings.simplefilter("error")  # a setting the user chose: one log line, no warning
        enable_fused_dora(model, dropout_semantics="peft")
    assert caplog.text.count("dropout_semantics='peft'") == 1
    torch.manual_seed(5)
    expected = plain(ids)
    torch.manual_seed(5)
    got = model(ids)
    assert torch.equal(got, expected)  # PEFT's own forward, same dropout masks
    assert not kernel_calls
    assert all("dropout_semantics='peft'" in v for v in fused_dora_status(model).values())

    enable_fused_dora(model, dropout_semantics="fused")
    assert set(fused_dora_status(model).values()) == {"fused"}
    out = model(ids)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if KERNELS_RUN:
        assert len(kernel_calls) == 2
    model.eval()
    plain.eval()
    with torch.no_grad():  # without active dropout both semantics are the same function
        assert rel(model(ids), plain(ids)) < 1e-5

    with pytest.raises(ValueError, match="dropout_semantics"):
        enable_fused_dora(model, dropout_semantics="exact")
    with pytest.raises(ValueError, match="backend"):
        enable_fused_dora(model, backend="cuda")


def test_half_precision_base_with_fp32_adapters():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 16)).to(DEVICE, torch.float16)
    model = peft.get_peft_model(base, peft.LoraConfig(r=5, lora_alpha=10, target_modules=["0", "2"], use_dora=True))
    randomize_adapters(model)
    assert model.base_model.model[0].lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(6, 24, device=DEVICE).half()
    with torch.no_grad():
        expected = model(x)
        enable_fused_dora(model)
        got = model(x)
    assert got.dtype == torch.float16
    assert set(fused_dora_status(model).values()) == {"fused"}
    assert rel(got, expected) < 3e-3


def test_autocast(kernel_calls):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 16)).to(DEVICE)
    model = peft.get_peft_model(base, peft.LoraConfig(r=5, lora_alpha=10, target_modules=["0", "2"], use_dora=True))
    randomize_adapters(model)
    x = torch.randn(6, 24, device=DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.float16):
        expected = model(x)
        enable_fused_dora(model)
        got = model(x)
    assert got.dtype == expected.dtype == torch.float16
    assert set(fused_dora_status(model).values()) == {"fused"}
    if KERNELS_RUN:
        assert len(kernel_calls) == 2
    assert rel(got, expected) < 3e-3


def test_deepcopy_of_switched_model_is_independent(kernel_calls):
    model = tiny_mixed_peft(["lin", "out"]).eval()
    enable_fused_dora(model)
    clone = copy.deepcopy(model)
    layer = clone.base_model.model.lin
    assert layer.forward.layer is layer
    ids = tiny_ids()
    with torch.no_grad():
        clone.base_model.model.lin.lora_B["default"].weight.mul_(2)
        a, b = model(ids), clone(ids)
    assert rel(a, b) > 1e-4  # the clone computes with its own parameters
    assert disable_fused_dora(clone) == 2 and disable_fused_dora(model) == 2


def test_no_dora_layers_warns():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.warns(FusedDoraWarning, match="no PEFT DoRA layers"):
        assert enable_fused_dora(model) == 0
    with pytest.raises(TypeError, match="model"):
        enable_fused_dora("not a model")


def test_status_counts_and_repr():
    model = tiny_mixed_peft(["lin", "out"]).eval()
    enable_fused_dora(model)
    lin = model.base_model.model.lin
    status = fused_dora_status(model)
    assert status.counts == {"fused": 2} and isinstance(status, dict)
    assert repr(lin).endswith(")") and "fused_dora='fused'" in repr(lin)
    model.base_model.disable_adapter_layers()
    assert "fused_dora='adapters are disabled'" in repr(lin)
    assert fused_dora_status(model).counts == {"adapters are disabled": 2}
    model.base_model.enable_adapter_layers()
    disable_fused_dora(model)
    assert "fused_dora" not in repr(lin)


def _freed_without_gc(build):
    """Whether ``del model`` frees the model at once (no reference cycle), with gc disabled."""
    import gc
    import weakref

    gc.collect()
    gc.disable()
    try:
        model, weight = build()
        ref = weakref.ref(weight)
        del model, weight
        return ref() is None
    finally:
        gc.enable()


def test_del_model_frees_it_without_the_garbage_collector():
    def build():
        model = peft_llama()
        enable_fused_dora(model)
        model(input_ids=batch()).logits.sum().backward()  # a training step: nothing kept either
        repr(model)
        return model, model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight

    def plain():
        model = peft_llama()
        return model, model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight

    assert _freed_without_gc(plain), "PEFT alone should free the model at once"
    assert _freed_without_gc(build)


def test_switched_model_pickles_and_copies_to_its_own_layers(tmp_path):
    model = peft_llama().eval()
    enable_fused_dora(model)
    ids = batch()
    expected = logits(model, ids)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    layer = loaded.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.forward.layer is layer and layer.extra_repr.layer is layer
    assert set(fused_dora_status(loaded).values()) == {"fused"}
    assert rel(logits(loaded, ids), expected) == 0


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 8),
                    reason="torch 2.7's Dynamo cannot trace transformers 5's Llama whole (its per-layer config "
                           "iterator, _PerLayerConfigView.__next__): not fused_dora's code")
def test_compiled_fullgraph_before_any_eager_call(monkeypatch):
    """The first call of a switched model may be a compiled one (nothing ran eagerly yet, so the
    kernels were never imported): the backend check runs while tracing, without a graph break."""
    import fused_dora.backend as backend

    monkeypatch.setattr(backend, "_DEVICE_REASONS", {})
    monkeypatch.setattr(backend, "_kernels_module", None)
    torch._dynamo.reset()
    model = peft_llama()
    enable_fused_dora(model)
    ids = batch()
    compiled = torch.compile(model.base_model.model, backend="aot_eager", fullgraph=True, dynamic=True)
    got = compiled(input_ids=ids).logits
    assert set(fused_dora_status(model).values()) == {"fused"}
    assert rel(got, logits(model, ids)) < 1e-5


def test_peft_before_dora_layer_modules_is_refused(monkeypatch):
    """PEFT < 0.12 kept the magnitudes in a ParameterDict, without peft.tuners.lora.dora: nothing is
    switched, the warning and the status say why, and the model computes what PEFT computes."""
    import re
    import sys

    import fused_dora.integrations.peft as integration

    model = tiny_mixed_peft(["lin", "out"]).eval()
    ids = tiny_ids()
    with torch.no_grad():
        expected = model(ids)
    monkeypatch.setattr(integration, "_PEFT_CLASSES", None)
    monkeypatch.setitem(sys.modules, "peft.tuners.lora.dora", None)  # importing it fails, as in PEFT 0.11
    reason = f"PEFT {peft.__version__} is not served (no DoraLinearLayer"
    with pytest.warns(FusedDoraWarning, match=re.escape(reason)):
        assert enable_fused_dora(model) == 0
    assert all(v.startswith("not switched: " + reason) for v in fused_dora_status(model).values())
    with torch.no_grad():
        assert torch.equal(model(ids), expected)


def test_in_place_after_peft_projection():
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


def test_inference_mode_validation_through_enable_fused_dora():
    """Lightning validates under inference_mode between steps: losses equal PEFT's, and the next
    training forward saves no inference tensor for backward."""
    model = peft_llama(seed=1)
    plain = copy.deepcopy(model)
    enable_fused_dora(model)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    losses = {}
    for key, m in (("fused", model), ("plain", plain)):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, fused=True)
        losses[key] = []
        for _ in range(2):
            m.train()
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            m.eval()
            with torch.inference_mode():
                losses[key].append(m(input_ids=ids, labels=ids).loss.item())
        m.train()
        losses[key].append(m(input_ids=ids, labels=ids).loss.item())  # was: inference tensors saved
    for a, b in zip(losses["fused"], losses["plain"]):
        assert abs(a - b) <= 1e-5 * abs(b)
