"""scripts/gpu_check.sh --dry-run: the GPU machine's one prepared check, rehearsed on the CPU at tiny sizes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# the whole GPU check rehearsed on the CPU: a pytest run, the benchmark smoke test and four training /
# torch.compile checks, each in its own process
@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step_and_writes_its_report(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    for step in ("CUDA tests", "cuda_ops.py --smoke", "AMP training, torch.compile"):
        assert step in summary, summary
    assert "FAILED" not in summary and "TIMED OUT" not in summary
    rows = json.loads((tmp_path / "models.json").read_text())["rows"]
    assert [r["check"] for r in rows] == ["train mdconv-c3c5-mdpool (AMP)", "train dcnv2 mimicking (AMP)",
                                          "torch.compile DCNv2 layer", "CUDA vs CPU random layers"]
    assert all(r["ok"] for r in rows), rows
    assert "== benchmarks/cuda_ops.py --smoke" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_check_reports_a_failing_step_and_exits_nonzero(tmp_path):
    # a python that fails every step: the script must still finish, name the failures and exit 1
    fake = tmp_path / "python"
    fake.write_text("#!/usr/bin/env bash\necho broken >&2\nexit 3\n")
    fake.chmod(0o755)
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=str(fake))
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    assert (tmp_path / "out" / "summary.md").read_text().count("FAILED (exit 3)") == 4
