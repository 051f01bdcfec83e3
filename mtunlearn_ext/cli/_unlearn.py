"""``mtunlearn unlearn``: forget a request from a checkpoint with a method and write a new
checkpoint and its unlearning record (the request, the method's settings as resolved, the
metrics before and after, the interference matrix, the lineage of removals)."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mtunlearn_ext._errors import UserInputError
from mtunlearn_ext._io import json_safe
from mtunlearn_ext._text import visible_controls
from mtunlearn_ext._warnings import MtUnlearnWarning
from mtunlearn_ext.unlearning.base import resolved_settings
from mtunlearn_ext.cli._checks import _check_seed, _forget_fraction, _json_arg
from mtunlearn_ext.cli._console import (_attack_notes, _metric_rows, _retain_note, _say, _shown,
                                        _table)
from mtunlearn_ext.cli._outputs import (_default_outputs, _later_in_chain, _request_fields,
                                        _write_at_free_name)


def _interference(problem: Any, method: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The input model's task-gradient cosines before and after the interference-aware
    projections, JSON-safe (:func:`mtunlearn_ext.report.interference_to_json`).

    Projected with the run's settings when the method is ``interference_aware`` (what it
    actually removed), with that method's defaults otherwise, so that the record of any method
    shows how much the request's forget and retain gradients conflict on the input model.
    """
    from mtunlearn_ext.report import interference_to_json
    from mtunlearn_ext.unlearning import get_unlearner
    from mtunlearn_ext.unlearning.interference import interference_matrix

    own = method == "interference_aware"
    config = get_unlearner("interference_aware", dict(settings) if own else {}).config
    try:
        # Its setup would repeat the run's own warnings (the same problem and settings), or,
        # after another method, warn of settings no method of this run used.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MtUnlearnWarning)
            matrix = interference_matrix(problem, config)  # type: ignore[arg-type]
    except (RuntimeError, ValueError) as error:
        # A diagnostic: the unlearned model is already computed and must not be lost for it.
        _say(f"mtunlearn: warning: no interference matrix: {error}", file=sys.stderr)
        return {"error": str(error)}
    return {**interference_to_json(matrix, config),
            "settings_from": "the method's settings" if own else "interference_aware defaults"}


#: The settings a record keeps (the API's records the same: unlearning.base).
_resolved_settings = resolved_settings


def _checkpoint_recipe(loaded: Any, checkpoint: str) -> Any:
    """The training recipe a checkpoint recorded (retraining's), checked before any work: a
    recipe that is no mapping, or holds a field TrainConfig lacks, ended the run after the
    input model was measured, in a TypeError or ValueError traceback."""
    from mtunlearn_ext.experiment import default_recipe

    stored = loaded.meta.get("recipe") or {}
    try:
        if not isinstance(stored, Mapping):
            raise TypeError(f"it is a {type(stored).__name__}, not a mapping")
        return default_recipe(loaded.benchmark, int(loaded.meta["seed"]),
                              {k: v for k, v in stored.items() if k != "seed"})
    except (TypeError, ValueError) as error:
        raise UserInputError("--checkpoint", "a checkpoint whose recorded training recipe is "
                             "TrainConfig's fields", checkpoint, str(error)) from error


