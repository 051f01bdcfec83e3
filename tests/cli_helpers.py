"""Helpers shared by the ``mtunlearn`` CLI test modules, beside those ``test_cli`` provides
(``FAST``, ``ids``, the ``trained`` fixture, ``_unlearn``, ``_listing``): the checkout's root, the
one-line error check, and a one-epoch ``train`` of digits/tiny."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtunlearn_ext import cli

ROOT = Path(__file__).resolve().parents[1]


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    """stderr of the last command: one line, no traceback."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _train(output: Path, *extra: str) -> int:
    return cli.main(["train", "--benchmark", "digits", "--size", "tiny", "--epochs", "1",
                     "--output", str(output), "--quiet", "--threads", "1", *extra])
