"""Every registered method over the tiny LLaVA (the contract: coverage and the cache round trip,
parametrized over the registry so a new method is covered by adding it), the runtime's model
pool and cache."""
import copy
from pathlib import Path

import pytest
import torch

from fixtures.runtime.grid import CalibrationSpec
from quantizers import api
from quantizers.cache import QuantCache, cache_key
from quantizers.config import ConfigError, make_config
from quantizers.methods import all_methods
from fixtures.runtime.data import DataStore
from fixtures.runtime.models import ModelPool
from fixtures.runtime.session import Session
from reports.rundir import RunDir
from quantizers.targets import select_targets
from fixtures.adapters import llava
from tasks import vqav2
from tests.llava_cases import MODEL, case_for, params

ROOT = Path(__file__).resolve().parent.parent


def fresh_pool(session, copy=False):
    return ModelPool(torch.device("cpu"), session.data.cache_dir, copy=copy)


# Parameters that only make a method quick enough for a unit test on the tiny model.
QUICK_PARAMS = {"qvlm": {"encoder_samples": 16, "encoder_epochs": 2, "entropy_samples": 2048}}


def contract_config(method: str):
    """A 3-bit config of every component for the method: weight-only where the method accepts
    it, else with 8-bit activations (Q-VLM searches activation ranges, so it needs their bits)."""
    bits, params = {"vision": 3, "connector": 3, "language": 3}, QUICK_PARAMS.get(method)
    try:
        return make_config(f"{method}-w3", method, bits, group_size=32, params=params)
    except ConfigError:
        return make_config(f"{method}-w3a8", method, bits, group_size=32, a_bits=8, params=params)


def test_the_baseline_method_changes_nothing_and_builds_no_entry(bench):
    config = make_config("fp16", "fp")
    assert not config.method.changes_weights and "fp16" in config.method.marks
    fp = bench.models.fp(MODEL)
    before = params(fp)
    report, entry = api.quantize(fp, config)
    assert entry is None and set(report.bpw.values()) == {16.0}
    assert all(torch.equal(before[n], p) for n, p in params(fp).items())


@pytest.mark.parametrize("method", [name for name, cls in all_methods().items() if cls.changes_weights])
def test_every_method_covers_every_target_and_restores_bit_identically(bench, method, tmp_path):
    config = contract_config(method)
    case = case_for(config)
    fp = bench.models.fp(MODEL)
    quantized = copy.deepcopy(fp)
    report, entry = api.quantize(quantized, config,
                                 bench.data.calibration_batches(case, quantized) if config.calibrates else None)
    targets = {f"{t.name}.weight" for t in select_targets(quantized, config)}
    assert set(entry.weights) == targets and len(report.layers) == len(targets)
    before, after = params(fp), params(quantized)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == targets | set(entry.raw)
    assert not set(entry.raw) & targets, "a weight the entry holds as codes is not held again at 16 bits"
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
    first, report = fresh_pool(bench).quantized(case, calibration)
    first_params = params(first)
    again, cached = fresh_pool(bench).quantized(case, calibration)
    assert not report.from_cache and cached.from_cache
    assert cached.bpw == report.bpw
    assert all(torch.equal(first_params[n], p) for n, p in params(again).items())


def test_calibration_never_comes_from_the_evaluated_split(bench):
    case = case_for(make_config("gptq-w4", "gptq", {"language": 4}), CalibrationSpec(split="val"))
    with pytest.raises(ConfigError, match="is the evaluated split"):
        bench.data.calibration_batches(case, bench.models.fp(MODEL))


def test_calibration_batches_are_made_once_for_a_models_configs(bench):
    """Configs of one model with one calibration spec get the same batches, made once; another
    spec, or another adapter's processor, gets its own; and they are what a fresh make gives."""
    adapter = bench.models.fp(MODEL)
    gptq = case_for(make_config("gptq-w4", "gptq", {"language": 4}))
    awq = case_for(make_config("awq-w3", "awq", {"language": 3}))
    first = bench.data.calibration_batches(gptq, adapter)
    assert bench.data.calibration_batches(awq, adapter) is first
    other_seed = case_for(gptq.config, CalibrationSpec(samples=16, batch_size=8, seed=1))
    assert bench.data.calibration_batches(other_seed, adapter) is not first
    fresh = bench.data.calibration_batches(gptq, copy.deepcopy(adapter))
    assert fresh is not first and len(fresh) == len(first)
    for made, again in zip(fresh, first):
        assert made.keys() == again.keys() and all(torch.equal(made[k], again[k]) for k in made)
        assert torch.equal(made.answer_mask, again.answer_mask)


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
    fresh_pool(bench).quantized(case, calibration)
    _, cached = fresh_pool(bench).quantized(case, calibration)
    assert cached.from_cache
    monkeypatch.setattr(llava, "SHORT_ANSWER", "Answer in one word.")
    _, rebuilt = fresh_pool(bench).quantized(case, calibration)
    assert not rebuilt.from_cache


