"""Running the benchmark suite as a subprocess, the way a user or CI does, for the runner tests."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Six single-task groups on the tiny LLaVA: enough for two workers to share, fast on 2 cores.
SMALL_GRID = ("-m", "rtn and vqav2 and llava-tiny", "--limit", "20")


def run_bench(*args: str, timeout: int = 300, **fault_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **fault_env}
    env.pop("PYTEST_XDIST_WORKER_COUNT", None)   # set when the self-tests themselves run under -n
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.fault_hooks", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def output(out: subprocess.CompletedProcess) -> str:
    return f"--- stdout\n{out.stdout[-4000:]}\n--- stderr\n{out.stderr[-3000:]}"
