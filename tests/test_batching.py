"""The evaluation batch size chosen from free memory when a grid gives none."""
import pytest
import torch

from fixtures.runtime.batching import DEFAULT_BATCH, MAX_BATCH, PROBE_SAMPLES, batch_size_for, choose_batch_size
from fixtures.runtime.grid import load_grid

GIB = 2**30


@pytest.mark.parametrize("free,per_sample,expected", [
    (80 * GIB, 0.5 * GIB, 136),      # 0.85 * 160 = 136, a multiple of 8
    (80 * GIB, 0.6 * GIB, 112),      # 113.3 -> 113 -> down to 112
    (80 * GIB, 1e3, MAX_BATCH),      # tiny samples: capped
    (2 * GIB, 1 * GIB, 1),           # 1.7 -> 1: never zero
    (6 * GIB, 1 * GIB, 5),           # under 8: as it comes
    (1 * GIB, 0.0, MAX_BATCH),       # no measurable cost
])
def test_batch_size_for_free_memory(free, per_sample, expected):
    assert batch_size_for(free, per_sample) == expected


def test_cpu_keeps_the_default_and_runs_no_probe():
    probes = []
    assert choose_batch_size(probes.append, torch.device("cpu")) == DEFAULT_BATCH and probes == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (measures its memory)")
def test_probe_is_measured_on_the_gpu():
    device = torch.device("cuda")
    held = []
    chosen = choose_batch_size(lambda n: held.append(torch.empty(n * 2**28, dtype=torch.uint8, device=device)),
                               device)
    free, _ = torch.cuda.mem_get_info(device)
    assert len(held[0]) == PROBE_SAMPLES * 2**28
    assert chosen == batch_size_for(free + PROBE_SAMPLES * 2**28, 2**28) or chosen == batch_size_for(free, 2**28)


def test_grid_without_batch_size_leaves_it_to_the_runtime(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("models: {m: {family: llava, path: fixtures/tiny/llava-tiny}}\n"
                    "tasks: {vqav2: {}, vizwiz: {batch_size: 8}}\n"
                    "configs: [{name: fp16, method: fp}]\n")
    tasks = load_grid(path).tasks
    assert tasks["vqav2"].batch_size is None and tasks["vizwiz"].batch_size == 8
