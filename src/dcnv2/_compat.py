"""Old import paths of modules that moved to another package: ``import dcnv2.engine.demo`` still works.

The experiments moved out of :mod:`dcnv2.engine` into :mod:`dcnv2.experiments` (one floor up); README-era code
imports them from the engine. A meta-path finder maps each old name to its module's new one, imported on
first use, so ``sys.modules["dcnv2.engine.demo"] is dcnv2.experiments.demo`` and the engine itself never
imports the floor above it. ``tests/test_layers.py`` checks the table.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

ALIASES = {f"dcnv2.engine.{name}": f"dcnv2.experiments.{name}"
           for name in ("demo", "compare", "recipes", "pretrain", "ablation")}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)  # keeps its own __name__ and __spec__

    def exec_module(self, module):
        pass  # already executed under its new name


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in ALIASES:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(ALIASES[fullname]))


def install() -> None:
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
