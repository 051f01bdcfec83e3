""":func:`save_unlearned` (the unlearned weights and the record of the request, written
atomically as new files) and :func:`verify_saved` (the record checked against what it
describes)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtunlearn_ext._io import (DuplicateKeyError, Placement, atomic_torch_save, name_max,
                               placements, remove_if_placed, sha256_of_file, unique_keys,
                               write_json_new)
from mtunlearn_ext._warnings import warn_at_caller
from mtunlearn_ext.api._model_split import unwrapped
from mtunlearn_ext.api._unlearn import (
    FloatingCast,
    is_extra_state,
    non_finite_parameters,
    same_parameters,
)
from mtunlearn_ext.data.request import ForgetRequest
from mtunlearn_ext.records import WEIGHTS_UNCHANGED, code_version, run_environment, utc_now
from mtunlearn_ext.training import load_weights_only, state_dict_sha256
from mtunlearn_ext.unlearning import UnlearningReport
from mtunlearn_ext.unlearning.base import resolved_settings


API_RECORD_SCHEMA = "mtunlearn_ext.api-record/1"


def save_unlearned(model: nn.Module, report: UnlearningReport, path: str | os.PathLike[str], *,
                   original: nn.Module | None = None) -> dict[str, Any]:
    """Save an unlearned model and the record of its request, for an audit trail.

    Writes ``path`` (the model's ``state_dict``) and then ``<path>.record.json`` (schema
    ``mtunlearn_ext.api-record/1``), both as new files, atomically (temporary file, fsync,
    link): an existing file is never replaced, a reader never sees a partial one, and the
    record, written last, marks a complete save (if it cannot be written the checkpoint is
    removed again). The record holds the request as :func:`unlearn` reported it (pair counts,
    target tasks, the SHA-256 of the sorted instance ids, not the ids themselves, and
    ``ids_named_by``: the ids of ``train_data`` / ``forget_data`` when it is a data set, the
    ``"id"`` its instances carry when it is a torch dataset of such instances, else row
    positions in it; in a chain of removals, ``earlier_requests``: each earlier request's
    ids hash, instance count and target tasks), the method
    and its settings, the run's ``seed`` and ``device``, its ``environment`` (torch and Python
    versions, the intra-op thread count during the run, whether the compiled ops ran:
    :func:`~mtunlearn_ext.records.run_environment`), the summary (losses before and after;
    the membership-inference audit when ``audit_data`` was given), steps and wall time, the code
    version, the checkpoint file's SHA-256, and :func:`state_dict_sha256` of the unlearned model
    and, when ``original`` is given, of the model it came from, and ``weights_changed``: whether the
    model's weights differ from ``original``'s, or, without it, from those of the model
    :func:`unlearn` started from (as its report says; absent from a report of another
    source), and ``written_at`` (UTC): with the wall time, the only fields that differ between
    two runs of one request (same seed, thread count and build), the checkpoint's path aside
    (as given, relative or absolute).
    A run that changed nothing (``steps: 0``) is written all the same, with a
    ``UserWarning`` and ``weights_changed: false``, which :func:`verify_saved` fails, as
    ``mtunlearn unlearn`` and ``mtunlearn verify`` treat such a run; likewise
    ``parameters_changed: false`` for a run that moved buffers only (BatchNorm statistics
    recomputed after 0 steps), whose every parameter is the original's. A value JSON cannot hold,
    NaN or an infinity (a diverged run's loss), is written as ``null``, as
    :meth:`UnlearningReport.to_dict` writes it. Missing folders of ``path`` are created.

    Returns:
        The record (a plain JSON-able dict).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_unlearned: `model` must be the unlearned nn.Module, got "
                        f"{type(model).__name__}")
    if not isinstance(report, UnlearningReport):
        raise TypeError(f"save_unlearned: `report` must be the UnlearningReport that unlearn() "
                        f"returned with the model, got {type(report).__name__}")
    if original is not None and not isinstance(original, nn.Module):
        raise TypeError(f"save_unlearned: `original` must be the nn.Module the model was "
                        f"unlearned from (or None), got {type(original).__name__}")
    # As unlearn() reads them: a compiled or DataParallel wrapper's names carry its prefix.
    model = unwrapped(model)
    original = None if original is None else unwrapped(original)
    diverged = non_finite_parameters(model)
    if diverged:
        half = any(p.dtype == torch.float16 for p in model.parameters())
        why = ("a cast to float16 overflows past 65504, or the run diverged" if half
               else "a diverged run is no unlearned model")
        raise ValueError(f"save_unlearned: `model` has NaN/Inf in {len(diverged)} parameter(s) "
                         f"(first: {diverged[0]}); {why}: nothing was written")
    target = _target_path(path)
    record_path = target.with_name(target.name + ".record.json")
    for p in (target, record_path):
        if os.path.lexists(p):  # a dangling symbolic link too: never written through
            what = " (a symbolic link to a missing file)" if not p.exists() else ""
            raise FileExistsError(f"save_unlearned: {p} exists{what}; refusing to overwrite "
                                  "it; nothing was written")
    model_sha = state_dict_sha256(model)
    returned_sha = report.extra.get("model_state_sha256")
    cast_to = (None if not isinstance(returned_sha, str) or returned_sha == model_sha
               else _returned_model_cast(model, report, model_sha))
    if isinstance(returned_sha, str) and returned_sha != model_sha and cast_to is None:
        # The record would certify, under this report's request, weights the run did not
        # return: an untouched original, another run's model, or one changed since.
        raise ValueError(f"save_unlearned: `model` is not the model unlearn() returned with "
                         f"`report` (its state hash {model_sha[:12]}... differs from the "
                         f"returned model's {returned_sha[:12]}...; changed since, or another "
                         "model; the returned model cast as a whole to bfloat16 or float16 "
                         "is accepted): a record describes the weights its report's run "
                         "returned. Pass that model; nothing was written")
    original_sha = None if original is None else state_dict_sha256(original)
    # A cast model is compared with `original` cast the same way: across types every hash and
    # value differs, and a run that changed nothing would be recorded as changed.
    compared_sha = (original_sha if original is None or cast_to is None
                    else state_dict_sha256(FloatingCast(original.state_dict(), cast_to)))
    claimed = report.extra.get("weights_changed")
    weights_changed = (model_sha != compared_sha if compared_sha is not None
                       else claimed if isinstance(claimed, bool) else None)
    if weights_changed is False:
        # Written all the same, as `mtunlearn unlearn` writes such a run: the record says what
        # happened, and verification fails it.
        warn_at_caller("save_unlearned: `model` has exactly the weights of the model it was "
                       "unlearned from: nothing was unlearned; the record says so "
                       "(weights_changed: false) and verify_saved will not pass it")
    said = report.extra.get("parameters_changed")
    parameters_changed = (not same_parameters(model, original, cast_to)
                          if original is not None
                          else said if isinstance(said, bool) else None)
    if weights_changed is not False and parameters_changed is False:
        warn_at_caller("save_unlearned: `model` has exactly the parameters of the model it was "
                       "unlearned from (only buffers, such as running statistics, changed): the "
                       "request's supervision is still in the weights; the record says so "
                       "(parameters_changed: false) and verify_saved will not pass it")
    record: dict[str, Any] = {
        "schema": API_RECORD_SCHEMA,
        "written_at": utc_now(),
        "code": code_version(),
        # What the weights depend on besides the code and the settings, for a rerun.
        "seed": report.seed, "device": report.device,
        "environment": run_environment(report.threads),
        "request": _finite_or_none(dict(report.request)),
        # As the run used them (a default-left forget objective as built), as the CLI's
        # records give them (extension audit: the API's kept None there).
        "method": {"name": report.method,
                   "settings": _finite_or_none(resolved_settings(report))},
        "summary": _finite_or_none(report.extra.get("summary", {})),
        "steps": report.steps,
        "wall_time_s": report.wall_time_s,
        "model_state_sha256": model_sha,
        "original_state_sha256": original_sha,
    }
    if weights_changed is not None:
        record["weights_changed"] = weights_changed
    if parameters_changed is not None:
        record["parameters_changed"] = parameters_changed

    placed: dict[str, Placement] = {}
    try:
        with placements(placed):
            checkpoint_sha = atomic_torch_save(model.state_dict(), target)
    except FileExistsError as error:  # checked free above: another writer got there since
        raise FileExistsError(f"save_unlearned: {target} appeared while saving (another "
                              "writer?); refusing to overwrite it; nothing was written"
                              ) from error
    except OSError as error:  # nothing of it is left (a temporary file, then a link)
        said = (f"save_unlearned: `path` {target} cannot be written: "
                f"{error.strerror or error}; nothing was written")
        raise (type(error)(said) if error.errno is None
               else type(error)(error.errno, said)) from error
    try:  # the record is the commit marker: without it, no checkpoint is left
        record["checkpoint"] = {"path": str(target), "sha256": checkpoint_sha}
        write_json_new(record_path, json.loads(json.dumps(record, allow_nan=False)))
    except FileExistsError as error:
        remove_if_placed(target, placed)
        raise FileExistsError(f"save_unlearned: {record_path} appeared while saving (another "
                              "writer?); refusing to overwrite it; nothing was written"
                              ) from error
    except BaseException:
        remove_if_placed(target, placed)  # not a file another process wrote there since
        raise
    return record


