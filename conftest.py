"""The vlm-quant-bench pytest plugin. Its hooks only translate between pytest and the runtime:
options -> a Session (fixtures/runtime/session.py), the grid -> parameters and marks, a test's
report -> a recorded row. State lives in pytest's stash, on the config and on each item."""
from __future__ import annotations

import contextlib
import os
import re
import uuid
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")         # the suite never downloads at run time
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from fixtures.adapters.base import ModelMissing  # noqa: E402
from fixtures.runtime.grid import Grid, GridError, check_layer_ranges, load_grid, schedule_order  # noqa: E402
from fixtures.runtime.invocation import (OptionError, check_cache_dir, check_device, check_limit,  # noqa: E402
                                         join_option_values)
from fixtures.runtime.session import (CaseResult, FinishedRun, Session, StopSignals, finish_run,  # noqa: E402
                                      run_identity, skipped_summary)
from fixtures.runtime.shard import Shard, in_shard, parse_shard  # noqa: E402
from quantizers.config import ACTIVATION_BITS, COMPONENT_NAMES, MAX_BITS, MIN_BITS  # noqa: E402
from quantizers.methods import all_methods  # noqa: E402
from quantizers.weighting import WEIGHTINGS  # noqa: E402
from reports.rundir import RunDir, RunDirError  # noqa: E402
from reports.summary import format_summary  # noqa: E402
from tasks.base import DataError, DataMissing  # noqa: E402
from tasks.registry import TASKS  # noqa: E402

ROOT = Path(__file__).resolve().parent
DEFAULT_GRID = ROOT / "benchmarks" / "grids" / "default.yaml"
GRID = pytest.StashKey[Grid]()
SESSION = pytest.StashKey[Session]()
RUN_ID = pytest.StashKey[str]()
FINISHED = pytest.StashKey[FinishedRun]()
OUTCOME = pytest.StashKey[CaseResult]()
RUN_DIR = pytest.StashKey[RunDir]()
SHARD = pytest.StashKey[Shard]()
RESUME_DONE = pytest.StashKey[set]()       # (config_hash, model, task) that passed before --resume
NOT_RECORDED = pytest.StashKey[bool]()
STOP = pytest.StashKey[StopSignals]()
MOVED_ASIDE = pytest.StashKey[Path]()       # where a new run put what an earlier run left in its dir
DEFAULT_REPORT_DIR = ROOT / "reports-out"
# The suite's options that take a value: handed to xdist workers as --option=value
# (fixtures/runtime/invocation.py says why).
VALUE_OPTIONS = ("--grid", "--data-root", "--cache-dir", "--report-dir", "--limit", "--device", "--shard",
                 "--resume")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vlm-quant-bench")
    group.addoption("--grid", default=str(DEFAULT_GRID), help="grid YAML (default: the embedded world)")
    group.addoption("--data-root", default=os.environ.get("VQB_DATA_ROOT", str(ROOT / "data")),
                    help="root of real datasets (a task's `data: DIR` is relative to it)")
    group.addoption("--cache-dir", default=os.environ.get("VQB_CACHE_DIR", str(ROOT / ".cache")),
                    help="generated embedded world and other caches")
    group.addoption("--report-dir", default=None,
                    help=f"where results.csv, junit.xml, samples/ and plots/ go (default: {DEFAULT_REPORT_DIR})")
    group.addoption("--limit", type=int, default=None, help="samples per task (overrides the grid)")
    group.addoption("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    group.addoption("--shard", default=None, metavar="I/N",
                    help="run shard I of N: whole (model, config) groups, balanced by estimated cost")
    group.addoption("--resume", default=None, metavar="RUN_DIR",
                    help="run only the tests without a passed row in RUN_DIR and add to it")


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _worker_id(config: pytest.Config) -> str:
    return config.workerinput["workerid"] if _is_worker(config) else "main"


def _report_root(config: pytest.Config) -> Path:
    """--resume's run dir, else --report-dir, else the default; both given must agree."""
    resume, report = config.getoption("--resume"), config.getoption("--report-dir")
    if resume and report and Path(resume).resolve() != Path(report).resolve():
        raise pytest.UsageError(f"--resume {resume} writes to that run dir; drop --report-dir {report}")
    return Path(resume or report or DEFAULT_REPORT_DIR).resolve()


