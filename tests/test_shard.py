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
    everything = collected()
    shards = [collected("--shard", f"{index}/3") for index in (1, 2, 3)]
    assert sorted(sum(shards, [])) == sorted(everything)
    configs = [{line.split("[")[1] for line in shard} for shard in shards]
    for first in range(3):      # one (model, config) never on two shards
        for second in range(first + 1, 3):
            assert not configs[first] & configs[second]


@pytest.mark.parametrize("value", ["3/2"])   # every form is checked above, in-process
def test_command_line_rejects_bad_shards(value):
    out = run_bench("--collect-only", "-q", "--shard", value)
    assert out.returncode == 4, output(out)
    assert f"--shard takes i/n with 1 <= i <= n, e.g. --shard 2/4; got {value!r}" in out.stderr
    assert "Traceback" not in out.stderr
