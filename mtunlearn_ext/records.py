"""Unlearning records: what was forgotten, how, by which code, from which model into which.

A record is one JSON file (schema :data:`RECORD_SCHEMA`), written atomically next to the
unlearned checkpoint and never over an existing file. Fields:

- ``request``: ``type`` (``"full"`` / ``"partial"``), ``instance_ids`` and their ``ids_sha256``
  (:meth:`~mtunlearn_ext.data.ForgetRequest.ids_hash`), ``target_tasks`` (resolved: every task
  of a full request), ``target_tasks_arg`` (the request's own target tasks: ``null`` for a full
  request; optional, :func:`verify_record` falls back to ``type`` and ``target_tasks``),
  ``retain_ids`` (explicit retain ids, or ``null``), ``earlier_removals`` (what earlier
  requests of the input checkpoint's lineage removed, kept out of the retain set: a list of
  ``{instance_ids, target_tasks, ids_sha256}``, ``[]`` for an original input, ``null`` when
  the input did not say; optional, absent in older records), ``ids_drawn`` (``null`` when the
  ids were named, else the fraction and seed that drew them), ``forgotten_instance_ids`` (the
  named instances less those whose pairs earlier requests had all removed), pair counts
  (``num_forget_pairs``, ``num_retain_pairs``, ``num_excluded_pairs``: the retain pairs the
  earlier removals kept out);
- ``method``: registry ``name`` and its resolved ``settings``; ``seed``; ``device``;
  ``eval_batch_size`` (optional, default 64: the batch size verification measures with);
- ``code``: ``mtunlearn_ext`` version, git ``commit`` / ``dirty`` (``null`` without git);
- ``environment`` (optional, absent in older records): ``torch`` and ``python`` versions,
  ``threads`` (torch's intra-op CPU threads during the run), ``extension`` (whether the
  compiled ops ran) and ``cpu_isa`` (torch's CPU capability and the compiled ops' instruction
  set): besides the seed, what decides a run's last bits (:func:`run_environment`);
- ``invocation`` (optional, written by ``mtunlearn unlearn``): the arguments as given and
  ``cwd``, the folder they were given in (absent in older records: relative paths among the
  arguments name files from there), each ``--import`` module's source file and its SHA-256,
  the ``--config`` file and the ``--method-config`` file (when it names one) with their
  SHA-256;
- ``benchmark``: name, size, seed, data root, data SHA-256;
- ``input`` / ``output``: checkpoint path (absolute; older records may hold it relative to the
  folder ``unlearn`` ran in, :func:`recorded_path`) and SHA-256;
- ``weights_changed`` (optional, written by ``mtunlearn unlearn``): whether the output's weights
  differ from the input model's (``false``: the run changed nothing; ``verify`` fails it);
- ``before`` / ``after``: per-split, per-task metrics and the membership-inference AUC
  (:func:`mtunlearn_ext.workflow.measure`);
- ``report``: the unlearner's report (wall time, steps, forget/retain loss curves);
- ``retained_check`` (optional, written by ``mtunlearn unlearn``): whether every task metric on
  the retain and test splits stayed within ``tolerance`` (relative worsening) of the input
  model's: ``passed``, ``worst``, ``exceeded`` and every ``changes`` entry
  (:meth:`mtunlearn_ext.metrics.RetainedCheck.to_dict`); ``verify`` re-derives it from
  ``before`` and ``after``;
- ``interference`` (optional, written by ``mtunlearn unlearn``): the input model's task-gradient
  cosine matrices before and after the interference-aware projections
  (:func:`mtunlearn_ext.report.interference_to_json`);
- ``started_at`` / ``finished_at``: UTC ISO-8601 timestamps.

:func:`verify_record` re-hashes the checkpoint, re-checks the ids hash and re-measures the
model, comparing with ``after`` within a tolerance, and checks that the checkpoint is the
record's unlearned output whose weights differ from the input model's; the pair counts, the
forgotten ids and a draw of the ids are made again from the request and the data. It checks
that files and record agree, not how much was forgotten. ``invocation`` and an ``ids_drawn`` of
``null`` cannot be re-derived from anything and are not checked.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mtunlearn_ext._errors import UserInputError
from mtunlearn_ext._io import (DuplicateKeyError, sha256_of_file, unique_keys,
                               write_json_new)
from mtunlearn_ext._text import without_digit_limit_advice

__all__ = ["FORGET_ERASED_CHECK", "RECORD_SCHEMA", "WEIGHTS_UNCHANGED", "RecordError",
           "VerifyResult", "code_version", "compare_measurements", "read_record",
           "run_environment", "utc_now", "verify_record", "write_record"]

RECORD_SCHEMA = "mtunlearn_ext.unlearning-record/1"

_REQUIRED = ("schema", "request", "method", "seed", "code", "benchmark", "input", "output",
             "before", "after", "started_at", "finished_at")


class RecordError(ValueError):
    """A record file that is missing, unreadable or not an unlearning record.

    Its message has the one-line form of :class:`~mtunlearn_ext.workflow.UserInputError`: the
    argument that gave the record (``--record``), what was expected and what was received.
    """


def _record_error(argument: str, expected: str, received: object, hint: str = ""
                  ) -> RecordError:
    """A :class:`RecordError` worded as the CLI's bad-input line (the type stays RecordError,
    which callers of :func:`read_record` catch; the wording comes from UserInputError so that
    both read alike)."""

    return RecordError(str(UserInputError(argument, expected, received, hint)))


def utc_now() -> str:
    """The current UTC time, ISO-8601 with seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _git_commit(root: Path) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the checkout whose top folder is ``root``, ``(None, None)``
    without git (not installed, not a checkout, or too slow): a record must never fail for want
    of git. Only ``root``'s own checkout counts: an installed package that lies inside some
    other repository (a virtual environment in the user's project) is not that project's
    commit."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root.resolve():
            return None, None
        commit = git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError, ValueError):
        return None, None
    try:
        dirty: bool | None = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError, ValueError):
        dirty = None
    return commit or None, dirty