def _cmd_unlearn(args: argparse.Namespace) -> int:
    from mtunlearn_ext._io import interrupts_held
    from mtunlearn_ext.erasure import erased_instances, refuse_erased_ids
    from mtunlearn_ext.metrics import check_retained
    from mtunlearn_ext.models import build_model
    from mtunlearn_ext.records import (
        RECORD_SCHEMA,
        code_version,
        run_environment,
        utc_now,
        write_record,
    )
    from mtunlearn_ext.training import save_checkpoint, state_dict_sha256
    from mtunlearn_ext.unlearning import UnlearningProblem, available_unlearners
    from mtunlearn_ext.lineage import REMOVALS_KEY, removal_counts, unknown_removals_hint
    from mtunlearn_ext.workflow import (
        CLI_META_FORMAT,
        UNKNOWN_METHOD_HINT,
        KeptMetricsError,
        OutputTransaction,
        TEST_FILES_KEY,
        TRAIN_FILES_KEY,
        build_user_request,
        check_device,
        check_forget_left,
        checked_unlearner,
        exclude_removed,
        lineage_removals,
        load_model,
        measure,
        parse_ids,
        parse_tasks,
        removal_entry,
        restrict_retain,
        run_unlearning,
        without_removed,
    )

    started = utc_now()
    code = code_version()  # the code this run imported and runs: read before the work
    device = check_device(args.device)
    _check_seed(args.seed)
    if args.method not in available_unlearners():  # before it names the output files
        raise UserInputError("--method", f"one of {available_unlearners()}", args.method,
                             UNKNOWN_METHOD_HINT)
    checkpoint = Path(args.checkpoint)
    settings = _json_arg(args.method_config, "--method-config")
    # Their types and ranges, before the model is loaded and measured (minutes on a large one);
    # what the settings need of the request is checked once it is built.
    checked_unlearner(args.method, settings)
    forget_ids = parse_ids(args.forget_ids, "--forget-ids")
    retain_ids = parse_ids(args.retain_ids, "--retain-ids")
    target_tasks = parse_tasks(args.target_tasks)
    fraction = _forget_fraction(args.forget_fraction, forget_ids, default=0.1)
    with OutputTransaction(inputs=[checkpoint]) as tx:
        default_ckpt, default_rec = _default_outputs(checkpoint, args.method)
        out_ckpt = tx.reserve("--output", args.output or default_ckpt)
        # Without --record, the record is named after --output when that is given: a file
        # already there (an earlier run's) is then refused as --output's, not as a --record.
        out_rec = tx.reserve("--record", args.record or (
            default_rec if args.output is None else Path(str(out_ckpt) + ".record.json")),
            default_of="--output" if args.record is None and args.output else None)
        loaded = load_model(checkpoint, data_root=args.data_root)
        # What earlier requests of this checkpoint's lineage removed stays removed: out of the
        # retain set (and so out of retraining). Unknown removals (an older unlearned
        # checkpoint keeps only their hash) are refused unless --retain-ids names the retain
        # set itself.
        earlier = lineage_removals(loaded.meta)
        if earlier is None:
            if retain_ids is None:
                raise UserInputError("--checkpoint", "a checkpoint whose earlier removals are "
                                     "known (an original, or one unlearned by this version)",
                                     str(checkpoint), unknown_removals_hint(loaded.meta))
            _say(f"mtunlearn: warning: {checkpoint} is an unlearned checkpoint whose earlier "
                 "removals are not known (only their hash is kept): the retain set is "
                 "--retain-ids as given, which must leave the ids forgotten before out",
                 file=sys.stderr)
        bench, seed = loaded.benchmark, int(args.seed if args.seed is not None
                                            else loaded.meta["seed"])
        train_set = bench.train
        refuse_erased_ids(bench, forget_ids, target_tasks)
        refuse_erased_ids(bench, retain_ids, None, "--retain-ids")
        # The pairs the lineage removed are not forgotten again (nor drawn by
        # --forget-fraction): only what is left of the request is.
        remaining = without_removed(train_set, earlier or [])
        request, request_type = build_user_request(
            remaining, forget_ids=forget_ids, forget_fraction=fraction,
            target_tasks=target_tasks, request_type=args.request, seed=seed)
        if forget_ids is None:  # a data-removal tool must not choose what to remove silently
            assert fraction is not None  # the default where no ids are named
            _say(f"mtunlearn: no --forget-ids: forgetting a random "
                 f"{100 * float(fraction):g}% of the training instances "
                 f"(--forget-fraction {fraction:g}, seed {seed}): "
                 f"{len(request.instance_ids)} instances", file=sys.stderr)
        already = check_forget_left(train_set, remaining, request, "--forget-ids"
                                    if forget_ids is not None else "--forget-fraction")
        forget, _ = request.split(remaining)
        if already:
            _say(f"mtunlearn: earlier requests of the checkpoint's lineage already removed "
                 f"pairs of {len(already)} of the ids named ({_ids_text(already)}): only the "
                 f"other {int(forget.supervision.sum())} pairs are forgotten", file=sys.stderr)
        # The retain split as before; exclude_removed takes the earlier removals out of it.
        _, retain = request.split(train_set)
        retain = restrict_retain(retain, request, retain_ids, train_set)
        retain, excluded = exclude_removed(retain, earlier or [], retain_ids)
        if earlier:
            entirely, partly = removal_counts(train_set, earlier)
            partly_text = (f" and the target-task labels of {partly} other(s)" if partly
                           else "")
            _say(f"mtunlearn: {len(earlier)} earlier request(s) of the checkpoint's lineage "
                 f"removed {entirely} instance(s) entirely{partly_text}: those pairs stay "
                 f"removed ({excluded} kept out of the retain set)", file=sys.stderr)
        targets = request.resolved_tasks(train_set)
        recipe = _checkpoint_recipe(loaded, args.checkpoint)
        if later := _later_in_chain(checkpoint, args.method):  # said once the inputs passed
            _say(f"mtunlearn: warning: {_shown(later[0])} exists: a request on "
                 f"{_shown(checkpoint)} was made before (a rerun, or a chain of requests from "
                 f"it, whose newest is {_shown(later[1])}); this one starts from "
                 f"{_shown(checkpoint)}, so what later requests "
                 "removed is in its retain set again; to continue the chain, unlearn from its "
                 "newest checkpoint", file=sys.stderr)
        from tqdm.auto import tqdm

        with tqdm(total=4, desc="unlearn", disable=args.quiet, leave=False) as bar:
            bar.set_postfix_str("measuring the input model")
            before = measure(loaded.model, forget, retain, bench.test, targets, seed,
                             args.eval_batch_size)
            bar.update()
            problem = UnlearningProblem(
                model=loaded.model.to(device), tasks=list(train_set.tasks), forget=forget,
                retain=retain, request=request, target_tasks=targets, device=device, seed=seed,
                train_config=recipe,
                model_factory=lambda: build_model(bench, seed=int(loaded.meta["seed"])),
                held_out=bench.validation)
            bar.set_postfix_str(f"running {visible_controls(args.method)}")
            result = run_unlearning(problem, args.method, settings)
            bar.update()
            # The input's weights as read from its file (a method may work on the loaded
            # model in place).
            input_weights = state_dict_sha256(loaded.checkpoint.state_dict)
            weights_changed = state_dict_sha256(result.model) != input_weights
            if not weights_changed:
                # A run that changed nothing (steps 0): said here, kept in the record
                # (weights_changed: false) and in the checkpoint, and `verify` does not pass it.
                bar.write(f"mtunlearn: warning: {args.method} left the weights exactly as they "
                          f"were ({result.report.steps} steps): the output model is the input "
                          "model; the record says so (weights_changed: false), verify will "
                          "not pass it, and the output's lineage does not count the request "
                          "as removed (a later request may name its ids again)",
                          file=sys.stderr)
            bar.set_postfix_str("measuring the output model")
            after = measure(result.model.cpu(), forget, retain, bench.test, targets, seed,
                            args.eval_batch_size)
            retained = check_retained(before["metrics"], after["metrics"],
                                      args.retained_tolerance)
            if not retained.passed:
                if args.require_retained:
                    raise KeptMetricsError(retained)
                bar.write(f"mtunlearn: warning: {retained.summary()}; the record says so "
                          "(retained_check.passed: false); --require-retained makes this an "
                          "error (exit 4, nothing written)", file=sys.stderr)
            bar.update()
            bar.set_postfix_str("interference matrix")
            interference = _interference(problem, args.method, settings)
            bar.update()
        meta = {**{k: loaded.meta.get(k) for k in ("benchmark", "size", "seed", "recipe",
                                                   "data_sha256")},
                # Where the data were read (--data-root when they moved), so that the output is
                # used with them there.
                "data_root": loaded.data_root,
                # Absent from checkpoints written before it was recorded: not carried as null.
                **{k: loaded.meta[k] for k in ("test_data_sha256", TRAIN_FILES_KEY,
                                               TEST_FILES_KEY) if k in loaded.meta},
                "format": CLI_META_FORMAT, "kind": "unlearned", "method": args.method,
                "parent_sha256": loaded.checkpoint.sha256, "ids_sha256": request.ids_hash(),
                # The request itself, so that verify can tell a record edited to another
                # request type or other tasks from the checkpoint's own.
                "request_type": request_type, "target_tasks": list(targets),
                "parent_state_sha256": input_weights,
                # A run that changed no weight removed nothing: its ids stay requestable
                # (counted as removed, they were refused by every later request and listed
                # among the lineage's removals by the next run's record).
                REMOVALS_KEY: None if earlier is None else [
                    *earlier, *([removal_entry(request)] if weights_changed else [])]}
        # Everything the record holds but the output's hash is made before the checkpoint
        # lands (the code version runs git): what follows its rename is the record's own
        # write, the window in which a SIGKILL leaves a checkpoint without its record.
        record = {
            "schema": RECORD_SCHEMA,
            "request": {**_request_fields(request, request_type, targets, forget_ids,
                                          fraction, seed),
                        "target_tasks_arg": (None if request.target_tasks is None
                                             else list(request.target_tasks)),
                        # Sorted, as the request's ids: one retain set, one record.
                        "retain_ids": None if retain_ids is None else sorted(retain_ids),
                        "earlier_removals": earlier,
                        "num_excluded_pairs": excluded,
                        # The instances this run forgot: those named, less any whose pairs
                        # earlier requests of the lineage had all removed already.
                        "forgotten_instance_ids": sorted(int(i) for i in forget.ids.tolist()),
                        "num_forget_pairs": int(forget.supervision.sum()),
                        "num_retain_pairs": int(retain.supervision.sum())},
            "method": {"name": args.method, "settings": _resolved_settings(result.report)},
            "seed": seed, "device": str(device), "eval_batch_size": args.eval_batch_size,
            "code": code, "environment": run_environment(result.report.threads),
            "invocation": getattr(args, "invocation", None),
            "benchmark": {**{k: loaded.meta.get(k) for k in ("benchmark", "size", "seed",
                                                             "data_sha256", "test_data_sha256")},
                          # The root read; the input's own when --data-root moved it.
                          "data_root": loaded.data_root,
                          **({"input_data_root": loaded.meta.get("data_root")}
                             if loaded.data_root != loaded.meta.get("data_root") else {})},
            # Absolute paths: `verify` finds the files from any folder.
            "input": {"checkpoint": str(checkpoint.resolve()),
                      "sha256": loaded.checkpoint.sha256},
            "output": {"checkpoint": str(out_ckpt.resolve()), "sha256": None},
            "weights_changed": weights_changed,
            "before": before, "after": after,
            "retained_check": retained.to_dict(),
            "report": result.report.to_dict(),
            "interference": interference,
            "started_at": started, "finished_at": utc_now(),
        }

        record = json_safe(record)
        out_ckpt, out_rec, out_sha = _write_at_free_name(
            tx, args, checkpoint, out_ckpt, out_rec,
            lambda p: save_checkpoint(p, result.model, meta))
        record["output"] = {"checkpoint": str(out_ckpt.resolve()), "sha256": out_sha}
        # The record is the commit marker: an interrupt while it is written is held until it
        # is there and the outputs are committed (a reader saw a complete record vanish).
        with interrupts_held():
            tx.write(out_rec, lambda p: write_record(p, record))
            tx.commit()
    _say(_table(_metric_rows(before, after), ["split", "task", "metric", "before", "after"]))
    for note in _attack_notes(after):
        _say(note)
    _say(f"method {args.method}: {result.report.steps} steps, "
         f"{result.report.wall_time_s:.2f} s; {request_type} request, "
         # The instances forgotten: those named whose pairs earlier requests had all removed
         # are not (the record's report counts the same).
         f"{len(forget)} instances{_named_note(len(request.instance_ids), len(forget))}, "
         f"tasks {targets}")
    _say(_retain_note({"pairs": int(retain.supervision.sum()), "instances": len(retain),
                       "retain_ids": retain_ids, "earlier_removals_excluded": excluded}))
    _say(retained.summary() if retained.passed else f"WARNING: {retained.summary()}")
    if earlier:
        # An instance is not read at all only once its image is gone; one that lost some
        # label files only (a partial request's) is still read, for its other tasks.
        present = set(train_set.ids.tolist())
        erased_ids = erased_instances(bench)
        gone = sum(1 for i in erased_ids if i not in present)
        labels = sum(1 for i in erased_ids if i in present)
        notes = ([f"{gone} of their instances' files erased since, so not read at all"]
                 if gone else []) + ([f"some of their label files erased since ({labels} "
                                      "instance(s) still read for their other tasks)"]
                                     if labels else [])
        erased = f" ({'; '.join(notes)})" if notes else ""
        _say(f"earlier removals: {len(earlier)} request(s) of the input's lineage; their "
             f"{excluded} pairs still in the data stayed out of the retain set{erased}")
    elif earlier is None:
        _say("earlier removals: unknown (the input keeps only their hash); the retain set was "
             "--retain-ids")
    _say(f"checkpoint: {_shown(out_ckpt)} (sha256 {out_sha[:16]})\nrecord:     {_shown(out_rec)}")
    return 0


def _ids_text(ids: Sequence[int], shown: int = 10) -> str:
    """``ids [3, 4]`` for a message, the first ``shown`` of them."""
    return f"ids {list(ids[:shown])}" + (" ..." if len(ids) > shown else "")


def _named_note(named: int, forgotten: int) -> str:
    """`` (N named, ...)`` when fewer instances were forgotten than the request named."""
    if named == forgotten:
        return ""
    return f" ({named} named; the other {named - forgotten}: removed by earlier requests)"
