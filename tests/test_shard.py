"""--shard i/n: a deterministic, cost-balanced partition of the grid's groups."""
import json
import os
import random
import subprocess
import sys

import pytest

from fixtures.runtime.grid import group_costs, load_grid
from fixtures.runtime.shard import Shard, assign_groups, in_shard, parse_shard, shard_loads
from tests.bench_run import ROOT, output, run_bench

GRIDS = ("default", "methods", "mmq", "sensitivity", "paper")


@pytest.mark.parametrize("text, shard", [("1/1", Shard(1, 1)), ("2/4", Shard(2, 4)), (" 3 / 3 ", Shard(3, 3))])
def test_parse_shard(text, shard):
    assert parse_shard(text) == shard


@pytest.mark.parametrize("text", ["0/2", "3/2", "x", "1/0", "-1/2", "1/2/3", "", "1-2"])
def test_bad_shard_is_one_usage_error(text):
    with pytest.raises(ValueError, match=r"--shard takes i/n with 1 <= i <= n"):
        parse_shard(text)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_shards_partition_the_grid_by_whole_groups(grid, count):
    cases = load_grid(ROOT / "benchmarks" / "grids" / f"{grid}.yaml").cases
    shards = [in_shard(cases, Shard(index, count)) for index in range(1, count + 1)]
    groups = {case.group for case in cases}
    assert set().union(*shards) == groups                                   # union: the whole grid
    assert sum(len(shard) for shard in shards) == len(groups)               # no overlap
    for case in cases:                                                      # every group intact
        assert [index for index, shard in enumerate(shards) if case.group in shard] != []
    shuffled = random.Random(7).sample(cases, len(cases))
    assert assign_groups(shuffled, count) == assign_groups(cases, count)   # input order does not matter
    costs = group_costs(cases)
    loads = shard_loads(cases, count)
    # Longest-processing-time-first: no shard exceeds the mean by more than the largest group.
    assert max(loads) <= sum(loads) / count + max(costs.values()) + 1e-9
    if len(groups) >= 4 * count:
        assert max(loads) <= 1.25 * sum(loads) / count


def test_assignment_does_not_depend_on_hash_seeds():
    script = ("import json; from fixtures.runtime.grid import load_grid; from fixtures.runtime.shard import "
              "assign_groups; print(json.dumps(assign_groups(load_grid('benchmarks/grids/mmq.yaml').cases, 4), "
              "sort_keys=True))")
    runs = [subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}).stdout
            for seed in ("1", "2")]
    assert runs[0] == runs[1] and json.loads(runs[0])


def collected(*args):
    out = run_bench("--collect-only", "-q", *args)
    assert out.returncode == 0, output(out)
    return [line for line in out.stdout.splitlines() if "::" in line]


def test_command_line_shards_cover_the_collection_once():
    """`--shard 2/3` on the command line collects exactly the tests of the groups in_shard gives
    shard 2 (the partition itself is checked in-process above, for every grid and count)."""
    everything = collected()
    cases = load_grid(ROOT / "benchmarks" / "grids" / "default.yaml").cases
    group_of = {(case.task.name, case.id): case.group for case in cases}
    kept = in_shard(cases, Shard(2, 3))
    expected = [line for line in everything
                if group_of[(line.split("::test_", 1)[1].split("[")[0], line.split("[", 1)[1].rstrip("]"))] in kept]
    assert 0 < len(expected) < len(everything)
    assert sorted(collected("--shard", "2/3")) == sorted(expected)


@pytest.mark.parametrize("value", ["3/2"])   # every form is checked above, in-process
def test_command_line_rejects_bad_shards(value):
    out = run_bench("--collect-only", "-q", "--shard", value)
    assert out.returncode == 4, output(out)
    assert f"--shard takes i/n with 1 <= i <= n, e.g. --shard 2/4; got {value!r}" in out.stderr
    assert "Traceback" not in out.stderr