#: This process's :func:`code_version`, read once.
_CODE_VERSION: dict[str, Any] | None = None


def code_version() -> dict[str, Any]:
    """``{"mtunlearn_ext": version, "commit": sha or None, "dirty": bool or None}``.

    Read once per process, at the first call: the code a process runs is the code it imported,
    which a commit made while it runs does not change (read at each write, the records of one
    demo run named two commits when one was made meanwhile). The commands call it when they
    start, the demo's workers once they have imported the code they run."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        import mtunlearn_ext

        source_tree = Path(__file__).resolve().parent.parent  # a checkout holds setup.py there
        commit, dirty = ((None, None) if not (source_tree / "setup.py").is_file()
                         else _git_commit(source_tree))
        _CODE_VERSION = {"mtunlearn_ext": mtunlearn_ext.__version__, "commit": commit,
                         "dirty": dirty}
    return dict(_CODE_VERSION)


def run_environment(threads: int | None) -> dict[str, Any]:
    """``{"torch": version, "python": version, "threads": threads, "extension": bool,
    "cpu_isa": {"torch": ..., "mtunlearn_ext": ...}}``.

    The same seed gives the same weights only with the same thread count, the same torch
    build and the same CPU instruction sets (another count or build splits and rounds the sums
    otherwise: docs/unlearning.md), so a record must name them for a run to be repeated months
    later, on another machine. ``cpu_isa``: torch's CPU capability (``ATEN_CPU_CAPABILITY``
    caps it) and this extension's active kernels (``MTUNLEARN_CPU_ISA`` caps them; the
    baseline kernels round differently from the AVX2 / AVX-512 ones, which agree bit for bit).
    ``threads``: torch's intra-op CPU threads during the run (``None``: not known)."""
    import torch

    from mtunlearn_ext._extension import build_info, cpu_isa

    # str(): torch's TorchVersion is a str subclass, which checkpoint metadata refuses.
    return {"torch": str(torch.__version__), "python": sys.version.split()[0], "threads": threads,
            "extension": bool(build_info().get("extension")),
            "cpu_isa": {"torch": str(torch.backends.cpu.get_cpu_capability()),
                        "mtunlearn_ext": cpu_isa()["active"]}}


def write_record(path: str | os.PathLike[str], record: Mapping[str, Any]) -> str:
    """Write ``record`` to a new file atomically (never over an existing one); return its
    SHA-256. The record must hold plain JSON types (finite floats)."""

    missing = [k for k in _REQUIRED if k not in record]
    if missing:
        raise RecordError(f"write_record: the record lacks {missing}")
    return write_json_new(path, dict(record))


def read_record(path: str | os.PathLike[str], argument: str = "--record") -> dict[str, Any]:
    """Read and check a record file; :class:`RecordError` names ``argument`` (the option that
    gave the path), what a record must be, the path and the problem."""
    p = Path(path)
    if not p.is_file():
        raise _record_error(argument, "an existing unlearning record file (JSON)", str(p),
                            "no such file" if not p.exists() else "not a file")
    try:
        record = json.loads(p.read_text(encoding="utf-8"), object_pairs_hook=unique_keys)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        if zipfile.is_zipfile(p):  # torch.save's archive: "can't decode byte 0x80" said little
            raise _record_error(argument, "a readable JSON unlearning record", str(p),
                                "it is a zip archive, a checkpoint (its record is the "
                                "`.record.json` file `unlearn` wrote beside it)") from None
        raise _record_error(argument, "a readable JSON unlearning record", str(p),
                            str(error)) from error
    except DuplicateKeyError as error:  # a reader sees the first, json keeps the last
        raise _record_error(argument, "a JSON unlearning record with each key once", str(p),
                            f"key {error.args[0]!r} is given twice in one object (edited?)"
                            ) from None
    except RecursionError:  # not a ValueError: it escaped as a traceback with exit 1
        raise _record_error(argument, "a readable JSON unlearning record", str(p),
                            "nested too deeply to read") from None
    except ValueError as error:  # an integer past Python's 4300 digits: a traceback before
        raise _record_error(argument, "a readable JSON unlearning record", str(p),
                            without_digit_limit_advice(error)) from None
    if not isinstance(record, dict) or record.get("schema") != RECORD_SCHEMA:
        found = (f"its schema is {record.get('schema')!r}" if isinstance(record, dict)
                 else f"it holds a JSON {type(record).__name__}, not an object")
        raise _record_error(argument, f"an unlearning record (schema {RECORD_SCHEMA!r})",
                            str(p), found)
    missing = [k for k in _REQUIRED if k not in record]
    if missing:
        raise _record_error(argument, "a complete unlearning record", str(p),
                            f"it lacks the fields {missing}")
    wrong = [f"{field} ({description})" for field, description, ok in _field_checks(record)
             if not ok]
    if wrong:
        raise _record_error(argument, "a well-formed unlearning record", str(p),
                            f"it has malformed fields: {', '.join(wrong)}")
    return record


def _field_checks(record: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """(field, what it must be, whether it is) for every field that verification reads."""
    request, output = record["request"], record["output"]
    request_ok = isinstance(request, Mapping)
    output_ok = isinstance(output, Mapping)
    ids = request.get("instance_ids") if request_ok else None
    return [
        ("seed", "an integer >= 0",
         isinstance(record["seed"], int) and not isinstance(record["seed"], bool)
         and record["seed"] >= 0),
        ("request", "a mapping", request_ok),
        ("request.instance_ids", "a list of integers",
         isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                       for i in ids)),
        ("request.ids_sha256", "a string",
         request_ok and isinstance(request.get("ids_sha256"), str)),
        ("output", "a mapping", output_ok),
        ("output.checkpoint", "a string",
         output_ok and isinstance(output.get("checkpoint"), str)),
        ("output.sha256", "a string", output_ok and isinstance(output.get("sha256"), str)),
        ("after", "a mapping", isinstance(record["after"], Mapping)),
        ("request.retain_ids", "null or a list of integers",
         not request_ok or _is_id_list(request.get("retain_ids"), allow_null=True)),
        ("request.earlier_removals", "null or a list of {instance_ids, target_tasks} "
         "(optional)", not request_ok or _is_removals(request.get("earlier_removals"))),
        ("request.ids_drawn", "null or {fraction: a number in (0, 1), seed: an integer >= 0} "
         "(optional)", not request_ok or _is_draw(request.get("ids_drawn"))),
        ("weights_changed", "true or false (optional)",
         record.get("weights_changed") is None or isinstance(record["weights_changed"], bool)),
        ("eval_batch_size", "an integer >= 1 (optional)",
         "eval_batch_size" not in record
         or (_is_int(record["eval_batch_size"]) and record["eval_batch_size"] >= 1)),
    ]


