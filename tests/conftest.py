"""Test-session set-up shared by every test module.

Under pytest-xdist (``make test`` runs ``-n 2``) each worker computes with one thread: the workers already
share the cores, and two processes of two threads each on a 2-core machine only contend.
"""
from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocesses the tests start inherit it
    import torch

    torch.set_num_threads(1)
