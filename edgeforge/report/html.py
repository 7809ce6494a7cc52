"""A self-contained HTML page for a forge report: tables plus matplotlib plots embedded as PNG data URIs,
so it opens offline and can be attached to a CI run or a pull request as one file."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import TYPE_CHECKING

from edgeforge.fileio import write_text_atomic

if TYPE_CHECKING:
    from edgeforge.report.record import ExportStage, ForgeReport, QuantizeStage
    from edgeforge.verify.bench_record import BenchReport
    from edgeforge.verify.report import VerifyReport

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:72rem;color:#1b1f24;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #d0d7de;padding-bottom:.2rem}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}td,th{border:1px solid #d0d7de;padding:.2rem .5rem;text-align:left}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#1a7f37;font-weight:600}.fail{color:#cf222e;font-weight:600}.muted{color:#57606a}
img{max-width:100%;border:1px solid #d0d7de;margin:.5rem 0}
"""


def render_html(report: ForgeReport) -> str:
    """The report as one HTML document."""
    sections = [_summary(report), _quantize_section(report.quantize), _export_section(report.export),
                _verify_section(report.verify), _bench_section(report.bench), _provenance(report)]
    title = f"edgeforge report: {Path(report.source.path).name} · {report.recipe.name} · {report.target.name}"
    return page(title, sections)


def page(title: str, sections: list[str]) -> str:
    """A self-contained HTML document: ``title`` (escaped here) as its title and heading, then the non-empty
    ``sections`` (HTML)."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title><style>{STYLE}</style>"
            f"</head><body><h1>{escape(title)}</h1>{''.join(s for s in sections if s)}</body></html>")


def write_html(report: ForgeReport, path: str | Path) -> None:
    write_text_atomic(path, render_html(report))


def escape(value) -> str:
    """``value`` as text safe inside HTML."""
    return html.escape(str(value))


def html_table(header: list[str], rows: list[list], numeric_from: int = 1) -> str:
    """A table of escaped cells; columns from ``numeric_from`` on are right-aligned."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td class='{'num' if i >= numeric_from else ''}'>{escape(c)}</td>"
                                   for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def inline_png(figure) -> str:
    """A matplotlib figure as an <img> with the PNG inline (the figure is closed)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return f"<img alt='plot' src='data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}'>"


def new_figure(width: float, height: float, columns: int = 1):
    """A headless matplotlib figure (inches) and its axis, or ``columns`` axes side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(ncols=columns, figsize=(width, height))


def _summary(report: ForgeReport) -> str:
    verify, bench, export = report.verify, report.bench, report.export
    verdict = verify.verdict if verify else "not run"
    css = "pass" if verdict == "pass" else "fail" if verdict == "fail" else "muted"
    rows = [["source", report.source.path], ["recipe", f"{report.recipe.name}: {report.recipe.description}"],
            ["target", f"{report.target.name}: {report.target.description}"]]
    if export:
        size = export.report
        rows.append(["artifact", f"{export.artifact} ({size.size_bytes or 0:,} bytes, "
                                 f"{size.bytes_per_parameter or 0:.3f} bytes/parameter)"])
    stages = ", ".join(f"{name} {timing.seconds:.1f} s{' (reused)' if timing.reused else ''}"
                       for name, timing in report.stages.items())
    rows.append(["stages", stages])
    line = verify.verdict_line if verify else ""
    speed = ""
    candidate_decode = bench.candidate.decode_test if bench else None
    if candidate_decode and candidate_decode.speedup:
        speed = (f"decode {candidate_decode.tok_s.median:.1f} tok/s, {candidate_decode.speedup.median:.2f}x the fp32 "
                 "reference")
    return (f"<p class='{css}'>{escape(line or verdict)}</p>" + (f"<p>{escape(speed)}</p>" if speed else "")
            + html_table(["", ""], rows, numeric_from=9))


