"""`python -m reports export RUN_DIR CONFIG --out DIR`: the quantized model behind a run's rows,
written as a compressed-tensors checkpoint (fixtures/runtime/export.py does the writing).

The run dir names the config and its config_hash; the grid (the default one unless --grid)
rebuilds the case, and must hash to what the run measured, so the checkpoint is the very model
that was scored. GPTQ and AWQ entries come from the suite's cache (--cache-dir) when the run
left them there; otherwise they are rebuilt from the same calibration batches, bit-identical.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from reports.csv_log import read_rows

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
    return export_measured(case, DataStore(Path(args.data_root), cache), ModelPool(device, cache), Path(args.out),
                           provenance)
