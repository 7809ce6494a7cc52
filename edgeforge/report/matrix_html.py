"""The bench matrix as one self-contained HTML page (``OUT/matrix.html`` beside ``matrix.json``): per device, the
tokens/s of every test and artifact with the median's confidence interval as error bars; across devices, each
artifact's tokens/s side by side; unstable figures marked (hatched bars, UNSTABLE in the table); failures listed.

    write_matrix_html(record, "runs/matrix.html")   # record: edgeforge.verify.matrix_record.BenchMatrix
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from edgeforge.fileio import write_text_atomic
from edgeforge.report.html import escape, html_table, inline_png, new_figure, page
from edgeforge.verify.matrix import MATRIX_HEADER, matrix_rows

if TYPE_CHECKING:
    from edgeforge.verify.matrix_record import BenchMatrix, JobSummary, Metric

MATRIX_HTML = "matrix.html"  # in the output directory, beside matrix.json
COLOURS = ("#1f6feb", "#bf8700", "#1a7f37", "#8250df", "#cf222e", "#57606a")


def write_matrix_html(record: BenchMatrix, path: str | Path) -> None:
    write_text_atomic(path, render_matrix_html(record))


def render_matrix_html(record: BenchMatrix) -> str:
    """The page: the table, a figure per device, the comparison across devices, the failures."""
    title = f"edgeforge bench matrix: {len(record.artifacts)} artifact(s) x {len(record.devices)} device(s)"
    measured = [device for device in record.devices if any(s.device == device for s in record.summaries)]
    sections = [_table(record), *(_device_section(record, device) for device in measured),
                _comparison(record, measured), _failures(record), _notes(record)]
    return page(title, sections)


def _tok_s(summary: JobSummary) -> list[Metric]:
    return [metric for metric in summary.metrics if metric.unit == "tok/s"]


def _tests(summaries: list[JobSummary]) -> list[str]:
    """The tok/s tests in the order they ran (prefill tests, then decode)."""
    names: list[str] = []
    for summary in summaries:
        names += [metric.name for metric in _tok_s(summary) if metric.name not in names]
    return names


def _table(record: BenchMatrix) -> str:
    return "<h2>Tokens/s, median [confidence interval]</h2>" + html_table(list(MATRIX_HEADER), matrix_rows(record),
                                                                           numeric_from=3)


def _bars(axis, groups: list[tuple[str, str]], series: list[tuple[str, dict[str, Metric]]]) -> None:
    """Grouped bars: one group per (key, tick label) of ``groups``, one bar per series (label, key -> metric), with
    the median's interval as an error bar; unstable bars hatched."""
    width = 0.8 / max(len(series), 1)
    for index, (label, metrics) in enumerate(series):
        bars = [(position, metrics[key]) for position, (key, _) in enumerate(groups) if key in metrics]
        if not bars:
            continue
        estimates = [metric.estimate for _, metric in bars]
        below = [e.median - e.low if e.low is not None else 0.0 for e in estimates]
        above = [e.high - e.median if e.high is not None else 0.0 for e in estimates]
        axis.bar([position + index * width for position, _ in bars], [e.median for e in estimates], width,
                 yerr=[below, above], capsize=3, color=COLOURS[index % len(COLOURS)], label=label,
                 hatch=["//" if metric.unstable else "" for _, metric in bars],
                 edgecolor=["#cf222e" if metric.unstable else "none" for _, metric in bars])
    axis.set_xticks([p + width * (len(series) - 1) / 2 for p in range(len(groups))], [tick for _, tick in groups],
                    fontsize=8)
    axis.set_yscale("log")


def _device_section(record: BenchMatrix, device: str) -> str:
    summaries = [summary for summary in record.summaries if summary.device == device]
    tests = _tests(summaries)
    figure, axis = new_figure(7, 3)
    _bars(axis, [(test, test.removesuffix(" tok/s")) for test in tests],
          [(summary.label, {metric.name: metric for metric in _tok_s(summary)}) for summary in summaries])
    axis.set_ylabel("tokens/s (median, CI)")
    axis.set_title(device, fontsize=9)
    axis.legend(fontsize=7)
    unstable = [f"{s.label} {m.name}" for s in summaries for m in _tok_s(s) if m.unstable]
    note = f"UNSTABLE (hatched): {', '.join(unstable)}" if unstable else "no unstable figure"
    return (f"<h2>{escape(device)}</h2>" + inline_png(figure)
            + f"<p class='{'fail' if unstable else 'muted'}'>{escape(note)}</p>")


def _comparison(record: BenchMatrix, devices: list[str]) -> str:
    """One axis per tok/s test: each artifact's bars for every device, side by side."""
    if not devices:
        return ""
    tests = _tests(record.summaries)
    artifacts = [(artifact.sha256, artifact.label) for artifact in record.artifacts]
    figure, _ = new_figure(3.5 * len(tests), 3, columns=len(tests))
    for axis, test in zip(figure.axes, tests):
        series = [(device, {s.artifact: m for s in record.summaries if s.device == device for m in _tok_s(s)
                            if m.name == test}) for device in devices]
        _bars(axis, artifacts, series)
        axis.set_title(test, fontsize=9)
        axis.tick_params(axis="x", labelrotation=15)
    figure.axes[0].set_ylabel("tokens/s (median, CI)")
    figure.axes[0].legend(fontsize=7)
    return "<h2>Across devices: each artifact side by side</h2>" + inline_png(figure)


def _failures(record: BenchMatrix) -> str:
    if not record.failures:
        return ""
    items = "".join(f"<li><b>{escape(failure.device)}</b> after {failure.attempts} attempt(s), "
                    f"{len(failure.artifacts)} job(s) not run: {escape(failure.error)}</li>"
                    for failure in record.failures)
    return f"<h2 class='fail'>Failed devices</h2><ul>{items}</ul>"


def _notes(record: BenchMatrix) -> str:
    baseline = next(artifact.label for artifact in record.artifacts if artifact.sha256 == record.baseline)
    artifacts = html_table(["artifact", "path", "sha256"],
                           [[artifact.label, artifact.path, artifact.sha256] for artifact in record.artifacts],
                           numeric_from=9)
    return (f"<h2>Artifacts</h2>{artifacts}<p class='muted'>ratios against {escape(baseline)} on the same device; "
            f"UNSTABLE: coefficient of variation above {record.max_cv:.0%}; error bars: the median's "
            f"distribution-free interval (order statistics); jobs in {escape(record.output_dir)}</p>")
