"""Markdown reports with PNG plots from experiment results or an unlearning record.

Two inputs are understood:

- experiment results (``python -m mtunlearn_ext.experiment``, schema ``mtunlearn_ext.experiment/1``):
  one bar chart per split of every model's primary metric per task, with the retrained model as
  the reference, and the forget / retain loss curves of every method that recorded them;
- an unlearning record (:mod:`mtunlearn_ext.records`): per-task metrics before and after, and the
  method's loss curves.

Either may hold an optional ``interference`` entry (:func:`interference_to_json`; ``mtunlearn
unlearn`` records one): the task-gradient cosine matrices before and after the
interference-aware projections, drawn by :func:`plot_interference` and explained in the report.

Files are new files only: an existing ``report.md`` or PNG in the output folder is refused. The
values the report shows are checked before anything is written (a metric that is not a number is
a ``UserInputError`` naming ``--results`` and the field), and a failure while writing removes the
files written so far.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtunlearn_ext._errors import UserInputError
from mtunlearn_ext._io import (
    interrupts_held,
    json_safe,
    link_new,
    Placement,
    placements,
    remove_if_placed,
    write_file_atomic,
    write_text_new,
)
from mtunlearn_ext._text import visible_controls

if TYPE_CHECKING:  # for the signatures only: matplotlib and the methods load when first drawn
    from matplotlib.figure import Figure

    from mtunlearn_ext.unlearning.base import UnlearnerConfig
    from mtunlearn_ext.unlearning.interference import InterferenceMatrix

__all__ = ["INTERFERENCE_EXPLANATION", "MISSING_LABEL", "interference_to_json", "plot_interference",
           "save_png", "write_report"]

#: What the interference plot shows; the demo's report and :func:`write_report` both print it.
INTERFERENCE_EXPLANATION = (
    "Cosines between per-task gradients on the shared backbone of the original model (forget "
    "rows: the forgetting objective of each target task over the forget set; retain rows: each "
    "task's retain loss over retain rows that did not build the protected subspaces; each a "
    "mean over up to 128 rows of its set, as one batch's cosines change sign from batch to "
    "batch). A negative forget/retain cosine is interference: the forget step raises that "
    "retain loss. The right panel recomputes the cosines after the projections that this "
    "request's settings run (its title names them: the task projection, an instance "
    "projection, both or neither) on the forget gradients (the retain rows do not change): "
    "forget/retain cosines near zero or positive there mean that the protection holds beyond "
    "the snapshots it was built from. A forget/retain cosine can also grow more negative there, "
    "because the projections are built from one retain batch, not the rows shown: the task "
    "projection, where on, removes the forget gradient's components along that batch's "
    "protected gradients; the orthogonal instance projection removes its components along that "
    "batch's per-sample retain gradients r_j, and the sign-aware one only their conflicting "
    "part (<d, r_j> <= 0 for the forget step d = -(forget gradient): none of their losses "
    "rises to first order). Nothing constrains the retain gradient shown, so what is left of "
    "the forget gradient may conflict with it more than the whole did, and the cosine divides "
    "by the projected gradient's smaller norm (the share kept), which turns a small remaining "
    "conflict into a larger negative cosine. Unseen rows, when present, are each task's loss "
    "on held-out instances no model trained on: a negative forget/unseen cosine means the "
    "forget step raises the loss on unseen data, the test-score change that UIS counts.")


def _primary(kind_or_values: Mapping[str, Any]) -> str | None:
    from mtunlearn_ext.experiment import PRIMARY_METRIC

    for metric in PRIMARY_METRIC.values():
        if metric in kind_or_values:
            return metric
    return next(iter(sorted(kind_or_values)), None)


def save_png(fig: Figure, path: Path, overwrite: bool = False, dpi: int = 100) -> None:
    """Save a figure atomically to ``path`` (:func:`~mtunlearn_ext._io.write_file_atomic`: a
    temporary file, fsync, then a link, which refuses an existing file, or with ``overwrite``
    a rename over it; where the file system has no hard links, the no-overwrite step is a
    check and a rename, as for every other output)."""
    import matplotlib.pyplot as plt

    try:
        write_file_atomic(path, lambda f: fig.savefig(f, format="png", dpi=dpi,
                                                      bbox_inches="tight"),
                          overwrite=overwrite, suffix=".png")
    finally:
        plt.close(fig)


#: The text drawn instead of a bar for a missing (null) value: no bar, unlike a real 0.
MISSING_LABEL = "n/a"

#: Characters of a name that Markdown would read as markup, and how each is written instead:
#: ``|`` ends a table cell, ``<`` / ``&`` start raw HTML or an entity, a backtick a code span,
#: ``*`` emphasis, ``$`` a formula (GitHub renders ``$...$`` as math), ``~`` strikethrough and
#: ``[`` / ``]`` a link (a name ``[x](y)``).
_MD_ESCAPES = (("\\", "\\\\"), ("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("|", "\\|"),
               ("`", "\\`"), ("*", "\\*"), ("$", "\\$"), ("~", "\\~"), ("[", "\\["),
               ("]", "\\]"))

#: An underscore that could open or close emphasis: one not between two letters or digits.
#: Markdown never reads an intraword ``_`` as emphasis, so ``neggrad_plus`` stays as it is in
#: the raw file while ``_x_`` (which renders as an italic x) is escaped.
_MD_EMPHASIS_UNDERSCORE = re.compile(r"(?<![^\W_])_|_(?![^\W_])")


def _md_text(value: object) -> str:
    """``value`` (a task, method or model name, a title: anything the user named) as Markdown
    text that renders as itself on one line, in a paragraph or a table cell. A control
    character left after the line breaks are joined (ESC, NUL) or a bidirectional override is
    written as its escape (``\\x1b``): the file is read in terminals too, and an override
    would reorder the text around it."""
    text = " ".join(str(value).split())  # a line break would end the table row or heading
    for raw, escaped in _MD_ESCAPES:
        text = text.replace(raw, escaped)
    # After the escapes: the backslash of "\x1b" is literal before a letter, not doubled.
    return visible_controls(_MD_EMPHASIS_UNDERSCORE.sub(r"\\_", text))


def _md_code_block(text: str, info: str = "") -> list[str]:
    """``text`` as the lines of a fenced code block whose fence is longer than any run of
    backticks inside it, so that a name holding three backticks cannot close the block. Control
    characters other than line breaks are written as escapes (:func:`_md_text`)."""
    text = visible_controls(text, keep="\n")
    longest = max(map(len, re.findall("`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + info, text, fence]


def _md_code(value: object) -> str:
    """``value`` (a name, a path) as a Markdown code span: delimited by one backtick more than
    the longest run of backticks inside, so that a backtick in it cannot end the span early.
    Control characters, line breaks and tabs among them, are written as escapes
    (:func:`_md_text`), and runs of spaces kept: the span shows a path or a command exactly
    (``run  1/u.pt`` with two spaces or ``a\\nb`` with a line break read as another path when
    whitespace was collapsed into one space)."""
    text = visible_controls(str(value))
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    # A span that starts or ends with a backtick needs a space beside its fence; Markdown
    # takes one space off each end of a span that starts and ends with one, so those get one.
    spaced = text.startswith(" ") and text.endswith(" ") and text.strip(" ")
    pad = " " if text.startswith("`") or text.endswith("`") or spaced else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _md_names(names: Any) -> str:
    """A list of task names for a sentence: each in a code span, comma-separated (a Python
    list's repr would pass ``<``, ``|`` and backticks through as markup)."""
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        return _md_code(names)
    return ", ".join(_md_code(name) for name in names) or "(none)"


#: The most characters of a name drawn in a plot, and of a title (which spans the figure);
#: the report's text gives every name whole.
_PLOT_TEXT_LIMIT = 48
_PLOT_TITLE_LIMIT = 120


def _plot_text(value: object, limit: int = _PLOT_TEXT_LIMIT) -> str:
    """``value`` as matplotlib text that is drawn as itself: a ``$`` would start mathtext
    (a name such as ``cost $x$`` drawn as a formula, an unbalanced one failing the plot). A
    control character is drawn as its escape (``\\x1b``): the font has no glyph for it, and
    matplotlib warned once per character and label. A text longer than ``limit`` characters
    is drawn as its start and end around an ellipsis (the end too, where names such as
    ``..._seed1`` / ``..._seed2`` differ): a 5,000-character task name
    made each bar chart 30,711 x 17,843 pixels, and a 20,000-character one failed the report
    with ``std::bad_alloc``."""
    text = visible_controls(str(value))
    if len(text) > limit:
        head = limit * 2 // 3
        text = text[:head] + "…" + text[len(text) - (limit - head - 1):]
    return text.replace("$", r"\$")


def _model_colors(labels: Sequence[str]) -> dict[str, Any]:
    """A colour per model, the same in every plot of the report: matplotlib's ten-colour cycle,
    or ``tab20`` for more models, so that no two models (up to 20) share one."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def _bar_chart(models: Mapping[str, Mapping[str, Any]], split: str, path: Path,
               reference: str | None) -> bool:
    """Grouped bars: tasks on x (in the order they appear), each labelled with its primary
    metric and direction, one bar per model; a missing (null) value is marked
    :data:`MISSING_LABEL` instead of a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(task, metric) for s, task, metric in _metric_rows(models) if s == split]
    if not rows:
        return False
    colors = _model_colors(list(models))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows) * max(1, len(models)) / 3), 3.5))
    width = 0.8 / max(1, len(models))
    bars: list[Any] = []
    for i, (label, entry) in enumerate(models.items()):
        values = [entry.get("metrics", {}).get(split, {}).get(t, {}).get(metric)
                  for t, metric in rows]
        xs = [k + i * width for k in range(len(rows))]
        # A missing value gets no bar (NaN height: nothing drawn) and an "n/a" mark, so that it
        # cannot be taken for a real 0.
        bars.append(ax.bar(xs, [v if v is not None else math.nan for v in values], width,
                           label=_plot_text(label), color=colors[label],
                           hatch="//" if label == reference else None))
        for x, v in zip(xs, values):
            if v is None:
                ax.text(x, 0.0, MISSING_LABEL, ha="center", va="bottom", rotation=90,
                        fontsize=7, color="0.35")
    # Each task's own metric and direction: tasks of different kinds share the y axis (an
    # accuracy beside an mse), so the axis itself has no single name.
    names = [f"{_plot_text(t)}\n{_plot_text(metric + _direction(metric))}" for t, metric in rows]
    long = max(len(t) for t, _ in rows) > 12
    ax.set_xticks([k + width * (len(models) - 1) / 2 for k in range(len(rows))])
    ax.set_xticklabels(names, rotation=30 if long else 0, ha="right" if long else "center",
                       fontsize=8)
    ax.set_ylabel("metric value (↑ / ↓: higher / lower is better)", fontsize=8)
    ax.set_title(f"{split}: primary metric per task" +
                 (f" (hatched: {_plot_text(reference)})" if reference else ""))
    # Beside the axes, not over the bars (the default "best" place covers some with many models).
    _legend(ax, bars, [_plot_text(label) for label in models])
    save_png(fig, path)
    return True


