"""Typing: py.typed ships, every public signature is annotated, and mypy --strict on a user script
finds nothing to complain about in our signatures (and does see them: a misuse is caught)."""
import inspect
import pathlib

import pytest

import fused_dora
from fused_dora import FusedDoraLinear, reference

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _public_callables():
    from fused_dora.integrations import peft as peft_integration

    yield from (fused_dora.dora_linear, fused_dora.dora_weight_norm, fused_dora.replace_linear,
                fused_dora.save_adapter, fused_dora.load_adapter, reference.dora_linear, reference.weight_norm,
                reference.magnitude_scale, peft_integration.enable_fused_dora, peft_integration.disable_fused_dora,
                peft_integration.fused_dora_status)
    for name, member in vars(FusedDoraLinear).items():
        if not name.startswith("_") or name == "__init__":
            member = getattr(FusedDoraLinear, name)
            if callable(member):
                yield member
    pytest.importorskip("transformers")
    from fused_dora.integrations.transformers import FusedDoraCallback

    yield FusedDoraCallback.__init__


def test_py_typed_ships():
    assert (ROOT / "fused_dora" / "py.typed").is_file()
    assert "py.typed" in (ROOT / "pyproject.toml").read_text()


def test_public_signatures_are_annotated():
    missing = []
    for fn in _public_callables():
        sig = inspect.signature(fn)
        for p in sig.parameters.values():
            if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty:
                missing.append(f"{fn.__qualname__}({p.name})")
        if sig.return_annotation is inspect.Signature.empty:
            missing.append(f"{fn.__qualname__} -> ?")
    assert not missing, missing


def test_mypy_strict_on_a_user_script(monkeypatch):
    api = pytest.importorskip("mypy.api")
    pytest.importorskip("transformers")
    monkeypatch.setenv("MYPYPATH", str(ROOT))  # an editable install's import hook is invisible to mypy
    scripts = ROOT / "tests" / "typing"
    out, err, status = api.run(["--strict", "--follow-imports=silent", "--cache-dir", str(ROOT / ".mypy_cache"),
                                "--no-error-summary", str(scripts / "user_script.py"),
                                str(scripts / "wrong_script.py")])
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and "wrong_script.py:6: error: Incompatible types" in lines[0], out + err
