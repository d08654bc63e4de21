"""Command line for results files and run dirs:
python -m reports {compare,same,summary,plot,table,html,merge,export}.

Exit codes are meant for CI: 0 fine, 1 a regression was found (compare),
2 the input could not be used (missing or malformed CSV, bad arguments),
3 (compare) no regression, but the head lacks primary metrics the base has: missing
(unless --allow-removed), without a numeric value, or lost to damaged records.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence

from reports.csv_log import read_rows

EXIT_OK = 0
EXIT_REGRESSION = 1
EXIT_BAD_INPUT = 2
EXIT_HEAD_INCOMPLETE = 3


def _tolerance(text: str) -> float:
    """A worsening allowed: a negative one would call unchanged values improvements."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:      # also NaN
        raise argparse.ArgumentTypeError(f"must be >= 0 (in the metric's own units), got {text!r}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m reports",
        description="Summarize, compare and plot vlm-quant-bench results CSVs.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    compare = commands.add_parser(
        "compare",
        help="flag primary metrics that got worse from BASE to HEAD",
        description=(
            "Match primary-metric rows by (model, task, config_hash, metric) and print a "
            "markdown report for a PR comment. A regression is a drop beyond the tolerance "
            "whose paired bootstrap interval excludes zero (when both are run dirs with "
            "per-sample logs; otherwise the tolerance alone). Exits 1 on a regression, "
            "3 when the head lacks primary metrics of the base (missing, non-numeric, or lost "
            "to damage), 0 otherwise, 2 if an input cannot be used."
        ),
    )
    compare.add_argument("base", metavar="BASE", help="reference run: a results CSV or a run dir")
    compare.add_argument("head", metavar="HEAD", help="run under test: a results CSV or a run dir")
    compare.add_argument(
        "--tolerance",
        type=_tolerance,
        default=1.0,
        metavar="X",
        help="largest allowed worsening, in the metric's own units, >= 0 (default: 1.0)",
    )
    compare.add_argument(
        "--allow-removed",
        action="store_true",
        help="configs the base has and the head does not are intended removals, not missing results",
    )

    same = commands.add_parser(
        "same",
        help="check that two runs measured exactly the same values (refactors, faster paths)",
        description=(
            "Match every row by (test_id, metric) and list each value that differs, and each "
            "test or metric only one run has. Exits 0 when all values are identical, 1 otherwise."
        ),
    )
    same.add_argument("base", metavar="BASE.csv", help="results of the reference run")
    same.add_argument("head", metavar="HEAD.csv", help="results of the run under test")

    summary = commands.add_parser(
        "summary",
        help="print a table of each test's primary metric",
        description="Print a fixed-width table of each test's primary metric.",
    )
    summary.add_argument("results", metavar="RESULTS.csv", help="merged results file")

    plot = commands.add_parser(
        "plot",
        help="write one metric-vs-bpw PNG per (model, task)",
        description="Write one primary-metric-vs-bits-per-weight PNG per (model, task).",
    )
    plot.add_argument("results", metavar="RESULTS.csv", help="merged results file")
    plot.add_argument("--out", metavar="DIR", required=True, help="directory for the PNG files")

    table = commands.add_parser(
        "table",
        help="print markdown pivot tables of the primary metric by method and bit width",
        description=(
            "Print one markdown table per (model, task): a row per (method, components), a "
            "column per weight bit width, each cell 'value (rel%%) · bpw · quant seconds'. "
            "Passed tests' primary metrics are shown, and failed ones marked '(failed)'."
        ),
    )
    table.add_argument("results", metavar="RESULTS.csv", help="merged results file")
    table.add_argument("--model", metavar="M", help="only this model")
    table.add_argument("--task", metavar="T", help="only this task")
    table.add_argument(
        "--bits",
        type=_bit_widths,
        metavar="8,4,3,2",
        help="columns to show, in this order (default: every width found, descending)",
    )

    configs = commands.add_parser(
        "configs",
        help="print markdown tables by config: a row per config, a column per task",
        description=(
            "Print one markdown table per model: a row per config (unquantized first, then by weight bits), a column per "
            "task with the primary metric and the task's answer-format failure rate in brackets, "
            "and the config's quantization seconds."
        ),
    )
    configs.add_argument("results", metavar="RESULTS.csv", help="merged results file")
    configs.add_argument("--title", default="", help="a line printed above the tables")

    html = commands.add_parser(
        "html",
        help="write one self-contained HTML report page of a run",
        description=(
            "Write one HTML page with everything embedded (no external files): run metadata, "
            "per-task tables, plots, and the compare against BASE when given."
        ),
    )
    html.add_argument("run", metavar="RUN", help="a run dir or results CSV")
    html.add_argument("--base", metavar="BASE", help="compare against this run (run dir or CSV)")
    html.add_argument("-o", "--output", metavar="FILE",
                      help="where to write the page (default: RUN/report.html, or next to the CSV)")
    html.add_argument("--tolerance", type=_tolerance, default=1.0, metavar="X",
                      help="tolerance of the compare section (default: 1.0)")

    merge = commands.add_parser(
        "merge",
        help="join the run dirs of grid shards into one run dir",
        description=(
            "Join shard run dirs into OUT_DIR: results.csv (rows de-duplicated by test_id, "
            "metric and config_hash; the latest timestamp wins), junit.xml, samples/ and "
            "report.html. Damaged parts are skipped with a warning."
        ),
    )
    merge.add_argument("out", metavar="OUT_DIR", help="the merged run dir (created; must not be a shard)")
    merge.add_argument("shards", metavar="RUN_DIR", nargs="+", help="one run dir per shard")

    from reports.export import add_parser as add_export
    add_export(commands)
    return parser


