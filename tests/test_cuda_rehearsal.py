"""The CUDA tests (tests/test_cuda.py, skipped without a GPU) rehearsed on the CPU kernels, so that a lent GPU's
minutes are not spent finding mistakes in the tests themselves."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a pytest run of tests/test_cuda.py in a subprocess (~10 s)
def test_cuda_tests_pass_when_rehearsed_on_the_cpu():
    env = dict(os.environ, DCNV2_CUDA_TESTS_ON_CPU="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "6 passed" in proc.stdout, proc.stdout[-2000:]
