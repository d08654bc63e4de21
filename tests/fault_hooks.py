"""A pytest plugin for the fault tests only, loaded into a benchmark run with
`-p tests.fault_hooks` (xdist passes it on to every worker). It injects a fault into the test
whose node id contains the given text, after its evaluation (setup) and before its rows are
recorded (after the call), as a crash in a real evaluation would land:

    VQB_FAULT_KILL_AT=<text>        the process running that test kills itself with SIGKILL
                                    (only an original xdist worker, gw0 or gw1: a crash that
                                    repeats on every replacement is xdist's own failure mode)
    VQB_FAULT_INTERRUPT_AT=<text>   the process running that test gets SIGINT (Ctrl-C)
    VQB_FAULT_FAIL_AT=<text>        that test fails
"""
import os
import signal

import pytest


def _matches(variable: str, item: pytest.Item) -> bool:
    """The variable holds one text or several, comma-separated."""
    return any(text and text in item.nodeid for text in os.environ.get(variable, "").split(","))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    if _matches("VQB_FAULT_KILL_AT", item) and os.environ.get("PYTEST_XDIST_WORKER", "gw0") in ("gw0", "gw1"):
        os.kill(os.getpid(), signal.SIGKILL)
    if _matches("VQB_FAULT_INTERRUPT_AT", item):
        os.kill(os.getpid(), signal.SIGINT)
    if _matches("VQB_FAULT_FAIL_AT", item):
        pytest.fail("injected by tests/fault_hooks.py", pytrace=False)