def test_configs_applied_in_place_match_fresh_copies_and_undo_exactly(bench):
    """The pool keeps one model and undoes each config from a host snapshot; the path it replaced
    deep-copied the FP model per config. Same weights, same predictions, FP restored bit for bit,
    no hook or buffer left behind (AWQ adds both)."""
    in_place, copies = fresh_pool(bench), fresh_pool(bench, copy=True)
    fp_params = params(in_place.fp(MODEL))
    hooks = lambda a: sum(len(m._forward_pre_hooks) for m in a.model.modules())
    samples = vqav2.load_official(bench.data.cache_dir / "world" / "vqav2", "val2014")[:8]
    run = lambda a: [s["prediction"] for s in vqav2.evaluate(a, samples, 8, progress=False).samples]
    fp_hooks, fp_predictions = hooks(in_place.fp(MODEL)), run(in_place.fp(MODEL))
    for config in (make_config("awq-w3", "awq", {"language": 3, "connector": 3}, a_bits=8),
                   make_config("rtn-w3", "rtn", {"vision": 3, "language": 3})):
        case = case_for(config)
        calibration = lambda adapter, case=case: bench.data.calibration_batches(case, adapter)
        in_place.quantized(case, calibration)
        assert run(in_place.fp(MODEL)) == fp_predictions        # an FP use undoes the config...
        a, _ = in_place.quantized(case, calibration)           # ...and the kept entry re-applies it
        b, _ = copies.quantized(case, calibration)
        assert all(torch.equal(p, params(b)[n]) for n, p in params(a).items())
        assert hooks(a) == hooks(b) and run(a) == run(b)
        assert (hooks(a) > fp_hooks) == (config.a_bits is not None)
    restored = in_place.fp(MODEL)
    assert all(torch.equal(fp_params[n], p) for n, p in params(restored).items())
    assert hooks(restored) == fp_hooks and run(restored) == fp_predictions
    assert not any(name.endswith("awq_input_scale") for name, _ in restored.model.named_buffers())


def test_the_pool_lets_go_of_the_last_configs_entry_before_building_the_next(bench, monkeypatch):
    """On a GPU an entry's host copy goes into pinned memory; pinning new memory is most of its
    cost, and the host allocator hands out freed pinned blocks again: the previous config's entry
    (applied and kept for re-application and export) must be free before the next is built."""
    import gc
    import weakref

    from fixtures.runtime import models

    pool = fresh_pool(bench)
    first, second = (case_for(make_config(f"rtn-w{bits}", "rtn", {"language": bits})) for bits in (3, 4))
    pool.quantized(first, lambda a: None)
    entry = weakref.ref(pool.applied_entry(MODEL))
    alive_at_build = []
    real_quantize = models.quantize

    def quantize(*args, **kwargs):
        gc.collect()
        alive_at_build.append(entry() is not None)
        return real_quantize(*args, **kwargs)

    monkeypatch.setattr(models, "quantize", quantize)
    pool.quantized(second, lambda a: None)
    assert alive_at_build == [False]
    assert pool.applied_entry(MODEL) is not None   # the new config's, for export


def test_undoing_a_config_keeps_the_models_own_hooks(bench):
    """transformers registers its output-capturing hooks at a model's first forward. When that
    forward is a quantized config's (an xdist worker whose first test is not the FP one), undoing
    the config must remove only the quantization hooks, or the vision tower's hidden states are
    gone for every later forward (IndexError in get_image_features)."""
    pool = fresh_pool(bench)
    samples = vqav2.load_official(bench.data.cache_dir / "world" / "vqav2", "val2014")[:4]
    case = case_for(make_config("rtn-w4-vision", "rtn", {"vision": 4}, a_bits=8))
    adapter, _ = pool.quantized(case, lambda a: None)
    quantized = [s["prediction"] for s in vqav2.evaluate(adapter, samples, 4, progress=False).samples]
    fp = [s["prediction"] for s in vqav2.evaluate(pool.fp(MODEL), samples, 4, progress=False).samples]
    fresh = [s["prediction"] for s in vqav2.evaluate(fresh_pool(bench).fp(MODEL), samples, 4, progress=False).samples]
    assert fp == fresh and len(quantized) == 4


