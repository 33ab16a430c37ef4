"""Triton deformable convolution (implicit GEMM), forward and backward, checked in Triton's CPU interpreter.

The cases live in tests/triton_cases_deform_conv.py and run in one subprocess with TRITON_INTERPRET=1
(tests/triton_support.py); each case is one test here.
"""
from __future__ import annotations

import triton_support

verdicts, test_case = triton_support.case_tests("triton_cases_deform_conv")
