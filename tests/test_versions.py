"""Older triton / numpy (issue 17): where they cannot run the kernels, backend='auto' takes the
reference path with the reason and backend='triton' raises it. The versions are faked, so this
runs on the newest ones too."""
import os
import pathlib
import re

import pytest
import torch

import fused_dora
import fused_dora.backend as backend
from fused_dora import reference
from helpers import make_inputs, rel_err

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
