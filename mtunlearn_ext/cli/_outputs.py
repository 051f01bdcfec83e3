"""What ``unlearn`` names and records of its outputs: the default output names beside the
input (``<stem>.<method>.pt``, numbered along a chain of requests, lettered for a branch), the
next free name when another run took one, the newer checkpoints of a chain, and the request's
fields as records and ``evaluate``'s JSON give them."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mtunlearn_ext._errors import OutputTakenError, UserInputError


def _default_outputs(checkpoint: Path, method: str) -> tuple[Path, Path]:
    """``<stem>.<method>.pt`` / ``<stem>.<method>.record.json`` beside the input. An input
    named so by this method, ``<stem>.<method>[-k].pt`` (a chained request on the previous
    output), gives ``<stem>.<method>-<k+1>.pt``: appending the method to the whole name again
    made a chain's names grow by its length each request, past the file system's 255 bytes at
    the 13th with ``interference_aware``. The number is the request's place in its chain; where
    that name is taken (a rerun, or a request on an older checkpoint of a chain), a letter
    follows it, ``-<k>b``, ``-<k>c``, ...: taking the next free number instead named a first
    request on the original ``-4`` beside a chain's third, the name that looks newest although
    its lineage holds none of the chain's removals."""

    if checkpoint.name in ("", ".", ".."):  # "." or "/": no name to put the outputs beside
        raise UserInputError("--checkpoint", "a checkpoint file", str(checkpoint),
                             "it names a folder")
    stem, place = _chained_stem(checkpoint.stem, method)
    for branch in range(10_000):
        tag = _chain_tag(method, place, branch)
        ckpt = checkpoint.with_name(f"{stem}.{tag}.pt")
        rec = checkpoint.with_name(f"{stem}.{tag}.record.json")
        # lexists: False (not an OSError) for a name too long for the file system, which
        # reserve() then refuses, naming the argument.
        if not os.path.lexists(ckpt) and not os.path.lexists(rec):
            return ckpt, rec
    raise FileExistsError(f"no free output name beside {checkpoint}")


#: How many default names one unlearn run tries before giving up: each one lost was taken by
#: another run that finished its checkpoint meanwhile, so this bounds the overlapping runs.
_DEFAULT_NAME_ATTEMPTS = 100


def _write_at_free_name(tx: Any, args: argparse.Namespace, checkpoint: Path, out_ckpt: Path,
                        out_rec: Path, write_checkpoint: Callable[[Path], str]
                        ) -> tuple[Path, Path, str]:
    """Write the unlearned checkpoint at ``out_ckpt``; return ``(checkpoint path, record
    path, SHA-256)``. Where ``out_ckpt`` is the default name and another run (the same
    request retried, another request on the same input) wrote that name after this run chose
    it, the checkpoint goes to the next free default name, with the record beside it unless
    ``--record`` named it: both runs keep their outputs, as when they run one after the other.
    A name given with ``--output`` is never changed (the run fails and writes nothing)."""

    for _ in range(_DEFAULT_NAME_ATTEMPTS - 1):
        try:
            return out_ckpt, out_rec, tx.write(out_ckpt, write_checkpoint)
        except OutputTakenError:
            if args.output is not None:
                raise
        # Names are chosen again from the first: the one lost is taken now, and the next
        # number may be too (a third run).
        default_ckpt, default_rec = _default_outputs(checkpoint, args.method)
        tx.release("--output")
        out_ckpt = tx.reserve("--output", default_ckpt)
        if args.record is None:
            tx.release("--record")
            out_rec = tx.reserve("--record", default_rec)
    return out_ckpt, out_rec, tx.write(out_ckpt, write_checkpoint)


def _branch_letters(branch: int) -> str:
    """``b`` for 1, ``c`` for 2, ... ``z`` for 25, then ``ba``, ``bb``, ...: base 26 in
    letters, never starting with ``a`` (so that no two branches read alike)."""
    letters = ""
    while branch:
        branch, digit = divmod(branch, 26)
        letters = chr(ord("a") + digit) + letters
    return letters


def _later_in_chain(checkpoint: Path, method: str) -> tuple[Path, Path] | None:
    """Where a request on ``checkpoint`` was made before (the default output name of its next
    place is taken): that name and the newest place of the chain beside it, else ``None``.
    A request on a superseded checkpoint trains on what the later ones removed (docs/cli.md:
    "always start a request from the newest checkpoint"), which nothing said. Only the main
    chain's names tell a checkpoint's successor: a branch (``-1b``) continues as ``-2b``, whose
    next place ``-2`` is the main chain's, not the branch's, so a branch input is not judged."""
    stem, place = _chained_stem(checkpoint.stem, method)
    tag = checkpoint.stem.rpartition(f".{method}")[2]
    if place > 1 and tag.startswith("-") and not tag[1:].isdigit():  # "-2b": a branch
        return None

    def at(k: int) -> Path:
        return checkpoint.with_name(f"{stem}.{_chain_tag(method, k)}.pt")

    if not os.path.lexists(at(place)):
        return None
    newest = place
    while os.path.lexists(at(newest + 1)):
        newest += 1
    return at(place), at(newest)


def _chain_tag(method: str, place: int, branch: int = 0) -> str:
    """The tag of a chain's default output name: ``<method>`` at place 1, ``<method>-<k>``
    after it, a branch's letters after its place (``<method>-<k>b``)."""
    if branch:
        return f"{method}-{place}{_branch_letters(branch)}"
    return method if place == 1 else f"{method}-{place}"


def _chained_stem(stem: str, method: str) -> tuple[str, int]:
    """``(stem, 1)``, or for a stem that :func:`_default_outputs` gave with this method,
    ``<base>.<method>`` or ``<base>.<method>-<k>[letters]``: ``(base, k + 1)``, the place
    after it."""
    base, dot, tag = stem.rpartition(f".{method}")
    if not dot or not base:
        return stem, 1
    if tag == "":
        return base, 2
    number = tag.removeprefix("-").rstrip("abcdefghijklmnopqrstuvwxyz")
    letters = tag.removeprefix("-")[len(number):]
    # "-2" or "-2b", not "-02", "-x" or "-2a": only the names this function writes continue a
    # chain.
    if (tag.startswith("-") and number.isascii() and number.isdigit() and number[0] != "0"
            and not letters.startswith("a")):
        return base, int(number) + 1
    return stem, 1


def _request_fields(request: Any, request_type: str, targets: Sequence[str],
                    forget_ids: Sequence[int] | None, fraction: float | None,
                    seed: int) -> dict[str, Any]:
    """A request as records and ``evaluate``'s JSON give it: type, ids, their hash, resolved
    target tasks, and whether the ids were named by the user or drawn by the tool (a random
    share: said, since a removal record must show who chose what was removed)."""
    return {"type": request_type, "instance_ids": list(request.instance_ids),
            "ids_sha256": request.ids_hash(), "target_tasks": list(targets),
            "ids_drawn": (None if forget_ids is not None else
                          {"fraction": fraction, "seed": seed})}
