"""``mtunlearn verify``: check a checkpoint against its unlearning record (a record of the
Python API's ``save_unlearned``: its files and hashes only), and the outcome as one JSON object
with ``--json``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from mtunlearn_ext._errors import UserInputError
from mtunlearn_ext.cli._console import _say, _shown, _table


def _cmd_verify(args: argparse.Namespace) -> int:
    from mtunlearn_ext.api import API_RECORD_SCHEMA
    from mtunlearn_ext.records import FORGET_ERASED_CHECK, WEIGHTS_UNCHANGED, verify_record

    if _schema_of(args.record) == API_RECORD_SCHEMA:
        if args.data_root is not None:  # nothing is re-measured, so no data are read
            raise UserInputError("--data-root", "no value for a save_unlearned record (its "
                                 "model and data are the caller's; nothing is re-measured)",
                                 args.data_root, "drop --data-root")
        return _verify_api_record(args)
    result = verify_record(args.record, args.checkpoint, tolerance=args.tolerance,
                           data_root=args.data_root)
    shown = sys.stderr if args.json else sys.stdout
    _say(_table([[check, outcome] for check, outcome in result.checks.items()],
                ["check", "result"]), file=shown)
    for m in result.mismatches:
        _say(f"mismatch: {m}", file=sys.stderr)
    if args.data_root is not None:
        root = Path(args.data_root).expanduser().resolve()
        _say(f"data read from {_shown(root)} (--data-root; it hashes to the data the checkpoint "
             "records)", file=shown)
    if FORGET_ERASED_CHECK in result.checks:
        _say(f"note: before/after forget metrics: {result.checks[FORGET_ERASED_CHECK]}",
             file=shown)
    checked = f"{_shown(result.checkpoint)} against {_shown(args.record)}"
    if result.ok:
        _say(f"verified: {checked}: the checkpoint, the ids "
             "and the re-measured metrics agree with the record (metric tolerance "
             f"{args.tolerance:g}); this checks the files and the record, not how much was "
             "forgotten: the record's before/after metrics show that", file=shown)
    elif result.checks.get("weights") == WEIGHTS_UNCHANGED:
        _say(f"FAILED: {checked}: not verified, its weights "
             "are the input model's, so nothing was unlearned (metric tolerance "
             f"{args.tolerance:g})", file=shown)
    else:
        _say(f"FAILED: {checked} (metric tolerance "
             f"{args.tolerance:g})", file=shown)
    _print_verdict(args, result.ok, result.checkpoint, result.sha256, result.checks,
                   result.mismatches, tolerance=args.tolerance)
    return 0 if result.ok else 1


def _print_verdict(args: argparse.Namespace, ok: bool, checkpoint: str, sha256: str | None,
                   checks: Mapping[str, str], mismatches: Sequence[str],
                   tolerance: float | None) -> None:
    """With ``--json``, the outcome as one JSON object on stdout, the only thing there (the
    table and the lines went to stderr), for a CI step that needs to know which check failed
    and not only that one did (exit 1 either way). Bad input (exit 2) prints none."""
    if not args.json:
        return
    print(json.dumps({"verified": ok, "record": str(Path(args.record).resolve()),
                      "checkpoint": str(Path(checkpoint).resolve()), "sha256": sha256,
                      "checks": dict(checks), "mismatches": list(mismatches),
                      "tolerance": tolerance}, indent=1), flush=True)


def _schema_of(path: str) -> object:
    """The ``schema`` of a JSON record, or None when the file is no JSON object (verify_record
    then says what is wrong with it)."""
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return payload.get("schema") if isinstance(payload, dict) else None


def _verify_api_record(args: argparse.Namespace) -> int:
    """A record of mtunlearn_ext.save_unlearned: its model and data are the caller's, which the
    command cannot rebuild, so the files are checked (hashes) and nothing is re-measured."""
    from mtunlearn_ext.api import verify_saved
    from mtunlearn_ext.records import WEIGHTS_UNCHANGED

    try:
        result = verify_saved(args.record, checkpoint=args.checkpoint)
    except FileNotFoundError as error:
        if args.checkpoint:
            raise UserInputError("--checkpoint", "an existing checkpoint file",
                                 args.checkpoint) from error
        raise UserInputError("--record", "a record whose checkpoint exists", args.record,
                             str(error)) from error
    except ValueError as error:
        raise UserInputError("--record", "a readable save_unlearned record", args.record,
                             str(error)) from error
    rows = [[check, outcome] for check, outcome in result.checks.items()]
    rows.append(["metrics", "not measured (a save_unlearned record: the model and data are "
                            "the caller's; re-measure them with your code)"])
    shown = sys.stderr if args.json else sys.stdout
    _say(_table(rows, ["check", "result"]), file=shown)
    for m in result.mismatches:
        _say(f"mismatch: {m}", file=sys.stderr)
    unchanged = (", not verified, its weights are the original model's, so nothing was "
                 "unlearned" if result.checks.get("weights_changed") == WEIGHTS_UNCHANGED
                 else ", not verified, its parameters are the original model's (only buffers "
                      "changed), so the request's supervision was not removed"
                 if result.checks.get("parameters_changed") == WEIGHTS_UNCHANGED else "")
    _say(f"{'verified' if result.ok else 'FAILED'}: {_shown(result.checkpoint)} against "
         f"{_shown(args.record)} (files and hashes only){unchanged}", file=shown)
    # No tolerance (nothing was measured) and no hash of the checkpoint's bytes (the checks
    # name the file's outcome).
    _print_verdict(args, result.ok, result.checkpoint, None, result.checks,
                   result.mismatches, tolerance=None)
    return 0 if result.ok else 1
