"""Where the kernels cannot run, backend='auto' takes the reference path with the reason and
backend='triton' raises it: kernels that cannot be imported, older triton / numpy (faked versions,
so this runs on the newest ones too), bf16 under the interpreter. A source checkout finds the
kernels without an install."""
import os
import pathlib
import re
import warnings

import pytest
import torch
import torch.nn as nn

import fused_dora
import fused_dora.backend as backend
from fused_dora import reference
from helpers import DEVICE, TOL, fp64, make_inputs, rel_err

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCALING = 1.5
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.mark.parametrize("triton_version, numpy_version, says", [
    ("3.9.0", "2.4.1", None),
    ("3.7.0", "2.4.0", None),
    ("3.6.0", "2.3.5", None),
    ("3.6.0", None, None),  # compiled kernels: numpy does not matter
    ("3.6.0", "2.4.0", "Triton 3.6.0's interpreter needs numpy < 2.4"),
    ("3.3.1+git1a2b3c4", "2.4.0rc1", "Triton 3.3.1+git1a2b3c4's interpreter needs numpy < 2.4"),
    ("3.2.0", "2.3.5", "triton 3.2.0 is older than fused_dora supports"),
    ("3.10.0", "3.0.0", None),
    ("not-a-version", "2.4.0", None),
])
def test_version_reason(triton_version, numpy_version, says):
    why = backend.version_reason(triton_version, numpy_version)
    assert why == says if says is None else why.startswith(says), why


def test_min_triton_is_the_declared_bound():
    declared = re.search(r'"triton>=(\d+)\.(\d+)', (ROOT / "pyproject.toml").read_text())
    assert (int(declared[1]), int(declared[2])) == backend.MIN_TRITON


@pytest.fixture
def fresh_reasons(monkeypatch):
    monkeypatch.setattr(backend, "_DEVICE_REASONS", {})


def _falls_back(t, match):
    with pytest.warns(backend.FusedDoraWarning, match=match):
        y = fused_dora.dora_linear(**t, scaling=SCALING)
    assert rel_err(y, reference.dora_linear(**t, scaling=SCALING)) < 1e-6
    with pytest.raises(ValueError, match=match):
        fused_dora.dora_linear(**t, scaling=SCALING, backend="triton")
    assert match in backend.reference_reason("auto", t["x"].device, t["x"].dtype)


@pytest.mark.skipif(not INTERPRETER, reason="the interpreter's numpy")
def test_interpreter_of_triton_before_3_7_with_numpy_2_4(monkeypatch, fresh_reasons):
    numpy = pytest.importorskip("numpy")
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.0")
    _falls_back(make_inputs(4, 12, 10, 2, seed=17), "needs numpy < 2.4")


@pytest.mark.skipif(not INTERPRETER and not torch.cuda.is_available(), reason="needs kernels to expect")
def test_triton_older_than_supported_is_not_imported(monkeypatch, fresh_reasons):
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton, "__version__", "3.2.0")

    def must_not_import():
        raise AssertionError("the kernels were imported with an unsupported triton")

    monkeypatch.setattr(backend, "_kernels_module", None)
    monkeypatch.setattr(backend, "_import_kernels", must_not_import)
    t = make_inputs(4, 12, 10, 2, seed=18)
    _falls_back(t, "older than fused_dora supports")


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