def _is_removals(value: object) -> bool:
    from mtunlearn_ext.lineage import is_removal_list

    return value is None or is_removal_list(value)


def _is_draw(value: object) -> bool:
    if value is None:
        return True
    if not isinstance(value, Mapping):
        return False
    fraction, seed = value.get("fraction"), value.get("seed")
    return (isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
            and 0.0 < fraction < 1.0 and isinstance(seed, int) and _is_int(seed)
            and seed >= 0)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_id_list(value: object, allow_null: bool = False) -> bool:
    if value is None:
        return allow_null
    return isinstance(value, list) and all(_is_int(i) for i in value)


#: What ``verify``'s provenance row says when the checkpoint predates the request fields in its
#: metadata (``request_type``, ``target_tasks``, ``removals``): the rest was compared.
OLDER_CHECKPOINT_NOTE = "ok (older checkpoint: no request type/tasks in its metadata)"


def _provenance_differences(meta: Mapping[str, Any], record: Mapping[str, Any]
                            ) -> tuple[list[str], bool]:
    """What the checkpoint says of its own making against what the record says, as messages,
    and whether the checkpoint held the request's own fields (newer checkpoints).

    The checkpoint must be an unlearned one (``kind: unlearned``: a checkpoint of ``train`` is
    no unlearning run's output), the record's output must not be its input (the same SHA-256),
    and what ``unlearn`` writes into the output's metadata must agree with the record: the
    method, the SHA-256 of the checkpoint it started from, the hash of the forgotten ids, and,
    in checkpoints of this version, the request type, its resolved target tasks and the
    lineage's removals (the record's earlier removals, then this request), and the data the
    record names (benchmark, size, seed and the data hashes of its ``benchmark`` block). An
    edited record must not verify against a checkpoint that contradicts it. Fields an older
    checkpoint does not carry are not compared (the second value is then ``False``)."""
    request = record["request"]
    inp = record.get("input")
    input_sha = inp.get("sha256") if isinstance(inp, Mapping) else None
    out: list[str] = []
    kind = meta.get("kind")
    if kind != "unlearned":
        made_by = " (written by `mtunlearn train`)" if kind == "original" else ""
        out.append(f"the checkpoint's metadata has kind {kind!r}{made_by}, not 'unlearned': it "
                   "is not the output of an unlearning run, so not this record's output")
    if input_sha is not None and record["output"]["sha256"] == input_sha:
        out.append(f"the record's output.sha256 is its input.sha256 ({str(input_sha)[:16]}...): "
                   "the output checkpoint is the input checkpoint, so nothing was unlearned")
    method = record.get("method")
    target_tasks = request.get("target_tasks")
    pairs: list[tuple[str, str, Any]] = [
        ("method", "method.name", method.get("name") if isinstance(method, Mapping) else None),
        ("parent_sha256", "input.sha256", input_sha),
        ("ids_sha256", "request.ids_sha256", request.get("ids_sha256")),
        ("request_type", "request.type", request.get("type")),
        ("target_tasks", "request.target_tasks",
         list(target_tasks) if isinstance(target_tasks, (list, tuple)) else target_tasks)]
    # The data the run read: the record's benchmark block copies the checkpoint's own.
    benchmark = record.get("benchmark")
    if isinstance(benchmark, Mapping):
        pairs.extend((key, f"benchmark.{key}", benchmark.get(key))
                     for key in ("benchmark", "size", "seed", "data_sha256", "test_data_sha256")
                     if key in benchmark)
    out.extend(f"the checkpoint's metadata has {key} {meta[key]!r}, the record's {field} "
               f"{value!r} (record edited, or another run's checkpoint?)"
               for key, field, value in pairs if key in meta and meta[key] != value)
    removals = meta.get("removals")
    if record.get("weights_changed") is False and isinstance(removals, list):
        # A run that changed nothing did not add its request to the lineage (since the
        # record's weights_changed; before, it did, and the entry is taken as its own).
        earlier = request.get("earlier_removals")
        if isinstance(earlier, list) and len(removals) == len(earlier):
            removals = [*removals, {"instance_ids": request.get("instance_ids"),
                                    "target_tasks": request.get("target_tasks_arg")}]
    if isinstance(removals, list) and removals and "earlier_removals" in request:
        earlier = request.get("earlier_removals")

        def key(entries: Any) -> Any:
            return ([(sorted(e.get("instance_ids") or []), e.get("target_tasks"))
                     for e in entries] if isinstance(entries, list) else entries)

        last = removals[-1] if isinstance(removals[-1], Mapping) else {}
        if key(removals[:-1]) != key(earlier):
            out.append(f"the checkpoint's metadata lists {len(removals) - 1} earlier removals, "
                       f"the record's request.earlier_removals "
                       f"{'null' if earlier is None else len(earlier)} that differ from them "
                       "(record edited, or another run's checkpoint?)")
        own = request.get("target_tasks_arg", last.get("target_tasks"))
        if (sorted(last.get("instance_ids") or []) != sorted(request.get("instance_ids") or [])
                or last.get("target_tasks") != own):
            out.append("the checkpoint's metadata has removed other pairs than the record's "
                       "request (instance_ids, target_tasks_arg)")
    newer = all(k in meta for k in ("request_type", "target_tasks", "removals"))
    return out, newer


