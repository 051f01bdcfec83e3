"""``mtunlearn report``: a Markdown report with plots from an experiment's results file or an
unlearning record."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mtunlearn_ext._errors import UserInputError
from mtunlearn_ext._text import without_digit_limit_advice
from mtunlearn_ext.cli._console import _say, _table


def _cmd_report(args: argparse.Namespace) -> int:
    from mtunlearn_ext.report import write_report

    source = Path(args.results)
    try:
        results = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserInputError("--results", "a readable JSON results file or record", str(source),
                             str(error)) from error
    except ValueError as error:  # an integer past Python's 4300 digits (not a JSONDecodeError)
        raise UserInputError("--results", "a readable JSON results file or record", str(source),
                             without_digit_limit_advice(error)) from None
    except RecursionError:
        raise UserInputError("--results", "a readable JSON results file or record", str(source),
                             "nested too deeply to read") from None
    # write_report registers its files as written in full (COMMITTED_OUTPUTS) as report.md
    # lands: an interrupt from then on finds them complete.
    written = write_report(results, Path(args.output_dir), title=args.title or source.name)
    _say(_table([[str(p), p.stat().st_size] for p in written], ["file", "bytes"]))
    return 0
