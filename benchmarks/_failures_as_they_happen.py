"""A pytest plugin for the GPU check's test stages: each failed test is named on the terminal
the moment its report arrives (``[gpu_check] FAILED <node id>: <last line of the error>``).

The stages run under a time limit; pytest names its failures only in the summary at the end,
and a run stopped before it reached the summary failed tests that no one could name (the H200's
run 6: "1 failed" among 335 tests, unnamed). Used as ``-p _failures_as_they_happen`` with
``benchmarks/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

from typing import Any


def pytest_runtest_logreport(report: Any) -> None:
    if not report.failed:
        return
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:  # the exception's own message, e.g. "AssertionError: ..."
        reason = str(crash.message).splitlines()[0] if crash.message else ""
    else:  # a crashed xdist worker, a timeout: the report's last line
        lines = [line for line in str(report.longreprtext).splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else ""
    message = f"[gpu_check] FAILED {report.nodeid} ({report.when}): {reason[:200]}"
    config = _config[0]
    reporter = config.pluginmanager.get_plugin("terminalreporter") if config else None
    if reporter is not None:
        # On a line of its own: -q's progress dots do not end theirs.
        reporter.write("\n" + message + "\n", flush=True)
    else:
        print("\n" + message, flush=True)


# The terminal reporter registers after this plugin's pytest_configure: looked up per report.
_config: list[Any] = [None]


def pytest_configure(config: Any) -> None:
    _config[0] = config
