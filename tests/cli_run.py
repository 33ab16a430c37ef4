"""``dcnv2 ...`` run in the test's own process, with what a terminal would show: the exit status, stdout and
stderr (warnings included, printed as Python prints them). No interpreter start-up per call (about 3 s); an
exception the CLI does not turn into a message fails the test, as a traceback would fail a user."""
from __future__ import annotations

import contextlib
import io
import sys
import types
import warnings


def run_cli(*args: str) -> types.SimpleNamespace:
    import torch

    from dcnv2.cli import main

    out, err, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()

    def show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("default")  # what a fresh interpreter does: each warning once per place
            warnings.showwarning = show
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse's own errors
                code = exc.code
    finally:
        torch.set_num_threads(threads)
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