def _quantize_section(quantize: QuantizeStage | None) -> str:
    if not quantize:
        return ""
    layers = quantize.layers
    rows = [[name, f"int{l.scheme['bits']} " + (f"g{l.scheme['group_size']}" if l.scheme["group_size"]
                                                else "per-channel"),
             _fmt(l.rel_error), _fmt(l.rel_error_rtn),
             _fmt(l.output_sqnr_db if l.output_sqnr_db is not None else l.weight_sqnr_db, ".1f"), l.fallback or ""]
            for name, l in layers.items()]
    measured = [(name, l.rel_error, l.rel_error_rtn) for name, l in layers.items() if l.rel_error is not None]
    if not measured:  # data-free recipe: no calibration inputs, so the weight SQNR per layer
        figure, axis = new_figure(10, max(2.5, 0.18 * len(layers)))
        axis.barh(range(len(layers)), [l.weight_sqnr_db for l in layers.values()], color="#1f6feb")
        axis.set_yticks(range(len(layers)), list(layers), fontsize=7)
        axis.invert_yaxis()
        axis.set_xlabel("weight SQNR (dB), higher is better")
        plot = inline_png(figure)
    else:
        figure, axis = new_figure(10, max(2.5, 0.18 * len(measured)))
        positions = range(len(measured))
        axis.barh([p + 0.2 for p in positions], [m[2] for m in measured], height=0.4, label="round-to-nearest",
                  color="#bbbbbb")
        axis.barh([p - 0.2 for p in positions], [m[1] for m in measured], height=0.4, label=quantize.algorithm,
                  color="#1f6feb")
        axis.set_yticks(list(positions), [m[0] for m in measured], fontsize=7)
        axis.invert_yaxis()
        axis.set_xlabel("relative output error on calibration inputs")
        axis.legend()
        plot = inline_png(figure)
    calibration = quantize.calibration
    note = (f"calibration: {calibration.samples} x {calibration.seq_len} tokens from "
            f"{calibration.source} (sha256 {calibration.sha256[:12]}...)" if calibration
            else "data-free recipe: no calibration text")
    return (f"<h2>Quantization</h2><p>{escape(note)}; {quantize.seconds:.1f} s</p>{plot}"
            f"{plan_curve(quantize.plan)}"
            + html_table(["layer", "scheme", "rel. error", "RTN rel. error", "SQNR dB", "fallback"], rows, numeric_from=2))


def plan_curve(plan: dict | None) -> str:
    """The budget planner's estimated KLD against bits per weight, the chosen plan marked ("" without a plan)."""
    if not plan:
        return ""
    figure, axis = new_figure(6, 3)
    curve = plan["curve"]
    axis.plot([p["bits_per_weight"] for p in curve], [p["estimated_kld"] for p in curve], marker=".",
              color="#1f6feb", label="plans (estimated)")
    axis.scatter([u["bits_per_weight"] for u in plan["uniform"]], [u["estimated_kld"] for u in plan["uniform"]],
                 color="#bbbbbb", label="uniform (estimated)")
    axis.scatter([plan["bits_per_weight"]], [plan["measured_kld"]], color="#d1242f", zorder=3,
                 label="chosen (measured)")
    axis.set_yscale("log")
    axis.set_xlabel("bits per weight, block linears")
    axis.set_ylabel("KLD (nats)")
    axis.legend(fontsize=7)
    line = (f"plan: {plan['layers']}; {plan['bits_per_weight']:.3f} bits per weight, KLD measured "
            f"{plan['measured_kld']:.4f} on {plan['measured_on']}")
    return f"<p>{escape(line)}</p>{inline_png(figure)}"


def _export_section(export: ExportStage | None) -> str:
    from edgeforge.export.guard import describe as describe_guard

    if not export:
        return ""
    report = export.report
    rows = [["artifact", export.artifact], ["format / scheme", f"{export.format} / {export.scheme}"],
            ["size", f"{report.size_bytes:,} bytes ({report.size_ratio_to_expected:.2f}x what the scheme implies)"],
            ["parameters", f"{report.parameters:,} ({report.bytes_per_parameter:.3f} bytes each)"],
            ["KV cache length", export.max_seq_len],
            ["export", f"{report.export_seconds:.1f} s, peak RSS {report.peak_rss_bytes / 2**20:.0f} MiB"]]
    if report.delegated_ops is not None:
        outside = ", ".join(f"{op} x{n}" for op, n in (report.ops_outside_delegate or {}).items()) or "none"
        rows.append(["delegation", f"{report.delegated_ops}/{report.total_ops} ops, "
                                   f"{report.delegated_parameter_share or 0:.1%} of parameters; outside: {outside}"])
    if export.guard:
        rows.append(["export guard", describe_guard(export.guard)])
    if report.size_warning:
        rows.append(["warning", report.size_warning])
    return "<h2>Export</h2>" + html_table(["", ""], rows, numeric_from=9)


