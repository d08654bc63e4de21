"""Grid expectations: pinned values with tolerances, recovery vs FP, drops; per task or flat."""
import pytest

from fixtures.runtime.expect import ExpectError, expectation_failures, parse_expect
from fixtures.runtime.grid import GridError, load_grid

TASKS = ["vqav2", "text_ppl"]


def test_flat_keys_apply_to_every_task_and_a_task_entry_wins():
    parsed = parse_expect({"max_drop": 5, "text_ppl": {"max_drop": 0.5},
                           "vqav2": {"value": 61.2, "abs_tol": 1.0}}, TASKS, "configs[0].expect")
    assert parsed == {"vqav2": (("abs_tol", 1.0), ("max_drop", 5.0), ("value", 61.2)),
                      "text_ppl": (("max_drop", 0.5),)}
    assert parse_expect(None, TASKS, "x") == {}
    assert parse_expect({"min_recovery": 0.97}, TASKS, "x")["text_ppl"] == (("min_recovery", 0.97),)


@pytest.mark.parametrize("raw, message", [
    ({"value": 3}, "configs[2].expect.value: a pinned value needs abs_tol or rel_tol beside it"),
    ({"vqav2": {"rel_tol": 0.1}}, "configs[2].expect.vqav2.rel_tol: a tolerance needs the pinned value beside it"),
    ({"vqav2": {"value": "high", "abs_tol": 1}}, "configs[2].expect.vqav2.value: must be a number, got 'high'"),
    ({"abs_tol": -1, "value": 2}, "configs[2].expect.abs_tol: must be >= 0"),
    ({"coco": {"value": 1, "abs_tol": 1}}, "configs[2].expect: unknown field(s) coco"),
    ({"vqav2": {"tol": 1}}, "configs[2].expect.vqav2: unknown field(s) tol"),
    ({"vqav2": 3}, "configs[2].expect.vqav2: must be a mapping of checks"),
])
def test_malformed_expectation_names_the_field(raw, message):
    with pytest.raises(ExpectError) as info:
        parse_expect(raw, TASKS, "configs[2].expect")
    assert str(info.value).startswith(message)


def test_grid_reports_a_bad_expectation_as_a_grid_error(tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text("models: {m: {family: llava, path: x}}\ntasks: {vqav2: {}}\n"
                    "configs: [{name: fp16, method: fp, expect: {vqav2: {value: 95}}}]\n")
    with pytest.raises(GridError, match=r"g\.yaml: configs\[0\]\.expect\.vqav2\.value: a pinned value needs"):
        load_grid(grid)
    grid.write_text(grid.read_text().replace("{value: 95}", "{value: 95, abs_tol: 0.5}"))
    assert load_grid(grid).cases[0].expect == (("abs_tol", 0.5), ("value", 95.0))


def failures(checks, value, fp, higher=True):
    return expectation_failures(tuple(sorted(checks.items())), value, fp, higher, "t m")


def test_pinned_value_uses_absolute_plus_relative_tolerance():
    assert not failures({"value": 61.2, "abs_tol": 1.0}, 60.3, 95)
    assert failures({"value": 61.2, "abs_tol": 1.0}, 60.1, 95) == [
        "t m; expected 61.2 ± 1 (pinned in the grid), off by -1.1"]
    assert not failures({"value": 100, "rel_tol": 0.02}, 101.9, 0)
    assert failures({"value": 100, "rel_tol": 0.02}, 102.1, 0)
    assert not failures({"value": 100, "rel_tol": 0.01, "abs_tol": 1}, 101.9, 0)   # 1 + 1% of 100


def test_recovery_is_direction_aware():
    assert not failures({"min_recovery": 0.97}, 92.2, 95.0)          # 0.9705
    assert "recovery 0.9684 (quantized/FP)" in failures({"min_recovery": 0.97}, 92.0, 95.0)[0]
    # Perplexity: lower is better, so recovery is FP / quantized.
    assert not failures({"min_recovery": 0.97}, 3.25, 3.17, higher=False)
    assert "FP/quantized (lower is better)" in failures({"min_recovery": 0.97}, 3.4, 3.17, higher=False)[0]
    assert "recovery undefined" in failures({"min_recovery": 0.9}, 1.0, 0.0)[0]


def test_existing_drop_and_floor_keys_still_work():
    assert failures({"max_drop": 2}, 92.9, 95) == ["t m; expected a drop of at most 2"]
    assert not failures({"max_drop": 2}, 93.1, 95)
    assert failures({"max_rel_drop": 0.01}, 3.3, 3.17, higher=False)           # ppl rose 4%
    assert failures({"min": 80}, 79.9, 95) and not failures({"min": 80}, 80, 95)
    assert len(failures({"min": 99, "max_drop": 0, "value": 1, "abs_tol": 0}, 90, 95)) == 3
