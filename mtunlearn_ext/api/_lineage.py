"""Chains of removals: the requests already removed from a model (carried by a
module that :func:`~mtunlearn_ext.unlearn` returned, or named by ``earlier_requests``), whose
pairs stay out of every later retain set."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mtunlearn_ext._warnings import warn_at_caller
from mtunlearn_ext.api._data_forms import check_request_ids
from mtunlearn_ext.api._entry import entry
from mtunlearn_ext.data.base import MultiTaskDataset
from mtunlearn_ext.data.request import ForgetRequest


@dataclass(frozen=True)
class Lineage:
    """What :func:`unlearn` removed from a model it returned, kept on that module (an
    attribute, so that ``copy.deepcopy`` and pickling keep it too; ``state_dict`` does not).

    ``requests`` name instances by the ids of the ``train_data`` they were made on:
    ``own_ids`` whether those are the data set's own ids (else row positions, which name the
    same instances only in data of the same ``num_rows``). ``complete`` is False once a run
    given ``forget_data`` removed pairs that no ``train_data`` id names."""

    requests: tuple[ForgetRequest, ...]
    complete: bool = True
    own_ids: bool = True
    num_rows: int = 0


#: The attribute of a returned module that holds its :class:`Lineage`.
LINEAGE_ATTRIBUTE = "_mtunlearn_lineage"


def carried_lineage(model: nn.Module) -> Lineage | None:
    carried = model.__dict__.get(LINEAGE_ATTRIBUTE)
    return carried if isinstance(carried, Lineage) else None


def _checked_requests(given: object, forget_data_given: bool) -> tuple[ForgetRequest, ...]:
    """``earlier_requests`` as given, checked."""
    if isinstance(given, ForgetRequest) or not isinstance(given, Sequence):
        raise TypeError(f"{entry()}: `earlier_requests` must be a list of ForgetRequests "
                        f"(the requests already removed from `model`), got "
                        f"{type(given).__name__}")
    for i, request in enumerate(given):
        if not isinstance(request, ForgetRequest):
            raise TypeError(f"{entry()}: `earlier_requests[{i}]` must be a ForgetRequest, "
                            f"got {type(request).__name__}")
    if given and forget_data_given:
        raise ValueError(f"{entry()}: `earlier_requests` names instances of `train_data`; with "
                         "`forget_data` and `retain_data` the retain set is what you give: "
                         "leave the pairs removed earlier out of `retain_data`")
    return tuple(given)


def _request_key(request: ForgetRequest) -> tuple[tuple[int, ...], tuple[str, ...] | None]:
    tasks = None if request.target_tasks is None else tuple(sorted(request.target_tasks))
    return tuple(sorted(request.instance_ids)), tasks


def requests_removed_before(model: nn.Module, given: Sequence[ForgetRequest] | None,
                      forget_data_given: bool) -> tuple[tuple[ForgetRequest, ...], bool]:
    """The requests already removed from ``model``, and whether they came from ``model``
    itself (:class:`Lineage`) rather than ``earlier_requests``. Given, the list replaces what
    the model carries (a warning names the carried requests it leaves out)."""
    carried = carried_lineage(model)
    if given is not None:
        requests = _checked_requests(given, forget_data_given)
        if carried is not None:
            named = {_request_key(r) for r in requests}
            dropped = [r for r in carried.requests if _request_key(r) not in named]
            if dropped:
                warn_at_caller(f"{entry()}: `earlier_requests` replaces the "
                               f"{len(carried.requests)} "
                               f"request(s) `model` carries from the unlearn() that returned it; "
                               f"{len(dropped)} of them are not in it, so their pairs are in the "
                               f"retain set again")
        return requests, False
    if carried is None:
        return (), False
    if not carried.complete and not forget_data_given:
        warn_at_caller(f"{entry()}: `model` comes from an unlearn() given `forget_data`, whose "
                       "instances `train_data` cannot name: the pairs that run removed are in "
                       "`train_data`'s retain set again unless you pass them as "
                       "`earlier_requests`" + (f" (the {len(carried.requests)} request(s) on "
                                               "`train_data` before it are kept out)"
                                               if carried.requests else ""))
    if carried.requests and forget_data_given:
        warn_at_caller(f"{entry()}: `model` was returned by unlearn() after "
                       f"{len(carried.requests)} request(s) on `train_data`; with `forget_data` "
                       f"and `retain_data` they cannot be checked: leave the pairs they removed "
                       f"out of `retain_data`")
    return carried.requests, True


def check_carried_fits(carried: Lineage | None, full: MultiTaskDataset, own_ids: bool) -> None:
    """Refuse a ``train_data`` in which the requests ``model`` carries name other instances:
    row positions of data with another number of rows (rows dropped or added since), or the
    other kind of ids."""
    if carried is None or not carried.requests:
        return
    if carried.own_ids != own_ids or (not own_ids and carried.num_rows != len(full)):
        made = ("the ids of a data set" if carried.own_ids
                else f"row positions of a `train_data` of {carried.num_rows} rows")
        now = "ids of its own" if own_ids else f"{len(full)} rows named by position"
        raise ValueError(f"{entry()}: `model` carries {len(carried.requests)} earlier request(s) "
                         f"naming instances by {made}, and this `train_data` has {now}: the "
                         f"same numbers would name other instances; pass the earlier requests "
                         f"in this data's terms as `earlier_requests` (or give the data the "
                         f"ids it had: a MultiTaskDataset keeps its ids when rows are dropped)")


def without_earlier_removals(full: MultiTaskDataset, earlier: Sequence[ForgetRequest],
                              given: object, own_ids: bool, carried: bool
                              ) -> tuple[MultiTaskDataset, int]:
    """``full`` with the pairs ``earlier`` removed marked unsupervised (never trained on
    again, nor forgotten twice), and how many pairs that took out. A data set's own ids that
    it no longer holds are instances dropped since (their data erased): nothing of them is
    left to keep out. Row positions must all exist (:func:`check_carried_fits`)."""
    removed = torch.zeros_like(full.supervision)
    present = set(full.ids.tolist())
    for i, request in enumerate(earlier):
        where = (f"the requests `model` carries (from the unlearn() that returned it), request "
                 f"{i}" if carried else f"`earlier_requests[{i}]`")
        if own_ids:
            kept = [j for j in request.instance_ids if j in present]
            if not kept:
                continue
            request = ForgetRequest(tuple(kept), request.target_tasks)
        else:
            check_request_ids(request, full, given, own_ids, where)
        try:
            removed |= request.forget_mask(full)
        except (KeyError, ValueError) as error:
            detail = error.args[0] if error.args else error  # a KeyError's str() is quoted
            raise type(error)(f"{entry()}: {where}: {detail}") from None
    return full.with_supervision(full.supervision & ~removed), int(removed.sum())
