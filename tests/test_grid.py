"""Grid validation: every malformed grid is one GridError naming the file and the field."""
import dataclasses
import textwrap
from pathlib import Path

import pytest

from fixtures.runtime.grid import GridError, generation_for, group_costs, load_grid, schedule_order
from fixtures.runtime.invocation import OptionError, check_device
from quantizers.config import ConfigError, make_config
from tasks.registry import TASKS
from tasks.requests import Generation

ROOT = Path(__file__).resolve().parent.parent
GOOD = """
models:
  m: {family: llava, path: fixtures/tiny/llava-tiny}
tasks:
  vqav2: {data: embedded}
configs:
  - {name: fp16, method: fp}
  - {name: q, method: rtn, bits: {language: 4, vision: 16}, expect: {max_rel_drop: 0.1}}
"""


def write(tmp_path, text):
    path = tmp_path / "grid.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_shipped_grids_load():
    for path in (ROOT / "benchmarks" / "grids").glob("*.yaml"):
        assert load_grid(path).cases, path


def test_good_grid_expands_and_drops_16_bit_components(tmp_path):
    grid = load_grid(write(tmp_path, GOOD))
    assert [c.id for c in grid.cases] == ["m-fp16", "m-q"]
    assert grid.cases[1].config.bits == {"language": 4}
    assert set(grid.cases[1].mark_names) == {"rtn", "vqav2", "m", "w4", "language"}
    assert grid.cases[0].mark_names == ["fp", "vqav2", "m", "fp16"]


@pytest.mark.parametrize("change, field", [
    (("method: rtn", "method: magic"), "unknown method 'magic'"),
    (("language: 4", "language: 9"), "bits for 'language' must be an integer in 2..8, got 9"),
    (("language: 4", "language: 1"), "got 1"),
    (("language: 4", "language: four"), "got 'four'"),
    (("vqav2: {data: embedded}", "vqa3: {data: embedded}"), "tasks.vqa3: unknown task"),
    (("max_rel_drop", "max_loss"), "configs[1].expect: unknown field(s) max_loss"),
    (("{name: fp16, method: fp}", "{name: q, method: fp}"), "configs[1]: duplicate config name 'q'"),
    (("family: llava, ", ""), "models.m.family: required string"),
    (("configs:", "confgs:"), "top level: unknown field(s) confgs"),
    # A misspelt family used to validate and then fail every test with a traceback.
    (("family: llava", "family: lava"), "models.m.family: unknown family 'lava'; known: blip2, blip2-retrieval"),
    (("expect: {max_rel_drop: 0.1}", "params: {dampp: 0.1}"), "configs[1]: config 'q': params: unknown parameter(s) dampp; allowed: none"),
    (("method: rtn, bits", "method: gptq, params: {damp: high}, bits"), "parameter damp must be float, got 'high'"),
    (("vqav2: {data: embedded}", "vqav2: {data: embedded, k_test: 3}"), "tasks.vqav2: unknown field(s) k_test"),
    (("path: fixtures/tiny/llava-tiny}", "path: x, generation: {num_beams: 0}}"), "models.m.generation.num_beams: must be an integer >= 1"),
    (("path: fixtures/tiny/llava-tiny}", "path: x, generation: {share_image_prefix: 1}}"),
     "models.m.generation.share_image_prefix: must be true or false, got 1"),
    (("path: fixtures/tiny/llava-tiny}", "path: x, generation: {tasks: {vqa: {num_beams: 5}}}}"),
     "models.m.generation.tasks: unknown task 'vqa'"),
    (("path: fixtures/tiny/llava-tiny}", "path: x, generation: {tasks: {vqav2: {beams: 5}}}}"),
     "models.m.generation.tasks.vqav2: unknown field(s) beams"),
    (("path: fixtures/tiny/llava-tiny}", "path: x, generation: {tasks: {text_ppl: {num_beams: 5}}}}"),
     "models.m.generation.tasks.text_ppl: the task sends no generative request"),
    (("path: fixtures/tiny/llava-tiny}", "path: x, components: {eyes: a.b}}"), "models.m.components: must map component names"),
    (("configs:", "calibration: {task: scienceqa}\nconfigs:"), "calibration.task: task scienceqa gives no calibration pairs"),
])
def test_bad_field_is_named(tmp_path, change, field):
    with pytest.raises(GridError) as info:
        load_grid(write(tmp_path, GOOD.replace(*change)))
    message = str(info.value)
    assert field in message and "grid.yaml" in message
    assert "\n" not in message


