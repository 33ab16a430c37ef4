"""The package layering: data flows one way, and nothing below imports from above.

Every module of ``dcnv2`` is imported (so none is broken or left behind by a move) and parsed; each import
statement anywhere in it, function bodies included (the lazy imports), must name a package on its own floor
or a lower one. Packages that share a floor are peers and import neither each other.
"""
from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import dcnv2

# The layer order, lowest floor first: written here once.
LAYERS = [
    {"ops"},  # with the C++ extension dcnv2._C, the ops' kernels
    {"nn"},
    {"models", "data"},
    {"engine"},
    {"analysis", "export"},
    {"zoo", "experiments"},
    {"commands"},
    {"cli"},
]
FLOOR = {package: level for level, floor in enumerate(LAYERS) for package in floor}
# The root package (dcnv2/__init__.py: re-exports ops and nn) and the old-path table sit outside the floors.
ROOT_MODULES = {"dcnv2", "dcnv2._compat"}
SRC = Path(dcnv2.__file__).parent

OPTIONAL = {"triton"}  # modules whose import needs an optional dependency that may be absent


def all_modules():
    names = ["dcnv2"]
    for info in pkgutil.walk_packages([str(SRC)], prefix="dcnv2."):
        names.append(info.name)
    return sorted(names)


def package_of(module: str) -> str:
    parts = module.split(".")
    package = parts[1] if len(parts) > 1 else ""
    return "ops" if package == "_C" else package


def source_path(module: str) -> Path:
    rel = Path(*module.split(".")[1:])
    path = SRC / rel / "__init__.py"
    return path if path.exists() else (SRC / rel).with_suffix(".py")


def imported_modules(module: str):
    """(line, name) of each dcnv2 module that ``module``'s source imports, at module level or in a function."""
    path = source_path(module)
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "dcnv2":  # from dcnv2 import data, models: each name is a module of its own
                for alias in node.names:
                    yield node.lineno, f"dcnv2.{alias.name}"
            else:
                yield node.lineno, target


def test_the_layer_table_names_every_package_once():
    packages = {package_of(m) for m in all_modules() if m not in ROOT_MODULES}
    listed = [p for floor in LAYERS for p in floor]
    assert len(listed) == len(set(listed))
    assert packages == set(listed), "add the new package to LAYERS (or remove the old one)"


@pytest.mark.parametrize("module", [m for m in all_modules() if m != "dcnv2._C"])
def test_every_module_imports(module):
    try:
        importlib.import_module(module)
    except ImportError as e:
        if e.name and e.name.split(".")[0] in OPTIONAL:
            pytest.skip(f"{module} needs {e.name}")
        raise


def test_no_module_imports_from_a_higher_or_peer_package():
    upward = []
    for module in all_modules():
        if module in ROOT_MODULES or module == "dcnv2._C":
            continue
        own = package_of(module)
        for line, target in imported_modules(module):
            if not target.startswith("dcnv2"):
                continue
            other = package_of(target)
            if target in ROOT_MODULES or other == own:
                continue
            if FLOOR[other] >= FLOOR[own]:
                upward.append(f"{source_path(module).relative_to(SRC.parent)}:{line}: {own} imports {target} "
                              f"({other} is {'a peer' if FLOOR[other] == FLOOR[own] else 'above'})")
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_old_module_paths_alias_the_moved_modules():
    """The modules that moved up a floor still import from their old paths, as the same module objects,
    and the old path names a lower floor than the new one (the alias table is the only way down-to-up)."""
    from dcnv2 import _compat

    for old, new in _compat.ALIASES.items():
        assert FLOOR[package_of(old)] < FLOOR[package_of(new)]
        assert importlib.import_module(old) is importlib.import_module(new)
        assert sys.modules[old].__name__ == new
    from dcnv2.engine.demo import DEMO_DATA  # the old spelling the docs once used
    from dcnv2.experiments.demo import DEMO_DATA as moved

    assert DEMO_DATA is moved
    from dcnv2.engine import ModelSpec, build_model  # ModelSpec lives with the models, still importable here
    from dcnv2.models import ModelSpec as spec_class, build_model as builder

    assert (ModelSpec, build_model) == (spec_class, builder)


def test_the_layers_import_without_the_compiler_stack():
    """``import dcnv2.nn`` (the layers a user drops into a model) does not import ``torch._dynamo``: that costs
    about 2 s on a 2-core machine at every process start, and nothing at import time needs it."""
    code = "import sys, dcnv2, dcnv2.nn; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_backend_choice_carries_dynamos_constant_mark():
    """The CUDA backend choice is marked exactly as ``torch._dynamo.assume_constant_result`` marks a function
    (so torch.compile traces it as a constant); a torch that changes its mark fails here."""
    import torch._dynamo

    from dcnv2.ops import triton as triton_ops

    probe = torch._dynamo.assume_constant_result(lambda: 0)
    assert getattr(probe, triton_ops.CONSTANT_MARK) is True
    assert getattr(triton_ops.resolve_cuda_backend, triton_ops.CONSTANT_MARK) is True

    @triton_ops._constant
    def later():  # with torch._dynamo imported, the choice goes through the public decorator
        return 1

    assert getattr(later, triton_ops.CONSTANT_MARK) is True