def _run_dir(config: pytest.Config) -> RunDir:
    if RUN_DIR not in config.stash:
        tag = config.workerinput.get("vqb_part_tag", "") if _is_worker(config) else ""
        config.stash[RUN_DIR] = RunDir(_report_root(config), tag)
    return config.stash[RUN_DIR]


def _runs_benchmarks(config: pytest.Config) -> bool:
    """The suite's own unit tests (`pytest tests`) leave the benchmark reports alone."""
    return not config.args or any("benchmarks" in str(arg) for arg in config.args)


def _register_marks(config: pytest.Config, grid: Grid) -> None:
    """Every mark a parameter can carry, from the registries and the grid (marks are strict)."""
    marks = {"fp16": "the unquantized baseline"}
    marks.update({f"w{b}": f"a component quantized to {b}-bit weights" for b in range(MIN_BITS, MAX_BITS + 1)})
    marks.update({f"a{b}": f"{b}-bit activations" for b in ACTIVATION_BITS})
    marks.update({name: f"method {name}" for name in all_methods()})
    marks.update({name: f"calibration tokens weighted by {name} (AWQ/GPTQ params.weighting)"
                  for name in WEIGHTINGS if name != "uniform"})
    marks.update({name: f"the {name} component is quantized" for name in COMPONENT_NAMES})
    marks.update({name: f"task {name}" for name in TASKS})
    marks.update({name: f"model {name} from the grid" for name in grid.models})
    for name, help_text in marks.items():
        config.addinivalue_line("markers", f"{name}: {help_text}")


