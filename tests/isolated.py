"""Crash-prone snippets run in a child process, several to a child: a segfault or abort fails only the snippet
that was running, and the snippets after it go on in a fresh child. One child per test file instead of one per
snippet saves the ~3 s that every child spends importing torch and dcnv2."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import Dict, Mapping, Optional

# reads [(name, code), ...] on stdin; for each snippet prints {"start": name}, runs it with its stdout captured,
# then prints {"done": name, "stdout": ..., "error": traceback or None}
_CHILD = r"""
import contextlib, io, json, sys, traceback
for name, code in json.loads(sys.stdin.read()):
    print(json.dumps({"start": name}), flush=True)
    out = io.StringIO()
    error = None
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, name, "exec"), {"__name__": "__isolated__"})
    except BaseException:
        error = traceback.format_exc()
    print(json.dumps({"done": name, "stdout": out.getvalue(), "error": error}), flush=True)
"""


@dataclass
class Outcome:
    stdout: str
    error: Optional[str]  # the snippet's traceback, or how its process died; None when it ran to the end

    @property
    def ok(self) -> bool:
        return self.error is None


def run_isolated_cases(cases: Mapping[str, str], *, prelude: str = "", timeout: float = 240) -> Dict[str, Outcome]:
    """Runs each snippet (dedented, after ``prelude``) in a child Python process; returns ``{name: Outcome}``."""
    pending = [(name, prelude + textwrap.dedent(code)) for name, code in cases.items()]
    results: Dict[str, Outcome] = {}
    while pending:
        proc = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(pending), capture_output=True,
                              text=True, timeout=timeout)
        running = None
        for line in proc.stdout.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "start" in record:
                running = record["start"]
            elif "done" in record:
                results[record["done"]] = Outcome(record["stdout"], record["error"])
                running = None
        died = f"the process died (exit code {proc.returncode}):\n{proc.stderr[-3000:]}"
        if running is None:  # it died outside every snippet (or finished): nothing left to learn by retrying
            for name, _ in pending:
                results.setdefault(name, Outcome("", died))
            break
        results[running] = Outcome("", died)
        pending = [(name, code) for name, code in pending if name not in results]
    return results


def results_under_env(test_file: str, function: str, env: Mapping[str, str]):
    """``function()`` of the test module ``test_file`` (its ``__file__``), called in a child process whose environment
    adds ``env`` (switches the extension reads once per process), its return value passed back through torch.save."""
    import os
    import tempfile

    import torch

    folder, module = os.path.split(os.path.abspath(test_file))
    script = (f"import sys, torch; sys.path.insert(0, sys.argv[2]); import {module[:-3]} as t; "
              f"torch.save(t.{function}(), sys.argv[1])")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "results.pt")
        proc = subprocess.run([sys.executable, "-c", script, path, folder], env={**os.environ, **env},
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return torch.load(path)
