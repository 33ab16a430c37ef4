"""Test-session set-up shared by every test module.

Under pytest-xdist (``make test`` runs ``-n 2``) each worker computes with one thread: the workers already
share the cores, and two processes of two threads each on a 2-core machine only contend.

Commands that take ``--threads`` (and the demo without it) call ``torch.set_num_threads`` for the whole
process. A test that runs one in-process would leave the worker oversubscribed for every later test of the
worker (OpenMP's spinning threads on a busy core made an unrelated 5 s test take 34 s), so the thread count
is put back after every test.
"""
from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocesses the tests start inherit it
    torch.set_num_threads(1)

_SESSION_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    yield
    if torch.get_num_threads() != _SESSION_THREADS:
        torch.set_num_threads(_SESSION_THREADS)