def _cuda_devices() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Everything a run could fail on for its options or its grid fails here, before any test,
    as one usage error line (exit 4)."""
    try:
        grid = load_grid(Path(config.getoption("--grid")))
        check_device(config.getoption("--device"), _cuda_devices())
        check_limit(config.getoption("--limit"))
        if config.getoption("--shard"):
            config.stash[SHARD] = parse_shard(config.getoption("--shard"))
        if not _is_worker(config) and _runs_benchmarks(config):
            check_layer_ranges(grid, ROOT)
            if not config.getoption("--collect-only"):
                check_cache_dir(Path(config.getoption("--cache-dir")))
    except (GridError, OptionError, ValueError) as err:
        raise pytest.UsageError(str(err)) from None
    config.stash[GRID] = grid
    _register_marks(config, grid)
    if _is_worker(config) or _runs_benchmarks(config):
        config.stash[STOP] = StopSignals()
        config.stash[STOP].install()
    if _is_worker(config):
        config.stash[RUN_ID] = config.workerinput["vqb_run_id"]
        config.stash[RESUME_DONE] = {tuple(key) for key in config.workerinput["vqb_resume_done"]}
    elif _runs_benchmarks(config):
        config.stash[RUN_ID] = run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
        _claim_run_dir(config, run_id)
        # xdist starts (and restarts) workers with this command line: spell it so that their
        # pre-parse cannot take an option's value for a test path (fixtures/runtime/invocation.py).
        params = config.invocation_params
        config.invocation_params = pytest.Config.InvocationParams(
            args=join_option_values(params.args, VALUE_OPTIONS), plugins=params.plugins, dir=params.dir)


def _claim_run_dir(config: pytest.Config, run_id: str) -> None:
    """Check, lock and prepare the run dir before any test, so that an unusable one is one usage
    error now and a second run writing to it is refused."""
    resume = bool(config.getoption("--resume"))
    run_dir = RunDir(_report_root(config), run_id if resume else "")
    config.stash[RUN_DIR] = run_dir
    identity = run_identity(config.stash[GRID].cases, config.getoption("--limit"))
    try:
        if resume:
            run_dir.check_resumable(identity)
        config.stash[RESUME_DONE] = run_dir.passed_keys() if resume else set()
        if config.getoption("--collect-only"):      # writes nothing: leaves the dir to its owner
            return
        run_dir.check_writable()
        run_dir.claim(run_id)
    except RunDirError as err:
        raise pytest.UsageError(str(err)) from None
    moved = run_dir.start(run_id if resume else None)
    if moved:
        config.stash[MOVED_ASIDE] = moved
    run_dir.write_identity(identity)
    if not config.option.xmlpath:
        config.option.xmlpath = str(run_dir.junit_xml)


def pytest_unconfigure(config: pytest.Config) -> None:
    if RUN_DIR in config.stash:
        config.stash[RUN_DIR].release()
    if STOP in config.stash:
        config.stash[STOP].restore()


def pytest_report_header(config: pytest.Config) -> list[str]:
    if MOVED_ASIDE in config.stash:
        return [f"vlm-quant-bench: {_moved_aside_line(config)}"]
    return []


def _moved_aside_line(config: pytest.Config) -> str:
    moved = config.stash[MOVED_ASIDE]
    return f"an earlier run's results in {moved.parent.parent} were moved to {moved}"


def pytest_configure_node(node) -> None:  # xdist: what every worker (and its replacement) shares
    config = node.config
    node.workerinput["vqb_run_id"] = config.stash.get(RUN_ID, "")
    node.workerinput["vqb_part_tag"] = _run_dir(config).part_tag
    # Fixed at the start: a worker restarted mid-run must collect exactly what the others did.
    node.workerinput["vqb_resume_done"] = sorted(config.stash.get(RESUME_DONE, set()))


def _pick_device(config: pytest.Config) -> torch.device:
    """Round-robin xdist workers over visible GPUs; CPU when there are none."""
    choice = config.getoption("--device")     # checked in pytest_configure
    if choice == "auto":
        choice = "cuda" if _cuda_devices() else "cpu"
    if choice == "cuda":
        index = int(re.sub(r"\D", "", _worker_id(config)) or 0)
        return torch.device(f"cuda:{index % _cuda_devices()}")
    return torch.device(choice)


def _session(config: pytest.Config) -> Session:
    if SESSION not in config.stash:
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
        config.stash[SESSION] = Session.create(
            data_root=Path(config.getoption("--data-root")), cache_dir=Path(config.getoption("--cache-dir")).resolve(),
            run_dir=_run_dir(config).root, device=_pick_device(config), limit=config.getoption("--limit"),
            run_id=config.stash.get(RUN_ID, ""), worker=_worker_id(config),
            progress=config.getoption("capture") == "no", part_tag=_run_dir(config).part_tag)
    return config.stash[SESSION]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" not in metafunc.fixturenames:
        return
    task = getattr(metafunc.module, "TASK", None)
    cases = metafunc.config.stash[GRID].cases_for(task)
    params = [pytest.param(case, id=case.id,
                           marks=[getattr(pytest.mark, m) for m in case.mark_names]
                           + [pytest.mark.xdist_group(case.group)])
              for case in cases]
    if not params:
        params = [pytest.param(None, id="no-case", marks=pytest.mark.skip(reason=f"the grid has no case for {task}"))]
    metafunc.parametrize("case", params)


def _case(item: pytest.Item):
    return getattr(item, "callspec", None) and item.callspec.params.get("case")


def _deselect(config: pytest.Config, items: list[pytest.Item], keep) -> None:
    dropped = [item for item in items if not keep(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if keep(item)]


@pytest.hookimpl(trylast=True)   # after -m/-k have deselected: shard and balance what will run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep this shard's groups and what --resume has not seen pass; then run all tasks of one
    (model, config) back to back, so each config is quantized once, in the order that balances
    xdist workers (grid.schedule_order)."""
    if SHARD in config.stash:
        shard = config.stash[SHARD]
        groups = in_shard([case for case in map(_case, items) if case], shard)
        # "no case" skips are no work: the first shard reports them.
        _deselect(config, items, lambda item: _case(item).group in groups if _case(item) else shard.index == 1)
    done = config.stash.get(RESUME_DONE, set())
    if done:
        _deselect(config, items, lambda item: not _case(item) or
                  (_case(item).config_hash, _case(item).model.name, _case(item).task.name) not in done)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cases = [case for case in map(_case, items) if case]
    rank = {group: position for position, group in enumerate(schedule_order(cases, workers))}

    def key(item: pytest.Item):
        case = _case(item)
        return (rank[case.group], case.order) if case else (len(rank), 0)   # "no case" skips last
    items.sort(key=key)


