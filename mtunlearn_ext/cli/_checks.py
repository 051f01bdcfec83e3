"""Checks of arguments that more than one command takes: a JSON object given as text or as a
file (``--train``, ``--method-config``), the seed's range, and ``--forget-fraction`` beside
``--forget-ids``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mtunlearn_ext._errors import UserInputError
from mtunlearn_ext._random import MAX_RUN_SEED
from mtunlearn_ext._text import without_digit_limit_advice


def _json_arg(text: str | None, argument: str) -> dict[str, Any]:
    from mtunlearn_ext._io import DuplicateKeyError, unique_keys
    from mtunlearn_ext.workflow import is_existing_file

    if text is None or text == "":
        return {}
    try:
        from_file = is_existing_file(text)
        raw = Path(text).read_text(encoding="utf-8") if from_file else text
    except (OSError, UnicodeDecodeError) as error:
        raise UserInputError(argument, "a JSON object or a readable file holding one", text,
                             str(error)) from error
    try:
        value = json.loads(raw, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as error:
        stripped = text.strip()
        if not stripped.startswith(("{", "[", '"')) and not from_file and (
                stripped.lower().endswith((".json", ".yaml", ".yml", ".txt")) or "/" in stripped):
            # A file name that names no file: "Expecting value: line 1 column 1" said nothing of it.
            raise UserInputError(argument, "a JSON object or a readable file holding one", text,
                                 "no such file") from None
        raise UserInputError(argument, "a JSON object or a file holding one", text,
                             str(error)) from error
    except DuplicateKeyError as error:  # json keeps the last of two equal keys, without a word
        raise UserInputError(argument, "a JSON object with each key once", text,
                             f"key {error.args[0]!r} is given twice") from None
    except RecursionError:
        raise UserInputError(argument, "a JSON object or a file holding one", text,
                             "nested too deeply to read") from None
    except ValueError as error:  # an integer past Python's 4300 digits (not a JSONDecodeError)
        raise UserInputError(argument, "a JSON object or a file holding one", text,
                             without_digit_limit_advice(error)) from None
    if not isinstance(value, dict):
        raise UserInputError(argument, "a JSON object", type(value).__name__)
    return value


def _check_seed(seed: int | None) -> None:
    """Seeds are integers in ``[0, MAX_RUN_SEED]``, the range every generator the commands seed
    takes (a larger one would fail deep inside, blamed on another argument)."""

    if seed is not None and seed < 0:
        raise UserInputError("--seed", "an integer >= 0", seed)
    if seed is not None and seed > MAX_RUN_SEED:
        raise UserInputError("--seed", "an integer in [0, 2**32-1]", seed,
                             f"numpy/scikit-learn seeds are 32-bit (at most {MAX_RUN_SEED})")


def _forget_fraction(given: float | None, forget_ids: object, *, default: float | None
                     ) -> float | None:
    """``--forget-fraction`` as the run uses it: refused beside ``--forget-ids`` (which name
    the instances: a fraction there was ignored, silently), else as given or ``default``."""

    if given is not None and forget_ids is not None:
        raise UserInputError("--forget-fraction", "no share of instances to draw when "
                             "--forget-ids names them", given,
                             "give one of --forget-ids and --forget-fraction")
    return default if given is None and forget_ids is None else given
