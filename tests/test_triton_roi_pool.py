"""Triton deformable RoI pooling, forward and backward, checked in Triton's CPU interpreter.

The cases live in tests/triton_cases_roi_pool.py and run in one subprocess with TRITON_INTERPRET=1
(tests/triton_support.py); each case is one test here.
"""
from __future__ import annotations

import pytest
import triton_support

# Triton's interpreter runs every program instance in Python (~30 s for the module): CI runs it, `make test` doesn't
pytestmark = pytest.mark.slow

verdicts, test_case = triton_support.case_tests("triton_cases_roi_pool")
