"""A Comparison as markdown for a pull-request comment: what needs attention first (regressions,
then improvements), then what could not be judged (not comparable), then the grid's changes
(added, removed configs); unchanged metrics folded away; input problems last."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from reports.compare import (ADDED, IMPROVEMENT, NOT_COMPARABLE, REGRESSION, REMOVED, UNCHANGED, Comparison,
                             Finding, compare_runs)
from reports.paired import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE
from reports.runs import Run

_SECTIONS = ((REGRESSION, "Regressions"), (IMPROVEMENT, "Improvements"), (NOT_COMPARABLE, "Not comparable"),
             (ADDED, "Added configs"), (REMOVED, "Removed configs"))
_HEADER = ("| config | model | task | metric | base | head | change | 95% CI | verdict |\n"
           "|---|---|---|---|---:|---:|---:|---|---|")


def _cell(text: str) -> str:
    # A pipe inside a cell would split it into two columns.
    return str(text).replace("|", "\\|")


def _number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def finding_cells(finding: Finding) -> tuple[str, ...]:
    """The cells of one finding, as both the markdown and the HTML report show them."""
    model, task, _hash, metric = finding.key
    verdict = finding.verdict
    if verdict == NOT_COMPARABLE or finding.reason.startswith("beyond tolerance"):
        verdict += f": {finding.reason}"
    if finding.interval is not None:
        interval = f"{finding.interval} on {finding.interval.n_paired} paired"
    else:
        # A judged change without an interval rests on the tolerance alone: say so where it is read.
        interval = "tolerance only" if finding.verdict in (REGRESSION, IMPROVEMENT) else "-"
    return (finding.config, model, task, metric, _number(finding.base and finding.base.value),
            _number(finding.head and finding.head.value), _number(finding.change, True), interval, verdict)


def _line(finding: Finding) -> str:
    return "| " + " | ".join(_cell(cell) for cell in finding_cells(finding)) + " |"


def _table(findings: list[Finding]) -> list[str]:
    return [_HEADER, *(_line(finding) for finding in findings)]


def _evidence(comparison: Comparison) -> str:
    judged = [finding for finding in comparison.findings
              if finding.verdict in (REGRESSION, IMPROVEMENT) or finding.reason.startswith("beyond tolerance")]
    paired = [finding for finding in judged if finding.interval is not None]
    text = (f"A change counts when it is beyond the tolerance ({comparison.tolerance:g}, in the metric's own "
            f"units) and, where both runs left per-sample logs, when its paired bootstrap {CONFIDENCE:.0%} "
            f"interval ({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}) excludes zero.")
    unpaired = [finding for finding in judged if finding.interval is None]
    if unpaired:
        reasons = sorted({finding.reason for finding in unpaired})
        text += (f" {len(unpaired)} change(s) beyond the tolerance were judged on the tolerance alone ("
                 + "; ".join(reasons) + ").")
    if paired:
        text += f" {len(paired)} were checked against their interval."
    return text


def format_markdown(comparison: Comparison, base_label: str = "", head_label: str = "") -> str:
    counts = {verdict: len(comparison.having(verdict)) for verdict, _ in _SECTIONS}
    compared = counts[REGRESSION] + counts[IMPROVEMENT] + len(comparison.having(UNCHANGED))
    lines = [f"### vlm-quant-bench compare: {counts[REGRESSION]} regression(s), {counts[IMPROVEMENT]} "
             f"improvement(s), {counts[NOT_COMPARABLE]} not comparable, {counts[ADDED]} added, "
             f"{counts[REMOVED]} removed", ""]
    if base_label or head_label:
        lines += [f"base: {base_label}  ", f"head: {head_label}", ""]
    lines += [_evidence(comparison), ""]
    for verdict, title in _SECTIONS:
        findings = comparison.having(verdict)
        if findings:
            lines += [f"#### {title} ({len(findings)})", "", *_table(findings), ""]
    unchanged = comparison.having(UNCHANGED)
    if unchanged:
        # GitHub renders <details> folded; a blank line after <summary> lets the table render.
        lines += [f"<details><summary>Unchanged ({len(unchanged)})</summary>", "", *_table(unchanged), "",
                  "</details>", ""]
    if comparison.problems:
        lines += ["#### Input problems", "", *(f"- {_cell(problem)}" for problem in comparison.problems), ""]
    lines.append(
        f"{counts[REGRESSION]} regression(s) among {compared} compared metrics (tolerance "
        f"{comparison.tolerance:g}); {counts[ADDED]} added, {counts[REMOVED]} removed, {counts[NOT_COMPARABLE]} "
        f"not comparable (measured on different samples or device kinds, or with random-init weights).")
    return "\n".join(lines)


def compare(base_rows: Sequence[dict[str, str]], head_rows: Sequence[dict[str, str]],
            tolerance: float = 1.0) -> tuple[str, bool]:
    """Rows in, (markdown report, whether anything regressed) out: tolerance only, since rows
    alone carry no per-sample logs."""
    comparison = compare_runs(Run(Path("base"), list(base_rows)), Run(Path("head"), list(head_rows)), tolerance)
    return format_markdown(comparison), comparison.regressed
