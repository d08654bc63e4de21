"""Fixtures shared by the suite's own tests (helpers they share are plain modules beside it)."""
import pytest
import torch

from fixtures.runtime.session import Session
from fixtures.world.generate import DEFAULT_SEED, default_layout, generate_world


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A runtime session on CPU over a small world, for the method tests (tests/llava_cases.py)."""
    cache = tmp_path_factory.mktemp("cache")
    # A small world where the session looks for the embedded one (same version and seed).
    generate_world(cache / "world", seed=DEFAULT_SEED, layout={**default_layout(), "vqav2": {"train": 40, "val": 20}},
                   progress=False)
    return Session.create(data_root=cache, cache_dir=cache, run_dir=tmp_path_factory.mktemp("run"),
                          device=torch.device("cpu"))
