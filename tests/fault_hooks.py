"""A pytest plugin for the fault tests only, loaded into a benchmark run with
`-p tests.fault_hooks` (xdist passes it on to every worker). It injects a fault into the test
whose node id contains the given text, after its evaluation (setup) and before its rows are
recorded (after the call), as a crash in a real evaluation would land:

    VQB_FAULT_KILL_AT=<text>        the process running that test kills itself with SIGKILL
                                    (only an original xdist worker, gw0 .. gw<n-1>: a crash
                                    that repeats on every replacement is xdist's own failure
                                    mode)
    VQB_FAULT_HOLD_AT=<text>        the worker running that test waits in it until a
                                    replacement worker has joined the run, i.e. until the main
                                    process has the replacement's collection (at most
                                    HOLD_LIMIT_S seconds, then the test fails)
    VQB_FAULT_INTERRUPT_AT=<text>   the process running that test gets SIGINT (Ctrl-C)
    VQB_FAULT_FAIL_AT=<text>        that test fails
    VQB_FAULT_SIGNAL_AT=<SIG>:<text>   the process running that test sends itself signal SIG
                                    (INT, TERM), as `kill` or a batch scheduler would
    VQB_FAULT_SIGNAL_IN_METEOR=<SIG>   the process sends itself SIG while COCO's METEOR scoring
                                    waits on its Java child (pycocoevalcap holds its lock then):
                                    at the first line it reads from the child. With
                                    VQB_FAULT_SIGNAL_LOG=<file>, it writes there the time it sent
                                    the signal and the Java child's pid, as JSON
    VQB_FAULT_SLOW_CACHE_WRITE=<s>  every quantized-model cache write waits <s> seconds first (a
                                    slow disk: the entry is still being written behind the run
                                    when its test ends)

Why a hold: pytest-xdist 3.8.0 gives a worker that joins after the start one unit of work from
what is left, and none when the other workers emptied the queue while it was starting (the
tiny grid's tests take a second, a worker takes ten or more to start). Under pytest 9 every test
is a unit of its own (the '@<group>' suffix xdist sets on `item._nodeid` no longer reaches the
node id), and a worker starts a test only once it knows the next one, so the replacement runs
its one test when the run shuts down. Holding the other worker's test until the replacement has
joined leaves it that test whatever the timing, so a fault test can check the replacement's
rows. The main process raises the flag from pytest_xdist_node_collection_finished, which xdist
calls before it schedules the new worker; the held worker's next report is handled only after
that, so the replacement gets its test before the held worker can take the rest.
"""
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

HOLD_LIMIT_S = 180.0
HOLD_FLAG = pytest.StashKey[Path]()     # main process: the file raised when a replacement joins
WORKER_DIED = pytest.StashKey[bool]()


def _matches(variable: str, item: pytest.Item) -> bool:
    """The variable holds one text or several, comma-separated."""
    return any(text and text in item.nodeid for text in os.environ.get(variable, "").split(","))


def _original_worker() -> bool:
    """Not an xdist replacement: gw0 .. gw<n-1> of n workers (or no xdist at all)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        return True
    return int(worker.removeprefix("gw")) < int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("VQB_FAULT_HOLD_AT") and not hasattr(config, "workerinput"):
        config.stash[HOLD_FLAG] = Path(tempfile.mkdtemp(prefix="vqb-fault-")) / "replacement-joined"
    if os.environ.get("VQB_FAULT_SIGNAL_IN_METEOR"):
        _signal_in_meteor(getattr(signal, "SIG" + os.environ["VQB_FAULT_SIGNAL_IN_METEOR"]))
    if os.environ.get("VQB_FAULT_SLOW_CACHE_WRITE"):
        _slow_cache_writes(float(os.environ["VQB_FAULT_SLOW_CACHE_WRITE"]))


def _slow_cache_writes(seconds: float) -> None:
    from quantizers.cache import QuantCache

    original_write = QuantCache._write

    def write(self, *args):
        time.sleep(seconds)
        original_write(self, *args)

    QuantCache._write = write


class _SignallingPipe:
    """METEOR's stdout pipe: the first readline sends the signal, then reads as usual. The
    signal's handler runs right there, inside Meteor.compute_score, with its lock held and its
    Java child alive: where a real Ctrl-C lands while METEOR computes."""

    def __init__(self, pipe, number: int, child_pid: int):
        self._pipe, self._number, self._child_pid, self._sent = pipe, number, child_pid, False

    def readline(self, *args):
        if not self._sent:
            self._sent = True
            log = os.environ.get("VQB_FAULT_SIGNAL_LOG")
            if log:
                Path(log).write_text(json.dumps({"sent": time.time(), "java_pid": self._child_pid}))
            os.kill(os.getpid(), self._number)
        return self._pipe.readline(*args)

    def __getattr__(self, name):
        return getattr(self._pipe, name)


def _signal_in_meteor(number: int) -> None:
    from pycocoevalcap.meteor import meteor

    original_init = meteor.Meteor.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.meteor_p.stdout = _SignallingPipe(self.meteor_p.stdout, number, self.meteor_p.pid)

    meteor.Meteor.__init__ = init


def pytest_unconfigure(config: pytest.Config) -> None:
    if HOLD_FLAG in config.stash:
        shutil.rmtree(config.stash[HOLD_FLAG].parent, ignore_errors=True)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:  # xdist, main process: every worker, replacements too
    if HOLD_FLAG in node.config.stash:
        node.workerinput["vqb_fault_hold_flag"] = str(node.config.stash[HOLD_FLAG])


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    if error:
        node.config.stash[WORKER_DIED] = True


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids) -> None:
    """A worker collected after one died: a replacement has joined."""
    config = node.config
    if HOLD_FLAG in config.stash and config.stash.get(WORKER_DIED, False):
        config.stash[HOLD_FLAG].touch()


def _hold_until_replaced(item: pytest.Item) -> None:
    flag = getattr(item.config, "workerinput", {}).get("vqb_fault_hold_flag")
    if not flag:
        pytest.fail("VQB_FAULT_HOLD_AT needs an xdist run (-n)", pytrace=False)
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not os.path.exists(flag):          # polls a condition; the limit only ends a broken run
        if time.monotonic() > deadline:
            pytest.fail(f"held {HOLD_LIMIT_S:.0f} s and no replacement worker joined", pytrace=False)
        time.sleep(0.1)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    if _matches("VQB_FAULT_KILL_AT", item) and _original_worker():
        os.kill(os.getpid(), signal.SIGKILL)
    if _matches("VQB_FAULT_HOLD_AT", item):
        _hold_until_replaced(item)
    if _matches("VQB_FAULT_INTERRUPT_AT", item):
        os.kill(os.getpid(), signal.SIGINT)
    sig, _, where = os.environ.get("VQB_FAULT_SIGNAL_AT", "").partition(":")
    if where and where in item.nodeid:
        os.kill(os.getpid(), getattr(signal, "SIG" + sig))
    if _matches("VQB_FAULT_FAIL_AT", item):
        pytest.fail("injected by tests/fault_hooks.py", pytrace=False)
