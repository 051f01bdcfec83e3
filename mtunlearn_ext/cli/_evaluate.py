"""``mtunlearn evaluate``: a checkpoint's metrics as JSON, per task on train and test, or with
a request on its forget / retain / test splits and the membership attack's AUC."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mtunlearn_ext._errors import UserInputError
from mtunlearn_ext._io import json_safe, write_json_new
from mtunlearn_ext.cli._checks import _check_seed, _forget_fraction
from mtunlearn_ext.cli._console import _attack_notes, _metric_rows, _retain_note, _say, _table
from mtunlearn_ext.cli._outputs import _request_fields


def _refuse_request_options(args: argparse.Namespace, task_names: Sequence[str]) -> None:
    """``evaluate`` without a request (no ``--forget-ids`` / ``--forget-fraction``) measures
    every task on train and test: ``--target-tasks``, ``--request``, ``--retain-ids`` and
    ``--seed`` (which seeds the forget draw and the attack) would be silently ignored, so they
    are refused (an
    unknown task name first, as with a request)."""
    from mtunlearn_ext.workflow import parse_tasks

    unknown = [t for t in parse_tasks(args.target_tasks) or [] if t not in task_names]
    if unknown:
        raise UserInputError("--target-tasks", f"task names among {list(task_names)}", unknown,
                             "unknown task names")
    given = [(flag, value) for flag, value in (("--target-tasks", args.target_tasks),
                                               ("--request", args.request),
                                               ("--retain-ids", args.retain_ids),
                                               ("--seed", args.seed)) if value is not None]
    if given:
        if given[0][0] == "--retain-ids" and isinstance(given[0][1], str):
            # Ids as written: a config's id list got a trailing comma (_config_path).
            given[0] = (given[0][0], given[0][1].rstrip().rstrip(","))
        names = [flag for flag, _ in given]
        flags = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        raise UserInputError(given[0][0], "--forget-ids or --forget-fraction with it",
                             given[0][1], f"without a request, {flags} "
                             f"{'has' if len(given) == 1 else 'have'} no effect (evaluate then "
                             "measures every task on train and test)")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from mtunlearn_ext.erasure import refuse_erased_ids
    from mtunlearn_ext.workflow import (
        OutputTransaction,
        build_user_request,
        exclude_removed,
        lineage_removals,
        load_model,
        measure,
        parse_ids,
        parse_tasks,
        restrict_retain,
    )

    _check_seed(args.seed)
    loaded = load_model(args.checkpoint, data_root=args.data_root)
    bench = loaded.benchmark
    seed = int(args.seed if args.seed is not None else loaded.meta["seed"])
    with OutputTransaction(inputs=[Path(args.checkpoint)]) as tx:
        output = tx.reserve("--output", args.output) if args.output else None
        forget_ids = parse_ids(args.forget_ids, "--forget-ids")
        _forget_fraction(args.forget_fraction, forget_ids, default=None)
        if forget_ids is None and args.forget_fraction is None:
            _refuse_request_options(args, bench.train.task_names)
            from mtunlearn_ext.metrics import evaluate

            result: dict[str, Any] = {"metrics": {
                "train": evaluate(loaded.model, bench.train, None, args.eval_batch_size),
                "test": evaluate(loaded.model, bench.test, None, args.eval_batch_size)}}
        else:
            refuse_erased_ids(bench, forget_ids, parse_tasks(args.target_tasks))
            retain_ids = parse_ids(args.retain_ids, "--retain-ids")
            refuse_erased_ids(bench, retain_ids, None, "--retain-ids")
            request, request_type = build_user_request(
                bench.train, forget_ids=forget_ids, forget_fraction=args.forget_fraction,
                target_tasks=parse_tasks(args.target_tasks), request_type=args.request,
                seed=seed)
            forget, retain = request.split(bench.train)
            # As `unlearn` measured: limited to --retain-ids when given, and without the pairs
            # the checkpoint's lineage removed (the record's before/after of a chained request
            # are measured so).
            retain = restrict_retain(retain, request, retain_ids, bench.train)
            earlier = lineage_removals(loaded.meta)
            retain, excluded = exclude_removed(retain, earlier or [])
            result = measure(loaded.model, forget, retain, bench.test,
                             request.resolved_tasks(bench.train), seed, args.eval_batch_size)
            result["retain_split"] = {
                "pairs": int(retain.supervision.sum()), "instances": len(retain),
                "retain_ids": None if retain_ids is None else sorted(retain_ids),
                "earlier_removals_excluded": (excluded if earlier is not None else
                                              "unknown (the checkpoint keeps only their hash)")}
            # What was measured: the attack's AUC depends on the request and the seed.
            result["request"] = _request_fields(request, request_type,
                                                request.resolved_tasks(bench.train), forget_ids,
                                                args.forget_fraction, seed)
        from mtunlearn_ext.records import run_environment

        payload = {"checkpoint": str(Path(args.checkpoint).resolve()),
                   "sha256": loaded.checkpoint.sha256,
                   # Real data: which root was measured (--data-root when they moved).
                   **({"data_root": loaded.data_root} if loaded.data_root is not None else {}),
                   **json_safe(result), "seed": seed, "eval_batch_size": args.eval_batch_size,
                   "environment": run_environment(torch.get_num_threads())}
        if output is not None:
            tx.write(output, lambda p: write_json_new(p, payload))
    # One measurement, so no "before" column (_metric_rows' fourth cell is always empty here).
    table = _table([[split, task, metric, value]
                    for split, task, metric, _, value in _metric_rows(None, payload)],
                   ["split", "task", "metric", "value"])
    for note in _attack_notes(payload):
        table += "\n" + note
    if "retain_split" in payload:
        table += "\n" + _retain_note(payload["retain_split"])
    if output is None:
        # The JSON is the output: stdout holds it alone, so that it can be piped into a JSON
        # reader; the summary table still ends the command, on stderr.
        _say(table, file=sys.stderr)
        print(json.dumps(payload, indent=1))
    else:
        _say(table)
    return 0
