"""Fixtures shared by the suite's own tests (helpers they share are plain modules beside it)."""
import pytest
import torch

from fixtures.runtime.session import Session
from fixtures.world.generate import DEFAULT_SEED, default_layout, ensure_world

# The world of the method tests: the default one but for VQAv2 (enough train questions for 128
# calibration samples) and without the 1,000-image retrieval split; generated once per session.
BENCH_LAYOUT = {**default_layout(), "vqav2": {"train": 200, "val": 20},
                "flickr30k": {split: n for split, n in default_layout()["flickr30k"].items() if split != "test1k"}}


@pytest.fixture(scope="session")
def bench_world(tmp_path_factory):
    return ensure_world(tmp_path_factory.mktemp("bench-world") / "world", DEFAULT_SEED, BENCH_LAYOUT)


@pytest.fixture(scope="module")
def bench(tmp_path_factory, bench_world):
    """A runtime session on CPU over a small world, for the method tests (tests/llava_cases.py);
    its own cache (quantized entries), the world shared."""
    cache = tmp_path_factory.mktemp("cache")
    (cache / "world").symlink_to(bench_world, target_is_directory=True)
    return Session.create(data_root=cache, cache_dir=cache, run_dir=tmp_path_factory.mktemp("run"),
                          device=torch.device("cpu"), world_layout=BENCH_LAYOUT)
