"""fused_dora.replace: replace_linear targeting, and adapters saved / loaded in PEFT's format."""
import copy
import json

import pytest
import torch
import torch.nn as nn

from fused_dora import FusedDoraLinear
from fused_dora.replace import load_adapter, replace_linear, save_adapter
from helpers import LLAMA_TARGETS, randomize_adapters, tiny_llama
from helpers import rel_err as rel

transformers = pytest.importorskip("transformers")
# peft calls a transformers API that transformers 5.x deprecates
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TARGETS = LLAMA_TARGETS
BACKEND = "reference"  # the plumbing is under test here; kernel parity is tested elsewhere


IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS.to(DEVICE)).logits


# ---- replace_linear ---------------------------------------------------------------------------
def test_replace_linear_counts_and_trainable_params():
    model = tiny_llama()
    before = logits(model)
    n_params = sum(p.numel() for p in model.parameters())
    assert replace_linear(model, TARGETS, r=4, lora_alpha=8, backend=BACKEND) == 14
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FusedDoraLinear)}
    assert len(layers) == 14 and all(n.rsplit(".", 1)[-1] in TARGETS for n in layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{p}" for n in layers for p in ("lora_A", "lora_B", "magnitude")}
    # weights are shared, not copied; a fresh adapter computes the base model exactly
    assert sum(p.numel() for n, p in model.named_parameters() if not p.requires_grad) == n_params
    assert rel(logits(model), before) < 1e-6
    layer = model.model.layers[0].self_attn.q_proj
    assert (layer.r, layer.scaling, layer.lora_A.shape) == (4, 2.0, (4, 32))


@pytest.mark.parametrize("targets, expected", [
    (r".*\.(q|v)_proj", 4),                       # regex: fullmatch on the module name
    (r"model\.layers\.1\.mlp\..*_proj", 3),
    (["layers.0.self_attn.q_proj", "down_proj"], 3),  # suffixes after a dot
    ("all-linear", 14),                           # PEFT's shorthand: every Linear but lm_head
])
def test_replace_linear_targeting(targets, expected):
    model = tiny_llama()
    assert replace_linear(model, targets, r=2, lora_alpha=2, backend=BACKEND) == expected
    assert type(model.lm_head) is nn.Linear
    assert not any(m.training for m in model.modules())  # the replaced layers' eval mode is kept


def test_replace_linear_rslora_dropout_and_second_call():
    model = tiny_llama()
    replace_linear(model, ["q_proj"], r=4, lora_alpha=8, lora_dropout=0.1, use_rslora=True, backend=BACKEND)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.scaling == pytest.approx(8 / 2) and layer.lora_dropout == pytest.approx(0.1)
    assert replace_linear(model, ["v_proj"], r=2, lora_alpha=2, backend=BACKEND) == 2
    assert layer.lora_A.requires_grad  # earlier adapters stay trainable
    with pytest.raises(ValueError, match="already a FusedDoraLinear"):
        replace_linear(model, ["q_proj"], r=4, lora_alpha=8)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(target_modules=["nope"]), ValueError, "matched no"),
    (dict(target_modules="nope.*"), ValueError, "matched no"),
    (dict(target_modules=[]), ValueError, "must not be empty"),
    (dict(target_modules=""), ValueError, "empty string"),
    (dict(target_modules="(unclosed"), ValueError, "regular expression"),
    (dict(target_modules=[3]), TypeError, "non-empty strings"),
    (dict(target_modules=5), TypeError, "target_modules"),
    (dict(target_modules=["mlp"]), ValueError, r"mlp \(LlamaMLP, not a plain"),
    (dict(target_modules=r".*mlp\..*"), ValueError, "act_fn"),  # PEFT too rejects matched non-Linears
    (dict(r=0), ValueError, "r must be >= 1"),
    (dict(r=2.0), TypeError, "r must be an int"),  # as the FusedDoraLinear constructor says
    (dict(r="8"), TypeError, "r must be an int"),
    (dict(lora_alpha="8"), TypeError, "lora_alpha"),
    (dict(lora_alpha=float("nan")), ValueError, "lora_alpha"),
    (dict(lora_dropout=1.0), ValueError, "lora_dropout"),
    (dict(use_rslora="yes"), TypeError, "use_rslora"),
])
def test_replace_linear_bad_arguments(kwargs, error, match):
    args = dict(target_modules=["q_proj"], r=4, lora_alpha=8, **{})
    args.update(kwargs)
    model = tiny_llama()
    with pytest.raises(error, match=match):
        replace_linear(model, **args)
    assert not any(isinstance(m, FusedDoraLinear) for m in model.modules())  # nothing changed
    with pytest.raises(TypeError, match="model"):
        replace_linear("model", ["q_proj"], 4, 8)


