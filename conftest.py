"""The vlm-quant-bench pytest plugin: options, grid -> parameters and marks, device pinning,
JUnit properties, CSV parts merged at session end, per-sample logs, summary and plots."""
from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")         # the suite never downloads at run time
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from fixtures.adapters.base import ModelMissing  # noqa: E402
from fixtures.bench import Bench, CaseResult, result_rows  # noqa: E402
from fixtures.grid import GridError, load_grid  # noqa: E402
from reports.csv_log import PartWriter, merge_parts, read_rows  # noqa: E402
from reports.summary import format_summary  # noqa: E402
from tasks.base import DataError, DataMissing  # noqa: E402

ROOT = Path(__file__).resolve().parent
DEFAULT_GRID = ROOT / "benchmarks" / "grids" / "default.yaml"
BENCH_KEY = pytest.StashKey[Bench]()
OUTCOME_KEY = pytest.StashKey[CaseResult]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vlm-quant-bench")
    group.addoption("--grid", default=str(DEFAULT_GRID), help="grid YAML (default: the embedded world)")
    group.addoption("--data-root", default=os.environ.get("VQB_DATA_ROOT", str(ROOT / "data")),
                    help="root of real datasets (a task's `data: DIR` is relative to it)")
    group.addoption("--cache-dir", default=os.environ.get("VQB_CACHE_DIR", str(ROOT / ".cache")),
                    help="generated embedded world and other caches")
    group.addoption("--report-dir", default=str(ROOT / "reports-out"),
                    help="where results.csv, junit.xml, samples/ and plots/ go")
    group.addoption("--limit", type=int, default=None, help="samples per task (overrides the grid)")
    group.addoption("--device", default="auto", help="auto | cpu | cuda | cuda:N")


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _report_dir(config: pytest.Config) -> Path:
    return Path(config.getoption("--report-dir")).resolve()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    grid_path = Path(config.getoption("--grid"))
    try:
        config._vqb_grid = load_grid(grid_path)  # type: ignore[attr-defined]
    except GridError as err:
        raise pytest.UsageError(str(err)) from None
    # Model names from the grid become marks (`-m llava-tiny`); register them for --strict-markers.
    for name in config._vqb_grid.models:  # type: ignore[attr-defined]
        config.addinivalue_line("markers", f"{name}: model {name} from the grid")
    report_dir = _report_dir(config)
    if not _is_worker(config) and _runs_benchmarks(config):
        config._vqb_run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"  # type: ignore[attr-defined]
        for stale in ("parts", "baselines"):  # a run starts clean; results.csv is replaced at the end
            for path in (report_dir / stale).glob("*"):
                path.unlink()
        if not config.option.xmlpath and config.getoption("--collect-only") is False:
            config.option.xmlpath = str(report_dir / "junit.xml")


def _runs_benchmarks(config: pytest.Config) -> bool:
    """The suite's own unit tests (`pytest tests`) leave the benchmark reports alone."""
    return not config.args or any("benchmarks" in str(arg) for arg in config.args)


def pytest_configure_node(node) -> None:  # xdist: hand the run id to each worker
    node.workerinput["vqb_run_id"] = getattr(node.config, "_vqb_run_id", "")


def _worker_id(config: pytest.Config) -> str:
    return config.workerinput["workerid"] if _is_worker(config) else "main"


def _pick_device(config: pytest.Config) -> torch.device:
    """Round-robin xdist workers over visible GPUs; CPU when there are none."""
    choice = config.getoption("--device")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        index = int(re.sub(r"\D", "", _worker_id(config)) or 0)
        return torch.device(f"cuda:{index % torch.cuda.device_count()}")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {choice}: no CUDA device visible")
    return torch.device(choice)


