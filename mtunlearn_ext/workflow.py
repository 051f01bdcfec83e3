"""What the ``mtunlearn`` CLI and record verification share, on top of the library.

- Rebuilding a checkpoint's benchmark and model from the metadata ``mtunlearn train`` writes
  (:func:`load_model`), with the checks the unlearners rely on (:func:`check_parameter_split`,
  finite parameters).
- Turning user input (ids, a fraction, task names, explicit retain ids) into a validated
  :class:`~mtunlearn_ext.data.ForgetRequest` and its forget/retain split
  (:func:`build_user_request`, :func:`restrict_retain`), with errors that name the argument, what
  was expected and what was received (:class:`UserInputError`).
- Measuring a model (:func:`measure`: per-task metrics on forget / retain / test and the
  membership-inference AUC), the same way at unlearning time and at verification time.
- Running an unlearner under a NaN/Inf guard (:func:`run_unlearning`): a non-finite loss,
  gradient or parameter stops the run at the step it appears (:class:`NonFiniteError`).
- Writing outputs that never overwrite anything and vanish if the run is interrupted
  (:class:`OutputTransaction`).

- Which earlier requests a checkpoint's lineage removed (:func:`lineage_removals`), and keeping
  their pairs out of a later request's retain set (:func:`exclude_removed`).
- Importing the user's plugin modules (``--import``, :func:`import_plugins`).

Nothing here re-implements training, splitting, evaluation or unlearning: it calls
``training``, ``data`` (``build_request``, ``dataset_fingerprint``), ``metrics`` and
``unlearning``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mtunlearn_ext._errors import NonFiniteError, OutputTakenError, UserInputError
from mtunlearn_ext._fields import choice_of, integer_value
from mtunlearn_ext._io import (
    name_max,
    path_max,
    Placement,
    placements,
    remove_if_placed,
    json_safe,
    sha256_of_file,
    write_json_new,
)
from mtunlearn_ext.data.base import Benchmark, MultiTaskDataset
from mtunlearn_ext.data.libmtl import TEST_FILES_KEY, TRAIN_FILES_KEY
from mtunlearn_ext.data.fingerprint import dataset_fingerprint
from mtunlearn_ext.data.request import REQUEST_TYPES, ForgetRequest, RequestType, build_request
from mtunlearn_ext.lineage import (
    check_forget_left,
    exclude_removed,
    lineage_removals,
    removal_entry,
    without_removed,
)
from mtunlearn_ext.training import Checkpoint, CheckpointError, load_checkpoint

if TYPE_CHECKING:
    from mtunlearn_ext.metrics import RetainedCheck
    from mtunlearn_ext.models import MultiTaskModel
    from mtunlearn_ext.unlearning import Unlearner, UnlearningProblem, UnlearningResult

__all__ = [
    "CLI_META_FORMAT",
    "TEST_FILES_KEY",
    "TRAIN_FILES_KEY",
    "KeptMetricsError",
    "LoadedModel",
    "NonFiniteError",
    "OutputTakenError",
    "OutputTransaction",
    "UserInputError",
    "benchmark_from_meta",
    "build_user_request",
    "check_device",
    "check_finite_parameters",
    "check_forget_left",
    "check_parameter_split",
    "checked_unlearner",
    "exclude_removed",
    "json_safe",
    "lineage_removals",
    "load_model",
    "measure",
    "measure_kept",
    "parse_ids",
    "parse_tasks",
    "removal_entry",
    "restrict_retain",
    "run_unlearning",
    "without_removed",
    "write_json_new",
]

#: ``meta["format"]`` of checkpoints written by ``mtunlearn train`` / ``mtunlearn unlearn``.
CLI_META_FORMAT = "mtunlearn_ext.cli-checkpoint/1"


#: What to do about a method name the registry does not know.
UNKNOWN_METHOD_HINT = ("a method of your own: register it (@register_unlearner) in a module and "
                       "pass --import MODULE")


def import_plugins(modules: Sequence[str]) -> list[dict[str, Any]]:
    """Import each of ``modules`` (``--import``): a module name, found on ``sys.path`` or in the
    current folder (which a console script does not search), or the path of a ``.py`` file.
    Importing a module runs its registrations (``@register_unlearner`` and the like).

    Returns what a record needs to name the code it ran: per module, ``{"module": as given,
    "file": its source file (absolute; None for one without), "sha256": that file's}``."""
    import importlib
    import importlib.util

    imported = []
    for module in modules:
        try:
            if module.endswith(".py"):
                path = Path(module)
                if not is_existing_file(path):
                    raise FileNotFoundError(f"no such file: {module}")
                spec = importlib.util.spec_from_file_location(path.stem, path)
                if spec is None or spec.loader is None:
                    raise ImportError(f"cannot load {module} as a module")
                loaded = importlib.util.module_from_spec(spec)
                sys.modules[path.stem] = loaded
                try:
                    spec.loader.exec_module(loaded)
                except BaseException:
                    del sys.modules[path.stem]
                    raise
            else:
                added = os.getcwd() not in sys.path
                if added:
                    sys.path.append(os.getcwd())
                try:
                    importlib.import_module(module)
                finally:
                    if added:
                        sys.path.remove(os.getcwd())
        except Exception as error:  # the module's own errors too: they name what went wrong
            raise UserInputError("--import", "an importable module name or .py file", module,
                                 f"{type(error).__name__}: {error}") from error
        name = Path(module).stem if module.endswith(".py") else module
        source = getattr(sys.modules.get(name), "__file__", None)
        file = Path(source).resolve() if source else None
        imported.append({"module": module, "file": None if file is None else str(file),
                         "sha256": (sha256_of_file(file) if file is not None and file.is_file()
                                    else None)})
    return imported


def add_import_option(parser: argparse.ArgumentParser) -> None:
    """``--import MODULE`` (repeatable; ``args.imports``) on a harness's command line (the
    demo, the experiment runner, the tuner, ``benchmarks/unlearning_eval.py``), as
    ``mtunlearn`` has it: a module of one's own, imported (:func:`imported_or_exit`) before
    the arguments are checked, so that the methods it registers can be named there."""
    parser.add_argument("--import", dest="imports", action="append", default=[],
                        metavar="MODULE",
                        help="a module name or .py file to import first, for a method of your "
                             "own that it registers (@register_unlearner at its top level: "
                             "worker processes import it again); repeatable")


def imported_or_exit(parser: argparse.ArgumentParser, modules: Sequence[str]
                     ) -> list[dict[str, Any]]:
    """:func:`import_plugins` for a harness's command line: a module that cannot be imported
    ends the command with one line and exit code 2 (``parser.error``), before any work."""
    try:
        return import_plugins(modules)
    except UserInputError as error:
        parser.error(str(error))


class KeptMetricsError(Exception):
    """``mtunlearn unlearn --require-retained``: the run worsened a kept metric (retain or test
    split) past ``--retained-tolerance``; nothing was written. ``check`` is the
    :class:`~mtunlearn_ext.metrics.RetainedCheck`."""

    def __init__(self, check: RetainedCheck) -> None:
        self.check = check
        super().__init__(f"{check.summary()}; --require-retained: nothing was written (the "
                         "input is unchanged; a gentler setting, e.g. a lower learning rate or "
                         "fewer steps, or a larger --retained-tolerance)")


# -- parsing ---------------------------------------------------------------------------------------


def is_existing_file(path: str | os.PathLike[str]) -> bool:
    """``Path(path).is_file()``, and ``False`` for text that cannot name a file at all (a
    component over the system's name limit, as a long id list or a JSON value is, raises
    OSError; a NUL byte ValueError), which the callers then take as the literal value."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


_ID = re.compile(r"-?[0-9]+")  # ASCII digits only: int() also takes "1_3", "+3" and "３"


def _id_tokens(text: str) -> list[str]:
    return text.replace(",", " ").split()


def is_id_list(text: str) -> bool:
    """Whether ``text`` reads as a non-empty list of integer ids."""
    tokens = _id_tokens(text)
    return bool(tokens) and all(_ID.fullmatch(t) for t in tokens)


def _file_id_tokens(text: str) -> list[tuple[str, int]]:
    """(token, line number) of an id file; ``#`` starts a comment to the end of its line."""
    return [(token, number) for number, line in enumerate(text.splitlines(), 1)
            for token in _id_tokens(line.split("#", 1)[0])]


def parse_ids(value: str | Sequence[int] | None, argument: str) -> list[int] | None:
    """Instance ids from ``"1,2 3"``, a file holding such text (``@path`` or an existing path),
    or a list; ``None`` stays ``None``. Non-integers, a file that is not readable text or
    holds no id, and text that is both an id list and an existing file's name (``3`` beside a
    file ``3``: write ``@3`` or ``./3`` for the file, ``3,`` for the id) raise
    :class:`UserInputError`."""
    if value is None:
        return None
    tokens: list[str] | list[int]
    path: Path | None = None
    if isinstance(value, str):
        text = value
        path = Path(value[1:] if value.startswith("@") else value)
        if is_existing_file(path):
            if not value.startswith("@") and is_id_list(value):
                raise UserInputError(argument, "instance ids or a file of them, unambiguously",
                                     value, f"it is both an id list and the name of a file "
                                     f"here; for the file write @{value} (or ./{value}), for "
                                     f"the ids {value}, (a trailing comma)")
            try:
                # utf-8-sig: a byte-order mark (Windows editors write one) is not an id.
                text = path.read_text(encoding="utf-8-sig")
            except (OSError, UnicodeDecodeError) as error:
                reason = (f"the file is not UTF-8 text ({error})"
                          if isinstance(error, UnicodeDecodeError) else str(error))
                raise UserInputError(argument, "instance ids or a readable text file of them",
                                     value, reason) from error
            located = _file_id_tokens(text)
            if not located:
                # Refused here, where the file is known: the empty list it gave was refused
                # later as "got 'an empty list'", with nothing to say which file was read.
                raise UserInputError(argument, "at least one instance id", value,
                                     "the file holds no ids (it is empty, or holds only blank "
                                     "lines and '#' comments)")
            tokens = [token for token, _ in located]
            lines = {i: number for i, (_, number) in enumerate(located)}
        elif value.startswith("@"):  # a file was meant: say what is there instead
            raise UserInputError(argument, "instance ids or a readable text file of them",
                                 value, _not_a_file(path))
        else:
            tokens, lines = _id_tokens(text), {}
    else:
        tokens, lines = list(value), {}
    ids: list[int] = []
    for i, token in enumerate(tokens):
        if isinstance(token, str) and _ID.fullmatch(token):
            try:
                ids.append(int(token))
            except ValueError:  # past Python's 4300 digits: a traceback with exit 1
                where = f" (line {lines[i]} of {str(path)!r})" if i in lines else ""
                raise UserInputError(argument, "ids of training instances", f"an id of "
                                     f"{len(token):,} digits{where}", "no instance has such an "
                                     "id") from None
        elif (number := integer_value(token)) is not None:  # NumPy's integers in a list too
            ids.append(number)
        else:
            where = f"line {lines[i]} of {str(path)!r}" if i in lines else ""
            # A lone word that is no id was most likely meant as a file of ids.
            missing_file = (path is not None and not lines and len(tokens) == 1
                            and not is_existing_file(path)
                            and any(c.isalpha() or c in "/\\" for c in str(token)))
            detail = (_not_a_file(path, " either") if missing_file and path is not None
                      else f"{where}: ids are decimal integers in ASCII digits"
                      if where else "ids are decimal integers in ASCII digits (no '_', '+' "
                      "or other digit characters)" if isinstance(token, str) else "")
            if isinstance(token, str) and any(c in token for c in "[]{}\""):
                detail += ("; not JSON: write the ids as plain text, '3,7' or one per line"
                           if detail else "not JSON: write the ids as plain text, '3,7' or "
                           "one per line")
            raise UserInputError(argument, "integer instance ids (comma/space separated, or a "
                                 "file holding them)", token, detail) from None
    return ids


def _not_a_file(path: Path, either: str = "") -> str:
    try:
        folder, there = path.is_dir(), os.path.lexists(path)
    except (OSError, ValueError):
        folder = there = False
    if folder:
        return f"{str(path)!r} is a folder, not a file of ids"
    if there and os.path.islink(path) and not os.path.exists(path):
        return f"{str(path)!r} is a symbolic link to a missing file ({os.readlink(path)!r})"
    if there:  # a FIFO, a socket, a device: read once, it would be gone for a rerun
        return f"{str(path)!r} is not a regular file; write the ids into one"
    return f"no file {str(path)!r}{either}"


def parse_tasks(value: str | Sequence[str] | None) -> list[str] | None:
    """Task names from ``"a,b"`` or a list (``None``: not given)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(t).strip() for t in items if str(t).strip()]


def check_device(device: str) -> torch.device:
    """``device`` as a :class:`torch.device`, refusing one that is not available here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserInputError("--device", "'cpu' or 'cuda[:i]'", device) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device", "an available device", device,
                             "torch.cuda.is_available() is False here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise UserInputError("--device", "'cpu' or 'cuda[:i]'", device)
    return dev


# -- benchmark and model -------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A checkpoint rebuilt into its model, with the benchmark it was trained on."""

    model: MultiTaskModel
    checkpoint: Checkpoint
    benchmark: Benchmark
    path: Path
    #: The absolute data root the benchmark was read from (``--data-root`` when given, else the
    #: checkpoint's); None for a benchmark that reads none.
    data_root: str | None = None

    @property
    def meta(self) -> dict[str, Any]:
        """The checkpoint's metadata (benchmark, recipe, lineage, file digests)."""
        return self.checkpoint.meta


def data_root_of(meta: Mapping[str, Any], data_root: str | os.PathLike[str] | None
                 ) -> str | None:
    """The absolute data root to read a checkpoint's benchmark from: ``data_root``
    (``--data-root``: the data moved since ``train``) or the checkpoint's own. Refuses
    ``data_root`` for a checkpoint whose benchmark reads none (a generated one: it would be
    ignored, yet recorded as if the data came from there, as ``train`` refuses it) and for one
    without the recorded hash that the data found there must match."""
    recorded = meta.get("data_root")
    if data_root is None:
        return None if recorded is None else str(recorded)
    if recorded is None:
        raise UserInputError("--data-root", "no value for a checkpoint of a benchmark that "
                             "reads no data root (only for one trained on nyuv2 / cityscapes "
                             "data)", str(data_root), f"the checkpoint's benchmark "
                             f"{meta.get('benchmark')!r} reads none; drop --data-root")
    if meta.get("data_sha256") is None:
        raise UserInputError("--data-root", "no value for a checkpoint without the hash of its "
                             "training data (the data at another root could not be checked)",
                             str(data_root), f"restore the data at {recorded}")
    return str(Path(data_root).expanduser().resolve())


def benchmark_from_meta(meta: Mapping[str, Any], argument: str = "--checkpoint",
                        data_root: str | os.PathLike[str] | None = None,
                        removals: Sequence[Mapping[str, Any]] | None = None) -> Benchmark:
    """The benchmark named by a CLI checkpoint's metadata (name, size, seed, data root), read
    from ``data_root`` when given (see :func:`data_root_of`), which must hold the data the
    checkpoint recorded the hashes of. A checkpoint that recorded its training files' digests
    (:data:`TRAIN_FILES_KEY`) reads data whose removed files were erased: the files its
    lineage's removals took out (or ``removals``', a descendant's, for ``verify``'s look at an
    input model) may be missing; which were is ``info[erasure.ERASED_KEY]``."""
    from mtunlearn_ext.data.registry import load_benchmark

    missing = [k for k in ("benchmark", "size", "seed") if k not in meta]
    if meta.get("format") != CLI_META_FORMAT or missing:
        raise UserInputError(argument, f"a checkpoint written by `mtunlearn train` (meta format "
                             f"{CLI_META_FORMAT!r})", meta.get("format"),
                             f"its metadata lacks {missing or ['format']}")
    seed = meta["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        # int() took 1.5 for 1 and True for 1 (other data than the file names) and failed on
        # a list or None with a TypeError traceback.
        raise UserInputError(argument, "a checkpoint whose metadata seed is an integer >= 0",
                             repr(seed)[:60], "the file was not written by `mtunlearn`, or was "
                             "edited")
    from mtunlearn_ext.erasure import num_train_recorded, recorded_train_files

    root = data_root_of(meta, data_root)
    try:
        files = recorded_train_files(meta)
        erasable: dict[str, Any] = ({} if files is None else {
            "allow_erased": True, "num_train": num_train_recorded(files)})
        bench = load_benchmark(str(meta["benchmark"]), seed=int(meta["seed"]),
                               size=meta["size"], data_root=root, **erasable)
    except OSError as error:
        if data_root is not None:
            raise UserInputError("--data-root", f"a folder holding {meta.get('benchmark')!r} "
                                 "in LibMTL's layout", str(data_root), str(error)) from error
        # The hint fits a root that is gone, not a file missing inside one that is there.
        moved = ("; if the data moved, pass --data-root with its new folder"
                 if root is not None and not Path(root).is_dir() else "")
        raise UserInputError(argument, "a checkpoint whose benchmark can be loaded",
                             meta.get("benchmark"), f"{error}{moved}") from error
    except (ValueError, KeyError) as error:
        raise UserInputError(argument, "a checkpoint whose benchmark can be loaded",
                             meta.get("benchmark"), str(error)) from error
    if data_root is None:
        _check_data_unchanged(meta, bench, argument, removals=removals)
    else:
        _check_data_unchanged(meta, bench, "--data-root", root, str(data_root), removals)
    return bench


def _check_data_unchanged(meta: Mapping[str, Any], bench: Benchmark, argument: str,
                          moved_to: str | None = None, given: str | None = None,
                          removals: Sequence[Mapping[str, Any]] | None = None) -> None:
    """Refuse data read from a data root that is no longer what the checkpoint was trained on.

    Instance ids name files by number (:mod:`mtunlearn_ext.data.libmtl`): after files were
    added, removed or renumbered, a request would name other images than those the model saw,
    and its retain set would not be the training set; the ``data_sha256`` that ``train``
    stores was never compared. The test split (``val/``) is compared with ``test_data_sha256``
    when the checkpoint has it (``train`` records it since; older checkpoints are read as
    before): the test metrics and the attack's AUC are measured on it, and a changed split
    gave other numbers under the same record (``verify`` then reported 20 metric mismatches
    with no word on the data). Generated benchmarks are left alone (they are regenerated, not
    read, and carry no data root). ``moved_to``: the root ``--data-root`` gave (``given``),
    which is accepted only when its data hash to the recorded ones. With the training files'
    digests recorded, files that removals took out may have been erased
    (:func:`mtunlearn_ext.erasure.check_train_files`); they are listed in
    ``bench.info[ERASED_KEY]``."""
    root, recorded = meta.get("data_root"), meta.get("data_sha256")
    if root is None or recorded is None:
        return
    from mtunlearn_ext.erasure import ERASED_KEY, check_train_files, file_changes, first_files

    def refuse(detail: str) -> UserInputError:
        if moved_to is not None:
            return UserInputError(argument, f"a folder holding the data the checkpoint was "
                                  f"trained on (recorded under {root})", given,
                                  f"under {moved_to}: {detail}")
        return UserInputError(argument, f"a checkpoint trained on the data now under {root}",
                              meta.get("benchmark"), detail)

    erased = check_train_files(meta, bench, argument, refuse, removals)
    bench.info[ERASED_KEY] = erased
    train_why = "instance ids name files by number, so a request would name other instances"
    test_why = ("the test metrics and the attack's AUC would be measured on other data than "
                "the checkpoint's")
    for what, split, files_key, tensor_key, dataset, why in (
            ("training data", "train", TRAIN_FILES_KEY, "data_sha256", bench.train, train_why),
            ("test data (val/)", "val", TEST_FILES_KEY, "test_data_sha256", bench.test,
             test_why)):
        # By the files' digests where both sides have them (erased training files were
        # checked file by file above). The tensors read from the files are compared only for
        # a checkpoint without digests (which then names no file): their last bits follow the
        # thread count and the CPU (the resampling), and the same files read as edited data
        # under another.
        files, now_files = meta.get(files_key), bench.info.get(files_key)
        if isinstance(files, Mapping) and files and isinstance(now_files, Mapping):
            changes = [] if split == "train" and erased else file_changes(files, now_files)
            if changes:
                raise refuse(f"its {what} differ from the files recorded at training: "
                             f"{first_files(changes, split=split)} (files added, removed, "
                             f"renumbered or edited): {why}; restore the data or train again")
            continue
        expected = meta.get(tensor_key)
        if expected is None:
            continue
        now = dataset_fingerprint(dataset)
        if now == expected:
            continue
        if moved_to is not None:
            raise refuse(f"its {what} had SHA-256 {str(expected)[:16]}..., the data there "
                         f"{now[:16]}...: not the same files; {why}")
        where = " in val/" if split == "val" else ""
        raise refuse(f"its {what} had SHA-256 {str(expected)[:16]}..., the data read now "
                     f"{now[:16]}... (files added, removed, renumbered or edited{where}): "
                     f"{why}; restore the data or train again")


def check_parameter_split(model: nn.Module, task_names: Sequence[str],
                          argument: str = "model") -> None:
    """Refuse a model without a detectable shared/head split.

    The unlearners need ``model.parameter_split()`` (a shared trunk and one head per task, as a
    :class:`~mtunlearn_ext.models.MultiTaskModel` has): a plain ``nn.Sequential`` has none, so
    task-aware projections would be undefined. Raises :class:`UserInputError`.
    """
    split_fn = getattr(model, "parameter_split", None)
    if not callable(split_fn):
        raise UserInputError(argument, "a multi-task model with a shared/head split "
                             "(`parameter_split()`, e.g. an mtunlearn_ext MultiTaskModel)",
                             type(model).__name__,
                             "for your own module use mtunlearn_ext.unlearn(..., "
                             "shared_parameters=...)")
    try:
        split = split_fn()
    except RuntimeError as error:
        raise UserInputError(argument, "every parameter in exactly one of backbone / heads",
                             type(model).__name__, str(error)) from error
    missing = [t for t in task_names if t not in split.heads]
    if missing:
        raise UserInputError(argument, f"one head per task {list(task_names)}",
                             sorted(split.heads), f"no head for {missing}")
    if not split.shared:
        raise UserInputError(argument, "a non-empty shared backbone", "no shared parameter")


def check_finite_parameters(model: nn.Module, argument: str) -> None:
    """Refuse a model holding NaN/Inf parameters (it cannot be trained or unlearned)."""
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise UserInputError(argument, "finite parameters", f"NaN/Inf in {bad[:5]}")


def load_model(path: str | os.PathLike[str], argument: str = "--checkpoint",
               expected_sha256: str | None = None,
               data_root: str | os.PathLike[str] | None = None,
               removals: Sequence[Mapping[str, Any]] | None = None) -> LoadedModel:
    """Read a CLI checkpoint, rebuild its benchmark and model, and check both.

    Raises :class:`UserInputError` (wrong or damaged file, state that does not fit the
    benchmark's model, no shared/head split, non-finite parameters). ``data_root``: where the
    real data are now, when they moved since ``train``; ``removals``: those whose files may be
    erased, when not the checkpoint's own lineage's (see :func:`benchmark_from_meta`).
    """
    from mtunlearn_ext.models import build_model

    p = Path(path)
    try:
        checkpoint = load_checkpoint(p, expected_sha256=expected_sha256)
    except CheckpointError as error:
        raise UserInputError(argument, "a readable mtunlearn checkpoint", str(p),
                             str(error)) from error
    bench = benchmark_from_meta(checkpoint.meta, argument, data_root, removals)
    model = build_model(bench, seed=int(checkpoint.meta["seed"]))
    try:
        model.load_state_dict(checkpoint.state_dict)
    except RuntimeError as error:
        raise UserInputError(argument, f"weights of the {bench.name!r} model", str(p),
                             _state_dict_mismatch(error)) from error
    check_parameter_split(model, bench.train.task_names, argument)
    check_finite_parameters(model, argument)
    model.eval()
    return LoadedModel(model, checkpoint, bench, p, data_root_of(checkpoint.meta, data_root))


def _state_dict_mismatch(error: RuntimeError, width: int = 160) -> str:
    """torch's ``load_state_dict`` error on one line: its heading, then each of its findings
    (missing keys, unexpected keys, a size mismatch) cut to ``width`` characters; the heading
    alone named nothing that differs."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    shown = [line if len(line) <= width else line[:width - 3] + "..." for line in lines[1:4]]
    more = f"; and {len(lines) - 4} more" if len(lines) > 4 else ""
    return " ".join([lines[0], "; ".join(shown)]).strip() + more


# -- requests -----------------------------------------------------------------------------------

#: How many valid ids an unknown-id error shows: enough to see the pattern of sparse ids
#: (``digits`` keeps a subset of scikit-learn's rows: 3, 7, 13, ...), short enough for one line.
_IDS_SHOWN = 8
#: Where to get them all (docs/cli.md has it as a one-line command).
_LIST_IDS_HINT = "all of them: mtunlearn_ext.workflow.load_model(CKPT).benchmark.train.ids"


def _describe_ids(dataset: MultiTaskDataset, shown: int = _IDS_SHOWN) -> str:
    """The valid instance ids of ``dataset`` in a few words, for an error: how many, their
    range and the first ``shown`` of them (ids need not be contiguous)."""
    ids = sorted(dataset.ids.tolist())
    first = ", ".join(str(i) for i in ids[:shown]) + (", ..." if len(ids) > shown else "")
    return f"{len(ids)} instances in [{ids[0]}, {ids[-1]}]: {first}" if ids else "none"


def build_user_request(dataset: MultiTaskDataset, *, forget_ids: Sequence[int] | None,
                       forget_fraction: float | None, target_tasks: Sequence[str] | None,
                       request_type: str | None, seed: int
                       ) -> tuple[ForgetRequest, RequestType]:
    """The validated request and its type (``"full"`` / ``"partial"``) from user input.

    ``request_type=None`` infers it: partial when ``target_tasks`` is a proper subset of the
    tasks, full otherwise. The ids come from ``forget_ids`` or a seeded ``forget_fraction``
    (:func:`mtunlearn_ext.data.request.build_request`). Raises :class:`UserInputError` for an unknown
    task, an empty or duplicated id list, ids not in the data set, a fraction outside (0, 1), a
    partial request without target tasks or naming every task, and a request that would leave
    nothing to retain. The request's target tasks are in the data set's task order, whatever
    order ``target_tasks`` gives.
    """

    names = dataset.task_names
    if target_tasks is not None:
        unknown = [t for t in target_tasks if t not in names]
        if unknown:
            raise UserInputError("--target-tasks", f"task names among {names}", unknown,
                                 "unknown task names")
        if not target_tasks:
            raise UserInputError("--target-tasks", f"at least one of {names}", [])
        if len(set(target_tasks)) != len(target_tasks):
            raise UserInputError("--target-tasks", "distinct task names", list(target_tasks))
    if request_type is None:
        request_type = ("partial" if target_tasks is not None and set(target_tasks) != set(names)
                        else "full")
    kind = choice_of(request_type, REQUEST_TYPES)  # (the command line's text, as the type)
    if kind is None:
        raise UserInputError("--request", "'full' or 'partial'", request_type)
    if kind == "partial" and target_tasks is None:
        # build_request would target the first task: a user could forget the labels of a
        # task they never named, so the command line makes them name it.
        raise UserInputError("--target-tasks", "the target tasks of a partial request (a "
                             f"proper subset of {names})", "no --target-tasks",
                             f"a partial request concerns the named tasks only; name "
                             f"them, e.g. --target-tasks {names[0]}")
    if kind == "partial" and target_tasks is not None and set(target_tasks) == set(names):
        raise UserInputError("--target-tasks", "a proper subset of the tasks for a partial "
                             "request", list(target_tasks),
                             "it names every task; use --request full")
    if kind == "full" and target_tasks is not None and set(target_tasks) != set(names):
        raise UserInputError("--target-tasks", f"every task {names} for a full request",
                             list(target_tasks), "use --request partial")
    # The command line refuses --forget-fraction beside --forget-ids; a Python caller giving
    # both still hears of a bad fraction.
    if forget_fraction is not None and not 0.0 < float(forget_fraction) < 1.0:
        raise UserInputError("--forget-fraction", "a number in (0, 1)", forget_fraction)
    if forget_ids is not None:
        if len(forget_ids) == 0:
            raise UserInputError("--forget-ids", "at least one instance id", "an empty list")
        # Counted once: `list(ids).count(i)` per id took minutes for 100k ids (quadratic).
        dupes = sorted(i for i, n in Counter(forget_ids).items() if n > 1)
        if dupes:
            raise UserInputError("--forget-ids", "distinct ids", f"duplicates {dupes[:10]}")
        known = set(dataset.ids.tolist())
        missing = [i for i in forget_ids if i not in known]
        if missing:
            raise UserInputError("--forget-ids", f"ids of training instances "
                                 f"({_describe_ids(dataset)})",
                                 f"{len(missing)} unknown ids {missing[:10]}", _LIST_IDS_HINT)
    else:
        if forget_fraction is None or not 0.0 < float(forget_fraction) < 1.0:
            raise UserInputError("--forget-fraction", "a number in (0, 1) (or --forget-ids)",
                                 forget_fraction)
    if target_tasks is not None:
        # In the data set's order: `--target-tasks b,a` and `a,b` are one request, and must
        # give one checkpoint (its metadata and removals held them as typed).
        target_tasks = [t for t in names if t in set(target_tasks)]
    try:
        request = build_request(dataset, kind, seed, float(forget_fraction or 0.1),
                                forget_ids, target_tasks)
    except (ValueError, KeyError) as error:
        # Named by the option that chose the instances (CLI review: "request" named none).
        chosen_by = "--forget-ids" if forget_ids is not None else "--forget-fraction"
        raise UserInputError(chosen_by, "a request that leaves something to retain",
                             f"{kind} request",
                             str(error).strip("'\"")) from error
    if not bool((dataset.supervision & ~request.forget_mask(dataset)).any()):
        # validate() refuses every instance x every task; leaving out only pairs without a
        # label left an empty retain set, refused late by `unlearn` as a bad --method-config.
        raise UserInputError("--forget-ids" if forget_ids is not None else "--forget-fraction",
                             "a request that leaves something to retain", f"{kind} request",
                             "every training pair outside it is unlabelled (or removed by "
                             "an earlier request): nothing would be left to retain")
    return request, kind


def restrict_retain(retain: MultiTaskDataset, request: ForgetRequest,
                    retain_ids: Sequence[int] | None, full_train: MultiTaskDataset
                    ) -> MultiTaskDataset:
    """The retain set limited to explicit ``retain_ids`` (``None``: unchanged).

    Refuses ids shared with the forget ids (a pair cannot be both forgotten and retained; in a
    partial request the forget instances' other tasks are retained automatically), ids not in
    the training set, duplicates, and an empty list.
    """
    if retain_ids is None:
        return retain
    if len(retain_ids) == 0:
        raise UserInputError("--retain-ids", "at least one instance id", "an empty list")
    dupes = sorted(i for i, n in Counter(retain_ids).items() if n > 1)
    if dupes:  # as for --forget-ids: a repeated id is most likely a typo
        raise UserInputError("--retain-ids", "distinct ids", f"duplicates {dupes[:10]}")
    overlap = sorted(set(retain_ids) & set(request.instance_ids))
    if overlap:
        raise UserInputError("--retain-ids", "ids disjoint from --forget-ids",
                             f"{len(overlap)} overlapping ids {overlap[:10]}",
                             "an instance cannot be both forgotten and retained")
    known = set(full_train.ids.tolist())
    missing = [i for i in retain_ids if i not in known]
    if missing:
        raise UserInputError("--retain-ids", f"ids of training instances "
                             f"({_describe_ids(full_train)})",
                             f"{len(missing)} unknown ids {missing[:10]}", _LIST_IDS_HINT)
    wanted = set(retain_ids) | set(request.instance_ids)  # coupled pairs of a partial request
    rows = [p for p, i in enumerate(retain.ids.tolist()) if i in wanted]
    return retain.subset(torch.tensor(rows, dtype=torch.long))


# -- measuring ------------------------------------------------------------------------------------


def measure_kept(model: nn.Module, retain: MultiTaskDataset, test: MultiTaskDataset,
                 batch_size: int = 64) -> dict[str, Any]:
    """The part of :func:`measure` that needs no forget set: the retain and test metrics, as
    ``{"metrics": {"retain", "test"}}``. For ``verify`` once the forget instances' files were
    erased: their metrics and the attack's AUC can no longer be re-measured."""
    from mtunlearn_ext.metrics import evaluate

    return json_safe({"metrics": {
        name: evaluate(model, ds, None, batch_size)  # type: ignore[arg-type]
        for name, ds in (("retain", retain), ("test", test))}})


def measure(model: nn.Module, forget: MultiTaskDataset, retain: MultiTaskDataset,
            test: MultiTaskDataset, target_tasks: Sequence[str], seed: int,
            batch_size: int = 64) -> dict[str, Any]:
    """Per-task metrics on the forget pairs, the retain pairs and the test set, and the
    membership-inference AUC of the forget pairs (``None`` with a reason when the sets are too
    small for the attack). Deterministic for a given model, data and seed."""
    from mtunlearn_ext.metrics import evaluate, membership_attack

    metrics = {name: evaluate(model, ds, None, batch_size)  # type: ignore[arg-type]
               for name, ds in (("forget", forget), ("retain", retain), ("test", test))}
    out: dict[str, Any] = {"metrics": metrics}
    try:
        attack = membership_attack(model, retain, test, forget,  # type: ignore[arg-type]
                                   list(target_tasks), batch_size=batch_size, seed=seed)
        out["mia_auc"], out["mia_member_auc"] = attack.auc, attack.member_auc
    except ValueError as error:
        out["mia_auc"], out["mia_member_auc"], out["mia_error"] = None, None, str(error)
    return json_safe(out)


# -- guarded unlearning ---------------------------------------------------------------------------


def _can_be_non_finite(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() or tensor.is_complex()


class _FiniteGuard:
    """Step callback: after each optimizer step, the update (``.grad``) and the parameters must
    be finite. The update holds the loss's gradient, so a NaN loss shows here too. It keeps the
    number of steps done, to name the step in which a method's own check fails.

    Each step's flags stay on the device: the flags of the first step with a non-finite
    tensor are kept there, and read back only at the steps whose losses the curve recorder
    reads anyway (every ``check_every``-th and the last), so the guard adds no
    synchronisation on CUDA (reading two flags per parameter after every step did) and still
    names the first step and tensor. A run goes on at most ``check_every - 1`` steps past it.

    A tensor is finite exactly when its largest magnitude is: one ``torch._foreach_norm`` of
    order infinity over every gradient and parameter (a NaN anywhere makes the maximum NaN,
    an Inf makes it Inf; no sum that could overflow on large finite values) gives all the
    flags of a step in one multi-tensor reduction on CUDA, instead of two reductions per
    parameter.
    """

    def __init__(self, check_every: int = 1, total_steps: int | None = None) -> None:
        self.steps_done = 0
        self.check_every, self.total_steps = check_every, total_steps
        self._first_flags: torch.Tensor | None = None  # the first bad step's flags, or all True
        self._first_step: torch.Tensor | None = None  # that step (0-based), or -1
        self._model: nn.Module | None = None
        # A finite stand-in, per device and dtype, for what needs no check or cannot take an
        # infinity norm: a missing gradient, an empty tensor (a maximum over nothing has no
        # identity) and an integer or bool one (never NaN/Inf; the norm refuses its type).
        self._finite_stand_ins: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def _finite_stand_in(self, like: torch.Tensor) -> torch.Tensor:
        dtype = like.dtype if _can_be_non_finite(like) else torch.float32
        key = (like.device, dtype)
        if key not in self._finite_stand_ins:
            self._finite_stand_ins[key] = torch.zeros(1, dtype=dtype, device=like.device)
        return self._finite_stand_ins[key]

    def step_flags(self, model: nn.Module) -> torch.Tensor | None:
        """Two flags per parameter, in ``named_parameters`` order: its gradient finite (true
        without one) and itself finite; on the first parameter's device, nothing read back.
        ``None`` for a model without parameters."""
        parameters = [p for _, p in model.named_parameters()]
        if not parameters:
            return None
        checked = [tensor if tensor is not None and tensor.numel() and _can_be_non_finite(tensor)
                   else self._finite_stand_in(p) for p in parameters for tensor in (p.grad, p)]
        largest = torch._foreach_norm([t.detach() for t in checked], float("inf"))
        device = parameters[0].device
        return torch.isfinite(torch.stack([m.to(device) for m in largest]))

    def __call__(self, steps_done: int, model: nn.Module) -> None:
        self.steps_done, self._model = steps_done, model
        step = steps_done - 1
        flags = self.step_flags(model)
        if flags is None:
            return
        all_finite = flags.all()
        if self._first_flags is None or self._first_step is None:
            self._first_flags = flags
            self._first_step = torch.where(all_finite, -1, step)
        else:
            keep = self._first_step >= 0
            self._first_flags = torch.where(keep, self._first_flags, flags)
            self._first_step = torch.where(keep | all_finite, self._first_step,
                                           torch.full_like(self._first_step, step))
        if step % self.check_every == 0 or steps_done == self.total_steps:
            self.raise_if_diverged()

    def first_bad_step(self) -> int | None:
        """The first step (0-based) after which a gradient or parameter was NaN/Inf, if any."""
        if self._first_step is None:
            return None
        step = int(self._first_step.item())
        return None if step < 0 else step

    def raise_if_diverged(self) -> None:
        """:class:`NonFiniteError` naming the first bad step and tensor, if there was one."""
        step = self.first_bad_step()
        if step is None:
            return
        assert self._first_flags is not None and self._model is not None
        model = self._model
        names = [f"{kind} {name}" for name, _ in model.named_parameters()
                 for kind in ("gradient of", "parameter")]
        where = names[self._first_flags.tolist().index(False)]
        # The parameters were finite when the run began (a checkpoint with NaN/Inf ones is
        # refused as input): this is the run diverging, and the settings are what to change.
        raise NonFiniteError(step, f"{where}; lower `lr` or `steps` in --method-config, or "
                                   "keep `grad_clip` on")


def checked_unlearner(method: str, settings: Mapping[str, Any]) -> Unlearner:
    """The registered ``method`` configured with ``settings``; an unknown method or settings
    it refuses (their types and ranges; nothing that needs the problem) raise
    :class:`UserInputError` naming ``--method`` / ``--method-config``."""
    from mtunlearn_ext.unlearning import available_unlearners, get_unlearner

    if method not in available_unlearners():
        raise UserInputError("--method", f"one of {available_unlearners()}", method,
                             UNKNOWN_METHOD_HINT)
    with _as_settings_error(method, settings):
        return get_unlearner(method, dict(settings))


@contextlib.contextmanager
def _as_settings_error(method: str, settings: Mapping[str, Any]) -> Iterator[None]:
    try:
        yield
    except (TypeError, ValueError, KeyError) as error:
        raise UserInputError("--method-config", f"valid settings of {method!r}",
                             dict(settings),
                             str(error.args[0] if isinstance(error, KeyError) else error)
                             ) from error


def _explained_run_error(error: Exception, unlearner: Unlearner, guard: _FiniteGuard,
                         method: str, settings: Mapping[str, Any]) -> Exception | None:
    """The user-facing error a method's failure stands for, or ``None`` for a bug (kept as is,
    with its traceback)."""
    from mtunlearn_ext.unlearning import GradientUnlearner

    step_based = isinstance(unlearner, GradientUnlearner)
    if isinstance(error, FloatingPointError):
        # A method's own check (the surgery ops refuse NaN/Inf gradients) stops it inside a
        # step, before the guard's callback: the same policy and exit status.
        # The op's advice to its caller (check_finite=False) is no option of a run's.
        where = str(error).replace("; pass finite values (or check_finite=False to let them "
                                   "propagate)", "")
        return NonFiniteError(guard.steps_done if step_based else None, where)
    if isinstance(error, ValueError) and step_based and guard.steps_done == 0:
        # Refused before the first step: the method's setup found the request and settings
        # do not fit (a capped objective whose task the request leaves no retain pair of,
        # say); a user's input, said in one line, not a traceback. Later ones are bugs.
        return UserInputError("--method-config", f"settings of {method!r} that fit this "
                              "request", dict(settings), str(error))
    return None


def run_unlearning(problem: UnlearningProblem, method: str,
                   settings: Mapping[str, Any]) -> UnlearningResult:
    """Run the registered ``method`` with ``settings`` on ``problem`` under the NaN/Inf guard.

    Step-based methods are checked after every step (read back at their logged steps:
    :class:`_FiniteGuard`); every method's result is checked at the
    end (parameters and the recorded loss curves). Bad settings raise :class:`UserInputError`
    naming ``--method-config``; a non-finite value raises :class:`NonFiniteError`.
    """
    from mtunlearn_ext.unlearning import GradientUnlearner

    unlearner = checked_unlearner(method, settings)
    with _as_settings_error(method, settings):
        unlearner.check_problem(problem)  # settings that name what the problem lacks
    config = unlearner.config
    guard = _FiniteGuard(getattr(config, "log_every", 1),
                         getattr(config, "steps", 0) + getattr(config, "head_refit_steps", 0))
    if isinstance(unlearner, GradientUnlearner):
        unlearner.step_callbacks.append(guard)
    try:
        result = unlearner.unlearn(problem)
    except NonFiniteError:
        raise
    except Exception as error:
        # A step after the first non-finite one, not yet read back, failed on its NaN (an
        # op's own check, a solver): the first one is what went wrong.
        guard.raise_if_diverged()
        explained = _explained_run_error(error, unlearner, guard, method, settings)
        if explained is None:
            raise
        raise explained from error
    guard.raise_if_diverged()  # flags of steps after the last read (none if it was)
    for name, p in result.model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise NonFiniteError(result.report.steps, f"parameter {name} after the run")
    for curve, values in result.report.curves.items():
        for k, v in enumerate(values):
            if curve.split("/")[0] in ("forget_loss", "retain_loss") and not math.isfinite(v):
                step = result.report.curve_steps.get(curve, [k] * (k + 1))[k]
                raise NonFiniteError(step, f"loss curve {curve!r}")
    return result


# -- outputs ------------------------------------------------------------------------------------


#: How often :meth:`OutputTransaction.write` makes an output's folders again when a concurrent
#: run removed them (empty, as its own rollback) just before the write.
_FOLDER_RACE_ATTEMPTS = 3

#: Outputs of the transactions that completed in this process, in order: what an interrupt
#: arriving after them (while the command prints its summary) leaves, written in full. The
#: command line clears it when a command starts.
COMMITTED_OUTPUTS: list[Path] = []


@dataclass
class OutputTransaction:
    """All-or-nothing outputs of one command.

    ``reserve`` checks up front that every output path is new, distinct, none of the inputs,
    and one that can be created: in a folder (or where one can be made) the user can write to,
    with names the file system takes (at most ``PC_NAME_MAX`` bytes each) and no NUL byte. So a
    run fails before doing any work rather than after. Files created through :meth:`write` are
    deleted again if the block exits with any exception, including ``KeyboardInterrupt`` and
    the ``SystemExit`` the CLI raises on SIGTERM, and so are the folders their writes made, when
    left empty; a write failing with an ``OSError`` (disk
    full, ...) is a :class:`UserInputError` naming the output's argument. Inputs are never
    touched.
    """

    outputs: dict[str, Path] = field(default_factory=dict)
    inputs: list[Path] = field(default_factory=list)
    _created: list[Path] = field(default_factory=list)
    #: Folders missing before a write (which makes them): removed again, when empty, with the
    #: files (a failed command left `--output new/sub/o.pt`'s empty folders behind).
    _made_folders: list[Path] = field(default_factory=list)
    _committed: bool = False
    #: The files this transaction's writes put in place (path -> device and inode).
    _placed: dict[str, Placement] = field(default_factory=dict)
    #: Outputs whose path is a default made from another option (argument -> that option).
    _default_of: dict[str, str] = field(default_factory=dict)

    def reserve(self, argument: str, path: str | os.PathLike[str], *,
                default_of: str | None = None) -> Path:
        """Check ``path`` as the output of ``argument`` (see the class) and keep it.

        ``default_of``: the option ``path`` was made from when ``argument`` was not given
        (``--output`` for the record beside it). An error about the path then names that
        option and says the path is ``argument``'s default: blaming ``argument`` alone named
        an option the user never gave, with no word of how to get out of the way."""
        if default_of is not None:
            self._default_of[argument] = default_of
        try:
            return self._reserve(argument, path)
        except UserInputError as error:
            raise self._blamed(argument, error) from None

    def _blamed(self, argument: str, error: UserInputError, advice: bool = True
                ) -> UserInputError:
        """``error`` about ``argument``'s path, reworded when that path is a default made from
        another option (:meth:`reserve`'s ``default_of``); ``advice``: whether another name
        is the way out (not for a disk that is full)."""
        source = self._default_of.get(argument)
        if source is None:
            return error
        way_out = f": pass {argument}, or choose another {source}" if advice else ""
        return type(error)(  # an OutputTakenError stays one
            source, error.expected, error.received,
            (f"{error.hint}; " if error.hint else "") + f"the file is {argument}'s default, "
            f"named after {source} ({argument} was not given){way_out}")

    def _reserve(self, argument: str, path: str | os.PathLike[str]) -> Path:
        p = Path(path)
        if "\0" in str(p):
            raise UserInputError(argument, "a file path", str(p), "it holds a NUL byte")
        given = os.fspath(path)
        if given.endswith(("/", os.sep)) or p.name in ("", ".", ".."):
            # Path() drops a trailing separator: "newdir/" would become a file named newdir.
            raise UserInputError(argument, "a file path", given,
                                 "it names a folder; give the file's name too (newdir/out.pt)")
        resolved = p.resolve()
        for inp in self.inputs:
            if resolved == inp.resolve():
                raise UserInputError(argument, "a new file, not an input", str(p),
                                     "outputs never overwrite inputs")
        for other_arg, other in self.outputs.items():
            if resolved == other.resolve():
                raise UserInputError(argument, f"a path different from {other_arg}", str(p))
        if os.path.lexists(p):  # a dangling symbolic link too: writing would follow it
            raise UserInputError(argument, "a path that does not exist yet", str(p),
                                 "refusing to overwrite" + (
                                     "" if argument in self._default_of
                                     else "; choose a new path"))
        _check_creatable(argument, p)
        self.outputs[argument] = p
        return p

    def release(self, argument: str) -> None:
        """Give up ``argument``'s reserved path before anything was written to it (a default
        name another run took meanwhile), so that :meth:`reserve` can keep another."""
        self.outputs.pop(argument, None)
        self._default_of.pop(argument, None)

    def commit(self) -> None:
        """The outputs are complete (the last of them, a record, is the commit marker): they
        stay even if the block then exits with an exception (an interrupt while the summary is
        printed), and the command's interrupt message says so. Call it with interrupts held
        around the last write (:func:`~mtunlearn_ext._io.interrupts_held`), so that a reader
        never sees a complete record that is then rolled back."""
        if not self._committed:
            self._committed = True
            COMMITTED_OUTPUTS.extend(self._created)

    def write(self, path: Path, writer: Callable[[Path], str]) -> str:
        """``writer(path)`` (an atomic, no-overwrite write returning a SHA-256), with ``path``
        deleted again if the block fails later. It is registered *before* the write, so an
        interrupt between the final rename and the return still removes it; a write refused
        because the file already exists un-registers it (that file is not ours) and is an
        :class:`OutputTakenError` naming the output's argument (the file appeared during the
        run, e.g. written by a concurrent run; a caller writing a default name takes the
        next). Any other ``OSError`` of the write becomes a :class:`UserInputError` naming the
        output's argument (one line on the command line, exit 2). The output's missing folders
        are made here, and only those this write made are removed on rollback; a folder a
        concurrent run removes just before the write is made again (a few times)."""
        self._created.append(path)
        argument = next((a for a, p in self.outputs.items() if p == path), "output")
        folder = path.absolute().parent
        try:
            with placements(self._placed):
                for _ in range(_FOLDER_RACE_ATTEMPTS - 1):
                    self._make_folders(folder)
                    try:
                        return writer(path)
                    except FileNotFoundError:
                        # A concurrent run that made a folder this path shares, and then
                        # failed, removed it again (empty) between our making sure of it and
                        # our write.
                        if os.path.isdir(folder):
                            raise
                self._make_folders(folder)
                return writer(path)
        except FileExistsError as error:
            self._created.remove(path)
            # reserve() found the path free: something else made it since (another run
            # writing the same default name, say).
            taken = OutputTakenError(
                argument, "a path that does not exist yet", str(path),
                "the file appeared during the run (another run writing the same name?); this "
                "run wrote nothing: run it again"
                + ("" if argument in self._default_of else f" or choose another {argument}"))
            raise self._blamed(argument, taken) from error
        except OSError as error:
            raise self._blamed(argument, UserInputError(
                argument, "a path that can be written", str(path),
                f"{error.strerror or error}; nothing was written"), advice=False) from error

    def _make_folders(self, folder: Path) -> None:
        """Make ``folder`` and its missing parents one by one, recording only those this call
        made: a folder another run made meanwhile (``FileExistsError``) is theirs, and stays
        when this transaction rolls back."""
        missing = []
        while not os.path.lexists(folder) and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        for made in reversed(missing):
            # Recorded first (as a file is): an interrupt as mkdir returns still removes it.
            self._made_folders.append(made)
            try:
                os.mkdir(made)
            except FileExistsError:
                self._made_folders.pop()

    def __enter__(self) -> OutputTransaction:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None or self._committed:
            self.commit()
            return
        # Every path is tried: one that cannot be removed (or never existed, or whose name the
        # file system refuses) must not keep the others, written before it, in place. Only
        # the files this run put there: where its write failed before the link, the name may
        # be a concurrent run's finished output.
        for path in reversed(self._created):
            remove_if_placed(path, self._placed)
        # Deepest first; a folder that holds anything (another process's file) stays.
        for folder in sorted(set(self._made_folders), key=lambda f: len(f.parts), reverse=True):
            try:
                folder.rmdir()
            except OSError:
                pass


def _check_creatable(argument: str, p: Path) -> None:
    """Refuse an output path that cannot be created: under a file, in a folder the user cannot
    write to, or with a name longer than the file system takes (``PC_NAME_MAX`` bytes, checked
    for every part still to be created; the temporary file written beside it is shortened to
    fit, :func:`~mtunlearn_ext._io.temporary_file_beside`)."""
    absolute = p.absolute()
    existing = next((parent for parent in absolute.parents if os.path.lexists(parent)),
                    Path(absolute.anchor))
    if not existing.is_dir():
        raise UserInputError(argument, "a path in a folder", str(p),
                             f"{str(existing)!r} is a file, not a folder")
    limit = name_max(existing)
    for part in absolute.relative_to(existing).parts:
        size = len(os.fsencode(part))
        if size > limit:
            raise UserInputError(argument, f"file and folder names of at most {limit} bytes "
                                 "(the file system's limit)", str(p),
                                 f"{part[:24]!r}... has {size} bytes; choose a shorter name")
    # The whole path too (the run would fail at its very end otherwise), with room for the
    # temporary file beside the output: `.{name}.{8 random}{suffix}`, within the name limit.
    temporary = min(limit, len(os.fsencode(absolute.name)) + 24)
    longest = max(len(os.fsencode(str(absolute))),
                  len(os.fsencode(str(absolute.parent))) + 1 + temporary)
    path_limit = path_max(existing)
    if longest >= path_limit:
        raise UserInputError(argument, f"a path shorter than {path_limit} bytes (the system's "
                             "limit, with room for the temporary file written beside it)",
                             str(p)[:64] + "...", f"it has {len(os.fsencode(str(absolute)))} "
                             "bytes; choose a shorter path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(argument, "a path in a folder you can write to", str(p),
                             f"{str(existing)!r} is not writable")
    # os.access answers for the permission bits, which root bypasses: a folder no one can
    # write to (/proc, a read-only bind mount, an immutable folder, root squashed on NFS)
    # passed as root and failed only after the run. A file made and removed at once tells.
    try:
        handle, probe = tempfile.mkstemp(prefix=".mtunlearn-write-check-", dir=existing)
    except OSError as error:
        raise UserInputError(argument, "a path in a folder you can write to", str(p),
                             f"{str(existing)!r} is not writable (making a file there "
                             f"failed: {error.strerror or type(error).__name__})") from None
    os.close(handle)
    os.unlink(probe)
