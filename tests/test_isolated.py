"""The crash-isolating runner the hostile-input tests rely on: a snippet that kills its process fails alone."""
from isolated import run_isolated_cases


def test_a_crash_fails_only_its_snippet_and_the_rest_still_run():
    outcomes = run_isolated_cases({
        "fine": "print('ok')",
        "raises": "raise ValueError('named problem')",
        "aborts": "import os\nos.abort()",
        "after the crash": "import sys\nprint('still', 'runs')",
    })
    assert outcomes["fine"].ok and outcomes["fine"].stdout == "ok\n"
    assert not outcomes["raises"].ok and "ValueError: named problem" in outcomes["raises"].error
    assert not outcomes["aborts"].ok and "the process died" in outcomes["aborts"].error
    assert outcomes["after the crash"].ok and outcomes["after the crash"].stdout == "still runs\n"


def test_a_prelude_runs_before_every_snippet():
    outcomes = run_isolated_cases({"a": "print(X)", "b": "print(X + 1)"}, prelude="X = 41\n")
    assert [outcomes[k].stdout for k in "ab"] == ["41\n", "42\n"]
