"""Run several pytest command lines in one Python process, for the fault tests that only need a
run's start (usage errors) or a short run: the suite's plugin imports torch and transformers,
about 9 s a process on a 2-core machine, paid here once instead of once per command line.

    python tests/pytest_many.py CASES.json OUT_DIR

CASES.json is a list of argument lists; each runs through pytest.main() from the repository
root, its stdout and stderr (file descriptors 1 and 2, so pytest's own writers are caught too)
in OUT_DIR/<n>.out and OUT_DIR/<n>.err, its exit code in OUT_DIR/<n>.rc. Cases run in order, so
one can use the run dir an earlier one left.
"""
import json
import os
import sys
from pathlib import Path

import pytest


def run_case(args: list[str], out_dir: Path, number: int) -> None:
    saved = os.dup(1), os.dup(2)
    with open(out_dir / f"{number}.out", "wb") as stdout, open(out_dir / f"{number}.err", "wb") as stderr:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(stdout.fileno(), 1)
        os.dup2(stderr.fileno(), 2)
        try:
            code = pytest.main(args)
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
    (out_dir / f"{number}.rc").write_text(str(int(code)))


def main() -> None:
    cases, out_dir = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    for number, args in enumerate(cases):
        run_case(args, out_dir, number)


if __name__ == "__main__":
    main()