def test_not_yaml_and_missing_file(tmp_path):
    with pytest.raises(GridError, match="not valid YAML"):
        load_grid(write(tmp_path, "models: [unclosed"))
    with pytest.raises(GridError, match="grid file not found"):
        load_grid(tmp_path / "nope.yaml")


def test_expand_makes_the_product_and_skips_components_a_family_lacks(tmp_path):
    grid = load_grid(write(tmp_path, GOOD.replace("  - {name: fp16, method: fp}", """  - {name: fp16, method: fp}
  - name: "{method}-w{bits}-{components}-{layers}"
    expand:
      method: [rtn, gptq]
      bits: [2, 4]
      components: [vision, qformer, [vision, language], all]
      layers: [first, all]""")))
    ids = [c.id for c in grid.cases]
    # 2 methods x 2 bits x 3 applicable component sets x 2 layer groups (qformer: not LLaVA)
    assert len(ids) == 2 + 24 and not any("qformer" in i for i in ids)
    case = next(c for c in grid.cases if c.id == "m-gptq-w2-all-first")
    assert case.config.bits == {"vision": 2, "connector": 2, "language": 2}
    assert case.config.layers == "first" and {"w2", "gptq", "connector"} <= set(case.mark_names)


def test_expand_and_component_errors_are_named(tmp_path):
    with pytest.raises(GridError, match=r"configs\[1\].bits: unknown component\(s\) langauge"):
        load_grid(write(tmp_path, GOOD.replace("language: 4", "langauge: 4")))
    bad = GOOD.replace("  - {name: fp16, method: fp}", """  - {name: fp16, method: fp}
  - {name: "x-{bits}", expand: {bits: 4}}""")
    with pytest.raises(GridError, match=r"configs\[1\].expand.bits: must be a non-empty list"):
        load_grid(write(tmp_path, bad))


def test_config_hash_is_what_was_measured_not_the_name(tmp_path):
    """compare matches rows by config_hash: a renamed config keeps its hash; another calibration
    seed (which changes GPTQ's weights) gets another one, as does the same config on another model."""
    text = GOOD.replace("{name: q, method: rtn, bits: {language: 4, vision: 16}, expect: {max_rel_drop: 0.1}}",
                        "{name: q, method: gptq, bits: {language: 4}}")
    base = load_grid(write(tmp_path, text)).cases[1]
    renamed = load_grid(write(tmp_path, text.replace("name: q,", "name: renamed,"))).cases[1]
    reseeded = load_grid(write(tmp_path, text + "calibration: {seed: 1}\n")).cases[1]
    assert renamed.config.name == "renamed" and renamed.config_hash == base.config_hash
    assert reseeded.config_hash != base.config_hash
    assert base.group.endswith(base.config_hash)


def test_task_options_come_from_the_registry(tmp_path):
    grid = load_grid(write(tmp_path, """
        models:
          r: {family: blip2-retrieval, path: fixtures/tiny/blip2-tiny-retrieval}
        tasks:
          flickr_retrieval: {k_test: 16}
        configs:
          - {name: fp16, method: fp}
        """))
    assert dict(grid.cases[0].task.options) == {"k_test": 16}
    assert grid.cases[0].task.split == "test"


def test_calibration_defaults_to_the_grids_own_data_for_its_task(tmp_path):
    grid = load_grid(write(tmp_path, GOOD.replace("vqav2: {data: embedded}", "vqav2: {data: my_vqa}")))
    assert (grid.calibration.task, grid.calibration.split, grid.calibration.data) == ("vqav2", "train", "my_vqa")
    with pytest.raises(GridError, match="calibration: unknown field"):
        load_grid(write(tmp_path, GOOD + "calibration: {sample: 3}\n"))