@pytest.fixture
def outcome(case, request: pytest.FixtureRequest, record_property) -> CaseResult:
    """Evaluate the case (the FP baseline too, once per run) and record it everywhere."""
    session = _session(request.config)
    if session.crashed_earlier(_test_id(request.node)):
        request.node.stash[NOT_RECORDED] = True     # its crashed row stands
        pytest.skip("crashed an xdist worker earlier in this run (status 'crashed'); --resume runs it again")
    try:
        result = session.run(case)
    except (DataMissing, ModelMissing) as err:
        pytest.skip(str(err))
    except DataError as err:
        pytest.fail(str(err), pytrace=False)
    request.node.stash[OUTCOME] = result
    for name, value in session.properties(result):
        record_property(name, value)
    return result


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    report = (yield).get_result()
    case = _case(item)
    if not case or item.stash.get(NOT_RECORDED, False) or not (report.when == "call" or (report.when == "setup" and not report.passed)):
        return
    status = {"passed": "passed", "failed": "failed" if report.when == "call" else "error",
              "skipped": "skipped"}[report.outcome]
    _session(item.config).record(case, item.stash.get(OUTCOME, None), status, _test_id(item),
                                 datetime.now(timezone.utc).isoformat(timespec="seconds"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    """Leave a note of the test in flight: if this worker dies in it, the main process reads the
    note (pytest_testnodedown) and records the test as crashed."""
    if not (_case(item) and _runs_benchmarks(item.config)):
        return (yield)
    run_dir, worker = _run_dir(item.config), _worker_id(item.config)
    run_dir.mark_running(worker, _test_id(item))
    try:
        return (yield)
    finally:
        run_dir.clear_running(worker)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """xdist, main process: a worker went down; with an error, it died in the test it noted."""
    if error and _runs_benchmarks(node.config):
        _session(node.config).record_crash(node.config.stash[GRID].cases, node.gateway.id,
                                           datetime.now(timezone.utc).isoformat(timespec="seconds"))


def _test_id(item: pytest.Item) -> str:
    """The node id as a serial run spells it: under --dist loadgroup, xdist appends '@<group>'
    on its workers, and rows of one test must match across runs with and without -n."""
    marker = item.get_closest_marker("xdist_group")
    group = marker and (marker.args[0] if marker.args else marker.kwargs.get("name"))
    suffix = f"@{group}"
    return item.nodeid[:-len(suffix)] if group and item.nodeid.endswith(suffix) else item.nodeid


@pytest.hookimpl(wrapper=True)
def pytest_sessionfinish(session: pytest.Session):
    """After every plugin's session end (junit.xml included), merge the results; signals are
    held meanwhile, so a second Ctrl-C or SIGTERM cannot cut the final writes short."""
    config = session.config
    stop = config.stash.get(STOP, None)
    with stop.holding() if stop else contextlib.nullcontext():
        outcome = yield
        if not (_is_worker(config) or not _runs_benchmarks(config) or config.getoption("--collect-only")):
            config.stash[FINISHED] = finish_run(_run_dir(config))
    return outcome


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    finished = config.stash.get(FINISHED, None)
    if finished is None:
        return
    terminalreporter.section("vlm-quant-bench")
    if finished.rows:
        terminalreporter.write_line(format_summary(finished.rows))
    terminalreporter.write_line(f"results: {_run_dir(config).results_csv} ({len(finished.rows)} rows)")
    if MOVED_ASIDE in config.stash:
        terminalreporter.write_line(_moved_aside_line(config))
    # Skips and their reasons (a missing model or dataset) by default; -rs lists them itself.
    if "s" not in terminalreporter.reportchars:
        for line in skipped_summary(terminalreporter.stats.get("skipped", [])):
            terminalreporter.write_line(line)
    for problem in finished.problems:
        terminalreporter.write_line(f"merge: {problem}")
    if finished.plot_error:
        terminalreporter.write_line(f"plots skipped: {finished.plot_error}")
    if finished.report_error:
        terminalreporter.write_line(f"report.html skipped: {finished.report_error}")
