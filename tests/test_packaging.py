"""How the kernels are found: fused_dora.kernels is the top-level kernels/ folder, an ordinary
import installed or not, and a checkout on sys.path never hides another distribution's `kernels`
(Hugging Face's, which transformers and bitsandbytes import)."""
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

from fused_dora.kernels import tuning
from fused_dora.kernels._spills import SPILLS

ROOT = pathlib.Path(__file__).resolve().parents[1]
# a child interpreter that sees this checkout through sys.path only (no editable-install finder)
CHECKOUT_ONLY = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
sys.path[:0] = {paths!r}
"""


def _run(script: str, *paths) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ""}
    code = CHECKOUT_ONLY.format(paths=[str(p) for p in paths]) + script
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=pathlib.Path("/"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_source_checkout_imports_its_kernels():
    out = _run(f"""
import torch, fused_dora
from fused_dora import backend
from fused_dora.kernels.forward import dora_forward
import fused_dora.kernels.forward as forward
assert fused_dora.__file__.startswith({str(ROOT)!r}), fused_dora.__file__
assert forward.__file__ == {str(ROOT / "kernels" / "forward.py")!r}, forward.__file__
assert backend.reference_reason("auto", torch.device("cpu"), torch.float32) is None
print("ok")
""", ROOT)
    assert "ok" in out


def test_checkout_on_sys_path_leaves_another_kernels_package_alone(tmp_path):
    """The checkout's root first on sys.path, Hugging Face's `kernels` (a stand-in) after it:
    `import kernels` is theirs. With only the checkout, `from kernels import get_kernel` raises
    ImportError, as it would with no checkout on the path (bitsandbytes catches exactly that), or
    finds the installed Hugging Face package where there is one."""
    other = tmp_path / "site" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("def get_kernel(name):\n    return name\n")
    out = _run("""
import kernels
from kernels import get_kernel
print(get_kernel("theirs"))
""", ROOT, other.parent)
    assert "theirs" in out
    out = _run("""
try:
    from kernels import get_kernel
    import kernels
    print("installed", kernels.__file__)
except ImportError:
    print("ImportError")
""", ROOT)
    # Hugging Face's own, where this environment has it installed; else nothing to import
    assert "ImportError" in out or ("installed" in out and str(ROOT) not in out), out


def test_every_spill_entry_names_a_tuned_kernel():
    """A renamed kernel would silently lose its spill pruning."""
    assert set(SPILLS) <= set(tuning.tuned_kernels()), set(SPILLS) - set(tuning.tuned_kernels())


def test_wheel_ships_the_kernels(tmp_path):
    pytest.importorskip("setuptools")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                           str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {proc.stderr[-500:]}")
    (wheel,) = tmp_path.glob("fused_dora-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    families = [f"fused_dora/kernels/{name}.py" for name in tuning.FAMILIES + ("tuning", "_launch", "_spills")]
    assert set(families) <= names, set(families) - names
    assert not any(n.startswith("kernels/") for n in names)  # no top-level `kernels` installed
