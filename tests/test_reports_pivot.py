"""Tests for `python -m reports table`: markdown pivot tables of the primary metric."""

from __future__ import annotations

from pathlib import Path

import pytest

from reports.__main__ import main
from reports.csv_log import PartWriter, read_rows
from reports.pivot import format_tables, uniform_bits


def row(config: str, method: str, components: str, w_bits: str, value: float, **overrides) -> dict:
    """A passed primary row, spelt the way the runtime session writes one."""
    fp_value = 95.0
    base = {
        "run_id": "run1",
        "test_id": f"benchmarks/test_vqav2.py::test_vqav2[llava-tiny-{config}]",
        "model": "llava-tiny",
        "task": "vqav2",
        "config": config,
        "method": method,
        "components": components,
        "w_bits": w_bits,
        "a_bits": 16,
        "group_size": -1,
        "metric": "accuracy",
        "value": value,
        "primary": True,
        "fp_value": fp_value,
        "rel_delta": (value - fp_value) / fp_value,
        "bpw": 16.0 if method == "fp" else 4.25,
        "quant_seconds": 0.0 if method == "fp" else 1.5,
        "status": "passed",
    }
    return {**base, **overrides}


FP = row("fp16", "fp", "none", "all=16", 95.0)


def table_of(tmp_path: Path, rows: list[dict], **options) -> str:
    """Write rows through the real writer and read them back, as the CLI would."""
    path = tmp_path / "results.csv"
    PartWriter(path).write_rows(rows)
    return format_tables(read_rows(path), **options)


def test_small_table_exact_text(tmp_path):
    rows = [
        FP,
        row("rtn-w8-vision", "rtn", "vision", "vision=8", 94.81, bpw=14.77, quant_seconds=0.36),
        row("rtn-w4-vision", "rtn", "vision", "vision=4", 93.48),
        row("gptq-w4-all", "gptq", "connector+language+vision",
            "connector=4,language=4,vision=4", 90.25),
    ]

    assert table_of(tmp_path, rows) == "\n".join([
        "### vqav2 (accuracy, llava-tiny)",
        "",
        "FP: 95.00",
        "",
        "| method | components | w8 | w4 |",
        "|---|---|---|---|",
        "| rtn | vision | 94.81 (-0.2%) · 14.77 · 0.36s | 93.48 (-1.6%) · 4.25 · 1.50s |",
        "| gptq | connector+language+vision | - | 90.25 (-5.0%) · 4.25 · 1.50s |",
    ])


def test_rows_ordered_by_method_then_components(tmp_path):
    rows = [FP] + [
        row(f"{method}-w4-{components}", method, components, f"{components}=4", 90.0)
        for method in ("zeroq", "awq", "gptq", "rtn", "brecq")
        for components in ("language", "connector+language+qformer+vision", "qformer", "vision")
    ]

    body = [line.split(" | ")[:2] for line in table_of(tmp_path, rows).splitlines()[6:]]

    methods = ["rtn", "gptq", "awq", "brecq", "zeroq"]
    components = ["vision", "qformer", "language", "connector+language+qformer+vision"]
    assert body == [[f"| {m}", c] for m in methods for c in components]


def test_bits_option_picks_and_orders_columns_and_missing_cells_are_dashes(tmp_path):
    rows = [FP, row("rtn-w2-vision", "rtn", "vision", "vision=2", 10.0),
            row("rtn-w8-vision", "rtn", "vision", "vision=8", 94.0),
            row("rtn-w4-language", "rtn", "language", "language=4", 80.0)]

    lines = table_of(tmp_path, rows, bits=[2, 3, 8]).splitlines()

    assert lines[4] == "| method | components | w2 | w3 | w8 |"
    assert lines[6].startswith("| rtn | vision | 10.00 (-89.5%) · 4.25 · 1.50s | - | 94.00")
    assert len(lines) == 7  # rtn-w4-language has no cell among the chosen widths


def test_only_measured_primary_rows_and_one_table_per_model_task(tmp_path):
    rows = [
        FP,
        row("rtn-w4-vision", "rtn", "vision", "vision=4", 93.0),
        row("rtn-w4-vision", "rtn", "vision", "vision=4", 50.0, metric="accuracy_other", primary=False),
        row("rtn-w2-vision", "rtn", "vision", "vision=2", 1.0, status="failed"),
        row("rtn-w3-vision", "rtn", "vision", "vision=3", 2.0, status="skipped"),
        row("fp16", "fp", "none", "all=16", 80.0, task="vizwiz", test_id="vizwiz-fp16"),
    ]

    text = table_of(tmp_path, rows)

    # Secondary metrics and skipped tests stay out; a missed expectation is shown, marked.
    assert "50.00" not in text and "2.00" not in text and "| w3 |" not in text
    assert "1.00 (" in text and "(failed)" in text
    assert [line for line in text.splitlines() if line.startswith("###")] == [
        "### vizwiz (accuracy, llava-tiny)", "### vqav2 (accuracy, llava-tiny)"]
    assert "FP: 80.00" in table_of(tmp_path, rows, task="vizwiz")


def test_group_size_variants_get_their_own_rows(tmp_path):
    rows = [FP] + [
        row(f"gptq-w{bits}-vision-g{group}", "gptq", "vision", f"vision={bits}", 90.0 + bits,
            group_size=group, test_id=f"t-{bits}-{group}")
        for bits in (4, 3) for group in (-1, 128)
    ]

    labels = [line.split(" | ")[1] for line in table_of(tmp_path, rows).splitlines()[6:]]

    assert labels == ["vision (g128)", "vision (per-channel)"]


def test_mixed_widths_are_named_below_the_table(tmp_path):
    rows = [FP, row("mix", "rtn", "language+vision", "language=8,vision=4", 91.0)]

    assert table_of(tmp_path, rows).endswith("Mixed widths, not in the table: mix (language=8,vision=4)")
    assert uniform_bits("qformer=3,vision=3") == 3 and uniform_bits("language=8,vision=4") is None


def test_cli_prints_tables(tmp_path, capsys):
    path = tmp_path / "results.csv"
    PartWriter(path).write_rows([FP, row("rtn-w4-vision", "rtn", "vision", "vision=4", 93.0)])

    assert main(["table", str(path), "--model", "llava-tiny", "--bits", "4"]) == 0
    assert "| rtn | vision | 93.00 (-2.1%) · 4.25 · 1.50s |" in capsys.readouterr().out


def exit_code(args: list[str]) -> int:
    try:
        return main(args)
    except SystemExit as stop:  # argparse reports a bad option by exiting
        return stop.code


@pytest.mark.parametrize(
    ("problem", "named"),
    [("missing file", "results.csv"), ("foreign header", "results.csv"),
     ("unknown model", "llava-typo"), ("bad bits", "'8,four'")],
)
def test_cli_bad_input_exits_2_with_a_clear_message(tmp_path, capsys, problem, named):
    path = tmp_path / "results.csv"
    args = ["table", str(path)]
    if problem == "foreign header":
        path.write_text("name,score\nfoo,1\n")
    elif problem != "missing file":
        PartWriter(path).write_rows([FP])
        args += ["--model", "llava-typo"] if problem == "unknown model" else ["--bits", "8,four"]

    code = exit_code(args)

    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and named in err
    if problem != "bad bits":  # argparse adds its usage line; our own errors are one line
        assert err.strip().count("\n") == 0
