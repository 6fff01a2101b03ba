"""Imports run one way: kernels <- drivers <- autograd <- functional <- module <- integrations.

Every import counts, module-level or inside a function (a lazy import is still a dependency).
"""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fused_dora"

# each module may import only modules of a lower layer (or of its own layer, for the leaves)
LAYERS = [
    {"reference", "backend", "routes"},
    {"validation", "drivers", "quantized"},
    {"autograd"},
    {"functional", "qdora"},
    {"norm_cache"},
    {"module", "integrations.peft_bnb"},
    {"qmodule"},
    {"replace", "integrations", "integrations.peft"},
    {"integrations.transformers"},
    {"fused_dora"},  # the package's __init__
]


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "fused_dora"


def _imports(path: pathlib.Path) -> set:
    """The fused_dora modules that the module at ``path`` imports (relative or absolute)."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" and name != "fused_dora" else name.split(".")[:-1]
    if name == "fused_dora":
        package = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "fused_dora":
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:
                candidate = ".".join(target + [alias.name])
                found.add(candidate if (PACKAGE / (candidate.replace(".", "/") + ".py")).exists()
                          else ".".join(target) or "fused_dora")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "fused_dora":
                    found.add(".".join(alias.name.split(".")[1:]) or "fused_dora")
    return found - {name}


def _layer(name: str) -> int:
    if name == "kernels" or name.startswith("kernels."):
        return -1
    for i, layer in enumerate(LAYERS):
        if name in layer:
            return i
    raise AssertionError(f"fused_dora.{name} is in no layer of tests/test_layering.py: place it")


def test_imports_point_down_the_layers():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        for dep in _imports(path):
            if dep != "fused_dora" and _layer(dep) >= _layer(name) and not (_layer(dep) == _layer(name) == 0):
                wrong.append(f"{name} imports {dep}")
            if dep == "fused_dora" and name != "fused_dora":
                wrong.append(f"{name} imports the package itself")
    assert not wrong, wrong


def test_kernels_import_nothing_of_the_package():
    for path in sorted((ROOT / "kernels").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and not node.level:
                assert not (node.module or "").startswith("fused_dora"), path
            if isinstance(node, ast.ImportFrom) and node.level > 1:
                raise AssertionError(f"{path.name} reaches outside the kernels package")
