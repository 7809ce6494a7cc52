"""The bench matrix's HTML page: written whole, every device and artifact named (escaped), a figure per measured
device plus the comparison across devices, unstable figures and failed devices listed."""

import html
import re

import pytest

from edgeforge.report.matrix_html import write_matrix_html
from edgeforge.verify.matrix import matrix_rows
from edgeforge.verify.matrix_record import BenchMatrix, Estimate, JobFailure, JobSummary, MatrixArtifact, Metric

FP32 = MatrixArtifact(path="/models/a", label="stories fp32", sha256="a" * 64)
INT4 = MatrixArtifact(path="/models/b", label="stories <int4> & co", sha256="b" * 64)


def _summary(device: str, artifact: MatrixArtifact, prefill: list[float], decode: list[float],
             max_cv: float) -> JobSummary:
    metrics = []
    for name, samples in (("pp8 tok/s", prefill), ("tg4 tok/s", decode)):
        estimate = Estimate.of(samples)
        metrics.append(Metric(name=name, unit="tok/s", estimate=estimate, unstable=estimate.cv > max_cv))
    metrics.append(Metric(name="load", unit="s", estimate=Estimate.of([0.2]), unstable=False))
    return JobSummary(device=device, artifact=artifact.sha256, label=artifact.label, reused=False, metrics=metrics,
                      ratios=[], ceiling_share=None, unstable=any(metric.unstable for metric in metrics))


def _record() -> BenchMatrix:
    max_cv = 0.1
    summaries = [_summary("lab<1>", FP32, [900.0, 1000.0, 1100.0], [40.0, 41.0, 42.0], max_cv),
                 _summary("lab<1>", INT4, [1500.0, 1600.0, 1700.0], [10.0, 60.0, 61.0], max_cv),  # decode unstable
                 _summary("pixel8", FP32, [300.0, 310.0, 320.0], [12.0, 12.5, 13.0], max_cv),
                 _summary("pixel8", INT4, [500.0, 510.0, 520.0], [20.0, 20.5, 21.0], max_cv)]
    failure = JobFailure(device="board2", artifacts=[FP32.sha256, INT4.sha256], attempts=3,
                         error="connection <dropped>")
    return BenchMatrix(artifacts=[FP32, INT4], devices=["lab<1>", "pixel8", "board2"], baseline=FP32.sha256,
                       max_cv=max_cv, output_dir="/runs", jobs=[], summaries=summaries, failures=[failure])


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The page of :func:`_record`, as written to a file."""
    path = tmp_path_factory.mktemp("page") / "matrix.html"
    write_matrix_html(_record(), path)
    return path.read_text()


def test_matrix_page_names_devices_and_artifacts_escaped_with_a_figure_per_device_and_the_comparison(page):
    assert page.startswith("<!doctype html>") and page.endswith("</html>")
    sections = re.findall(r"<h2[^>]*>(.*?)</h2>", page)
    assert sections == ["Tokens/s, median [confidence interval]", "lab&lt;1&gt;", "pixel8",
                        "Across devices: each artifact side by side", "Failed devices", "Artifacts"]
    assert page.count("<img alt='plot' src='data:image/png;base64,") == 2 + 1, "board2 measured nothing: no figure"
    assert "lab<1>" not in page and "<int4>" not in page and "stories &lt;int4&gt; &amp; co" in page
    assert "connection &lt;dropped&gt;" in page and "<b>board2</b> after 3 attempt(s), 2 job(s) not run" in page


def test_matrix_page_carries_the_table_rows_and_marks_unstable_figures(page):
    rows = matrix_rows(_record())
    assert len(rows) == 4 * 2
    for row in rows:  # each row of the text table is a row of the page's, its cells escaped
        assert re.search("<tr>" + "".join(f"<td[^>]*>{re.escape(html.escape(cell))}</td>" for cell in row) + "</tr>",
                         page), row
    assert "1000.0 [900.0, 1100.0]" in page, "the median with its order-statistic interval (n = 3: the range)"
    unstable = [row for row in rows if row[-1] == "UNSTABLE"]
    assert [(row[0], row[1], row[2]) for row in unstable] == [("lab<1>", INT4.label, "tg4")]
    assert "UNSTABLE (hatched): stories &lt;int4&gt; &amp; co tg4 tok/s" in page
    assert page.count("no unstable figure") == 1, "pixel8's figures are all stable"
