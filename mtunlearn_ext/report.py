"""Markdown reports with PNG plots from experiment results or an unlearning record.

Two inputs are understood:

- experiment results (``python -m mtunlearn_ext.experiment``, schema ``mtunlearn_ext.experiment/1``):
  one bar chart per split of every model's primary metric per task, with the retrained model as
  the reference, and the forget / retain loss curves of every method that recorded them;
- an unlearning record (:mod:`mtunlearn_ext.records`): per-task metrics before and after, and the
  method's loss curves.

Files are new files only: an existing ``report.md`` or PNG in the output folder is refused.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["write_report"]


def _primary(kind_or_values: Mapping[str, Any]) -> str | None:
    from mtunlearn_ext.experiment import PRIMARY_METRIC

    for metric in PRIMARY_METRIC.values():
        if metric in kind_or_values:
            return metric
    return next(iter(sorted(kind_or_values)), None)


def _save_png(fig: Any, path: Path) -> None:
    """Save a figure atomically to a new ``path`` (temporary file, fsync, link)."""
    import matplotlib.pyplot as plt

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    finally:
        plt.close(fig)
        os.unlink(tmp)


def _bar_chart(models: Mapping[str, Mapping[str, Any]], split: str, path: Path,
               reference: str | None) -> bool:
    """Grouped bars: tasks on x, one bar per model, primary metric of ``split``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for m in models.values() for t in m.get("metrics", {}).get(split, {})})
    if not tasks:
        return False
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(tasks) * max(1, len(models)) / 3), 3.5))
    width = 0.8 / max(1, len(models))
    for i, (label, entry) in enumerate(models.items()):
        values = []
        for t in tasks:
            metrics = entry.get("metrics", {}).get(split, {}).get(t, {})
            name = _primary(metrics)
            values.append(metrics.get(name) if name else None)
        xs = [k + i * width for k in range(len(tasks))]
        ax.bar(xs, [v if v is not None else 0.0 for v in values], width,
               label=label, hatch="//" if label == reference else None)
    ax.set_xticks([k + width * (len(models) - 1) / 2 for k in range(len(tasks))])
    ax.set_xticklabels(tasks)
    ax.set_title(f"{split}: primary metric per task" +
                 (f" (hatched: {reference})" if reference else ""))
    ax.legend(fontsize=7)
    _save_png(fig, path)
    return True


def _curves_chart(curves: Mapping[str, Mapping[str, Any]], path: Path) -> bool:
    """Forget and retain loss against the step, one line per model and curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    drawn = False
    for label, report in curves.items():
        values, steps = report.get("curves", {}), report.get("curve_steps", {})
        for name, style in (("forget_loss", "-"), ("retain_loss", "--")):
            ys = values.get(name)
            if not ys:
                continue
            xs = steps.get(name) or list(range(len(ys)))
            ax.plot(xs, [float("nan") if y is None else y for y in ys], style,
                    label=f"{label} {name}")
            drawn = True
    if not drawn:
        import matplotlib.pyplot as plt2

        plt2.close(fig)
        return False
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss during unlearning (solid: forget, dashed: retain)")
    ax.legend(fontsize=7)
    _save_png(fig, path)
    return True


def _md_metrics(models: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = ["| model | split | task | metric | value |", "|---|---|---|---|---|"]
    for label, entry in models.items():
        for split, tasks in entry.get("metrics", {}).items():
            for task, metrics in tasks.items():
                name = _primary(metrics)
                value = metrics.get(name) if name else None
                lines.append(f"| {label} | {split} | {task} | {name} | "
                             f"{'-' if value is None else f'{value:.4f}'} |")
        if entry.get("mia_auc") is not None:
            lines.append(f"| {label} | forget | * | mia_auc | {entry['mia_auc']:.4f} |")
    return lines


def write_report(results: Mapping[str, Any], output_dir: Path, title: str = "report"
                 ) -> list[Path]:
    """Write ``report.md`` and its PNGs into ``output_dir``; return the written paths.

    Raises :class:`~mtunlearn_ext.workflow.UserInputError` for an input that is neither
    experiment results nor a record, or when a file to write exists already.
    """
    from mtunlearn_ext.records import RECORD_SCHEMA
    from mtunlearn_ext.workflow import UserInputError

    schema = results.get("schema")
    if schema == RECORD_SCHEMA:
        models = {"before": results["before"], "after": results["after"]}
        curves = {results["method"]["name"]: results.get("report", {})}
        reference: str | None = "before"
        intro = [f"Unlearning record: method `{results['method']['name']}`, "
                 f"{results['request']['type']} request on tasks "
                 f"{results['request']['target_tasks']}, "
                 f"{len(results['request']['instance_ids'])} instances; output "
                 f"`{results['output']['checkpoint']}` (SHA-256 "
                 f"`{results['output']['sha256'][:16]}`)."]
    elif schema == "mtunlearn_ext.experiment/1":
        models = dict(results["models"])
        curves = {m: e["report"] for m, e in models.items()
                  if isinstance(e.get("report"), Mapping)}
        reference = "retrained"
        from mtunlearn_ext.experiment import format_table

        intro = [f"Experiment on `{results['benchmark']['name']}` "
                 f"({results['benchmark']['size']}), {results['request']['type']} request on "
                 f"{results['request']['target_tasks']}.", "", "```",
                 format_table(results), "```"]
    else:
        raise UserInputError("--results", "experiment results (mtunlearn_ext.experiment/1) or "
                             f"an unlearning record ({RECORD_SCHEMA})", schema)
    output_dir.mkdir(parents=True, exist_ok=True)
    md = output_dir / "report.md"
    planned = [md] + [output_dir / f"metrics_{s}.png" for s in ("forget", "retain", "test")] + [
        output_dir / "loss_curves.png"]
    taken = [str(p) for p in planned if p.exists()]
    if taken:
        raise UserInputError("--output-dir", "a folder without report files", taken[0],
                             "refusing to overwrite; choose a new folder")
    written: list[Path] = []
    try:
        lines = [f"# {title}", "", *intro, "", "## Per-task metrics", ""]
        for split in ("forget", "retain", "test"):
            png = output_dir / f"metrics_{split}.png"
            if _bar_chart(models, split, png, reference):
                written.append(png)
                lines.append(f"![{split}]({png.name})")
        lines += ["", *_md_metrics(models), ""]
        png = output_dir / "loss_curves.png"
        if _curves_chart(curves, png):
            written.append(png)
            lines += ["## Loss curves during unlearning", "", f"![loss curves]({png.name})", ""]
        else:
            lines += ["(no loss curves recorded)", ""]
        fd, tmp = tempfile.mkstemp(prefix=".report.md.", dir=output_dir)
        try:
            with os.fdopen(fd, "w") as f:
                f.write("\n".join(lines))
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, md)
        finally:
            os.unlink(tmp)
        written.append(md)
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    return written