def test_each_test_records_the_runtime_phases_it_paid_for(bench, tmp_path):
    """The first test of a model carries its build and FP baseline; a calibrated config its host
    snapshot, calibration data and the cache's share; the next config the restore of the one before."""
    session = Session(bench.data, ModelPool(torch.device("cpu"), tmp_path / "cache"), RunDir(tmp_path / "run"),
                      torch.device("cpu"))
    fp = session.run(case_for(make_config("fp16", "fp")))
    first = session.run(case_for(make_config("gptq-w4-language", "gptq", {"language": 4})))
    second = session.run(case_for(make_config("rtn-w3-language", "rtn", {"language": 3})))

    assert {"model_build", "data", "fp_baseline"} <= set(fp.phases) and fp.eval_seconds > 0
    assert "compile" not in fp.phases, "the CPU compiles nothing: no compile phase of 0 s"
    assert {"snapshot", "calibration_data", "fingerprint", "cache_write", "entry_copy"} <= set(first.phases)
    assert "model_build" not in first.phases and "calibration_data" not in second.phases   # RTN: none
    assert "restore" in second.phases and "fp_baseline" not in second.phases
    assert all(seconds >= 0 for o in (fp, first, second) for seconds in o.phases.values())
    properties = dict(session.properties(second))
    assert properties["phase.restore"] == second.phases["restore"]


def test_the_fp_evaluations_seconds_exclude_loading_its_samples(bench, tmp_path, monkeypatch):
    """Loading a task's samples (on first use, generating the embedded world: about 10 s of the
    H100 grid's FP row) is the `data` phase's, not the FP evaluation's: the samples are loaded
    before its clock starts."""
    session = Session(DataStore(bench.data.data_root, bench.data.cache_dir, bench.data.limit,
                                world_layout=bench.data.world_layout),
                      ModelPool(torch.device("cpu"), tmp_path / "cache"), RunDir(tmp_path / "run"), torch.device("cpu"))
    events = []
    load, evaluate = session.data.load, session.evaluate
    monkeypatch.setattr(session.data, "load", lambda spec: events.append("load") or load(spec))
    monkeypatch.setattr(session, "evaluate", lambda *a, **k: events.append("evaluate") or evaluate(*a, **k))
    fp = session.run(case_for(make_config("fp16", "fp")))
    assert events == ["load", "evaluate"] and fp.phases["data"] >= 0


def test_the_fp_row_records_its_baseline_evaluations_peak_memory(bench, tmp_path, monkeypatch):
    """The FP row is the baseline evaluation: its peak memory is that evaluation's (on a GPU the
    peak is reset before each evaluation; the FP row used to read it after the reset, and so
    recorded only the resident model), a quantized row its own evaluation's."""
    session = Session(bench.data, ModelPool(torch.device("cpu"), tmp_path / "cache"), RunDir(tmp_path / "run"),
                      torch.device("cpu"))
    readings = iter([900.0, 5.0])   # the baseline's evaluation, then the RTN row's
    monkeypatch.setattr(Session, "peak_mem_mb", lambda self: next(readings))
    assert session.run(case_for(make_config("rtn-w3-language", "rtn", {"language": 3}))).peak_mem_mb == 5.0
    assert session.run(case_for(make_config("fp16", "fp"))).peak_mem_mb == 900.0


@pytest.mark.parametrize("on_device_if_fits", [False, True])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here: pinned and on-device snapshots run on a GPU only"))])
def test_one_snapshot_per_model_copies_each_component_once(device, on_device_if_fits):
    """The pool's snapshot grows with the components configs quantize; restoring one config's
    components leaves the others alone (on a GPU: from pinned host copies, or from device copies
    where the card keeps room)."""
    from torch import nn

    from fixtures.runtime.models import FPSnapshot
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)).to(device)
    fp = {name: p.detach().clone() for name, p in model.named_parameters()}
    snapshot = FPSnapshot(model, ["0"], on_device_if_fits)
    held = dict(snapshot.params)
    snapshot.add(model, ["0", "1"])
    assert sorted(snapshot.params) == sorted(fp) and all(snapshot.params[n] is t for n, t in held.items())
    on_device = device == "cuda" and on_device_if_fits
    assert all(t.device.type == ("cuda" if on_device else "cpu") for t in snapshot.params.values())
    assert all(t.is_pinned() == (device == "cuda") for t in snapshot.params.values() if not on_device)
    assert snapshot.device_bytes == (sum(t.numel() * 4 for t in fp.values()) if on_device else 0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    snapshot.restore(model, ["1"])
    assert torch.equal(model[1].weight, fp["1.weight"]) and torch.equal(model[0].weight, fp["0.weight"] + 1)
    snapshot.to_host()
    assert snapshot.device_bytes == 0
    snapshot.restore(model)
    assert all(torch.equal(p, fp[n]) for n, p in model.named_parameters())


def test_a_snapshot_stays_on_the_device_only_where_half_the_card_stays_free():
    from fixtures.runtime.models import snapshot_fits_device
    gb = 2**30
    assert snapshot_fits_device(14 * gb, free=64 * gb, total=80 * gb)       # 7B on an H100: 50 GB stay free
    assert not snapshot_fits_device(26 * gb, free=52 * gb, total=80 * gb)   # 13B: only 26 GB would
    assert snapshot_fits_device(26 * gb, free=111 * gb, total=141 * gb)     # 13B on an H200
