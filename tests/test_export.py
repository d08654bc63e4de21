"""Packed export (fixtures/runtime/export.py, `python -m reports export`): a config written as a
compressed-tensors checkpoint and loaded back through transformers' `from_pretrained` gives the
logits of the fake-quantized model the suite measured, with a max abs difference of exactly 0
(the tiny models are float32 and the checkpoint keeps the suite's float32 scales), and the same
VQAv2 predictions, on the tiny LLaVA and the tiny BLIP-2.

Loading uses `CompressedTensorsConfig(dequantize=True)`: compressed-tensors' own decompressor
rebuilds each weight from the checkpoint's packed codes, zero points and scales at load time.
transformers' other path (weights kept packed until the first forward) cannot read asymmetric
zero points yet: it builds the model's zero-point tensors unpacked, (rows, groups), where the
checkpoint holds them packed, (rows / 8, groups), and stops on the size mismatch
(vllm-project/llm-compressor#1618); the suite's default grids are asymmetric.
"""
import json
from pathlib import Path

import pytest
import torch
from transformers import CompressedTensorsConfig

from fixtures.runtime.data import DataStore
from fixtures.runtime.export import PROVENANCE_FILE, ExportError, export_measured, measured_case
from fixtures.runtime.grid import CalibrationSpec, Case, ModelSpec, TaskSpec
from fixtures.runtime.models import ModelPool
from quantizers.config import make_config
from reports.__main__ import main as reports_main
from reports.csv_log import write_results
from tasks import vqav2

LLAVA = ModelSpec("llava-tiny", "llava", "fixtures/tiny/llava-tiny")
BLIP2 = ModelSpec("blip2-tiny", "blip2", "fixtures/tiny/blip2-tiny")
ALL_LLAVA = {"vision": 4, "connector": 4, "language": 4}
ALL_BLIP2 = {"vision": 4, "qformer": 4, "connector": 4, "language": 4}
CALIBRATION = CalibrationSpec(samples=16, batch_size=8)
SAMPLES = 12   # VQAv2 questions compared; every tiny Linear's width (48..128) is a multiple of 16


SMALL_WORLD = {"vqav2": {"train": 40, "val": 20}}   # generating the default one takes minutes


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return DataStore(cache, cache, world_layout=SMALL_WORLD)


def pool(data):
    return ModelPool(torch.device("cpu"), data.cache_dir)


def measured_and_exported(data, case, out: Path):
    """The fake-quantized adapter as the suite measures it, and the checkpoint loaded back."""
    measured, _ = pool(data).quantized(case, lambda adapter: data.calibration_batches(case, adapter))
    record = export_measured(case, data, pool(data), out, {"test": True})
    loaded = type(measured.model).from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    return measured, loaded.eval(), record


def with_model(adapter, model):
    """The adapter's prompts and processor over another model."""
    clone = type(adapter)(adapter.name, model, adapter.processor, adapter.device)
    clone.components = adapter.components
    return clone


@pytest.mark.parametrize("model, config", [
    (LLAVA, make_config("rtn-w4g16-all", "rtn", ALL_LLAVA, group_size=16)),
    (BLIP2, make_config("rtn-w4g16-all", "rtn", ALL_BLIP2, group_size=16)),
    (LLAVA, make_config("gptq-w4-language", "gptq", {"language": 4})),
    (BLIP2, make_config("rtn-w8-sym-all", "rtn", ALL_BLIP2, sym=True)),
], ids=lambda v: getattr(v, "name", None))
def test_exported_checkpoint_loads_back_bit_true(data, model, config, tmp_path):
    case = Case(model, config, TaskSpec("vqav2"), calibration=CALIBRATION)
    measured, loaded, record = measured_and_exported(data, case, tmp_path / "ckpt")

    written = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert written["quant_method"] == "compressed-tensors" and written["format"] == "pack-quantized"
    schemes = written["config_groups"].values()
    assert {s["weights"]["num_bits"] for s in schemes} == set(config.bits.values())
    assert sum(len(s["targets"]) for s in schemes) == record["quantized_linears"] > 0
    assert json.loads((tmp_path / "ckpt" / PROVENANCE_FILE).read_text())["config_hash"] == case.config_hash

    # The weights themselves: every parameter of the loaded model equals the measured one.
    mine = dict(measured.model.named_parameters())
    for name, param in loaded.named_parameters():
        assert torch.equal(param, mine[name]), name

    samples = data.load(TaskSpec("vqav2"))[:SAMPLES]
    inputs = measured.model_inputs([s.image() for s in samples],
                                   [measured.short_answer_prompt(s.question) for s in samples])
    with torch.no_grad():
        diff = (measured.model(**inputs).logits - loaded(**inputs).logits).abs().max().item()
    assert diff == 0.0   # bit-true, not merely within bf16 rounding

    ours = vqav2.evaluate(measured, samples, batch_size=SAMPLES, progress=False)
    theirs = vqav2.evaluate(with_model(measured, loaded), samples, batch_size=SAMPLES, progress=False)
    assert [s["prediction"] for s in theirs.samples] == [s["prediction"] for s in ours.samples]


