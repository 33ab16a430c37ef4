"""CUDA backend selection and Triton kernel registration, checked without a GPU (device check mocked).

The cases live in tests/triton_cases_dispatch.py and run in one subprocess with TRITON_INTERPRET=1
(tests/triton_support.py); each case is one test here.
"""
from __future__ import annotations

import triton_support

verdicts, test_case = triton_support.case_tests("triton_cases_dispatch")


def test_without_triton_cuda_falls_back_with_a_message_and_these_tests_skip(monkeypatch):
    """Hides Triton from a fresh process: the library says why and falls back; the skip reason is clear."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["triton"] = None  # as if it were not installed
        warnings.simplefilter("always")
        import torch, importlib
        from dcnv2.ops import triton as tri
        conv = importlib.import_module("dcnv2.ops.deform_conv")
        conv._device_type = lambda t: "cuda"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            print("backend", conv.backend_for(torch.zeros(1)))
        print("reason", tri.unavailable_reason())
        print("warning", " ".join(str(w.message) for w in caught))
        try:
            tri.register()
        except RuntimeError as exc:
            print("register", exc)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "backend torchvision" in out, out
    assert "reason the `triton` package is not installed" in out, out
    assert "Triton CUDA kernels are unavailable" in out and "falls back" in out, out
    assert "register dcnv2: cannot register the Triton kernels" in out, out

    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert "Triton is not installed" in triton_support.missing_triton()
