"""Runs the Triton kernel test cases in Triton's CPU interpreter, in a subprocess.

``TRITON_INTERPRET=1`` must be set before the kernels are decorated (imported), and it would change
every other Triton user in the process, so the cases (``tests/triton_cases_*.py``, plain
``case_*`` functions that raise on failure) run in one subprocess per test module
(``python tests/triton_support.py <cases module>``) and report a JSON verdict per case. The
pytest modules (``tests/test_triton_*.py``) turn each verdict into one test.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
MARKER = "@@TRITON-CASES@@"


def missing_triton() -> str | None:
    """A reason to skip, or None when Triton is importable (checked without importing it here)."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed: the Triton kernel tests need it (its CPU interpreter runs them)"
    return None


def case_names(module: str) -> list:
    """The ``case_*`` functions of ``tests/<module>.py``, read without importing it."""
    tree = ast.parse((HERE / f"{module}.py").read_text())
    return [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("case_")]


def run_cases(module: str, timeout: float = 600) -> dict:
    """Runs every case of ``module`` in a fresh interpreter-mode process: {name: None | error text}."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    env.pop("DCNV2_CUDA_BACKEND", None)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), module], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(HERE.parent))
    for line in proc.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    raise RuntimeError(f"the case runner for {module} exited with {proc.returncode} without a verdict:\n"
                       f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def case_tests(module: str):
    """The fixture and the test of a ``tests/test_triton_*.py`` module over the cases of ``tests/<module>.py``:
    ``verdicts, test_case = triton_support.case_tests(MODULE)`` at module level, which skips the whole module
    when Triton is missing. All cases run in one subprocess (the module-scoped ``verdicts``); each case is one
    test, failing with the case's error."""
    import pytest

    if missing_triton():
        pytest.skip(missing_triton(), allow_module_level=True)

    @pytest.fixture(scope="module")
    def verdicts():
        return run_cases(module)

    @pytest.mark.parametrize("case", case_names(module))
    def test_case(verdicts, case):
        assert case in verdicts, f"{case} did not run"
        if verdicts[case] is not None:
            pytest.fail(verdicts[case], pytrace=False)

    return verdicts, test_case


def _main(module: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through run_cases (TRITON_INTERPRET=1)"
    sys.path.insert(0, str(HERE))
    mod = __import__(module)
    verdicts = {}
    for name in case_names(module):
        t0 = time.perf_counter()
        try:
            getattr(mod, name)()
            verdicts[name] = None
        except BaseException:  # noqa: BLE001  (reported to the parent, which fails the test)
            verdicts[name] = traceback.format_exc()
        print(f"{name}: {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    print(MARKER + json.dumps(verdicts), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1])