def compare_measurements(expected: Any, actual: Any, tolerance: float, where: str = ""
                         ) -> list[str]:
    """Differences between two measurement trees (dicts of dicts of numbers), as messages;
    numbers are compared with ``|a - e| <= tolerance * max(1, |e|)``."""
    out: list[str] = []
    if isinstance(expected, Mapping) and isinstance(actual, Mapping):
        for key in sorted(set(expected) | set(actual)):
            path = f"{where}.{key}" if where else str(key)
            if key not in actual:
                out.append(f"{path}: missing in the re-measurement")
            elif key not in expected:
                out.append(f"{path}: not in the record")
            else:
                out.extend(compare_measurements(expected[key], actual[key], tolerance, path))
        return out
    if isinstance(expected, (int, float)) and isinstance(actual, (int, float)) \
            and not isinstance(expected, bool):
        e, a = float(expected), float(actual)
        if not (math.isfinite(a) and abs(a - e) <= tolerance * max(1.0, abs(e))):
            out.append(f"{where}: recorded {e:.6g}, measured {a:.6g}")
        return out
    # False == 0.0 in Python: a number edited into a boolean would pass as equal.
    if expected != actual or isinstance(expected, bool) != isinstance(actual, bool):
        out.append(f"{where}: recorded {expected!r}, measured {actual!r}")
    return out


@dataclass
class VerifyResult:
    """Outcome of :func:`verify_record`: ``ok``, every mismatch found (as messages) and the
    outcome of each check, ``checks``: ``"sha256"`` (the checkpoint's hash), ``"ids"`` (the
    recorded ids against their hash), ``"provenance"``, ``"metrics"`` (the re-measurement of
    ``after``), ``"before"`` (the input model's, when its checkpoint is found) and
    ``"weights"`` (:data:`WEIGHTS_UNCHANGED` for an output whose weights are the input's),
    ``"pair counts"``, ``"forgotten ids"`` and ``"ids drawn"`` (the request's fields made
    again; ``"ids drawn"`` is ``"not checked"`` for named ids), each
    ``"ok"``, ``"MISMATCH"`` or, for ``"metrics"`` when the recorded request does not apply to
    the checkpoint's data, ``"not measured"``; ``"before"`` says why when it was not
    measured."""

    ok: bool
    checkpoint: str
    sha256: str
    mismatches: list[str] = field(default_factory=list)
    measured: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, str] = field(default_factory=dict)


def recorded_path(recorded: str, record_path: str | os.PathLike[str]) -> Path:
    """A file the record names, found from wherever ``verify`` runs: the path as recorded
    (absolute in new records; relative to the folder ``unlearn`` ran in, in older ones, so
    tried from the current folder), else that relative path from the record's folder, else the
    same name beside the record (the default layout, also after the folder moved). The path as
    recorded when none of them is a file."""
    path = Path(recorded)
    folder = Path(record_path).parent
    candidates = [path] + ([] if path.is_absolute() else [folder / path]) + [folder / path.name]
    return next((c for c in candidates if c.is_file()), path)


def _request_from_record(req: Mapping[str, Any]) -> tuple[list[int], list[str] | None]:
    """``(instance_ids, target_tasks)`` to rebuild a record's :class:`ForgetRequest` from:
    ``target_tasks_arg`` (the request's own target tasks, ``None`` for a full request) when the
    record has it, else ``target_tasks`` for a partial request and ``None`` for a full one."""
    if "target_tasks_arg" in req:
        return req["instance_ids"], req["target_tasks_arg"]
    kind = req.get("type")
    if kind == "partial":
        return req["instance_ids"], req.get("target_tasks")
    if kind == "full":
        return req["instance_ids"], None
    raise ValueError(f"request.type is {kind!r}, expected 'full' or 'partial' (the record has "
                     "no request.target_tasks_arg)")