def test_configs_without_a_packed_form_are_refused_naming_why(data, tmp_path):
    cases = {
        "not a multiple of group_size": make_config("g32", "rtn", {"vision": 4}, group_size=32),  # 48-wide Linears
        "static_groups: true": make_config("act", "gptq", {"language": 4}, group_size=16, params={"act_order": True}),
        "static ranges are not exported": make_config("a8", "rtn", {"language": 4}, a_bits=8,
                                                      a_quant=_tensor_activations()),
    }
    for reason, config in cases.items():
        with pytest.raises(ExportError, match=reason):
            export_measured(Case(LLAVA, config, TaskSpec("vqav2"), calibration=CALIBRATION), data, pool(data),
                            tmp_path / "ckpt", {})


def _tensor_activations():
    from quantizers.config import ActivationQuant
    return ActivationQuant(granularity="tensor")


ROWS = [{"config": "rtn-w4-language", "model": "llava-tiny", "config_hash": "", "run_id": "r1"}]


def test_measured_case_must_hash_to_what_the_run_measured():
    from fixtures.runtime.grid import load_grid
    grid = load_grid(Path("benchmarks/grids/default.yaml"))
    case = next(c for c in grid.cases if c.config.name == "rtn-w4-language")
    rows = [{**ROWS[0], "config_hash": case.config_hash}]
    assert measured_case(rows, grid, "rtn-w4-language", None).config == case.config
    with pytest.raises(ExportError, match="pass the grid the run used"):
        measured_case([{**ROWS[0], "config_hash": "0" * 12}], grid, "rtn-w4-language", None)
    with pytest.raises(ExportError, match="no rows of config 'nope'"):
        measured_case(rows, grid, "nope", None)


def test_cli_exports_a_run_config_and_says_why_not(data, tmp_path, capsys, monkeypatch):
    from fixtures.runtime.grid import load_grid
    grid = load_grid(Path("benchmarks/grids/default.yaml"))
    case = next(c for c in grid.cases if c.config.name == "rtn-w4-language")
    run = tmp_path / "run"
    run.mkdir()
    write_results([_row(case)], run / "results.csv")
    args = ["export", str(run), "rtn-w4-language", "--out", str(tmp_path / "ckpt"), "--cache-dir", str(data.cache_dir)]
    assert reports_main(args) == 0
    assert "rtn-w4-language" in capsys.readouterr().out
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    assert reports_main([*args[:2], "rtn-w4g32-all", *args[3:]]) == 2
    assert "no rows of config 'rtn-w4g32-all'" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert reports_main([*args[:3], "--out", str(busy), *args[5:]]) == 2   # never emptied
    assert "is not an earlier export" in capsys.readouterr().err and (busy / "keep.txt").is_file()


def _row(case):
    from reports.schema import CSV_COLUMNS
    row = dict.fromkeys(CSV_COLUMNS, "")
    row.update(run_id="r1", test_id=f"test_vqav2[{case.id}]", model=case.model.name, task="vqav2",
               config=case.config.name, method=case.config.method.name, config_hash=case.config_hash,
               metric="accuracy", value="90.0", primary="true", status="passed")
    return row


def test_cli_real_cost_fills_the_configs_rows_only(data, tmp_path, capsys):
    """--real-cost loads the export on the int4 kernel (its CPU twin here) and writes the loaded
    model's memory and decode tokens/s into that config's rows; other rows stay blank."""
    from fixtures.runtime.grid import load_grid
    from reports.csv_log import read_rows
    grid = load_grid(Path("benchmarks/grids/default.yaml"))
    case = next(c for c in grid.cases if c.config.name == "rtn-w4-language")
    fp = next(c for c in grid.cases if c.config.name == "fp16" and c.model.name == "llava-tiny")
    run = tmp_path / "run"
    run.mkdir()
    write_results([_row(case), _row(fp)], run / "results.csv")
    args = ["export", str(run), case.config.name, "--out", str(tmp_path / "ckpt"), "--cache-dir", str(data.cache_dir),
            "--real-cost"]
    assert reports_main(args) == 0
    assert "tokens/s at batch 1 (int4 tinygemm" in capsys.readouterr().out
    rows = {row["config"]: row for row in read_rows(run / "results.csv")}
    assert float(rows[case.config.name]["real_mem_mb"]) > 0 and float(rows[case.config.name]["real_tokens_per_s"]) > 0
    assert rows["fp16"]["real_mem_mb"] == rows["fp16"]["real_tokens_per_s"] == ""
    # The loaded model is smaller than the float32 one the suite measured: int4 codes, bf16 rest.
    fp_mb = sum(t.numel() * t.element_size() for t in pool(data).fp(case.model).model.state_dict().values()) / 2**20
    assert float(rows[case.config.name]["real_mem_mb"]) < fp_mb
