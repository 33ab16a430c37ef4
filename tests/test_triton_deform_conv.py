"""Triton deformable convolution (implicit GEMM), forward and backward, checked in Triton's CPU interpreter.

The cases live in tests/triton_cases_deform_conv.py and run in one subprocess with TRITON_INTERPRET=1
(tests/triton_support.py); each case is one test here.
"""
from __future__ import annotations

import pytest

import triton_support

MODULE = "triton_cases_deform_conv"

if triton_support.missing_triton():
    pytest.skip(triton_support.missing_triton(), allow_module_level=True)


@pytest.fixture(scope="module")
def verdicts():
    return triton_support.run_cases(MODULE)


@pytest.mark.parametrize("case", triton_support.case_names(MODULE))
def test_case(verdicts, case):
    assert case in verdicts, f"{case} did not run"
    if verdicts[case] is not None:
        pytest.fail(verdicts[case], pytrace=False)