def test_the_tasks_that_give_calibration_pairs_and_per_sample_scores():
    """The calibration sources and the per-sample score fields compare relies on; the
    contract every task meets is tests/test_registries.py's."""
    tasks = TASKS.all()
    assert {t.name for t in tasks.values() if t.calibration_pair} == {"vqav2"}
    assert {t.name: t.sample_score for t in tasks.values() if t.sample_score} == {
        "vqav2": "score", "vizwiz": "score", "scienceqa": "correct"}


def test_group_costs_put_the_long_quantizations_first():
    """xdist hands groups out in collection order; the estimate must rank GPTQ of the language
    model above AWQ, AWQ above RTN, a language model above a vision tower, and FP last."""
    grid = load_grid(Path("benchmarks/grids/perf.yaml"))
    costs = group_costs(grid.cases)
    for model in ("llava-1.5-7b-random", "blip2-opt-2.7b-random"):   # the perf grid's models with an LM
        by_name = {case.config.name: costs[case.group] for case in grid.cases if case.model.name == model}
        assert by_name["gptq-w4g128-language"] > by_name["awq-w4g128-language"] > by_name["rtn-w4g128-language"]
        assert by_name["gptq-w4g128-all"] > by_name["gptq-w4g128-language"] > by_name["gptq-w4g128-vision"]
        assert min(by_name.values()) == by_name["fp16"]


def test_schedule_order_pairs_the_longest_groups_with_the_shortest_for_xdist():
    grid = load_grid(Path("benchmarks/grids/perf.yaml"))
    cases = [case for case in grid.cases if case.model.name == "llava-1.5-7b-random"]   # one model's groups
    costs = group_costs(cases)
    serial, pair = schedule_order(cases, 1), schedule_order(cases, 2)
    assert sorted(serial) == sorted(pair) == sorted(costs)
    assert [costs[g] for g in serial] == sorted(costs.values(), reverse=True)
    # two workers: the two longest start, each with one of the two shortest queued behind it
    assert {costs[g] for g in pair[:2]} == set(sorted(costs.values())[-2:])
    assert {costs[g] for g in pair[2:4]} == set(sorted(costs.values())[:2])
    assert [costs[g] for g in pair[4:]] == sorted([costs[g] for g in pair[4:]], reverse=True)


def test_generation_merges_the_model_and_task_overrides_over_the_task_defaults():
    from dataclasses import replace

    from tasks import coco_caption, vqav2

    grid = load_grid(ROOT / "benchmarks/grids/paper.yaml")
    blip2 = grid.models["blip2-opt-2.7b"]
    assert generation_for(blip2, "vqav2") == replace(vqav2.GENERATION, num_beams=5)     # VQA: no minimum, as LAVIS
    assert generation_for(blip2, "coco_caption") == replace(coco_caption.GENERATION, num_beams=5, min_length=8)
    assert generation_for(grid.models["llava-1.5-7b"], "vqav2") is vqav2.GENERATION   # no overrides: greedy
    assert generation_for(grid.models["blip2-itm-coco"], "flickr_retrieval") is None   # sends no generative request


def test_a_switch_is_on_for_a_model_where_it_or_one_of_its_tasks_turns_it_on():
    """The runtime compiles a model's fused code at its build when any of its tasks will use it."""
    from fixtures.runtime.grid import GenerationOverrides

    default = next(f.default for f in dataclasses.fields(Generation) if f.name == "fused_elementwise")
    assert GenerationOverrides().on_for_any_task("fused_elementwise") is default
    off = GenerationOverrides.from_grid({"fused_elementwise": False})
    assert not off.on_for_any_task("fused_elementwise")
    assert GenerationOverrides.from_grid({"fused_elementwise": False, "tasks": {"vqav2": {"fused_elementwise": True}}}
                                         ).on_for_any_task("fused_elementwise")
    assert GenerationOverrides.from_grid({"share_image_prefix": True}).on_for_any_task("share_image_prefix")


