"""The tiny LLaVA as a grid model, and the cases and parameter snapshots the method tests build
on it (with the `bench` fixture of tests/conftest.py)."""
from fixtures.runtime.grid import CalibrationSpec, Case, ModelSpec, TaskSpec

MODEL = ModelSpec("llava-tiny", "llava", "fixtures/tiny/llava-tiny")


def case_for(config, calibration=CalibrationSpec(samples=16, batch_size=8)):
    return Case(MODEL, config, TaskSpec("vqav2"), calibration=calibration)


def params(adapter):
    return {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
