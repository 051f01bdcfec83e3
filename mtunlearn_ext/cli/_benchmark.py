"""``mtunlearn benchmark``: run ``benchmarks/compare.py --quick`` of a source checkout, else
the showcase (``python -m mtunlearn_ext.showcase``), in a process of its own."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from mtunlearn_ext.cli._console import _say


def _cmd_benchmark(args: argparse.Namespace) -> int:
    # The folder holding the package (mtunlearn_ext/cli/_benchmark.py: three levels up).
    root = Path(__file__).resolve().parents[2]
    compare = root / "benchmarks" / "compare.py"
    # An installed package's parent is site-packages, where another distribution may have put
    # a top-level benchmarks/ of its own: only a folder with our setup.py is our checkout.
    checkout = (root / "setup.py").is_file() and compare.is_file()
    if checkout and not args.showcase:
        # --quiet hid nothing: compare.py drew its bar over the cases all the same. The
        # showcase draws none, so it needs no flag.
        quiet = ["--no-progress"] if args.quiet else []
        command = [sys.executable, str(compare), "--quick", *quiet, *args.extra]
    else:
        command = [sys.executable, "-m", "mtunlearn_ext.showcase", *args.extra]
    # --threads set this process's count only, so the benchmark ran at torch's default (every
    # core) while the command line said otherwise. The child reads OMP_NUM_THREADS as its
    # intra-op default (the showcase has no flag of its own); the extra arguments, given
    # after it, still win (compare.py's `--threads`).
    threads = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    shown = " ".join([*(f"{name}={value}" for name, value in threads.items()), *command])
    if args.dry_run:
        _say("would run: " + shown, flush=True)
        return 0
    _say("running: " + shown, flush=True)
    # compare.py runs from the checkout; the showcase where the user is (not site-packages).
    return subprocess.run(command, cwd=root if checkout else None, check=False,
                          env={**os.environ, **threads}).returncode
