"""`python -m reports export RUN_DIR CONFIG --out DIR`: the quantized model behind a run's rows,
written as a compressed-tensors checkpoint (fixtures/runtime/export.py does the writing).

The run dir names the config and its config_hash; the grid (the default one unless --grid)
rebuilds the case, and must hash to what the run measured, so the checkpoint is the very model
that was scored. GPTQ and AWQ entries come from the suite's cache (--cache-dir) when the run
left them there; otherwise they are rebuilt from the same calibration batches, bit-identical.

--real-cost then loads the checkpoint with its packed Linears on the int4 kernel
(fixtures/runtime/real_cost.py) on --device and fills the columns real_mem_mb and
real_tokens_per_s (greedy decode, batch 1) of the config's rows in the run's results.csv.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from reports.csv_log import read_rows, write_results

ROOT = Path(__file__).resolve().parents[1]


def add_parser(commands) -> None:
    export = commands.add_parser(
        "export",
        help="write a config a run measured as a packed compressed-tensors checkpoint",
        description=(
            "Rebuild the quantized model of CONFIG as RUN measured it (checked by config_hash) and "
            "write it to --out as a compressed-tensors pack-quantized checkpoint, which transformers "
            "and vLLM load. Exits 2 when the config has no packed form (the message says why)."
        ),
    )
    export.add_argument("run", metavar="RUN_DIR", help="a run dir (its results.csv names the config)")
    export.add_argument("config", metavar="CONFIG", help="the config's name in the grid")
    export.add_argument("--out", metavar="DIR", required=True, help="the checkpoint folder: new, empty, or an earlier export (replaced)")
    export.add_argument("--grid", default=str(ROOT / "benchmarks" / "grids" / "default.yaml"),
                        help="the grid the run used (default: the embedded default grid)")
    export.add_argument("--model", help="the model, when the run measured the config on several")
    export.add_argument("--cache-dir", default=os.environ.get("VQB_CACHE_DIR", str(ROOT / ".cache")),
                        help="the suite's cache (calibrated entries, the embedded world)")
    export.add_argument("--data-root", default=os.environ.get("VQB_DATA_ROOT", str(ROOT / "data")),
                        help="real datasets, for calibration splits outside the embedded world")
    export.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (where the config is quantized)")
    export.add_argument("--real-cost", action="store_true",
                        help="then load the export on the int4 kernel on --device and write its memory and "
                             "decode tokens/s (batch 1) into the config's rows of the run's results.csv")


def run_export(args: argparse.Namespace) -> dict:
    import torch

    from fixtures.runtime.data import DataStore
    from fixtures.runtime.export import export_measured, measured_case
    from fixtures.runtime.grid import load_grid
    from fixtures.runtime.models import ModelPool
    from fixtures.runtime.session import git_commit

    run = Path(args.run)
    rows = read_rows(run / "results.csv" if run.is_dir() else run)
    case = measured_case(rows, load_grid(Path(args.grid)), args.config, args.model)
    device = torch.device(args.device)
    cache = Path(args.cache_dir).resolve()
    run_ids = sorted({r["run_id"] for r in rows if r.get("config") == args.config})
    provenance = {"run": str(run), "run_id": ",".join(run_ids), "grid": str(args.grid), "commit": git_commit()}
    record = export_measured(case, DataStore(Path(args.data_root), cache), ModelPool(device, cache),
                             Path(args.out), provenance)
    if args.real_cost:
        record["real_cost"] = record_real_cost(run / "results.csv" if run.is_dir() else run, rows, case,
                                               Path(args.out), device)
    return record


def record_real_cost(results: Path, rows: list[dict], case, checkpoint: Path, device) -> dict:
    """Measure the export on the int4 kernel and write real_mem_mb / real_tokens_per_s into the
    rows of this config and model; the file is replaced whole (atomically), other rows as read."""
    from fixtures.runtime.real_cost import measure_checkpoint

    cost = measure_checkpoint(checkpoint, device)
    for row in rows:
        if row.get("config") == case.config.name and row.get("model") == case.model.name:
            row.update(real_mem_mb=cost["real_mem_mb"], real_tokens_per_s=cost["real_tokens_per_s"])
    write_results(rows, results)
    return cost