def _legend(ax: Any, handles: Sequence[Any], labels: Sequence[str]) -> None:
    """A legend of ``handles`` named by ``labels``, beside the axes. Given explicitly: from the
    artists' own labels matplotlib leaves out every name that starts with ``_`` (its mark of
    an internal artist), so a method named ``_mine`` had no entry."""
    ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _curves_chart(curves: Mapping[str, Mapping[str, Any]], path: Path,
                  colors: Mapping[str, Any]) -> bool:
    """Forget and retain loss against the step: a colour per model (``colors``, the bar charts'
    ones), a line style per curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    lines: list[Any] = []
    names: list[str] = []
    for label, report in curves.items():
        # As _curves_problem reads them: null or an empty list is no curve (they passed the
        # check, then failed here with an AttributeError traceback).
        values, steps = report.get("curves") or {}, report.get("curve_steps") or {}
        for name, style in (("forget_loss", "-"), ("retain_loss", "--")):
            ys = values.get(name)
            if not ys:
                continue
            xs = steps.get(name) or list(range(len(ys)))
            names.append(f"{_plot_text(label)} {name}")
            lines += ax.plot(xs, [float("nan") if y is None else y for y in ys], style,
                             color=colors.get(label), label=names[-1])
    if not lines:
        plt.close(fig)
        return False
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss during unlearning (solid: forget, dashed: retain)")
    _legend(ax, lines, names)
    save_png(fig, path)
    return True


def _projections(config: UnlearnerConfig) -> str:
    """A few words naming the projections an ``InterferenceAwareConfig`` applies."""
    parts = []
    if getattr(config, "task_projection", True):
        parts.append("task")
    mode = getattr(config, "instance_projection", "off")
    if mode != "off":
        parts.append(f"{mode} instance")
    return " + ".join(parts) or "none"


def interference_to_json(matrix: InterferenceMatrix,
                         config: UnlearnerConfig | None = None) -> dict[str, Any]:
    """The JSON form of an :class:`~mtunlearn_ext.unlearning.interference.InterferenceMatrix`,
    as records store it and :func:`plot_interference` reads it.

    Keys: ``labels`` (``forget/<task>``, ``retain/<task>``, and ``unseen/<task>`` when the
    problem had held-out data); ``before`` and ``after``
    (``k x k`` nested lists of cosines, a non-finite one as ``None``); ``forget_kept`` (target
    task -> share of its forget gradient's norm the projections keep); with the
    ``InterferenceAwareConfig`` it was computed with, ``projections`` (e.g. ``"task + nonconflicting
    instance"``) and ``config`` (its settings).
    """

    out: dict[str, Any] = {"labels": [str(label) for label in matrix.labels],
                           "before": json_safe(matrix.before), "after": json_safe(matrix.after),
                           "forget_kept": json_safe(dict(matrix.forget_kept))}
    if config is not None:
        out["projections"] = _projections(config)
        out["config"] = json_safe(config.to_dict())
    return out


def _square(values: Any, size: int, name: str) -> Any:
    """``values`` (tensor or nested lists, ``None`` for a missing cosine) as a float array."""
    import numpy as np

    if hasattr(values, "detach"):
        values = values.detach().cpu().tolist()
    try:
        rows = [[float("nan") if v is None else float(v) for v in row] for row in values]
    except (TypeError, ValueError) as error:
        raise ValueError(f"interference data: {name!r} is not a matrix of numbers "
                         f"({error})") from error
    array = np.asarray(rows, dtype=float)
    if array.shape != (size, size):
        raise ValueError(f"interference data: {name!r} has shape {array.shape}, expected "
                         f"({size}, {size}) for {size} labels")
    return array


def _interference_arrays(
        matrix: InterferenceMatrix | Mapping[str, Any]) -> tuple[list[str], Any, Any, Any]:
    """(labels, before, after, projections) of an interference matrix or its JSON form, the
    matrices as ``k x k`` float arrays; ``ValueError`` for malformed data."""
    if isinstance(matrix, Mapping):
        missing = [k for k in ("labels", "before", "after") if k not in matrix]
        if missing:
            raise ValueError(f"interference data: missing {missing}")
        labels, before, after = matrix["labels"], matrix["before"], matrix["after"]
        projections = matrix.get("projections")
    else:
        labels, before, after = matrix.labels, matrix.before, matrix.after
        projections = None
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
        raise ValueError(f"interference data: 'labels' is a {type(labels).__name__}, expected "
                         "a list of names")
    names = [str(label) for label in labels]
    return (names, _square(before, len(names), "before"), _square(after, len(names), "after"),
            projections)


def plot_interference(matrix: InterferenceMatrix | Mapping[str, Any], title: str,
                      path: str | os.PathLike[str], *, overwrite: bool = False) -> str:
    """Draw the task-gradient cosine (interference) matrices before and after the projections
    side by side into the PNG ``path``; return its file name (for a Markdown link beside it).

    ``matrix`` is an :class:`~mtunlearn_ext.unlearning.interference.InterferenceMatrix` or its
    JSON form (:func:`interference_to_json`: a mapping with ``labels``, ``before``, ``after`` as
    nested lists, ``None`` for a missing value; an optional ``projections`` names the right
    panel). ``title`` heads the figure. The file is written atomically; an existing one is
    refused (``FileExistsError``) unless ``overwrite``. Malformed data raises ``ValueError``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, before, after, projections = _interference_arrays(matrix)
    labels = [_plot_text(label) for label in labels]
    panels = ((before, "before projection"),
              (after, f"after projection ({_plot_text(projections, _PLOT_TITLE_LIMIT)})"
               if projections else "after projection"))
    path = Path(path)
    # Room for the cell values: the default suits the usual 2-6 rows, larger matrices grow.
    side = max(4.8, 0.7 * len(labels))
    fig, axes = plt.subplots(1, 2, figsize=(2.2 * side + 0.4, side), constrained_layout=True)
    ticks = range(len(labels))
    image = None
    for ax, (data, panel_title) in zip(axes, panels):
        image = ax.imshow(data, vmin=-1, vmax=1, cmap="RdBu")
        ax.set_xticks(ticks, labels, rotation=45, ha="right", fontsize=8)
        # Row labels once, on the left panel: the rows are the same in both.
        ax.set_yticks(ticks, labels if ax is axes[0] else [], fontsize=8)
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                value = float(data[i, j])
                ax.text(j, i, f"{value:.2f}" if math.isfinite(value) else "-", ha="center",
                        va="center", fontsize=7, color="white" if abs(value) > 0.6 else "black")
        ax.set_title(panel_title)
    assert image is not None  # two panels, both drawn
    fig.colorbar(image, ax=axes, shrink=0.8, label="cosine (negative = interference)")
    fig.suptitle(_plot_text(title, _PLOT_TITLE_LIMIT))
    save_png(fig, path, overwrite=overwrite, dpi=110)
    return path.name


def _md_interference(data: Any, png: Path) -> tuple[list[str], bool]:
    """The report's interference section and whether the PNG was written."""

    lines = ["## Task interference", ""]
    if not isinstance(data, Mapping):
        raise UserInputError("--results", "an 'interference' mapping", type(data).__name__)
    if "error" in data:
        return lines + [f"(interference matrix not computed: {_md_text(data['error'])})",
                        ""], False
    try:
        plot_interference(data, "cosines of shared-backbone task gradients", png)
    except ValueError as error:
        raise UserInputError("--results", "an 'interference' entry with labels, before and "
                             "after matrices", "malformed data", str(error)) from error
    lines += [f"![interference]({png.name})", "", INTERFERENCE_EXPLANATION]
    kept = data.get("forget_kept") or {}
    if kept:
        lines += ["", "Share of each forget gradient's norm kept by the projections: " + ", ".join(
            f"{_md_text(t)}: {'-' if v is None else f'{v:.2f}'}" for t, v in kept.items()) + "."]
    if data.get("settings_from"):
        lines += ["", f"Projection settings: {_md_text(data['settings_from'])}."]
    return lines + [""], True


def _is_value(value: Any) -> bool:
    """A value the report can draw and print with ``:.4f``: a finite number (not a bool) or
    null. ``json.loads`` accepts ``NaN`` / ``Infinity``, which no writer of results or records
    produces (they store a non-finite value as null): such a value is refused, naming the
    field, rather than drawn as an unreadable bar."""
    if value is None:
        return True
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


_Problem = tuple[str, str, object]  # (where, expected, received)


def _metrics_problem(models: Mapping[str, Any]) -> _Problem | None:
    """The first shown metric (a task's primary metric, an MIA AUC) that is not a number or
    null, or a level above it that is not a mapping."""
    for label, entry in models.items():
        if not isinstance(entry, Mapping):
            return str(label), "a mapping", type(entry).__name__
        splits = entry.get("metrics", {})
        if not isinstance(splits, Mapping):
            return f"{label}.metrics", "a mapping", type(splits).__name__
        for split, tasks in splits.items():
            if not isinstance(tasks, Mapping):
                return f"{label}.metrics.{split}", "a mapping", type(tasks).__name__
            for task, metrics in tasks.items():
                where = f"{label}.metrics.{split}.{task}"
                if not isinstance(metrics, Mapping):
                    return where, "a mapping", type(metrics).__name__
                name = _primary(metrics)
                if name is not None and not _is_value(metrics[name]):
                    return f"{where}.{name}", "a finite number or null", metrics[name]
        for attack in ("mia_auc", "mia_member_auc"):  # both printed with :.4f
            if not _is_value(entry.get(attack)):
                return f"{label}.{attack}", "a finite number or null", entry.get(attack)
    return None


def _curves_problem(curves: Mapping[str, Any]) -> _Problem | None:
    """The first loss curve (or its steps) that is not a list of numbers / nulls, or whose
    steps do not match its points."""
    for label, report in curves.items():
        if not isinstance(report, Mapping):
            return f"{label} report", "a mapping", type(report).__name__
        values, steps = report.get("curves") or {}, report.get("curve_steps") or {}
        for key, held in (("curves", values), ("curve_steps", steps)):
            if not isinstance(held, Mapping):
                return f"{label} report.{key}", "a mapping", type(held).__name__
        for name in ("forget_loss", "retain_loss"):
            ys, xs = values.get(name) or [], steps.get(name) or []
            if not isinstance(ys, list) or not all(map(_is_value, ys)):
                return f"{label} report.curves.{name}", "a list of finite numbers or nulls", ys
            if not isinstance(xs, list) or not all(v is not None and _is_value(v) for v in xs):
                return f"{label} report.curve_steps.{name}", "a list of step numbers", xs
            if ys and xs and len(xs) != len(ys):
                return (f"{label} report.curve_steps.{name}", f"{len(ys)} steps (one per point)",
                        f"{len(xs)} steps")
    return None


def _interference_problem(interference: Any) -> _Problem | None:
    """Interference data the report cannot draw: not a mapping, malformed matrices, or a share
    of the forget gradient kept (``interference.forget_kept``) that is not a number or null."""
    if interference is None:
        return None
    if not isinstance(interference, Mapping):
        return "interference", "a mapping", type(interference).__name__
    if "error" in interference:
        return None
    try:
        _interference_arrays(interference)
    except ValueError as error:
        return "interference", "labels, before and after matrices", str(error)
    kept = interference.get("forget_kept") or {}
    if not isinstance(kept, Mapping):
        return "interference.forget_kept", "a mapping", type(kept).__name__
    for task, share in kept.items():
        if not _is_value(share):
            return f"interference.forget_kept.{task}", "a finite number or null", share
    return None


def _check_values(models: Mapping[str, Any], curves: Mapping[str, Any], interference: Any
                  ) -> None:
    """Refuse, before anything is written, a value the report would fail on halfway (a
    traceback and a half-written folder otherwise): ``UserInputError`` naming ``--results``
    and the field."""

    problem = (_metrics_problem(models) or _curves_problem(curves)
               or _interference_problem(interference))
    if problem is not None:
        where, expected, received = problem
        raise UserInputError("--results", f"{expected} at {where}", received)


def _direction(metric: str) -> str:
    """" ↑" / " ↓" after a metric's name (higher / lower is better, :data:`~mtunlearn_ext.metrics.
    METRICS`); nothing for a metric it does not know."""
    from mtunlearn_ext.metrics import METRICS

    info = METRICS.get(metric)
    return "" if info is None else (" ↑" if info.higher_is_better else " ↓")


def _value(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def _metric_rows(models: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """(split, task, primary metric) of every value any model holds: the splits forget, retain,
    test first, tasks in the order they appear."""
    rows: dict[tuple[str, str], str] = {}
    for entry in models.values():
        for split, tasks in entry.get("metrics", {}).items():
            for task, metrics in tasks.items():
                name = _primary(metrics)
                if name is not None:
                    rows.setdefault((split, task), name)
    order = {split: i for i, split in enumerate(("forget", "retain", "test"))}
    keys = sorted(rows, key=lambda key: order.get(key[0], len(order)))  # stable: tasks in order
    return [(split, task, rows[(split, task)]) for split, task in keys]


def _md_metrics(models: Mapping[str, Mapping[str, Any]], reference: str | None,
                record: bool) -> list[str]:
    """The per-task comparison: a row per split, task and primary metric with its direction,
    a column per model (a record: before, after and the change), then the attack AUC, and what
    to compare them with."""
    labels = list(models)
    change = record and labels == ["before", "after"]
    header = ["split", "task", "metric", *labels] + (["change"] if change else [])
    lines = ["| " + " | ".join(_md_text(h) for h in header) + " |",
             "|" + "---|" * 3 + "---:|" * (len(header) - 3)]

    def row(split: str, task: str, metric: str, values: list[Any]) -> str:
        cells = [_md_text(split), _md_text(task), _md_text(metric), *map(_value, values)]
        if change:
            delta = None if None in values else values[1] - values[0]
            cells.append("-" if delta is None else f"{delta:+.4f}")
        return "| " + " | ".join(cells) + " |"

    for split, task, metric in _metric_rows(models):
        values = [models[m].get("metrics", {}).get(split, {}).get(task, {}).get(metric)
                  for m in labels]
        lines.append(row(split, task, metric + _direction(metric), values))
    aucs = [models[m].get("mia_auc") for m in labels]
    if any(v is not None for v in aucs):
        lines.append(row("forget", "(forget instances)", "MIA AUC", aucs))
    from mtunlearn_ext.metrics.membership import ATTACK_AT_CHANCE, attack_at_chance  # sklearn

    members = [models[m].get("mia_member_auc") for m in labels]
    if any(v is not None for v in members):
        lines.append(row("retain", "(held-out members)", "MIA AUC", members))
    unmeasured = [f"{_md_text(m)}: {_md_text(models[m]['mia_error'])}" for m in labels
                  if models[m].get("mia_auc") is None and models[m].get("mia_error")]
    at_chance = [m for m, v in zip(labels, members) if attack_at_chance(v)]
    if record:
        goal = ("A record holds no retrained model: one would score on the forget split about "
                "as on the test split.")
    else:
        goal = (f"Here that is the {_md_code(reference)} model (trained without the forget "
                "pairs), the reference on every split." if reference else "")
    lines += ["", "↑ / ↓: the metric itself is better higher / lower. On the forget split "
              "unlearning should not raise it but move it towards what a model that never saw "
              f"those pairs scores. {goal} MIA AUC: a membership-inference attack's AUC on the "
              "forget instances against unseen test instances; 0.5 means the attack cannot "
              "tell them apart (a value well below 0.5 singles them out too); with few forget "
              "instances it is coarse (each moves it by 1 / their number). The members' row is "
              "the same attack on training instances it was not fitted on: how well it works "
              "at all. -: not measured, or not a finite number (a model that diverged)."
              + (" change: after - before." if change else "")]
    if unmeasured:
        lines += ["", "MIA AUC not measured: " + "; ".join(unmeasured) + "."]
    if at_chance:
        lines += ["", "**The attack is at chance on the members** (AUC <= "
                  f"{ATTACK_AT_CHANCE}: {', '.join(map(_md_text, at_chance))}): it does not tell "
                  "training instances from unseen ones on this model, so its forget-set AUC "
                  "says nothing about forgetting there."]
    return lines


def _md_retained(check: object) -> list[str]:
    """The record's ``retained_check`` (:class:`~mtunlearn_ext.metrics.RetainedCheck`): whether
    every retain and test metric stayed within its tolerance of the input model's, and the
    metrics that did not (nothing for a record written before the check was)."""
    if not isinstance(check, Mapping) or not isinstance(check.get("passed"), bool):
        return []
    tolerance = check.get("tolerance")
    limit = (f"{100 * tolerance:g}%" if isinstance(tolerance, (int, float))
             and not isinstance(tolerance, bool) else "the recorded tolerance")
    splits = check.get("splits")
    where = (", ".join(map(_md_text, splits)) if isinstance(splits, list) and splits
             else "kept")
    lines = ["## Kept performance", ""]
    if check["passed"]:
        lines.append(f"Every task metric on the {where} split(s) stayed within {limit} of the "
                     "input model's (relative worsening; `retained_check` in the record).")
        return lines + [""]
    over = [c for c in check.get("exceeded") or [] if isinstance(c, Mapping)]
    lines += [f"**{len(over)} task metric(s) on the {where} split(s) worsened by more than "
              f"{limit}** against the input model's: the run damaged what it was to keep.", "",
              "| split | task | metric | before | after | worsened by |",
              "|---|---|---|---:|---:|---:|"]
    for c in over:
        worse = c.get("worsening")
        shown = ("inf (not finite after)" if worse is None
                 else f"{100 * worse:+.1f}%" if isinstance(worse, (int, float)) else "-")
        values = [c.get("before"), c.get("after")]
        cells = [_md_text(c.get("split")), _md_text(c.get("task")), _md_text(c.get("metric")),
                 *(_value(v) if isinstance(v, (int, float)) else "-" for v in values), shown]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _md_provenance(record: Mapping[str, Any]) -> list[str]:
    """What a reader who must trust the record needs to find and check its files: the input and
    output checkpoints with their SHA-256, the forgotten ids' hash, whether the weights changed,
    the data and the code, and when it ran (each "not recorded" where the record lacks it)."""
    def get(*keys: str) -> Any:
        node: Any = record
        for key in keys:
            node = node.get(key) if isinstance(node, Mapping) else None
        return node

    def code(*keys: str) -> str:
        value = get(*keys)
        return "not recorded" if value is None else _md_code(value)

    changed = {True: "yes", False: "**no: nothing was unlearned**"}.get(get("weights_changed"),
                                                                       "not recorded")
    commit = get("code", "commit")
    return ["## Provenance", "",
            f"- input checkpoint: {code('input', 'checkpoint')}, SHA-256 "
            f"{code('input', 'sha256')}",
            f"- output checkpoint: {code('output', 'checkpoint')}, SHA-256 "
            f"{code('output', 'sha256')}",
            f"- forgotten instance ids: SHA-256 {code('request', 'ids_sha256')} (the record's "
            "`request.instance_ids` lists them)",
            f"- output weights differ from the input's: {changed}",
            f"- data: {code('benchmark', 'benchmark')} ({code('benchmark', 'size')}), "
            f"SHA-256 {code('benchmark', 'data_sha256')}",
            f"- code: mtunlearn_ext {code('code', 'mtunlearn_ext')}"
            + (f", commit {_md_code(commit)}" + (" with uncommitted changes"
                                                  if get("code", "dirty") else "")
               if commit else ""),
            f"- run: {code('started_at')} to {code('finished_at')} (UTC)",
            # The weights' last bits follow the thread count, the torch build and the CPU
            # kernels: a reader comparing a rerun needs them (reproducibility audit).
            f"- environment: {_md_environment(get('environment'))}",
            f"- method: {code('method', 'name')}, seed {code('seed')}, device "
            f"{code('device')}; settings "
            + ("not recorded" if not isinstance(get("method", "settings"), Mapping) else
               _md_code(json.dumps(get("method", "settings"), sort_keys=True))),
            f"- forgotten ids: {_md_ids_origin(get('request'))}",
            f"- command: {_md_invocation(get('invocation'))}",
            "", "`mtunlearn verify --record RECORD` re-checks the files and the metrics against "
            "the record.", ""]


def _md_environment(environment: Any) -> str:
    """torch, Python, the intra-op thread count, the compiled extension and the CPU kernels of
    a record's ``environment``; "not recorded" for what it lacks."""
    if not isinstance(environment, Mapping):
        return "not recorded"

    def shown(key: str) -> str:
        value = environment.get(key)
        return "not recorded" if value is None else _md_code(value)

    isa = environment.get("cpu_isa")
    kernels = ("not recorded" if not isinstance(isa, Mapping) else
               f"{_md_code(isa.get('torch'))} (torch), {_md_code(isa.get('mtunlearn_ext'))} "
               "(mtunlearn_ext)")
    compiled = environment.get("extension")
    extension = ("compiled" if compiled is True else "**the Python fallback**"
                 if compiled is False else "not recorded")
    return (f"torch {shown('torch')}, Python {shown('python')}, intra-op threads "
            f"{shown('threads')}, ops {extension}, CPU kernels {kernels}")


def _md_named_and_forgotten(request: Mapping[str, Any]) -> str:
    """How many instances the request named and, where earlier requests of the lineage had
    already removed all of some of their pairs, how many this run forgot (the data-removal
    review: "2 instances" was printed where one of the two had been removed before)."""
    named = len(request["instance_ids"])
    forgotten = request.get("forgotten_instance_ids")
    if not isinstance(forgotten, list) or len(forgotten) == named:
        return f"{named} instances"
    return (f"{named} instances named, **{len(forgotten)} forgotten by this run** (the others' "
            "pairs were removed by earlier requests: the ids' SHA-256 covers all named)")


def _md_invocation(invocation: object) -> str:
    """The command line as given, and the code and configuration files it read besides the
    package (``--import`` modules, ``--config``) with their SHA-256."""
    if not isinstance(invocation, Mapping) or not isinstance(invocation.get("argv"), list):
        return "not recorded"
    line = _md_code(" ".join(["mtunlearn", *map(shlex.quote, map(str, invocation["argv"]))]))
    if isinstance(invocation.get("cwd"), str):  # relative paths in the command name from there
        line += f", run in {_md_code(invocation['cwd'])}"
    files = [(f"--import {entry.get('module')}", entry)
             for entry in invocation.get("imports") or [] if isinstance(entry, Mapping)]
    for option in ("config", "method_config"):
        entry = invocation.get(option)
        if isinstance(entry, Mapping):
            files.append((f"--{option.replace('_', '-')}", entry))
    for label, entry in files:
        line += (f"; {_md_code(label)}: {_md_code(entry.get('file'))}, SHA-256 "
                 f"{_md_code(entry.get('sha256'))}")
    return line


def _md_ids_origin(request: object) -> str:
    """Who chose the forgotten ids: the user (``--forget-ids``), or the tool's random draw
    (``request.ids_drawn``; absent from records written before it was kept)."""
    if not isinstance(request, Mapping) or "ids_drawn" not in request:
        return "not recorded"
    drawn = request["ids_drawn"]
    if isinstance(drawn, Mapping):
        return (f"**drawn at random by the tool** (--forget-fraction "
                f"{_md_code(drawn.get('fraction'))}, seed {_md_code(drawn.get('seed'))}), not "
                "named by a request")
    return "named with --forget-ids" if drawn is None else "not recorded"


def _md_retain(request: Mapping[str, Any]) -> str:
    """The retain split a record's retain metrics (and the attack's members) were measured on:
    its size and whether ``--retain-ids`` limited it, and the pairs earlier removals kept out."""
    pairs = request.get("num_retain_pairs")
    size = f" ({pairs} pairs)" if isinstance(pairs, int) else ""
    ids = request.get("retain_ids")
    if isinstance(ids, list):
        text = (f"Retain split: limited by `--retain-ids` to {len(ids)} instances{size}, not "
                "the whole retain set: the retain metrics and the attack's member set describe "
                "these instances only.")
    else:
        text = f"Retain split: every training pair outside the request{size}."
    earlier = request.get("earlier_removals")
    if isinstance(earlier, list) and earlier:
        text += (f" {request.get('num_excluded_pairs')} pairs that {len(earlier)} earlier "
                 "request(s) of the input checkpoint's lineage removed are kept out of it.")
    elif "earlier_removals" in request and earlier is None:
        text += " The input checkpoint's earlier removals were not known."
    return text


def _report_inputs(results: Mapping[str, Any]
                   ) -> tuple[dict[str, Any], dict[str, Any], str | None, list[str]]:
    """(models' measurements by label, loss curves by method, the reference label, the
    introduction lines) of experiment results or a record."""
    from mtunlearn_ext.records import RECORD_SCHEMA

    schema = results.get("schema")
    if schema == RECORD_SCHEMA:
        models = {"before": results["before"], "after": results["after"]}
        curves = {results["method"]["name"]: results.get("report", {})}
        reference: str | None = "before"
        intro = [f"Unlearning record: method {_md_code(results['method']['name'])}, "
                 f"{_md_text(results['request']['type'])} request on tasks "
                 f"{_md_names(results['request']['target_tasks'])}, "
                 f"{_md_named_and_forgotten(results['request'])}; output "
                 f"{_md_code(results['output']['checkpoint'])} (SHA-256 "
                 f"{_md_code(results['output']['sha256'][:16])}).", "",
                 _md_retain(results["request"])]
    elif schema == "mtunlearn_ext.experiment/1":
        models = dict(results["models"])
        curves = {m: e["report"] for m, e in models.items()
                  if isinstance(e.get("report"), Mapping)}
        reference = "retrained"
        from mtunlearn_ext.experiment import format_table

        intro = [f"Experiment on {_md_code(results['benchmark']['name'])} "
                 f"({_md_text(results['benchmark']['size'])}), "
                 f"{_md_text(results['request']['type'])} request on "
                 f"{_md_names(results['request']['target_tasks'])}.", "",
                 *_md_code_block(format_table(results))]
    else:
        raise UserInputError("--results", "experiment results (mtunlearn_ext.experiment/1) or "
                             f"an unlearning record ({RECORD_SCHEMA})", schema,
                             _unknown_results_hint(results))
    return models, curves, reference, intro


#: The two inputs `report` draws, named as `unlearn --record`'s help names the record's
#: defaults: `<checkpoint>.record.json` is its name only with `--output`.
_WHAT_REPORT_DRAWS = ("the JSON that `python -m mtunlearn_ext.experiment` writes, or the record "
                      "that `mtunlearn unlearn` writes beside its checkpoint "
                      "(`<output>.record.json` with --output, else "
                      "`<input>.<method>.record.json`)")


def _unknown_results_hint(results: Mapping[str, Any]) -> str:
    """What a results file without a known schema is, where it can be told, and what to pass
    instead (the user review fed `evaluate`'s output to `report` and read "got None")."""
    if "schema" in results:
        return ("the file's `schema` field names another format; pass " + _WHAT_REPORT_DRAWS)
    looks_like = ("; it looks like `mtunlearn evaluate`'s output (one checkpoint's metrics, "
                  "nothing to compare them with), which `report` does not draw"
                  if {"checkpoint", "sha256", "metrics"} <= set(results) else "")
    return f"the file has no `schema` field{looks_like}; pass " + _WHAT_REPORT_DRAWS


class _NewFiles:
    """The files a report writes. Each is drawn into a hidden staging folder inside the output
    folder and put in place by :meth:`commit`, all together at the end: a run killed while
    drawing (SIGKILL, a power cut: no clean-up runs) leaves only that folder, never finished
    figures under their final names, which would refuse the rerun into the same folder. Files
    put in place are registered *before* each link, so that a failure at any point (also
    between a link and its return) removes every one of them; a file refused because it exists
    already is not ours and stays."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.paths: list[Path] = []
        self._staged: list[tuple[Path, Path]] = []
        self._staging: Path | None = None
        self._placed: dict[str, Placement] = {}  # the files commit() put in place

    def write(self, path: Path, writer: Callable[[Path], bool]) -> bool:
        """``writer(staged)``, with ``staged`` the staging copy of ``path``, which returns
        whether it wrote the file. A file that cannot be written (the disk is full, ...) is a
        :class:`~mtunlearn_ext.workflow.UserInputError` naming ``--output-dir``."""

        try:
            if self._staging is None:
                self._staging = Path(tempfile.mkdtemp(prefix=".report-", suffix=".partial",
                                                      dir=self.folder))
            staged = self._staging / path.name
            written = writer(staged)
        except OSError as error:
            raise UserInputError("--output-dir", "a folder the report files can be written to",
                                 str(path), f"{error.strerror or error}; nothing was written"
                                 ) from error
        if written:
            self._staged.append((staged, path))
        return written

    def commit(self) -> None:
        """Put every staged file at its path, in the order written; none may exist."""

        for staged, path in self._staged:
            self.paths.append(path)
            try:
                with placements(self._placed):
                    link_new(staged, path, f"{path} exists; refusing to overwrite it")
            except FileExistsError as error:
                self.paths.remove(path)
                raise UserInputError("--output-dir", "a folder without report files", str(path),
                                     "it appeared during the run; refusing to overwrite"
                                     ) from error
            except OSError as error:
                raise UserInputError("--output-dir", "a folder the report files can be "
                                     "written to", str(path), error.strerror or str(error)
                                     ) from error
        self.discard_staging()

    def discard_staging(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def remove(self) -> None:
        for path in self.paths:
            remove_if_placed(path, self._placed)  # a failed link put nothing there: not ours
        self.discard_staging()


def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return the ones created, deepest first."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return created


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed report created, deepest first, where they are still empty
    (a file someone else put there keeps its folder)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def write_report(results: Mapping[str, Any], output_dir: Path, title: str = "report"
                 ) -> list[Path]:
    """Write ``report.md`` and its PNGs into ``output_dir``; return the written paths.

    Raises :class:`~mtunlearn_ext.workflow.UserInputError` for an input that is neither
    experiment results nor a record, for a field the report shows that is missing or not a
    number (checked before anything is written), or when a file to write exists already. On
    any failure the files written so far are removed again. Once ``report.md`` is in place the
    files are complete and listed in ``workflow.COMMITTED_OUTPUTS``; an interrupt arriving as
    it lands is raised after that, and leaves them.
    """
    from mtunlearn_ext.records import RECORD_SCHEMA
    from mtunlearn_ext.workflow import COMMITTED_OUTPUTS

    if not isinstance(results, Mapping):
        raise UserInputError("--results", "a JSON object (experiment results or a record)",
                             type(results).__name__)
    try:
        models, curves, reference, intro = _report_inputs(results)
        record = results.get("schema") == RECORD_SCHEMA
        if record:
            intro += ["", *_md_provenance(results)]
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as error:
        if isinstance(error, UserInputError):
            raise
        raise UserInputError("--results", "complete experiment results or a complete record",
                             results.get("schema"),
                             f"a field is missing or malformed: {error!r}") from error
    interference = results.get("interference")
    _check_values(models, curves, interference)
    md = output_dir / "report.md"
    planned = [md] + [output_dir / f"metrics_{s}.png" for s in ("forget", "retain", "test")] + [
        output_dir / "loss_curves.png"] + ([output_dir / "interference.png"]
                                           if interference is not None else [])
    # lexists: a dangling symbolic link is taken too (writing would follow it, or fail).
    taken = [str(p) for p in planned if os.path.lexists(p)]
    if taken:
        partial = sorted(output_dir.glob(".report-*.partial"))
        killed = (f" (report.md, put in place last, is missing and {partial[0].name} is there: "
                  "a report killed while putting its files in place left these; delete them "
                  "and that folder to write the report here)"
                  if partial and not os.path.lexists(md) else "")
        raise UserInputError("--output-dir", "a folder without report files", taken[0],
                             f"refusing to overwrite; choose a new folder{killed}")
    try:
        created = _make_folder(output_dir)
    except OSError as error:
        # The system's reason alone, as the other commands' outputs say it ("[Errno 20] Not a
        # directory: 'x/rep'" repeated the path and Python's error number).
        raise UserInputError("--output-dir", "a folder that can be created", str(output_dir),
                             f"{error.strerror or error}; nothing was written") from error
    files = _NewFiles(output_dir)
    complete = False
    try:
        lines = [f"# {_md_text(title)}", "", *intro, "", "## Per-task metrics", ""]
        for split in ("forget", "retain", "test"):
            png = output_dir / f"metrics_{split}.png"
            if files.write(png, lambda p: _bar_chart(models, split, p, reference)):
                lines.append(f"![{split}]({png.name})")
        lines += ["", *_md_metrics(models, reference, record), ""]
        if record:
            lines += _md_retained(results.get("retained_check"))
        png = output_dir / "loss_curves.png"
        # The method of a record is its "after" model: the same colour as its bars.
        colors = _model_colors(list(models))
        colors = {m: colors.get("after" if record else m) for m in curves}
        if files.write(png, lambda p: _curves_chart(curves, p, colors)):
            lines += ["## Loss curves during unlearning", "", f"![loss curves]({png.name})", ""]
        else:
            lines += ["(no loss curves recorded)", ""]
        if interference is not None:
            section: list[str] = []

            def draw(p: Path) -> bool:
                text, drawn = _md_interference(interference, p)
                section.extend(text)
                return drawn

            files.write(output_dir / "interference.png", draw)
            lines += section
        # The report is complete once report.md is in place; an interrupt arriving as it lands
        # is held until the files are registered as written in full, so that the command says
        # so instead of "no output was written" beside a complete report.
        files.write(md, lambda p: bool(write_text_new(p, "\n".join(lines))))
        with interrupts_held():
            files.commit()
            COMMITTED_OUTPUTS.extend(files.paths)
            complete = True
    except BaseException:
        if not complete:
            files.remove()
            _remove_empty(created)
        raise
    finally:
        files.discard_staging()
    return files.paths