def verify_record(record_path: str | os.PathLike[str],
                  checkpoint_path: str | os.PathLike[str] | None = None,
                  tolerance: float = 1e-4, batch_size: int | None = None,
                  data_root: str | os.PathLike[str] | None = None) -> VerifyResult:
    """Check a model against its record.

    Recomputes the SHA-256 of ``checkpoint_path`` (default: the record's output checkpoint)
    and compares it with ``output.sha256``; re-derives the ids hash; rebuilds the benchmark, the
    request's forget / retain split and the model, and re-measures it
    (:func:`mtunlearn_ext.workflow.measure` with the record's seed), comparing every metric and
    the MIA AUC with ``after`` within ``tolerance`` (relative above 1, absolute below). Raises
    :class:`RecordError` for an unreadable record and
    :class:`~mtunlearn_ext.workflow.UserInputError` for a missing or unreadable checkpoint, or
    one whose bytes are the recorded ones but cannot be loaded (naming ``--checkpoint`` when
    given, else ``--record`` and its ``output.checkpoint``); mismatches are returned, not
    raised. A checkpoint whose SHA-256 differs from the record's is a mismatch even when it
    cannot be loaded (tampered, truncated, empty): its metrics are then ``"not measured"``.

    The request is rebuilt from ``request.target_tasks_arg`` when the record has it, else from
    ``request.type`` and ``request.target_tasks``; the measurement uses the record's
    ``eval_batch_size`` (64 when absent) unless ``batch_size`` is given. ``data_root``: where a
    real data set is now when it moved (``--data-root``), accepted only when its data hash to
    the checkpoints' recorded ones.
    """
    from mtunlearn_ext.data.request import ForgetRequest
    from mtunlearn_ext.erasure import erased_instances
    from mtunlearn_ext.workflow import (
        exclude_removed,
        load_model,
        measure,
        restrict_retain,
        without_removed,
    )

    record = read_record(record_path)
    if checkpoint_path is not None:
        ckpt = Path(checkpoint_path)
        if not ckpt.is_file():
            raise UserInputError("--checkpoint", "an existing checkpoint file", str(ckpt))
    else:
        recorded = record["output"]["checkpoint"]
        ckpt = recorded_path(recorded, record_path)
        if not ckpt.is_file():
            raise UserInputError("--record", "a record whose output checkpoint exists",
                                 str(record_path),
                                 f"its output.checkpoint {recorded!r} is no file (from "
                                 f"{os.getcwd()!r}, nor from the record's folder); pass "
                                 "--checkpoint")
    # The argument that supplied the checkpoint, for errors about it: --checkpoint when given,
    # else the record (its output.checkpoint field).
    if checkpoint_path is not None:
        argument, source = "--checkpoint", str(ckpt)
        where = ""
    else:
        argument, source = "--record", str(record_path)
        where = f"its output.checkpoint {str(ckpt)!r}: "
    mismatches: list[str] = []
    checks: dict[str, str] = {}
    try:
        sha = sha256_of_file(ckpt)
    except OSError as error:
        raise UserInputError(argument, "a readable checkpoint file", source,
                             f"{where}{error.strerror or error}") from error
    checks["sha256"] = "ok" if sha == record["output"]["sha256"] else "MISMATCH"
    if checks["sha256"] != "ok":
        mismatches.append(f"checkpoint SHA-256 {sha} differs from the record's "
                          f"{record['output']['sha256']}")
    req = record["request"]
    try:
        request = ForgetRequest.create(*_request_from_record(req))
    except (TypeError, ValueError) as error:
        raise _record_error("--record", "a record whose request can be rebuilt",
                            str(record_path), f"its request cannot be read: {error}") from error
    checks["ids"] = "ok" if request.ids_hash() == req["ids_sha256"] else "MISMATCH"
    if checks["ids"] != "ok":
        mismatches.append(f"ids hash of the recorded ids {request.ids_hash()} differs from the "
                          f"recorded ids_sha256 {req['ids_sha256']} (record edited?)")
    try:
        loaded = load_model(ckpt, argument, data_root=data_root)
    except UserInputError as error:
        if error.argument == "--data-root":  # the data given, not the checkpoint, are wrong
            raise
        if checks["sha256"] == "ok":  # the recorded bytes, yet unusable: nothing to compare
            if checkpoint_path is None:
                # The path, not error.received: that is whatever load_model judged, e.g. the
                # benchmark's name for data that changed ("nyuv2 is not a checkpoint ...").
                unusable = f"{str(ckpt)!r} is not {error.expected}"
                raise UserInputError("--record", "a record whose output checkpoint can be "
                                     "loaded", source, f"its output.checkpoint {unusable}"
                                     + (f": {error.hint}" if error.hint else "")) from error
            raise
        # Bytes other than the recorded ones (tampered, truncated, empty): a mismatch.
        mismatches.append("the checkpoint cannot be loaded, so it was not measured: "
                          f"{error.hint or 'not ' + error.expected}")
        checks["metrics"] = "not measured"
        return VerifyResult(False, str(ckpt), sha, mismatches, {}, checks)
    provenance, newer = _provenance_differences(loaded.meta, record)
    checks["provenance"] = ("MISMATCH" if provenance else "ok" if newer
                            else OLDER_CHECKPOINT_NOTE)
    mismatches.extend(provenance)
    train_set = loaded.benchmark.train
    if _forget_erased(loaded.benchmark, request):
        return _verify_erased(record, record_path, request, loaded, ckpt, sha, data_root,
                              batch_size, tolerance, mismatches, checks)
    try:
        request.validate(train_set)
        # As `unlearn` split it: the pairs the lineage removed before are not forgotten again.
        forget, _ = request.split(without_removed(train_set, req.get("earlier_removals") or []))
        _, retain = request.split(train_set)
        retain = restrict_retain(retain, request, req.get("retain_ids"), train_set)
        retain, excluded = exclude_removed(retain, req.get("earlier_removals") or [])
    except (KeyError, ValueError) as error:  # nothing to measure: the request does not apply
        return _request_misfit(error, ckpt, sha, mismatches, checks)
    erased = erased_instances(loaded.benchmark)
    counts, note = _excluded_count(req, excluded, erased)
    _check_pair_counts(req, {"num_forget_pairs": int(forget.supervision.sum()),
                             "num_retain_pairs": int(retain.supervision.sum()), **counts},
                       mismatches, checks, note)
    _check_forgotten(req, sorted(int(i) for i in forget.ids.tolist()), mismatches, checks)
    _check_draw(record, request, train_set, erased, mismatches, checks)
    size = batch_size or int(record.get("eval_batch_size", 64))
    measured = measure(loaded.model, forget, retain, loaded.benchmark.test,
                       request.resolved_tasks(train_set), int(record["seed"]), size)
    differences = compare_measurements(record["after"], measured, tolerance, "after")
    checks["metrics"] = "MISMATCH" if differences else "ok"
    mismatches.extend(differences)
    if checks["sha256"] != "ok":
        # Another checkpoint than the record's output: the record's input is not its parent,
        # and loading that input with this checkpoint's data failed with errors about the
        # data (restore erased files, drop a --data-root never given) instead of this.
        checks["before"] = "not measured (the checkpoint is not the record's output)"
        checks["weights"] = "not checked (the checkpoint is not the record's output)"
        return VerifyResult(False, str(ckpt), sha, mismatches, measured, checks)
    checks["before"] = _verify_before(record, record_path, forget, retain, loaded.benchmark.test,
                                      request.resolved_tasks(train_set), size, tolerance,
                                      mismatches,
                                      # The input's data are the output's: read from where the
                                      # output's were (its root differs from the input's own
                                      # when unlearn ran with --data-root).
                                      data_root if data_root is not None else loaded.data_root)
    checks["weights"] = _verify_weights(record, record_path, loaded.checkpoint, mismatches)
    checks["kept metrics"] = _verify_retained(record, mismatches)
    return VerifyResult(not mismatches, str(ckpt), sha, mismatches, measured, checks)


def _request_misfit(error: Exception, ckpt: Path, sha: str, mismatches: list[str],
                    checks: dict[str, str]) -> VerifyResult:
    """The failed verification of a record whose request does not apply to the checkpoint's
    training set (unknown ids, ...): nothing can be measured."""
    reason = error.args[0] if isinstance(error, KeyError) and error.args else error
    mismatches.append(f"the recorded request does not fit the checkpoint's training set: "
                      f"{reason}")
    checks["metrics"] = "not measured"
    return VerifyResult(False, str(ckpt), sha, mismatches, {}, checks)