def _bench(config: pytest.Config) -> Bench:
    bench = config.stash.get(BENCH_KEY, None)
    if bench is None:
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
        bench = Bench(data_root=Path(config.getoption("--data-root")),
                      cache_dir=Path(config.getoption("--cache-dir")).resolve(),
                      run_dir=_report_dir(config), device=_pick_device(config),
                      limit=config.getoption("--limit"),
                      progress=config.getoption("capture") == "no")
        config.stash[BENCH_KEY] = bench
    return bench


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" not in metafunc.fixturenames:
        return
    task = getattr(metafunc.module, "TASK", None)
    cases = metafunc.config._vqb_grid.cases_for(task)  # type: ignore[attr-defined]
    params = [pytest.param(case, id=case.id,
                           marks=[getattr(pytest.mark, m) for m in case.mark_names]
                           + [pytest.mark.xdist_group(case.group)])
              for case in cases]
    if not params:
        params = [pytest.param(None, id="no-case", marks=pytest.mark.skip(reason=f"the grid has no case for {task}"))]
    metafunc.parametrize("case", params)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run all tasks of one (model, config) back to back, so each config is quantized once."""
    def key(item: pytest.Item):
        case = getattr(item, "callspec", None) and item.callspec.params.get("case")
        return (case.model.name, case.order) if case else ("", -1)
    items.sort(key=key)


@pytest.fixture
def outcome(case, request: pytest.FixtureRequest, record_property) -> CaseResult:
    """Evaluate the case (the FP baseline too, once per run) and record it everywhere."""
    bench = _bench(request.config)
    try:
        result = bench.run(case)
    except (DataMissing, ModelMissing) as err:
        pytest.skip(str(err))
    except DataError as err:
        pytest.fail(str(err), pytrace=False)
    request.node.stash[OUTCOME_KEY] = result
    for metric, value in result.result.metrics.items():
        record_property(f"metric.{metric}", round(value, 4))
        record_property(f"fp.{metric}", round(result.baseline.metrics.get(metric, float("nan")), 4))
    for component, bpw in result.quant.bpw.items():
        record_property(f"bpw.{component}", round(bpw, 4))
    for key, value in case.config.fingerprint().items():
        record_property(f"config.{key}", json.dumps(value))
    record_property("quant_seconds", round(result.quant.seconds, 3))
    record_property("eval_seconds", round(result.eval_seconds, 3))
    record_property("n_samples", result.result.n_samples)
    record_property("device", str(bench.device))
    _write_samples(bench, case, result)
    return result


def _write_samples(bench: Bench, case, result: CaseResult) -> None:
    path = bench.run_dir / "samples" / case.model.name / case.task.name / f"{case.config.name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as handle:
        for sample in result.result.samples:
            handle.write(json.dumps(sample) + "\n")
    tmp.replace(path)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    report = (yield).get_result()
    case = getattr(item, "callspec", None) and item.callspec.params.get("case")
    if not case or not (report.when == "call" or (report.when == "setup" and not report.passed)):
        return
    bench = _bench(item.config)
    status = {"passed": "passed", "failed": "failed" if report.when == "call" else "error",
              "skipped": "skipped"}[report.outcome]
    common = {"run_id": _run_id(item.config), "commit": _commit(), "test_id": _test_id(item),
              "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": str(bench.device), "worker": _worker_id(item.config), "status": status}
    rows = result_rows(item.stash.get(OUTCOME_KEY, None), case, common)
    PartWriter(bench.run_dir / "parts" / f"results-{_worker_id(item.config)}.csv").write_rows(rows)


def _test_id(item: pytest.Item) -> str:
    """The node id as a serial run spells it: under --dist loadgroup, xdist appends '@<group>'
    on its workers, and rows of one test must match across runs with and without -n."""
    marker = item.get_closest_marker("xdist_group")
    group = marker and (marker.args[0] if marker.args else marker.kwargs.get("name"))
    suffix = f"@{group}"
    return item.nodeid[:-len(suffix)] if group and item.nodeid.endswith(suffix) else item.nodeid


def _run_id(config: pytest.Config) -> str:
    return config.workerinput["vqb_run_id"] if _is_worker(config) else getattr(config, "_vqb_run_id", "")


_COMMIT: list[str] = []


def _commit() -> str:
    if not _COMMIT:
        try:
            out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True, timeout=10)
            _COMMIT.append(out.stdout.strip() or "unknown")
        except (OSError, subprocess.SubprocessError):
            _COMMIT.append("unknown")
    return _COMMIT[0]


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    if _is_worker(config) or not _runs_benchmarks(config):
        return
    report_dir = _report_dir(config)
    parts = sorted((report_dir / "parts").glob("results-*.csv"))
    if not parts:
        return
    out = report_dir / "results.csv"
    merge_parts(parts, out)
    config._vqb_rows = read_rows(out)  # type: ignore[attr-defined]
    try:
        from reports.plots import plot_results
        plot_results(config._vqb_rows, report_dir / "plots")  # type: ignore[attr-defined]
    except Exception as err:  # plots are a convenience: never lose the CSV over one
        config._vqb_plot_error = str(err)  # type: ignore[attr-defined]


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    rows = getattr(config, "_vqb_rows", None)
    if rows is None:
        return
    terminalreporter.section("vlm-quant-bench")
    terminalreporter.write_line(format_summary(rows))
    terminalreporter.write_line(f"results: {_report_dir(config) / 'results.csv'}")
    if getattr(config, "_vqb_plot_error", None):
        terminalreporter.write_line(f"plots skipped: {config._vqb_plot_error}")
