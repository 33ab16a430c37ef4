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
