"""HTML pages: the validation report (self-contained, figures embedded) and the pipeline overview.

Both pages share one stylesheet (:data:`CSS`). The pipeline overview also comes as Markdown
(:func:`pipeline_page` returns both), for CI logs and pull requests.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["CSS", "pipeline_page", "render_html", "verdict_table_html"]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
td:first-child{text-align:left} tr.fail{background:#fde0e0} tr.pass{background:#e6f5e6}
.banner{font-size:22px;padding:8px 14px;display:inline-block;border-radius:4px}
.banner.pass{background:#2e7d32;color:#fff} .banner.fail{background:#c62828;color:#fff}
img{max-width:100%} pre{background:#f6f6f6;padding:8px;overflow:auto;font-size:12px} h3{margin-top:1.6em}
"""

_esc = html.escape


def _num(v: Any, spec: str) -> str:
    """``v`` formatted with ``spec``, or ``n/a`` for None and non-finite numbers."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return format(v, spec)


def _word(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _head(title: str) -> str:
    head = f"<meta charset='utf-8'><title>{_esc(title)}</title><style>{CSS}</style>"
    return f"<!DOCTYPE html><html><head>{head}</head><body>"


def _banner(ok: bool) -> str:
    return f"<div class='banner {'pass' if ok else 'fail'}'>{_word(ok)}</div>"


def _items(title: str, lines: Sequence[str]) -> str:
    return f"<h3>{title}</h3><ul>" + "".join(f"<li>{_esc(x)}</li>" for x in lines) + "</ul>" if lines else ""


def _details(title: str, obj: Any) -> str:
    return f"<details><summary>{title}</summary><pre>{_esc(json.dumps(obj, indent=1))}</pre></details>"


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------


def verdict_table_html(summary: Mapping[str, Any]) -> str:
    """The verdict table of a ``summary.json`` as an HTML ``<table>``."""
    head = (
        "<tr><th>statistic</th><th>bins</th><th>max |Δμ/μ|</th><th>max |Δμ|/SE (allowed)</th>"
        "<th>σ ratio</th><th>χ²/dof</th><th>p</th><th>corr rms (allowed)</th><th>mean</th><th>std</th>"
        "<th>corr</th><th>verdict</th></tr>"
    )
    rows = [head]

    def mark(v: Any) -> str:
        return "–" if v is None else ("✓" if v else "✗")

    for r in summary.get("table", []):
        ok = r["pass_pass"]
        chi = f"{_num(r['chi2'], '.1f')}/{r['dof']}" if r["chi2"] is not None else "n/a"
        rows.append(
            f"<tr class='{'pass' if ok else 'fail'}'><td>{_esc(r['statistic'])}</td><td>{r['bins']}</td>"
            f"<td>{_num(r['max_abs_frac_error'], '.2%')}</td>"
            f"<td>{_num(r['max_abs_z'], '.2f')} ({_num(r['z_allowed'], '.2f')})</td>"
            f"<td>{_num(r['std_ratio_min'], '.3f')}–{_num(r['std_ratio_max'], '.3f')}</td>"
            f"<td>{chi}</td><td>{_num(r['pvalue'], '.1e')}</td>"
            f"<td>{_num(r['corr_rms'], '.3f')} ({_num(r['corr_tolerance'], '.3f')})</td>"
            f"<td>{mark(r['pass_mean'])}</td><td>{mark(r['pass_std'])}</td><td>{mark(r['pass_corr'])}</td>"
            f"<td><b>{_word(ok)}</b></td></tr>"
        )
    mem = summary.get("memorization") or {}
    if mem.get("status") == "done":
        ok = mem["pass"]
        rows.append(
            f"<tr class='{'pass' if ok else 'fail'}'><td>memorisation</td><td colspan='10'>near copies "
            f"{mem['near_fraction_candidate']:.1%} (held-out {mem['near_fraction_heldout']:.1%}), median "
            f"distance ratio {mem['median_ratio']:.3f}, Mann–Whitney p = {mem['mannwhitney_pvalue']:.1e}"
            f"</td><td><b>{_word(ok)}</b></td></tr>"
        )
    return "<table class='verdicts'>" + "\n".join(rows) + "</table>"


def _img(folder: Path, name: str | None, embed: bool) -> str:
    if not name:
        return ""
    if embed:
        data = base64.b64encode((folder / name).read_bytes()).decode("ascii")
        return f"<img alt='{_esc(name)}' src='data:image/png;base64,{data}'/>"
    return f"<img alt='{_esc(name)}' src='{_esc(name)}'/>"


def _inputs_line(inp: Mapping[str, Any]) -> str:
    ref, cand = inp["reference"], inp["candidate"]
    return (
        f"<p>reference: <code>{_esc(ref['path'])}</code> ({ref['split']} split, {ref['n_maps_used']} maps) "
        f"&nbsp; candidate: <code>{_esc(cand['path'])}</code> ({cand['split']} split, {cand['n_maps_used']} maps)</p>"
    )


def render_html(summary: Mapping[str, Any], folder: str | os.PathLike, embed: bool = True) -> str:
    """A self-contained HTML report of a validation (figures from ``folder``, embedded as base64)."""
    folder = Path(folder)
    inp = summary["inputs"]
    figs = summary.get("figures", {})
    parts = [
        _head("lensflow validation"),
        "<h1>lensflow validation report</h1>",
        _banner(summary["pass"]),
        _inputs_line(inp),
        f"<p>lensflow {_esc(str(summary.get('lensflow_version')))}, {_esc(summary.get('created', ''))}; "
        f"noise: {_esc(json.dumps(summary['config'].get('noise')))}; smoothing σ "
        f"{summary['summary_config']['smoothing_arcmin']} arcmin</p>",
        "<h2>Verdicts</h2>",
        verdict_table_html(summary),
        _items("Failures", summary.get("failures") or []),
        _items("Warnings", summary.get("warnings") or []),
        "<p>Tolerances: " + _esc(json.dumps(summary["tolerances"])) + ". Per-bin thresholds are "
        "raised for the number of bins of each statistic (Šidák); the std and correlation tolerances "
        "are widened by the sampling noise of the comparison (see <code>lensflow.compare</code>).</p>",
        "<h2>Sample maps</h2>" + _img(folder, figs.get("sample_maps"), embed),
        "<h2>Memorisation</h2>",
    ]
    mem = summary.get("memorization") or {}
    if mem.get("status") == "done":
        parts.append(_img(folder, figs.get("nearest_neighbour"), embed))
    else:
        parts.append(f"<p>{_esc(str(mem.get('note', 'not run')))}</p>")
    parts.append("<h2>Statistics</h2>")
    for name in summary["statistics"]:
        parts.append(f"<h3>{_esc(name)}</h3>")
        parts.append(_img(folder, figs.get("statistics", {}).get(name), embed))
        parts.append(_img(folder, figs.get("correlations", {}).get(name), embed))
    prov = {k: {kk: inp[k].get(kk) for kk in ("path", "kind", "created_by", "extra")} for k in inp}
    parts += [
        "<h2>Provenance</h2>",
        _details("inputs", prov),
        _details("this validation", summary.get("provenance")),
        _details("statistics configuration", summary.get("summary_config")),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------------------------------


def pipeline_page(
    name: str,
    run_dir: str | os.PathLike,
    records: Mapping[str, Mapping[str, Any]],
    stages: Sequence[str],
    train_summary: Mapping[str, Any],
    page_dir: str | os.PathLike,
) -> tuple[str, str]:
    """The overview of one pipeline run as (HTML page, Markdown).

    Args:
        name: the experiment's name.
        run_dir: the pipeline folder.
        records: each stage's record (``stage.json``): fingerprint, seconds, finished time, outputs.
        stages: the stages listed in the table, in order.
        train_summary: the training run's ``summary.json`` (may be empty).
        page_dir: where the page is written (links to the validation reports are relative to it).
    """
    r = records
    val, gen = r["validate"]["outputs"], r["generate"]["outputs"]
    verdict = _word(val["pass"])
    bpd = train_summary.get("best_val_bits_per_dim")
    stage_rows = [
        (s, str(r[s]["fingerprint"])[:16], r[s].get("seconds", ""), r[s].get("finished_utc", "")) for s in stages
    ]
    results = []
    for res in val["results"]:
        link = os.path.relpath(Path(res["out"]) / "report.html", page_dir)
        results.append((res["label"], res["pass"], "; ".join(res["failures"][:5]) or "-", link))
    md = [
        f"# lensflow pipeline: {name}",
        "",
        f"**Verdict: {verdict}**",
        "",
        f"Run folder: `{run_dir}`",
        "",
        "| stage | fingerprint | seconds | finished |",
        "|---|---|---|---|",
        *(f"| {s} | `{fp}` | {sec} | {fin} |" for s, fp, sec, fin in stage_rows),
        "",
        f"- training store: `{r['simulate']['outputs']['store']}`",
        f"- checkpoint: `{r['train']['outputs']['checkpoint']}`",
        f"  (sha256 {r['train']['fingerprint']})",
        f"- best validation bits/dim: {bpd}",
        f"- mocks: `{gen['mocks']}` ({gen['n_maps']} maps)",
        "",
        "| selection | verdict | failures | report |",
        "|---|---|---|---|",
        *(
            f"| {lab} | {'pass' if ok else 'FAIL'} | {fails} | [report.html]({link}) |"
            for lab, ok, fails, link in results
        ),
    ]
    page = [
        _head(f"lensflow pipeline {name}"),
        f"<h1>lensflow pipeline: {_esc(name)}</h1>",
        _banner(val["pass"]),
        f"<p>Run folder: <code>{_esc(str(run_dir))}</code></p>",
        "<h2>Stages</h2><table><tr><th>stage</th><th>fingerprint</th><th>seconds</th><th>finished (UTC)</th></tr>",
        *(
            f"<tr><td>{s}</td><td><code>{_esc(fp)}</code></td><td>{sec}</td><td>{_esc(str(fin))}</td></tr>"
            for s, fp, sec, fin in stage_rows
        ),
        "</table><h2>Inputs and outputs</h2><ul>",
        f"<li>training store: <code>{_esc(r['simulate']['outputs']['store'])}</code></li>",
        f"<li>checkpoint: <code>{_esc(r['train']['outputs']['checkpoint'])}</code> "
        f"(sha256 {_esc(r['train']['fingerprint'])})</li>",
        f"<li>best validation bits/dim: {_esc(str(bpd))}</li>",
        f"<li>mocks: <code>{_esc(gen['mocks'])}</code> ({gen['n_maps']} maps)</li></ul>",
        "<h2>Validation</h2><table><tr><th>selection</th><th>verdict</th><th>failures</th><th></th></tr>",
        *(
            f"<tr class='{'pass' if ok else 'fail'}'><td>{_esc(lab)}</td><td>{'pass' if ok else 'FAIL'}</td>"
            f"<td>{_esc(fails)}</td><td><a href='{_esc(link)}'>report</a></td></tr>"
            for lab, ok, fails, link in results
        ),
        "</table></body></html>",
    ]
    return "\n".join(page) + "\n", "\n".join(md) + "\n"