def _verify_section(verify: VerifyReport | None) -> str:
    if not verify:
        return ""
    drift, embedding = verify.drift, verify.embedding
    rows, plot = [], ""
    if drift:
        rows = [["tokens", drift.token_count],
                ["perplexity ref / test", f"{drift.ppl_ref:.4f} / {drift.ppl_test:.4f}"],
                ["ppl ratio", f"{drift.ppl_ratio:.4f} ± {drift.ppl_ratio_sem:.4f}"],
                ["mean KLD (nats)", f"{drift.kld_mean_nats:.5f} ± {drift.kld_mean_nats_sem:.5f}"],
                ["KLD median / p90 / p99 / max", " / ".join(f"{value:.5f}" for value in (
                    drift.kld_median_nats, drift.kld_p90_nats, drift.kld_p99_nats, drift.kld_max_nats))],
                ["same top token", f"{drift.top1_agreement:.2%} ± {drift.top1_agreement_sem:.2%}"],
                ["RMS Δp", f"{drift.rms_delta_p:.4f} ± {drift.rms_delta_p_sem:.4f}"]]
        windows = verify.samples.window_kld_mean_nats
        if windows:
            figure, axis = new_figure(7, 3)
            axis.hist(windows, bins=min(30, max(5, len(windows) // 2)), color="#1f6feb")
            for label, value, style in (("median", drift.kld_median_nats, "--"), ("p90", drift.kld_p90_nats, ":"),
                                        ("p99", drift.kld_p99_nats, "-.")):
                axis.axvline(value, color="#cf222e", linestyle=style, label=f"per-token {label}")
            axis.set_xlabel("KL divergence (nats): histogram of per-window means, per-token percentiles marked")
            axis.set_ylabel("windows")
            axis.legend(fontsize=7)
            plot = inline_png(figure)
    if embedding:
        rows += [["sentences", embedding.sentence_count],
                 ["cosine mean / p1 / min", f"{embedding.cosine_mean:.5f} / {embedding.cosine_p1:.5f} / "
                                            f"{embedding.cosine_min:.5f}"],
                 [f"recall@{embedding.neighbours}", f"{embedding.recall_at_k:.3f}"]]
    for gate in verify.gates:
        rows.append([f"gate {gate.gate}", f"{'PASS' if gate.passed else 'FAIL'}: {gate.statistic} "
                                          f"{gate.value:.5f} {gate.op} {gate.threshold}"])
    data = verify.data
    return (f"<h2>Drift of the artifact against the fp32 reference</h2><p class='muted'>evaluation text "
            f"{escape(data.path)} (sha256 {escape(data.sha256[:12])}...), run in the artifact's own runtime</p>"
            + plot + html_table(["", ""], rows, numeric_from=9))


def _bench_section(bench: BenchReport | None) -> str:
    if not bench:
        return ""
    rows, names, series = [], [], {}
    for model in bench.models:
        for test in model.tests:
            rows.append([model.role, model.label, test.name, f"{test.tok_s.median:.1f}", f"{test.tok_s.iqr:.1f}",
                         test.tok_s.n, f"{test.speedup.median:.2f}x" if test.speedup else "-"])
            if test.name not in names:
                names.append(test.name)
            series.setdefault(model.role, {})[test.name] = test.tok_s.median
    plot = ""
    if series:
        figure, axis = new_figure(7, 3)
        width = 0.8 / len(series)
        for index, (role, values) in enumerate(series.items()):
            axis.bar([i + index * width for i in range(len(names))], [values.get(n, 0) for n in names], width,
                     label=role, color="#1f6feb" if role != "reference" else "#bbbbbb")
        axis.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(names))], names)
        axis.set_ylabel("tokens/s (median)")
        axis.set_yscale("log")
        axis.legend()
        plot = inline_png(figure)
    ceilings = []
    for model in (model for model in bench.models if model.ceiling):
        ceiling = model.ceiling
        state = f"{ceiling.share:.2%}" if ceiling.valid else "INVALID (above 100%)"
        ceilings.append(f"{model.role}: {ceiling.bytes_per_token / 1e6:.3f} MB/token at "
                        f"{ceiling.bandwidth_gb_s:.1f} GB/s -> ceiling {ceiling.ceiling_tok_s:,.0f} tok/s, "
                        f"reached {state}")
    return ("<h2>Latency on this machine</h2>" + plot
            + html_table(["model", "label", "test", "t/s median", "IQR", "n", "vs reference"], rows, numeric_from=3)
            + "".join(f"<p>{escape(c)}</p>" for c in ceilings)
            + f"<p class='muted'>timed: {escape(bench.timed)}</p>")


def _provenance(report: ForgeReport) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in report.versions.items() if v)
    machine = report.bench.machine if report.bench else None
    cpu = f"{machine.cpu_model}, {machine.usable_cpus} CPUs" if machine else "not measured"
    return ("<h2>Provenance</h2>" + html_table(["", ""], [["created", report.created], ["versions", versions],
                                                       ["machine", cpu],
                                                       ["source sha256", report.source.sha256]], numeric_from=9))