#: ``verify``'s row for a record whose forget instances' files were erased since the run.
FORGET_ERASED_CHECK = "forget metrics"
FORGET_ERASED_NOTE = "not re-measured, the forget instances' files were erased after the run"


def _forget_erased(bench: Any, request: Any) -> bool:
    """Whether any of the request's forget pairs lost its file after the run (the person's data
    erased once the removal was honoured): its forget metrics and attack AUC cannot be
    re-measured then."""
    from mtunlearn_ext.data.libmtl import FOLDER_OF_TASK
    from mtunlearn_ext.erasure import erased_instances

    erased = erased_instances(bench)
    folders = ({"image", *FOLDER_OF_TASK.values()} if request.target_tasks is None
               else {FOLDER_OF_TASK.get(t, t) for t in request.target_tasks})
    return any(erased.get(int(i), set()) & folders for i in request.instance_ids)


def _kept_part(measurement: Any) -> dict[str, Any]:
    """The retain and test metrics of a recorded measurement (what :func:`measure_kept`
    re-measures)."""
    metrics = measurement.get("metrics") if isinstance(measurement, Mapping) else None
    metrics = metrics if isinstance(metrics, Mapping) else {}
    return {"metrics": {k: metrics.get(k) for k in ("retain", "test")}}


def _check_pair_counts(req: Mapping[str, Any], counts: Mapping[str, int], mismatches: list[str],
                       checks: dict[str, str], note: str = "") -> None:
    """The ``pair counts`` row: the counts the record gives the request's scope against those
    recomputed from the same split (``counts``; ``note`` says what could not be)."""
    edited = [f"request.{key} {req[key]!r} differs from the split the request gives, {value}"
              f" (record edited?)" for key, value in counts.items()
              if key in req and req[key] != value]
    checks["pair counts"] = "MISMATCH" if edited else "ok" + note
    mismatches.extend(edited)


def _excluded_count(req: Mapping[str, Any], excluded: int, erased: Mapping[int, set[str]]
                    ) -> tuple[dict[str, int], str]:
    """``num_excluded_pairs`` for :func:`_check_pair_counts` (the count re-made from the same
    split) and a note, or no count when it cannot be compared: erasing an earlier removal's
    files after the run takes its pairs out of the data, so the count made now is smaller
    than the run's, and an edited count cannot be told from that."""
    recorded = req.get("num_excluded_pairs")
    named = {int(i) for entry in req.get("earlier_removals") or []
             for i in entry.get("instance_ids") or []}
    if "num_excluded_pairs" in req and recorded != excluded and named & set(erased):
        return {}, ("; num_excluded_pairs not re-counted: files of the earlier removals were "
                    "erased, after the run or before it")
    return {"num_excluded_pairs": excluded}, ""


def _check_forgotten(req: Mapping[str, Any], forgotten: Sequence[int] | None,
                     mismatches: list[str], checks: dict[str, str],
                     removed: Sequence[int] = ()) -> None:
    """The ``forgotten ids`` row: ``request.forgotten_instance_ids`` against the instances
    the request forgot, re-derived as ``unlearn`` derived them (``forgotten``: those of the
    request's ids left a pair of its target tasks by the earlier removals). ``None``: they
    cannot be re-derived (the forget files were erased), so the field is checked for what
    the record itself gives: ids of the request, none of ``removed`` (the ids whose target
    pairs the earlier removals took already)."""
    if "forgotten_instance_ids" not in req:
        checks["forgotten ids"] = "not recorded (an older record)"
        return
    recorded = req["forgotten_instance_ids"]
    if forgotten is not None:
        if recorded == list(forgotten):
            checks["forgotten ids"] = "ok"
            return
        mismatches.append(f"request.forgotten_instance_ids {recorded!r} differ from the "
                          f"request's ids less those the earlier removals took, "
                          f"{list(forgotten)!r} (record edited?)")
        checks["forgotten ids"] = "MISMATCH"
        return
    named = set(req.get("instance_ids") or [])
    wrong = (not isinstance(recorded, list) or not recorded
             or any(not isinstance(i, int) or i not in named or i in set(removed)
                    for i in recorded) or recorded != sorted(recorded))
    if wrong:
        mismatches.append(f"request.forgotten_instance_ids {recorded!r} are not the request's "
                          "ids (sorted, at least one) less those the earlier removals took "
                          "(record edited?)")
        checks["forgotten ids"] = "MISMATCH"
        return
    checks["forgotten ids"] = ("ok (against the request and the earlier removals; the forget "
                               "files are erased)")


def _fully_removed(req: Mapping[str, Any], request: Any, task_names: Sequence[str]
                   ) -> list[int]:
    """The request's ids whose every target task the earlier removals took (a full removal
    takes every task): by the record alone, they are not forgotten again."""
    targets = set(request.target_tasks or task_names)
    taken: dict[int, set[str]] = {}
    for entry in req.get("earlier_removals") or []:
        tasks = set(entry.get("target_tasks") or task_names)
        for i in entry.get("instance_ids") or []:
            taken.setdefault(int(i), set()).update(tasks)
    return [int(i) for i in request.instance_ids if targets <= taken.get(int(i), set())]