def test_linear_subclasses_are_not_replaced():
    mha = nn.MultiheadAttention(8, 2)  # out_proj is a Linear subclass whose weight MHA reads directly
    with pytest.raises(ValueError, match="NonDynamicallyQuantizableLinear"):
        replace_linear(mha, ["out_proj"], r=2, lora_alpha=2)


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


# ---- PEFT's adapter format ----------------------------------------------------------------------
def test_save_adapter_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    replace_linear(model, TARGETS, r=4, lora_alpha=8, lora_dropout=0.05, backend=BACKEND)
    randomize_adapters(model)
    expected = logits(model)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["peft_type"] == "LORA"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.05)
    assert len(config["target_modules"]) == 14
    assert config["task_type"] == "CAUSAL_LM"  # what the model knows: LlamaForCausalLM
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert isinstance(loaded, peft.PeftModelForCausalLM)
    assert rel(logits(loaded), expected) < 1e-5
    model.config._name_or_path = "org/tiny-llama"
    save_adapter(model, tmp_path / "named", task_type="CAUSAL_LM")
    config = json.loads((tmp_path / "named" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/tiny-llama"
    plain = nn.Sequential(nn.Linear(4, 4))
    replace_linear(plain, ["0"], r=2, lora_alpha=2, backend=BACKEND)
    save_adapter(plain, tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["task_type"] is None


@pytest.mark.parametrize("wrap", ["compiled", "data-parallel", "compiled-layer"])
def test_save_and_load_adapter_see_through_wrappers(tmp_path, wrap):
    """A compiled (or DataParallel-wrapped) model saves under its own module names, which PEFT loads
    into the plain base model; load_adapter and replace_linear accept the wrapped model too."""
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    if wrap == "compiled-layer":  # a compiled block inside the model: "_orig_mod" inside the names
        model.model.layers[0] = torch.compile(model.model.layers[0], backend="eager")
        wrapped = model
    else:
        wrapped = torch.compile(model, backend="eager") if wrap == "compiled" else nn.DataParallel(model)
    assert replace_linear(wrapped, TARGETS, r=4, lora_alpha=8, backend=BACKEND) == 14
    randomize_adapters(model)
    expected = logits(model)
    save_adapter(wrapped, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert not [n for n in config["target_modules"] if "_orig_mod" in n or n.startswith("module.")]
    assert config["task_type"] == "CAUSAL_LM"
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert rel(logits(loaded), expected) < 1e-5
    fresh = tiny_llama()
    fresh.model.layers[0] = torch.compile(fresh.model.layers[0], backend="eager")
    assert load_adapter(torch.compile(fresh, backend="eager"), tmp_path, backend=BACKEND) == 14
    assert rel(logits(fresh), expected) < 1e-5


def test_save_adapter_refuses_sharded_tensors(tmp_path):
    pytest.importorskip("peft")
    model = tiny_llama()
    replace_linear(model, ["q_proj"], r=2, lora_alpha=2, backend=BACKEND)
    layer = model.model.layers[0].self_attn.q_proj
    layer.lora_A = nn.Parameter(layer.lora_A.detach().flatten()[:5])  # as FSDP leaves a flattened shard
    with pytest.raises(ValueError, match="lora_A is a Tensor of shape \\(5,\\).*summon_full_params"):
        save_adapter(model, tmp_path)


def test_save_adapter_mixed_ranks_and_rslora(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    replace_linear(model, ["q_proj", "v_proj", "o_proj"], r=4, lora_alpha=8, use_rslora=True, backend=BACKEND)
    replace_linear(model, ["up_proj"], r=3, lora_alpha=5, use_rslora=True, backend=BACKEND)
    randomize_adapters(model)
    expected = logits(model)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and len(config["rank_pattern"]) == 2 and len(config["alpha_pattern"]) == 2
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert rel(logits(loaded), expected) < 1e-5
    # and back, into a fresh model
    fresh = tiny_llama()
    assert load_adapter(fresh, tmp_path, backend=BACKEND) == 8
    assert fresh.model.layers[1].mlp.up_proj.r == 3
    assert rel(logits(fresh), expected) < 1e-5


def test_save_adapter_top_level_pattern_keys(tmp_path):
    peft = pytest.importorskip("peft")
    from packaging.version import Version

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4)).to(DEVICE)

    trained = model()
    replace_linear(trained, ["0"], r=2, lora_alpha=2, backend=BACKEND)
    replace_linear(trained, ["1"], r=3, lora_alpha=3, backend=BACKEND)
    randomize_adapters(trained)
    x = torch.randn(5, 8, device=DEVICE)
    with pytest.warns(UserWarning, match=r"PEFT < 0.15 cannot match .* top-level modules \(1\)"):
        save_adapter(trained, tmp_path)
    fresh = model()
    if Version(peft.__version__) < Version("0.15"):  # r=2 for both: the r=3 tensors do not fit
        with pytest.raises(ValueError, match="shape"):
            load_adapter(fresh, tmp_path, backend=BACKEND)
        return
    assert load_adapter(fresh, tmp_path, backend=BACKEND) == 2
    with torch.no_grad():
        assert rel(fresh(x), trained(x)) < 1e-5
        assert rel(peft.PeftModel.from_pretrained(model(), tmp_path)(x), trained(x)) < 1e-5


def test_save_adapter_needs_layers(tmp_path):
    pytest.importorskip("peft")
    with pytest.raises(ValueError, match="no FusedDoraLinear"):
        save_adapter(tiny_llama(), tmp_path)
    model = tiny_llama()
    replace_linear(model, ["q_proj"], r=2, lora_alpha=2, use_rslora=True, backend=BACKEND)
    replace_linear(model, ["v_proj"], r=2, lora_alpha=2, backend=BACKEND)
    with pytest.raises(ValueError, match="use_rslora"):
        save_adapter(model, tmp_path)


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory):
    """A DoRA adapter trained (2 SGD steps) by plain PEFT, saved with save_pretrained; and its logits."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS,
                                                             use_dora=True))
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=IDS.to(DEVICE), labels=IDS.to(DEVICE)).loss.backward()
        opt.step()
    model.eval()
    path = tmp_path_factory.mktemp("peft")
    model.save_pretrained(path)
    return path, logits(model)


def test_load_peft_adapter_into_replaced_model(peft_adapter):
    path, expected = peft_adapter
    model = tiny_llama()
    replace_linear(model, TARGETS, r=4, lora_alpha=16, backend=BACKEND)
    assert rel(logits(model), expected) > 1e-4  # training moved the adapter away from the identity
    assert load_adapter(model, path) == 14
    assert rel(logits(model), expected) < 1e-5
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {
        "lora_A", "lora_B", "magnitude"}


def test_load_peft_adapter_into_plain_model(peft_adapter):
    path, expected = peft_adapter
    model = tiny_llama()
    assert load_adapter(model, path, backend=BACKEND) == 14  # nn.Linear layers are replaced
    assert sum(isinstance(m, FusedDoraLinear) for m in model.modules()) == 14
    assert rel(logits(model), expected) < 1e-5


def test_load_adapter_mismatches(peft_adapter, tmp_path):
    path, _ = peft_adapter
    model = tiny_llama()
    replace_linear(model, TARGETS, r=8, lora_alpha=32, backend=BACKEND)
    with pytest.raises(ValueError, match="r=8"):
        load_adapter(model, path)
    model = tiny_llama()
    replace_linear(model, TARGETS, r=4, lora_alpha=8, backend=BACKEND)
    with pytest.raises(ValueError, match="scaling"):
        load_adapter(model, path)
    model = tiny_llama()
    replace_linear(model, TARGETS + ["lm_head"], r=4, lora_alpha=16, backend=BACKEND)
    with pytest.raises(ValueError, match="lm_head"):
        load_adapter(model, path)
    assert load_adapter(model, path, strict=False) == 14
    with pytest.raises(ValueError, match="does not have"):
        load_adapter(nn.Sequential(nn.Linear(32, 32)), path)
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="not a PEFT DoRA adapter"):
        load_adapter(tiny_llama(), tmp_path / "lora")