def _bit_widths(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        # argparse turns this into a usage error, exit status 2.
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 8,4,3,2, got {text!r}"
        ) from None


def _run(args: argparse.Namespace) -> int:
    if args.command == "compare":
        from reports.compare import compare_runs
        from reports.compare_markdown import format_markdown
        from reports.runs import load_run

        base, head = load_run(args.base), load_run(args.head)
        comparison = compare_runs(base, head, args.tolerance, args.allow_removed)
        print(format_markdown(comparison, base.describe(), head.describe()))
        if comparison.head_missing:
            print(f"\n#### Missing or damaged in head ({len(comparison.head_missing)})\n")
            print("\n".join(f"- {line}" for line in comparison.head_missing))
            print(f"error: head lacks {len(comparison.head_missing)} primary result(s) of the base "
                  f"(first: {comparison.head_missing[0]})", file=sys.stderr)
        if comparison.regressed:
            return EXIT_REGRESSION
        return EXIT_HEAD_INCOMPLETE if comparison.head_missing else EXIT_OK
    if args.command == "html":
        from reports.html import write_report

        print(write_report(args.run, args.base, args.output, args.tolerance))
        return EXIT_OK
    if args.command == "merge":
        from reports.merge import merge_runs

        for warning in merge_runs(args.out, args.shards):
            print(f"warning: {warning}", file=sys.stderr)
        print(args.out)
        return EXIT_OK
    if args.command == "export":
        from reports.export import run_export

        record = run_export(args)
        print(f"{args.out}: {record['config']} ({record['w_bits']}, {record['quantized_linears']} Linears packed), "
              f"{record['format']}")
        if "real_cost" in record:
            cost = record["real_cost"]
            print(f"real cost on {args.device}: {cost['real_mem_mb']} MB loaded, {cost['real_tokens_per_s']} tokens/s "
                  f"at batch {cost['batch']} ({cost['kernel']}); written to {args.run}")
        return EXIT_OK
    if args.command == "same":
        from reports.compare import same_values

        report, identical = same_values(read_rows(args.base), read_rows(args.head))
        print(report)
        return EXIT_OK if identical else EXIT_REGRESSION
    if args.command == "summary":
        from reports.summary import format_summary

        print(format_summary(read_rows(args.results)))
        return EXIT_OK
    if args.command == "configs":
        from reports.config_table import format_config_tables

        print(format_config_tables(read_rows(args.results), args.title))
        return EXIT_OK
    if args.command == "table":
        from reports.pivot import format_tables

        print(format_tables(read_rows(args.results), args.model, args.task, args.bits))
        return EXIT_OK
    # Imported only here: matplotlib is slow to import and only plot needs it.
    from reports.plots import plot_results

    for path in plot_results(read_rows(args.results), args.out):
        print(path)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        return _run(args)
    except (OSError, ValueError, csv.Error) as error:
        # One line, no traceback: the message already names the file.
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
