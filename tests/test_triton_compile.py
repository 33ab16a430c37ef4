"""The Triton kernels compile for real NVIDIA targets (sm_80, sm_90) without a GPU, within 64 KB of
shared memory: Triton's full compiler down to ptxas, which the interpreter tests never reach.

Slow (about two minutes cold: ~70 compilations), so it runs with ``-m slow`` / ``make test-all``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import triton_support

if triton_support.missing_triton():
    pytest.skip(triton_support.missing_triton(), allow_module_level=True)


@pytest.mark.slow
def test_kernels_compile_for_sm80_and_sm90():
    script = Path(__file__).resolve().parent / "triton_compile_check.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script), "80", "90"], capture_output=True, text=True, timeout=1200,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "failures: 0" in proc.stdout
