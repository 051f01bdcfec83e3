"""What the commands print: lines with the user's text's control characters shown as escapes,
the aligned summary tables, the metric rows and notes that ``unlearn`` and ``evaluate`` end
with, and the library's warnings as the command's own ``mtunlearn: warning: ...`` lines."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from mtunlearn_ext._text import display_width, pad_to, visible_controls
from mtunlearn_ext._warnings import MtUnlearnRuntimeWarning, MtUnlearnWarning


def _say(*parts: object, **print_options: Any) -> None:
    """``print``, with the control characters of the text (but its line breaks) shown as
    escapes: task names, paths and a record's fields are the user's, or whoever wrote the
    record's, and an ESC or CR in one would recolour, clear or overwrite the terminal."""
    print(*(visible_controls(str(part), keep="\n") for part in parts), **print_options)


def _shown(path: object) -> str:
    """A path for a line that :func:`_say` prints: its line breaks shown as escapes too (a
    record's checkpoint path ``u\\n.pt`` split the ``verified:`` line in two)."""
    return visible_controls(str(path))


def _table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """An aligned plain-text table (the end-of-command summary). A cell's control characters
    are shown as escapes: a line break in a name would break its row, an escape sequence would
    be obeyed and count towards the width although it takes no column. Columns are aligned by
    the terminal columns a cell takes (a CJK name takes two a character)."""
    cells = [[visible_controls(str(h)) for h in headers]] + [
        [visible_controls(_fmt(c)) for c in r] for r in rows]
    widths = [max(display_width(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(pad_to(c, w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def _metric_rows(before: Mapping[str, Any] | None, after: Mapping[str, Any]
                 ) -> list[list[object]]:
    """Rows ``split, task, metric, before, after`` of the primary metrics, and the MIA AUC of
    the forget split when there is one (``evaluate`` without a request has none)."""
    from mtunlearn_ext.experiment import PRIMARY_METRIC

    rows: list[list[object]] = []
    for split, tasks in after["metrics"].items():
        for task, values in tasks.items():
            name = next((m for m in PRIMARY_METRIC.values() if m in values), None)
            if name is None:
                name = sorted(values)[0]
            prev = (before or {}).get("metrics", {}).get(split, {}).get(task, {}).get(name)
            rows.append([split, task, name, prev, values.get(name)])
    if "forget" in after["metrics"] or "mia_auc" in after:
        rows.append(["forget", "*", "mia_auc", (before or {}).get("mia_auc"),
                     after.get("mia_auc")])
        # How well the attack tells training members from unseen data at all: without it the
        # forget set's AUC was read as a verdict where the attack was at chance.
        if "mia_member_auc" in after:
            rows.append(["retain", "*", "mia_member_auc", (before or {}).get("mia_member_auc"),
                         after.get("mia_member_auc")])
    return rows


def _attack_notes(after: Mapping[str, Any]) -> list[str]:
    """Why the table's ``mia_auc`` is ``-`` (the record's ``mia_error``, seen nowhere else), and
    whether the attack works at all on this model (its member AUC)."""
    from mtunlearn_ext.metrics.membership import attack_at_chance

    notes = []
    if after.get("mia_auc") is None and after.get("mia_error"):
        notes.append(f"mia_auc not measured: {after['mia_error']}")
    member = after.get("mia_member_auc")
    if attack_at_chance(member):
        notes.append(f"note: the attack tells training members from unseen data no better than "
                     f"chance here (mia_member_auc {member:.2f}), so its forget-set AUC says "
                     "nothing about forgetting")
    return notes


def _retain_note(split: Mapping[str, Any]) -> str:
    """One line on the retain split the metrics were measured on: its size, and whether
    ``--retain-ids`` limited it (then the retain metrics describe those instances only)."""
    ids = split.get("retain_ids")
    size = f"{split.get('pairs')} pairs of {split.get('instances')} instances"
    excluded = split.get("earlier_removals_excluded")
    earlier = (f"; {excluded} pairs removed by earlier requests kept out"
               if isinstance(excluded, int) and excluded else "")
    return (f"retain split: {size}, limited by --retain-ids to {len(ids)} instances (the retain "
            f"metrics describe these only){earlier}" if ids is not None
            else f"retain split: {size} (every training pair outside the request{earlier})")


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    # The package's own categories are shown as the standard ones they extend, as before
    # they existed: users read "warning (RuntimeWarning)", not the class's name.
    shown = (RuntimeWarning if issubclass(category, MtUnlearnRuntimeWarning)
             else UserWarning if issubclass(category, MtUnlearnWarning) else category)
    kind = "" if shown is UserWarning else f" ({shown.__name__})"
    _say(f"mtunlearn: warning{kind}: {message}", file=sys.stderr if file is None else file)