def _returned_model_cast(model: nn.Module, report: UnlearningReport,
                         model_sha: str) -> torch.dtype | None:
    """The half-precision type ``model`` is the model of ``report``'s run cast to, as a whole
    (``new.to(torch.bfloat16)``: how a half-precision model is unlearned), or None."""
    floating = {value.dtype for name, value in model.state_dict().items()
                if isinstance(value, torch.Tensor) and value.is_floating_point()
                and not is_extra_state(name)}
    cast = report.extra.get("model_state_sha256_cast")
    if len(floating) != 1 or not isinstance(cast, Mapping):
        return None
    dtype = floating.pop()
    return dtype if cast.get(str(dtype).removeprefix("torch.")) == model_sha else None


def _target_path(path: object) -> Path:
    """``path`` checked before anything is written, each problem named as ``path``'s (the
    operating system's errors named neither): a NUL byte, a file name too long for the folder
    with the record's suffix, a file where a folder must be. Missing folders are created."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise TypeError(f"save_unlearned: `path` must be a file path (str or os.PathLike), got "
                        f"{path!r}")
    text = os.fsdecode(os.fspath(path))
    if "\0" in text:
        raise ValueError(f"save_unlearned: `path` {text!r} contains a NUL byte")
    target = Path(text)
    existing = next(f for f in (target.parent, *target.parent.parents) if f.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"save_unlearned: `path` {target}: {existing} is a file, not a "
                                 "folder")
    limit = name_max(existing)
    longest = len(os.fsencode(target.name + ".record.json"))
    if longest > limit:
        raise ValueError(f"save_unlearned: `path`'s file name is too long: with the record's "
                         f"suffix '.record.json' it takes {longest} bytes, and the folder allows "
                         f"{limit}")
    return target


def _weights_changed_check(payload: Mapping[str, Any], weights: str | None,
                           original_sha: str | None, mismatches: list[str]) -> str:
    """The ``weights_changed`` check of :func:`verify_saved`
    (:func:`~mtunlearn_ext.records.judge_weights_changed`): the checkpoint's weights against
    the recorded ``original_state_sha256`` and the ``original`` given (``original_sha``), and
    the record's ``weights_changed``. An older record has no ``weights_changed``: it is judged
    by the hashes alone, or not checked without any."""
    from mtunlearn_ext.records import judge_weights_changed

    references = [h for h in (payload.get("original_state_sha256"), original_sha)
                  if isinstance(h, str)]
    return judge_weights_changed(
        weights, references, payload.get("weights_changed"), mismatches,
        weights="the checkpoint's weights", reference="the original model's", hash_name="state",
        not_checked=("as recorded: true (saved without `original`: no original state hash "
                     "to compare with)" if payload.get("weights_changed") is True
                     else "not checked (an older record, saved without `original`: no "
                          "weights_changed, no original state hash)"))


def _parameters_changed_check(payload: Mapping[str, Any], state: object,
                              original: nn.Module | None, mismatches: list[str]) -> str:
    """The ``parameters_changed`` check of :func:`verify_saved`: a run whose every parameter
    is the original's removed no supervision, whatever its buffers (running statistics
    recomputed on the retain rows change the state's hash, not what was learned). Judged on
    the checkpoint's parameters against ``original``'s when it is given, else by the record's
    ``parameters_changed`` (absent from older records: not checked)."""
    claimed = payload.get("parameters_changed")
    if original is not None and isinstance(state, Mapping):
        own = dict(original.named_parameters())
        if own and all(isinstance(state.get(n), torch.Tensor) for n in own):
            same = all(state[n].shape == p.shape and torch.equal(state[n], p.detach().cpu())
                       for n, p in own.items())
            if same:
                mismatches.append("every parameter of the checkpoint is the original model's "
                                  "(only buffers, such as running statistics, differ): the "
                                  "request's supervision was not removed")
                return WEIGHTS_UNCHANGED
            if claimed is False:
                mismatches.append("the record says parameters_changed: false, but the "
                                  "checkpoint's parameters differ from the original model's")
                return "MISMATCH"
            return "ok"
    if claimed is False:
        mismatches.append("the record says parameters_changed: false: the run left every "
                          "parameter as it was (only buffers changed), so the request's "
                          "supervision was not removed")
        return WEIGHTS_UNCHANGED
    unmatched = original is not None and isinstance(state, Mapping)
    if claimed is True:
        return ("as recorded: true (`original`'s parameter names are not the checkpoint's: not "
                "compared)" if unmatched else
                "as recorded: true (no `original` given to compare with)")
    return ("not checked (an older record, and `original`'s parameter names are not the "
            "checkpoint's)" if unmatched else
            "not checked (an older record, and no `original` given)")


@dataclass
class SavedCheck:
    """Outcome of :func:`verify_saved`: ``ok``, the mismatches found (as messages) and the
    outcome of each check (``"ok"``, ``"MISMATCH"`` or why it was not made)."""

    ok: bool
    checkpoint: str
    checks: dict[str, str] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        """``ok``: ``if verify_saved(...)`` and ``assert verify_saved(...)`` test the outcome
        (a dataclass instance is otherwise always true, so a failed check passed them)."""
        return self.ok


def verify_saved(record: str | os.PathLike[str], *,
                 checkpoint: str | os.PathLike[str] | None = None,
                 model: nn.Module | None = None, original: nn.Module | None = None,
                 forget_ids: Iterable[int] | None = None) -> SavedCheck:
    """Check a :func:`save_unlearned` record against what it describes.

    Re-hashes the checkpoint file (``checkpoint``, default the record's: found as recorded,
    else beside the record) against ``checkpoint.sha256``, hashes its weights against
    ``model_state_sha256``, and, when given, the unlearned ``model`` in memory against the same
    hash, the ``original`` model against ``original_state_sha256`` and ``forget_ids`` against the
    request's ``ids_sha256`` (the record keeps the ids' hash, not the ids; the request's
    ``ids_named_by`` says which ids).
    It fails a run that left the weights unchanged (check ``weights_changed``:
    :data:`~mtunlearn_ext.records.WEIGHTS_UNCHANGED` when the checkpoint's weights are the
    recorded or given original's, or the record says ``weights_changed: false``; a record
    of an older version, without the field, is judged by the hashes it has), and one that
    moved buffers only (check ``parameters_changed``: every parameter of the checkpoint is
    ``original``'s when given, else the record's ``parameters_changed: false``).
    The model and data are the caller's, so no metric is re-measured: :func:`evaluate` gives
    them for any model and data as :func:`unlearn` takes them. Raises ``ValueError`` for a
    file that is not such a record and ``FileNotFoundError`` for a missing record or checkpoint;
    mismatches are returned."""
    from mtunlearn_ext.records import recorded_path

    record_path = Path(record)
    model = None if model is None else unwrapped(model)
    original = None if original is None else unwrapped(original)
    try:
        text = record_path.read_bytes().decode()
    except UnicodeDecodeError as error:
        raise ValueError(f"verify_saved: {record_path} is not a JSON record: {error}") from error
    except FileNotFoundError:
        raise FileNotFoundError(f"verify_saved: `record` {str(record_path)!r} does not exist "
                                "(the JSON file save_unlearned wrote)") from None
    except IsADirectoryError:
        raise ValueError(f"verify_saved: `record` {str(record_path)!r} is a directory, not the "
                         "JSON file save_unlearned wrote") from None
    try:
        payload = json.loads(text, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as error:
        raise ValueError(f"verify_saved: {record_path} is not a JSON record: {error}") from error
    except DuplicateKeyError as error:  # a reader sees the first, json keeps the last
        raise ValueError(f"verify_saved: {record_path} gives the key {error.args[0]!r} twice "
                         "in one object (edited?): a record has each key once") from None
    except RecursionError:  # not a ValueError: a traceback from the command line too
        raise ValueError(f"verify_saved: {record_path} is not a JSON record: nested too "
                         "deeply to read") from None
    if not isinstance(payload, dict) or payload.get("schema") != API_RECORD_SCHEMA:
        found = payload.get("schema") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"verify_saved: {record_path} is not a save_unlearned record (schema "
                         f"{API_RECORD_SCHEMA!r}), got {found!r}")
    saved = payload.get("checkpoint")
    if not isinstance(saved, dict) or not isinstance(saved.get("path"), str):
        raise ValueError(f"verify_saved: {record_path} has no `checkpoint` object with a "
                         f"`path` (got {saved!r}): not a record save_unlearned wrote, or edited")
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"verify_saved: `checkpoint` {str(path)!r} is not a file")
    else:
        path = recorded_path(saved["path"], record_path)
        if not path.is_file():
            raise FileNotFoundError(f"verify_saved: the record's checkpoint "
                                    f"{saved.get('path')!r} is not a file (as recorded, nor "
                                    f"beside {record_path})")
    result = SavedCheck(True, str(path))

    def check(name: str, found: str | None, expected: object, what: str) -> None:
        if found == expected:
            result.checks[name] = "ok"
            return
        result.checks[name] = "MISMATCH"
        result.mismatches.append(f"{what} {found} differs from the record's {expected}")

    check("sha256", sha256_of_file(path), saved.get("sha256"), "checkpoint SHA-256")
    state: object = None
    try:
        loaded = load_weights_only(path)  # a crafted file: refused before it is hashed
        state = loaded
        weights: str | None = state_dict_sha256(loaded)
    except Exception as error:  # noqa: BLE001 (any unreadable file is the same finding)
        weights = f"(unreadable: {error})"
    check("weights", weights, payload.get("model_state_sha256"), "checkpoint weights' hash")
    if model is not None:
        check("model", state_dict_sha256(model), payload.get("model_state_sha256"),
              "`model`'s state hash")
    original_sha = None if original is None else state_dict_sha256(original)
    if original is not None and payload.get("original_state_sha256") is None:
        result.checks["original"] = "not recorded (saved without `original`)"
    elif original is not None:
        check("original", original_sha, payload.get("original_state_sha256"),
              "`original`'s state hash")
    result.checks["weights_changed"] = _weights_changed_check(payload, weights, original_sha,
                                                              result.mismatches)
    result.checks["parameters_changed"] = (
        WEIGHTS_UNCHANGED if result.checks["weights_changed"] == WEIGHTS_UNCHANGED  # said once
        else _parameters_changed_check(payload, state, original, result.mismatches))
    if forget_ids is not None:
        if isinstance(forget_ids, (str, bytes)):
            raise TypeError(f"verify_saved: `forget_ids` must be integer ids, got "
                            f"{type(forget_ids).__name__} {forget_ids!r}")
        # The request's own rules (no fractions, bools or strings): int() would read 1.9 as 1
        # and report a match for other ids.
        try:
            ids_hash = ForgetRequest.create(list(forget_ids)).ids_hash()
        except (TypeError, ValueError) as error:
            raise type(error)(f"verify_saved: `forget_ids`: {error}") from None
        request = payload.get("request")
        check("forget_ids", ids_hash,
              request.get("ids_sha256") if isinstance(request, dict) else None,
              "`forget_ids`' hash")
    result.ok = not result.mismatches
    return result


def _finite_or_none(value: Any) -> Any:
    """``value`` with every NaN or infinite float (in nested dicts, lists and tuples) replaced
    by ``None``, JSON's ``null``; everything else as it is."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_finite_or_none(v) for v in value)
    return value