# -- issue 21: values, not only types ------------------------------------------------------------
@pytest.mark.parametrize("method, params, message", [
    ("gptq", {"damp": -0.01}, "parameter damp must be >= 0"),
    ("gptq", {"block_size": 0}, "parameter block_size must be >= 1"),
    ("awq", {"n_grid": 0}, "parameter n_grid must be >= 1"),
    ("qvlm", {"p_min": 0.99, "p_max": 0.98}, r"parameter p_min must be in \(0, p_max\]"),
    ("qvlm", {"weights": "awq"}, "parameter weights must be one of rtn, gptq"),
])
def test_method_parameters_out_of_range_are_config_errors(method, params, message):
    with pytest.raises(ConfigError, match=message):
        make_config("q", method, {"language": 4}, params=params)


@pytest.mark.parametrize("entry, message", [
    ("{name: qv, method: qvlm, bits: {language: 4}, a_bits: 4, params: {weights: sgd}}",
     "config 'qv': params: parameter weights must be one of rtn, gptq, got 'sgd'"),
    ("{name: qv, method: qvlm, bits: {language: 4}}", "config 'qv': qvlm searches static activation ranges"),
    ("{name: f, method: fp, bits: {language: 4}}", "config 'f': method fp takes no bits"),
])
def test_a_config_its_method_cannot_run_fails_at_grid_load(tmp_path, entry, message):
    """The method checks the whole config when the grid loads (issue 22): a Q-VLM config with
    an unknown inner method or no static activation ranges used to load and fail when quantized."""
    with pytest.raises(GridError, match=rf"configs\[0\]: {message}"):
        load_grid(write(tmp_path, GOOD.replace("{name: fp16, method: fp}", entry)))


# Config hashes of the default grid at cc055f1 (before configs carried their method objects):
# they key the quantized-model cache and the CSV's config_hash column, which compare matches
# across runs, so a refactor of how a config is made must leave them as they were.
DEFAULT_GRID_HASHES = {
    ("llava-tiny", "fp16"): "a512fc48cad4",
    ("blip2-tiny", "fp16"): "6f1d084126aa",
    ("llava-tiny", "rtn-w4-all"): "c44f06ad62d3",
    ("llava-tiny", "rtn-w4g32-all"): "8bc1855c1aaf",
    ("llava-tiny", "gptq-w4-all"): "4234254d94e6",
    ("blip2-tiny", "awq-w4-all"): "804c124a1213",
    ("blip2-tiny-retrieval", "gptq-w3-all"): "e07dc4bca2f4",
    ("llava-tiny", "awq-w4a4-all"): "cd3adce7f1f0",
    ("llava-tiny", "qvlm-w4a4-all"): "9e1459ed07ef",
    ("llava-tiny", "gptq-qig-w3a16-language"): "cf66cd3e3a89",
}


def test_default_grid_config_hashes_are_unchanged():
    grid = load_grid(ROOT / "benchmarks" / "grids" / "default.yaml")
    hashes = {(case.model.name, case.config.name): case.config_hash for case in grid.cases}
    assert {key: hashes.get(key) for key in DEFAULT_GRID_HASHES} == DEFAULT_GRID_HASHES


def test_string_booleans_and_path_names_are_grid_errors_in_expanded_entries_too(tmp_path):
    expanded = GOOD.replace("  - {name: fp16, method: fp}\n", "").replace(
        "{name: q, method: rtn, bits: {language: 4, vision: 16}, expect: {max_rel_drop: 0.1}}",
        "{name: 'q-{sym}', method: rtn, bits: {language: 4}, expand: {sym: [true, 'false']}}")
    with pytest.raises(GridError, match=r"configs\[0\]\.sym: must be true or false, got 'false'"):
        load_grid(write(tmp_path, expanded))
    with pytest.raises(GridError, match=r"configs\[0\]\.name: a name must be .* got 'a/b'"):
        load_grid(write(tmp_path, GOOD.replace("{name: fp16, method: fp}", "{name: a/b, method: fp}")))


def test_device_beyond_the_visible_gpus_is_named():
    with pytest.raises(OptionError, match=r"--device cuda:7: only 2 CUDA device\(s\) visible, cuda:0..cuda:1"):
        check_device("cuda:7", 2)
    assert check_device("cuda:1", 2) == "cuda:1" and check_device("cpu", 0) == "cpu"