def _check_draw(record: Mapping[str, Any], request: Any, train_set: Any,
                erased: Mapping[int, set[str]], mismatches: list[str],
                checks: dict[str, str]) -> None:
    """The ``ids drawn`` row: a record whose ``request.ids_drawn`` says the tool drew the ids
    (``--forget-fraction``) is drawn again, as ``unlearn`` drew them (among the pairs the
    earlier removals left, with the record's seed), and must give the request's ids. Ids
    the record says were named (``null``) cannot be checked: a drawn set edited to look
    named, or the reverse of a draw that happens to give the named ids, reads the same.
    Erased files change the data a draw is made from, so a draw that differs then is not a
    mismatch."""
    from mtunlearn_ext.data.request import RequestType
    from mtunlearn_ext.data.request import build_request
    from mtunlearn_ext.lineage import without_removed

    req = record["request"]
    if "ids_drawn" not in req:
        checks["ids drawn"] = "not recorded (an older record)"
        return
    drawn = req["ids_drawn"]
    if drawn is None:
        checks["ids drawn"] = "not checked (the ids were named)"
        return
    fraction, seed = drawn["fraction"], drawn["seed"]
    problems = []
    if seed != record["seed"]:
        problems.append(f"request.ids_drawn.seed {seed!r} is not the run's seed "
                        f"{record['seed']!r}, which draws the ids (record edited?)")
    kind: RequestType = "full" if request.target_tasks is None else "partial"
    try:
        again = list(build_request(without_removed(train_set, req.get("earlier_removals") or []),
                                   kind, int(seed), float(fraction), None,
                                   request.target_tasks).instance_ids)
        why = f"it draws {again[:10]}{' ...' if len(again) > 10 else ''}"
    except (KeyError, ValueError) as error:
        again, why = None, f"it draws none: {error}"
    if again != sorted(request.instance_ids) and not problems:
        if erased:
            checks["ids drawn"] = (f"not re-drawn (fraction {fraction:g}, seed {seed}): files "
                                   "were erased since the data the ids were drawn from")
            return
        problems.append(f"request.ids_drawn {dict(drawn)!r} does not give the recorded "
                        f"request.instance_ids: {why} (record edited?)")
    mismatches.extend(problems)
    checks["ids drawn"] = ("MISMATCH" if problems
                           else f"ok (drawn again: fraction {fraction:g}, seed {seed})")


def _verify_erased(record: Mapping[str, Any], record_path: str | os.PathLike[str],
                   request: Any, loaded: Any, ckpt: Path, sha: str,
                   data_root: str | os.PathLike[str] | None, batch_size: int | None,
                   tolerance: float, mismatches: list[str], checks: dict[str, str]
                   ) -> VerifyResult:
    """:func:`verify_record`'s measurement once the forget instances' files were erased
    (which the data check allowed only for files the lineage removed): the retain and test
    metrics of the output (and of the input, when found) are re-measured and compared; the
    forget metrics and the attack's AUC cannot be, and the ``forget metrics`` row says so.
    The weights, hash, ids and provenance checks are unchanged."""
    from mtunlearn_ext.erasure import erased_instances
    from mtunlearn_ext.workflow import (
        exclude_removed,
        lineage_removals,
        load_model,
        measure_kept,
        removal_entry,
        restrict_retain,
    )

    req = record["request"]
    train_set, test = loaded.benchmark.train, loaded.benchmark.test
    try:
        # The training set without this request's pairs (of the instances still there:
        # ForgetRequest.split refuses ids the data set lacks), as the lineage's are taken out.
        retain, _ = exclude_removed(train_set, [removal_entry(request)])
        retain = restrict_retain(retain, request, req.get("retain_ids"), train_set)
        retain, excluded = exclude_removed(retain, req.get("earlier_removals") or [])
    except (KeyError, ValueError) as error:
        return _request_misfit(error, ckpt, sha, mismatches, checks)
    # The forget pairs' files are gone; the retain set is rebuilt all the same.
    erased = erased_instances(loaded.benchmark)
    counts, note = _excluded_count(req, excluded, erased)
    _check_pair_counts(req, {"num_retain_pairs": int(retain.supervision.sum()), **counts},
                       mismatches, checks,
                       " (retain pairs; the forget pairs' files are erased)" + note)
    _check_forgotten(req, None, mismatches, checks,
                     _fully_removed(req, request, train_set.task_names))
    _check_draw(record, request, train_set, erased, mismatches, checks)
    size = batch_size or int(record.get("eval_batch_size", 64))
    checks[FORGET_ERASED_CHECK] = FORGET_ERASED_NOTE
    measured = measure_kept(loaded.model, retain, test, size)
    differences = compare_measurements(_kept_part(record["after"]), measured, tolerance, "after")
    checks["metrics"] = "MISMATCH" if differences else "ok"
    mismatches.extend(differences)
    checks["before"] = "not recorded"
    inp = record.get("input")
    recorded = inp.get("checkpoint") if isinstance(inp, Mapping) else None
    if isinstance(inp, Mapping) and isinstance(recorded, str) \
            and isinstance(record.get("before"), Mapping):
        path = recorded_path(recorded, record_path)
        if not path.is_file():
            checks["before"] = "not measured (input checkpoint not found)"
        elif sha256_of_file(path) != inp.get("sha256"):
            checks["before"] = "not measured (the input checkpoint found is not the recorded one)"
        else:
            # The input's lineage did not remove what this run did: the output's removals
            # say which files may be gone.
            original = load_model(path, "--record", data_root=data_root if data_root is not None
                                  else loaded.data_root, removals=lineage_removals(loaded.meta))
            before = compare_measurements(_kept_part(record["before"]),
                                          measure_kept(original.model, retain, test, size),
                                          tolerance, "before")
            mismatches.extend(before)
            checks["before"] = "MISMATCH" if before else "ok"
    checks["weights"] = _verify_weights(record, record_path, loaded.checkpoint, mismatches)
    checks["kept metrics"] = _verify_retained(record, mismatches)
    return VerifyResult(not mismatches, str(ckpt), sha, mismatches, measured, checks)


