"""The C++ kernels compile without the AVX2/FMA flags: the build on an ARM machine, or with DCNV2_PORTABLE=1, takes
the portable loops, and code outside the SIMD branches must not depend on them (a syntax-only compile of each
source, as setup.py compiles it but without -mavx2 -mfma)."""
from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "src" / "dcnv2" / "ops" / "csrc"
SOURCES = sorted(CSRC.glob("*.cpp")) + sorted((CSRC / "cpu").glob("*.cpp"))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ on this machine")
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_compiles_without_simd_flags(source):
    from torch.utils.cpp_extension import include_paths

    cmd = ["g++", "-std=c++20", "-fsyntax-only", "-Wall", "-Werror=unused-variable", "-fopenmp",
           "-DTORCH_EXTENSION_NAME=_C", f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}"]
    cmd += [f"-I{p}" for p in include_paths()] + [str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    ours = [line for line in proc.stderr.splitlines() if str(CSRC) in line and ("error" in line or "warning" in line)]
    assert proc.returncode == 0 and not ours, "\n".join(ours or proc.stderr.splitlines()[-20:])
