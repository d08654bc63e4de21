"""The long-format results contract: one CSV row per (test, metric).

Every benchmark test writes rows with exactly these columns, in this order.
Keeping the contract in one module lets the writer, the reader and the
report tools agree on names and on how values are spelled in text.
"""

from __future__ import annotations

import math

CSV_COLUMNS: tuple[str, ...] = (
    "run_id",
    "commit",
    "timestamp",
    "test_id",
    "model",
    "task",
    "config",
    "method",
    "components",
    "w_bits",  # per component, e.g. "vision=4,language=4"
    "a_bits",
    "group_size",
    "sym",
    "config_hash",
    "metric",
    "value",
    "primary",  # "true" on the one headline metric of a test
    "higher_is_better",
    "fp_value",  # the same metric for the unquantized model
    "delta",  # value - fp_value
    "rel_delta",  # delta / fp_value
    "n_samples",
    "bpw",
    "quant_seconds",
    "eval_seconds",
    "peak_mem_mb",
    "device",
    "worker",
    "status",
    "weights",  # "trained", or "random-init": a performance row, never an accuracy figure
    "a_quant",  # how activations are quantized, e.g. a4-tensor-minmax-asym; "" at 16 bits
    # What was evaluated, so compare can tell rows measured on different data apart:
    "split",  # the task's evaluated split
    "data_source",  # the grid's `data:` of the task (embedded | DIR | hf:ID@REVISION)
    "sample_seed",  # the seed of the evaluated subset under a limit; "" for the whole split
    "subset",  # what a limited subset draws: "images" (each with all its questions) or "samples"
    # The packed export on a real int4 kernel (`python -m reports export --real-cost`); blank
    # where not measured (the suite itself scores fake-quantized weights):
    "real_mem_mb",  # the loaded model's device memory
    "real_tokens_per_s",  # greedy decode throughput at batch 1
)

# Columns added after the first release, with the value a file written before them means.
OPTIONAL_COLUMNS: dict[str, str] = {"weights": "trained", "a_quant": "", "split": "", "data_source": "",
                                    "sample_seed": "", "subset": "", "real_mem_mb": "", "real_tokens_per_s": ""}
RANDOM_INIT = "random-init"

# "crashed": the xdist worker running the test died (the main process records it).
STATUSES: tuple[str, ...] = ("passed", "failed", "error", "skipped", "crashed")


def metric_rows(common: dict[str, object], metrics: dict[str, float], fp_metrics: dict[str, float],
                primary_metric: str, higher_is_better: bool, measured: dict[str, object]) -> list[dict[str, object]]:
    """One row per metric of a finished test: `common` (who, what, where), the value beside the
    FP value of the same metric, and `measured` (n_samples, bpw, timings, memory)."""
    rows = []
    for metric, value in metrics.items():
        fp = fp_metrics.get(metric)
        rows.append({**common, "metric": metric, "value": value, "primary": metric == primary_metric,
                     "higher_is_better": higher_is_better, "fp_value": fp,
                     "delta": None if fp is None else value - fp,
                     "rel_delta": (value - fp) / fp if fp else None, **measured})
    return rows

# Booleans are spelled in lower case so the files read the same in any tool.
TRUE_TEXT = "true"
FALSE_TEXT = "false"


def format_cell(value: object) -> str:
    """Spell one Python value the way the contract stores it in text."""
    if value is None:
        return ""
    # bool before numbers: True is also an int and would otherwise print as "1".
    if isinstance(value, bool):
        return TRUE_TEXT if value else FALSE_TEXT
    if isinstance(value, float):
        # repr is the shortest text that reads back to the same float.
        return "" if math.isnan(value) else repr(value)
    return str(value)


def parse_float(cell: object) -> float | None:
    """Read a numeric cell; empty, unparsable or NaN cells mean "unknown".

    Numbers pass through too, so rows still in memory (not yet written
    and read back as text) can be summarized and compared the same way.
    """
    if cell is None or isinstance(cell, bool):
        return None
    if isinstance(cell, (int, float)):
        number = float(cell)
    else:
        try:
            number = float(str(cell).strip())
        except ValueError:
            return None
    return None if math.isnan(number) else number


def parse_bool(cell: object) -> bool | None:
    """Read a true/false cell; anything else means "unknown"."""
    if isinstance(cell, bool):
        return cell
    if cell is None:
        return None
    lowered = str(cell).strip().lower()
    if lowered in (TRUE_TEXT, "1", "yes"):
        return True
    if lowered in (FALSE_TEXT, "0", "no"):
        return False
    return None


def is_random_init(row: dict[str, object]) -> bool:
    return row.get("weights") == RANDOM_INIT


def is_primary(row: dict[str, object]) -> bool:
    return parse_bool(row.get("primary")) is True