def _verify_retained(record: Mapping[str, Any], mismatches: list[str]) -> str:
    """The ``kept metrics`` check: the record's ``retained_check`` must follow from its own
    ``before`` and ``after`` metrics (which the ``metrics`` and ``before`` checks measure
    again), so that an edited verdict shows. Its outcome is reported, not judged: a run that
    worsened a kept metric past its tolerance was warned of when it ran, and its files and
    record still agree. ``"ok"`` and the outcome, ``"MISMATCH"``, or ``"not recorded"``."""
    from mtunlearn_ext.metrics import check_retained

    recorded = record.get("retained_check")
    if recorded is None:
        return "not recorded (an older record)"
    try:
        check = check_retained(record["before"]["metrics"], record["after"]["metrics"],
                               recorded["tolerance"], splits=recorded["splits"])
    except (KeyError, TypeError, ValueError) as error:
        mismatches.append(f"retained_check: not re-derivable from the record's before and after "
                          f"metrics ({error})")
        return "MISMATCH"
    derived = check.to_dict()
    if derived != recorded:
        if recorded.get("passed") != check.passed:
            said = (f"the record says passed {recorded.get('passed')!r}, its before and after "
                    f"metrics give {check.passed}")
        else:  # the same verdict, other figures: name what differs, not the verdict
            fields = sorted(k for k in set(derived) | set(recorded)
                            if derived.get(k) != recorded.get(k))
            said = (f"the record's {', '.join(fields)} differ from what its before and after "
                    f"metrics give (the same verdict, passed {check.passed})")
        mismatches.append(f"retained_check: {said} ({check.summary()})")
        return "MISMATCH"
    if check.passed:
        return "ok"
    return (f"ok, as recorded: {len(check.exceeded)} metric(s) worsened by more than "
            f"{100 * check.tolerance:g}% (the run was warned of it)")


#: ``verify``'s ``weights`` row for an output whose weights are the input model's.
WEIGHTS_UNCHANGED = "UNCHANGED"


def _verify_weights(record: Mapping[str, Any], record_path: str | os.PathLike[str],
                    checkpoint: Any, mismatches: list[str]) -> str:
    """The ``weights`` check: the output's weights must differ from the input model's (a run
    that changed nothing, e.g. ``steps: 0``, unlearned nothing, however consistent its files
    and record are). Known from the checkpoint's ``parent_state_sha256`` (the input's weights
    hash, written by ``unlearn``), else from the input checkpoint when it is still where the
    record says with the recorded SHA-256; the record's ``weights_changed`` must agree, and
    ``false`` there fails the check too. ``"ok"``, :data:`WEIGHTS_UNCHANGED`, or ``"not
    checked"`` and why (an older record and checkpoint whose input is gone)."""
    from mtunlearn_ext.training import CheckpointError, load_checkpoint, state_dict_sha256

    own = checkpoint.state_sha256 or state_dict_sha256(checkpoint.state_dict)
    parent = checkpoint.meta.get("parent_state_sha256")
    if not isinstance(parent, str):
        parent = None
        inp = record.get("input")
        inp = inp if isinstance(inp, Mapping) else {}
        recorded = inp.get("checkpoint")
        if isinstance(recorded, str):
            path = recorded_path(recorded, record_path)
            if path.is_file():
                try:
                    original = load_checkpoint(path, expected_sha256=inp.get("sha256"))
                    parent = original.state_sha256 or state_dict_sha256(original.state_dict)
                except CheckpointError:  # gone or replaced: as for `before`, not a mismatch
                    pass
    return judge_weights_changed(
        own, [] if parent is None else [parent], record.get("weights_changed"), mismatches,
        weights="the output checkpoint's weights", reference="the input model's",
        hash_name="weights",
        not_checked="not checked (no input weights hash: an older checkpoint whose input is "
                    "gone)")


def judge_weights_changed(own: str | None, references: Sequence[str], claimed: object,
                          mismatches: list[str], *, weights: str, reference: str,
                          hash_name: str, not_checked: str) -> str:
    """Whether a run changed the weights, for :func:`verify_record` and
    :func:`mtunlearn_ext.api.verify_saved`: a run that left them as they were unlearned
    nothing, however consistent its files and record are. ``own``: the output's state hash;
    ``references``: the hashes of the model it came from that are known; ``claimed``: the
    record's ``weights_changed`` (``None`` in older records), which must agree with them.
    ``"ok"``, :data:`WEIGHTS_UNCHANGED`, ``"MISMATCH"`` (a record claiming no change for
    changed weights) or ``not_checked`` (no reference and no claim of no change); messages name
    ``weights`` and ``reference`` as the caller says them."""
    if own is not None and own in references:
        mismatches.append(f"{weights} are exactly {reference} ({hash_name} SHA-256 "
                          f"{own[:16]}...): the run changed nothing, so nothing was unlearned"
                          + (" (the record's weights_changed says true)" if claimed is True
                             else ""))
        return WEIGHTS_UNCHANGED
    if claimed is False:
        if not references:
            mismatches.append("the record says weights_changed: false: the run left the "
                              "weights as they were, so nothing was unlearned")
            return WEIGHTS_UNCHANGED
        mismatches.append(f"the record says weights_changed: false, but {weights} differ from "
                          f"{reference} (record edited?)")
        return "MISMATCH"
    return "ok" if references else not_checked


def _verify_before(record: Mapping[str, Any], record_path: str | os.PathLike[str],
                   forget: Any, retain: Any, test: Any, tasks: Any, batch_size: int,
                   tolerance: float, mismatches: list[str],
                   data_root: str | os.PathLike[str] | None = None) -> str:
    """The ``before`` check: the input model re-measured as ``unlearn`` measured it, when its
    checkpoint is still where the record says, with the recorded bytes. An edited ``before``
    makes the forgetting look larger than it was. An input checkpoint that is gone (deleted
    with the data it was trained on, say) or replaced is reported ``not measured``, not as a
    mismatch: the output's own provenance already ties it to the recorded input hash."""
    from mtunlearn_ext.workflow import load_model, measure

    inp = record.get("input")
    if not isinstance(inp, Mapping) or not isinstance(record.get("before"), Mapping):
        return "not recorded"
    recorded = inp.get("checkpoint")
    if not isinstance(recorded, str):
        return "not recorded"
    path = recorded_path(recorded, record_path)
    if not path.is_file():
        return "not measured (input checkpoint not found)"
    if sha256_of_file(path) != inp.get("sha256"):
        return "not measured (the input checkpoint found is not the recorded one)"
    original = load_model(path, "--record", data_root=data_root)
    measured = measure(original.model, forget, retain, test, tasks, int(record["seed"]),
                       batch_size)
    differences = compare_measurements(record["before"], measured, tolerance, "before")
    mismatches.extend(differences)
    return "MISMATCH" if differences else "ok"
