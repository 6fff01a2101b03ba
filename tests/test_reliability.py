"""Regression tests for the defects of issue 9 (3 to 13): each one failed before its fix."""
import copy
import pathlib
import warnings

import pytest
import torch
import torch.nn as nn

import fused_dora
from fused_dora import replace_linear
from helpers import DEVICE, make_inputs, trained_layer

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCALING = 1.5


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
    layer = trained_layer(seed=13)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 24, device=DEVICE)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(x)
    ours = [w for w in caught if "fused_dora" in str(w.filename) or "lru_cache" in str(w.message)]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]
