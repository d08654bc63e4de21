"""GPTQ and AWQ over the tiny LLaVA through the calibration walker, and the cache round trip."""
import copy
from pathlib import Path

import pytest
import torch

from fixtures.runtime.grid import CalibrationSpec, Case, ModelSpec, TaskSpec
from fixtures.world.generate import DEFAULT_SEED, generate_world
from quantizers import api
from quantizers.cache import QuantCache, cache_key
from quantizers.config import ConfigError, make_config
from fixtures.runtime.session import Session
from quantizers.targets import select_targets
from fixtures.adapters import llava
from tasks import vqav2

ROOT = Path(__file__).resolve().parent.parent
MODEL = ModelSpec("llava-tiny", "llava", "fixtures/tiny/llava-tiny")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    # A small world where the session looks for the embedded one (same version and seed).
    generate_world(cache / "world", seed=DEFAULT_SEED, split_images={"train": 40, "val": 20}, progress=False)
    return Session.create(data_root=cache, cache_dir=cache, run_dir=tmp_path_factory.mktemp("run"),
                          device=torch.device("cpu"))


def case_for(config, calibration=CalibrationSpec(samples=16, batch_size=8)):
    return Case(MODEL, config, TaskSpec("vqav2"), calibration=calibration)


def params(adapter):
    return {n: p.detach().clone() for n, p in adapter.model.named_parameters()}


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_methods_cover_every_target_and_restore_bit_identically(bench, method, tmp_path):
    config = make_config(f"{method}-w3", method, {"vision": 3, "connector": 3, "language": 3}, group_size=32)
    case = case_for(config)
    fp = bench.models.fp(MODEL)
    quantized = copy.deepcopy(fp)
    report, entry = api.quantize(quantized, config, bench.data.calibration_batches(case, quantized))
    targets = {f"{t.name}.weight" for t in select_targets(quantized, config)}
    assert set(entry.weights) == targets and len(report.layers) == len(targets)
    before, after = params(fp), params(quantized)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == targets | set(entry.raw)
    if method == "awq":   # folds into norms are declared, explicit scales are stored and paid for
        assert any("layernorm" in n or "layer_norm" in n for n in entry.raw)
        assert entry.state and any(r.extra_bits for r in report.layers)
    cache = QuantCache(tmp_path)
    key = cache_key(method, "test")
    cache.save(key, entry)
    restored = copy.deepcopy(fp)
    api.restore(restored, config, cache.load(key))
    assert all(torch.equal(after[n], p) for n, p in params(restored).items())
    samples = vqav2.load_official(bench.data.cache_dir / "world" / "vqav2", "val2014")[:12]
    run = lambda a: [s["prediction"] for s in vqav2.evaluate(a, samples, 12, progress=False).samples]
    assert run(restored) == run(quantized)


def test_bench_builds_once_then_loads_from_the_cache(bench):
    case = case_for(make_config("gptq-w4", "gptq", {"language": 4}))
    calibration = lambda adapter: bench.data.calibration_batches(case, adapter)
    first, report = bench.models._build_or_load(case, calibration)
    again, cached = bench.models._build_or_load(case, calibration)
    assert not report.from_cache and cached.from_cache
    assert cached.bpw == report.bpw
    assert all(torch.equal(p, q) for p, q in zip(first.model.parameters(), again.model.parameters()))


def test_calibration_never_comes_from_the_evaluated_split(bench):
    case = case_for(make_config("gptq-w4", "gptq", {"language": 4}), CalibrationSpec(split="val"))
    with pytest.raises(ConfigError, match="is the evaluated split"):
        bench.data.calibration_batches(case, bench.models.fp(MODEL))


@pytest.mark.parametrize("layers, layer_types, expected", [
    ("first", "both", {"layers.0.self_attn", "layers.0.mlp"}),
    ("middle", "both", {"layers.1.self_attn", "layers.1.mlp"}),
    ("last", "mlp", {"layers.2.mlp"}),
    ("0-1", "attention", {"layers.0.self_attn", "layers.1.self_attn"}),
])
def test_layer_groups_and_types(bench, layers, layer_types, expected):
    config = make_config("q", "rtn", {"language": 4}, layers=layers, layer_types=layer_types)
    names = {t.name for t in select_targets(bench.models.fp(MODEL), config)}
    prefix = "model.language_model."
    assert names and all(n.startswith(prefix) for n in names)
    assert {n[len(prefix):].rsplit(".", 1)[0] for n in names} == expected


def test_middle_third_of_a_two_block_stack_is_a_clear_error(bench):
    # The tiny LLaVA's vision tower has two blocks: first and last, no middle.
    with pytest.raises(ConfigError, match="selects no Linear"):
        select_targets(bench.models.fp(MODEL), make_config("q", "rtn", {"vision": 4}, layers="middle"))


def test_a_changed_calibration_prompt_rebuilds_the_quantized_model(bench, monkeypatch):
    """The cache key covers the calibration batches themselves: a new prompt (or processor, or
    world) makes other GPTQ weights, so it must never be served the old ones."""
    case = case_for(make_config("gptq-w4", "gptq", {"language": 4}))
    calibration = lambda adapter: bench.data.calibration_batches(case, adapter)
    bench.models._build_or_load(case, calibration)
    _, cached = bench.models._build_or_load(case, calibration)
    assert cached.from_cache
    monkeypatch.setattr(llava, "SHORT_ANSWER", "Answer in one word.")
    _, rebuilt = bench.models._build_or_load(case, calibration)
    assert not rebuilt.from_cache
